"""Evaluation metrics (paper section 4.2, Appendix G.1) and the zero-shot baseline score.

AUC-PR (average precision) is the primary metric; AUC-ROC, F1 and accuracy at a threshold
(0.5 for the MLPs) are reported alongside.
"""

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, roc_auc_score


@dataclass
class Metrics:
    """Scores of one model on one rated evaluation set.

    ``auc_pr`` and ``auc_roc`` are NaN when the set holds only one class (they are undefined
    then); ``f1`` is 0 when there are no true and no predicted positives. ``n`` / ``n_pos`` are the
    number of rated images and of positives among them.
    """

    auc_pr: float
    auc_roc: float
    f1: float
    accuracy: float
    n: int
    n_pos: int
    threshold: float

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (NaN stays NaN; JSON writers should use ``allow_nan`` or map it)."""
        return asdict(self)


def compute_metrics(
    y_true: np.ndarray, scores: np.ndarray, *, threshold: float = 0.5
) -> Metrics:
    """AUC-PR, AUC-ROC, and F1 / accuracy of ``scores >= threshold`` against 0/1 labels.

    Uses scikit-learn's ``average_precision_score``, ``roc_auc_score``, ``f1_score`` and
    ``accuracy_score``. Raises ``ValueError`` on length mismatch, labels other than 0/1, NaN
    scores, or an empty set.
    """
    y = np.asarray(y_true).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels but {s.size} scores")
    if y.size == 0:
        raise ValueError("cannot compute metrics on an empty evaluation set")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    y = y.astype(np.int64)
    n_pos = int(y.sum())
    both = 0 < n_pos < y.size
    pred = (s >= threshold).astype(np.int64)
    return Metrics(
        auc_pr=float(average_precision_score(y, s)) if both else math.nan,
        auc_roc=float(roc_auc_score(y, s)) if both else math.nan,
        f1=float(f1_score(y, pred, zero_division=0.0)),
        accuracy=float(accuracy_score(y, pred)),
        n=int(y.size),
        n_pos=n_pos,
        threshold=float(threshold),
    )


def zero_shot_scores(
    X: np.ndarray, text_vec: np.ndarray, *, batch: int = 262144
) -> np.ndarray:
    """Zero-shot baseline: cosine(image embedding, text embedding) per row, as float32.

    Works in chunks of ``batch`` rows (float16 inputs are converted per chunk), so it streams
    over large or memory-mapped arrays. Rows (or a text vector) of zero norm score 0.
    """
    t = np.asarray(text_vec, dtype=np.float32).reshape(-1)
    if X.ndim != 2 or X.shape[1] != t.size:
        raise ValueError(f"X must have shape (n, {t.size}), got {tuple(X.shape)}")
    t_norm = float(np.linalg.norm(t))
    out = np.zeros(X.shape[0], dtype=np.float32)
    if t_norm == 0.0:
        return out
    t = t / t_norm
    for start in range(0, X.shape[0], batch):
        chunk = np.asarray(X[start : start + batch], dtype=np.float32)
        dots = chunk @ t
        norms = np.linalg.norm(chunk, axis=1)
        np.divide(dots, norms, out=out[start : start + chunk.shape[0]], where=norms > 0)
    return out


def weighted_average_precisions(y_true: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC-PR (average precision, as scikit-learn's ``average_precision_score`` with
    ``sample_weight``) of one scored set under each row of ``weights`` (``(B, n)``, e.g. the
    multiplicities of bootstrap resamples) in one vectorised pass: the rows are sorted once and
    tied scores form one threshold. A weighting with no positive mass gives NaN."""
    y = np.asarray(y_true).reshape(-1).astype(np.float64)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    ends = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True])  # last row of each tie group
    ws = w[:, order]
    tp = np.cumsum(ws * y[order], axis=1)[:, ends]
    seen = np.cumsum(ws, axis=1)[:, ends]
    d_tp = np.diff(tp, axis=1, prepend=0.0)
    precision = np.divide(tp, seen, out=np.zeros_like(tp), where=seen > 0)
    total = tp[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (d_tp * precision).sum(axis=1) / total, math.nan)


def bootstrap_auc_pr(y_true: np.ndarray, scores: np.ndarray, *, n_boot: int = 500, level: float = 0.9,
                     seed: int = 0) -> tuple[float, float]:
    """A percentile bootstrap interval (``level``, default 90%) for AUC-PR: the eval ratings
    resampled with replacement ``n_boot`` times (seeded; resamples with one class only are
    skipped). ``(nan, nan)`` when there are too few ratings of both kinds to resample.

    Each resample's AUC-PR is scikit-learn's, computed for all resamples at once from their
    multiplicities (:func:`weighted_average_precisions`): ~1 ms per model instead of ~1 s."""
    y = np.asarray(y_true).reshape(-1).astype(np.int64)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels but {s.size} scores")
    if y.size < 2 or not 0 < int(y.sum()) < y.size:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, y.size, size=(n_boot, y.size))
    counts = np.zeros((n_boot, y.size), np.float64)
    np.add.at(counts, (np.arange(n_boot)[:, None], draws), 1.0)
    n_pos = counts @ y
    counts = counts[(n_pos > 0) & (n_pos < y.size)]  # both classes drawn
    if len(counts) < n_boot // 2:
        return math.nan, math.nan
    vals = weighted_average_precisions(y, s, counts)
    lo, hi = np.quantile(vals, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)
