"""The candidate batches raters rate, and the counts of their ratings: the read side that
ratings (:mod:`labeling_ui.ratings`) and rounds (:mod:`labeling_ui.rounds`) share.

Batches are written by the concept jobs and never change once written, so the ones the app has
seen are kept in a small cache (every rating post names its batch).
"""

import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from agile_pipeline.lib.state import StateStore

Purpose = Literal["train", "eval"]
CACHED_BATCHES = 256


@dataclass(frozen=True)
class BatchRef:
    """An immutable candidate batch: provenance of every image in it."""

    batch_id: int
    concept: str
    kind: str
    round: int
    created_at: float
    items: dict[str, dict[str, Any]] = field(default_factory=dict)
    order: tuple[str, ...] = ()


class Batches:
    """A concept's batches as the app sees them (cached by id) and its label counts."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._batches: OrderedDict[int, BatchRef] = OrderedDict()

    def _ref(self, batch: Mapping[str, Any]) -> BatchRef:
        items = {it["image_id"]: dict(it) for it in batch["items"]}
        ref = BatchRef(
            int(batch["batch_id"]), str(batch["concept"]), str(batch["kind"]), int(batch["round"]),
            float(batch["created_at"]), items, tuple(it["image_id"] for it in batch["items"]),
        )
        with self._lock:
            self._batches[ref.batch_id] = ref
            while len(self._batches) > CACHED_BATCHES:
                self._batches.popitem(last=False)
        return ref

    def by_id(self, batch_id: int) -> BatchRef | None:
        """The batch with this id (any concept), or ``None``."""
        with self._lock:
            if batch_id in self._batches:
                return self._batches[batch_id]
        batch = self.store.get_batch(batch_id)
        return self._ref(batch) if batch else None

    def latest(self, concept: str, purpose: Purpose = "train") -> BatchRef | None:
        """The concept's newest batch to rate for ``purpose``, or ``None`` before the first."""
        kinds = ("eval",) if purpose == "eval" else ("expansion", "al")
        batch = self.store.latest_batch(concept, kinds)
        return self._ref(batch) if batch else None

    def label_counts(self, concept: str, purpose: Purpose = "train") -> dict[str, int]:
        """Positive and negative images among the concept's effective labels."""
        labels = self.store.effective_labels(concept, purpose=purpose)
        pos = sum(labels.values())
        return {"positive": pos, "negative": len(labels) - pos}
