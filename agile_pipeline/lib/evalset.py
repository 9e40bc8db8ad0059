"""Stratified sampling without weights: the paper's evaluation set (section 4.2, Appendix E).

For every model, the test images are bucketed by model score into ``n_strata`` equal-width
strata ``[0, 0.1), [0.1, 0.2), …, [0.9, 1.0]``; in each stratum the ``per_stratum`` images whose
keyed SipHash-2-4 (64-bit) of the image key is lowest are picked; every model contributes the
same ``per_stratum`` per stratum, and the picks are merged as a union. Because the hash is a
fixed pseudo-random order shared by all models, models that agree pick the same images and the
user rates fewer of them.

Zero-shot cosine scores are not probabilities; :func:`zero_shot_to_unit` maps them into [0, 1]
so they can be bucketed like the MLPs' outputs.
"""

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import siphash24

log = logging.getLogger(__name__)

_U64 = (1 << 64) - 1

# Default zero-shot mapping: a logistic centred on the cosine that LAION's filtering (and the
# paper, Appendix G.1) uses as the CLIP positive threshold, with a temperature that spreads the
# usual CLIP image-text cosine band (~0.20–0.36) over the ten strata.
CLIP_ZERO_SHOT_CENTER = 0.28
CLIP_ZERO_SHOT_TEMPERATURE = 0.02


def siphash64(key: bytes, item: str) -> int:
    """Keyed SipHash-2-4 of ``item`` (UTF-8) as an unsigned 64-bit integer.

    ``key`` must be 16 bytes. The value is the standard little-endian reading of the 8-byte
    digest (the reference test vector: key ``00..0f``, empty input → ``0x726fdb47dd0e0e31``).
    """
    if len(key) != 16:
        raise ValueError(f"SipHash key must be 16 bytes, got {len(key)}")
    return siphash24.siphash24(item.encode("utf-8"), key=key).intdigest() & _U64


def hash_keys(keys: Sequence[str], key: bytes) -> np.ndarray:
    """:func:`siphash64` of every key, as a ``uint64`` array (about 1 µs per key)."""
    if len(key) != 16:
        raise ValueError(f"SipHash key must be 16 bytes, got {len(key)}")
    out = np.empty(len(keys), dtype=np.uint64)
    h = siphash24.siphash24
    for i, k in enumerate(keys):
        out[i] = h(k.encode("utf-8"), key=key).intdigest() & _U64
    return out


def stratum_of(scores: np.ndarray, n_strata: int = 10) -> np.ndarray:
    """Stratum index per score: ``i`` for ``[i/n, (i+1)/n)``, and 1.0 in the last stratum.

    Boundaries are ``i/n`` rounded to the scores' own float dtype, so a score equal to a
    boundary written as a decimal (0.1, 0.3, …) falls in the upper stratum whether the scores
    are float32 or float64. Scores must lie in [0, 1]; values outside by at most 1e-6 (rounding
    noise) are clipped, anything further (or NaN) raises ``ValueError``.

    Returns:
        int32 array of stratum indices in ``[0, n_strata)``.
    """
    if n_strata < 1:
        raise ValueError("n_strata must be >= 1")
    s = np.asarray(scores)
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    if s.size:
        if np.isnan(s).any():
            raise ValueError("scores contain NaN")
        lo, hi = float(s.min()), float(s.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise ValueError(f"scores must be in [0, 1]; got range [{lo}, {hi}]")
        if lo < 0 or hi > 1:
            s = np.clip(s, 0, 1)
    inner = (np.arange(1, n_strata, dtype=np.float64) / n_strata).astype(s.dtype)
    return np.searchsorted(inner, s, side="right").astype(np.int32)


def zero_shot_to_unit(
    cos: np.ndarray,
    *,
    center: float = CLIP_ZERO_SHOT_CENTER,
    temperature: float = CLIP_ZERO_SHOT_TEMPERATURE,
) -> np.ndarray:
    """Map zero-shot cosine scores into [0, 1] for stratification: ``σ((cos - center) / T)``.

    Why not ``(cos + 1) / 2``: image-text cosines of CLIP-like models sit in a narrow band
    (roughly 0.1–0.4), so the affine map would put nearly every image in strata 5–6 and the
    strata would say nothing about the model's ranking. A logistic is monotone (AUC-PR and
    AUC-ROC are unchanged), fixed (it never looks at the images being scored, so adding or
    removing test images cannot move another image between strata) and has two readable knobs:

    * ``center`` is the cosine that maps to 0.5, i.e. the zero-shot decision threshold: F1 and
      accuracy "at 0.5" of the mapped score are the paper's zero-shot metrics at that cosine
      threshold (0.28 for CLIP, Appendix G.1, after LAION's filtering threshold; 0.2 for ALIGN).
    * ``temperature`` sets how wide a cosine band the ten strata cover: the middle eight strata
      span ``center ± T·ln 9`` (±0.044 for the default T = 0.02, i.e. cosines 0.236–0.324).

    The trade-off: a fixed map is only as good as its constants are for the embedding model —
    with a backend whose cosines live elsewhere (e.g. the ConSE bridge) the defaults would pile
    everything into one end stratum. Such backends should pass their own constants, e.g. from
    :func:`zero_shot_calibration` on a fixed, seeded sample of *train*-split cosines, computed
    once per (embedding model, concept).
    """
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    c = np.asarray(cos, dtype=np.float64)
    z = (c - center) / temperature
    out = np.empty_like(z)
    # numerically stable logistic
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out.astype(np.float32)


def zero_shot_calibration(
    reference_cos: np.ndarray, *, q_center: float = 0.999, q_low: float = 0.99
) -> tuple[float, float]:
    """``(center, temperature)`` for :func:`zero_shot_to_unit` from background cosines.

    ``reference_cos`` should be the concept's cosines on a fixed, seeded sample of the *train*
    split (mostly negatives: concepts are rare). The map then puts the top ``1 - q_center``
    (0.1%) of the background above 0.5 and the top ``1 - q_low`` (1%) above 0.1, i.e. in the
    upper nine strata — about the occupancy an MLP trained with random negatives gives. The
    constants depend only on the reference sample, never on the images being scored.
    """
    if not 0 < q_low < q_center < 1:
        raise ValueError("need 0 < q_low < q_center < 1")
    r = np.asarray(reference_cos, dtype=np.float64).reshape(-1)
    r = r[np.isfinite(r)]
    if r.size < 2:
        raise ValueError("need at least two reference cosines")
    c_hi, c_lo = np.quantile(r, [q_center, q_low])
    spread = float(c_hi - c_lo)
    if spread <= 0:
        spread = float(r.std()) or 1e-3
    return float(c_hi), spread / math.log(9.0)


@dataclass
class EvalSet:
    """The merged evaluation set and how it came about.

    Attributes:
        keys: the selected image keys, ordered by (hash, key) ascending — a fixed
            pseudo-random order, good for presenting to the rater.
        picked_by: key → the ``(model, stratum)`` pairs that picked it (model order as given).
        counts: model → number of keys it picked per stratum (``min(per_stratum, size)``).
        stratum_sizes: model → number of scored images per stratum.
        per_stratum / n_strata: the parameters used.
    """

    keys: list[str]
    picked_by: dict[str, list[tuple[str, int]]]
    counts: dict[str, list[int]]
    stratum_sizes: dict[str, list[int]]
    per_stratum: int
    n_strata: int
    hashes: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    def for_model(self, model: str) -> list[str]:
        """Keys that ``model`` picked (in the set's order)."""
        return [k for k in self.keys if any(m == model for m, _ in self.picked_by[k])]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (hashes as decimal strings: JSON numbers lose 64-bit precision)."""
        return {
            "keys": list(self.keys),
            "picked_by": {k: [[m, s] for m, s in v] for k, v in self.picked_by.items()},
            "counts": self.counts,
            "stratum_sizes": self.stratum_sizes,
            "per_stratum": self.per_stratum,
            "n_strata": self.n_strata,
            "hashes": {k: str(v) for k, v in self.hashes.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EvalSet":
        """Inverse of :meth:`to_dict`."""
        return cls(
            keys=list(d["keys"]),
            picked_by={k: [(str(m), int(s)) for m, s in v] for k, v in d["picked_by"].items()},
            counts={k: [int(x) for x in v] for k, v in d["counts"].items()},
            stratum_sizes={k: [int(x) for x in v] for k, v in d["stratum_sizes"].items()},
            per_stratum=int(d["per_stratum"]),
            n_strata=int(d["n_strata"]),
            hashes={k: int(v) for k, v in d.get("hashes", {}).items()},
        )


def _hash_order(keys: Sequence[str], hashes: np.ndarray) -> np.ndarray:
    """Permutation sorting rows by (hash, key); raises on duplicate keys."""
    order = np.argsort(hashes, kind="stable")
    sh = hashes[order]
    dup = np.flatnonzero(sh[1:] == sh[:-1])
    if dup.size:  # equal hashes: astronomically rare unless a key repeats
        starts = np.unique(np.concatenate([dup, dup + 1]))
        # group runs of equal hashes and sort each run by key
        i = 0
        while i < starts.size:
            j = i
            while j + 1 < starts.size and sh[starts[j + 1]] == sh[starts[i]]:
                j += 1
            run = starts[i : j + 1]
            run_keys = [keys[int(r)] for r in order[run]]
            if len(set(run_keys)) != len(run_keys):
                raise ValueError(f"duplicate key in evaluation candidates: {run_keys[0]!r}")
            order[run] = order[run][np.argsort(np.array(run_keys), kind="stable")]
            i = j + 1
    return order


def pick_per_stratum(
    order: np.ndarray,
    strata_sorted: Mapping[str, np.ndarray],
    *,
    per_stratum: int,
    n_strata: int,
) -> tuple[list[int], dict[int, list[tuple[str, int]]], dict[str, list[int]], dict[str, list[int]]]:
    """The paper's per-model picks: for every model and stratum, the first ``per_stratum``
    rows in hash order. ``order`` is the rows in hash order and ``strata_sorted[name]`` each
    model's stratum of ``order``'s rows.

    Returns ``(rows, picked_by, counts, sizes)``: the picked rows in hash order, row →
    ``[(model, stratum), ...]``, images taken per model and stratum, stratum sizes per model.
    """
    picked_by: dict[int, list[tuple[str, int]]] = {}
    rank: dict[int, int] = {}
    counts: dict[str, list[int]] = {}
    sizes: dict[str, list[int]] = {}
    for name, strata in strata_sorted.items():
        sizes[name] = np.bincount(strata, minlength=n_strata).tolist()
        counts[name] = []
        for s in range(n_strata):
            first = np.flatnonzero(strata == s)[:per_stratum]
            counts[name].append(int(first.size))
            for pos, row in zip(first.tolist(), np.asarray(order[first]).tolist(), strict=True):
                picked_by.setdefault(row, []).append((name, s))
                rank[row] = pos
    return sorted(picked_by, key=rank.__getitem__), picked_by, counts, sizes


def stratified_eval_set(
    keys: Sequence[str],
    model_scores: Mapping[str, np.ndarray],
    *,
    key: bytes,
    per_stratum: int = 20,
    n_strata: int = 10,
    hashes: np.ndarray | None = None,
) -> EvalSet:
    """Stratified sampling without weights over the test split, merged over models.

    Args:
        keys: image keys (e.g. URL or image id) of the scored test images; unique.
        model_scores: model name → scores aligned with ``keys``, all in [0, 1] (map zero-shot
            cosines with :func:`zero_shot_to_unit` first).
        key: 16-byte SipHash key.
        per_stratum: images each model takes per stratum (the paper: 20).
        n_strata: number of equal-width strata (the paper: 10).
        hashes: optional precomputed :func:`hash_keys` of ``keys`` with the same ``key``
            (saves ~1 s per million keys when they are cached).

    Returns:
        The merged :class:`EvalSet`. A stratum with fewer than ``per_stratum`` images
        contributes all of them.
    """
    n = len(keys)
    if hashes is None:
        hashes = hash_keys(keys, key)
    hashes = np.asarray(hashes, dtype=np.uint64)
    if hashes.shape != (n,):
        raise ValueError(f"hashes has shape {hashes.shape}, expected ({n},)")
    if per_stratum < 0:
        raise ValueError("per_stratum must be >= 0")
    order = _hash_order(keys, hashes)
    strata_sorted: dict[str, np.ndarray] = {}
    for name, scores in model_scores.items():
        scores = np.asarray(scores)
        if scores.shape != (n,):
            raise ValueError(f"scores of {name!r} have shape {scores.shape}, expected ({n},)")
        strata_sorted[name] = stratum_of(scores, n_strata)[order]
    rows, picked_by, counts, sizes = pick_per_stratum(
        order, strata_sorted, per_stratum=per_stratum, n_strata=n_strata)
    ev = EvalSet(
        keys=[keys[r] for r in rows],
        picked_by={keys[r]: picked_by[r] for r in rows},
        counts=counts,
        stratum_sizes=sizes,
        per_stratum=per_stratum,
        n_strata=n_strata,
        hashes={keys[r]: int(hashes[r]) for r in rows},
    )
    log.info(
        "eval set: %d images from %d models (%d picks before merging)",
        len(ev.keys), len(model_scores), sum(sum(c) for c in counts.values()),
    )
    return ev
