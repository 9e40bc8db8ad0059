"""Exemplars in the app: a rater marks an image as a positive example in one action (issue 9)."""

import numpy as np
from fastapi.testclient import TestClient

from tests.labeling_ui.conftest import World


def _post(client: TestClient, concept: str, image_id: object, rater: str | None = "bob", **extra: object):  # type: ignore[no-untyped-def]
    body: dict[str, object] = {"concept": concept, "image_id": image_id, **extra}
    if rater is not None:
        body["rater"] = rater
    return client.post("/api/exemplars", json=body)


def test_exemplar_is_stored_shown_and_counted_as_a_positive(client: TestClient, world: World, concept_with_batch: str) -> None:
    image_id = world.ids[5]
    r = _post(client, concept_with_batch, image_id)
    assert r.status_code == 200, r.text
    assert r.json()["exemplars"] == [{"image_id": image_id, "polarity": "positive", "added_by": "bob"}]
    assert [e["image_id"] for e in world.store.exemplars(concept_with_batch)] == [image_id]
    assert world.service.batches.label_counts(concept_with_batch)["positive"] == 1
    rows = world.store.label_events(concept_with_batch)
    assert [(x["rater"], x["label"], x["source"]) for x in rows] == [("bob", "positive", "exemplar")]
    # the rating widget gets the exemplars and the counts with the batch
    data = client.get("/api/batch", params={"concept": concept_with_batch, "rater": "bob"}).json()
    assert [e["image_id"] for e in data["concept"]["exemplars"]] == [image_id]
    assert data["counts"]["positive"] == 1 and data["recovery"] is False
    # marking it again is harmless
    assert _post(client, concept_with_batch, image_id).status_code == 200
    assert len(world.store.exemplars(concept_with_batch)) == 1


def test_exemplar_bad_requests_write_nothing(client: TestClient, world: World, concept_with_batch: str) -> None:
    c = concept_with_batch
    assert _post(client, c, "../../etc/passwd").status_code == 400
    assert _post(client, c, 12345).status_code == 400
    assert _post(client, c, "0" * 32).status_code == 400  # a well-formed id that is not in the corpus
    assert _post(client, c, world.ids[0], polarity="maybe").status_code == 400
    assert _post(client, "no such concept", world.ids[0]).status_code == 400
    assert _post(client, c, world.ids[0], rater=None).status_code == 400  # who is it?
    assert _post(client, c, world.ids[0], rater="../x").status_code == 400
    assert client.post("/api/exemplars", data={"concept": c, "image_id": world.ids[0]}).status_code == 415
    r = client.post("/api/exemplars", json={"concept": c, "image_id": world.ids[0], "rater": "bob"},
                    headers={"Origin": "https://evil.example"})
    assert r.status_code == 403
    assert world.store.exemplars(c) == [] and world.store.label_events(c) == []


def test_with_auth_the_exemplar_is_the_signed_in_raters(auth_client: TestClient, world: World, concept_with_batch: str) -> None:
    c = concept_with_batch
    assert _post(auth_client, c, world.ids[1], rater=None).status_code == 401
    assert auth_client.post("/login", data={"username": "alice", "password": "pw-a"}).status_code == 200
    assert _post(auth_client, c, world.ids[1], rater="bob").status_code == 403  # not as someone else
    r = _post(auth_client, c, world.ids[1], rater=None)
    assert r.status_code == 200 and r.json()["rater"] == "alice"
    assert [(e["image_id"], e["added_by"]) for e in world.store.exemplars(c)] == [(world.ids[1], "alice")]


def test_search_finds_nearest_images_or_says_why_not(client: TestClient, world: World, concept_with_batch: str) -> None:
    c = concept_with_batch
    assert client.get("/api/search", params={"concept": c, "q": "  "}).status_code == 400
    assert client.get("/api/search", params={"concept": "../x", "q": "red"}).status_code == 400
    # no embeddings yet: a clear 503, not a crash
    assert client.get("/api/search", params={"concept": c, "q": "red"}).status_code == 503
    from agile_pipeline.lib.encoders import load_encoder
    from agile_pipeline.lib.vectors import VectorStore
    from agile_pipeline.settings import Paths

    enc = load_encoder("random:32")
    paths = Paths(world.home).ensure()
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((len(world.ids), 32)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    VectorStore(paths.lancedb, cache_dir=paths.cache).add(str(enc.model_id), world.ids, ["train"] * len(world.ids), vecs)
    r = client.get("/api/search", params={"concept": c, "q": "a red fire truck", "k": 5})
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert len(items) == 5 and all(it["image_id"] in world.ids for it in items)
    scores = [it["score"] for it in items]
    assert scores == sorted(scores, reverse=True)
