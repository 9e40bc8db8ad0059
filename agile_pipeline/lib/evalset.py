"""Stratified sampling without weights: the paper's evaluation set (section 4.2, Appendix E).

For every model, the test images are bucketed by model score into ``n_strata`` equal-width
strata ``[0, 0.1), [0.1, 0.2), …, [0.9, 1.0]``; in each stratum the ``per_stratum`` images whose
keyed SipHash-2-4 (64-bit) of the image key is lowest are picked; every model contributes the
same ``per_stratum`` per stratum, and the picks are merged as a union. Because the hash is a
fixed pseudo-random order shared by all models, models that agree pick the same images and the
user rates fewer of them.

Zero-shot cosine scores are not probabilities; :func:`zero_shot_to_unit` maps them into [0, 1]
so they can be bucketed like the MLPs' outputs.

Over a whole split cache (millions of test images), :func:`stratified_eval_set_cached` picks
the same images from the hash order computed once per table version (:func:`eval_hash_order`)
and from :class:`SplitScores` — approximate scan scores with a measured error bound, made exact
only where a stratum boundary could change a pick.
"""

import hashlib
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agile_pipeline.lib.keyed_hash import hash_keys, siphash64_array
from agile_pipeline.lib.scan import exact_scores, float_scan_mode, matvec_f16, score_approx
from agile_pipeline.lib.split_cache import SplitCache

log = logging.getLogger(__name__)


# Default zero-shot mapping: a logistic centred on the cosine that LAION's filtering (and the
# paper, Appendix G.1) uses as the CLIP positive threshold, with a temperature that spreads the
# usual CLIP image-text cosine band (~0.20–0.36) over the ten strata.
CLIP_ZERO_SHOT_CENTER = 0.28
CLIP_ZERO_SHOT_TEMPERATURE = 0.02


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


# ---- whole split caches: scores with an error bound, the hash order cached ------------------
@dataclass
class SplitScores:
    """One model's P(positive) for every row of a split: float32-exact where ``exact``, else a
    bfloat16 value within ``bound`` of the float32 one. ``refine(rows)`` computes exact values;
    :func:`stratified_eval_set_cached` calls it only for the few rows whose stratum could
    change which images the eval set picks."""

    values: np.ndarray
    exact: np.ndarray
    bound: float
    refine: Any = None  # Callable[[np.ndarray], np.ndarray] | None
    dirty: bool = False  # refined since loaded (worth writing back)

    def resolve(self, rows: np.ndarray) -> None:
        rows = np.unique(np.asarray(rows, np.int64))
        rows = rows[~self.exact[rows]]
        if rows.size == 0:
            return
        if self.refine is None:
            raise ValueError("these scores cannot be refined (no model attached)")
        new = np.asarray(self.refine(rows), np.float32)
        worst = float(np.max(np.abs(new - self.values[rows])))
        if worst > self.bound:  # the bound was too optimistic: widen it and say so
            log.warning("scan error %.2g above its bound %.2g; widening", worst, self.bound)
            self.bound = 2 * worst
        self.values[rows] = new
        self.exact[rows] = True
        self.dirty = True


def approx_split_scores(model: Any, cache: SplitCache, *, sample_per_band: int = 128,
                        bands: int = 20, mode: str | None = None) -> SplitScores:
    """Approximate scores of a whole split (:func:`float_scan_mode` unless ``mode``) and a
    bound on their error: 3x the largest error over a probe of up to ``sample_per_band`` rows
    from each of ``bands`` equal-width score bands (so every part of the sigmoid is measured,
    not just where most rows sit); probed rows are stored exact."""
    approx = score_approx(model, cache, mode=mode or float_scan_mode())
    exact = np.zeros(len(cache), np.bool_)
    rng = np.random.default_rng(0)
    band = np.minimum((approx * bands).astype(np.int64), bands - 1)
    probe_parts = []
    for bnd in range(bands):
        rows = np.flatnonzero(band == bnd)
        if rows.size:
            probe_parts.append(rng.choice(rows, size=min(sample_per_band, rows.size), replace=False))
    probe = np.sort(np.concatenate(probe_parts)) if probe_parts else np.empty(0, np.int64)
    ex = exact_scores(model, cache, probe)
    err = float(np.max(np.abs(ex - approx[probe]), initial=0.0))
    approx[probe] = ex
    exact[probe] = True
    return SplitScores(approx, exact, 3.0 * err + 1e-6,
                       refine=lambda rows: exact_scores(model, cache, rows))


def model_split_scores(model: Any, model_dir: Path, cache: SplitCache) -> SplitScores:
    """:func:`approx_split_scores` of a saved model on a split, cached in the model's directory
    per table version (a round's model never changes; a forced retrain replaces the whole
    directory, cache included). Rows refined later are written back by :func:`save_split_scores`."""
    path = Path(model_dir) / f"scores-{cache.tag}.npz"
    refine = lambda rows: exact_scores(model, cache, rows)  # noqa: E731
    if path.exists():
        with np.load(path) as z:
            if z["values"].shape == (len(cache),):
                return SplitScores(z["values"].copy(), z["exact"].copy(), float(z["bound"]), refine)
    sc = approx_split_scores(model, cache)
    sc.dirty = True
    save_split_scores(sc, model_dir, cache)
    return sc


def save_split_scores(sc: SplitScores, model_dir: Path, cache: SplitCache) -> None:
    if not sc.dirty:
        return
    path = Path(model_dir) / f"scores-{cache.tag}.npz"
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
    np.savez(tmp, values=sc.values, exact=sc.exact, bound=np.float64(sc.bound))
    tmp.replace(path)
    sc.dirty = False


def _key_tag(key: bytes) -> str:
    return hashlib.blake2b(key, digest_size=6).hexdigest()


def eval_hash_order(cache: SplitCache, key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """``(hashes, order)`` of a split's ids for the eval set: keyed SipHash-2-4 of every id
    and the permutation sorting rows by (hash, id) — cached per table version."""
    hp, op = cache.cached(f"evalhash-{_key_tag(key)}"), cache.cached(f"evalorder-{_key_tag(key)}")
    if hp.exists() and op.exists():
        return np.load(hp, mmap_mode="r"), np.load(op, mmap_mode="r")
    hashes = siphash64_array(cache.keys, key)
    order = _hash_order(cache.str_keys(), hashes).astype(np.int64)
    for path, arr in ((hp, hashes), (op, order)):
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, arr)
        tmp.replace(path)
    return hashes, order


def _strata_sorted(scores: np.ndarray | SplitScores, order: np.ndarray, n_strata: int,
                   per_stratum: int) -> np.ndarray:
    """Stratum of every row in hash order. For :class:`SplitScores`, first makes exact every
    approximate row that could change a pick: a row whose value ± bound straddles a stratum
    boundary and that comes, in hash order, before the ``per_stratum``-th row certainly in a
    stratum it may belong to."""
    if not isinstance(scores, SplitScores):
        return stratum_of(np.asarray(scores), n_strata)[order]
    sc = scores
    for _ in range(64):
        slack = np.where(sc.exact, np.float32(0), np.float32(sc.bound))
        lo = stratum_of(np.clip(sc.values - slack, 0, 1), n_strata)[order]
        hi = stratum_of(np.clip(sc.values + slack, 0, 1), n_strata)[order]
        need: list[np.ndarray] = []
        for s in range(n_strata):
            cand = np.flatnonzero((lo <= s) & (hi >= s))
            sure = (lo[cand] == s) & (hi[cand] == s)
            upto = cand.size
            if per_stratum == 0:
                upto = 0
            elif sure.sum() >= per_stratum:
                upto = int(np.searchsorted(np.cumsum(sure), per_stratum)) + 1
            window = cand[:upto]
            need.append(np.asarray(order[window[~sure[:upto]]]))
        rows = np.concatenate(need) if need else np.empty(0, np.int64)
        if rows.size == 0:
            return stratum_of(sc.values, n_strata)[order]
        sc.resolve(rows)
    raise RuntimeError("eval-set strata did not settle")


def stratified_eval_set_cached(cache: SplitCache, model_scores: Mapping[str, np.ndarray | SplitScores], *,
                               key: bytes, per_stratum: int = 20, n_strata: int = 10) -> Any:
    """:func:`agile_pipeline.lib.evalset.stratified_eval_set` over a whole split (keys = the
    split's ids), with the hash order from :func:`eval_hash_order`.

    Scores may be exact arrays or :class:`SplitScores`; with the latter, the picked images
    (``keys``, ``picked_by``, ``counts``, ``hashes``) are those of the float32 scores, while
    ``stratum_sizes`` count the few still-approximate rows within ``bound`` of a boundary by
    their bfloat16 value.
    """
    if per_stratum < 0:
        raise ValueError("per_stratum must be >= 0")
    hashes, order = eval_hash_order(cache, key)
    n = len(cache)
    strata_sorted: dict[str, np.ndarray] = {}
    for name, scores in model_scores.items():
        shape = scores.values.shape if isinstance(scores, SplitScores) else np.shape(scores)
        if shape != (n,):
            raise ValueError(f"scores of {name!r} have shape {shape}, expected ({n},)")
        strata_sorted[name] = _strata_sorted(scores, order, n_strata, per_stratum)
    rows, picked_by, counts, sizes = pick_per_stratum(
        order, strata_sorted, per_stratum=per_stratum, n_strata=n_strata)
    keys = cache.id_at(np.asarray(rows, np.int64)) if rows else []
    return EvalSet(
        keys=keys,
        picked_by={k: picked_by[r] for k, r in zip(keys, rows, strict=True)},
        counts=counts,
        stratum_sizes=sizes,
        per_stratum=per_stratum,
        n_strata=n_strata,
        hashes={k: int(hashes[r]) for k, r in zip(keys, rows, strict=True)},
    )


def zero_shot_unit_split(concept_dir: Path, text: np.ndarray, train: SplitCache,
                         test: SplitCache) -> np.ndarray:
    """Zero-shot scores of every ``test`` row mapped into [0, 1] with the calibration from the
    concept's train-split cosines (as ``evaluation.zero_shot_unit_scores``); cached per text
    vector and table version in the concept directory."""
    text = np.asarray(text, np.float32)
    tag = hashlib.blake2b(text.tobytes(), digest_size=6).hexdigest()
    path = Path(concept_dir) / f"zero_shot_unit-{test.tag}-{train.version}-{tag}.npy"
    if path.exists():
        return np.load(path)
    train_cos = matvec_f16(train, text)
    if train_cos.size >= 2:
        center, temp = zero_shot_calibration(train_cos)
    else:
        center, temp = zero_shot_calibration(matvec_f16(test, text))
    unit = zero_shot_to_unit(matvec_f16(test, text), center=center, temperature=temp)
    for old in Path(concept_dir).glob("zero_shot_unit-*.npy"):
        old.unlink(missing_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, unit)
    tmp.replace(path)
    return unit
