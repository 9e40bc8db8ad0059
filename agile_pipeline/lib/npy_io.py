"""Streaming ``.npy`` I/O for arrays bigger than memory: read a file's header, write a C-order
array chunk by chunk, and read row ranges through a prefetching reader thread.

The split caches, the int8 copies and every whole-split scan read and write through these, so
a scan of a 10 GB matrix keeps the process at a few chunks of memory.
"""

import os
import queue
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def npy_header(path: Path) -> tuple[np.dtype, tuple[int, ...], int]:
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


class NpyWriter:
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


def iter_npy_rows(path: Path, chunk: int, *, prefetch: int = 2, start: int = 0,
                  stop: int | None = None,
                  buffers: Sequence[np.ndarray] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, rows)`` over rows ``[start, stop)`` of a 2-D ``.npy`` in chunks of
    ``chunk`` rows.

    Chunks are read with ``preadv`` into a few reusable buffers by a reader thread that stays
    ``prefetch`` chunks ahead (so disk reads overlap the caller's compute), never through a
    memory map: a scan of a 10 GB file keeps RSS at a few chunks, while the OS page cache still
    keeps the file hot between rounds. A yielded array is reused once the caller asks for the
    next chunk. ``buffers`` (at least two C-contiguous arrays of ``chunk`` rows, the file's
    dtype and width) replaces the reader's own, e.g. views of preallocated quantized tensors.
    """
    dtype, shape, offset = npy_header(path)
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
