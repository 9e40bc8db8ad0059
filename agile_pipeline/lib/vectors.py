"""Image embeddings in LanceDB: one table per embedding model, never mixed.

Table ``embeddings__<model slug>``: ``id`` (image id), ``split``, ``vector`` (float32,
L2-normalised), ``model_id``. Dagster runs are the only writers; readers (app, CLI) see a
consistent version while a write is under way (Lance is MVCC).

The per-round hot path needs the whole train split as one matrix. :meth:`VectorStore.matrix`
reads it once per table version into a float16 ``.npy`` cache that later rounds memory-map,
so a round never re-reads or re-converts the table.
"""

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

log = logging.getLogger(__name__)

TABLE_PREFIX = "embeddings__"
# Housekeeping defaults: keep the 5 newest versions, and any version replaced less than an hour
# ago (a reader that opened it then may still be streaming it: the 10M-row matrix read takes
# minutes, never an hour).
KEEP_VERSIONS = 5
KEEP_REPLACED_FOR = timedelta(hours=1)


UPLOADS_PREFIX = "uploads__"


def table_name(model_id: str) -> str:
    return TABLE_PREFIX + re.sub(r"[^A-Za-z0-9_]+", "_", model_id).strip("_")


def uploads_table_name(model_id: str) -> str:
    """Exemplar images uploaded by raters: never part of the corpus splits, and kept out of the
    corpus table so that an upload never changes its version (which would invalidate the split
    caches every round reads: minutes to rebuild at 10M rows)."""
    return UPLOADS_PREFIX + re.sub(r"[^A-Za-z0-9_]+", "_", model_id).strip("_")


def _sql_in(ids: Sequence[str]) -> str:
    return "id IN (" + ", ".join("'" + str(i).replace("'", "''") + "'" for i in ids) + ")"


def embedding_schema(dim: int) -> pa.Schema:
    return pa.schema([
        ("id", pa.string()),
        ("split", pa.string()),
        ("vector", pa.list_(pa.float32(), dim)),
        ("model_id", pa.string()),
    ])


def _rows(model_id: str, ids: Sequence[str], splits: Sequence[str], vectors: np.ndarray) -> pa.Table:
    dim = int(vectors.shape[1])
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).ravel())
    return pa.table(
        {
            "id": pa.array(list(ids), pa.string()),
            "split": pa.array(list(splits), pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(flat, dim),
            "model_id": pa.array([model_id] * len(ids), pa.string()),
        },
        schema=embedding_schema(dim),
    )


@dataclass
class SplitMatrix:
    """Vectors of one split, rows aligned with ``ids``."""

    ids: np.ndarray  # object array of str
    vectors: np.ndarray  # (n, dim), float16 or float32, possibly a memmap

    def index_of(self) -> dict[str, int]:
        return {str(i): k for k, i in enumerate(self.ids)}


_DATA_VERSIONS: dict[tuple[str, int], int] = {}


def _fragments_fingerprint(ds: Any) -> tuple[tuple[object, ...], ...]:
    """What identifies a Lance version's rows: every fragment's id, data files, row count and
    deletion file (metadata-only commits such as index builds leave all of them as they were)."""
    out = []
    for f in ds.get_fragments():
        m = f.metadata
        out.append((m.id, tuple(d.path for d in m.files), m.physical_rows, repr(m.deletion_file)))
    return tuple(out)


class VectorStore:
    def __init__(self, uri: Path | str, cache_dir: Path | None = None, *,
                 split_caches: bool = True) -> None:
        """``cache_dir`` holds the float16 matrices and, unless ``split_caches`` is off, the
        split caches the round's fast paths read (:mod:`.split_cache`); off, rounds take the
        straightforward path over :meth:`matrix` (the benchmarks' baseline)."""
        import lancedb

        self.uri = str(uri)
        self.db = lancedb.connect(self.uri)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.split_caches = split_caches

    def table_names(self) -> list[str]:
        names: list[str] = []
        token = None
        while True:
            page = self.db.list_tables(page_token=token)
            names += list(page.tables)
            token = page.page_token
            if not token:
                return names

    def exists(self, model_id: str) -> bool:
        return table_name(model_id) in self.table_names()

    def table(self, model_id: str, dim: int | None = None):  # type: ignore[no-untyped-def]
        name = table_name(model_id)
        if name in self.table_names():
            return self.db.open_table(name)
        if dim is None:
            raise LookupError(
                f"no embeddings for model {model_id!r} yet: run `agile ingest SOURCE` first"
            )
        return self.db.create_table(name, schema=embedding_schema(dim))

    def ids(self, model_id: str) -> set[str]:
        if not self.exists(model_id):
            return set()
        t = self.table(model_id).to_lance().to_table(columns=["id"])
        return set(t.column("id").to_pylist())

    def add(self, model_id: str, ids: Sequence[str], splits: Sequence[str], vectors: np.ndarray) -> None:
        if len(ids) == 0:
            return
        data = _rows(model_id, ids, splits, vectors)
        tbl = self.table(model_id, int(vectors.shape[1]))
        tbl.merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(data)

    def update_splits(self, model_id: str, splits: dict[str, str]) -> int:
        """Bring the table's split column in line with the manifest; returns rows changed."""
        if not self.exists(model_id):
            return 0
        t = self.table(model_id).to_lance().to_table(columns=["id", "split", "vector"])
        ids = t.column("id").to_pylist()
        cur = t.column("split").to_pylist()
        changed = [k for k, (i, s) in enumerate(zip(ids, cur, strict=True)) if splits.get(i, s) != s]
        if changed:
            sub = t.take(changed)
            new_split = pa.array([splits[ids[k]] for k in changed], pa.string())
            sub = sub.set_column(1, "split", new_split)
            sub = sub.append_column("model_id", pa.array([model_id] * len(changed), pa.string()))
            self.table(model_id).merge_insert("id").when_matched_update_all().execute(sub)
        return len(changed)

    def count(self, model_id: str) -> int:
        return int(self.table(model_id).count_rows()) if self.exists(model_id) else 0

    def version(self, model_id: str) -> int:
        return int(self.table(model_id).version)

    def data_version(self, model_id: str) -> int:
        """The oldest table version that holds the same rows as the current one.

        An index build (:mod:`.ann_index`) commits a new version without touching a row, so
        caches keyed by this (the split caches, :meth:`matrix`) survive it, instead of a
        rebuild that takes minutes at 10M rows. Rows are compared by the fragments' data
        files, row counts and deletion files.
        """
        ds = self.table(model_id).to_lance()
        key = (ds.uri, int(ds.version))
        hit = _DATA_VERSIONS.get(key)
        if hit is not None:
            return hit
        current = _fragments_fingerprint(ds)
        found = int(ds.version)
        older = sorted((int(v["version"]) for v in ds.versions() if int(v["version"]) < found), reverse=True)
        for v in older[:16]:
            try:
                if _fragments_fingerprint(ds.checkout_version(v)) != current:
                    break
            except (OSError, ValueError):  # cleaned up by housekeeping
                break
            found = v
        _DATA_VERSIONS[key] = found
        return found

    def search(self, model_id: str, query: np.ndarray, k: int, *, split: str | None = None) -> list[tuple[str, str, float]]:
        """Exact nearest neighbours by cosine similarity: (id, split, similarity), best first,
        never through an index (:func:`agile_pipeline.lib.ann_index.search` uses the index)."""
        tbl = self.table(model_id)
        q = tbl.search(np.asarray(query, dtype=np.float32), vector_column_name="vector")
        q = q.distance_type("cosine").limit(k).bypass_vector_index().select(["id", "split", "_distance"])
        if split:
            q = q.where(f"split = '{split}'", prefilter=True)
        res = q.to_arrow()
        return [
            (i, s, 1.0 - float(d))
            for i, s, d in zip(
                res.column("id").to_pylist(), res.column("split").to_pylist(),
                res.column("_distance").to_pylist(), strict=True,
            )
        ]

    def matrix(self, model_id: str, split: str | None, *, dtype: type = np.float16) -> SplitMatrix:
        """All vectors of a split (``None``: every split) as a matrix, cached per table version."""
        tbl = self.table(model_id)
        version = self.data_version(model_id)
        tag = f"{table_name(model_id)}-v{version}-{split or 'all'}-{np.dtype(dtype).name}"
        if self.cache_dir is not None:
            vec_path = self.cache_dir / f"{tag}.npy"
            ids_path = self.cache_dir / f"{tag}.ids.npy"
            if vec_path.exists() and ids_path.exists():
                return SplitMatrix(np.load(ids_path, allow_pickle=True), np.load(vec_path, mmap_mode="r"))
        # Streamed in batches straight into the (memory-mapped) result: never the whole split
        # as float32 in memory (10M x 512 would be 20 GB, then 10 GB more for the cast).
        ds = tbl.to_lance()
        flt = f"split = '{split}'" if split else None
        n = int(ds.count_rows(filter=flt)) if flt else int(ds.count_rows())
        dim = int(ds.schema.field("vector").type.list_size)
        tmp_v = tmp_i = None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp_v = self.cache_dir / f"{tag}.tmp.npy"
            tmp_i = self.cache_dir / f"{tag}.ids.tmp.npy"
            vecs = np.lib.format.open_memmap(tmp_v, mode="w+", dtype=dtype, shape=(n, dim))
        else:
            vecs = np.empty((n, dim), dtype=dtype)
        ids = np.empty(n, dtype=object)
        at = 0
        for batch in ds.to_batches(columns=["id", "vector"], filter=flt, batch_size=1 << 16):
            m = batch.num_rows
            if at + m > n:
                raise RuntimeError(f"table {table_name(model_id)} changed while reading it")
            flat = batch.column("vector").flatten().to_numpy(zero_copy_only=False)
            vecs[at : at + m] = flat.reshape(m, dim)
            ids[at : at + m] = batch.column("id").to_pylist()
            at += m
        if at != n:
            raise RuntimeError(f"read {at} rows of {table_name(model_id)}, expected {n}")
        if self.cache_dir is not None and tmp_v is not None and tmp_i is not None:
            assert isinstance(vecs, np.memmap)
            vecs.flush()
            del vecs
            for old in self.cache_dir.glob(f"{table_name(model_id)}-v*-{split or 'all'}-*.npy"):
                if old != tmp_v:
                    old.unlink(missing_ok=True)
            np.save(tmp_i, ids, allow_pickle=True)
            tmp_i.replace(ids_path)
            tmp_v.replace(vec_path)
            return SplitMatrix(ids, np.load(vec_path, mmap_mode="r"))
        return SplitMatrix(ids, vecs)

    def vectors_for(self, model_id: str, ids: Sequence[str]) -> np.ndarray:
        """Float32 vectors for specific ids (corpus images or uploads), in the given order
        (KeyError if one is missing). Values are those of :meth:`matrix` (float16-rounded)
        whichever way they are read: from the cached all-rows matrix when it exists, else by a
        filtered read for a few ids (no whole-table pass)."""
        ids = [str(i) for i in ids]
        found: dict[str, np.ndarray] = {}
        if ids and self.exists(model_id):
            if len(set(ids)) > 50_000 or self._cached_matrix(model_id, None) is not None:
                m = self.matrix(model_id, None)
                index = m.index_of()
                found = {i: np.asarray(m.vectors[index[i]]) for i in set(ids) if i in index}
            else:
                found = self._lookup(self.table(model_id), ids)
        missing = [i for i in dict.fromkeys(ids) if i not in found]
        if missing and self.has_uploads(model_id):
            found.update(self._lookup(self.db.open_table(uploads_table_name(model_id)), missing))
            missing = [i for i in missing if i not in found]
        if missing:
            raise KeyError(f"{len(missing)} image(s) have no embedding yet (first {missing[0]})")
        if not ids:
            return np.zeros((0, 0), np.float32)
        return np.stack([found[i] for i in ids]).astype(np.float32)

    @staticmethod
    def _lookup(tbl, ids: Sequence[str], chunk: int = 1000) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
        ds = tbl.to_lance()
        dim = int(ds.schema.field("vector").type.list_size)
        out: dict[str, np.ndarray] = {}
        uniq = list(dict.fromkeys(ids))
        for at in range(0, len(uniq), chunk):
            t = ds.to_table(columns=["id", "vector"], filter=_sql_in(uniq[at : at + chunk]))
            col = t.column("vector").combine_chunks()
            vecs = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
            out.update(zip(t.column("id").to_pylist(), vecs.astype(np.float16), strict=True))
        return out

    def _cached_matrix(self, model_id: str, split: str | None) -> Path | None:
        """The on-disk :meth:`matrix` cache of the current version, if built."""
        if self.cache_dir is None:
            return None
        tag = f"{table_name(model_id)}-v{self.data_version(model_id)}-{split or 'all'}-float16"
        path = self.cache_dir / f"{tag}.npy"
        return path if path.exists() and (self.cache_dir / f"{tag}.ids.npy").exists() else None

    def has_uploads(self, model_id: str) -> bool:
        return uploads_table_name(model_id) in self.table_names()

    def add_uploads(self, model_id: str, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Store uploaded exemplars' vectors (table :func:`uploads_table_name`, split 'upload')."""
        if len(ids) == 0:
            return
        data = _rows(model_id, ids, ["upload"] * len(ids), vectors)
        name = uploads_table_name(model_id)
        if name in self.table_names():
            tbl = self.db.open_table(name)
        else:
            tbl = self.db.create_table(name, schema=data.schema, exist_ok=True)
        tbl.merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(data)

    def upload_ids(self, model_id: str, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` have an uploaded vector."""
        if not ids or not self.has_uploads(model_id):
            return set()
        return set(self._lookup(self.db.open_table(uploads_table_name(model_id)), ids))

    def optimize(self, model_id: str) -> None:
        if self.exists(model_id):
            self.table(model_id).optimize()

    def compact(
        self,
        model_id: str,
        *,
        keep_versions: int = KEEP_VERSIONS,
        older_than: timedelta = KEEP_REPLACED_FOR,
    ) -> dict[str, int]:
        """Housekeeping: merge small fragments, then delete versions no reader can still hold.

        A version is deleted only if it is not among the newest ``keep_versions`` and the
        version that *replaced* it was committed more than ``older_than`` ago. Readers open the
        latest version, so a reader of version N opened it before N+1 existed: it has been
        reading for longer than ``older_than`` before N can go. (Lance's own
        ``cleanup_older_than`` counts from when N was *written*, which says nothing about how
        long a reader may have held it; counting from its replacement is the safe bound.)
        A compaction that loses a commit race to a writer is retried twice, then left for the
        next run (writers always win). Returns counts for the run's metadata.
        """
        import lance

        out = {"fragments_removed": 0, "fragments_added": 0, "versions_removed": 0,
               "versions_kept": 0, "data_files_removed": 0, "bytes_removed": 0, "version": 0}
        if not self.exists(model_id):
            return out
        if keep_versions < 1:
            raise ValueError("keep_versions must be at least 1 (the latest version)")
        uri = self.table(model_id).to_lance().uri
        out["compaction_conflicts"] = 0
        for attempt in range(3):
            try:
                metrics = lance.dataset(uri).optimize.compact_files()
            except OSError as exc:  # a writer committed first: writers win, retry, else skip
                if "conflict" not in str(exc).lower():
                    raise
                out["compaction_conflicts"] += 1
                log.info("compaction of %s lost to a concurrent write (attempt %d)", uri, attempt + 1)
                time.sleep(0.2 * (attempt + 1))
                continue
            out["fragments_removed"] = int(metrics.fragments_removed)
            out["fragments_added"] = int(metrics.fragments_added)
            break
        ds = lance.dataset(uri)
        versions = sorted(ds.versions(), key=lambda v: int(v["version"]))
        cutoff = datetime.now() - older_than  # Lance reports naive local timestamps
        newest = {int(v["version"]) for v in versions[-keep_versions:]}
        doomed = [
            int(v["version"]) for v, replaced_by in pairwise(versions)
            if replaced_by["timestamp"] < cutoff and int(v["version"]) not in newest
        ]
        if doomed:
            stats = ds.cleanup_old_versions(versions=doomed, error_if_tagged_old_versions=False)
            out["versions_removed"] = int(stats.old_versions)
            out["data_files_removed"] = int(stats.data_files_removed)
            out["bytes_removed"] = int(stats.bytes_removed)
        out["versions_kept"] = len(lance.dataset(uri).versions())
        out["version"] = int(ds.version)
        log.info("compacted %s: %s", table_name(model_id), out)
        return out

    def model_ids(self) -> list[str]:
        """Model ids of the embedding tables present (as their table-name slugs)."""
        return [n.removeprefix(TABLE_PREFIX) for n in self.table_names() if n.startswith(TABLE_PREFIX)]
