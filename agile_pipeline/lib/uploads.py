"""Exemplar images a user uploads (app or CLI): validated, stored, embedded on the fly.

An uploaded file becomes an exemplar exactly like a corpus image marked with ★: it is stored
with the concept, counts as the uploader's label, and drives expansion as a query. Steps:

1. the bytes are checked by the same safe decoder every corpus image goes through
   (:mod:`agile_pipeline.lib.images`: size cap, decompression-bomb limit, format allowlist,
   full decode), so a hostile file is refused with a reason and never crashes anything;
2. the id is the corpus's content hash (:func:`agile_pipeline.lib.corpus.image_id_for`): if the
   content already is a corpus image, that image is used as is and nothing else is stored;
3. otherwise the file is kept under the data directory's ``blobs/`` (content addressed, like
   downloaded corpus images) and embedded with the configured encoder;
4. its vector goes into the model's *uploads* LanceDB table (``uploads__<model>``, next to the
   corpus table, so an upload never changes the corpus table's version and the split caches
   keyed on it), where ``VectorStore.vectors_for`` finds it (expansion queries, training)
   while the train/test split scans (expansion neighbours, active learning, the eval set)
   never see it;
5. it is registered in the manifest with that split (``all_image_splits`` leaves such rows
   out, so the corpus assets never assign it to train or test) and served by ``/image/{id}``
   like any other image;
6. :meth:`StateStore.add_exemplar` stores the exemplar and the uploader's label.

An :class:`UploadQuota` (the app passes one; the owner's CLI does not) bounds what raters can
store: uploads per rater per hour (count and bytes) and uploads kept per concept (count and
bytes). It is checked before anything is decoded or stored, from what the state store holds
(so it holds across restarts and processes); an upload over it raises
:class:`UploadQuotaExceeded`. A file that is already a corpus image, or already an exemplar of
the concept, stores nothing new and is not counted.
"""

import logging
import os
import threading
import time
import unicodedata
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agile_pipeline.lib.corpus import image_id_for
from agile_pipeline.lib.images import (
    DEFAULT_MAX_SIDE,
    MAX_PIXELS,
    ImageInfo,
    ImageRejected,
    load_rgb_with_info,
    read_bytes,
)
from agile_pipeline.lib.state import UPLOAD_SPLIT, StateError, StateStore, validate_concept_name

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
"""Default cap on the size of an uploaded exemplar file."""

UPLOAD_SOURCE = "upload"
"""``images.source`` of uploaded exemplars."""

_EMBED_LOCK = threading.Lock()  # encoders run one inference at a time (see ImageTextEncoder)
_VECTOR_WRITE_ATTEMPTS = 5


class UploadRejected(ValueError):
    """The uploaded file cannot be used as an exemplar; the message says why and what to do.

    ``reason`` is one of :data:`agile_pipeline.lib.images.SKIP_REASONS` for files that are not
    usable images, ``"too_large_file"`` for files over the cap.
    """

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class EmbeddingUnavailable(RuntimeError):
    """The file is fine but could not be embedded or stored (encoder or vector store failed)."""


class UploadsBusy(EmbeddingUnavailable):
    """Too many uploads are being embedded at once; the caller may retry shortly."""


class UploadQuotaExceeded(ValueError):
    """The upload would go over an :class:`UploadQuota`; the message says which and what to do.

    ``retry_after``: seconds until the rater's hourly allowance has room again (``None`` for a
    concept's quota, which does not free up by waiting).
    """

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(message)


@dataclass(frozen=True)
class UploadQuota:
    """Limits on uploaded exemplars (0: no limit): a rater's uploads (count and bytes) in the
    last ``window_s`` seconds, and the uploads a concept keeps (count and bytes)."""

    per_rater: int = 20
    bytes_per_rater: int = 200 * 1024 * 1024
    per_concept: int = 50
    bytes_per_concept: int = 200 * 1024 * 1024
    window_s: float = 3600.0


_QUOTA_LOCK = threading.Lock()  # check and store as one step (within this process)


def _upload_rows(store: StateStore, exemplars: list[dict[str, Any]]) -> list[tuple[dict[str, Any], int]]:
    """``(exemplar, size)`` for the exemplars whose image was uploaded (not a corpus image)."""
    ids = [e["image_id"] for e in exemplars]
    sizes = {r["id"]: int(r["size"]) for r in store.image_rows(ids) if r["split"] == UPLOAD_SPLIT} if ids else {}
    return [(e, sizes[e["image_id"]]) for e in exemplars if e["image_id"] in sizes]


def check_upload_quota(
    store: StateStore, quota: UploadQuota, concept: str, rater: str, size: int, *, now: float | None = None
) -> None:
    """Raise :class:`UploadQuotaExceeded` if one more upload of ``size`` bytes by ``rater`` to
    ``concept`` would go over ``quota``."""
    now = time.time() if now is None else now
    kept = _upload_rows(store, store.exemplars(concept))
    if quota.per_concept and len(kept) + 1 > quota.per_concept:
        raise UploadQuotaExceeded(
            f"the concept already keeps {len(kept)} uploaded images, the most allowed "
            f"({quota.per_concept}); mark images from the batches or a search as exemplars instead, "
            "or ask the app's operator to raise AGILE_APP_UPLOADS_PER_CONCEPT"
        )
    used = sum(n for _, n in kept)
    if quota.bytes_per_concept and used + size > quota.bytes_per_concept:
        raise UploadQuotaExceeded(
            f"the concept's uploaded images already take {_mb(used)} of the {_mb(quota.bytes_per_concept)} "
            "allowed; upload smaller files, or mark images from the batches or a search instead"
        )
    if not (quota.per_rater or quota.bytes_per_rater):
        return
    since = now - quota.window_s
    mine = [
        (e, n) for name in store.concept_names()
        for e, n in _upload_rows(store, [x for x in store.exemplars(name)
                                         if x["added_by"] == rater and float(x["added_at"]) > since])
    ]
    if not mine:
        return
    oldest = min(float(e["added_at"]) for e, _ in mine)
    wait = max(1.0, oldest + quota.window_s - now)
    hour = "hour" if quota.window_s == 3600 else f"{quota.window_s / 60:.0f} minutes"
    if quota.per_rater and len(mine) + 1 > quota.per_rater:
        raise UploadQuotaExceeded(
            f"you uploaded {len(mine)} images in the last {hour}, the most allowed "
            f"({quota.per_rater}); try again in {wait / 60:.0f} min", retry_after=wait)
    mine_bytes = sum(n for _, n in mine)
    if quota.bytes_per_rater and mine_bytes + size > quota.bytes_per_rater:
        raise UploadQuotaExceeded(
            f"your uploads of the last {hour} take {_mb(mine_bytes)}; with this file they would go over "
            f"the {_mb(quota.bytes_per_rater)} allowed; try again in {wait / 60:.0f} min", retry_after=wait)


@dataclass(frozen=True)
class UploadResult:
    """What :func:`add_uploaded_exemplar` did.

    ``in_corpus``: the content already was a corpus image (``image_id`` is that image);
    ``stored``: a new upload was written now (``False`` for a corpus image or a repeated upload).
    """

    image_id: str
    polarity: str
    in_corpus: bool
    stored: bool
    path: Path | None
    model_id: str


def _mb(n: float) -> str:
    return f"{n / (1024 * 1024):.1f} MB"


def rejection_message(exc: ImageRejected, *, max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES) -> str:
    """A user-facing sentence for a file the safe decoder refused."""
    return {
        "empty_file": "the file is empty",
        "not_an_image": "the file is not an image in a supported format (JPEG, PNG, GIF, WebP, "
                        "BMP, TIFF, AVIF, PPM or ICO)",
        "truncated": "the image file is cut off (truncated); upload the complete file",
        "corrupt": "the image file is damaged and cannot be decoded",
        "decompression_bomb": f"the image has too many pixels ({exc.detail}); "
                              "upload a smaller version",
        "too_large_file": f"the file is over the size limit of {_mb(max_bytes)}; "
                          "upload a smaller version",
        "unreadable": f"the file cannot be read ({exc.detail})",
    }.get(exc.reason, f"the file cannot be used ({exc.reason})")


def read_upload_file(path: Path | str, *, max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES) -> bytes:
    """The bytes of a local file to upload, with the upload size cap (raises :class:`UploadRejected`)."""
    try:
        return read_bytes(Path(path).expanduser(), max_bytes=max_bytes)
    except ImageRejected as exc:
        raise UploadRejected(exc.reason, rejection_message(exc, max_bytes=max_bytes)) from exc


def _check_size(data: bytes, max_bytes: int) -> None:
    if len(data) > max_bytes:
        raise UploadRejected(
            "too_large_file",
            f"the file is {_mb(len(data))}, over the size limit of {_mb(max_bytes)}; upload a "
            "smaller version",
        )


def decode_upload(
    data: bytes, *, max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS
) -> tuple[Any, ImageInfo]:
    """Validate and decode uploaded bytes with the safe decoder: ``(RGB image, info)``.

    The image is returned at the size the corpus embedder uses (longest side
    :data:`~agile_pipeline.lib.images.DEFAULT_MAX_SIDE`). Raises :class:`UploadRejected`.
    """
    _check_size(data, max_bytes)
    try:
        return load_rgb_with_info(data, max_side=DEFAULT_MAX_SIDE, max_pixels=max_pixels, max_bytes=max_bytes)
    except ImageRejected as exc:
        raise UploadRejected(exc.reason, rejection_message(exc, max_bytes=max_bytes)) from exc


def blob_path(blobs: Path, image_id: str, fmt: str) -> Path:
    """Where the bytes of an uploaded image live (the layout of downloaded corpus images)."""
    return Path(blobs) / image_id[:2] / f"{image_id}.{fmt.lower()}"


def _write_blob(path: Path, data: bytes) -> None:
    if path.is_file() and path.stat().st_size == len(data):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def clean_filename(name: str | None, limit: int = 120) -> str:
    """The last path component of a client-given file name, printable and short (for display)."""
    raw = str(name or "").replace("\\", "/").rsplit("/", 1)[-1]
    kept = "".join(ch for ch in raw if ch.isprintable() and unicodedata.category(ch)[0] != "C")
    return " ".join(kept.split())[:limit]


def has_vector(vectors: Any, model_id: str, image_id: str) -> bool:
    """Whether the model's uploads table holds a vector for ``image_id`` (a filtered read)."""
    if not all(c in "0123456789abcdef" for c in image_id):  # ids are hex: safe in the filter
        raise ValueError(f"not an image id: {image_id[:40]!r}")
    return image_id in vectors.upload_ids(model_id, [image_id])


def embed_image(encoder: Any, image: Any) -> np.ndarray:
    """One ``(1, dim)`` float32 unit vector for a decoded image (one inference at a time)."""
    with _EMBED_LOCK:
        vec = np.asarray(encoder.embed_images([image]), dtype=np.float32)
    if vec.shape != (1, int(encoder.dim)) or not np.isfinite(vec).all():
        raise EmbeddingUnavailable(f"the encoder {encoder.model_id} returned an unusable vector {vec.shape}")
    return vec


def _store_vector(vectors: Any, model_id: str, image_id: str, vec: np.ndarray) -> None:
    """Add the upload's vector to the model's uploads table (not the corpus table, whose
    version the split caches are keyed on); retries concurrent-commit conflicts."""
    delay = 0.1
    for attempt in range(_VECTOR_WRITE_ATTEMPTS):
        try:
            vectors.add_uploads(model_id, [image_id], vec)
            return
        except Exception as exc:  # Lance commit conflicts surface as plain errors
            if attempt == _VECTOR_WRITE_ATTEMPTS - 1:
                raise EmbeddingUnavailable(f"could not store the vector of {image_id}: {exc}") from exc
            log.info("vector write for %s failed (%s); retrying", image_id, exc)
            time.sleep(delay)
            delay *= 2


def add_uploaded_exemplar(
    store: StateStore,
    vectors: Any,
    encoder: Any,
    blobs: Path,
    concept: str,
    data: bytes,
    *,
    polarity: str = "positive",
    added_by: str,
    filename: str = "",
    max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = MAX_PIXELS,
    quota: UploadQuota | None = None,
) -> UploadResult:
    """Make uploaded bytes an exemplar of ``concept`` (see the module docstring).

    ``vectors`` is a :class:`~agile_pipeline.lib.vectors.VectorStore`, ``encoder`` the
    configured :class:`~agile_pipeline.lib.encoders.ImageTextEncoder` (its ``model_id`` names
    the table), ``blobs`` the data directory's blob folder. Raises :class:`StateError` (unknown
    concept, bad polarity), :class:`UploadRejected` (not a usable image) or
    :class:`EmbeddingUnavailable`; with a ``quota``, :class:`UploadQuotaExceeded`. Idempotent:
    the same file twice is one exemplar.
    """
    if polarity not in ("positive", "negative"):
        raise StateError(f"exemplar polarity {str(polarity)[:20]!r} must be positive or negative")
    c = store.get_concept(validate_concept_name(str(concept)))
    model_id = str(encoder.model_id)
    _check_size(data, max_bytes)  # before hashing or decoding anything
    image_id = image_id_for(data)
    rows = store.image_rows([image_id])
    if rows and rows[0]["split"] != UPLOAD_SPLIT:
        # already a corpus image: it has (or will get) its vector from the corpus embedding
        store.add_exemplar(c.name, image_id, polarity, added_by)
        return UploadResult(image_id, polarity, True, False, Path(rows[0]["path"]), model_id)
    if quota is None or any(e["image_id"] == image_id for e in store.exemplars(c.name)):
        return _store_upload(store, vectors, encoder, blobs, c.name, data, image_id, rows, model_id,
                             polarity=polarity, added_by=added_by, filename=filename,
                             max_bytes=max_bytes, max_pixels=max_pixels)
    with _QUOTA_LOCK:
        check_upload_quota(store, quota, c.name, added_by, len(data))
        return _store_upload(store, vectors, encoder, blobs, c.name, data, image_id, rows, model_id,
                             polarity=polarity, added_by=added_by, filename=filename,
                             max_bytes=max_bytes, max_pixels=max_pixels)


def _store_upload(
    store: StateStore, vectors: Any, encoder: Any, blobs: Path, concept: str, data: bytes,
    image_id: str, rows: list[Any], model_id: str, *, polarity: str, added_by: str, filename: str,
    max_bytes: int, max_pixels: int,
) -> UploadResult:
    """Decode, store, embed and register an upload that is not a corpus image."""
    image, info = decode_upload(data, max_bytes=max_bytes, max_pixels=max_pixels)
    path = blob_path(blobs, image_id, info.format)
    stored = False
    if not rows or not has_vector(vectors, model_id, image_id):
        vec = embed_image(encoder, image)
        _write_blob(path, data)
        if not has_vector(vectors, model_id, image_id):
            _store_vector(vectors, model_id, image_id, vec)
        stored = True
    elif not Path(rows[0]["path"]).is_file():
        _write_blob(path, data)  # the blob was deleted: put it back
    if not rows:
        name = clean_filename(filename)
        store.record_ingest([{
            "id": image_id, "uri": f"upload:{name or image_id}", "path": str(path), "size": len(data),
            "width": info.width, "height": info.height, "format": info.format,
            "n_frames": info.n_frames, "split": UPLOAD_SPLIT, "source": UPLOAD_SOURCE,
            "ingested_at": time.time(),
        }], [])
    store.add_exemplar(concept, image_id, polarity, added_by)
    log.info("uploaded exemplar %s (%s, %dx%d) added to %r as %s by %s",
             image_id, info.format, info.width, info.height, concept, polarity, added_by)
    return UploadResult(image_id, polarity, False, stored, path, model_id)
