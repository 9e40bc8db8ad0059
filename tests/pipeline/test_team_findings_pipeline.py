"""Issue 17, findings 1 and 4 through Dagster's real `materialize`, LanceDB and the real CLI.

1. `sp ace` and `sp_ace` train, score and store their rounds in folders of their own.
4. a failed `agile ingest` registers nothing; `agile sources list|remove` show and drop sources.
"""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agile_pipeline.cli import app
from agile_pipeline.defs.resources import AgileResources
from agile_pipeline.lib.state import LabelEvent
from agile_pipeline.runner import RunFailed, run_concept_round, run_concept_start, run_corpus
from agile_pipeline.settings import Paths, data_home
from tests.hostile_images import write_real_like_images


def _env():  # type: ignore[no-untyped-def]
    from agile_pipeline.defs.concepts import loop_env

    agile = AgileResources()
    return loop_env(agile.state, agile.vectors, agile.encoder)


def test_alike_concept_names_keep_their_rounds_apart(agile_home: Path, tmp_path: Path) -> None:
    write_real_like_images(tmp_path / "corpus", 240, seed=17)
    assert run_corpus([str(tmp_path / "corpus")]).success
    env = _env()
    truths = {"sp ace": lambda i: int(i[:2], 16) % 3 == 0, "sp_ace": lambda i: int(i[:2], 16) % 3 != 0,
              "sp-ace": lambda i: int(i[:2], 16) % 3 == 1}
    for name, truth in truths.items():
        env.store.create_concept(name, ["red blob"])
        assert run_concept_start(name).success
        items = env.store.pending_items(name)
        env.store.add_labels([LabelEvent(name, it["image_id"], "positive" if truth(it["image_id"]) else "negative",
                                         "owner", source=it["source"]) for it in items])
        assert run_concept_round(name).success
    dirs = {n: env.concept_dir(n) for n in truths}
    assert dirs["sp ace"] != dirs["sp_ace"]
    for name, d in dirs.items():
        (r,) = env.store.rounds(name)
        assert Path(r["model_uri"]) == d / "round-000"
        trained = json.loads((d / "round-000" / "training_labels.json").read_text())["labels"]
        assert trained == env.store.effective_labels(name), name  # its own labels, nobody else's
        assert (d / "zero_shot.npz").is_file() and (d / "eval_set.json").is_file()
    assert env.store.rounds("sp ace")[0]["model_uri"] != env.store.rounds("sp_ace")[0]["model_uri"]
    # and one registered MLflow model each: `sp ace` and `sp-ace` no longer share `sp-ace-classifier`
    from agile_pipeline.lib import tracking

    uri = env.paths.mlflow_uri()
    names = {n: tracking.model_name(uri, n) for n in truths}
    assert names == {"sp ace": "sp.ace-classifier", "sp_ace": "sp_ace-classifier", "sp-ace": "sp-ace-classifier"}
    for name in truths:
        (v,) = tracking.model_versions(uri, name)
        assert v["tags"]["agile/concept"] == name and v["tags"]["agile/model"] == "Model 1"
        assert env.store.rounds(name)[0]["info"]["registered_model"] == names[name]  # what the app shows
    model, model_uri = tracking.load_classifier_model(uri, "sp ace")
    assert model_uri == "models:/sp.ace-classifier@champion" and model is not None
    assert tracking.version_for_alias(uri, "sp ace", "champion") == "1"


def test_a_model_registered_under_the_old_name_keeps_it(tmp_path: Path) -> None:
    from agile_pipeline.lib import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking._client(uri)
    client.create_registered_model("animal-check-classifier", tags={"agile/concept": "animal check"})
    assert tracking.model_name(uri, "animal check") == "animal-check-classifier"  # its models stay one series
    assert tracking.model_name(uri, "animal-check") == "animal-check-classifier"  # (its own name anyway)
    client.set_registered_model_tag("animal-check-classifier", "agile/concept", "animal-check")
    assert tracking.model_name(uri, "animal check") == "animal.check-classifier"  # taken by another concept
    from labeling_ui.export import load_snippet

    assert "models:/animal.check-classifier@champion" in load_snippet("animal check", uri)
    assert "models:/animal-check-classifier@champion" in load_snippet(
        "animal check", uri, registered_model="animal-check-classifier")  # as the round recorded it


def _sources() -> list[str]:
    f = Paths(data_home()).sources_file
    return json.loads(f.read_text()) if f.exists() else []


def test_failed_ingest_registers_nothing_and_sources_can_be_listed_and_removed(agile_home: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    missing = str(tmp_path / "does" / "not" / "exist")
    r = runner.invoke(app, ["ingest", missing])
    assert r.exit_code == 1 and "does not exist" in r.output
    assert _sources() == []
    r = runner.invoke(app, ["sources", "list"])
    assert r.exit_code == 0 and r.stdout == ""

    good = tmp_path / "good"
    write_real_like_images(good, 12, seed=5)
    r = runner.invoke(app, ["ingest", str(good), missing])  # the good one is ingested, then the run fails
    assert r.exit_code == 1
    assert _sources() == [str(good.resolve())]
    # the scheduled refresh (no sources given: the registered ones) keeps working
    assert run_corpus([]).success
    r = runner.invoke(app, ["sources", "list"])
    assert r.exit_code == 0 and r.stdout.splitlines() == [str(good.resolve())]

    r = runner.invoke(app, ["sources", "remove", missing])
    assert r.exit_code == 1 and "not a registered source" in r.output
    r = runner.invoke(app, ["sources", "remove", str(good)])
    assert r.exit_code == 0 and "removed source" in r.output
    assert _sources() == []
    assert runner.invoke(app, ["sources", "list"]).stdout == ""
    with pytest.raises(RunFailed, match="no corpus source configured"):
        run_corpus([])


def test_a_registered_source_that_vanished_can_be_removed(agile_home: Path, tmp_path: Path) -> None:
    src = tmp_path / "photos"
    write_real_like_images(src, 6, seed=6)
    assert run_corpus([str(src)]).success
    for p in src.iterdir():
        p.unlink()
    src.rmdir()
    runner = CliRunner()
    r = runner.invoke(app, ["sources", "list"])
    assert r.stdout.splitlines() == [str(src.resolve())] and "does not exist" in r.output
    with pytest.raises(RunFailed):
        run_corpus([])  # what every scheduled refresh met, with no way out before
    assert runner.invoke(app, ["sources", "remove", str(src.resolve())]).exit_code == 0
    assert _sources() == []
