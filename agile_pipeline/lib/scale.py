"""The per-round hot path at corpus scale (10M images on one CPU box).

What makes a round slow at 10M is rarely the arithmetic; it is Python objects per image:
dicts of 10M ids, generators over ids, lists of 5M strings, pickled object arrays, and
per-key SipHash calls. This module keeps everything per image in flat NumPy arrays that are
cached per LanceDB table version, so a round touches only arrays and memory maps:

* :class:`SplitCache` — one split of one embedding table: ids as fixed-width bytes (``S``),
  a sorted index for id → row lookups (``searchsorted``, no dict), the float16 matrix (same
  file :meth:`VectorStore.matrix` uses), a bfloat16 copy for scoring scans, and row norms.
* :func:`score_approx` — the classifier over a whole split in bfloat16 (about 4x faster than
  float32 on AVX512-BF16 CPUs) or, on AVX2-only CPUs, in int8 (:mod:`int8_scan`, ~2-3x
  float32), streamed in large chunks.
* :func:`select_margin_exact` — margin selection that scans approximately, then re-scores a
  generous shortlist exactly (float32, same as :meth:`TrainedClassifier.predict_proba` on the
  float16 matrix) and proves the shortlist large enough, so the picked rows are the ones the
  float32 path picks.
* :func:`siphash64_array` — keyed SipHash-2-4 vectorised over a fixed-width bytes array (the
  same values as :func:`agile_pipeline.lib.evalset.siphash64`), for splits and eval sets.
* :func:`stratified_eval_set_cached` — :func:`stratified_eval_set` with the hash order
  computed once per table version.

All functions are pure NumPy/torch (no Dagster, no Gradio).
"""

import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


# ---- SipHash-2-4, vectorised ------------------------------------------------------------
def _rotl(x: np.ndarray, r: int, tmp: np.ndarray) -> None:
    """``x = rotl(x, r)`` in place (uint64), using ``tmp`` as scratch."""
    np.right_shift(x, np.uint64(64 - r), out=tmp)
    np.left_shift(x, np.uint64(r), out=x)
    np.bitwise_or(x, tmp, out=x)


def _sipround(v0: np.ndarray, v1: np.ndarray, v2: np.ndarray, v3: np.ndarray, t: np.ndarray) -> None:
    v0 += v1
    _rotl(v1, 13, t)
    v1 ^= v0
    _rotl(v0, 32, t)
    v2 += v3
    _rotl(v3, 16, t)
    v3 ^= v2
    v0 += v3
    _rotl(v3, 21, t)
    v3 ^= v0
    v2 += v1
    _rotl(v1, 17, t)
    v1 ^= v2
    _rotl(v2, 32, t)


def _siphash_same_length(words: np.ndarray, tail: np.ndarray, k0: int, k1: int) -> np.ndarray:
    """SipHash-2-4 of ``n`` messages of one length: ``words`` (n, nblocks) full 8-byte blocks
    (little-endian uint64), ``tail`` (n,) the final block (remaining bytes | length << 56)."""
    n = tail.shape[0]
    with np.errstate(over="ignore"):
        v0 = np.full(n, np.uint64(k0 ^ 0x736F6D6570736575))
        v1 = np.full(n, np.uint64(k1 ^ 0x646F72616E646F6D))
        v2 = np.full(n, np.uint64(k0 ^ 0x6C7967656E657261))
        v3 = np.full(n, np.uint64(k1 ^ 0x7465646279746573))
        t = np.empty(n, np.uint64)
        blocks = [np.ascontiguousarray(words[:, j]) for j in range(words.shape[1])]
        for m in [*blocks, tail]:
            v3 ^= m
            _sipround(v0, v1, v2, v3, t)
            _sipround(v0, v1, v2, v3, t)
            v0 ^= m
        v2 ^= np.uint64(0xFF)
        for _ in range(4):
            _sipround(v0, v1, v2, v3, t)
        v0 ^= v1
        v0 ^= v2
        v0 ^= v3
    return v0


def siphash64_array(keys: np.ndarray | Sequence[str], key: bytes, *, chunk: int = 1 << 20) -> np.ndarray:
    """Keyed SipHash-2-4 (64-bit) of every key, as ``uint64``; vectorised.

    ``keys`` is a fixed-width bytes array (``S``) of UTF-8 strings or a sequence of ``str``.
    Equals :func:`agile_pipeline.lib.evalset.siphash64` / ``hash_keys`` element by element
    (about 50x faster: ~0.1 s per million 32-character ids). Keys must not end in NUL bytes
    (NumPy's ``S`` dtype strips them); image ids never do.
    """
    if len(key) != 16:
        raise ValueError(f"SipHash key must be 16 bytes, got {len(key)}")
    arr = np.asarray(keys)
    if arr.dtype.kind == "U" or arr.dtype == object:
        arr = np.char.encode(arr.astype(str), "utf-8") if arr.size else np.empty(0, "S1")
    if arr.dtype.kind != "S":
        raise TypeError(f"keys must be strings or bytes, got dtype {arr.dtype}")
    arr = arr.reshape(-1)
    k0 = int.from_bytes(key[:8], "little")
    k1 = int.from_bytes(key[8:], "little")
    out = np.empty(arr.shape[0], np.uint64)
    width = arr.dtype.itemsize
    for s in range(0, arr.shape[0], chunk):
        part = arr[s : s + chunk]
        raw = np.frombuffer(np.ascontiguousarray(part).tobytes(), np.uint8).reshape(-1, width)
        lengths = width - np.argmax(raw[:, ::-1] != 0, axis=1)
        lengths[~raw.any(axis=1)] = 0
        for length in np.unique(lengths).tolist():
            rows = np.flatnonzero(lengths == length)
            nb, rem = divmod(length, 8)
            padded = np.zeros((rows.size, (nb + 1) * 8), np.uint8)
            padded[:, :length] = raw[rows, :length] if length <= width else raw[rows]
            w = padded.view("<u8")
            tail = np.ascontiguousarray(w[:, nb]).astype(np.uint64)
            if rem == 0:
                tail[:] = 0
            tail |= np.uint64((length & 0xFF) << 56)
            out[s + rows] = _siphash_same_length(w[:, :nb].astype(np.uint64), tail, k0, k1)
    return out


def assign_splits(ids: np.ndarray | Sequence[str], *, train_fraction: float, key: bytes) -> np.ndarray:
    """Vectorised :func:`agile_pipeline.lib.corpus.assign_split`: ``True`` where "train"."""
    if not 0.0 < train_fraction < 1.0:
        raise ValueError("train_fraction must be strictly between 0 and 1")
    h = siphash64_array(ids, key)
    # assign_split compares h / 2**64 < f in float64; do exactly that
    return (h.astype(np.float64) / 2.0**64) < train_fraction


# ---- flat per-split caches ---------------------------------------------------------------
def _npy_header(path: Path) -> tuple[np.dtype, tuple[int, ...], int]:
    """``(dtype, shape, data offset)`` of a C-order ``.npy`` file."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        if fortran:
            raise ValueError(f"{path} is Fortran-ordered")
        return np.dtype(dtype), tuple(shape), f.tell()


class _NpyWriter:
    """Write a C-order ``.npy`` of known shape chunk by chunk with plain ``write`` calls (no
    memory map, so the writer's RSS stays one chunk, whatever the file size)."""

    def __init__(self, path: Path, dtype: Any, shape: tuple[int, ...]) -> None:
        self.path = path
        self.dtype = np.dtype(dtype)
        self.shape = shape
        self.rows = 0
        self.f = open(path, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": shape}
        np.lib.format.write_array_header_1_0(self.f, header)

    def write(self, chunk: np.ndarray) -> None:
        chunk = np.ascontiguousarray(chunk, dtype=self.dtype)
        self.f.write(memoryview(chunk).cast("B"))
        self.rows += chunk.shape[0]

    def close(self) -> None:
        self.f.close()
        if self.rows != self.shape[0]:
            raise RuntimeError(f"{self.path}: wrote {self.rows} rows, expected {self.shape[0]}")


def iter_npy_rows(path: Path, chunk: int, *, prefetch: int = 2, start: int = 0,  # type: ignore[no-untyped-def]
                  stop: int | None = None, buffers: Sequence[np.ndarray] | None = None):
    """Yield ``(start, rows)`` over rows ``[start, stop)`` of a 2-D ``.npy`` in chunks of
    ``chunk`` rows.

    Chunks are read with ``preadv`` into a few reusable buffers by a reader thread that stays
    ``prefetch`` chunks ahead (so disk reads overlap the caller's compute), never through a
    memory map: a scan of a 10 GB file keeps RSS at a few chunks, while the OS page cache still
    keeps the file hot between rounds. A yielded array is reused once the caller asks for the
    next chunk. ``buffers`` (at least two C-contiguous arrays of ``chunk`` rows, the file's
    dtype and width) replaces the reader's own, e.g. views of preallocated quantized tensors.
    """
    import queue
    import threading

    dtype, shape, offset = _npy_header(path)
    n, d = shape
    first = max(0, start)
    n = n if stop is None else min(n, stop)
    if n <= first:
        return
    row_bytes = d * dtype.itemsize
    rows = min(chunk, n - first)
    free: queue.Queue[np.ndarray] = queue.Queue()
    if buffers is not None:
        if len(buffers) < 2 or any(b.dtype != dtype or b.shape[1:] != (d,) or b.shape[0] < rows
                                   or not b.flags.c_contiguous for b in buffers):
            raise ValueError(f"buffers must be >= 2 C-contiguous ({rows}, {d}) {dtype} arrays")
        for b in buffers:
            free.put(b)
    else:
        for _ in range(max(1, prefetch) + 1):
            free.put(np.empty((rows, d), dtype))
    full: queue.Queue[tuple[int, np.ndarray | None, BaseException | None]] = queue.Queue()
    halt = threading.Event()

    def reader() -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            full.put((0, None, exc))
            return
        try:
            for at in range(first, n, chunk):
                buf = free.get()
                if halt.is_set():
                    return
                m = min(chunk, n - at)
                mv = memoryview(buf[:m]).cast("B")
                got, pos = 0, offset + at * row_bytes
                while got < m * row_bytes:
                    r = os.preadv(fd, [mv[got:]], pos + got)
                    if r <= 0:
                        raise OSError(f"{path}: unexpected end of file")
                    got += r
                full.put((at, buf, None))
        except BaseException as exc:  # handed to the consumer
            full.put((0, None, exc))
        finally:
            os.close(fd)

    t = threading.Thread(target=reader, name="npy-prefetch", daemon=True)
    t.start()
    try:
        for at in range(first, n, chunk):
            got_at, buf, err = full.get()
            if err is not None:
                raise err
            assert buf is not None and got_at == at
            yield at, buf[: min(chunk, n - at)]
            free.put(buf)
    finally:
        halt.set()
        free.put(np.empty((0, d), dtype))  # unblock the reader if it waits for a buffer
        t.join()


def _ids_to_bytes(col: Any) -> np.ndarray:
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
    version = int(tbl.version)
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
        if scan_mode() == "int8":  # the uint8 copy the int8 scans read (else on first scan)
            from agile_pipeline.lib import int8_scan

            int8_scan.u8_rows(paths["bf16"])
    keys = np.load(paths["keys"], mmap_mode="r")
    dim = int(_npy_header(f16_path)[1][1])
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
    w16 = _NpyWriter(tmp_f16, np.float16, (n, dim))
    wbf = _NpyWriter(tmp["bf16"], np.uint16, (n, dim))
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
        key_parts.append(_ids_to_bytes(batch.column("id")))
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


# ---- approximate scans: bfloat16, int8 or float32 -----------------------------------------
_SCAN_MODE: list[str] = []
SCAN_MODES = ("bf16", "int8", "fp32")


def scan_mode() -> str:
    """How scans of whole splits compute on this CPU: ``"bf16"`` where it multiplies bfloat16
    natively (AVX512-BF16 / AMX: several times float32's speed), else ``"int8"`` where PyTorch's
    FBGEMM uint8 × int8 kernels are clearly faster than float32 (AVX2: ~2–3x), else ``"fp32"``
    (bfloat16-stored rows widened; on an AVX2-only CPU bfloat16 matmuls are emulated and ~100x
    *slower* than float32).

    Decided once per process by timing a small product of each kind; ``AGILE_SCAN_DTYPE=
    bf16|int8|fp32`` overrides. Whatever the mode, callers that need float32 answers re-score
    what could change them (:func:`select_margin_exact`, :class:`SplitScores`)."""
    import torch

    if _SCAN_MODE:
        return _SCAN_MODE[0]
    from agile_pipeline.lib import int8_scan

    forced = os.environ.get("AGILE_SCAN_DTYPE", "").strip().lower()
    forced = {"bfloat16": "bf16", "float32": "fp32"}.get(forced, forced)
    if forced == "int8" and not int8_scan.supported():
        log.warning("AGILE_SCAN_DTYPE=int8 but this PyTorch has no x86/FBGEMM quantized engine")
        forced = ""
    if forced in SCAN_MODES:
        choice = forced
    else:
        if forced:
            log.warning("AGILE_SCAN_DTYPE=%r is not one of %s; choosing by measurement", forced, SCAN_MODES)
        gen = torch.Generator().manual_seed(0)
        # a scan-sized chunk for float32 and int8; bfloat16 on an eighth of it (where it is
        # emulated, a full chunk takes a second), timed per row
        a, b = torch.randn(16384, 512, generator=gen), torch.randn(512, 128, generator=gen)

        def best(f: Any, rows: int) -> float:
            f()  # warm up
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                f()
                times.append(time.perf_counter() - t0)
            return min(times) / rows

        with torch.inference_mode():
            t = {"fp32": best(lambda: a @ b, len(a))}
            a16, b16 = a[:2048].to(torch.bfloat16), b.to(torch.bfloat16)
            t["bf16"] = best(lambda: a16 @ b16, len(a16))
            if int8_scan.supported():
                t["int8"] = best(int8_scan.probe_product(a, b), len(a))
        choice = "fp32"
        if t["bf16"] < 0.8 * t["fp32"]:
            choice = "bf16"
        if "int8" in t and t["int8"] < 0.6 * t[choice]:  # worth its coarser first pass
            choice = "int8"
        log.info("scan mode %s (rows x 512 @ 512x128 per 1k rows: %s)", choice,
                 ", ".join(f"{k} {v * 1e6:.2f} ms" for k, v in t.items()))
    _SCAN_MODE.append(choice)
    return choice


def scan_compute_dtype() -> Any:
    """The float dtype of float scans: ``torch.bfloat16`` in ``"bf16"`` mode, else float32."""
    import torch

    return torch.bfloat16 if scan_mode() == "bf16" else torch.float32


class BF16Scorer:
    """A trained MLP (``Linear``/``L2NormLinear`` → ReLU → … → ``Linear(·, 1)``) evaluated on
    the split cache's L2-normalised bfloat16 rows, computing in :func:`scan_compute_dtype`
    (bfloat16 ``addmm`` with float32 accumulation where the CPU has native bfloat16, else the
    rows widened to float32); the sigmoid in float32.

    Accuracy: |P_approx − P_fp32| is typically ~1e-3 (8-bit mantissas of the rows, and of the
    activations in bfloat16); callers that need the float32 answer re-score a shortlist
    exactly (:func:`select_margin_exact`, :class:`SplitScores`), with the error bound
    measured, not assumed.
    """

    def __init__(self, module: Any, dtype: Any = None) -> None:
        from torch import nn

        from agile_pipeline.lib.training import L2NormLinear

        layers = [m for m in module if not isinstance(m, nn.Dropout)]
        if not layers or not isinstance(layers[0], nn.Linear):
            raise TypeError("expected a Sequential starting with a Linear layer")
        for m in layers:
            if not isinstance(m, nn.Linear | nn.ReLU):
                raise TypeError(f"unsupported layer {type(m).__name__}")
        self.l2 = isinstance(layers[0], L2NormLinear)
        self.dtype = dtype if dtype is not None else scan_compute_dtype()
        self.ops: list[tuple[str, Any, Any]] = []
        for m in layers:
            if isinstance(m, nn.ReLU):
                self.ops.append(("relu", None, None))
            else:
                self.ops.append(("linear", m.weight.detach().to(self.dtype).t().contiguous(),
                                 m.bias.detach().to(self.dtype).clone()))

    def __call__(self, x_unit: Any, norms: Any) -> Any:
        """P(positive) for L2-normalised bfloat16 rows ``x_unit`` with original ``norms``."""
        import torch

        h = x_unit if x_unit.dtype == self.dtype else x_unit.to(self.dtype)
        first = True
        for kind, w, b in self.ops:
            if kind == "relu":
                h = torch.relu_(h)
                continue
            if first and not self.l2:  # a plain first layer sees the raw row: |x| (W x̂) + b
                h = torch.mm(h, w).mul_(norms.to(self.dtype).unsqueeze(1)).add_(b)
            else:
                h = torch.addmm(b, h, w)
            first = False
        return h.squeeze(1).float().sigmoid_()


@dataclass
class FloatPlan:
    """The bfloat16/float32 scan of one model over one split (picklable, for Ray tasks)."""

    module: Any
    bf16_path: str
    norms: np.ndarray

    def score(self, start: int = 0, stop: int | None = None, *, chunk: int = 1 << 14,
              threads: int | None = None) -> np.ndarray:
        """Approximate P(positive) of rows ``[start, stop)``."""
        import torch

        from agile_pipeline.lib.encoders import torch_threads

        n = _npy_header(Path(self.bf16_path))[1][0]
        stop = n if stop is None else min(stop, n)
        out = np.empty(max(0, stop - start), np.float32)
        if stop <= start:
            return out
        scorer = BF16Scorer(self.module)
        with torch_threads(threads), torch.inference_mode():
            norms = torch.from_numpy(np.ascontiguousarray(self.norms, np.float32))
            for at, rows in iter_npy_rows(Path(self.bf16_path), chunk, start=start, stop=stop):
                x = torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16)
                p = scorer(x, norms[at : at + rows.shape[0]])
                out[at - start : at - start + rows.shape[0]] = p.numpy()
        return out


def scan_plan(model: Any, cache: SplitCache, mode: str | None = None) -> Any:
    """How to scan ``cache`` with ``model``: an :class:`~agile_pipeline.lib.int8_scan.Int8Plan`
    in ``"int8"`` mode where the model allows it (:func:`int8_scan.applicable`), else a
    :class:`FloatPlan`. Both have ``score(start, stop, *, chunk, threads)``."""
    from agile_pipeline.lib import int8_scan

    mode = mode or scan_mode()
    if mode == "int8" and int8_scan.applicable(model.module, cache.norms):
        return int8_scan.plan_for(model.module, cache.bf16_path)
    return FloatPlan(model.module, str(cache.bf16_path), np.asarray(cache.norms, np.float32))


def score_approx(model: Any, cache: SplitCache, *, chunk: int = 1 << 14,
                 threads: int | None = None, mode: str | None = None) -> np.ndarray:
    """Approximate P(positive) for every row of a split, float32: one streamed scan in
    :func:`scan_mode` (bfloat16, int8 or float32 over the bfloat16 rows); on Ray when
    ``AGILE_RAY_ADDRESS`` is set (the same scan as tasks over row ranges)."""
    from agile_pipeline.lib import distributed

    plan = scan_plan(model, cache, mode)
    if distributed.enabled():
        return distributed.score_plan_ray(plan, len(cache))
    return plan.score(0, len(cache), chunk=chunk, threads=threads)


def exact_scores(model: Any, cache: SplitCache, rows: np.ndarray) -> np.ndarray:
    """Float32 P(positive) of the given rows from the float16 matrix — what
    :meth:`TrainedClassifier.predict_proba` gives for them on ``VectorStore.matrix``."""
    rows = np.asarray(rows, np.int64)
    if rows.size == 0:
        return np.empty(0, np.float32)
    return np.asarray(model.predict_proba(cache.rows_f32(rows)), np.float32)


@dataclass
class Selection:
    rows: np.ndarray  # int64 rows of the split, in selection order
    scores: np.ndarray  # float32 exact P(positive) of those rows
    n_eligible: int
    info: dict[str, Any] = field(default_factory=dict)


def _error_bound(model: Any, cache: SplitCache, approx: np.ndarray, short: np.ndarray,
                 exact_short: np.ndarray, rng_seed: int = 0, sample: int = 2048) -> float:
    """Safe bound on |approx − exact| over the split: 2x the worst error seen on the
    shortlist (the uncertain rows, where the sigmoid is steepest) and a random sample."""
    rng = np.random.default_rng(rng_seed)
    probe = rng.choice(len(cache), size=min(sample, len(cache)), replace=False)
    probe.sort()
    err = float(np.max(np.abs(exact_scores(model, cache, probe) - approx[probe]), initial=0.0))
    err = max(err, float(np.max(np.abs(exact_short - approx[short]), initial=0.0)))
    return 2.0 * err + 1e-6


def select_margin_exact(
    model: Any,
    cache: SplitCache,
    k: int,
    *,
    eligible: np.ndarray | None = None,
    strategy: str = "margin",
    approx: np.ndarray | None = None,
    shortlist: int | None = None,
) -> Selection:
    """The rows :func:`select_margin` (or ``select_margin_positive``) picks from the float32
    scores of the whole split, computed from an approximate scan (:func:`score_approx`) plus an
    exact re-score.

    Every row is scored approximately; the ``shortlist`` rows with the smallest approximate
    margin (and, for margin + positive mining, the highest approximate scores) are re-scored in
    float32 and the selection runs on those. The shortlist provably holds the float32 answer
    when every row outside it is, even with the largest scan error seen (doubled), worse
    than the last row picked; otherwise it grows (``info['shortlist']``,
    ``info['shortlist_proven']``).
    """
    from agile_pipeline.lib.selection import margin, select_margin, select_margin_positive

    t0 = time.perf_counter()
    n = len(cache)
    first_size = max(50 * k, 5000)
    if approx is None:
        approx = score_approx(model, cache)
        if scan_mode() == "int8":  # ~10x bfloat16's error: start where the proof usually holds
            first_size *= 4
    t_scan = time.perf_counter() - t0
    if eligible is not None and eligible.shape != (n,):
        raise ValueError(f"eligible must have shape ({n},)")
    n_eligible = n if eligible is None else int(eligible.sum())
    k = min(k, n_eligible)
    if k <= 0:
        return Selection(np.empty(0, np.int64), np.empty(0, np.float32), n_eligible,
                         {"scan_seconds": t_scan})
    m_approx = margin(approx)
    s_neg = -approx
    if eligible is not None:
        m_approx = np.where(eligible, m_approx, np.inf)
        s_neg = np.where(eligible, s_neg, np.inf)
    size = min(n_eligible, shortlist or first_size)
    proven = False
    while True:
        parts = [np.argpartition(m_approx, size - 1)[:size] if size < n else np.arange(n)]
        if strategy == "margin-positive":
            parts.append(np.argpartition(s_neg, size - 1)[:size] if size < n else np.arange(n))
        short = np.unique(np.concatenate(parts))
        if eligible is not None:
            short = short[eligible[short]]
        exact = exact_scores(model, cache, short)
        if strategy == "margin":
            pick = select_margin(exact, k)
        elif strategy == "margin-positive":
            pick = select_margin_positive(exact, k)
        else:
            raise ValueError(f"unknown strategy {strategy!r}")
        if size >= n_eligible:
            proven = True
            break
        bound = _error_bound(model, cache, approx, short, exact)
        outside = np.ones(n, np.bool_) if eligible is None else eligible.copy()
        outside[short] = False
        ok = True
        if outside.any():
            # margins: every outside row's exact margin >= its approx margin - 2*bound/…;
            # |margin_exact - margin_approx| <= 2 * |p_exact - p_approx| <= 2 * bound
            worst_picked_margin = float(np.max(margin(exact[pick]))) if strategy == "margin" else \
                float(np.max(margin(exact[pick[_n_top(k):]]), initial=-np.inf))
            best_outside = float(np.min(m_approx[outside]))
            ok = best_outside - 2 * bound > worst_picked_margin
            if strategy == "margin-positive" and ok and _n_top(k):
                lowest_top = float(np.min(exact[pick[: _n_top(k)]]))
                ok = float(np.max(approx[outside])) + bound < lowest_top
        if ok:
            proven = True
            break
        if size >= n_eligible:
            break
        size = min(n_eligible, size * 4)
    rows = short[pick]
    return Selection(rows, exact[pick], n_eligible, {
        "scan_seconds": round(t_scan, 4), "shortlist": int(short.size), "shortlist_proven": proven,
        "seconds": round(time.perf_counter() - t0, 4),
    })


def _n_top(k: int) -> int:
    from agile_pipeline.lib.selection import _n_positive

    return _n_positive(k, 0.5)


# ---- evaluation: test-split scores, eval-set hash order ------------------------------------
@dataclass
class SplitScores:
    """One model's P(positive) for every row of a split: float32-exact where ``exact``, else a
    bfloat16 value within ``bound`` of the float32 one. ``refine(rows)`` computes exact values;
    :func:`stratified_eval_set_cached` calls it only for the few rows whose stratum could
    change which images the eval set picks."""

    values: np.ndarray
    exact: np.ndarray
    bound: float
    refine: Any = None  # Callable[[np.ndarray], np.ndarray] | None
    dirty: bool = False  # refined since loaded (worth writing back)

    def resolve(self, rows: np.ndarray) -> None:
        rows = np.unique(np.asarray(rows, np.int64))
        rows = rows[~self.exact[rows]]
        if rows.size == 0:
            return
        if self.refine is None:
            raise ValueError("these scores cannot be refined (no model attached)")
        new = np.asarray(self.refine(rows), np.float32)
        worst = float(np.max(np.abs(new - self.values[rows])))
        if worst > self.bound:  # the bound was too optimistic: widen it and say so
            log.warning("scan error %.2g above its bound %.2g; widening", worst, self.bound)
            self.bound = 2 * worst
        self.values[rows] = new
        self.exact[rows] = True
        self.dirty = True


def float_scan_mode() -> str:
    """The scan mode for eval-set scores: :func:`scan_mode` unless that is ``"int8"``, then
    ``"fp32"``. Eval-set strata need every score within a few 1e-3 (int8's ~1e-2 would send a
    third of a split to exact re-scoring, costing more than it saves), and this scan runs after
    the next batch is already on screen."""
    mode = scan_mode()
    return "fp32" if mode == "int8" else mode


def approx_split_scores(model: Any, cache: SplitCache, *, sample_per_band: int = 128,
                        bands: int = 20, mode: str | None = None) -> SplitScores:
    """Approximate scores of a whole split (:func:`float_scan_mode` unless ``mode``) and a
    bound on their error: 3x the largest error over a probe of up to ``sample_per_band`` rows
    from each of ``bands`` equal-width score bands (so every part of the sigmoid is measured,
    not just where most rows sit); probed rows are stored exact."""
    approx = score_approx(model, cache, mode=mode or float_scan_mode())
    exact = np.zeros(len(cache), np.bool_)
    rng = np.random.default_rng(0)
    band = np.minimum((approx * bands).astype(np.int64), bands - 1)
    probe_parts = []
    for bnd in range(bands):
        rows = np.flatnonzero(band == bnd)
        if rows.size:
            probe_parts.append(rng.choice(rows, size=min(sample_per_band, rows.size), replace=False))
    probe = np.sort(np.concatenate(probe_parts)) if probe_parts else np.empty(0, np.int64)
    ex = exact_scores(model, cache, probe)
    err = float(np.max(np.abs(ex - approx[probe]), initial=0.0))
    approx[probe] = ex
    exact[probe] = True
    return SplitScores(approx, exact, 3.0 * err + 1e-6,
                       refine=lambda rows: exact_scores(model, cache, rows))


def model_split_scores(model: Any, model_dir: Path, cache: SplitCache) -> SplitScores:
    """:func:`approx_split_scores` of a saved model on a split, cached in the model's directory
    per table version (a round's model never changes; a forced retrain replaces the whole
    directory, cache included). Rows refined later are written back by :func:`save_split_scores`."""
    path = Path(model_dir) / f"scores-{cache.tag}.npz"
    refine = lambda rows: exact_scores(model, cache, rows)  # noqa: E731
    if path.exists():
        with np.load(path) as z:
            if z["values"].shape == (len(cache),):
                return SplitScores(z["values"].copy(), z["exact"].copy(), float(z["bound"]), refine)
    sc = approx_split_scores(model, cache)
    sc.dirty = True
    save_split_scores(sc, model_dir, cache)
    return sc


def save_split_scores(sc: SplitScores, model_dir: Path, cache: SplitCache) -> None:
    if not sc.dirty:
        return
    path = Path(model_dir) / f"scores-{cache.tag}.npz"
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
    np.savez(tmp, values=sc.values, exact=sc.exact, bound=np.float64(sc.bound))
    tmp.replace(path)
    sc.dirty = False


def _key_tag(key: bytes) -> str:
    import hashlib

    return hashlib.blake2b(key, digest_size=6).hexdigest()


def eval_hash_order(cache: SplitCache, key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """``(hashes, order)`` of a split's ids for the eval set: keyed SipHash-2-4 of every id
    and the permutation sorting rows by (hash, id) — cached per table version."""
    from agile_pipeline.lib.evalset import _hash_order

    hp, op = cache.cached(f"evalhash-{_key_tag(key)}"), cache.cached(f"evalorder-{_key_tag(key)}")
    if hp.exists() and op.exists():
        return np.load(hp, mmap_mode="r"), np.load(op, mmap_mode="r")
    hashes = siphash64_array(cache.keys, key)
    order = _hash_order(cache.str_keys(), hashes).astype(np.int64)
    for path, arr in ((hp, hashes), (op, order)):
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, arr)
        tmp.replace(path)
    return hashes, order


def _strata_sorted(scores: np.ndarray | SplitScores, order: np.ndarray, n_strata: int,
                   per_stratum: int) -> np.ndarray:
    """Stratum of every row in hash order. For :class:`SplitScores`, first makes exact every
    approximate row that could change a pick: a row whose value ± bound straddles a stratum
    boundary and that comes, in hash order, before the ``per_stratum``-th row certainly in a
    stratum it may belong to."""
    from agile_pipeline.lib.evalset import stratum_of

    if not isinstance(scores, SplitScores):
        return stratum_of(np.asarray(scores), n_strata)[order]
    sc = scores
    for _ in range(64):
        slack = np.where(sc.exact, np.float32(0), np.float32(sc.bound))
        lo = stratum_of(np.clip(sc.values - slack, 0, 1), n_strata)[order]
        hi = stratum_of(np.clip(sc.values + slack, 0, 1), n_strata)[order]
        need: list[np.ndarray] = []
        for s in range(n_strata):
            cand = np.flatnonzero((lo <= s) & (hi >= s))
            sure = (lo[cand] == s) & (hi[cand] == s)
            upto = cand.size
            if per_stratum == 0:
                upto = 0
            elif sure.sum() >= per_stratum:
                upto = int(np.searchsorted(np.cumsum(sure), per_stratum)) + 1
            window = cand[:upto]
            need.append(np.asarray(order[window[~sure[:upto]]]))
        rows = np.concatenate(need) if need else np.empty(0, np.int64)
        if rows.size == 0:
            return stratum_of(sc.values, n_strata)[order]
        sc.resolve(rows)
    raise RuntimeError("eval-set strata did not settle")


def stratified_eval_set_cached(cache: SplitCache, model_scores: Mapping[str, np.ndarray | SplitScores], *,
                               key: bytes, per_stratum: int = 20, n_strata: int = 10) -> Any:
    """:func:`agile_pipeline.lib.evalset.stratified_eval_set` over a whole split (keys = the
    split's ids), with the hash order from :func:`eval_hash_order`.

    Scores may be exact arrays or :class:`SplitScores`; with the latter, the picked images
    (``keys``, ``picked_by``, ``counts``, ``hashes``) are those of the float32 scores, while
    ``stratum_sizes`` count the few still-approximate rows within ``bound`` of a boundary by
    their bfloat16 value.
    """
    from agile_pipeline.lib.evalset import EvalSet, pick_per_stratum

    if per_stratum < 0:
        raise ValueError("per_stratum must be >= 0")
    hashes, order = eval_hash_order(cache, key)
    n = len(cache)
    strata_sorted: dict[str, np.ndarray] = {}
    for name, scores in model_scores.items():
        shape = scores.values.shape if isinstance(scores, SplitScores) else np.shape(scores)
        if shape != (n,):
            raise ValueError(f"scores of {name!r} have shape {shape}, expected ({n},)")
        strata_sorted[name] = _strata_sorted(scores, order, n_strata, per_stratum)
    rows, picked_by, counts, sizes = pick_per_stratum(
        order, strata_sorted, per_stratum=per_stratum, n_strata=n_strata)
    keys = cache.id_at(np.asarray(rows, np.int64)) if rows else []
    return EvalSet(
        keys=keys,
        picked_by={k: picked_by[r] for k, r in zip(keys, rows, strict=True)},
        counts=counts,
        stratum_sizes=sizes,
        per_stratum=per_stratum,
        n_strata=n_strata,
        hashes={k: int(hashes[r]) for k, r in zip(keys, rows, strict=True)},
    )


# ---- zero-shot on the split caches ---------------------------------------------------------
def matvec_f16(cache: SplitCache, v: np.ndarray, *, chunk: int = 1 << 17) -> np.ndarray:
    """``float32(rows) @ v`` over a split's float16 matrix, streamed (as ``loop._matvec``)."""
    v = np.asarray(v, np.float32)
    out = np.empty(len(cache), np.float32)
    for start, rows in iter_npy_rows(cache.f16_path, chunk):
        out[start : start + rows.shape[0]] = rows.astype(np.float32) @ v
    return out


def merge_top_columns(best_s: list[np.ndarray], best_r: list[np.ndarray], sims: np.ndarray,
                      start: int, keep: int) -> None:
    """Fold one chunk of scores (rows from ``start``, one column per query) into each query's
    running ``keep`` best (scores, rows), in place; a partial sort per column, never a full one."""
    for j in range(sims.shape[1]):
        col = sims[:, j]
        top = np.argpartition(-col, keep - 1)[:keep] if col.size > keep else np.arange(col.size)
        cs = np.concatenate([best_s[j], col[top]])
        cr = np.concatenate([best_r[j], top + start])
        if cs.size > keep:
            sel = np.argpartition(-cs, keep - 1)[:keep]
            cs, cr = cs[sel], cr[sel]
        best_s[j], best_r[j] = cs, cr


EXACT_SEARCH_MAX_ROWS = 2_000_000  # above this, a per-phrase scan costs seconds: LanceDB's search


def nearest_in_split(cache: SplitCache, queries: np.ndarray, k: int, *,
                     chunk: int = 1 << 17) -> list[list[tuple[str, float]]]:
    """The ``k`` rows nearest to each query by cosine, in one streamed pass over the split's
    float16 matrix (float32 arithmetic): ``[[(id, cosine), ...] best first, ...]`` per query.

    The split cache is already in memory in a warm process, so this avoids opening and
    scanning the LanceDB table once per phrase (the first images of a concept wait on it).
    """
    q = np.asarray(queries, np.float32).reshape(-1, cache.dim)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    k = max(0, min(int(k), len(cache)))
    best_s = [np.empty(0, np.float32) for _ in q]
    best_r = [np.empty(0, np.int64) for _ in q]
    if k == 0 or len(q) == 0:
        return [[] for _ in q]
    for start, rows in iter_npy_rows(cache.f16_path, chunk):
        norms = np.maximum(cache.norms[start : start + rows.shape[0]], 1e-12)
        merge_top_columns(best_s, best_r, (rows.astype(np.float32) @ q.T) / norms[:, None], start, k)
    out = []
    for j in range(q.shape[0]):
        o = np.lexsort((best_r[j], -best_s[j]))  # best first; ties by row, deterministic
        ids = cache.id_at(best_r[j][o])
        out.append(list(zip(ids, (float(x) for x in best_s[j][o]), strict=True)))
    return out


def zero_shot_unit_split(concept_dir: Path, text: np.ndarray, train: SplitCache,
                         test: SplitCache) -> np.ndarray:
    """Zero-shot scores of every ``test`` row mapped into [0, 1] with the calibration from the
    concept's train-split cosines (as ``evaluation.zero_shot_unit_scores``); cached per text
    vector and table version in the concept directory."""
    import hashlib

    from agile_pipeline.lib.evalset import zero_shot_calibration, zero_shot_to_unit

    text = np.asarray(text, np.float32)
    tag = hashlib.blake2b(text.tobytes(), digest_size=6).hexdigest()
    path = Path(concept_dir) / f"zero_shot_unit-{test.tag}-{train.version}-{tag}.npy"
    if path.exists():
        return np.load(path)
    train_cos = matvec_f16(train, text)
    if train_cos.size >= 2:
        center, temp = zero_shot_calibration(train_cos)
    else:
        center, temp = zero_shot_calibration(matvec_f16(test, text))
    unit = zero_shot_to_unit(matvec_f16(test, text), center=center, temperature=temp)
    for old in Path(concept_dir).glob("zero_shot_unit-*.npy"):
        old.unlink(missing_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, unit)
    tmp.replace(path)
    return unit


# ---- loop glue: what loop.py / evaluation.py call -----------------------------------------
def has_cache(vectors: Any) -> bool:
    """Whether the fast path applies (a :class:`VectorStore` with a cache directory)."""
    return getattr(vectors, "cache_dir", None) is not None


def training_inputs(vectors: Any, model_id: str, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(X_pool, X_labeled, exclude)`` for :func:`train_classifier`: the train split's float16
    matrix, the labeled rows as float32 (train split first, then test, then any split), and
    the train rows of the labeled ids — the values ``matrix``/``vectors_for``/``index_of`` give,
    without building a dict of the split."""
    if not has_cache(vectors):
        train_m = vectors.matrix(model_id, "train")
        index = train_m.index_of()
        X_lab = vectors.vectors_for(model_id, ids)
        return train_m.vectors, X_lab, np.array([index[i] for i in ids if i in index], np.int64)
    train = split_cache(vectors, model_id, "train")
    pos = train.positions(ids)
    X_lab = np.empty((len(ids), train.dim), np.float32)
    inside = pos >= 0
    X_lab[inside] = train.rows_f32(pos[inside])
    if not inside.all():
        rest = np.flatnonzero(~inside)
        test = split_cache(vectors, model_id, "test")
        tpos = test.positions([ids[i] for i in rest])
        found = tpos >= 0
        X_lab[rest[found]] = test.rows_f32(tpos[found])
        if not found.all():
            X_lab[rest[~found]] = vectors.vectors_for(model_id, [ids[i] for i in rest[~found]])
    return train.f16, X_lab, pos[inside]


@dataclass
class RoundSelection:
    ids: list[str]
    scores: list[float]
    n_scored: int
    n_eligible: int
    info: dict[str, Any] = field(default_factory=dict)


def select_for_round(vectors: Any, model_id: str, model: Any, labeled: set[str] | Sequence[str],
                     k: int, strategy: str) -> RoundSelection:
    """The next AL batch over the train split: the same rows as ``select_margin`` /
    ``select_margin_positive`` on ``predict_proba`` of the whole split with labeled images
    ineligible (see :func:`select_margin_exact`)."""
    from agile_pipeline.lib.selection import select_margin, select_margin_positive

    if not has_cache(vectors):
        m = vectors.matrix(model_id, "train")
        scores = model.predict_proba(m.vectors)
        labeled = labeled if isinstance(labeled, set) else set(labeled)  # the committed path
        eligible = np.fromiter((i not in labeled for i in m.ids), dtype=bool, count=len(m.ids))
        pick = (select_margin if strategy == "margin" else select_margin_positive)(
            scores, k, eligible=eligible)
        return RoundSelection([str(m.ids[i]) for i in pick], [float(scores[i]) for i in pick],
                              len(scores), int(eligible.sum()))
    train = split_cache(vectors, model_id, "train")
    eligible = ~train.mask(list(labeled))
    sel = select_margin_exact(model, train, k, eligible=eligible, strategy=strategy)
    return RoundSelection(train.id_at(sel.rows), [float(s) for s in sel.scores], len(train),
                          sel.n_eligible, sel.info)


def _zero_shot_text(env: Any, concept: str) -> np.ndarray | None:
    path = env.concept_dir(concept) / "zero_shot.npz"
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as z:
        return np.asarray(z["text"], np.float32) if "text" in z.files else None


def test_split_scores(env: Any, concept: str, *, n_strata: int = 10) -> tuple[SplitCache, dict[str, Any]]:
    """The test split and every model's scores on it for the eval set (zero-shot first, exact;
    then one :class:`SplitScores` per round, each computed once per table version).
    ``n_strata`` is accepted for compatibility (the scores do not depend on it)."""
    del n_strata
    from agile_pipeline.lib.evaluation import ZERO_SHOT
    from agile_pipeline.lib.loop import LoopError
    from agile_pipeline.lib.training import TrainedClassifier

    test = split_cache(env.vectors, env.model_id, "test")
    train = split_cache(env.vectors, env.model_id, "train")
    text = _zero_shot_text(env, concept)
    if text is None:
        raise LoopError(
            f"no zero-shot scores for {concept!r} yet: run the concept's start job "
            f"(`agile concept expand {concept!r}`) first"
        )
    scores: dict[str, Any] = {
        ZERO_SHOT: zero_shot_unit_split(env.concept_dir(concept), text, train, test)}
    for r in env.store.rounds(concept):
        model_dir = Path(r["model_uri"])
        scores[f"round-{r['round']}"] = model_split_scores(
            _LazyModel(model_dir, TrainedClassifier.load), model_dir, test)
    return test, scores


class _LazyModel:
    """A saved classifier loaded on first use (cached scores usually need no model)."""

    def __init__(self, model_dir: Path, load: Any) -> None:
        self._dir, self._load, self._model = model_dir, load, None

    def __getattr__(self, name: str) -> Any:
        if self._model is None:
            self._model = self._load(self._dir)
        return getattr(self._model, name)


def eval_set_for(env: Any, concept: str, *, key: bytes, per_stratum: int, n_strata: int) -> tuple[Any, dict[str, Any]]:
    """The concept's eval set over the whole test split (what ``build_eval_set`` needs)."""
    test, scores = test_split_scores(env, concept)
    es = stratified_eval_set_cached(test, scores, key=key, per_stratum=per_stratum, n_strata=n_strata)
    for r in env.store.rounds(concept):
        sc = scores.get(f"round-{r['round']}")
        if isinstance(sc, SplitScores):
            save_split_scores(sc, Path(r["model_uri"]), test)
    return es, scores


def rated_test_scores(env: Any, concept: str, ids: Sequence[str]) -> tuple[list[str], dict[str, np.ndarray]]:
    """``(rated, scores)``: the given ids that are in the test split, and every model's
    float32 score of just those rows (zero-shot first) — no scan of the split."""
    from agile_pipeline.lib.evaluation import ZERO_SHOT
    from agile_pipeline.lib.loop import LoopError
    from agile_pipeline.lib.training import TrainedClassifier

    test = split_cache(env.vectors, env.model_id, "test")
    train = split_cache(env.vectors, env.model_id, "train")
    pos = test.positions(list(ids))
    rated = [i for i, p in zip(ids, pos.tolist(), strict=True) if p >= 0]
    rows = pos[pos >= 0]
    text = _zero_shot_text(env, concept)
    if text is None:
        raise LoopError(
            f"no zero-shot scores for {concept!r} yet: run the concept's start job "
            f"(`agile concept expand {concept!r}`) first"
        )
    scores = {ZERO_SHOT: zero_shot_unit_split(env.concept_dir(concept), text, train, test)[rows]}
    for r in env.store.rounds(concept):
        model = TrainedClassifier.load(Path(r["model_uri"]))
        scores[f"round-{r['round']}"] = exact_scores(model, test, rows)
    return rated, scores
