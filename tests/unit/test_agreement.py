"""Agreement among a concept's raters (agile_pipeline.lib.agreement), on hand-computed cases.

The scripted disagreement (owner "olga", raters "ann" and "bob", images A..G):

    image  olga  ann                bob    queue?
    A      +     +                  +
    B      -     -                  +      (owner rated: decided)
    C            +                  -      yes
    D            +                  +
    E            -                  skip   (one rating: not co-rated)
    F      +     +                  -      (owner rated: decided)
    G            - then + (latest)  -      yes

Krippendorff's alpha (nominal) by hand, over the 6 images with two or more ratings (A B C D F
G; 15 pairable values): coincidences o(+,+) = 3 + 2 + 1 = 6, o(-,-) = 1, o(+,-) = o(-,+) =
1 + 1 + 1 + 1 = 4, so n+ = 10, n- = 5 and alpha = 1 - (n - 1) * (o(+,-) + o(-,+)) /
(2 n+ n-) = 1 - 14 * 8 / 100 = -0.12.

After olga rates C negative: C is (+, -, -), o(-,-) = 2, n = 16, n- = 6, and alpha =
1 - 15 * 8 / 120 = 0.0 exactly; C leaves the queue (G stays).
"""

import math
import time
from typing import Any

import pytest

from agile_pipeline.lib.agreement import (
    agreement_report,
    krippendorff_alpha,
    latest_events,
    rater_agreement,
    ratings_of,
    review_queue,
)
from agile_pipeline.lib.state import LabelEvent, LabelRule, StateStore

SCRIPT = [  # (image, rater, label), in the order they are made (seq = position)
    ("A", "olga", "positive"), ("A", "ann", "positive"), ("A", "bob", "positive"),
    ("B", "olga", "negative"), ("B", "ann", "negative"), ("B", "bob", "positive"),
    ("C", "ann", "positive"), ("C", "bob", "negative"),
    ("D", "ann", "positive"), ("D", "bob", "positive"),
    ("E", "ann", "negative"), ("E", "bob", "skip"),
    ("F", "olga", "positive"), ("F", "ann", "positive"), ("F", "bob", "negative"),
    ("G", "ann", "negative"), ("G", "bob", "negative"), ("G", "ann", "positive"),
]


def _events(script: list[tuple[str, str, str]]) -> list[dict[str, Any]]:
    return [{"seq": k + 1, "image_id": i, "rater": r, "label": lab} for k, (i, r, lab) in enumerate(script)]


def test_latest_event_per_rater_counts_and_skips_are_not_ratings() -> None:
    ev = _events([("x", "ann", "positive"), ("x", "ann", "negative"), ("y", "ann", "positive"),
                  ("y", "ann", "skip"), ("z", "bob", "skip")])
    assert latest_events(ev) == {"x": {"ann": (2, "negative")}, "y": {"ann": (4, "skip")},
                                 "z": {"bob": (5, "skip")}}
    assert ratings_of(ev) == {"x": {"ann": "negative"}}  # a later skip withdraws a rating
    # the order of the rows does not matter: the highest seq wins
    assert ratings_of(list(reversed(ev))) == {"x": {"ann": "negative"}}


def test_the_scripted_disagreement() -> None:
    rep = agreement_report(_events(SCRIPT), "olga")
    assert rep.alpha == pytest.approx(-0.12)
    assert rep.n_co_rated == 6 and rep.n_images == 7 and rep.n_raters == 3 and rep.note == ""
    by = {r.rater: r for r in rep.raters}
    assert [r.rater for r in rep.raters] == ["olga", "ann", "bob"]  # owner first
    assert (by["olga"].rated, by["ann"].rated, by["bob"].rated) == (3, 7, 6)
    assert (by["ann"].skipped, by["bob"].skipped) == (0, 1)
    assert (by["ann"].agree_with_owner, by["ann"].with_owner) == (3, 3)
    assert by["ann"].owner_agreement == 1.0
    assert (by["bob"].agree_with_owner, by["bob"].with_owner) == (1, 3)
    assert by["bob"].owner_agreement == pytest.approx(1 / 3)
    assert by["olga"].owner_agreement is None
    assert [q.image_id for q in rep.review_queue] == ["C", "G"]
    assert dict(rep.review_queue[1].labels) == {"ann": "positive", "bob": "negative"}
    assert rep.rule == LabelRule().describe()
    assert rep.metrics() == {"agreement_alpha": pytest.approx(-0.12), "agreement_images": 6.0,
                             "n_raters": 3.0, "review_queue": 2.0}

    # the owner decides C: it leaves the queue, and the figures move as computed by hand
    after = agreement_report(_events([*SCRIPT, ("C", "olga", "negative")]), "olga")
    assert after.alpha == pytest.approx(0.0, abs=1e-12)
    assert [q.image_id for q in after.review_queue] == ["G"]
    by = {r.rater: r for r in after.raters}
    assert (by["ann"].agree_with_owner, by["ann"].with_owner) == (3, 4)
    assert (by["bob"].agree_with_owner, by["bob"].with_owner) == (2, 4)


def test_alpha_on_small_hand_computed_cases() -> None:
    # perfect agreement with both values present: 1
    assert krippendorff_alpha({"a": {"r1": "positive", "r2": "positive"},
                               "b": {"r1": "negative", "r2": "negative"}})[:2] == (1.0, 2)
    # one image, one yes and one no: n = 2, n+ = n- = 1, alpha = 1 - 1 * 2 / 2 = 0
    assert krippendorff_alpha({"a": {"r1": "positive", "r2": "negative"}})[0] == pytest.approx(0.0)
    # systematic disagreement on two images: 1 - 3 * 4 / (2 * 2 * 2) = -0.5
    assert krippendorff_alpha({"a": {"r1": "positive", "r2": "negative"},
                               "b": {"r1": "negative", "r2": "positive"}})[0] == pytest.approx(-0.5)


def test_alpha_is_undefined_without_overlap_or_without_variation() -> None:
    alpha, n, note = krippendorff_alpha({"a": {"r1": "positive"}, "b": {"r2": "negative"}})
    assert math.isnan(alpha) and n == 0 and "not enough overlap" in note
    alpha, n, note = krippendorff_alpha({"a": {"r1": "positive", "r2": "positive"}})
    assert math.isnan(alpha) and n == 1 and "positive" in note
    rep = agreement_report([], "olga")
    assert math.isnan(rep.alpha) and rep.n_raters == 0 and rep.review_queue == ()
    assert rep.to_dict()["alpha"] is None and rep.to_dict()["review_queue"]["size"] == 0


def test_a_single_rater_has_no_overlap_and_no_queue() -> None:
    rep = agreement_report(_events([("a", "olga", "positive"), ("b", "olga", "negative")]), "olga")
    assert math.isnan(rep.alpha) and rep.n_co_rated == 0 and rep.n_raters == 1
    assert rep.review_queue == ()


def test_the_queue_needs_a_real_disagreement_and_no_owner_rating() -> None:
    ev = _events([
        ("tie", "ann", "positive"), ("tie", "bob", "negative"),
        ("skip", "ann", "positive"), ("skip", "bob", "skip"),  # a skip is not a disagreement
        ("majority", "ann", "positive"), ("majority", "bob", "positive"), ("majority", "cy", "negative"),
        ("owner-skipped", "ann", "positive"), ("owner-skipped", "bob", "negative"),
        ("owner-skipped", "olga", "skip"),  # the owner's skip does not decide it
        ("changed", "ann", "positive"), ("changed", "bob", "negative"), ("changed", "bob", "positive"),
    ])
    queue = review_queue(ev, "olga")
    assert [q.image_id for q in queue] == ["tie", "majority", "owner-skipped"]
    assert (queue[1].positive, queue[1].negative) == (2, 1)
    assert {r.rater: r.skipped for r in rater_agreement(ev, "olga")}["olga"] == 1


def test_reports_read_the_state_stores_events(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The same scripted disagreement through the real store (rows, seq, purposes)."""
    store = StateStore(tmp_path / "state.sqlite")
    ids = {name: f"{k:032x}" for k, name in enumerate("ABCDEFG")}
    store.record_ingest([{"id": i, "uri": f"/c/{n}.png", "path": f"/c/{n}.png", "size": 10, "width": 8,
                          "height": 8, "format": "PNG", "n_frames": 1, "split": "train", "source": "/c",
                          "ingested_at": time.time()} for n, i in ids.items()], [])
    store.create_concept("c", ["x"], owner="olga")
    for image, rater, label in SCRIPT:
        store.add_labels([LabelEvent("c", ids[image], label, rater)])
    store.add_labels([LabelEvent("c", ids["A"], "negative", "ann", purpose="eval")])  # eval: apart
    train = agreement_report(store.label_events("c", purpose="train"), "olga")
    assert train.alpha == pytest.approx(-0.12)
    assert [q.image_id for q in train.review_queue] == [ids["C"], ids["G"]]
    evals = agreement_report(store.label_events("c", purpose="eval"), "olga", purpose="eval")
    assert evals.n_raters == 1 and math.isnan(evals.alpha) and evals.purpose == "eval"
    # the owner's rating decides a queued image under the default rule, and it leaves the queue
    store.add_labels([LabelEvent("c", ids["C"], "negative", "olga")])
    assert store.effective_labels("c")[ids["C"]] == 0
    assert [q.image_id for q in agreement_report(store.label_events("c", purpose="train"), "olga")
            .review_queue] == [ids["G"]]
