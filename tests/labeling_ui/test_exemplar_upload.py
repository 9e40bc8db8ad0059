"""Uploading an image file as an exemplar through the app (POST /api/exemplars/upload)."""

import hashlib
import io
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from agile_pipeline.lib.state import UPLOAD_SPLIT
from agile_pipeline.lib.uploads import has_vector
from agile_pipeline.lib.vectors import VectorStore
from agile_pipeline.settings import Paths
from labeling_ui.app import build_app
from labeling_ui.config import UiSettings
from labeling_ui.service import LabelingService
from tests.hostile_images import write_hostile_images, write_real_like_images
from tests.labeling_ui.conftest import LOCAL, World

URL = "/api/exemplars/upload"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("upload-files")
    write_hostile_images(folder)
    out = {p.name: p.read_bytes() for p in folder.iterdir()}
    out["new.png"] = write_real_like_images(tmp_path_factory.mktemp("new"), 1, seed=777)[0].read_bytes()
    return out


def _up(client: TestClient, concept: str, data: bytes, *, rater: str | None = "bob",
        ctype: str = "application/octet-stream", **params: str):  # type: ignore[no-untyped-def]
    q = {"concept": concept, **params}
    if rater is not None:
        q["rater"] = rater
    return client.post(URL, params=q, content=data, headers={"Content-Type": ctype})


def _vectors(world: World) -> VectorStore:
    paths = Paths(world.home)
    return VectorStore(paths.lancedb, cache_dir=paths.cache)


def _nothing_written(world: World, concept: str) -> None:
    assert world.store.exemplars(concept) == [] and world.store.label_events(concept) == []
    assert world.store.count_images() == {"train": 60}


def test_upload_is_an_exemplar_shown_embedded_and_served(client: TestClient, world: World, concept_with_batch: str,
                                                         files: dict[str, bytes]) -> None:
    c = concept_with_batch
    data = files["new.png"]
    image_id = hashlib.blake2b(data, digest_size=16).hexdigest()
    r = _up(client, c, data, name="my photo.png", ctype="image/png")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["image_id"] == image_id and body["rater"] == "bob" and body["in_corpus"] is False
    assert body["exemplars"] == [{"image_id": image_id, "polarity": "positive", "added_by": "bob"}]
    # stored with the concept, counted as bob's yes, listed with the batch
    data_view = client.get("/api/batch", params={"concept": c, "rater": "bob"}).json()
    assert [e["image_id"] for e in data_view["concept"]["exemplars"]] == [image_id]
    assert data_view["counts"]["positive"] == 1
    assert [(x["rater"], x["label"], x["source"]) for x in world.store.label_events(c)] == [
        ("bob", "positive", "exemplar")]
    # embedded now, with the app's encoder; outside the train and test splits
    vectors = _vectors(world)
    assert has_vector(vectors, "random-32", image_id)
    assert vectors.vectors_for("random-32", [image_id]).shape == (1, 32)
    assert world.store.image_rows([image_id])[0]["split"] == UPLOAD_SPLIT
    assert image_id not in world.store.all_image_splits()
    # served by id like any image (a re-encoded thumbnail, never the file)
    img = client.get(f"/image/{image_id}")
    assert img.status_code == 200 and img.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(img.content)) as im:
        assert im.format == "JPEG" and im.size[0] > 0
    # the same file again, as a counter-example: one exemplar, now negative
    r = _up(client, c, data, polarity="negative")
    assert r.status_code == 200 and r.json()["exemplars"][0]["polarity"] == "negative"
    assert len(world.store.exemplars(c)) == 1


def test_a_corpus_file_uses_the_corpus_image(client: TestClient, world: World, concept_with_batch: str) -> None:
    path = world.store.image_path(world.ids[7])
    assert path is not None
    r = _up(client, concept_with_batch, path.read_bytes())
    assert r.status_code == 200, r.text
    assert r.json()["image_id"] == world.ids[7] and r.json()["in_corpus"] is True
    assert world.store.count_images() == {"train": 60}


@pytest.mark.parametrize(("name", "words"), [
    ("bomb_10k.png", "too many pixels"),
    ("bomb_header_30k.png", "too many pixels"),
    ("truncated.jpg", "cut off"),
    ("corrupt_mid.png", "damaged"),
    ("notes.txt", "not an image"),
    ("vector.svg", "not an image"),
    ("empty.jpg", "empty"),
])
def test_bad_files_get_a_clear_json_error_and_write_nothing(
    client: TestClient, world: World, concept_with_batch: str, files: dict[str, bytes], name: str, words: str
) -> None:
    r = _up(client, concept_with_batch, files[name], name=name)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/json"
    assert words in r.json()["detail"] and f"cannot use “{name}” as an exemplar" in r.json()["detail"]
    _nothing_written(world, concept_with_batch)
    assert not any(p.is_file() for p in Paths(world.home).blobs.rglob("*"))


def test_bad_requests_are_refused_before_anything_is_written(
    client: TestClient, world: World, concept_with_batch: str, files: dict[str, bytes]
) -> None:
    c, good = concept_with_batch, files["new.png"]
    # not a raw image body: HTML forms (CSRF), JSON, text
    for ctype in ("multipart/form-data; boundary=x", "application/x-www-form-urlencoded", "text/plain",
                  "application/json"):
        r = _up(client, c, good, ctype=ctype)
        assert r.status_code == 415 and "image file itself" in r.json()["detail"], ctype
    r = client.post(URL, params={"concept": c, "rater": "bob"}, files={"file": ("a.png", good, "image/png")})
    assert r.status_code == 415  # multipart uploads are not accepted either
    r = client.post(URL, params={"concept": c, "rater": "bob"}, content=good,
                    headers={"Content-Type": "image/png", "Origin": "https://evil.example"})
    assert r.status_code == 403
    assert _up(client, c, good, rater=None).status_code == 400  # who is it?
    assert _up(client, c, good, rater="../x").status_code == 400
    assert _up(client, "no such concept", good).status_code == 400
    assert _up(client, "../etc", good).status_code == 400
    r = _up(client, c, good, polarity="maybe")
    assert r.status_code == 400 and "positive or negative" in r.json()["detail"]
    _nothing_written(world, c)
    # Gradio's own upload route stays closed
    assert client.post("/gradio_api/upload", files={"files": ("a.png", good, "image/png")}).status_code == 404


def test_the_upload_size_cap(world: World, concept_with_batch: str, files: dict[str, bytes]) -> None:
    good = files["new.png"]
    app = build_app(UiSettings(home=world.home, upload_max_bytes=len(good) - 1), service=world.service)
    with TestClient(app, base_url=LOCAL) as client:
        r = _up(client, concept_with_batch, good)
        assert r.status_code == 413 and "upload limit" in r.json()["detail"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: the cap applies while reading
            yield good[:100]
            yield good[100:]

        r = client.post(URL, params={"concept": concept_with_batch, "rater": "bob"}, content=chunks(),
                        headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 413
    _nothing_written(world, concept_with_batch)


def test_with_auth_the_upload_is_the_signed_in_raters(auth_client: TestClient, world: World,
                                                      concept_with_batch: str, files: dict[str, bytes]) -> None:
    c, good = concept_with_batch, files["new.png"]
    assert _up(auth_client, c, good, rater=None).status_code == 401
    assert auth_client.get("/image/" + hashlib.blake2b(good, digest_size=16).hexdigest()).status_code == 401
    _nothing_written(world, c)
    assert auth_client.post("/login", data={"username": "alice", "password": "pw-a"}).status_code == 200
    assert _up(auth_client, c, good, rater="bob").status_code == 403  # not as someone else
    r = _up(auth_client, c, good, rater=None)
    assert r.status_code == 200, r.text
    assert r.json()["rater"] == "alice"
    assert [e["added_by"] for e in world.store.exemplars(c)] == ["alice"]
    assert auth_client.get(f"/image/{r.json()['image_id']}").status_code == 200


def test_no_embedding_model_is_a_503_with_a_plain_message(world: World, concept_with_batch: str,
                                                           files: dict[str, bytes]) -> None:
    service = LabelingService(world.store, world.trigger, home=world.home, encoder_spec="no-such-encoder:x")
    app = build_app(UiSettings(home=world.home), service=service)
    with TestClient(app, base_url=LOCAL) as client:
        r = _up(client, concept_with_batch, files["new.png"])
    assert r.status_code == 503 and "could not be embedded" in r.json()["detail"]
    assert "no-such-encoder" not in r.json()["detail"]
    _nothing_written(world, concept_with_batch)
