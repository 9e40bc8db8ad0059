"""The app's HTTP surface: ratings, images by id only, Gradio's own routes locked down, auth."""

import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.labeling_ui.conftest import World, raw_get

SECRET = b"root:x:0:0:secret-marker"


def _labels(client: TestClient, world: World, concept: str, n: int = 1, *, rater: str | None = "bob",
            label: str = "positive", prefix: str = "ev", **headers: str):  # type: ignore[no-untyped-def]
    batch = world.service.batches.latest(concept)
    assert batch is not None
    events = [{"concept": concept, "image_id": i, "label": label, "event_id": f"{prefix}-{k:06d}",
               "batch_id": batch.batch_id, "ts": 1.0e9} for k, i in enumerate(batch.order[:n])]
    body = {"events": events} | ({"rater": rater} if rater is not None else {})
    return client.post("/api/labels", json=body, headers=headers)


# ---- ratings --------------------------------------------------------------------------------
def test_post_labels_stores_rater_and_provenance(client: TestClient, world: World, concept_with_batch: str) -> None:
    r = _labels(client, world, concept_with_batch, 3)
    assert r.status_code == 200, r.text
    assert r.json()["new"] == 3 and len(r.json()["acked"]) == 3
    rows = world.store.label_events(concept_with_batch)
    assert [x["rater"] for x in rows] == ["bob"] * 3
    assert {x["source"] for x in rows} == {"expansion"}
    # a client clock far in the past is replaced by server time
    assert all(x["ts"] > 1.5e9 for x in rows)


def test_post_labels_is_idempotent(client: TestClient, world: World, concept_with_batch: str) -> None:
    assert _labels(client, world, concept_with_batch, 5).json()["new"] == 5
    again = _labels(client, world, concept_with_batch, 5)  # the widget retrying after a lost reply
    assert again.status_code == 200 and again.json()["new"] == 0
    assert len(world.store.label_events(concept_with_batch)) == 5


def test_post_labels_without_a_name_is_refused(client: TestClient, world: World, concept_with_batch: str) -> None:
    assert _labels(client, world, concept_with_batch, rater=None).status_code == 400
    assert _labels(client, world, concept_with_batch, rater="../../x").status_code == 400
    assert world.store.label_events(concept_with_batch) == []


def test_post_labels_refuses_forms_and_other_origins(client: TestClient, world: World, concept_with_batch: str) -> None:
    r = client.post("/api/labels", data={"events": "[]"})  # a cross-site HTML form (CSRF)
    assert r.status_code == 415
    r = _labels(client, world, concept_with_batch, Origin="https://evil.example")
    assert r.status_code == 403
    assert world.store.label_events(concept_with_batch) == []


def test_post_labels_with_a_bad_event_writes_nothing(client: TestClient, world: World, concept_with_batch: str) -> None:
    batch = world.service.batches.latest(concept_with_batch)
    assert batch is not None
    events = [
        {"concept": concept_with_batch, "image_id": batch.order[0], "label": "positive", "event_id": "good-000001", "batch_id": batch.batch_id},
        {"concept": concept_with_batch, "image_id": batch.order[1], "label": "maybe", "event_id": "bad-0000001", "batch_id": batch.batch_id},
    ]
    r = client.post("/api/labels", json={"rater": "bob", "events": events})
    assert r.status_code == 400 and "label" in r.json()["detail"]
    assert world.store.label_events(concept_with_batch) == []


def test_batch_endpoint_returns_items_with_this_raters_labels(client: TestClient, world: World, concept_with_batch: str) -> None:
    _labels(client, world, concept_with_batch, 2)
    data = client.get("/api/batch", params={"concept": concept_with_batch, "rater": "bob"}).json()
    assert data["done"] == 2 and data["items"][0]["label"] == "positive"
    assert data["concept"]["positives"][0] == "red things"
    assert client.get("/api/batch", params={"concept": "../etc", "rater": "bob"}).status_code == 400


# ---- images by id only ------------------------------------------------------------------------
def test_image_route_serves_a_thumbnail_of_a_corpus_image(client: TestClient, world: World) -> None:
    r = client.get(f"/image/{world.ids[0]}")
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/jpeg"
    assert r.headers["x-content-type-options"] == "nosniff"
    im = Image.open(io.BytesIO(r.content))
    assert im.format == "JPEG" and max(im.size) <= 512


TRAVERSALS = [
        "/image/..%2f..%2fetc%2fpasswd",
        "/image/..%2F..%2F..%2Fetc%2Fpasswd",
        "/image/%2e%2e/%2e%2e/etc/passwd",
        "/image/../../etc/passwd",
        "/image/..\\..\\etc\\passwd",
        "/image/%00",
        "/image/" + "A" * 32,  # upper case: not an id
        "/image/" + "a" * 31,
        "/image/" + "a" * 33,
        "/image/" + "0" * 32,  # well-formed, unknown
        "/image/" + "0" * 32 + "/../../../etc/passwd",
        "/image/" + "0" * 31 + "%2f",
        "/image/x?path=/etc/passwd",
]


def test_image_route_refuses_traversal_and_guessing(server: str) -> None:
    served = []
    for path in TRAVERSALS:
        status, body = raw_get(server, path)
        if not 400 <= status < 500 or b"root:" in body or body[:2] == b"\xff\xd8":
            served.append((path, status))
    assert served == []


def test_image_route_refuses_a_file_swapped_after_ingestion(client: TestClient, world: World) -> None:
    path = world.store.image_path(world.ids[1])
    assert path is not None
    path.unlink()
    path.symlink_to("/etc/passwd")  # a symlink out of the corpus where an image was
    r = client.get(f"/image/{world.ids[1]}")
    assert r.status_code == 404 and b"root:" not in r.content


# ---- Gradio's own routes ------------------------------------------------------------------------
@pytest.fixture
def planted(world: World):  # type: ignore[no-untyped-def]
    """Files that must never be served: a dotfile in the data dir and one beside the corpus."""
    (world.home / ".env").write_bytes(SECRET)
    corpus = world.home.parent / "corpus"
    (corpus / ".hidden").write_bytes(SECRET)
    return world.home / ".env", corpus / ".hidden", world.store.image_path(world.ids[0])


GRADIO_FILE_PROBES = [
        "/gradio_api/file=/etc/passwd",
        "/gradio_api/file={env}",
        "/gradio_api/file={hidden}",
        "/gradio_api/file={image}",
        "/gradio_api/file/{env}",
        "/file={env}",
        "/file=/etc/passwd",
        "/gradio_api/file=..%2f..%2f..%2fetc%2fpasswd",
        "/.env",
        "/static/../.env",
        "/assets/..%2f..%2f.env",
        "/gradio_api/proxy=http://169.254.169.254/latest/meta-data/",
        "/gradio_api/run-history/records/x/y/assets/z",
]


def test_gradio_file_routes_serve_nothing_from_disk(server: str, planted) -> None:  # type: ignore[no-untyped-def]
    env, hidden, image = planted
    served = []
    for template in GRADIO_FILE_PROBES:
        path = template.format(env=env, hidden=hidden, image=image)
        status, body = raw_get(server, path)
        if not 400 <= status < 500 or SECRET in body or b"root:" in body:
            served.append((path, status))
    assert served == []


def test_gradio_upload_route_is_closed(client: TestClient) -> None:
    files = {"files": ("x.txt", b"uploaded content", "text/plain")}
    for url in ("/gradio_api/upload", "/gradio_api/upload?upload_id=abc", "/upload"):
        r = client.post(url, files=files)
        assert r.status_code == 404, url


def test_the_ui_and_its_config_still_load(client: TestClient) -> None:
    assert client.get("/").status_code == 200
    cfg = client.get("/config")
    assert cfg.status_code == 200 and "components" in cfg.json()
    assert client.get("/theme.css").status_code == 200


# ---- auth ------------------------------------------------------------------------------------------
def _login(c: TestClient, user: str, password: str) -> int:
    return c.post("/login", data={"username": user, "password": password}).status_code


def test_with_auth_every_data_route_needs_a_signed_in_rater(auth_client: TestClient, world: World, concept_with_batch: str) -> None:
    assert auth_client.get(f"/image/{world.ids[0]}").status_code == 401
    assert auth_client.get("/api/batch", params={"concept": concept_with_batch}).status_code == 401
    assert _labels(auth_client, world, concept_with_batch, rater=None).status_code == 401
    assert auth_client.get("/api/session").status_code == 401
    assert auth_client.get(f"/export/{concept_with_batch}/round-0.zip").status_code == 401
    assert auth_client.get("/config").status_code == 401
    assert world.store.label_events(concept_with_batch) == []


def test_with_auth_labels_carry_the_signed_in_name_only(auth_client: TestClient, world: World, concept_with_batch: str) -> None:
    assert _login(auth_client, "alice", "pw-a") == 200
    assert auth_client.get(f"/image/{world.ids[0]}").status_code == 200
    r = _labels(auth_client, world, concept_with_batch, 1, rater="bob")  # trying to rate as bob
    assert r.status_code == 403
    r = _labels(auth_client, world, concept_with_batch, 2, rater=None)
    assert r.status_code == 200 and r.json()["rater"] == "alice"
    r = _labels(auth_client, world, concept_with_batch, 3, rater="alice", prefix="ev2")
    assert r.status_code == 200
    assert {x["rater"] for x in world.store.label_events(concept_with_batch)} == {"alice"}
    session = auth_client.get("/api/session").json()
    assert session == {"auth": True, "user": "alice", "concepts": [concept_with_batch]}


def test_wrong_passwords_are_throttled(auth_client: TestClient) -> None:
    assert [_login(auth_client, "alice", "nope") for _ in range(3)] == [400, 400, 400]
    r = auth_client.post("/login", data={"username": "alice", "password": "pw-a"})
    assert r.status_code == 429  # even the right password waits out the back-off
    assert int(r.headers["retry-after"]) >= 1


def test_raters_posting_at_once_lose_nothing(server: str, world: World, concept_with_batch: str) -> None:
    import json
    import threading
    import urllib.request

    batch = world.service.batches.latest(concept_with_batch)
    assert batch is not None
    errors: list[str] = []

    def rater(name: str) -> None:
        for start in range(0, len(batch.order), 2):
            events = [{"concept": concept_with_batch, "image_id": i, "label": "positive" if k % 2 else "negative",
                       "event_id": f"{name}-{start + k:04d}", "batch_id": batch.batch_id}
                      for k, i in enumerate(batch.order[start:start + 2])]
            for _attempt in range(2):  # every post sent twice: a retry after a lost answer
                req = urllib.request.Request(f"{server}/api/labels", method="POST",
                                             data=json.dumps({"rater": name, "events": events}).encode(),
                                             headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(req, timeout=30) as resp:
                        assert resp.status == 200
                except Exception as exc:
                    errors.append(f"{name}: {exc}")

    threads = [threading.Thread(target=rater, args=(f"rater{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    rows = world.store.label_events(concept_with_batch)
    assert len(rows) == 4 * len(batch.order)  # none lost, none duplicated
    assert {r["rater"] for r in rows} == {f"rater{n}" for n in range(4)}
