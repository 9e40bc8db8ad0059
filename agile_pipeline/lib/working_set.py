"""A concept's working set: one compact file with the train rows its next round will read.

A pooled round (:mod:`.candidate_pool`) reads O(labels x k) rows of the train split — the
pool, the sweep, a random sample, the labelled rows, the classifier's random negatives — but
they lie scattered over a float16 file of several GB. Once the round's background work (the
sweep's full scan, the eval set, the corpus predictions) has pushed them out of the page cache,
each costs a disk seek: at 10M images on a 2-core VM with 23 GiB of RAM, 20,000 such rows took
7 s to read, where one contiguous 20 MB read takes 25 ms. A round then waits on the disk, not
on the work.

So when a pooled round has committed its batch (off the rater's wait), the rows the next round
will most likely read are copied, sorted, into ``working_set-<split cache tag>.npy`` beside the
concept (:func:`write_working_set`), and the next round reads through :class:`RowSource`: rows
the file has come from it, any other row from the split cache as before. The file is a cache,
never the truth: its rows are copies of the same split cache version (the tag is in its name),
so a stale or missing file only costs speed, and a corpus refresh (a new version) ignores it.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agile_pipeline.lib.split_cache import SplitCache

PREFIX = "working_set-"


def working_set_path(concept_dir: Path, cache: SplitCache) -> Path:
    return Path(concept_dir) / f"{PREFIX}{cache.tag}.npy"


def _dtype(dim: int) -> np.dtype:
    return np.dtype([("row", "<i8"), ("v", "<f2", (dim,))])


@dataclass
class RowSource:
    """The train split's float16 rows read through a concept's working set (if any).

    Stands in for the split cache's float16 matrix where a round reads rows by index:
    ``X[rows]`` (any order) and :meth:`rows_f32` give what ``cache.f16`` gives. ``hits`` and
    ``misses`` count the rows read from the working set and from the split cache."""

    cache: SplitCache
    rows: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # sorted
    vectors: np.ndarray | None = None  # float16 (len(rows), dim), memory-mapped
    hits: int = 0
    misses: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.cache), self.cache.dim)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float16)

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx)
        if idx.ndim != 1 or idx.dtype.kind not in "iu":
            raise TypeError("a RowSource is indexed by a 1-D array of row numbers")
        return self.rows_f16(idx)

    def rows_f16(self, rows: np.ndarray) -> np.ndarray:
        """The float16 rows ``rows`` (any order), each read once, in sorted order."""
        rows = np.asarray(rows, np.int64)
        out = np.empty((rows.size, self.cache.dim), np.float16)
        if rows.size == 0:
            return out
        at = np.searchsorted(self.rows, rows)
        at_c = np.minimum(at, max(len(self.rows) - 1, 0))
        have = (at < len(self.rows)) & (self.rows[at_c] == rows) if len(self.rows) else np.zeros(rows.size, bool)
        if have.any():
            assert self.vectors is not None
            o = np.argsort(at_c[have], kind="stable")
            got = np.asarray(self.vectors[at_c[have][o]])
            out[np.flatnonzero(have)[o]] = got
        if not have.all():
            miss = np.flatnonzero(~have)
            o = np.argsort(rows[miss], kind="stable")
            out[miss[o]] = self.cache.f16[rows[miss][o]]
        self.hits += int(have.sum())
        self.misses += int(rows.size - have.sum())
        return out

    def rows_f32(self, rows: np.ndarray) -> np.ndarray:
        """Float32 copies of the rows ``rows`` (any order): :meth:`SplitCache.rows_f32`."""
        return self.rows_f16(rows).astype(np.float32)


def concept_rows(concept_dir: Path, cache: SplitCache) -> RowSource:
    """The train split as a concept's round reads it: through its working set when it has one
    for this version of the split (a missing or unreadable file: the split cache alone)."""
    path = working_set_path(concept_dir, cache)
    try:
        a = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return RowSource(cache)
    if a.dtype != _dtype(cache.dim) or a.ndim != 1:
        return RowSource(cache)
    return RowSource(cache, np.asarray(a["row"]), a["v"])


def write_working_set(concept_dir: Path, cache: SplitCache, rows: np.ndarray) -> int:
    """Copy the train rows ``rows`` (valid ones, once each) into the concept's working set,
    replacing it atomically; rows the old file has are copied from it, the rest read from the
    split cache in sorted order. Files of other versions of the split are removed. Returns how
    many rows the new file holds."""
    concept_dir = Path(concept_dir)
    rows = np.asarray(rows, np.int64)
    rows = np.unique(rows[(rows >= 0) & (rows < len(cache))])
    old = concept_rows(concept_dir, cache)
    out = np.empty(rows.size, _dtype(cache.dim))
    out["row"] = rows
    out["v"] = old.rows_f16(rows)
    path = working_set_path(concept_dir, cache)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, out)
    tmp.replace(path)
    for stale in concept_dir.glob(f"{PREFIX}*.npy"):
        if stale != path:
            stale.unlink(missing_ok=True)
    return int(rows.size)
