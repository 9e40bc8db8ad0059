"""Ratings and batches: the concepts raters work on, the batch in front of them (with their
own labels and the round's state), the label writes, and who rated what.

Data ownership: the app is the single writer of label events (through the multi-process-safe
``StateStore``); a label write may start a round by itself, as the rounds'
:class:`~labeling_ui.rounds.RoundPolicy` says.
"""

import logging
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from agile_pipeline.lib.agreement import agreement_report
from agile_pipeline.lib.state import (
    LABELS,
    Concept,
    LabelEvent,
    LabelRule,
    StateError,
    validate_concept_name,
)
from labeling_ui.batches import Batches, Purpose
from labeling_ui.context import IMAGE_ID, ServiceContext, check_rater
from labeling_ui.exemplar_search import ExemplarSearch
from labeling_ui.rounds import Rounds

log = logging.getLogger(__name__)

EVENT_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}\Z")
MAX_EVENTS_PER_POST = 500
MAX_INSTRUCTIONS = 4000


def split_phrases(text: str | Sequence[str] | None) -> list[str]:
    """One phrase per line (commas stay inside phrases); blank lines dropped."""
    if text is None:
        return []
    lines = text.splitlines() if isinstance(text, str) else list(text)
    return [ln.strip() for ln in lines if ln and ln.strip()]


class Ratings:
    """Concepts, the batch view of the rating widget, label writes and rater statistics.

    ``batches`` resolves the batch each rating names; ``rounds`` gives the round's state for the
    batch view and starts the rounds the policy calls for after a rating; ``exemplars`` lists
    the concept's exemplars in its view.
    """

    def __init__(
        self, ctx: ServiceContext, batches: Batches, rounds: Rounds, exemplars: ExemplarSearch,
    ) -> None:
        self.store = ctx.store
        self._batches = batches
        self._rounds = rounds
        self._exemplars = exemplars

    # ---- concepts --------------------------------------------------------------------------
    def concept_names(self) -> list[str]:
        return self.store.concept_names()

    def concept(self, name: str) -> Concept:
        return self.store.get_concept(name)

    def concept_view(self, name: str) -> dict[str, Any]:
        c = self.store.get_concept(name)
        return {
            "name": c.name,
            "owner": c.owner,
            "positives": [p for k, p in c.phrases if k == "positive"],
            "negatives": [p for k, p in c.phrases if k == "negative"],
            "instructions": c.description,
            "exemplars": self._exemplars.for_concept(c.name),
        }

    def create_concept(
        self,
        name: str,
        positives: str | Sequence[str],
        negatives: str | Sequence[str],
        instructions: str,
        *,
        owner: str,
    ) -> Concept:
        check_rater(owner)
        if len(instructions or "") > MAX_INSTRUCTIONS:
            raise StateError(f"the instructions are {len(instructions)} characters long; keep them under {MAX_INSTRUCTIONS}")
        return self.store.create_concept(
            name, split_phrases(positives), split_phrases(negatives), owner=owner,
            description=instructions or "",
        )

    def update_concept(
        self, name: str, positives: str | Sequence[str], negatives: str | Sequence[str], instructions: str
    ) -> Concept:
        if len(instructions or "") > MAX_INSTRUCTIONS:
            raise StateError(f"the instructions are {len(instructions)} characters long; keep them under {MAX_INSTRUCTIONS}")
        current = self.store.get_concept(name)
        pos = [p for p in split_phrases(positives) if p.lower() != current.phrases[0][1].lower()]
        return self.store.update_concept(
            current.name, positives=pos, negatives=split_phrases(negatives), description=instructions or ""
        )

    # ---- batches and labels -----------------------------------------------------------
    def batch_view(self, concept: str, rater: str | None, purpose: Purpose = "train") -> dict[str, Any]:
        """The latest batch for the rating widget: items in order, with this rater's labels."""
        c = self.store.get_concept(concept)
        ref = self._batches.latest(c.name, purpose)
        mine = self.store.rater_labels(c.name, rater, purpose) if rater else {}
        items = []
        if ref is not None:
            for image_id in ref.order:
                it = ref.items[image_id]
                items.append({
                    "image_id": image_id,
                    "source": it.get("source"),
                    "detail": it.get("detail"),
                    "label": mine.get(image_id),
                })
        rounds = self.store.rounds(c.name)
        return {
            "concept": self.concept_view(c.name),
            "purpose": purpose,
            "rater": rater,
            "batch": None if ref is None else {
                "batch_id": ref.batch_id, "kind": ref.kind, "round": ref.round,
                "created_at": ref.created_at, "size": len(ref.order),
            },
            "items": items,
            "done": sum(1 for it in items if it["label"]),
            "rounds_done": len(rounds),
            "round": self._rounds.round_view(c.name).to_dict(),
            "counts": self._batches.label_counts(c.name, purpose),
            "recovery": any(it.get("source") == "recovery" for it in items),
        }

    def record_labels(self, events: Sequence[Mapping[str, Any]], *, rater: str) -> dict[str, int]:
        """Store ratings from the app, idempotently (``event_id``), with batch provenance.

        Each event: ``concept``, ``image_id``, ``label`` (positive/negative/skip),
        ``event_id`` (client-generated), ``batch_id``; optional ``ts`` (client time, seconds)
        and ``purpose``. The image must belong to that batch of that concept. All or nothing.
        """
        rater = check_rater(rater)
        if not events:
            return {"received": 0, "new": 0}
        if len(events) > MAX_EVENTS_PER_POST:
            raise StateError(f"too many ratings in one request ({len(events)}); send at most {MAX_EVENTS_PER_POST}")
        out: list[LabelEvent] = []
        now = time.time()
        for raw in events:
            if not isinstance(raw, Mapping):
                raise StateError("each rating must be an object")
            concept = validate_concept_name(str(raw.get("concept", "")))
            image_id = str(raw.get("image_id", ""))
            label = str(raw.get("label", ""))
            event_id = str(raw.get("event_id", ""))
            if not IMAGE_ID.match(image_id):
                raise StateError(f"image id {image_id[:40]!r} is not a 32-character hex id")
            if label not in LABELS:
                raise StateError(f"label {label[:20]!r} is not one of {', '.join(LABELS)}")
            if not EVENT_ID.match(event_id):
                raise StateError("event_id must be 8-64 letters, digits, '-' or '_'")
            try:
                batch_id = int(raw.get("batch_id"))  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise StateError("a rating needs the batch_id it was made in") from None
            ref = self._batches.by_id(batch_id)
            if ref is None or ref.concept != concept:
                raise StateError(f"batch {batch_id} is not a batch of {concept!r}; reload the page")
            item = ref.items.get(image_id)
            if item is None:
                raise StateError(f"image {image_id} is not in batch {batch_id} of {concept!r}; reload the page")
            purpose: Purpose = "eval" if ref.kind == "eval" else "train"
            ts = raw.get("ts")
            try:
                ts_f = float(ts) if ts is not None else now  # type: ignore[arg-type]
            except (TypeError, ValueError):
                ts_f = now
            if not (now - 7 * 86400 < ts_f < now + 300):  # a client clock far off: server time
                ts_f = now
            out.append(LabelEvent(
                concept=concept, image_id=image_id, label=label, rater=rater, purpose=purpose,
                source=str(item.get("source") or ref.kind), detail=item.get("detail"),
                round=ref.round, event_id=event_id, ts=ts_f,
            ))
        new = self.store.add_labels(out)
        if self._rounds.policy.auto:
            for concept, batch_id in dict.fromkeys(
                    (e.concept, int(raw["batch_id"])) for e, raw in zip(out, events, strict=True)
                    if e.purpose == "train"):
                try:
                    self._rounds.auto_round(concept, batch_id, requested_by=rater)
                except Exception:  # the labels are stored: a round that cannot start is
                    log.exception("automatic round for %r did not start", concept)  # retried on the next label
        return {"received": len(out), "new": new}

    def decide_review(self, concept: str, image_id: str, label: str, *, purpose: Purpose = "train") -> dict[str, Any]:
        """The owner's decision on an image raters disagree on: stored as the owner's label
        (source ``review``), which the label rule lets win; the image leaves the review queue."""
        c = self.store.get_concept(concept)
        if label not in ("positive", "negative"):
            raise StateError("decide yes (positive) or no (negative)")
        if purpose not in ("train", "eval"):
            raise StateError("purpose is train or eval")
        if not IMAGE_ID.match(str(image_id)):
            raise StateError("image_id must be a 32-character hex id")
        rated = {r["image_id"] for r in self.store.label_events(c.name, purpose=purpose)}
        if image_id not in rated:
            raise StateError(f"nobody rated image {image_id} for {c.name!r} ({purpose}): nothing to decide")
        self.store.add_labels([LabelEvent(concept=c.name, image_id=image_id, label=label, rater=c.owner,
                                          purpose=purpose, source="review")])
        queue = self.agreement(c.name)[purpose]["review_queue"]
        return {"image_id": image_id, "label": label, "rater": c.owner, "review_queue_size": queue["size"]}

    def rater_stats(self, concept: str) -> list[dict[str, Any]]:
        by: dict[str, dict[str, Any]] = {}
        for r in self.store.label_events(concept):
            d = by.setdefault(r["rater"], {"rater": r["rater"], "images": set(), "last": 0.0})
            d["images"].add((r["purpose"], r["image_id"]))
            d["last"] = max(d["last"], float(r["ts"]))
        return [
            {"rater": d["rater"], "images_rated": len(d["images"]), "last_rating": d["last"]}
            for d in sorted(by.values(), key=lambda d: -d["last"])
        ]

    def agreement(self, concept: str, *, queue_items: int = 50) -> dict[str, Any]:
        """Agreement among the concept's raters (:mod:`agile_pipeline.lib.agreement`), for the
        train and the eval ratings apart: Krippendorff's alpha, each rater against the owner,
        the review queue (every image id; the first ``queue_items`` with their labels) and the
        label rule the latest round trained with (the default rule before the first round)."""
        c = self.store.get_concept(concept)
        rounds = self.store.rounds(c.name)
        recorded = ((rounds[-1].get("info") or {}).get("params") or {}).get("label_rule") if rounds else None
        rule = str(recorded or LabelRule().describe())
        reports = {
            purpose: agreement_report(self.store.label_events(c.name, purpose=purpose), c.owner,
                                      purpose=purpose, rule=rule).to_dict(queue_limit=queue_items)
            for purpose in ("train", "eval")
        }
        return {"concept": c.name, "owner": c.owner, "label_rule": rule, **reports}
