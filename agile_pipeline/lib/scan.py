"""Whole-split scans: a classifier, a text vector or a few query vectors against every row of a
split cache, streamed in large chunks.

* :func:`scan_mode` — how scans compute on this CPU (bfloat16, int8 or float32), decided once
  per process by a short probe; :func:`float_scan_mode` for scans that need float accuracy.
* :func:`scan_plan` / :func:`score_approx` — a trained classifier over a whole split: a
  :class:`FloatPlan` (bfloat16 or float32 over the bfloat16 rows, :class:`BF16Scorer`) or an
  :class:`~agile_pipeline.lib.int8_scan.Int8Plan`; on Ray when configured.
  :func:`exact_scores` re-scores chosen rows in float32.
* :func:`prepare_scans` — builds what the chosen mode reads (the uint8 copy in int8 mode)
  ahead of the first round.
* :func:`matvec_f16`, :func:`nearest_in_split`, :func:`merge_top_columns` — text or query
  vectors against the float16 matrix (zero-shot scores, text-to-image expansion).

All pure NumPy/torch (no Dagster, no Gradio).
"""

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agile_pipeline.lib.npy_io import iter_npy_rows, npy_header
from agile_pipeline.lib.split_cache import SplitCache
from agile_pipeline.lib.working_set import RowSource

log = logging.getLogger(__name__)


_SCAN_MODE: list[str] = []
SCAN_MODES = ("bf16", "int8", "fp32")


def scan_mode() -> str:
    """How scans of whole splits compute on this CPU: ``"bf16"`` where it multiplies bfloat16
    natively (AVX512-BF16 / AMX: several times float32's speed), else ``"int8"`` where PyTorch's
    FBGEMM uint8 × int8 kernels are clearly faster than float32 (AVX2: ~2–3x), else ``"fp32"``
    (bfloat16-stored rows widened; on an AVX2-only CPU bfloat16 matmuls are emulated and ~100x
    *slower* than float32).

    Decided once per process by timing a small product of each kind; ``AGILE_SCAN_DTYPE=
    bf16|int8|fp32`` overrides. Whatever the mode, callers that need float32 answers re-score
    what could change them (:func:`select_margin_exact`, :class:`SplitScores`)."""
    import torch

    if _SCAN_MODE:
        return _SCAN_MODE[0]
    from agile_pipeline.lib import int8_scan

    forced = os.environ.get("AGILE_SCAN_DTYPE", "").strip().lower()
    forced = {"bfloat16": "bf16", "float32": "fp32"}.get(forced, forced)
    if forced == "int8" and not int8_scan.supported():
        log.warning("AGILE_SCAN_DTYPE=int8 but this PyTorch has no x86/FBGEMM quantized engine")
        forced = ""
    if forced in SCAN_MODES:
        choice = forced
    else:
        if forced:
            log.warning("AGILE_SCAN_DTYPE=%r is not one of %s; choosing by measurement", forced, SCAN_MODES)
        gen = torch.Generator().manual_seed(0)
        # a scan-sized chunk for float32 and int8; bfloat16 on an eighth of it (where it is
        # emulated, a full chunk takes a second), timed per row
        a, b = torch.randn(16384, 512, generator=gen), torch.randn(512, 128, generator=gen)

        def best(f: Any, rows: int) -> float:
            f()  # warm up
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                f()
                times.append(time.perf_counter() - t0)
            return min(times) / rows

        with torch.inference_mode():
            t = {"fp32": best(lambda: a @ b, len(a))}
            a16, b16 = a[:2048].to(torch.bfloat16), b.to(torch.bfloat16)
            t["bf16"] = best(lambda: a16 @ b16, len(a16))
            if int8_scan.supported():
                t["int8"] = best(int8_scan.probe_product(a, b), len(a))
        choice = "fp32"
        if t["bf16"] < 0.8 * t["fp32"]:
            choice = "bf16"
        if "int8" in t and t["int8"] < 0.6 * t[choice]:  # worth its coarser first pass
            choice = "int8"
        log.info("scan mode %s (rows x 512 @ 512x128 per 1k rows: %s)", choice,
                 ", ".join(f"{k} {v * 1e6:.2f} ms" for k, v in t.items()))
    _SCAN_MODE.append(choice)
    return choice


def scan_compute_dtype() -> Any:
    """The float dtype of float scans: ``torch.bfloat16`` in ``"bf16"`` mode, else float32."""
    import torch

    return torch.bfloat16 if scan_mode() == "bf16" else torch.float32


class BF16Scorer:
    """A trained MLP (``Linear``/``L2NormLinear`` → ReLU → … → ``Linear(·, 1)``) evaluated on
    the split cache's L2-normalised bfloat16 rows, computing in :func:`scan_compute_dtype`
    (bfloat16 ``addmm`` with float32 accumulation where the CPU has native bfloat16, else the
    rows widened to float32); the sigmoid in float32.

    Accuracy: |P_approx − P_fp32| is typically ~1e-3 (8-bit mantissas of the rows, and of the
    activations in bfloat16); callers that need the float32 answer re-score a shortlist
    exactly (:func:`select_margin_exact`, :class:`SplitScores`), with the error bound
    measured, not assumed.
    """

    def __init__(self, module: Any, dtype: Any = None) -> None:
        from torch import nn

        from agile_pipeline.lib.training import L2NormLinear

        layers = [m for m in module if not isinstance(m, nn.Dropout)]
        if not layers or not isinstance(layers[0], nn.Linear):
            raise TypeError("expected a Sequential starting with a Linear layer")
        for m in layers:
            if not isinstance(m, nn.Linear | nn.ReLU):
                raise TypeError(f"unsupported layer {type(m).__name__}")
        self.l2 = isinstance(layers[0], L2NormLinear)
        self.dtype = dtype if dtype is not None else scan_compute_dtype()
        self.ops: list[tuple[str, Any, Any]] = []
        for m in layers:
            if isinstance(m, nn.ReLU):
                self.ops.append(("relu", None, None))
            else:
                self.ops.append(("linear", m.weight.detach().to(self.dtype).t().contiguous(),
                                 m.bias.detach().to(self.dtype).clone()))

    def __call__(self, x_unit: Any, norms: Any) -> Any:
        """P(positive) for L2-normalised bfloat16 rows ``x_unit`` with original ``norms``."""
        import torch

        h = x_unit if x_unit.dtype == self.dtype else x_unit.to(self.dtype)
        first = True
        for kind, w, b in self.ops:
            if kind == "relu":
                h = torch.relu_(h)
                continue
            if first and not self.l2:  # a plain first layer sees the raw row: |x| (W x̂) + b
                h = torch.mm(h, w).mul_(norms.to(self.dtype).unsqueeze(1)).add_(b)
            else:
                h = torch.addmm(b, h, w)
            first = False
        return h.squeeze(1).float().sigmoid_()


@dataclass
class FloatPlan:
    """The bfloat16/float32 scan of one model over one split (picklable, for Ray tasks)."""

    module: Any
    bf16_path: str
    norms: np.ndarray

    def score(self, start: int = 0, stop: int | None = None, *, chunk: int = 1 << 14,
              threads: int | None = None) -> np.ndarray:
        """Approximate P(positive) of rows ``[start, stop)``."""
        import torch

        from agile_pipeline.lib.torch_runtime import torch_threads

        n = npy_header(Path(self.bf16_path))[1][0]
        stop = n if stop is None else min(stop, n)
        out = np.empty(max(0, stop - start), np.float32)
        if stop <= start:
            return out
        scorer = BF16Scorer(self.module)
        with torch_threads(threads), torch.inference_mode():
            norms = torch.from_numpy(np.ascontiguousarray(self.norms, np.float32))
            for at, rows in iter_npy_rows(Path(self.bf16_path), chunk, start=start, stop=stop):
                x = torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16)
                p = scorer(x, norms[at : at + rows.shape[0]])
                out[at - start : at - start + rows.shape[0]] = p.numpy()
        return out


def scan_plan(model: Any, cache: SplitCache, mode: str | None = None) -> Any:
    """How to scan ``cache`` with ``model``: an :class:`~agile_pipeline.lib.int8_scan.Int8Plan`
    in ``"int8"`` mode where the model allows it (:func:`int8_scan.applicable`), else a
    :class:`FloatPlan`. Both have ``score(start, stop, *, chunk, threads)``."""
    from agile_pipeline.lib import int8_scan

    mode = mode or scan_mode()
    if mode == "int8" and int8_scan.applicable(model.module, cache.norms):
        return int8_scan.plan_for(model.module, cache.bf16_path)
    return FloatPlan(model.module, str(cache.bf16_path), np.asarray(cache.norms, np.float32))


def score_approx(model: Any, cache: SplitCache, *, chunk: int = 1 << 14,
                 threads: int | None = None, mode: str | None = None) -> np.ndarray:
    """Approximate P(positive) for every row of a split, float32: one streamed scan in
    :func:`scan_mode` (bfloat16, int8 or float32 over the bfloat16 rows); on Ray when
    ``AGILE_RAY_ADDRESS`` is set (the same scan as tasks over row ranges)."""
    from agile_pipeline.lib import distributed

    plan = scan_plan(model, cache, mode)
    if distributed.enabled():
        return distributed.score_plan_ray(plan, len(cache))
    return plan.score(0, len(cache), chunk=chunk, threads=threads)


def exact_scores(model: Any, cache: SplitCache | RowSource, rows: np.ndarray) -> np.ndarray:
    """Float32 P(positive) of the given rows from the float16 matrix — what
    :meth:`TrainedClassifier.predict_proba` gives for them on ``VectorStore.matrix`` (read
    through a concept's working set when ``cache`` is its :class:`RowSource`)."""
    rows = np.asarray(rows, np.int64)
    if rows.size == 0:
        return np.empty(0, np.float32)
    return np.asarray(model.predict_proba(cache.rows_f32(rows)), np.float32)


def float_scan_mode() -> str:
    """The scan mode for eval-set scores: :func:`scan_mode` unless that is ``"int8"``, then
    ``"fp32"``. Eval-set strata need every score within a few 1e-3 (int8's ~1e-2 would send a
    third of a split to exact re-scoring, costing more than it saves), and this scan runs after
    the next batch is already on screen."""
    mode = scan_mode()
    return "fp32" if mode == "int8" else mode

def prepare_scans(cache: SplitCache) -> None:
    """Build what :func:`scan_mode`'s scans read beyond the split cache itself — the uint8 copy
    of the rows in ``"int8"`` mode — so the first round does not pay for it."""
    if scan_mode() == "int8":
        from agile_pipeline.lib import int8_scan

        int8_scan.u8_rows(cache.bf16_path)


def matvec_f16(cache: SplitCache, v: np.ndarray, *, chunk: int = 1 << 17) -> np.ndarray:
    """``float32(rows) @ v`` over a split's float16 matrix, streamed (as ``loop._matvec``)."""
    v = np.asarray(v, np.float32)
    out = np.empty(len(cache), np.float32)
    for start, rows in iter_npy_rows(cache.f16_path, chunk):
        out[start : start + rows.shape[0]] = rows.astype(np.float32) @ v
    return out


def merge_top_columns(best_s: list[np.ndarray], best_r: list[np.ndarray], sims: np.ndarray,
                      start: int, keep: int) -> None:
    """Fold one chunk of scores (rows from ``start``, one column per query) into each query's
    running ``keep`` best (scores, rows), in place; a partial sort per column, never a full one."""
    for j in range(sims.shape[1]):
        col = sims[:, j]
        top = np.argpartition(-col, keep - 1)[:keep] if col.size > keep else np.arange(col.size)
        cs = np.concatenate([best_s[j], col[top]])
        cr = np.concatenate([best_r[j], top + start])
        if cs.size > keep:
            sel = np.argpartition(-cs, keep - 1)[:keep]
            cs, cr = cs[sel], cr[sel]
        best_s[j], best_r[j] = cs, cr


EXACT_SEARCH_MAX_ROWS = 2_000_000  # above this, a per-phrase scan costs seconds: LanceDB's search


def nearest_in_split(cache: SplitCache, queries: np.ndarray, k: int, *,
                     chunk: int = 1 << 17) -> list[list[tuple[str, float]]]:
    """The ``k`` rows nearest to each query by cosine, in one streamed pass over the split's
    float16 matrix (float32 arithmetic): ``[[(id, cosine), ...] best first, ...]`` per query.

    The split cache is already in memory in a warm process, so this avoids opening and
    scanning the LanceDB table once per phrase (the first images of a concept wait on it).
    """
    q = np.asarray(queries, np.float32).reshape(-1, cache.dim)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    k = max(0, min(int(k), len(cache)))
    best_s = [np.empty(0, np.float32) for _ in q]
    best_r = [np.empty(0, np.int64) for _ in q]
    if k == 0 or len(q) == 0:
        return [[] for _ in q]
    for start, rows in iter_npy_rows(cache.f16_path, chunk):
        norms = np.maximum(cache.norms[start : start + rows.shape[0]], 1e-12)
        merge_top_columns(best_s, best_r, (rows.astype(np.float32) @ q.T) / norms[:, None], start, k)
    out = []
    for j in range(q.shape[0]):
        o = np.lexsort((best_r[j], -best_s[j]))  # best first; ties by row, deterministic
        ids = cache.id_at(best_r[j][o])
        out.append(list(zip(ids, (float(x) for x in best_s[j][o]), strict=True)))
    return out
