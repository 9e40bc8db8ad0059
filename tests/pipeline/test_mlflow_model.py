"""Every round's classifier is a real MLflow model: loaded by alias with MLflow's own API,
scored on image files, folders and embeddings, by `mlflow models predict` and `agile predict`.

Uses the plumbing (random) encoder against MLflow's real embedded store.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from agile_pipeline.defs.concepts import loop_env
from agile_pipeline.defs.resources import AgileResources
from agile_pipeline.lib.images import load_rgb
from agile_pipeline.lib.loop import pending_items
from agile_pipeline.lib.state import LabelEvent
from agile_pipeline.lib.tracking import (
    champion_after,
    choose_champion,
    load_classifier_model,
    registered_model_name,
    version_for_alias,
)
from agile_pipeline.lib.training import TrainedClassifier
from agile_pipeline.runner import run_concept_round, run_concept_start, run_corpus
from tests.hostile_images import write_real_like_images


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A concept with two rounds, registered in MLflow (module-scoped: one corpus, one setup)."""
    root = tmp_path_factory.mktemp("mlflow-model")
    mp = pytest.MonkeyPatch()
    mp.setenv("AGILE_HOME", str(root / "agile"))
    mp.setenv("AGILE_ENCODER", "random:32")
    mp.delenv("DAGSTER_HOME", raising=False)
    src = root / "corpus"
    write_real_like_images(src, 300, seed=3)
    run_corpus([str(src)])
    agile = AgileResources()
    env = loop_env(agile.state, agile.vectors, agile.encoder)
    env.store.create_concept("dots", ["red dot"], ["blue"])
    run_concept_start("dots")
    for _ in range(2):
        env.store.add_labels([
            LabelEvent("dots", it["image_id"], "positive" if int(it["image_id"][-1], 16) < 6 else "negative",
                       "owner", source=it["source"])
            for it in pending_items(env, "dots")])
        run_concept_round("dots")
    yield env, src
    mp.undo()


def test_versions_are_pyfunc_models_with_signature_dataset_aliases_and_links(trained):
    env, _src = trained
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env.paths.mlflow_uri(), registry_uri=env.paths.mlflow_uri())
    name = registered_model_name("dots")
    assert version_for_alias(env.paths.mlflow_uri(), "dots", "latest") == "2"
    assert version_for_alias(env.paths.mlflow_uri(), "dots", "champion") is not None
    mv = client.get_model_version(name, "2")
    run = client.get_run(mv.run_id)
    assert run.data.tags["dagster_run_url"].endswith(f"/runs/{run.data.tags['dagster_run_id']}")
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.name.startswith("dots-labels@")
    assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "training"
    model, _uri = load_classifier_model(env.paths.mlflow_uri(), "dots", alias="latest")
    meta = model.metadata
    assert [c["name"] for c in meta.get_input_schema().to_dict()] == ["image", "image_bytes", "embedding"]
    assert model.model_config["embedding_model"] == env.model_id
    assert model.model_config["encoder_spec"] == "random:32"


def test_pyfunc_scores_files_folders_bytes_and_embeddings_like_the_classifier(trained, tmp_path):
    env, src = trained
    files = sorted(src.glob("*.png"))[:5]
    folder = tmp_path / "few"
    folder.mkdir()
    for f in files:
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # reported, not fatal
    model, _uri = load_classifier_model(env.paths.mlflow_uri(), "dots", version=2)
    out = model.predict(pd.DataFrame({"image": [str(folder)]}), params={"threshold": 0.5})
    assert list(out["image"]) == [str(p) for p in sorted(folder.glob("*.png"))]
    broken = out[out["image"].str.endswith("broken.png")].iloc[0]
    assert np.isnan(broken["probability"]) and broken["error"]
    good = out[out["error"] == ""]
    from agile_pipeline.lib.encoders import load_encoder

    clf = TrainedClassifier.load(Path(env.store.rounds("dots")[1]["model_uri"]))
    X = load_encoder("random:32").embed_images([load_rgb(folder / Path(p).name) for p in good["image"]])
    want = clf.predict_proba(np.asarray(X, np.float32))
    assert np.allclose(good["probability"].to_numpy(np.float32), want, atol=1e-6)
    assert list(good["is_concept"]) == [bool(p >= 0.5) for p in want]
    by_emb = model.predict(pd.DataFrame({"embedding": [list(map(float, x)) for x in X]}))
    assert np.allclose(by_emb["probability"].to_numpy(np.float32), want, atol=1e-6)
    by_bytes = model.predict(pd.DataFrame({"image_bytes": [(folder / Path(p).name).read_bytes() for p in good["image"]]}))
    assert np.allclose(by_bytes["probability"].to_numpy(np.float32), want, atol=1e-6)


def test_champion_follows_the_newest_until_evaluated_then_moves_only_up(trained):
    env, _src = trained
    uri = env.paths.mlflow_uri()
    assert version_for_alias(uri, "dots", "champion") == "2"  # no eval ratings yet: the newest
    assert choose_champion(uri, "dots", {"1": 0.9, "2": 0.7}) == "2"  # never back to an older one
    assert version_for_alias(uri, "dots", "champion") == "2"
    assert champion_after(None, "3", {}) == "3"
    assert champion_after("1", "3", {"1": 0.8, "2": 0.8, "3": 0.7}) == "1"  # a tie keeps it
    assert champion_after("1", "3", {"1": 0.8, "2": 0.85, "3": 0.9}) == "3"
    assert champion_after("1", "3", {"1": 0.8, "2": 0.9, "3": float("nan")}) == "2"
    assert champion_after(None, "3", {"1": 0.9, "2": 0.9, "3": 0.5}) == "1"


def test_mlflow_models_predict_and_agile_predict_agree(trained, tmp_path):
    env, src = trained
    files = sorted(src.glob("*.png"))[:3]
    req = tmp_path / "input.json"
    req.write_text(json.dumps({"dataframe_split": {"columns": ["image"], "data": [[str(f)] for f in files]}}))
    out_path = tmp_path / "out.json"
    environ = {**os.environ, "MLFLOW_TRACKING_URI": env.paths.mlflow_uri(),
               "AGILE_HOME": str(env.paths.home)}
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    proc = subprocess.run(
        [str(mlflow_cli), "models", "predict", "-m", f"models:/{registered_model_name('dots')}@latest",
         "-i", str(req), "-t", "json", "-o", str(out_path), "--env-manager", "local"],
        check=False, env=environ, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = json.loads(out_path.read_text())["predictions"]
    agile = subprocess.run(
        [str(Path(sys.executable).with_name("agile")), "predict", "dots", *map(str, files), "--alias", "latest"],
        check=False, env=environ, capture_output=True, text=True, timeout=300)
    assert agile.returncode == 0, agile.stderr[-3000:]
    lines = [ln.split("\t") for ln in agile.stdout.strip().splitlines()[1:]]
    assert [ln[0] for ln in lines] == [str(f) for f in files] == [r["image"] for r in served]
    assert [round(float(ln[1]), 4) for ln in lines] == [round(r["probability"], 4) for r in served]
    missing = subprocess.run(
        [str(Path(sys.executable).with_name("agile")), "predict", "dots", str(files[0]), "--version", "99"],
        check=False, env=environ, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1 and "no registered model for 'dots' at version 99" in missing.stderr


def test_concept_predictions_score_the_corpus_with_the_champion_incrementally(trained, tmp_path, monkeypatch):
    import duckdb

    from agile_pipeline.defs.concepts import concept_predictions
    from agile_pipeline.lib import propagation
    from agile_pipeline.runner import metadata_of

    env, _src = trained
    table = env.paths.home / "predictions" / f"{env.concept_dir('dots').name}.parquet"
    champion = version_for_alias(env.paths.mlflow_uri(), "dots", "champion")
    query = f"SELECT image_id, probability, model_version, path, model_probability, propagated FROM '{table}'"
    rows = duckdb.sql(query).fetchall()
    n_images = lambda: sum(env.store.count_images().values())  # noqa: E731
    assert len(rows) == n_images() and {r[2] for r in rows} == {champion}
    round_row = next(r for r in env.store.rounds("dots") if r["model_version"] == champion)
    clf = TrainedClassifier.load(Path(round_row["model_uri"]))
    want = lambda rows: clf.predict_proba(env.vectors.vectors_for(env.model_id, [r[0] for r in rows]))  # noqa: E731
    # the model file's own answer is always there; the ratings here are random with respect to
    # the (random) vectors, so the graph's rated neighbours disagree: not propagated
    again = metadata_of(run_concept_round("dots", selection=["concept_predictions"]), concept_predictions)
    assert again["scored_now"] == 0 and again["rows"] == len(rows)  # nothing new: nothing scored
    assert not again["propagated"] and again["neighbour_agreement"] < propagation.MIN_AGREEMENT
    assert np.allclose([r[4] for r in rows], want(rows), atol=1e-6)
    assert [r[1] for r in rows] == [r[4] for r in rows] and not any(r[5] for r in rows)
    assert all(Path(r[3]).exists() for r in rows[:20])

    # where the neighbours agree (here: any agreement counts), the corpus scores are propagated and
    # a refresh rescores every image (the graph changed)
    monkeypatch.setattr(propagation, "MIN_AGREEMENT", 0.0)
    more = tmp_path / "more"
    write_real_like_images(more, 12, seed=99)
    run_corpus([str(more)])
    after = metadata_of(run_concept_round("dots", selection=["concept_predictions"]), concept_predictions)
    assert after["propagated"] and after["scored_now"] == after["rows"] == n_images()
    rows = duckdb.sql(query).fetchall()
    assert all(r[5] for r in rows) and np.allclose([r[4] for r in rows], want(rows), atol=1e-6)
    assert not np.allclose([r[1] for r in rows], [r[4] for r in rows], atol=1e-3)
    ratings = env.store.effective_labels("dots", purpose="train", upto=int(round_row["label_cutoff"]))
    got = {r[0]: r[1] for r in rows}
    assert ratings and all(got[i] == float(v) for i, v in ratings.items())  # ratings held

    # propagation off: the model file's scores, and a refresh scores only the new images
    monkeypatch.setenv("AGILE_PROPAGATION", "off")
    off = metadata_of(run_concept_round("dots", selection=["concept_predictions"]), concept_predictions)
    assert not off["propagated"] and off["scored_now"] == n_images()
    rows = duckdb.sql(query).fetchall()
    assert np.allclose([r[1] for r in rows], want(rows), atol=1e-6) and not any(r[5] for r in rows)
    before = n_images()
    write_real_like_images(tmp_path / "even-more", 7, seed=98)
    run_corpus([str(tmp_path / "even-more")])
    last = metadata_of(run_concept_round("dots", selection=["concept_predictions"]), concept_predictions)
    assert last["scored_now"] == n_images() - before > 0
    assert last["rows"] == n_images() and not last["rescored_all"]
