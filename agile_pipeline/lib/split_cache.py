"""The split cache: one split of one embedding table as flat, memory-mapped NumPy files.

What makes a round slow at 10M images is rarely the arithmetic; it is Python objects per image
(dicts of 10M ids, lists of 5M strings, pickled object arrays). A :class:`SplitCache` keeps
everything per image in flat arrays cached per LanceDB table version:

* ids as fixed-width bytes (``S``) and a sorted index for id → row lookups (``searchsorted``,
  no dict);
* the float16 matrix (the same file :meth:`VectorStore.matrix` uses);
* the rows L2-normalised in bfloat16, which the whole-split scans read (:mod:`.scan`; the
  int8 scan builds its uint8 copy from them on first use);
* the row norms.

:func:`split_cache` builds a split's files on the first call per table version (one streaming
pass over the table) and memory-maps them afterwards; :func:`clear_split_caches` forgets the
process-wide memo. :func:`has_cache` says whether a vector store has split caches at all (the
straightforward path — ``VectorStore.matrix`` and float32 — runs where it has not).
"""

import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agile_pipeline.lib.npy_io import NpyWriter, npy_header

log = logging.getLogger(__name__)


def ids_to_bytes(col: Any) -> np.ndarray:
    """Arrow string array → fixed-width ``S`` array (fast path when all ids have one length)."""
    import pyarrow as pa

    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if len(col) == 0:
        return np.empty(0, "S1")
    if col.null_count:
        raise ValueError("image ids must not be null")
    if pa.types.is_large_string(col.type):
        offsets = np.frombuffer(col.buffers()[1], np.int64)[col.offset : col.offset + len(col) + 1]
    else:
        offsets = np.frombuffer(col.buffers()[1], np.int32)[col.offset : col.offset + len(col) + 1]
    lengths = np.diff(offsets)
    data = np.frombuffer(col.buffers()[2], np.uint8)
    w = int(lengths.max())
    if w > 0 and int(lengths.min()) == w:
        raw = data[offsets[0] : offsets[-1]].reshape(-1, w)
        return raw.view(f"S{w}").reshape(-1).copy()
    return np.array([s.encode("utf-8") for s in col.to_pylist()], dtype=f"S{max(w, 1)}")


@dataclass
class SplitCache:
    """One split of one embedding table as flat files (all rows in table scan order).

    * ``keys``: image ids, fixed-width UTF-8 bytes (``S``), memory-mapped;
    * ``sorted_keys`` / ``order``: ``keys[order] == sorted_keys`` (id → row by binary search);
    * ``f16_path``: the float16 matrix — the same file :meth:`VectorStore.matrix` caches;
    * ``bf16_path``: the same vectors in bfloat16 (``uint16`` bit patterns), for scoring scans;
      in ``int8`` scan mode a uint8 copy sits beside it (:func:`int8_scan.u8_rows`);
    * ``norms``: float32 L2 norm of every float16 row.
    """

    model_id: str
    split: str | None
    version: int
    dim: int
    keys: np.ndarray
    sorted_keys: np.ndarray
    order: np.ndarray
    norms: np.ndarray
    f16_path: Path
    bf16_path: Path
    cache_dir: Path
    tag: str
    _f16: np.ndarray | None = field(default=None, repr=False)
    _rowids: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    @property
    def f16(self) -> np.ndarray:
        """The float16 matrix, memory-mapped (random access: training rows, shortlists)."""
        if self._f16 is None:
            self._f16 = np.load(self.f16_path, mmap_mode="r")
        return self._f16

    def positions(self, ids: Iterable[str] | np.ndarray) -> np.ndarray:
        """Row of every id (``-1`` where the id is not in this split), O(m log n)."""
        q = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids))
        if q.size == 0:
            return np.empty(0, np.int64)
        if q.dtype.kind != "S":
            q = np.char.encode(q.astype(str), "utf-8")
        # a query longer than the stored width can never match
        too_long = np.char.str_len(q) > self.keys.dtype.itemsize
        q = q.astype(self.keys.dtype)
        at = np.searchsorted(self.sorted_keys, q)
        at_c = np.minimum(at, len(self) - 1) if len(self) else at
        hit = (at < len(self)) & ~too_long
        if len(self):
            hit &= self.sorted_keys[at_c] == q
        out = np.full(q.shape[0], -1, np.int64)
        out[hit] = self.order[at_c[hit]]
        return out

    def rowid_positions(self, rowids: np.ndarray, table: Any) -> np.ndarray:
        """Row of every LanceDB ``_rowid`` of ``table`` (``-1`` where the row is not in this
        split), O(m log n).

        An ANN query that returns row ids instead of image ids skips reading the ids of its
        candidates from the table, which at 10M rows is most of a query's time (3,000
        candidates: 16 ms against 60 ms, BENCHMARKS.md). The row id → row map is built on
        first use (one scan of the split's ids, ~1 s at 5M rows) and kept beside the cache.
        Row ids are stable while the table's fragments are, which is what the cache's
        version (:meth:`VectorStore.data_version`) keys on."""
        if self._rowids is None:
            paths = (self.cached("rowids"), self.cached("rowpos"))
            if not all(p.exists() for p in paths):
                self._build_rowids(table, paths)
            self._rowids = (np.load(paths[0], mmap_mode="r"), np.load(paths[1], mmap_mode="r"))
        sorted_ids, pos = self._rowids
        q = np.asarray(rowids, np.uint64)
        out = np.full(q.shape[0], -1, np.int64)
        if q.size == 0 or not len(sorted_ids):
            return out
        at = np.searchsorted(sorted_ids, q)
        at_c = np.minimum(at, len(sorted_ids) - 1)
        hit = (at < len(sorted_ids)) & (sorted_ids[at_c] == q)
        out[hit] = pos[at_c[hit]]
        return out

    def _build_rowids(self, table: Any, paths: tuple[Path, Path]) -> None:
        flt = f"split = '{self.split}'" if self.split else None
        rid: list[np.ndarray] = []
        keys: list[np.ndarray] = []
        for batch in table.to_lance().to_batches(columns=["id"], filter=flt, with_row_id=True, batch_size=1 << 16):
            if batch.num_rows:
                rid.append(batch.column("_rowid").to_numpy().astype(np.uint64))
                keys.append(ids_to_bytes(batch.column("id")))
        rowids = np.concatenate(rid) if rid else np.empty(0, np.uint64)
        pos = self.positions(np.concatenate(keys) if keys else np.empty(0, "S1"))
        if len(rowids) != len(self) or (pos < 0).any():
            raise RuntimeError(f"split cache {self.tag} does not match its table's rows: rebuild it")
        order = np.argsort(rowids, kind="stable")
        for path, arr in zip(paths, (rowids[order], pos[order]), strict=True):
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                np.save(f, arr)
            tmp.replace(path)

    def mask(self, ids: Iterable[str] | np.ndarray) -> np.ndarray:
        """Boolean row mask of the given ids (absent ids are ignored)."""
        m = np.zeros(len(self), np.bool_)
        p = self.positions(ids)
        m[p[p >= 0]] = True
        return m

    def id_at(self, rows: Iterable[int] | np.ndarray) -> list[str]:
        """The ids (``str``) of the given rows."""
        r = np.asarray(rows if isinstance(rows, np.ndarray) else list(rows), np.int64)
        return [b.decode("utf-8") for b in self.keys[r].tolist()]

    def rows_f32(self, rows: np.ndarray) -> np.ndarray:
        """Float32 copies of the float16 rows ``rows`` (any order), read in sorted order."""
        rows = np.asarray(rows, np.int64)
        if rows.size == 0:
            return np.empty((0, self.dim), np.float32)
        o = np.argsort(rows, kind="stable")
        got = np.asarray(self.f16[rows[o]], dtype=np.float32)
        out = np.empty_like(got)
        out[o] = got
        return out

    def key_at(self, i: int) -> str:
        return bytes(self.keys[i]).decode("utf-8")

    def str_keys(self) -> "LazyKeys":
        """A read-only ``Sequence[str]`` view of the ids that decodes on access."""
        return LazyKeys(self.keys)

    def cached(self, name: str) -> Path:
        """Path for a derived per-version array (e.g. ``evalhash-<k>``) of this split."""
        return self.cache_dir / f"{self.tag}.{name}.npy"


class LazyKeys(Sequence[str]):
    """``Sequence[str]`` over a bytes array without building millions of ``str`` objects."""

    def __init__(self, keys: np.ndarray) -> None:
        self._keys = keys

    def __len__(self) -> int:
        return int(self._keys.shape[0])

    def __getitem__(self, i):  # type: ignore[no-untyped-def, override]
        if isinstance(i, slice):
            return [b.decode("utf-8") for b in self._keys[i].tolist()]
        return bytes(self._keys[int(i)]).decode("utf-8")


def _tag(model_id: str, version: int, split: str | None) -> str:
    from agile_pipeline.lib.vectors import table_name

    return f"{table_name(model_id)}-v{version}-{split or 'all'}"


_MEMO: dict[tuple[str, str, int, str | None], SplitCache] = {}


def split_cache(vectors: Any, model_id: str, split: str | None, *, chunk: int = 1 << 16) -> SplitCache:
    """The :class:`SplitCache` of ``split`` (``None``: all rows) for the table's current version.

    Built on the first call per table version (one streaming scan of the LanceDB table; a
    10M-row table takes a minute or two), then memory-mapped in milliseconds. Kept in a
    process-wide memo too. ``vectors`` is a :class:`~agile_pipeline.lib.vectors.VectorStore`
    with a ``cache_dir``.
    """
    if vectors.cache_dir is None:
        raise ValueError("split caches need a VectorStore with a cache_dir")
    tbl = vectors.table(model_id)
    version = vectors.data_version(model_id)  # index builds keep it: no rebuild for them
    memo_key = (str(vectors.cache_dir), model_id, version, split)
    if memo_key in _MEMO:
        return _MEMO[memo_key]
    cache_dir = Path(vectors.cache_dir)
    tag = _tag(model_id, version, split)
    f16_path = cache_dir / f"{tag}-float16.npy"  # VectorStore.matrix's file
    ids_path = cache_dir / f"{tag}-float16.ids.npy"  # VectorStore.matrix's ids
    paths = {n: cache_dir / f"{tag}.{n}.npy" for n in ("keys", "sorted", "order", "norms", "bf16")}
    if not all(p.exists() for p in [f16_path, ids_path, *paths.values()]):
        _build(tbl, split, cache_dir, tag, f16_path, ids_path, paths, chunk=chunk)
    keys = np.load(paths["keys"], mmap_mode="r")
    dim = int(npy_header(f16_path)[1][1])
    sc = SplitCache(
        model_id=model_id, split=split, version=version, dim=dim, keys=keys,
        sorted_keys=np.load(paths["sorted"], mmap_mode="r"), order=np.load(paths["order"], mmap_mode="r"),
        norms=np.load(paths["norms"]), f16_path=f16_path, bf16_path=paths["bf16"],
        cache_dir=cache_dir, tag=tag,
    )
    for k in [k for k in _MEMO if k[:2] == memo_key[:2] and k[3] == split]:
        del _MEMO[k]
    _MEMO[memo_key] = sc
    return sc


def _build(tbl: Any, split: str | None, cache_dir: Path, tag: str, f16_path: Path, ids_path: Path,
           paths: dict[str, Path], *, chunk: int) -> None:
    import torch

    t0 = time.perf_counter()
    cache_dir.mkdir(parents=True, exist_ok=True)
    ds = tbl.to_lance()
    flt = f"split = '{split}'" if split else None
    n = int(ds.count_rows(filter=flt)) if flt else int(ds.count_rows())
    dim = int(ds.schema.field("vector").type.list_size)
    tmp = {k: p.with_name(p.name + f".{os.getpid()}.tmp") for k, p in paths.items()}
    tmp_f16 = f16_path.with_name(f16_path.name + f".{os.getpid()}.tmp")
    w16 = NpyWriter(tmp_f16, np.float16, (n, dim))
    wbf = NpyWriter(tmp["bf16"], np.uint16, (n, dim))
    norms = np.empty(n, np.float32)
    key_parts: list[np.ndarray] = []
    at = 0
    for batch in ds.to_batches(columns=["id", "vector"], filter=flt, batch_size=chunk):
        if batch.num_rows == 0:
            continue
        vec = batch.column("vector")
        v32 = vec.values.to_numpy(zero_copy_only=False)[
            vec.offset * dim : (vec.offset + len(vec)) * dim
        ].reshape(-1, dim)
        v16 = v32.astype(np.float16)
        w16.write(v16)
        f32 = v16.astype(np.float32)
        nrm = np.linalg.norm(f32, axis=1)
        norms[at : at + len(v16)] = nrm
        # bfloat16 rows are stored L2-normalised: the default (input_norm='l2') classifiers
        # then need no per-row division in the scan; others multiply the norm back
        f32 /= np.maximum(nrm, 1e-12)[:, None]
        wbf.write(torch.from_numpy(f32).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
        key_parts.append(ids_to_bytes(batch.column("id")))
        at += len(v16)
    w16.close()
    wbf.close()
    if at != n:
        raise RuntimeError(f"scanned {at} rows, expected {n}")
    width = max([p.dtype.itemsize for p in key_parts] + [1])
    keys = np.concatenate([p.astype(f"S{width}") for p in key_parts]) if key_parts else np.empty(0, "S1")
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    if n > 1 and (sorted_keys[1:] == sorted_keys[:-1]).any():
        raise ValueError(f"duplicate image ids in table {tbl.name}")
    for name, arr in (("keys", keys), ("sorted", sorted_keys), ("order", order.astype(np.int64)),
                      ("norms", norms)):
        with open(tmp[name], "wb") as f:
            np.save(f, arr)
    # VectorStore.matrix reads the pair (vectors, ids as an object array): keep it complete so
    # callers that still use matrix() get the same rows without re-reading the table.
    tmp_ids = ids_path.with_name(ids_path.name + f".{os.getpid()}.tmp")
    with open(tmp_ids, "wb") as f:
        np.save(f, np.char.decode(keys, "utf-8").astype(object), allow_pickle=True)
    for old in cache_dir.glob(f"{tag.rsplit('-v', 1)[0]}-v*-{split or 'all'}*.npy"):
        if not old.name.startswith(tag + "-") and not old.name.startswith(tag + "."):
            old.unlink(missing_ok=True)
    for k, p in tmp.items():
        p.replace(paths[k])
    tmp_ids.replace(ids_path)
    tmp_f16.replace(f16_path)
    log.info("split cache %s: %d rows in %.1fs", tag, n, time.perf_counter() - t0)


def clear_split_caches() -> None:
    """Forget every split cache this process memoised (the files stay; the next
    :func:`split_cache` call maps them again, or rebuilds them if they are gone)."""
    _MEMO.clear()


def has_cache(vectors: Any) -> bool:
    """Whether the fast path applies: a :class:`VectorStore` with a cache directory and its
    split caches on (``VectorStore(..., split_caches=False)`` runs the straightforward path,
    the benchmarks' baseline)."""
    return getattr(vectors, "cache_dir", None) is not None and getattr(vectors, "split_caches", True)
