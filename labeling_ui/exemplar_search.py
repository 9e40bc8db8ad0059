"""Exemplars and search: the images a rater picks (from the corpus or uploaded) to drive
expansion as phrases do, and the text search that finds them when no batch holds a positive.
"""

import threading
from typing import TYPE_CHECKING, Any

from agile_pipeline.lib.state import StateError, validate_concept_name
from labeling_ui.context import IMAGE_ID, ServiceContext, check_rater

if TYPE_CHECKING:
    from agile_pipeline.lib.uploads import UploadQuota


class ExemplarSearch:
    """A concept's exemplars (list, add, upload) and the image search behind them."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self._upload_slots = threading.BoundedSemaphore(2)

    def for_concept(self, concept: str) -> list[dict[str, Any]]:
        """The concept's exemplars: image id, polarity, who added it."""
        return [
            {"image_id": e["image_id"], "polarity": e["polarity"], "added_by": e["added_by"]}
            for e in self.store.exemplars(concept)
        ]

    def add_exemplar(self, concept: str, image_id: str, *, rater: str, polarity: str = "positive") -> list[dict[str, Any]]:
        """Mark a corpus image as an exemplar (also the rater's training label); the new list."""
        rater = check_rater(rater)
        c = self.store.get_concept(validate_concept_name(str(concept)))
        image_id = str(image_id)
        if not IMAGE_ID.match(image_id):
            raise StateError(f"image id {image_id[:40]!r} is not a 32-character hex id")
        if polarity not in ("positive", "negative"):
            raise StateError(f"polarity {str(polarity)[:20]!r} is positive or negative")
        self.store.add_exemplar(c.name, image_id, polarity, rater)
        return self.for_concept(c.name)

    def upload_exemplar(
        self,
        concept: str,
        data: bytes,
        *,
        rater: str,
        polarity: str = "positive",
        filename: str = "",
        max_bytes: int | None = None,
        quota: "UploadQuota | None" = None,
    ) -> dict[str, Any]:
        """Make an uploaded image file an exemplar (checked, stored, embedded now; see
        :mod:`agile_pipeline.lib.uploads`). Returns the image id and the new exemplar list.

        Raises :class:`StateError` (rater, concept, polarity), ``UploadRejected`` (not a usable
        image), ``UploadQuotaExceeded`` (over ``quota``: the rater's uploads per hour or the
        concept's uploads) or ``EmbeddingUnavailable`` (encoder or vector store unavailable, or
        busy).
        """
        from agile_pipeline.lib.uploads import (
            DEFAULT_MAX_UPLOAD_BYTES,
            EmbeddingUnavailable,
            UploadsBusy,
            add_uploaded_exemplar,
        )

        rater = check_rater(rater)
        c = self.store.get_concept(validate_concept_name(str(concept)))
        if polarity not in ("positive", "negative"):
            raise StateError(f"polarity {str(polarity)[:20]!r} is positive or negative")
        # decoding and embedding take memory and CPU: a few at a time, whatever the traffic
        if not self._upload_slots.acquire(timeout=60):
            raise UploadsBusy("the app is busy with other uploads; try again in a moment")
        try:
            try:
                encoder = self.ctx.encoder()
            except Exception as exc:
                raise EmbeddingUnavailable(
                    f"the embedding model {self.ctx.encoder_spec!r} cannot be loaded: {exc}"
                ) from exc
            res = add_uploaded_exemplar(
                self.store, self.ctx.vectors(), encoder, self.ctx.paths.blobs, c.name, data,
                polarity=polarity, added_by=rater, filename=filename,
                max_bytes=max_bytes or DEFAULT_MAX_UPLOAD_BYTES, quota=quota,
            )
        finally:
            self._upload_slots.release()
        return {"image_id": res.image_id, "polarity": polarity, "in_corpus": res.in_corpus,
                "exemplars": self.for_concept(c.name)}

    def search_images(self, concept: str, text: str, k: int = 24) -> list[dict[str, Any]]:
        """The training-split images nearest to ``text`` (the embedding model, loaded lazily)."""
        c = self.store.get_concept(validate_concept_name(str(concept)))
        text = " ".join(str(text).split())[:200]
        if not text:
            raise StateError("type a few words to search for")
        encoder = self.ctx.encoder()
        vectors = self.ctx.vectors()
        query = encoder.embed_texts([text])[0]
        from agile_pipeline.lib.ann_index import search  # through the index on large corpora

        hits = search(vectors, str(encoder.model_id), [query], max(1, min(int(k), 60)), split="train")[0]
        mine = {e["image_id"] for e in self.for_concept(c.name)}
        return [{"image_id": i, "score": round(float(s), 4), "exemplar": i in mine} for i, _split, s in hits]
