"""The corpus's neighbour graph as a Dagster asset of the corpus job, and a round that finds none
for the current table version (real `materialize`, LanceDB, split caches; plumbing encoder)."""

import json

from agile_pipeline.defs.concepts import classifier
from agile_pipeline.defs.corpus import neighbour_graph
from agile_pipeline.lib import propagation
from agile_pipeline.lib.corpus_scores import corpus_graph
from agile_pipeline.lib.loop import pending_items
from agile_pipeline.runner import (
    CORPUS_JOB,
    _run,
    metadata_of,
    run_concept_round,
    run_concept_start,
)
from tests.pipeline.test_concept_loop import _env, _rate


def test_the_corpus_job_builds_the_graph_once_per_table_version(corpus, monkeypatch):
    from agile_pipeline import settings

    env = _env(corpus)
    g = corpus_graph(env.vectors, env.model_id)
    assert g is not None and g.build_seconds == 0.0 and len(g.graph) == 800  # the corpus job built it
    md = metadata_of(_run(CORPUS_JOB, selection=["neighbour_graph"]), neighbour_graph)
    assert md["status"] == "current" and md["images"] == 800 and md["k"] == propagation.K
    assert md["train_images"] == g.n_train
    monkeypatch.setattr(settings, "PROPAGATION_MAX_IMAGES", 799)
    assert metadata_of(_run(CORPUS_JOB, selection=["neighbour_graph"]), neighbour_graph)["status"] == (
        "none: over 799 images (AGILE_PROPAGATION=on builds it)")
    monkeypatch.setenv("AGILE_PROPAGATION", "off")
    assert metadata_of(_run(CORPUS_JOB, selection=["neighbour_graph"]), neighbour_graph)["status"] == "off"


def test_a_round_does_not_build_a_large_graph_on_the_raters_time(corpus, monkeypatch):
    """Where the current table version has no graph yet and building it would cost the rater
    time (here: a limit of 100 images), a kernel round trains on the ratings alone; the round's
    predictions step builds the graph after the batch is committed, so the next round has it."""
    from agile_pipeline import settings

    monkeypatch.setenv("AGILE_MODEL_FAMILY", "kernel")
    monkeypatch.setattr(propagation, "PSEUDO_THRESHOLD", 0.0)
    monkeypatch.setattr(settings, "PROPAGATION_ROUND_BUILD_IMAGES", 100)
    env = _env(corpus)
    g = corpus_graph(env.vectors, env.model_id)
    assert g is not None
    g.train.cached(f"graph-k{propagation.K}-{g.test.tag}").unlink()  # as if the job had not run
    env.store.create_concept("big", ["red blob"], ["blue square"])
    run_concept_start("big")
    _rate(env, "big", pending_items(env, "big"), lambda i: int(i[:2], 16) % 4 == 0)
    assert metadata_of(run_concept_round("big"), classifier)["graph_positives"] == 0
    # built after the commit (the corpus scores of the predictions table), off the rater's path
    assert metadata_of(_run(CORPUS_JOB, selection=["neighbour_graph"]), neighbour_graph)["status"] == "current"
    again = run_concept_round("big", training={"force": True})
    assert metadata_of(again, classifier)["graph_positives"] == propagation.PSEUDO_LIMIT
    saved = json.loads((env.concept_dir("big") / "round-000" / "training_labels.json").read_text())
    assert len(saved["graph_positives"]) == propagation.PSEUDO_LIMIT
