"""An approximate-nearest-neighbour index over an embedding table (LanceDB's own IVF-PQ).

Above :data:`ANN_MIN_ROWS` rows, phrase expansion, exemplar search and the neighbour queries
that grow a concept's candidate pool (:mod:`.candidate_pool`) use LanceDB's IVF-PQ index with
an exact re-rank of the candidates (``refine_factor``): their cost then grows with the probed
partitions, not with the corpus. Below it an exact scan is both fast and exact, so no index is
built (the threshold is measured by ``agile bench``: the exact streamed scan of the split cache
costs ~0.03 s per query at 100k rows and ~0.3 s at 1M on the 2-core development box).

* :func:`ensure_index` builds the index once, then *extends* it on every corpus refresh
  (Lance's ``optimize_indices`` adds the new rows to the existing partitions; a rebuild from
  scratch happens only when asked, or when the table grew 4x since the build, when the
  partitions no longer fit the data). An index build commits a new table version without
  touching a row, which :meth:`VectorStore.data_version` ignores, so split caches survive it.
* :func:`search` answers a batch of queries in one call (ANN with re-rank, or exact when
  there is no index), restricted to a split.
* :func:`calibrate` raises the probed partitions until the recall target holds and keeps
  that setting beside the split caches;
* :func:`build_index_ray` and :func:`search_ray` do the same as Ray tasks (the build on a
  cluster node; a pool's ~100 neighbour queries split across tasks), with the same answers;
* :func:`recall_at_k` measures the index against exact search on a fixed sample of queries
  (rows of the train split picked by a fixed seed): the ``embedding_index`` asset check.
"""

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ANN_MIN_ROWS = 200_000
"""Tables with fewer rows get no index: an exact scan is fast enough and exact."""
NPROBES = 20
"""IVF partitions probed per query (of :func:`index_params`' ``num_partitions``)."""
REFINE_FACTOR = 10
"""PQ candidates re-ranked with the exact vectors per result (k x 10)."""
MAX_REFINE = 160
"""The most re-ranking :func:`calibrate` tries (k x 160 exact distances per query)."""
REBUILD_GROWTH = 4.0
"""Rebuild from scratch (new partitions) once the table holds this many times the rows the
index was trained on; below that the new rows are added to the existing partitions."""
RECALL_TARGET = 0.95


@dataclass
class IndexReport:
    """What :func:`ensure_index` did, for the asset's metadata."""

    status: str  # "exact" (too small: none), "built", "rebuilt", "extended", "current"
    rows: int
    indexed_rows: int = 0
    unindexed_rows: int = 0
    seconds: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def index_params(n: int, dim: int) -> dict[str, int]:
    """IVF-PQ parameters for ``n`` rows of ``dim``: ~4·√n partitions (capped to keep the build
    on 2 cores in minutes), 8-dim PQ sub-vectors (of a divisor of ``dim``)."""
    parts = int(min(1024, max(16, round(math.sqrt(max(n, 1)) / 4))))
    sub = max(1, dim // 8)
    while dim % sub:
        sub -= 1
    return {"num_partitions": parts, "num_sub_vectors": sub}


def _index_stats(tbl: Any) -> tuple[str | None, int, int]:
    """(index name, indexed rows, unindexed rows) of the vector index, or (None, 0, rows)."""
    for ix in tbl.list_indices():
        if list(ix.columns) == ["vector"]:
            st = tbl.index_stats(ix.name)
            return ix.name, int(st.num_indexed_rows), int(st.num_unindexed_rows)
    return None, 0, int(tbl.count_rows())


def has_index(vectors: Any, model_id: str) -> bool:
    return vectors.exists(model_id) and _index_stats(vectors.table(model_id))[0] is not None


def ensure_index(vectors: Any, model_id: str, *, min_rows: int = ANN_MIN_ROWS,
                 rebuild: bool = False) -> IndexReport:
    """Build, extend or keep the table's IVF-PQ index (see the module docstring)."""
    from lancedb.index import IvfPq

    t0 = time.perf_counter()
    tbl = vectors.table(model_id)
    n = int(tbl.count_rows())
    name, indexed, unindexed = _index_stats(tbl)
    if n < min_rows and name is None:
        return IndexReport("exact", n, 0, n, time.perf_counter() - t0)
    dim = int(tbl.schema.field("vector").type.list_size)
    params = index_params(n, dim)
    if name is None or rebuild or n >= REBUILD_GROWTH * max(indexed, 1):
        status = "built" if name is None else "rebuilt"
        tbl.create_index("vector", config=IvfPq(distance_type="cosine", sample_rate=64,
                                                max_iterations=20, **params), replace=True)
    elif unindexed:
        tbl.to_lance().optimize.optimize_indices()  # the new rows, into the existing partitions
        status = "extended"
    else:
        status = "current"
    tbl = vectors.table(model_id)
    _, indexed, unindexed = _index_stats(tbl)
    return IndexReport(status, n, indexed, unindexed, time.perf_counter() - t0,
                       {**params, "index_type": "IVF_PQ", "nprobes": NPROBES, "refine_factor": REFINE_FACTOR})


def _settings_path(vectors: Any, model_id: str) -> Any:
    from agile_pipeline.lib.vectors import table_name

    return None if vectors.cache_dir is None else vectors.cache_dir / f"{table_name(model_id)}.ann.json"


def search_settings(vectors: Any, model_id: str) -> dict[str, Any]:
    """The probes this table's index was calibrated to (:func:`calibrate`), else the defaults."""
    import json

    path = _settings_path(vectors, model_id)
    try:
        return {"nprobes": NPROBES, "refine_factor": REFINE_FACTOR, **json.loads(path.read_text())}
    except (AttributeError, OSError, ValueError):
        return {"nprobes": NPROBES, "refine_factor": REFINE_FACTOR}


def calibrate(vectors: Any, model_id: str, *, target: float = RECALL_TARGET, k: int = 100,
              n_queries: int = 50) -> dict[str, Any]:
    """Probe more partitions until recall@``k`` on the fixed sample reaches ``target`` (or all
    partitions are probed), and keep that setting for :func:`search`. How many partitions a
    query needs depends on how clustered the vectors are: real embeddings need few, isotropic
    synthetic vectors many."""
    import json

    tbl = vectors.table(model_id)
    parts = next((int(ix.index_details.get("num_partitions", 0) or 0) for ix in tbl.list_indices()
                  if list(ix.columns) == ["vector"]), 0) or index_params(int(tbl.count_rows()), 1)["num_partitions"]
    nprobes, refine = min(NPROBES, parts), REFINE_FACTOR
    tried = []
    while True:  # more exact re-ranking first (cheap), then more partitions, alternately
        settings = {"nprobes": nprobes, "refine_factor": refine}
        r = recall_at_k(vectors, model_id, k=k, n_queries=n_queries, settings=settings)
        tried.append({**settings, "recall": round(r["recall"], 4),
                      "ann_seconds_per_query": round(r["ann_seconds_per_query"], 4)})
        if r["recall"] >= target or (nprobes >= parts and refine >= MAX_REFINE):
            break
        if refine <= nprobes // 2 or nprobes >= parts:
            refine = min(MAX_REFINE, refine * 2)
        else:
            nprobes = min(parts, nprobes * 2)
    path = _settings_path(vectors, model_id)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(settings))
        tmp.replace(path)
    return {**settings, **r, "tried": tried}


def search(vectors: Any, model_id: str, queries: np.ndarray | Sequence[np.ndarray], k: int, *, split: str | None = None,
           exact: bool = False, settings: dict[str, Any] | None = None) -> list[list[tuple[str, str, float]]]:
    """The ``k`` nearest rows of every query by cosine: ``[[(id, split, similarity), ...]]``,
    best first. Uses the ANN index with an exact re-rank when the table has one (rows added
    since the last build are searched exactly too), else (or with ``exact``) an exact scan."""
    q = np.asarray(queries, np.float32)
    q = q.reshape(-1, q.shape[-1])
    if len(q) == 0 or k <= 0:
        return [[] for _ in q]
    tbl = vectors.table(model_id)
    indexed = not exact and _index_stats(tbl)[0] is not None
    if indexed and split:
        from agile_pipeline.lib.split_cache import has_cache

        if has_cache(vectors):
            return _search_rerank_in_cache(vectors, model_id, tbl, q, k, split, settings)
    s = tbl.search(q if len(q) > 1 else q[0], vector_column_name="vector").distance_type("cosine").limit(k)
    if exact:
        s = s.bypass_vector_index()
    elif indexed:
        how = settings or search_settings(vectors, model_id)
        s = s.nprobes(int(how["nprobes"])).refine_factor(int(how["refine_factor"]))
    if split:
        s = s.where(f"split = '{split}'", prefilter=True)
    res = s.select(["id", "split", "_distance"]).to_arrow()
    qi = res.column("query_index").to_numpy() if "query_index" in res.column_names else np.zeros(res.num_rows, np.int64)
    out: list[list[tuple[str, str, float]]] = [[] for _ in q]
    for j, i, sp, d in zip(qi, res.column("id").to_pylist(), res.column("split").to_pylist(),
                           res.column("_distance").to_pylist(), strict=True):
        out[int(j)].append((i, sp, 1.0 - float(d)))
    for hits in out:
        hits.sort(key=lambda h: (-h[2], h[0]))
    return out


def _search_rerank_in_cache(vectors: Any, model_id: str, tbl: Any, q: np.ndarray, k: int, split: str,
                            settings: dict[str, Any] | None) -> list[list[tuple[str, str, float]]]:
    """The index's ``k x refine_factor`` best rows by PQ distance (no filter), re-ranked by
    exact cosine from the split cache's rows (rows of other splits drop out there).

    Measured at 1M rows (bench, 100 queries): 1.2 s against 4-7 s for LanceDB's own re-rank
    with a ``split`` prefilter, which reads every candidate's vector from the table and scans
    the filter column per query; the same recall@100 (0.99). The candidates come back as row
    ids (:meth:`SplitCache.rowid_positions`), not image ids: reading 3,000 ids from a 10M-row
    table took 44 of a single query's 60 ms."""
    from agile_pipeline.lib.split_cache import split_cache

    how = settings or search_settings(vectors, model_id)
    cache = split_cache(vectors, model_id, split)
    res = (tbl.search(q if len(q) > 1 else q[0], vector_column_name="vector").distance_type("cosine")
           .nprobes(int(how["nprobes"])).limit(k * int(how["refine_factor"])).with_row_id(True)
           .select(["_distance"]).to_arrow())
    qi = res.column("query_index").to_numpy() if "query_index" in res.column_names else np.zeros(res.num_rows, np.int64)
    rows = cache.rowid_positions(res.column("_rowid").to_numpy(), tbl)
    out: list[list[tuple[str, str, float]]] = []
    for j in range(len(q)):
        r = np.unique(rows[(qi == j) & (rows >= 0)])
        X = cache.rows_f32(r)
        sims = (X @ q[j]) / np.maximum(np.linalg.norm(X, axis=1) * np.linalg.norm(q[j]), 1e-12)
        top = np.lexsort((r, -sims))[:k]
        out.append(list(zip(cache.id_at(r[top]), [split] * len(top), (float(x) for x in sims[top]), strict=True)))
    return out


def recall_at_k(vectors: Any, model_id: str, *, k: int = 100, n_queries: int = 50, seed: int = 0,
                split: str = "train", settings: dict[str, Any] | None = None) -> dict[str, float]:
    """Recall@``k`` of :func:`search` against exact search, over ``n_queries`` rows of
    ``split`` picked by ``seed`` (their own vectors as queries), with both answers' seconds."""
    from agile_pipeline.lib.split_cache import has_cache, split_cache

    ids = sorted(vectors.ids(model_id)) if not has_cache(vectors) else None
    if ids is not None:
        pick = [ids[i] for i in np.random.default_rng(seed).choice(len(ids), min(n_queries, len(ids)), replace=False)]
        qv = vectors.vectors_for(model_id, pick).astype(np.float32)
    else:
        cache = split_cache(vectors, model_id, split)
        rows = np.sort(np.random.default_rng(seed).choice(len(cache), min(n_queries, len(cache)), replace=False))
        qv = cache.rows_f32(rows)
    t0 = time.perf_counter()
    approx = search(vectors, model_id, qv, k, split=split, settings=settings)
    t_ann = time.perf_counter() - t0
    t0 = time.perf_counter()
    if ids is None:
        from agile_pipeline.lib.scan import nearest_in_split

        truth = [{i for i, _s in h} for h in nearest_in_split(cache, qv, k)]
    else:
        truth = [{i for i, _sp, _s in h} for h in search(vectors, model_id, qv, k, split=split, exact=True)]
    t_exact = time.perf_counter() - t0
    recall = float(np.mean([len({i for i, _sp, _s in a} & t) / max(len(t), 1)
                            for a, t in zip(approx, truth, strict=True)]))
    return {"recall": recall, "queries": float(len(qv)), "k": float(k),
            "ann_seconds_per_query": t_ann / max(len(qv), 1),
            "exact_seconds_per_query": t_exact / max(len(qv), 1)}


# ---- on Ray (AGILE_RAY_ADDRESS, lib/distributed.py) -----------------------------------------
def _vector_store(lancedb_uri: str, cache_dir: str | None) -> Any:
    from agile_pipeline.lib.vectors import VectorStore

    return VectorStore(lancedb_uri, cache_dir=Path(cache_dir) if cache_dir else None)


def _build_index(lancedb_uri: str, cache_dir: str | None, model_id: str, min_rows: int,
                 rebuild: bool) -> dict[str, Any]:
    """Ray task body: build/extend the table's IVF-PQ index and calibrate its probes."""
    vs = _vector_store(lancedb_uri, cache_dir)
    report = ensure_index(vs, model_id, min_rows=min_rows, rebuild=rebuild).as_dict()
    if report["status"] != "exact":
        report["calibration"] = calibrate(vs, model_id)
    return report


def build_index_ray(vectors: Any, model_id: str, *, min_rows: int, rebuild: bool = False) -> dict[str, Any]:
    """:func:`ensure_index` + :func:`calibrate` as one Ray task, on a
    node of the cluster (one with the memory and cores for it) instead of the driver; the
    index is written next to the table, where every node reads it."""
    from agile_pipeline.lib.distributed import ensure_ray

    ray = ensure_ray()
    task = ray.remote(num_cpus=1)(_build_index)
    cache = str(vectors.cache_dir) if vectors.cache_dir else None
    return dict(ray.get(task.remote(str(vectors.uri), cache, model_id, min_rows, rebuild)))


def _search_chunk(lancedb_uri: str, cache_dir: str | None, model_id: str, queries: np.ndarray, k: int,
                  split: str | None) -> list[list[tuple[str, str, float]]]:
    """Ray task body: the nearest rows of a chunk of queries through the table's index."""
    return search(_vector_store(lancedb_uri, cache_dir), model_id, queries, k, split=split)


def search_ray(vectors: Any, model_id: str, queries: np.ndarray, k: int, *, split: str | None = None,
               shards: int | None = None) -> list[list[tuple[str, str, float]]]:
    """:func:`search` with the queries split across Ray tasks
    (a pool's growth: ~100 queries per batch), answers concatenated in query order."""
    from agile_pipeline.lib.distributed import ensure_ray

    ray = ensure_ray()
    q = np.asarray(queries, np.float32)
    if len(q) == 0:
        return []
    from agile_pipeline.lib.distributed import _shard_bounds, n_shards

    bounds = _shard_bounds(len(q), n_shards(shards))
    task = ray.remote(num_cpus=1)(_search_chunk)
    cache = str(vectors.cache_dir) if vectors.cache_dir else None
    refs = [task.remote(str(vectors.uri), cache, model_id, q[a:b], k, split) for a, b in bounds]
    return [hits for part in ray.get(refs) for hits in part]
