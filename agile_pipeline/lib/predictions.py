"""The finished classifier applied to the whole corpus: one Parquet table per concept that a
platform team queries (DuckDB, pandas, Spark), kept current incrementally.

``$AGILE_HOME/predictions/<key>.parquet`` (``<key>``: the concept's storage key, its name with
spaces as ``_`` and a short hash, e.g. ``birds.b3697b1a``; see
:func:`agile_pipeline.lib.state.concept_storage_key`) has one row per embedded image: ``image_id``,
``split``, ``path`` (as ingested), ``probability`` (P(concept), float32, the float32 answer of
the champion on the image's stored embedding), ``is_concept`` (``>= 0.5``) and
``model_version`` (the MLflow version that scored it). For example::

    duckdb -c "SELECT path, probability FROM '.agile/predictions/birds.b3697b1a.parquet'
               ORDER BY probability DESC LIMIT 20"

:func:`score_corpus` rescores everything when the champion changes and otherwise scores only
the images added since (a corpus refresh), appending them; the table is replaced atomically.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agile_pipeline.lib.split_cache import has_cache, split_cache

THRESHOLD = 0.5


@dataclass
class CorpusScores:
    path: Path
    model_version: str
    rows: int
    scored_now: int
    rescored_all: bool
    top: list[tuple[str, float]]  # (path or id, probability), best first


def predictions_path(home: Path, concept_dir_name: str) -> Path:
    return Path(home) / "predictions" / f"{concept_dir_name}.parquet"


def _split_ids_and_scores(vectors: Any, model_id: str, model: Any, split: str,
                          skip: set[str]) -> tuple[list[str], np.ndarray]:
    """Ids of a split not in ``skip`` and the model's float32 P(concept) of each."""
    if has_cache(vectors):
        cache = split_cache(vectors, model_id, split)
        if not skip:
            return cache.id_at(np.arange(len(cache))), model.predict_proba(cache.f16)
        rows = np.flatnonzero(~cache.mask(list(skip)))
        return cache.id_at(rows), model.predict_proba(cache.rows_f32(rows)) if rows.size else np.empty(0, np.float32)
    m = vectors.matrix(model_id, split)
    keep = [i for i, x in enumerate(m.ids) if str(x) not in skip]
    ids = [str(m.ids[i]) for i in keep]
    X = np.asarray(m.vectors[keep], np.float32) if keep else np.empty((0, m.vectors.shape[1]), np.float32)
    return ids, model.predict_proba(X) if keep else np.empty(0, np.float32)


def score_corpus(*, store: Any, vectors: Any, model_id: str, model: Any, model_version: str,
                 out: Path, top_k: int = 10) -> CorpusScores:
    """Write (or extend) the concept's predictions table at ``out`` with ``model``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    state_path = out.with_suffix(".state.json")
    old = None
    if out.exists() and state_path.exists():
        state = json.loads(state_path.read_text())
        if state.get("model_version") == model_version:
            old = pq.read_table(out)
    skip = set(old.column("image_id").to_pylist()) if old is not None else set()
    ids: list[str] = []
    splits: list[str] = []
    probs: list[np.ndarray] = []
    for split in ("train", "test"):
        got_ids, got = _split_ids_and_scores(vectors, model_id, model, split, skip)
        ids += got_ids
        splits += [split] * len(got_ids)
        probs.append(np.asarray(got, np.float32))
    p = np.concatenate(probs) if probs else np.empty(0, np.float32)
    paths = {r["id"]: r["path"] for r in store.image_rows(ids)} if ids else {}
    new = pa.table({
        "image_id": pa.array(ids, pa.string()),
        "split": pa.array(splits, pa.string()),
        "path": pa.array([paths.get(i) for i in ids], pa.string()),
        "probability": pa.array(p, pa.float32()),
        "is_concept": pa.array(p >= THRESHOLD, pa.bool_()),
        "model_version": pa.array([model_version] * len(ids), pa.string()),
    })
    table = pa.concat_tables([old, new]) if old is not None else new
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(out)
    tmp_state = state_path.with_name(state_path.name + f".{os.getpid()}.tmp")
    tmp_state.write_text(json.dumps({"model_version": model_version, "rows": table.num_rows}))
    tmp_state.replace(state_path)
    probs_all = table.column("probability").to_numpy()
    order = np.argsort(-probs_all, kind="stable")[:top_k]
    names = table.column("path").to_pylist()
    img_ids = table.column("image_id").to_pylist()
    top = [(names[i] or img_ids[i], float(probs_all[i])) for i in order.tolist()]
    return CorpusScores(out, model_version, table.num_rows, len(ids), old is None, top)
