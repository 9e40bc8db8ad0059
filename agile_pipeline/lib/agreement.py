"""Agreement among the raters of one concept, from its label events (pure Python, no I/O).

Which label counts: each rater's **latest** event per image (highest ``seq``); a ``skip`` is
not a rating, so a rater whose latest event on an image is a skip has not rated it. Train and
eval events are read separately (call once per purpose).

* **Inter-rater agreement**: Krippendorff's alpha (nominal, the maintained ``krippendorff``
  package) over the images rated by at least two raters. It is undefined (``NaN``, with a
  ``note`` saying why) when no image has two raters, or when every one of those ratings is the
  same label (nothing to disagree about).
* **Per rater**: images rated and skipped, and agreement with the concept owner: the share of
  the images both rated where the rater's label equals the owner's, with that count.
* **Review queue**: images where raters disagree (a positive and a negative among their latest
  labels) and the owner has not rated. The owner's rating decides them (under
  ``LabelRule(owner_wins=True)``, the default); once the owner rates one it leaves the queue.
"""

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import krippendorff
import numpy as np

from agile_pipeline.lib.state import LabelRule

RATINGS = ("negative", "positive")  # the nominal values, in krippendorff's value-count order


class EventLike(Protocol):
    """A label event row: ``StateStore.label_events`` rows (sqlite3.Row) or plain dicts with
    ``image_id``, ``rater``, ``label`` and ``seq``."""

    def __getitem__(self, key: str, /) -> Any: ...


@dataclass(frozen=True)
class RaterAgreement:
    """One rater's figures: images rated (positive/negative) and skipped, and agreement with
    the owner on the images both rated (``with_owner``; ``None`` share when none)."""

    rater: str
    is_owner: bool
    rated: int
    skipped: int
    with_owner: int
    agree_with_owner: int

    @property
    def owner_agreement(self) -> float | None:
        if self.is_owner or not self.with_owner:
            return None
        return self.agree_with_owner / self.with_owner

    def to_dict(self) -> dict[str, Any]:
        return {"rater": self.rater, "is_owner": self.is_owner, "images_rated": self.rated,
                "skipped": self.skipped, "co_rated_with_owner": self.with_owner,
                "agree_with_owner": self.agree_with_owner, "owner_agreement": self.owner_agreement}


@dataclass(frozen=True)
class ReviewItem:
    """An image raters disagree on and the owner has not rated: ``labels`` is rater -> label."""

    image_id: str
    labels: Mapping[str, str]

    @property
    def positive(self) -> int:
        return sum(v == "positive" for v in self.labels.values())

    @property
    def negative(self) -> int:
        return sum(v == "negative" for v in self.labels.values())

    def to_dict(self) -> dict[str, Any]:
        return {"image_id": self.image_id, "labels": dict(sorted(self.labels.items())),
                "positive": self.positive, "negative": self.negative}


@dataclass(frozen=True)
class AgreementReport:
    """A concept's agreement figures for one purpose (train or eval)."""

    purpose: str
    owner: str
    rule: str  # the label-resolution rule, in words (LabelRule.describe())
    alpha: float  # Krippendorff's alpha (nominal); NaN when undefined (see ``note``)
    n_co_rated: int  # images rated by at least two raters (the units alpha is computed over)
    n_images: int  # images rated by anyone
    raters: tuple[RaterAgreement, ...]
    review_queue: tuple[ReviewItem, ...]
    note: str = ""  # why alpha is undefined; empty when it is a number

    @property
    def n_raters(self) -> int:
        """Raters with at least one rating (skips alone do not count)."""
        return sum(1 for r in self.raters if r.rated)

    def metrics(self) -> dict[str, float]:
        """The figures logged with each round (MLflow drops a NaN alpha)."""
        return {"agreement_alpha": self.alpha, "agreement_images": float(self.n_co_rated),
                "n_raters": float(self.n_raters), "review_queue": float(len(self.review_queue))}

    def to_dict(self, *, queue_limit: int | None = None) -> dict[str, Any]:
        queue = self.review_queue if queue_limit is None else self.review_queue[:queue_limit]
        return {
            "purpose": self.purpose, "owner": self.owner, "label_rule": self.rule,
            "alpha": self.alpha if math.isfinite(self.alpha) else None, "alpha_note": self.note,
            "co_rated_images": self.n_co_rated, "rated_images": self.n_images,
            "n_raters": self.n_raters, "raters": [r.to_dict() for r in self.raters],
            "review_queue": {"size": len(self.review_queue),
                             "image_ids": [q.image_id for q in self.review_queue],
                             "items": [q.to_dict() for q in queue]},
        }


def latest_events(events: Iterable[EventLike]) -> dict[str, dict[str, tuple[int, str]]]:
    """``{image_id: {rater: (seq, label)}}``: each rater's latest event per image (skips kept)."""
    out: dict[str, dict[str, tuple[int, str]]] = {}
    for e in events:
        seq = int(e["seq"])
        by_rater = out.setdefault(str(e["image_id"]), {})
        rater = str(e["rater"])
        if rater not in by_rater or seq > by_rater[rater][0]:
            by_rater[rater] = (seq, str(e["label"]))
    return out


def ratings_of(events: Iterable[EventLike]) -> dict[str, dict[str, str]]:
    """``{image_id: {rater: "positive" | "negative"}}`` from the latest events; skips dropped,
    images nobody rated left out."""
    return _ratings(latest_events(events))


def _ratings(latest: Mapping[str, Mapping[str, tuple[int, str]]]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for image_id, by_rater in latest.items():
        rated = {r: lab for r, (_seq, lab) in by_rater.items() if lab in RATINGS}
        if rated:
            out[image_id] = rated
    return out


def krippendorff_alpha(ratings: Mapping[str, Mapping[str, str]]) -> tuple[float, int, str]:
    """Krippendorff's alpha (nominal) over the images with at least two ratings:
    ``(alpha, images used, note)``; alpha is NaN (and ``note`` says why) when undefined."""
    counts = np.array(
        [[sum(v == value for v in by.values()) for value in RATINGS]
         for by in ratings.values() if len(by) >= 2],
        dtype=np.int64,
    ).reshape(-1, len(RATINGS))
    n_units = int(counts.shape[0])
    if n_units == 0:
        return math.nan, 0, "not enough overlap: no image is rated by two raters yet"
    totals = counts.sum(axis=0)
    if int((totals > 0).sum()) < 2:
        only = RATINGS[int(np.argmax(totals))]
        return math.nan, n_units, (f"undefined: every rating of the {n_units} images rated by two "
                                   f"or more raters is {only} (nothing to disagree about yet)")
    alpha = float(krippendorff.alpha(value_counts=counts, level_of_measurement="nominal"))
    return alpha, n_units, ""


def rater_agreement(
    events: Iterable[EventLike], owner: str,
) -> list[RaterAgreement]:
    """Each rater's counts and agreement with ``owner`` (owner first, then by images rated)."""
    return _rater_agreement(latest_events(events), owner)


def _rater_agreement(
    latest: Mapping[str, Mapping[str, tuple[int, str]]], owner: str,
) -> list[RaterAgreement]:
    rated: dict[str, int] = {}
    skipped: dict[str, int] = {}
    both: dict[str, int] = {}
    agree: dict[str, int] = {}
    for by_rater in latest.values():
        owner_label = by_rater.get(owner, (0, ""))[1]
        for rater, (_seq, label) in by_rater.items():
            if label not in RATINGS:
                skipped[rater] = skipped.get(rater, 0) + 1
                continue
            rated[rater] = rated.get(rater, 0) + 1
            if rater != owner and owner_label in RATINGS:
                both[rater] = both.get(rater, 0) + 1
                agree[rater] = agree.get(rater, 0) + int(label == owner_label)
    raters = sorted(set(rated) | set(skipped), key=lambda r: (r != owner, -rated.get(r, 0), r))
    return [RaterAgreement(r, r == owner, rated.get(r, 0), skipped.get(r, 0), both.get(r, 0),
                           agree.get(r, 0)) for r in raters]


def review_queue(events: Iterable[EventLike], owner: str) -> list[ReviewItem]:
    """Images raters disagree on (a positive and a negative among their latest labels) that the
    owner has not rated, oldest disagreement first (by the newest label that makes it one)."""
    return _review_queue(latest_events(events), owner)


def _review_queue(
    latest: Mapping[str, Mapping[str, tuple[int, str]]], owner: str,
) -> list[ReviewItem]:
    queue: list[tuple[int, ReviewItem]] = []
    for image_id, by_rater in latest.items():
        rated = {r: (seq, lab) for r, (seq, lab) in by_rater.items() if lab in RATINGS}
        labels = {lab for _seq, lab in rated.values()}
        if owner in rated or labels != set(RATINGS):
            continue
        queue.append((max(seq for seq, _lab in rated.values()),
                      ReviewItem(image_id, {r: lab for r, (_seq, lab) in rated.items()})))
    return [item for _seq, item in sorted(queue, key=lambda t: (t[0], t[1].image_id))]


def agreement_report(
    events: Iterable[EventLike], owner: str, *, purpose: str = "train",
    rule: LabelRule | str = LabelRule(),
) -> AgreementReport:
    """Every figure above for one purpose's events (``StateStore.label_events(concept,
    purpose=..., upto=...)``) of a concept whose owner is ``owner``. ``rule``: the
    label-resolution rule that trains the rounds (or its description, as a round recorded it)."""
    latest = latest_events(events)
    ratings = _ratings(latest)
    alpha, n_units, note = krippendorff_alpha(ratings)
    return AgreementReport(
        purpose=purpose, owner=owner, rule=rule if isinstance(rule, str) else rule.describe(),
        alpha=alpha, n_co_rated=n_units,
        n_images=len(ratings), raters=tuple(_rater_agreement(latest, owner)),
        review_queue=tuple(_review_queue(latest, owner)), note=note,
    )
