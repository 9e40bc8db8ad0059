"""Benchmarks of issue 15: the ANN index, the SEALS candidate pool, and a pooled round beside the
full scan measured in the same run (called by :mod:`benchmarks.suite` per corpus size).

* ``embedding_index`` — build (or keep) LanceDB's IVF-PQ index, calibrate its probes to
  recall@100 ≥ 0.95 against exact search; per-query seconds of both;
* ``expansion_ann`` — one phrase's 100 nearest train images through the index (exact re-rank)
  vs the exact cached scan, with recall against it;
* ``pool_growth`` — the neighbours of a batch of 100 newly labelled images (what the round's
  follow-up adds to the pool) through the index vs one exact pass over the split cache;
* ``al_round_pool`` — the AL selection over the pool plus the random sample, vs the full scan
  of the whole train split (``al_round``'s path) in the same run;
* ``pool_quality`` — the planted concept after 5 pooled rounds vs 5 full-scan rounds from the
  same expansion labels: AUC-PR on the test split.
"""

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks import measure, synth


def bench_index(b: Any, cfg: Any, row: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    from agile_pipeline.lib import ann_index

    vs, mid = b.env.vectors, b.corpus.model_id
    t0 = time.perf_counter()
    with measure.PeakMemory() as mem:
        rep = ann_index.ensure_index(vs, mid, min_rows=0)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    cal = ann_index.calibrate(vs, mid)
    calibrate_s = time.perf_counter() - t0
    return row("embedding_index", b.n, measure.Measured(seconds=[build], peak_rss=mem.rss),
               status=rep.status, build_seconds=round(build, 2), calibrate_seconds=round(calibrate_s, 2),
               recall_at_100=round(cal["recall"], 4), nprobes=cal["nprobes"],
               refine_factor=cal["refine_factor"], tried=cal["tried"],
               **{k: v for k, v in rep.params.items() if k not in ("nprobes", "refine_factor")},
               ann_ms_per_query=round(1000 * cal["ann_seconds_per_query"], 2),
               exact_ms_per_query=round(1000 * cal["exact_seconds_per_query"], 2),
               method="LanceDB IVF-PQ (cosine) built once, probes calibrated on 50 fixed train rows",
               baseline="exact streamed scan of the train split cache (nearest_in_split)")


def bench_expansion_ann(b: Any, cfg: Any, row: Callable[..., dict[str, Any]], exp: dict[str, Any]) -> dict[str, Any]:
    from agile_pipeline.lib.loop import nearest_train

    qs = np.stack(list(b.corpus.geometry.phrase_vectors.values())).astype(np.float32)

    def ann() -> list[set[str]]:
        return [set(h) for h in nearest_train(b.env, [q for q in qs], 100)]

    o = measure.measure(ann, cfg.repeats)
    o.seconds = [s / len(qs) for s in o.seconds]
    recall = float(np.mean([len(a & e) / 100 for a, e in zip(o.value, exp["exact"], strict=True)]))
    cached = exp.get("cached")
    return row("expansion_ann", b.n, o, cached, unit="seconds per phrase", recall_at_100=round(recall, 4),
               method="loop.nearest_train: the embedding_index (IVF-PQ, calibrated probes, exact re-rank)",
               baseline="the exact scan of the warm split cache (expansion_cached)")


def _batch_rows(b: Any, n: int = 100, seed: int = 5) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(len(b.train), size=n, replace=False))


def bench_pool_growth(b: Any, cfg: Any, row: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    from agile_pipeline.lib.candidate_pool import POOL_K
    from agile_pipeline.lib.loop import nearest_train
    from agile_pipeline.lib.scan import nearest_in_split

    q = b.train.rows_f32(_batch_rows(b))

    def ann() -> list[list[str]]:
        return nearest_train(b.env, q, POOL_K + 1)

    def exact() -> list[list[tuple[str, float]]]:
        return nearest_in_split(b.train, q, POOL_K + 1)

    o = measure.measure(ann, cfg.repeats)
    e = measure.measure(exact, 1 if b.n > 2_000_000 else cfg.repeats)
    recall = float(np.mean([len(set(a) & {i for i, _s in t}) / len(t) for a, t in zip(o.value, e.value, strict=True)]))
    return row("pool_growth", b.n, o, e, queries=len(q), k=POOL_K + 1, recall=round(recall, 4),
               method="the k+1 nearest train images of 100 newly labelled images through loop.nearest_train "
                      "(the index where there is one): what a round's follow-up adds to the pool",
               baseline="one exact pass over the train split cache for the 100 queries (nearest_in_split)")


def bench_al_round_pool(b: Any, cfg: Any, row: Callable[..., dict[str, Any]], model: Any,
                        full: dict[str, Any]) -> dict[str, Any]:
    """The pooled selection (the concept's real pool, grown from its labels) vs the full scan."""
    from agile_pipeline.lib.loop import _select_from_pool, grow_candidate_pool, sweep_candidate_pool
    from agile_pipeline.lib.selection import select_for_round
    from agile_pipeline.lib.split_cache import clear_split_caches

    store = b.env.store
    labeled = store.labeled_image_ids(synth.CONCEPT)
    grow_candidate_pool(b.env, synth.CONCEPT, sorted(labeled))  # catch up once, not timed
    # the previous round's sweep, as a round finds it (it ran after that round's commit)
    sweep_s = measure.measure(lambda: sweep_candidate_pool(b.env, synth.CONCEPT), 1)

    def pooled() -> Any:
        clear_split_caches()  # include loading the split cache, as a fresh round does
        return _select_from_pool(b.env, synth.CONCEPT, model, labeled, 100, "margin", 1)

    o = measure.measure(pooled, cfg.repeats)
    whole = select_for_round(b.env.vectors, b.corpus.model_id, model, labeled, 100, "margin")
    info = o.value.info
    truth = b.truth_train[b.train.positions(o.value.ids)]
    truth_full = b.truth_train[b.train.positions(whole.ids)]
    return row("al_round_pool", b.n, o, measure.Measured(seconds=full["runs"]) if full.get("runs") else None,
               pool_size=info["pool_size"], pool_k=info["pool_k"], rows_scored=int(o.value.n_scored),
               random_scored=info["random_scored"], sweep_scored=info["sweep_scored"],
               sweep_seconds=round(float(np.median(sweep_s.seconds)), 3), batch=100,
               overlap_with_full_scan=len(set(o.value.ids) & set(whole.ids)),
               positives_in_batch=int(truth.sum()), positives_in_full_scan_batch=int(truth_full.sum()),
               labels=len(labeled),
               method="SEALS pool (k nearest train images of every label and phrase) + the previous "
                      "model's 2,000 most uncertain (the sweep; sweep_seconds: its whole-split scan, run "
                      "after a round's commit) + 2,000 uniform rows, scored exactly in float32; split "
                      "cache loaded from disk each run",
               baseline="al_round of this run: the whole train split scanned")


def bench_pool_quality(b: Any, cfg: Any, row: Callable[..., dict[str, Any]], rounds: int = 5) -> dict[str, Any]:
    """Two copies of the planted concept from the same expansion labels: ``rounds`` rounds with
    the pool (and its sweep), as many with the full scan; AUC-PR of every round's model on (up to
    1M rows of) the test split."""
    from sklearn.metrics import average_precision_score

    from agile_pipeline.lib.loop import build_expansion, load_model, select_candidates, train_round
    from agile_pipeline.lib.state import LabelEvent
    from benchmarks.suite import _ap_rows, _env_vars, drop_concept

    store = b.env.store
    rows_ap = _ap_rows(b)
    X_ap = b.test.rows_f32(rows_ap)
    y_ap = b.truth_test[rows_ap]
    out: dict[str, list[float]] = {}
    seconds: dict[str, list[float]] = {}
    for mode in ("off", "on"):
        name = f"{synth.CONCEPT}-{mode}"
        drop_concept(b, name)  # a kept corpus holds the copies of an earlier run
        store.create_concept(name, [synth.MODE_PHRASE], [synth.NEG_PHRASE])
        aps, sel_s = [], []
        with _env_vars(AGILE_CANDIDATE_POOL=mode):
            text = synth.PlantedTextEncoder(b.corpus)
            text._vectors = {**{t: text._vectors[synth.CONCEPT] for _p, t in store.get_concept(name).phrases},
                             **text._vectors}  # the concept's name is its first phrase
            batch = build_expansion(b.env, name, text)
            for r in range(rounds + 1):
                pos = b.train.positions([it["image_id"] for it in batch.items])
                store.add_labels([LabelEvent(name, it["image_id"], "positive" if b.truth_train[p] else "negative",
                                             "bench", source=it["source"]) for it, p in zip(batch.items, pos, strict=True)])
                train_round(b.env, name)
                _, model = load_model(b.env, name)
                aps.append(round(float(average_precision_score(y_ap, model.predict_proba(X_ap))), 4))
                if r == rounds:
                    break
                batch = select_candidates(b.env, name)
                sel_s.append(round(batch.seconds, 3))  # to the batch committed, not the growth after
        out[mode], seconds[mode] = aps, sel_s
    return row("pool_quality", b.n, measure.Measured(seconds=[float(np.median(seconds["on"]))]),
               measure.Measured(seconds=[float(np.median(seconds["off"]))]),
               auc_pr_pooled=out["on"], auc_pr_full_scan=out["off"],
               select_seconds_pooled=seconds["on"], select_seconds_full_scan=seconds["off"],
               rounds=rounds, difference_last_round=round(out["on"][-1] - out["off"][-1], 4),
               method=f"{rounds} rounds (train, select 100 from the pool, label by the planted truth) "
                      "from the expansion labels; seconds: median selection until the batch is committed",
               baseline=f"the same {rounds} rounds with the whole train split scanned")
