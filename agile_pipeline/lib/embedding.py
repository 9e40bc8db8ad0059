"""Streaming image embedding: decode in worker threads, infer in the calling thread.

Decoding and resizing happen in a small thread pool (PIL releases the GIL for both), while
the calling thread runs the network on the previous batch. At most ``workers + 1`` batches
are decoded ahead of inference, so memory stays bounded however long the input stream is.
An image that fails to load or preprocess never stops the stream: it comes back in
:attr:`EmbeddedBatch.failed` with the reason.

    run = EmbeddingRun(items, load=open_image, encoder=load_encoder("bundled"))
    for batch in run.batches():
        table.add(batch.ids, batch.vectors)
    log.info("%.1f images/s", run.stats.images_per_second)
"""

import collections
import itertools
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from agile_pipeline.lib.encoders import ImageTextEncoder

logger = logging.getLogger(__name__)


@dataclass
class EmbeddedBatch:
    """One batch of results, in input order: ``vectors[i]`` belongs to ``ids[i]``."""

    ids: list[str]
    vectors: np.ndarray  # float32, (len(ids), dim), unit rows
    failed: list[tuple[str, str]] = field(default_factory=list)  # (image_id, reason)


@dataclass
class EmbedStats:
    """Counters for one run, complete once the batch iterator is exhausted."""

    n_ok: int = 0
    n_failed: int = 0
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        """Successfully embedded images per wall-clock second (0 before anything ran)."""
        return self.n_ok / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Prepared:
    ids: list[str]
    batch: np.ndarray | None
    failed: list[tuple[str, str]]


def _failure_reason(exc: BaseException) -> str:
    text = str(exc).strip() or repr(exc)
    return f"{type(exc).__name__}: {text}"[:500]


def _prepare(
    chunk: list[tuple[str, Any]],
    load: Callable[[Any], Image.Image],
    encoder: ImageTextEncoder,
) -> _Prepared:
    """Load + preprocess one chunk (runs in a worker thread)."""
    ids: list[str] = []
    arrays: list[np.ndarray] = []
    failed: list[tuple[str, str]] = []
    for image_id, source in chunk:
        try:
            image = load(source)
            arrays.append(encoder.preprocess(image))
        except Exception as exc:  # one bad image must not stop the stream
            failed.append((image_id, _failure_reason(exc)))
            continue
        ids.append(image_id)
    return _Prepared(ids, np.stack(arrays) if arrays else None, failed)


class EmbeddingRun:
    """Embeds a stream of ``(image_id, source)`` pairs; see the module docstring.

    Args:
        items: ``(image_id, source)`` pairs; consumed lazily, once.
        load: ``source -> PIL image``; may raise (the image is then reported as failed).
        encoder: the :class:`ImageTextEncoder` to run.
        batch_size: images per inference call.
        workers: decode/preprocess threads; ``0`` runs everything in the calling thread.
        progress: show a tqdm bar on stderr.
        log: where the closing throughput line goes (default: this module's logger).
        total: number of items, for the progress bar (taken from ``len(items)`` if possible).
        torch_threads: torch intra-op threads (default: the usable CPU cores). Only applied
            when torch is already imported, i.e. for torch-based encoders.
    """

    def __init__(
        self,
        items: Iterable[tuple[str, Any]],
        load: Callable[[Any], Image.Image],
        encoder: ImageTextEncoder,
        *,
        batch_size: int = 64,
        workers: int = 2,
        progress: bool = True,
        log: logging.Logger | None = None,
        total: int | None = None,
        torch_threads: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.items = items
        self.load = load
        self.encoder = encoder
        self.batch_size = batch_size
        self.workers = workers
        self.progress = progress
        self.log = log or logger
        self.total = total if total is not None else _maybe_len(items)
        self.torch_threads = torch_threads
        self.stats = EmbedStats()
        self._started = False

    def __iter__(self) -> Iterator[EmbeddedBatch]:
        return self.batches()

    def batches(self) -> Iterator[EmbeddedBatch]:
        """Yield :class:`EmbeddedBatch` results in input order; ``stats`` is final at the end."""
        if self._started:
            raise RuntimeError("an EmbeddingRun can be iterated only once")
        self._started = True
        if "torch" in sys.modules:
            from agile_pipeline.lib.torch_runtime import configure_torch_threads

            configure_torch_threads(self.torch_threads)
        bar = tqdm(
            total=self.total,
            unit="img",
            desc=f"embed {self.encoder.model_id}",
            file=sys.stderr,
            disable=not self.progress,
            dynamic_ncols=True,
        )
        start = time.perf_counter()
        prepared_batches = self._prepared_batches()
        try:
            for prepared in prepared_batches:
                if prepared.batch is not None:
                    vectors = np.asarray(
                        self.encoder.embed_preprocessed(prepared.batch), dtype=np.float32
                    )
                else:
                    vectors = np.zeros((0, self.encoder.dim), dtype=np.float32)
                self.stats.n_ok += len(prepared.ids)
                self.stats.n_failed += len(prepared.failed)
                self.stats.seconds = time.perf_counter() - start
                bar.update(len(prepared.ids) + len(prepared.failed))
                for image_id, reason in prepared.failed:
                    self.log.debug("could not embed %s: %s", image_id, reason)
                yield EmbeddedBatch(prepared.ids, vectors, prepared.failed)
        finally:
            prepared_batches.close()  # stops the decode pool if the consumer stopped early
            bar.close()
            self.stats.seconds = time.perf_counter() - start
            self.log.log(
                logging.WARNING if self.stats.n_failed else logging.INFO,
                "embedded %d images (%d failed) with %s in %.1f s: %.1f images/s",
                self.stats.n_ok,
                self.stats.n_failed,
                self.encoder.model_id,
                self.stats.seconds,
                self.stats.images_per_second,
            )

    def _chunks(self) -> Iterator[list[tuple[str, Any]]]:
        it = iter(self.items)
        while chunk := list(itertools.islice(it, self.batch_size)):
            yield chunk

    def _prepared_batches(self) -> Iterator[_Prepared]:
        if self.workers == 0:
            for chunk in self._chunks():
                yield _prepare(chunk, self.load, self.encoder)
            return
        max_ahead = self.workers + 1
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="embed-decode")
        pending: collections.deque[Future[_Prepared]] = collections.deque()
        try:
            chunks = self._chunks()
            for chunk in itertools.islice(chunks, max_ahead):
                pending.append(pool.submit(_prepare, chunk, self.load, self.encoder))
            while pending:
                prepared = pending.popleft().result()
                # refill before the caller runs inference, so decoding overlaps with it
                for chunk in itertools.islice(chunks, 1):
                    pending.append(pool.submit(_prepare, chunk, self.load, self.encoder))
                yield prepared
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _maybe_len(items: Iterable[Any]) -> int | None:
    return len(items) if isinstance(items, Sized) else None


def sequential_embed(
    items: Iterable[tuple[str, Any]],
    load: Callable[[Any], Image.Image],
    encoder: ImageTextEncoder,
    *,
    batch_size: int = 64,
) -> tuple[list[str], np.ndarray, EmbedStats]:
    """Baseline without overlap: decode a batch, then infer it, in one thread (for benchmarks)."""
    stats = EmbedStats()
    ids: list[str] = []
    out: list[np.ndarray] = []
    start = time.perf_counter()
    it = iter(items)
    while chunk := list(itertools.islice(it, batch_size)):
        prepared = _prepare(chunk, load, encoder)
        stats.n_failed += len(prepared.failed)
        if prepared.batch is not None:
            out.append(encoder.embed_preprocessed(prepared.batch))
            ids.extend(prepared.ids)
    stats.n_ok = len(ids)
    stats.seconds = time.perf_counter() - start
    vectors = np.concatenate(out) if out else np.zeros((0, encoder.dim), dtype=np.float32)
    return ids, vectors, stats
