"""Beyond one machine: embedding and per-round scoring fanned out over Ray (issue 7 §4).

Switched on by configuration, off by default:

* ``AGILE_RAY_ADDRESS`` — unset or empty: everything runs in-process (the default path);
  ``local``: start (or join) a Ray instance on this machine; anything else is passed to
  ``ray.init(address=...)``: ``auto`` (the cluster this node belongs to) or
  ``ray://head-node:10001`` (Ray client).
* ``AGILE_RAY_SHARDS`` — how many tasks a scan is split into (default: the cluster's CPUs).

What runs where:

* :func:`score_plan_ray` — the approximate scan of a split cache (the per-round hot path of
  :mod:`agile_pipeline.lib.scale`) as one Ray task per contiguous row range; the driver
  concatenates the shards' scores in row order and runs the same exact re-score and selection
  as the local path, so candidates and eval sets are the same as without Ray.
* the ANN index build and a candidate pool's neighbour queries (:mod:`.ann_index`,
  ``build_index_ray`` and ``search_ray``) use :func:`ensure_ray` and the shards from here.
* :func:`embed_to_table_ray` — corpus shards embedded by Ray tasks (each loads the encoder
  once and runs the same :class:`~agile_pipeline.lib.embedding.EmbeddingRun`), every task
  appending its vectors to the same LanceDB table (Lance commits are optimistic; conflicting
  commits are retried).

Tasks read the split cache files and write the LanceDB table by path, so every node must see
the same paths (one machine, or a shared filesystem); see BENCHMARKS.md for object storage.
"""

import itertools
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

ENV_ADDRESS = "AGILE_RAY_ADDRESS"
ENV_SHARDS = "AGILE_RAY_SHARDS"


def ray_address() -> str | None:
    """The configured Ray address, or ``None`` when Ray is off."""
    addr = os.environ.get(ENV_ADDRESS, "").strip()
    return addr or None


def enabled() -> bool:
    return ray_address() is not None


def ensure_ray() -> Any:
    """``ray``, initialised for the configured address (idempotent)."""
    addr = ray_address()
    if addr is None:
        raise RuntimeError(f"Ray is off: set {ENV_ADDRESS}=local (or a cluster address)")
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(f"{ENV_ADDRESS} is set but Ray is not installed: pip install ray") from exc
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": False,
                                  "include_dashboard": False, "logging_level": logging.WARNING}
        if addr != "local":
            kwargs["address"] = addr
        ray.init(**kwargs)
    return ray


def n_shards(default: int | None = None) -> int:
    env = os.environ.get(ENV_SHARDS, "").strip()
    if env:
        return max(1, int(env))
    if default:
        return default
    ray = ensure_ray()
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    shards = max(1, min(shards, n)) if n else 1
    edges = np.linspace(0, n, shards + 1).round().astype(np.int64)
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges.tolist()) if b > a]


# ---- scoring ------------------------------------------------------------------------------
def _score_range(plan: Any, start: int, stop: int, threads: int) -> np.ndarray:
    """Ray task body: approximate scores of rows ``[start, stop)`` of a split cache."""
    return plan.score(start, stop, threads=max(1, threads))


def score_plan_ray(plan: Any, n: int, *, shards: int | None = None) -> np.ndarray:
    """A scan plan (:func:`agile_pipeline.lib.scale.scan_plan`) over ``n`` rows fanned out
    over Ray: one task per contiguous row range, results concatenated in row order."""
    ray = ensure_ray()
    if n == 0:
        return np.empty(0, np.float32)
    bounds = _shard_bounds(n, n_shards(shards))
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    threads = max(1, cpus // len(bounds))
    task = ray.remote(num_cpus=1)(_score_range)
    plan_ref = ray.put(plan)
    t0 = time.perf_counter()
    refs = [task.remote(plan_ref, a, b, threads) for a, b in bounds]
    out = np.concatenate(ray.get(refs))
    log.info("ray: scored %d rows in %d shards in %.2fs", n, len(bounds), time.perf_counter() - t0)
    return out


# ---- embedding ----------------------------------------------------------------------------
def _append_with_retry(vectors: Any, model_id: str, ids: list[str], splits: list[str],
                       vecs: np.ndarray, attempts: int = 30) -> None:
    for attempt in range(attempts):
        try:
            vectors.add(model_id, ids, splits, vecs)
            return
        except Exception as exc:  # Lance: a concurrent commit won; retry on the new version
            retryable = "onflict" in str(exc) or "etry" in str(exc)
            if not retryable or attempt == attempts - 1:
                raise
            time.sleep(min(0.05 * 2**attempt, 2.0) * (1 + np.random.default_rng().random()))


def _embed_shard(items: list[tuple[str, str]], splits: list[str], encoder_spec: str,
                 lancedb_uri: str, model_id: str, batch_size: int) -> tuple[int, list[tuple[str, str]]]:
    """Ray task body: embed one shard and append it to the LanceDB table."""
    from agile_pipeline.lib.embedding import EmbeddingRun
    from agile_pipeline.lib.encoders import load_encoder
    from agile_pipeline.lib.images import load_rgb
    from agile_pipeline.lib.vectors import VectorStore

    split_of = dict(zip([i for i, _ in items], splits, strict=True))
    encoder = load_encoder(encoder_spec)
    if encoder.model_id != model_id:
        raise RuntimeError(f"encoder {encoder_spec!r} is {encoder.model_id!r}, expected {model_id!r}")
    vs = VectorStore(lancedb_uri)
    run = EmbeddingRun([(i, Path(p)) for i, p in items], load_rgb, encoder, batch_size=batch_size,
                       workers=1, progress=False)
    n_ok, failed = 0, []
    for batch in run.batches():
        if batch.ids:
            _append_with_retry(vs, model_id, batch.ids, [split_of[i] for i in batch.ids], batch.vectors)
            n_ok += len(batch.ids)
        failed += batch.failed
    return n_ok, failed


def embed_to_table_ray(items: Sequence[tuple[str, str]], split_of: dict[str, str], *,
                       encoder_spec: str, lancedb_uri: str | Path, model_id: str, dim: int,
                       shards: int | None = None, batch_size: int = 64) -> tuple[int, list[tuple[str, str]]]:
    """Embed ``(image_id, path)`` items in Ray tasks that append to one LanceDB table.

    Returns ``(embedded, failed)`` like the local ``image_embeddings`` asset. The table is
    created here first (with ``dim``) so that tasks only ever append.
    """
    from agile_pipeline.lib.vectors import VectorStore

    ray = ensure_ray()
    VectorStore(lancedb_uri).table(model_id, dim)
    if not items:
        return 0, []
    items = [(str(i), str(p)) for i, p in items]
    bounds = _shard_bounds(len(items), n_shards(shards))
    task = ray.remote(num_cpus=1)(_embed_shard)
    refs = [task.remote(items[a:b], [split_of.get(i) or "train" for i, _ in items[a:b]],
                        encoder_spec, str(lancedb_uri), model_id, batch_size)
            for a, b in bounds]
    n_ok, failed = 0, []
    for k, f in ray.get(refs):
        n_ok += k
        failed += [tuple(x) for x in f]
    return n_ok, failed  # type: ignore[return-value]

