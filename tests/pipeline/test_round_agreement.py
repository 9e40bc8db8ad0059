"""Each round's MLflow run records the raters' agreement on the labels it was trained on
(issue 17, deliverable 2): through Dagster's real `materialize`, MLflow's sqlite store and
LanceDB, with the plumbing (random) encoder."""

from pathlib import Path

import pytest

from agile_pipeline.defs.resources import AgileResources
from agile_pipeline.lib.state import LabelEvent, LabelRule
from agile_pipeline.runner import run_concept_round, run_concept_start, run_corpus
from tests.hostile_images import write_real_like_images


def test_a_rounds_mlflow_run_has_the_agreement_figures(agile_home: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from agile_pipeline.defs.concepts import loop_env

    write_real_like_images(tmp_path / "corpus", 240, seed=23)
    assert run_corpus([str(tmp_path / "corpus")]).success
    agile = AgileResources()
    env = loop_env(agile.state, agile.vectors, agile.encoder)
    env.store.create_concept("blobs", ["red blob"], owner="olga")
    assert run_concept_start("blobs").success
    items = env.store.pending_items("blobs")
    a, b, c, d = (it["image_id"] for it in items[:4])
    # the owner rates the batch; ann and bob rate two of its images and one more of theirs:
    #   a: olga + ann + bob -   b: olga - ann -   c: ann + bob -  (no owner: review queue)
    #   d: olga + only
    truth = {it["image_id"]: ("positive" if k % 3 == 0 else "negative") for k, it in enumerate(items)}
    truth |= {a: "positive", b: "negative", d: "positive"}
    env.store.add_labels([LabelEvent("blobs", i, lab, "olga", source="expansion")
                          for i, lab in truth.items() if i != c])
    env.store.add_labels([LabelEvent("blobs", a, "positive", "ann"), LabelEvent("blobs", a, "negative", "bob"),
                          LabelEvent("blobs", b, "negative", "ann"), LabelEvent("blobs", c, "positive", "ann"),
                          LabelEvent("blobs", c, "negative", "bob")])
    assert run_concept_round("blobs").success
    (r,) = env.store.rounds("blobs")

    run = MlflowClient(tracking_uri=env.paths.mlflow_uri()).get_run(r["mlflow_run_id"])
    m, p = run.data.metrics, run.data.params
    # co-rated: a (+ + -), b (- -), c (+ -): n = 7, n+ = 3, n- = 4; o(+,-) + o(-,+) = 2 + 2 = 4;
    # alpha = 1 - (n - 1) * 4 / (2 * 3 * 4) = 1 - 24 / 24 = 0.0
    assert m["agreement_alpha"] == pytest.approx(0.0, abs=1e-9)
    assert m["agreement_images"] == 3
    assert m["n_raters"] == 3 and m["review_queue"] == 1
    assert p["label_rule"] == LabelRule().describe()

    # the owner decides c; a label that comes after the next round's cutoff (between training and
    # registering it, as the round job does) is not part of that round's figures
    from agile_pipeline.lib.loop import register_round, train_round

    env.store.add_labels([LabelEvent("blobs", c, "positive", "olga")])
    res = train_round(env, "blobs", tracking=False)
    env.store.add_labels([LabelEvent("blobs", d, "negative", "bob")])  # would make d co-rated
    run_id, _version, logged = register_round(env, "blobs", res.round_index)
    assert logged and res.round_index == 1
    m = MlflowClient(tracking_uri=env.paths.mlflow_uri()).get_run(run_id).data.metrics
    # c is now (+ - +): o(+,+) = 2, o(-,-) = 2, o(+,-) = o(-,+) = 2; n = 8, n+ = n- = 4;
    # alpha = 1 - 7 * 4 / (2 * 4 * 4) = 0.125
    assert m["agreement_alpha"] == pytest.approx(0.125)
    assert (m["agreement_images"], m["review_queue"], m["n_raters"]) == (3, 0, 3)
