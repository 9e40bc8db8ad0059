"""The SEALS candidate pool and the ANN index through Dagster's real `materialize`, LanceDB and
the split caches (plumbing encoder: these tests check the machinery, not semantics)."""

import numpy as np

from agile_pipeline.defs.concepts import al_candidates, classifier
from agile_pipeline.defs.corpus import embedding_index
from agile_pipeline.lib import candidate_pool
from agile_pipeline.lib.loop import load_model, pending_items
from agile_pipeline.lib.scan import exact_scores, nearest_in_split
from agile_pipeline.lib.selection import margin
from agile_pipeline.lib.split_cache import split_cache
from agile_pipeline.runner import (
    CORPUS_JOB,
    _run,
    metadata_of,
    run_concept_round,
    run_concept_start,
)
from tests.pipeline.test_concept_loop import _env, _rate


def test_pooled_rounds_score_the_neighbours_of_every_label_and_pick_the_least_certain(corpus, monkeypatch):
    monkeypatch.setenv("AGILE_CANDIDATE_POOL", "on")
    monkeypatch.setattr(candidate_pool, "POOL_SWEEP", 40)  # fewer than the split's unlabelled images
    env = _env(corpus)
    env.store.create_concept("pooled", ["red blob"], ["blue square"])
    run_concept_start("pooled")
    path = candidate_pool.pool_path(env.concept_dir("pooled"), env.model_id)
    seeded = candidate_pool.load(path)
    assert seeded.ids and all(k.startswith("query:") for k in seeded.expanded)  # the phrases' neighbours
    truth = lambda i: int(i[:2], 16) % 4 == 0  # noqa: E731
    _rate(env, "pooled", pending_items(env, "pooled"), truth)
    train = split_cache(env.vectors, env.model_id, "train")
    for r in range(2):
        res = run_concept_round("pooled")
        a = metadata_of(res, al_candidates)
        assert a["candidate_pool"] is True and a["candidates"] == 100
        # the previous round's sweep is scored with the pool (none before the first pooled round)
        assert (a["sweep_scored"] > 0) == (r > 0)
        # what it scored was read from the working set the previous round wrote (none before),
        # and it wrote the next round's
        assert a["working_set_rows"] > 0 and a["working_set_misses"] == 0 if r > 0 else a["working_set_rows"] == 0
        assert a["working_set_written"] >= a["pool_size"]
        c = metadata_of(res, classifier)  # and so was every row the classifier trained on
        assert c["working_set_hits"] > 0 and c["working_set_misses"] == 0 if r > 0 else c["working_set_hits"] == 0
        pool = candidate_pool.load(path)
        labeled = env.store.labeled_image_ids("pooled")
        # every labelled train image's k nearest train neighbours are in the pool
        lab_rows = train.positions(sorted(labeled))
        lab_rows = lab_rows[lab_rows >= 0]
        assert set(train.id_at(lab_rows)) <= pool.expanded
        for hits in nearest_in_split(train, train.rows_f32(lab_rows[:5]), pool.k):
            assert {i for i, _s in hits} <= pool.ids
        # the batch: unlabelled train images, the least certain of the pool's eligible images
        batch = pending_items(env, "pooled")
        chosen = {it["image_id"] for it in batch}
        assert not chosen & labeled and len(chosen) == 100
        eligible_pool = np.sort(train.positions(sorted(pool.ids - labeled - chosen)))
        _, model = load_model(env, "pooled")
        worst_chosen = max(margin(np.array([it["score"] for it in batch])))
        assert margin(exact_scores(model, train, eligible_pool[eligible_pool >= 0])).min() >= worst_chosen - 1e-6
        # the batch's own neighbours joined the pool while it waits to be rated
        assert chosen <= pool.expanded and a["pool_added"] >= 0
        # the sweep: the 40 least certain unlabelled train images of the whole split under this
        # model, the batch left out, kept for the next round
        assert a["pool_swept"] == 40 and len(set(pool.sweep)) == 40
        assert not set(pool.sweep) & (labeled | chosen)
        rest = np.ones(len(train), bool)
        taken = train.positions(sorted(labeled | chosen))
        rest[taken[taken >= 0]] = False
        rest_margins = np.sort(margin(exact_scores(model, train, np.flatnonzero(rest))))
        sweep_rows = np.sort(train.positions(pool.sweep))
        assert margin(exact_scores(model, train, sweep_rows)).max() <= rest_margins[39] + 1e-3
        _rate(env, "pooled", batch, truth)


def test_embedding_index_asset_builds_an_index_and_checks_its_recall(corpus):
    env = _env(corpus)
    res = _run(CORPUS_JOB, selection=["embedding_index"],
               run_config={"ops": {"embedding_index": {"config": {"min_rows": 100}}}})
    assert res.success
    md = metadata_of(res, embedding_index)
    assert md["status"] == "built" and md["indexed_rows"] == env.vectors.count(env.model_id)
    check = {e.check_name: e for e in res.get_asset_check_evaluations()}["recall_at_100"]
    assert check.passed and check.metadata["recall"].value >= 0.95
    # the default threshold: an 800-image corpus is searched exactly, the check says so
    res = _run(CORPUS_JOB, selection=["embedding_index"])
    assert metadata_of(res, embedding_index)["status"] == "current"  # the index exists: kept


def test_a_failed_sweep_leaves_the_committed_batch_and_the_round_whole(corpus, monkeypatch, caplog):
    from agile_pipeline.lib import loop

    monkeypatch.setenv("AGILE_CANDIDATE_POOL", "on")
    env = _env(corpus)
    env.store.create_concept("swept", ["red blob"], ["blue square"])
    run_concept_start("swept")
    _rate(env, "swept", pending_items(env, "swept"), lambda i: int(i[:2], 16) % 4 == 0)

    def out_of_memory(*_a, **_k):  # type: ignore[no-untyped-def]
        raise MemoryError("no room for the scan")

    monkeypatch.setattr(loop, "sweep_candidate_pool", out_of_memory)
    res = run_concept_round("swept")
    assert res.success
    a = metadata_of(res, al_candidates)
    assert a["candidates"] == 100 and a["pool_swept"] == 0
    assert len(pending_items(env, "swept")) == 100
    assert "sweep failed" in caplog.text and "no room for the scan" in caplog.text
