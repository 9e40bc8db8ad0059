"""Issue 17, finding 9 over HTTP: an acknowledged rating is a stored rating.

Event ids are global, not per rater: a second rater (or a buggy client) reusing an id for a
different rating is refused with a 400 naming the problem and acknowledges nothing; a retried
identical rating is still accepted without being stored twice.
"""

from fastapi.testclient import TestClient

from tests.labeling_ui.conftest import World


def _post(client: TestClient, world: World, concept: str, rater: str, image: int, label: str, event_id: str):  # type: ignore[no-untyped-def]
    batch = world.service.batches.latest(concept)
    assert batch is not None
    event = {"concept": concept, "image_id": batch.order[image], "label": label, "event_id": event_id,
             "batch_id": batch.batch_id}
    return client.post("/api/labels", json={"events": [event], "rater": rater})


def test_reused_event_id_is_refused_not_acknowledged(client: TestClient, world: World, concept_with_batch: str) -> None:
    r = _post(client, world, concept_with_batch, "bob", 0, "positive", "event-0001")
    assert r.status_code == 200 and r.json()["acked"] == ["event-0001"] and r.json()["new"] == 1
    retry = _post(client, world, concept_with_batch, "bob", 0, "positive", "event-0001")
    assert retry.status_code == 200 and retry.json()["new"] == 0  # idempotent, as before
    for rater, image, label in (("carol", 0, "positive"), ("bob", 1, "positive"), ("bob", 0, "negative")):
        r = _post(client, world, concept_with_batch, rater, image, label, "event-0001")
        assert r.status_code == 400, (rater, image, label, r.text)
        assert "acked" not in r.json() and "different rating" in r.text
    rows = world.store.label_events(concept_with_batch)
    assert [(x["event_id"], x["rater"], x["label"]) for x in rows] == [("event-0001", "bob", "positive")]
