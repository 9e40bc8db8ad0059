"""What every image/text encoder shares: the :class:`ImageTextEncoder` interface and the
small pure helpers its implementations use (unit rows, RGB conversion, ids, seeds).

The implementations live in :mod:`agile_pipeline.lib.encoders` (random, open_clip, and the
spec registry) and :mod:`agile_pipeline.lib.bundled_encoder`; both import this module.
"""

import abc
import hashlib
import re

import numpy as np
from PIL import Image

_EPS = 1e-12


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); all-zero rows stay zero instead of dividing by 0."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return (x / np.maximum(norm, _EPS)).astype(np.float32, copy=False)


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """RGB view of ``image``; transparent pixels are composited onto ``background`` (white).

    ``Image.convert("RGB")`` alone would expose whatever colour hides under alpha 0 (often
    black), which changes what a model sees for icons and PNG cut-outs.
    """
    if image.mode == "RGB":
        return image
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info
    )
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (*background, 255))
    canvas.alpha_composite(rgba)
    return canvas.convert("RGB")


def sanitize_model_id(text: str) -> str:
    """``text`` restricted to ``[A-Za-z0-9._-]`` so it can name a LanceDB table or a folder."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


class ImageTextEncoder(abc.ABC):
    """Maps images and texts into one L2-normalised space (cosine = dot product).

    ``preprocess`` is pure PIL/numpy work and thread-safe, so callers can run it in worker
    threads; ``embed_preprocessed`` runs the network and is meant for one thread at a time.
    """

    #: Stable identifier; changes whenever the vectors would change. Names the LanceDB table.
    model_id: str
    #: Length of every vector.
    dim: int

    @abc.abstractmethod
    def preprocess(self, image: Image.Image) -> np.ndarray:
        """One PIL image (any mode; converted to RGB) -> float32 ``(C, H, W)`` network input."""

    @abc.abstractmethod
    def embed_preprocessed(self, batch: np.ndarray) -> np.ndarray:
        """``(n, C, H, W)`` from :meth:`preprocess` -> ``(n, dim)`` float32, unit rows."""

    @abc.abstractmethod
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Phrases -> ``(n, dim)`` float32 unit rows, comparable with image vectors."""

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        """Convenience: preprocess and embed a list of PIL images -> ``(n, dim)`` float32."""
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.embed_preprocessed(np.stack([self.preprocess(im) for im in images]))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model_id={self.model_id!r}, dim={self.dim})"


def stable_seed(*parts: str) -> int:
    """64-bit seed from strings, identical across processes and machines (unlike ``hash``)."""
    h = hashlib.blake2b("\x1f".join(parts).encode("utf-8"), digest_size=8)
    return int.from_bytes(h.digest(), "little")

