"""The finished classifier applied to the whole corpus: one Parquet table per concept that a
platform team queries (DuckDB, pandas, Spark), kept current incrementally.

``$AGILE_HOME/predictions/<key>.parquet`` (``<key>``: the concept's storage key, its name with
spaces as ``_`` and a short hash, e.g. ``birds.b3697b1a``; see
:func:`agile_pipeline.lib.state.concept_storage_key`) has one row per embedded image: ``image_id``,
``split``, ``path`` (as ingested), ``probability`` (P(concept), float32: the corpus score —
on corpora up to ``AGILE_PROPAGATION``'s size, the champion's answer propagated over the
corpus's kNN graph with its training ratings held where the graph's rated neighbours agree,
:mod:`agile_pipeline.lib.corpus_scores`; otherwise the champion's own answer on the image's
stored embedding), ``model_probability`` (the champion model file's own answer, what it gives a
new image), ``is_concept`` (``probability >= 0.5``),
``model_version`` (the MLflow version that scored it) and ``propagated`` (whether
``probability`` is a propagated score). For example::

    duckdb -c "SELECT path, probability FROM '.agile/predictions/birds.b3697b1a.parquet'
               ORDER BY probability DESC LIMIT 20"

:func:`score_corpus` rescores everything when the champion changes and otherwise scores only
the images added since (a corpus refresh), appending them; the table is replaced atomically.
"""

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from agile_pipeline.lib.split_cache import has_cache, ids_to_bytes, split_cache

if TYPE_CHECKING:
    from agile_pipeline.lib.corpus_scores import RoundCorpusScores

SPLITS = ("train", "test")

THRESHOLD = 0.5


@dataclass
class CorpusScores:
    path: Path
    model_version: str
    rows: int
    scored_now: int
    rescored_all: bool
    top: list[tuple[str, float]]  # (path or id, probability), best first
    propagated: bool = False  # probability holds propagated corpus scores
    agreement: float | None = None  # the graph's neighbour agreement on the ratings (corpus scores)


def predictions_path(home: Path, concept_dir_name: str) -> Path:
    return Path(home) / "predictions" / f"{concept_dir_name}.parquet"


def _split_ids_and_scores(vectors: Any, model_id: str, model: Any, split: str,
                          skip: np.ndarray | None) -> tuple[list[str], np.ndarray]:
    """Ids of a split not in ``skip`` (ids as bytes) and the model's float32 P(concept) of each."""
    if has_cache(vectors):
        cache = split_cache(vectors, model_id, split)
        if skip is None or not skip.size:
            return cache.id_at(np.arange(len(cache))), model.predict_proba(cache.f16)
        rows = np.flatnonzero(~cache.mask(skip))
        return cache.id_at(rows), model.predict_proba(cache.rows_f32(rows)) if rows.size else np.empty(0, np.float32)
    m = vectors.matrix(model_id, split)
    skipped = {b.decode("utf-8") for b in skip.tolist()} if skip is not None else set()
    keep = [i for i, x in enumerate(m.ids) if str(x) not in skipped]
    ids = [str(m.ids[i]) for i in keep]
    X = np.asarray(m.vectors[keep], np.float32) if keep else np.empty((0, m.vectors.shape[1]), np.float32)
    return ids, model.predict_proba(X) if keep else np.empty(0, np.float32)


def _data_version(vectors: Any, model_id: str) -> str | None:
    """The split caches' versions (they change with every write to the table), or ``None``."""
    if not has_cache(vectors):
        return None
    return "+".join(split_cache(vectors, model_id, split).tag for split in SPLITS)


def _rescore_in_place(vectors: Any, model_id: str, model: Any, old: Any) -> np.ndarray | None:
    """P(concept) of every row of ``old`` (a table written in split-cache order, train then
    test) by reading the caches in that order, or ``None`` if the row counts disagree."""
    caches = [split_cache(vectors, model_id, split) for split in SPLITS]
    if sum(len(c) for c in caches) != old.num_rows:
        return None
    return np.concatenate([np.asarray(model.predict_proba(c.f16), np.float32) for c in caches])


def _with_scores(base: Any, p: np.ndarray, p_model: np.ndarray, model_version: str, propagated: bool) -> Any:
    """``base`` (image_id, split, path) with the score columns appended."""
    import pyarrow as pa

    n = len(p)
    return (base.append_column("probability", pa.array(p, pa.float32()))
            .append_column("is_concept", pa.array(p >= THRESHOLD, pa.bool_()))
            .append_column("model_version", pa.array(np.full(n, model_version, object), pa.string()))
            .append_column("model_probability", pa.array(p_model, pa.float32()))
            .append_column("propagated", pa.array(np.full(n, propagated), pa.bool_())))


def score_corpus(*, store: Any, vectors: Any, model_id: str, model: Any, model_version: str,
                 out: Path, top_k: int = 10,
                 corpus_scores: Callable[[], "RoundCorpusScores"] | None = None) -> CorpusScores:
    """Write (or extend) the concept's predictions table at ``out`` with ``model``.

    ``corpus_scores``: returns the model's and the corpus scores of every row in split-cache
    order (:func:`agile_pipeline.lib.corpus_scores.round_corpus_scores`); given, every row is
    written with them (propagated scores change with the graph: no incremental append)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    state_path = out.with_suffix(".state.json")
    state = json.loads(state_path.read_text()) if out.exists() and state_path.exists() else {}
    data = _data_version(vectors, model_id)
    same_data = data is not None and state.get("data_version") == data
    with_corpus = corpus_scores is not None
    if (same_data and state.get("model_version") == model_version and "top" in state
            and bool(state.get("corpus_scores")) == with_corpus):
        # neither the champion nor the corpus changed: nothing to score or write
        return CorpusScores(out, model_version, int(state["rows"]), 0, False,
                            [(str(a), float(b)) for a, b in state["top"]], bool(state.get("propagated")),
                            state.get("agreement"))
    table = None
    scored_now, rescored_all, in_cache_order = 0, True, data is not None
    propagated, agreement = False, None
    if corpus_scores is not None:
        decided = corpus_scores()
        propagated, agreement = decided.propagated, decided.agreement
        caches = [split_cache(vectors, model_id, split) for split in SPLITS]
        ids = [i for c in caches for i in c.id_at(np.arange(len(c)))]
        paths = {r["id"]: r["path"] for r in store.image_rows(ids)} if ids else {}
        base = pa.table({
            "image_id": pa.array(ids, pa.string()),
            "split": pa.array([s for s, c in zip(SPLITS, caches, strict=True) for _ in range(len(c))], pa.string()),
            "path": pa.array([paths.get(i) for i in ids], pa.string()),
        })
        table = _with_scores(base, decided.corpus, decided.model, model_version, propagated)
        scored_now = len(ids)
    elif same_data and state.get("cache_order"):  # a new champion on the same rows: keep their
        old = pq.read_table(out, columns=["image_id", "split", "path"])  # ids and paths
        p = _rescore_in_place(vectors, model_id, model, old)
        if p is not None:
            table = _with_scores(old, p, p, model_version, False)
            scored_now = len(p)
    if table is None:
        old = pq.read_table(out) if out.exists() and state.get("model_version") == model_version else None
        if old is not None and (bool(state.get("corpus_scores")) or "model_probability" not in old.schema.names):
            old = None  # corpus-scored rows (they change with the graph) or an older layout: redo all
        skip = ids_to_bytes(old.column("image_id")) if old is not None else None
        ids: list[str] = []
        splits: list[str] = []
        probs: list[np.ndarray] = []
        for split in SPLITS:
            got_ids, got = _split_ids_and_scores(vectors, model_id, model, split, skip)
            ids += got_ids
            splits += [split] * len(got_ids)
            probs.append(np.asarray(got, np.float32))
        p = np.concatenate(probs) if probs else np.empty(0, np.float32)
        paths = {r["id"]: r["path"] for r in store.image_rows(ids)} if ids else {}
        new = _with_scores(pa.table({
            "image_id": pa.array(ids, pa.string()),
            "split": pa.array(splits, pa.string()),
            "path": pa.array([paths.get(i) for i in ids], pa.string()),
        }), p, p, model_version, False)
        table = pa.concat_tables([old, new]) if old is not None else new
        scored_now, rescored_all = len(ids), old is None
        in_cache_order = in_cache_order and old is None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(out)
    probs_all = table.column("probability").to_numpy()
    k = min(top_k, len(probs_all))
    part = np.argpartition(-probs_all, k - 1)[:k] if k else np.empty(0, np.int64)
    order = part[np.lexsort((part, -probs_all[part]))]  # best first, ties by row (stable)
    names = table.column("path").take(pa.array(order)).to_pylist()
    img_ids = table.column("image_id").take(pa.array(order)).to_pylist()
    top = [(names[j] or img_ids[j], float(probs_all[i])) for j, i in enumerate(order.tolist())]
    tmp_state = state_path.with_name(state_path.name + f".{os.getpid()}.tmp")
    tmp_state.write_text(json.dumps({"model_version": model_version, "rows": table.num_rows,
                                     "data_version": data, "cache_order": in_cache_order, "top": top,
                                     "corpus_scores": with_corpus, "propagated": propagated,
                                     "agreement": agreement}))
    tmp_state.replace(state_path)
    return CorpusScores(out, model_version, table.num_rows, scored_now, rescored_all, top, propagated, agreement)
