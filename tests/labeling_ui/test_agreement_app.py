"""Agreement through the real app (issue 17, deliverable 2): a scripted disagreement between
the owner and two raters, posted as the rating widget posts it, read back from
``GET /api/agreement`` and from the Raters tab; the owner's decision empties the queue.

The script is tests/unit/test_agreement.py's (hand-computed there): owner alice ("olga"),
raters bob ("ann") and carol ("bob"), images A..G = the first seven of the first batch.
"""

import re

import pytest
from fastapi.testclient import TestClient

from labeling_ui import handlers
from labeling_ui.config import UiSettings
from tests.labeling_ui.conftest import World

SCRIPT = [
    ("A", "alice", "positive"), ("A", "bob", "positive"), ("A", "carol", "positive"),
    ("B", "alice", "negative"), ("B", "bob", "negative"), ("B", "carol", "positive"),
    ("C", "bob", "positive"), ("C", "carol", "negative"),
    ("D", "bob", "positive"), ("D", "carol", "positive"),
    ("E", "bob", "negative"), ("E", "carol", "skip"),
    ("F", "alice", "positive"), ("F", "bob", "positive"), ("F", "carol", "negative"),
    ("G", "bob", "negative"), ("G", "carol", "negative"), ("G", "bob", "positive"),
]


def _rate(client: TestClient, world: World, concept: str, script: list[tuple[str, str, str]],
          prefix: str = "agr") -> dict[str, str]:
    """Post each rating as its rater (in order, one post each); returns letter -> image id."""
    batch = world.service.batches.latest(concept)
    assert batch is not None
    ids = dict(zip("ABCDEFG", batch.order, strict=False))
    for k, (image, rater, label) in enumerate(script):
        event = {"concept": concept, "image_id": ids[image], "label": label,
                 "event_id": f"{prefix}-{k:06d}", "batch_id": batch.batch_id}
        r = client.post("/api/labels", json={"rater": rater, "events": [event]})
        assert r.status_code == 200, r.text
    return ids


def test_a_scripted_disagreement_in_the_api_and_the_raters_tab(
        client: TestClient, world: World, concept_with_batch: str) -> None:
    concept = concept_with_batch
    empty = client.get("/api/agreement", params={"concept": concept})
    assert empty.status_code == 200, empty.text
    assert empty.json()["train"]["alpha"] is None and "not enough overlap" in empty.json()["train"]["alpha_note"]

    ids = _rate(client, world, concept, SCRIPT)
    data = client.get("/api/agreement", params={"concept": concept}).json()
    assert data["owner"] == "alice" and data["label_rule"].startswith("the concept owner's label wins")
    train = data["train"]
    assert train["alpha"] == pytest.approx(-0.12)
    assert (train["co_rated_images"], train["rated_images"], train["n_raters"]) == (6, 7, 3)
    raters = {r["rater"]: r for r in train["raters"]}
    assert (raters["alice"]["images_rated"], raters["bob"]["images_rated"], raters["carol"]["images_rated"]) == (3, 7, 6)
    assert (raters["bob"]["agree_with_owner"], raters["bob"]["co_rated_with_owner"]) == (3, 3)
    assert (raters["carol"]["agree_with_owner"], raters["carol"]["co_rated_with_owner"]) == (1, 3)
    assert raters["carol"]["owner_agreement"] == pytest.approx(1 / 3)
    assert raters["carol"]["skipped"] == 1
    assert train["review_queue"]["size"] == 2
    assert train["review_queue"]["image_ids"] == [ids["C"], ids["G"]]
    assert data["eval"]["n_raters"] == 0 and data["eval"]["alpha"] is None

    # the Raters tab: alpha with its co-rated images, the per-rater table, the queue's thumbnails
    html = handlers.raters_panel(world.service, UiSettings(), concept)
    assert 'data-alpha="-0.120000"' in html and "α = <b>-0.12</b> over <b>6</b> images" in html
    assert 'data-queue-size="2"' in html and "Review queue" in html
    assert "100% (3 of 3)" in html and "33% (1 of 3)" in html
    assert re.findall(r'data-image-id="([0-9a-f]{32})"', html) == [ids["C"], ids["G"]]
    assert f'src="/image/{ids["C"]}"' in html
    assert "the concept owner&#x27;s label wins" in html
    assert client.get(f"/image/{ids['C']}").status_code == 200  # the thumbnail it shows is served

    # the owner decides C: it becomes the label and leaves the queue; alpha moves to 0.00
    _rate(client, world, concept, [("C", "alice", "negative")], prefix="own")
    assert world.store.effective_labels(concept)[ids["C"]] == 0
    after = client.get("/api/agreement", params={"concept": concept}).json()["train"]
    assert after["review_queue"]["image_ids"] == [ids["G"]]
    assert after["alpha"] == pytest.approx(0.0, abs=1e-9)
    html = handlers.raters_panel(world.service, UiSettings(), concept)
    assert 'data-queue-size="1"' in html and ids["C"] not in html
    assert "75% (3 of 4)" in html and "50% (2 of 4)" in html


def test_agreement_route_errors(client: TestClient, auth_client: TestClient, concept_with_batch: str) -> None:
    assert client.get("/api/agreement", params={"concept": "no such concept"}).status_code == 400
    assert client.get("/api/agreement").status_code == 400  # no concept given
    assert auth_client.get("/api/agreement", params={"concept": concept_with_batch}).status_code == 401


def test_the_raters_tab_without_overlap_says_so(world: World, concept_with_batch: str) -> None:
    html = handlers.raters_panel(world.service, UiSettings(), concept_with_batch)
    assert 'data-alpha=""' in html and "not enough overlap" in html
    assert "Nothing to review" in html
