"""Uploaded exemplars (lib/uploads.py): validated by the safe decoder, content-addressed,
embedded on the fly, findable by ``vectors_for`` and never part of the train or test split."""

import hashlib
from pathlib import Path

import numpy as np
import pytest

from agile_pipeline.lib.encoders import load_encoder
from agile_pipeline.lib.state import UPLOAD_SPLIT, StateError, StateStore
from agile_pipeline.lib.uploads import (
    UploadRejected,
    add_uploaded_exemplar,
    clean_filename,
    has_vector,
    read_upload_file,
)
from agile_pipeline.lib.vectors import VectorStore
from agile_pipeline.settings import Paths
from tests.hostile_images import write_hostile_images, write_real_like_images
from tests.labeling_ui.fakes import ingest_images


class Env:
    def __init__(self, root: Path) -> None:
        self.paths = Paths(root / "home").ensure()
        self.store = StateStore(self.paths.state_db)
        self.vectors = VectorStore(self.paths.lancedb, cache_dir=self.paths.cache)
        self.encoder = load_encoder("random:32")
        self.model_id = str(self.encoder.model_id)
        # a small corpus: 12 images in the manifest (train split) and in the vector table
        self.corpus_paths = write_real_like_images(root / "corpus", 12, seed=21)
        self.corpus_ids = ingest_images(self.store, root / "corpus", 12)
        vecs = self.encoder.embed_images([_rgb(p) for p in self.corpus_paths])
        self.vectors.add(self.model_id, self.corpus_ids, ["train"] * 12, vecs)
        self.store.create_concept("red things", ["red apple"])

    def upload(self, data: bytes, **kw: object):  # type: ignore[no-untyped-def]
        kw.setdefault("added_by", "alice")
        return add_uploaded_exemplar(self.store, self.vectors, self.encoder, self.paths.blobs,
                                     kw.pop("concept", "red things"), data, **kw)  # type: ignore[arg-type]

    def nothing_written(self) -> None:
        assert self.store.exemplars("red things") == []
        assert self.store.label_events("red things") == []
        assert self.store.count_images() == {"train": 12}
        assert self.vectors.count(self.model_id) == 12
        assert not any(p.is_file() for p in self.paths.blobs.rglob("*"))


def _rgb(path: Path):  # type: ignore[no-untyped-def]
    from agile_pipeline.lib.images import load_rgb

    return load_rgb(path)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


@pytest.fixture(scope="module")
def new_picture(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return write_real_like_images(tmp_path_factory.mktemp("new"), 1, seed=99)[0].read_bytes()


def test_good_upload_is_stored_embedded_and_an_exemplar_outside_train_and_test(env: Env, new_picture: bytes) -> None:
    version = env.vectors.version(env.model_id)
    res = env.upload(new_picture, filename="C:\\Users\\me\\My red\u202e apple.png")
    image_id = hashlib.blake2b(new_picture, digest_size=16).hexdigest()
    assert res.image_id == image_id and not res.in_corpus and res.stored
    # the file, content-addressed under blobs/, and its manifest row (split "upload")
    assert res.path is not None and res.path.read_bytes() == new_picture
    assert res.path.is_relative_to(env.paths.blobs)
    row = env.store.image_rows([image_id])[0]
    assert row["split"] == UPLOAD_SPLIT and row["source"] == "upload" and row["path"] == str(res.path)
    assert row["uri"] == "upload:My red apple.png"
    # the exemplar and the uploader's label
    assert [(e["image_id"], e["polarity"], e["added_by"]) for e in env.store.exemplars("red things")] == [
        (image_id, "positive", "alice")]
    assert env.store.effective_labels("red things") == {image_id: 1}
    # its vector: what the encoder gives for the decoded file; found by vectors_for ...
    want = env.encoder.embed_images([_rgb(res.path)])[0]
    got = env.vectors.vectors_for(env.model_id, [image_id])[0]
    np.testing.assert_allclose(got, want, atol=2e-3)  # the "all" matrix is float16
    assert env.vectors.version(env.model_id) == version  # the corpus table is untouched
    # ... but in neither split, and the corpus assets never see it (no split to assign)
    assert image_id not in set(env.vectors.matrix(env.model_id, "train").ids)
    assert image_id not in set(env.vectors.matrix(env.model_id, "test").ids)
    hits = env.vectors.search(env.model_id, want, 50, split="train")
    assert image_id not in {h[0] for h in hits}
    assert image_id not in env.store.all_image_splits()
    assert image_id not in env.store.images_without_split()
    assert env.store.count_images() == {"train": 12, UPLOAD_SPLIT: 1}


def test_the_same_file_twice_is_one_exemplar_and_no_new_vector(env: Env, new_picture: bytes) -> None:
    from agile_pipeline.lib.vectors import uploads_table_name

    first = env.upload(new_picture)
    uploads = env.vectors.db.open_table(uploads_table_name(env.model_id))
    version = uploads.version
    again = env.upload(new_picture, added_by="bob")
    assert again.image_id == first.image_id and not again.stored and not again.in_corpus
    uploads.checkout_latest()
    assert uploads.version == version  # nothing rewritten
    assert env.vectors.count(env.model_id) == 12  # uploads are not corpus rows
    assert env.vectors.upload_ids(env.model_id, [first.image_id]) == {first.image_id}
    assert len(env.store.exemplars("red things")) == 1
    # a negative exemplar of it replaces the polarity
    env.upload(new_picture, polarity="negative")
    assert [e["polarity"] for e in env.store.exemplars("red things")] == ["negative"]


def test_a_file_that_is_already_a_corpus_image_uses_that_image(env: Env) -> None:
    data = env.corpus_paths[3].read_bytes()
    version = env.vectors.version(env.model_id)
    res = env.upload(data, polarity="negative")
    assert res.in_corpus and not res.stored and res.image_id == env.corpus_ids[3]
    assert res.path == env.corpus_paths[3]
    assert env.vectors.version(env.model_id) == version
    assert env.store.count_images() == {"train": 12}
    assert not any(p.is_file() for p in env.paths.blobs.rglob("*"))
    assert [(e["image_id"], e["polarity"]) for e in env.store.exemplars("red things")] == [
        (env.corpus_ids[3], "negative")]


def test_repairs_a_missing_vector_or_blob_on_a_repeated_upload(env: Env, new_picture: bytes) -> None:
    res = env.upload(new_picture)
    assert res.path is not None
    res.path.unlink()
    from agile_pipeline.lib.vectors import uploads_table_name

    env.vectors.db.open_table(uploads_table_name(env.model_id)).delete(f"id = '{res.image_id}'")
    assert not has_vector(env.vectors, env.model_id, res.image_id)
    again = env.upload(new_picture)
    assert again.stored and res.path.read_bytes() == new_picture
    assert has_vector(env.vectors, env.model_id, res.image_id)




@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str | None]]:
    folder = tmp_path_factory.mktemp("hostile")
    return folder, write_hostile_images(folder)


def test_every_hostile_file_is_refused_with_its_reason_and_nothing_is_written(
    env: Env, hostile: tuple[Path, dict[str, str | None]]
) -> None:
    folder, expected = hostile
    bad = {name: reason for name, reason in expected.items() if reason is not None}
    assert {"empty_file", "not_an_image", "truncated", "corrupt", "decompression_bomb"} <= set(bad.values())
    for name, reason in bad.items():
        with pytest.raises(UploadRejected) as err:
            env.upload((folder / name).read_bytes(), filename=name)
        assert err.value.reason == reason, name
        assert str(err.value) and "Traceback" not in str(err.value)
    env.nothing_written()


def test_messages_say_what_is_wrong(env: Env, hostile: tuple[Path, dict[str, str | None]], new_picture: bytes) -> None:
    folder, _ = hostile
    cases = {"notes.txt": "not an image", "truncated.jpg": "cut off", "corrupt_mid.png": "damaged",
             "bomb_10k.png": "too many pixels", "empty.jpg": "empty"}
    for name, words in cases.items():
        with pytest.raises(UploadRejected, match=words):
            env.upload((folder / name).read_bytes())
    with pytest.raises(UploadRejected, match=r"over the size limit of 0\.0 MB") as err:
        env.upload(new_picture, max_bytes=100)
    assert err.value.reason == "too_large_file"
    env.nothing_written()


def test_unknown_concept_or_polarity_writes_nothing(env: Env, new_picture: bytes) -> None:
    with pytest.raises(StateError, match="unknown concept"):
        env.upload(new_picture, concept="nope")
    with pytest.raises(StateError, match="positive or negative"):
        env.upload(new_picture, polarity="maybe")
    with pytest.raises(StateError, match="not allowed"):
        env.upload(new_picture, concept="../etc")
    env.nothing_written()


def test_read_upload_file_caps_size_and_explains(tmp_path: Path, new_picture: bytes) -> None:
    p = tmp_path / "x.png"
    p.write_bytes(new_picture)
    assert read_upload_file(p) == new_picture
    with pytest.raises(UploadRejected, match="size limit") as err:
        read_upload_file(p, max_bytes=10)
    assert err.value.reason == "too_large_file"
    with pytest.raises(UploadRejected, match="cannot be read"):
        read_upload_file(tmp_path / "missing.png")
    with pytest.raises(UploadRejected, match="cannot be read"):
        read_upload_file(tmp_path)


def test_clean_filename() -> None:
    assert clean_filename("../../etc/passwd") == "passwd"
    assert clean_filename("a\\b\\c d.jpg") == "c d.jpg"
    assert clean_filename("x\x00y\n z.png") == "xy z.png"
    assert clean_filename(None) == ""
    assert len(clean_filename("a" * 500)) == 120


def test_cli_exemplar_file_upload_and_clear_errors(env: Env, new_picture: bytes, tmp_path: Path,
                                                   hostile: tuple[Path, dict[str, str | None]],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from agile_pipeline.cli import app

    monkeypatch.setenv("AGILE_HOME", str(env.paths.home))
    monkeypatch.setenv("AGILE_ENCODER", "random:32")
    runner = CliRunner()
    folder, _ = hostile

    def run(*args: str):  # type: ignore[no-untyped-def]
        return runner.invoke(app, ["concept", "exemplar", *args])

    for name, words in {"bomb_10k.png": "too many pixels", "truncated.jpg": "cut off",
                        "notes.txt": "not an image"}.items():
        r = run("red things", "--file", str(folder / name))
        assert r.exit_code == 1 and words in r.output and "Traceback" not in r.output, r.output
    r = run("red things", "--file", str(tmp_path / "nope.jpg"))
    assert r.exit_code == 1 and "cannot be read" in r.output
    r = run("red things")
    assert r.exit_code == 1 and "say which image" in r.output
    r = run("red things", env.corpus_ids[0], "--file", str(folder / "normal.png"))
    assert r.exit_code == 1 and "not both" in r.output
    r = run("no such", "--file", str(folder / "normal.png"))
    assert r.exit_code == 1 and "unknown concept" in r.output
    env.nothing_written()

    pic = tmp_path / "pic.png"
    pic.write_bytes(new_picture)
    r = run("red things", "--file", str(pic), "--negative", "--rater", "dora")
    assert r.exit_code == 0, r.output
    image_id = hashlib.blake2b(new_picture, digest_size=16).hexdigest()
    assert f"uploaded {pic} as image {image_id}" in r.output and "negative exemplar" in r.output
    assert [(e["image_id"], e["polarity"], e["added_by"]) for e in env.store.exemplars("red things")] == [
        (image_id, "negative", "dora")]
    assert has_vector(env.vectors, env.model_id, image_id)
    # a corpus file is recognised; the image-id form still works
    r = run("red things", "--file", str(env.corpus_paths[2]))
    assert r.exit_code == 0 and f"already in the corpus (image {env.corpus_ids[2]})" in r.output, r.output
    r = run("red things", env.corpus_ids[4])
    assert r.exit_code == 0 and f"added positive exemplar {env.corpus_ids[4]}" in r.output, r.output
    assert len(env.store.exemplars("red things")) == 3
