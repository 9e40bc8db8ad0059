"""The '+flip' encoder spec: vectors averaged over an image and its mirror, under their own id."""

import numpy as np
import pytest
from PIL import Image, ImageOps

from agile_pipeline.lib.encoders import (
    FlipAveragedEncoder,
    l2_normalize,
    load_encoder,
    model_id_for_spec,
    parse_spec,
)


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))


def test_spec_grammar_and_model_id() -> None:
    assert parse_spec("bundled+flip") == ("flip", ("bundled",))
    assert parse_spec("random:16+flip") == ("flip", ("random:16",))
    assert model_id_for_spec("random:16+flip") == "random-16-flip"
    assert model_id_for_spec("bundled+flip") == model_id_for_spec("bundled") + "-flip"
    for bad in ("+flip", "bundled+flip+flip", "nonsense+flip"):
        with pytest.raises(ValueError, match="bad encoder spec"):
            model_id_for_spec(bad)


def test_vectors_are_the_mean_over_the_image_and_its_mirror() -> None:
    enc = load_encoder("random:16+flip")
    assert isinstance(enc, FlipAveragedEncoder) and enc.model_id == "random-16-flip" and enc.dim == 16
    base = load_encoder("random:16")
    images = [_image(0), _image(1)]
    got = enc.embed_images(images)
    want = l2_normalize(base.embed_images(images) + base.embed_images([ImageOps.mirror(i) for i in images]))
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.allclose(got, base.embed_images(images), atol=1e-3)  # it did change the vectors
    # a mirrored image gets the same vector: the augmentation makes the tower mirror-invariant
    np.testing.assert_allclose(enc.embed_images([ImageOps.mirror(images[0])]), got[:1], atol=1e-5)
    np.testing.assert_array_equal(enc.embed_texts(["a cat"]), base.embed_texts(["a cat"]))
