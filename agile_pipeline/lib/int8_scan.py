"""Int8 scans: a trained MLP over every row of a split cache with FBGEMM's uint8 × int8 kernels.

On a CPU without native bfloat16 (AVX2 only), the per-round scan of millions of rows through
the paper's MLP (512→128→128→128→1, ~0.2 MFLOP per row) runs at float32 GEMM speed, ~80–110
GFLOP/s on two cores. PyTorch's quantized ``linear_relu`` (FBGEMM, ``vpmaddubsw``) does the
same products in 8-bit integers at ~2–3x that rate, and the scan reads half the bytes of the
bfloat16 copy. This module provides:

* :func:`u8_rows` — the split's L2-normalised rows quantized once per table version to
  ``uint8`` (per-tensor scale from the largest |coordinate|, zero point 64, values in 1..127),
  stored beside the bfloat16 file;
* :class:`Int8Plan` — a picklable plan (weights, biases, calibrated activation scales) that a
  process or Ray task turns into prepacked FBGEMM weights and runs over a row range.

Accuracy is that of 7-bit activations: probabilities typically within ~1e-2 of float32. The
callers never trust them blindly: :func:`agile_pipeline.lib.selection.select_margin_exact`
re-scores a shortlist in float32 and proves it large enough with the error it measures, and
:class:`agile_pipeline.lib.evalset.SplitScores` refines every row whose eval-set stratum could
change. Activations use 7 bits (``reduce_range``): with 8-bit activations the pairwise int16
sums inside ``vpmaddubsw`` can saturate.
"""

import ctypes
import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agile_pipeline.lib.npy_io import NpyWriter, iter_npy_rows, npy_header

log = logging.getLogger(__name__)

X_ZERO_POINT = 64  # uint8 rows: round(x / scale) + 64, in 1..127 (7 bits, see module doc)
X_LEVELS = 63
ACT_LEVELS = 127  # ReLU outputs: round(h / scale), in 0..127
CALIBRATION_ROWS = 16384
HEADROOM = 1.5  # activation range = 1.5x the largest value seen on the calibration rows


def supported() -> bool:
    """Whether this PyTorch has the x86 (FBGEMM) quantized engine."""
    import torch

    engines = torch.backends.quantized.supported_engines
    return "x86" in engines or "fbgemm" in engines


def _engine() -> None:
    import torch

    if torch.backends.quantized.engine not in ("x86", "fbgemm"):
        torch.backends.quantized.engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"


def _quantize(x: Any, scale: float, zero_point: int, dtype: Any) -> Any:
    import torch

    with warnings.catch_warnings():  # "quantized tensor creation functions are deprecated"
        warnings.simplefilter("ignore")
        return torch.quantize_per_tensor(x, scale, zero_point, dtype)


def _empty_quint8(rows: int, dim: int, scale: float) -> Any:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch._empty_affine_quantized((rows, dim), scale=scale, zero_point=X_ZERO_POINT,
                                             dtype=torch.quint8)


def _prepack(W: Any, b: Any) -> Any:
    """FBGEMM's prepacked form of ``Linear(W, b)``: ``W`` per output channel symmetric int8."""
    import torch

    scales = (W.abs().amax(dim=1) / 127).clamp_min(1e-12).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qw = torch.quantize_per_channel(W, scales, torch.zeros(W.shape[0], dtype=torch.long), 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(qw, b)


def _numpy_view(q: Any) -> np.ndarray:
    """A writable uint8 NumPy view of a contiguous quint8 tensor's memory (no copy)."""
    rows, dim = q.shape
    raw = (ctypes.c_uint8 * (rows * dim)).from_address(q.data_ptr())
    return np.ctypeslib.as_array(raw).reshape(rows, dim)


# ---- the uint8 copy of a split --------------------------------------------------------------
def _bf16_to_f32(rows: np.ndarray) -> np.ndarray:
    return (rows.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def u8_rows(bf16_path: Path, *, chunk: int = 1 << 16) -> tuple[Path, float]:
    """The uint8 copy of a split cache's bfloat16 rows and its scale, built on first use.

    Two streaming passes over the bfloat16 file (the largest |coordinate|, then the quantized
    rows), written to a temporary file and renamed, so a crash never leaves a half file; a
    10M-row table (5M rows per split, 512-d) takes tens of seconds once per table version.
    """
    import torch

    bf16_path = Path(bf16_path)
    out = bf16_path.with_name(bf16_path.name.replace(".bf16.npy", ".u8.npy"))
    scale_path = out.with_name(out.name.replace(".u8.npy", ".u8scale.npy"))
    if out.exists() and scale_path.exists():
        return out, float(np.load(scale_path)[0])
    t0 = time.perf_counter()
    _, (n, dim), _ = npy_header(bf16_path)
    top = 0
    for _, rows in iter_npy_rows(bf16_path, chunk):  # |x| is monotone in the bf16 bit pattern
        if rows.size:
            top = max(top, int((rows.view(np.uint16) & np.uint16(0x7FFF)).max()))
    largest = float(np.array([top << 16], np.uint32).view(np.float32)[0])
    scale = max(largest, 1e-12) / X_LEVELS
    tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
    w = NpyWriter(tmp, np.uint8, (n, dim))
    for _, rows in iter_npy_rows(bf16_path, chunk):
        x = torch.from_numpy(_bf16_to_f32(rows))
        w.write(_quantize(x, scale, X_ZERO_POINT, torch.quint8).int_repr().numpy())
    w.close()
    tmp_scale = scale_path.with_name(scale_path.name + f".{os.getpid()}.tmp")
    with open(tmp_scale, "wb") as f:
        np.save(f, np.array([scale], np.float64))
    tmp.replace(out)
    tmp_scale.replace(scale_path)
    log.info("uint8 rows %s: %d rows in %.1fs (scale %.3g)", out.name, n, time.perf_counter() - t0, scale)
    return out, scale


# ---- the quantized model ---------------------------------------------------------------------
def _layers(module: Any) -> tuple[bool, list[tuple[np.ndarray, np.ndarray]]]:
    """``(first layer is L2NormLinear, [(W, b) per Linear])`` of a ``Linear → ReLU → … →
    Linear(·, 1)`` MLP (dropout ignored); ``TypeError`` for anything else."""
    from torch import nn

    from agile_pipeline.lib.training import L2NormLinear

    layers = [m for m in module if not isinstance(m, nn.Dropout)]
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    want = [nn.Linear if i % 2 == 0 else nn.ReLU for i in range(len(layers))]
    if not linears or any(not isinstance(m, t) for m, t in zip(layers, want, strict=True)):
        raise TypeError("expected Linear → ReLU → … → Linear")
    return isinstance(layers[0], L2NormLinear), [
        (m.weight.detach().float().numpy().copy(), m.bias.detach().float().numpy().copy())
        for m in linears]


def applicable(module: Any, norms: np.ndarray | None) -> bool:
    """Whether :class:`Int8Plan` can score this model on rows with these norms: at least one
    hidden layer, and a first layer that sees unit rows (``L2NormLinear``, or every row's
    norm within 1e-3 of 1)."""
    try:
        l2, lin = _layers(module)
    except TypeError:
        return False
    if len(lin) < 2:
        return False
    if l2 or norms is None or len(norms) == 0:
        return True
    n = np.asarray(norms, np.float32)
    return bool(np.abs(n - 1.0).max() <= 1e-3)


@dataclass
class Int8Plan:
    """Everything a process needs to run the int8 scan of one model over one split (picklable:
    plain arrays, so it travels to Ray tasks)."""

    u8_path: str
    x_scale: float
    hidden: list[tuple[np.ndarray, np.ndarray, float]]  # (W, b, output scale) per hidden layer
    last: tuple[np.ndarray, np.ndarray]  # (w, b) of Linear(·, 1), float32

    @classmethod
    def calibrate(cls, module: Any, u8_path: Path, x_scale: float, calibration: np.ndarray) -> "Int8Plan":
        """Activation scales from the float32 forward pass of ``calibration`` (unit rows)."""
        _, lin = _layers(module)
        h = np.asarray(calibration, np.float32)
        hidden = []
        for W, b in lin[:-1]:
            h = np.maximum(h @ W.T + b, 0.0)
            top = float(h.max(initial=0.0))
            hidden.append((W, b, max(top * HEADROOM, 1e-6) / ACT_LEVELS))
        return cls(str(u8_path), float(x_scale), hidden, lin[-1])

    def scorer(self) -> Callable[[Any], Any]:
        """``quint8 rows → float32 P(positive)`` with the weights prepacked for FBGEMM."""
        import torch

        _engine()
        packed = [(_prepack(torch.from_numpy(W), torch.from_numpy(b)), out_scale)
                  for W, b, out_scale in self.hidden]
        w_last = torch.from_numpy(self.last[0]).reshape(-1)
        b_last = torch.from_numpy(self.last[1]).reshape(())

        def score(q: Any) -> Any:
            h = q
            for p, s in packed:
                h = torch.ops.quantized.linear_relu(h, p, s, 0)
            return torch.addmv(b_last, h.dequantize(), w_last).sigmoid_()

        return score

    def score(self, start: int = 0, stop: int | None = None, *, chunk: int = 1 << 14,
              threads: int | None = None) -> np.ndarray:
        """P(positive) of rows ``[start, stop)``, read straight into quantized tensors."""
        import torch

        from agile_pipeline.lib.torch_runtime import torch_threads

        _, (n, dim), _ = npy_header(Path(self.u8_path))
        stop = n if stop is None else min(stop, n)
        out = np.empty(max(0, stop - start), np.float32)
        if stop <= start:
            return out
        score = self.scorer()
        rows = min(chunk, stop - start)
        tensors = [_empty_quint8(rows, dim, self.x_scale) for _ in range(3)]
        by_addr = {t.data_ptr(): t for t in tensors}
        with torch_threads(threads), torch.inference_mode():
            for at, buf in iter_npy_rows(Path(self.u8_path), chunk, start=start, stop=stop,
                                         buffers=[_numpy_view(t) for t in tensors]):
                q = by_addr[buf.ctypes.data][: buf.shape[0]]
                out[at - start : at - start + buf.shape[0]] = score(q).numpy()
        return out


def plan_for(module: Any, bf16_path: Path, *, calibration_rows: int = CALIBRATION_ROWS,
             blocks: int = 16) -> Int8Plan:
    """The :class:`Int8Plan` of a model on a split (builds the uint8 rows on first use),
    calibrated on up to ``calibration_rows`` rows of the split read as ``blocks`` evenly spaced
    contiguous runs (a few sequential reads, not thousands of scattered page faults)."""
    u8_path, x_scale = u8_rows(Path(bf16_path))
    rows = np.load(bf16_path, mmap_mode="r")
    n = rows.shape[0]
    per = max(1, min(n, calibration_rows) // blocks)
    starts = np.unique(np.linspace(0, max(n - per, 0), blocks).astype(np.int64))
    parts = [np.asarray(rows[a : a + per]) for a in starts.tolist()] if n else []
    calib = _bf16_to_f32(np.concatenate(parts)) if parts else np.zeros((0, rows.shape[1]), np.float32)
    return Int8Plan.calibrate(module, u8_path, x_scale, calib)


def probe_product(a: Any, b: Any) -> Callable[[], Any]:
    """A closure computing ``relu(a @ b)`` the way the int8 scan does (quint8 rows, prepacked
    int8 weights, quint8 output), for :func:`agile_pipeline.lib.scan.scan_mode`'s timing."""
    import torch

    _engine()
    a_unit = a / a.norm(dim=1, keepdim=True)
    x_scale = float(a_unit.abs().max()) / X_LEVELS
    qa = _quantize(a_unit, x_scale, X_ZERO_POINT, torch.quint8)
    packed = _prepack(b.t().contiguous(), torch.zeros(b.shape[1]))
    return lambda: torch.ops.quantized.linear_relu(qa, packed, 0.05, 0)
