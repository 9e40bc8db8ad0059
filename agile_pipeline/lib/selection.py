"""Choosing which images the user rates next (paper sections 3.2 and 4.4).

* :func:`select_margin` — margin (uncertainty) sampling: the rows whose predicted probability is
  closest to 0.5, i.e. the smallest ``|P(pos) - P(neg)| = |2p - 1|``.
* :func:`select_margin_positive` — Mullapudi et al. (2021): half the batch from the highest
  scores (positive mining), the rest by margin, without duplicates.
* :class:`StreamingSelector` — the same selections over scores that arrive in chunks (a scan of
  a 10M-row table), keeping O(k) state.
* :func:`sample_expansion` — the text-to-image expansion sample: a seeded sample of the union of
  the per-phrase nearest-neighbour lists, remembering which phrase found each image.
* :func:`select_margin_exact` — the same picks as :func:`select_margin` on the float32 scores of a
  whole split cache, from an approximate scan (:mod:`.scan`) plus an exact re-score of a
  shortlist proven large enough; :func:`select_for_round` — the next batch of a round, through
  it where the vector store has split caches, else over ``VectorStore.matrix``.

Every selection is deterministic: ties are broken by row index (or id), and selection uses
``np.argpartition`` (linear time), never a full sort of the scores.
"""

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from agile_pipeline.lib.scan import exact_scores, scan_mode, score_approx
from agile_pipeline.lib.split_cache import SplitCache, has_cache, split_cache

log = logging.getLogger(__name__)

Strategy = Literal["margin", "margin_positive"]


def margin(p: np.ndarray) -> np.ndarray:
    """Binary margin ``|P(pos) - P(neg)| = |2p - 1|`` (0 = most uncertain, 1 = certain).

    Keeps a floating dtype of ``p`` (float16/32/64); other inputs become float64.
    """
    p = np.asarray(p)
    if not np.issubdtype(p.dtype, np.floating):
        p = p.astype(np.float64)
    return np.abs(p * 2 - 1)


def _smallest_k(values: np.ndarray, k: int, ids: np.ndarray | None = None) -> np.ndarray:
    """Positions of the ``k`` smallest ``values`` ordered by (value, id) ascending.

    ``ids`` (default: the positions themselves) break ties, so the result does not depend on
    how ``argpartition`` happened to order equal values. Linear time plus ``O(k log k)``.
    """
    n = values.shape[0]
    k = min(k, n)
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    if k < n:
        part = np.argpartition(values, k - 1)
        kth = values[part[k - 1]]
        below = np.flatnonzero(values < kth)
        ties = np.flatnonzero(values == kth)
        need = k - below.size
        if ties.size > need:
            tie_keys = ties if ids is None else ids[ties]
            ties = ties[np.argsort(tie_keys, kind="stable")[:need]]
        chosen = np.concatenate([below, ties])
    else:
        chosen = np.arange(n)
    tie_keys = chosen if ids is None else ids[chosen]
    order = np.lexsort((tie_keys, values[chosen]))
    return chosen[order].astype(np.int64, copy=False)


def _check_scores(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {scores.shape}")
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    return scores


def _eligible_mask(eligible: np.ndarray | None, n: int) -> np.ndarray | None:
    if eligible is None:
        return None
    eligible = np.asarray(eligible)
    if eligible.dtype != np.bool_ or eligible.shape != (n,):
        raise ValueError(f"eligible must be a boolean mask of shape ({n},)")
    return eligible


def select_margin(
    scores: np.ndarray, k: int, *, eligible: np.ndarray | None = None
) -> np.ndarray:
    """Indices of the ``k`` rows with the smallest margin ``|2p - 1|``.

    Args:
        scores: ``(n,)`` P(positive) per row.
        k: how many to return (fewer if fewer rows are eligible).
        eligible: optional boolean mask; ``False`` rows (e.g. already labeled) are never chosen.

    Returns:
        int64 indices ordered by margin ascending, ties by index ascending.
    """
    scores = _check_scores(scores)
    mask = _eligible_mask(eligible, scores.shape[0])
    m = margin(scores)
    if mask is not None:
        k = min(k, int(mask.sum()))
        m = np.where(mask, m, np.inf)
    return _smallest_k(m, k)


CLUSTER_POOL = 10
"""Cluster-margin clusters the ``CLUSTER_POOL * k`` most uncertain rows (Citovsky et al. use 10x)."""


def diversify_by_cluster(
    margins: np.ndarray, vectors: np.ndarray, k: int, *, seed: int = 0
) -> np.ndarray:
    """Cluster-margin's diversity step (Citovsky et al., "Batch Active Learning at Scale",
    NeurIPS 2021): the rows (most uncertain first) are clustered into ``k`` groups by k-means on
    their L2-normalised embeddings, and one row is taken from each group, its most uncertain;
    near-duplicates of one uncertain image thus fill one slot of the batch, not many.

    Args:
        margins: ``(m,)`` margins of the candidate rows (the ``CLUSTER_POOL * k`` most uncertain).
        vectors: ``(m, d)`` their embeddings.
        k: batch size.

    Returns:
        Positions into ``margins`` (``k`` of them, or ``m`` when ``m <= k``), the picked rows
        ordered by margin ascending (ties: position).
    """
    m = int(margins.shape[0])
    if vectors.shape[0] != m:
        raise ValueError(f"{vectors.shape[0]} vectors for {m} margins")
    if m <= k:
        return np.argsort(margins, kind="stable").astype(np.int64)
    from sklearn.cluster import KMeans

    x = np.asarray(vectors, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    groups = KMeans(n_clusters=k, n_init=1, random_state=seed, max_iter=50).fit_predict(x)
    order = np.lexsort((np.arange(m), margins))  # by margin, then position
    first = {}
    for pos in order:  # the most uncertain row of each group
        first.setdefault(int(groups[pos]), int(pos))
    picked = np.array(sorted(first.values(), key=lambda pos: (margins[pos], pos)), dtype=np.int64)
    if picked.size < k:  # (k-means may leave a group empty): fill with the next most uncertain
        rest = np.setdiff1d(order, picked, assume_unique=False)
        rest = rest[np.argsort(margins[rest], kind="stable")]
        picked = np.concatenate([picked, rest[: k - picked.size]])
    return picked


def select_cluster_margin(
    scores: np.ndarray, vectors: np.ndarray, k: int, *, eligible: np.ndarray | None = None,
    pool: int = CLUSTER_POOL, seed: int = 0,
) -> np.ndarray:
    """Indices of ``k`` rows chosen by cluster-margin: :func:`select_margin`'s ``pool * k``
    most uncertain eligible rows, diversified by :func:`diversify_by_cluster`."""
    shortlist = select_margin(scores, pool * k, eligible=eligible)
    pos = diversify_by_cluster(margin(_check_scores(scores)[shortlist]), vectors[shortlist], k, seed=seed)
    return shortlist[pos]


def _top_scores(scores: np.ndarray, k: int, mask: np.ndarray | None) -> np.ndarray:
    """Indices of the ``k`` highest scores among ``mask`` rows, descending, ties by index."""
    neg = -scores.astype(np.float64, copy=False)
    if mask is not None:
        k = min(k, int(mask.sum()))
        neg = np.where(mask, neg, np.inf)
    return _smallest_k(neg, k)


def select_margin_positive(
    scores: np.ndarray,
    k: int,
    *,
    eligible: np.ndarray | None = None,
    positive_fraction: float = 0.5,
) -> np.ndarray:
    """Margin + positive mining (Mullapudi et al. 2021; the paper's Appendix D ablation).

    ``floor(k * positive_fraction + 0.5)`` rows (half up) with the highest scores (positive mining) come
    first, ordered by score descending; the rest of the batch is the smallest-margin rows not
    already chosen, ordered by margin ascending. Ties are broken by index; no row appears twice.
    If fewer than ``k`` rows are eligible, all of them are returned.
    """
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError("positive_fraction must be in [0, 1]")
    scores = _check_scores(scores)
    mask = _eligible_mask(eligible, scores.shape[0])
    n_eligible = scores.shape[0] if mask is None else int(mask.sum())
    k = min(k, n_eligible)
    k_pos = _n_positive(k, positive_fraction)
    top = _top_scores(scores, k_pos, mask)
    rest = np.ones(scores.shape[0], dtype=np.bool_) if mask is None else mask.copy()
    rest[top] = False
    by_margin = select_margin(scores, k - top.size, eligible=rest)
    return np.concatenate([top, by_margin])


def _n_positive(k: int, positive_fraction: float) -> int:
    """Rows of a ``k`` batch that positive mining takes: ``k * fraction`` rounded half up."""
    return math.floor(k * positive_fraction + 0.5)


class _TopK:
    """The ``k`` smallest ``(value, id)`` pairs seen so far (O(k) memory)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.values = np.empty(0, dtype=np.float64)
        self.ids: np.ndarray | None = None
        self.scores = np.empty(0, dtype=np.float64)

    def feed(self, values: np.ndarray, ids: np.ndarray, scores: np.ndarray) -> None:
        if self.k <= 0 or values.size == 0:
            return
        pick = _smallest_k(values, self.k, ids)
        if self.ids is None:
            self.values, self.ids, self.scores = values[pick], ids[pick], scores[pick]
            return
        all_v = np.concatenate([self.values, values[pick]])
        all_i = np.concatenate([self.ids, ids[pick]])
        all_s = np.concatenate([self.scores, scores[pick]])
        keep = _smallest_k(all_v, self.k, all_i)
        self.values, self.ids, self.scores = all_v[keep], all_i[keep], all_s[keep]

    def items(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids = self.ids if self.ids is not None else np.empty(0, dtype=np.int64)
        return self.values, ids, self.scores


class StreamingSelector:
    """Margin (or margin + positive mining) selection over scores that arrive in chunks.

    Feed ``(ids, scores)`` chunks from a table scan; only O(k) state is kept, so a scan over
    10M rows never holds all scores. ``ids`` may be global row offsets (int) or string keys;
    they must be unique across the scan and are the tie-breaker, so with global offsets as ids
    the result equals :func:`select_margin` / :func:`select_margin_positive` on the
    concatenated scores.

    Example::

        sel = StreamingSelector(100)
        for offsets, probs, labeled in scan():
            sel.feed(offsets, probs, eligible=~labeled)
        ids, scores = sel.result()
    """

    def __init__(
        self, k: int, *, strategy: Strategy = "margin", positive_fraction: float = 0.5
    ) -> None:
        if k < 0:
            raise ValueError("k must be >= 0")
        if strategy not in ("margin", "margin_positive"):
            raise ValueError(f"unknown strategy {strategy!r}")
        self.k = k
        self.strategy: Strategy = strategy
        self.positive_fraction = positive_fraction
        self.n_seen = 0
        self.n_eligible = 0
        self._margin = _TopK(k)
        self._top = _TopK(k if strategy == "margin_positive" else 0)

    def feed(
        self, ids: np.ndarray, scores: np.ndarray, *, eligible: np.ndarray | None = None
    ) -> None:
        """Consider one chunk: ``ids`` and ``scores`` of equal length, optional bool mask."""
        ids = np.asarray(ids)
        scores = _check_scores(scores)
        if ids.shape != scores.shape:
            raise ValueError(f"ids {ids.shape} and scores {scores.shape} differ in shape")
        self.n_seen += scores.size
        mask = _eligible_mask(eligible, scores.shape[0])
        if mask is not None:
            ids, scores = ids[mask], scores[mask]
        self.n_eligible += scores.size
        self._margin.feed(margin(scores).astype(np.float64, copy=False), ids, scores)
        if self.strategy == "margin_positive":
            self._top.feed(-scores.astype(np.float64, copy=False), ids, scores)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, scores)`` of the selection, in the one-shot functions' order."""
        _, m_ids, m_scores = self._margin.items()
        k = min(self.k, self.n_eligible)
        if self.strategy == "margin":
            return m_ids[:k], m_scores[:k]
        k_pos = _n_positive(k, self.positive_fraction)
        _, t_ids, t_scores = self._top.items()
        t_ids, t_scores = t_ids[:k_pos], t_scores[:k_pos]
        taken = np.isin(m_ids, t_ids)
        need = k - t_ids.size
        rest_ids, rest_scores = m_ids[~taken][:need], m_scores[~taken][:need]
        return np.concatenate([t_ids, rest_ids]), np.concatenate([t_scores, rest_scores])


def sample_expansion(
    candidates: Mapping[str, Sequence[str]], n: int, seed: int
) -> list[tuple[str, str]]:
    """Seeded sample of ``n`` images from the union of the per-phrase neighbour lists.

    Args:
        candidates: phrase → image ids of its nearest neighbours (positive and negative
            phrases alike), in phrase order.
        n: sample size (all of the union if it is smaller).
        seed: RNG seed.

    Returns:
        ``(image_id, phrase)`` pairs in sampled order, where ``phrase`` is the first phrase (in
        the mapping's order) whose list contains the image. Same inputs and seed → same output.
    """
    first_phrase: dict[str, str] = {}
    for phrase, ids in candidates.items():
        for image_id in ids:
            first_phrase.setdefault(image_id, phrase)
    union = list(first_phrase)
    take = min(n, len(union))
    if take <= 0:
        return []
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(union), size=take, replace=False)
    log.debug("expansion: %d candidates from %d phrases, sampled %d", len(union), len(candidates), take)
    return [(union[i], first_phrase[union[i]]) for i in picks.tolist()]


# ---- whole split caches: exact picks from an approximate scan ---------------------------------
@dataclass
class Selection:
    rows: np.ndarray  # int64 rows of the split, in selection order
    scores: np.ndarray  # float32 exact P(positive) of those rows
    n_eligible: int
    info: dict[str, Any] = field(default_factory=dict)


def _error_bound(model: Any, cache: SplitCache, approx: np.ndarray, short: np.ndarray,
                 exact_short: np.ndarray, rng_seed: int = 0, sample: int = 2048) -> float:
    """Safe bound on |approx − exact| over the split: 2x the worst error seen on the
    shortlist (the uncertain rows, where the sigmoid is steepest) and a random sample."""
    rng = np.random.default_rng(rng_seed)
    probe = rng.choice(len(cache), size=min(sample, len(cache)), replace=False)
    probe.sort()
    err = float(np.max(np.abs(exact_scores(model, cache, probe) - approx[probe]), initial=0.0))
    err = max(err, float(np.max(np.abs(exact_short - approx[short]), initial=0.0)))
    return 2.0 * err + 1e-6


def select_margin_exact(
    model: Any,
    cache: SplitCache,
    k: int,
    *,
    eligible: np.ndarray | None = None,
    strategy: str = "margin",
    approx: np.ndarray | None = None,
    shortlist: int | None = None,
) -> Selection:
    """The rows :func:`select_margin` (or ``select_margin_positive``) picks from the float32
    scores of the whole split, computed from an approximate scan (:func:`score_approx`) plus an
    exact re-score.

    Every row is scored approximately; the ``shortlist`` rows with the smallest approximate
    margin (and, for margin + positive mining, the highest approximate scores) are re-scored in
    float32 and the selection runs on those. The shortlist provably holds the float32 answer
    when every row outside it is, even with the largest scan error seen (doubled), worse
    than the last row picked; otherwise it grows (``info['shortlist']``,
    ``info['shortlist_proven']``).
    """
    t0 = time.perf_counter()
    n = len(cache)
    first_size = max(50 * k, 5000)
    if approx is None:
        approx = score_approx(model, cache)
        if scan_mode() == "int8":  # ~10x bfloat16's error: start where the proof usually holds
            first_size *= 4
    t_scan = time.perf_counter() - t0
    if eligible is not None and eligible.shape != (n,):
        raise ValueError(f"eligible must have shape ({n},)")
    n_eligible = n if eligible is None else int(eligible.sum())
    if strategy == "cluster-margin":  # the exact pool of the most uncertain, then diversity
        pooled = select_margin_exact(model, cache, CLUSTER_POOL * k, eligible=eligible, strategy="margin",
                                     approx=approx, shortlist=shortlist)
        t1 = time.perf_counter()
        pos = diversify_by_cluster(margin(pooled.scores), cache.rows_f32(pooled.rows), min(k, n_eligible))
        return Selection(pooled.rows[pos], pooled.scores[pos], n_eligible, {
            **pooled.info, "pool": int(pooled.rows.size), "cluster_seconds": round(time.perf_counter() - t1, 4),
            "seconds": round(time.perf_counter() - t0, 4)})
    k = min(k, n_eligible)
    if k <= 0:
        return Selection(np.empty(0, np.int64), np.empty(0, np.float32), n_eligible,
                         {"scan_seconds": t_scan})
    m_approx = margin(approx)
    s_neg = -approx
    if eligible is not None:
        m_approx = np.where(eligible, m_approx, np.inf)
        s_neg = np.where(eligible, s_neg, np.inf)
    size = min(n_eligible, shortlist or first_size)
    proven = False
    while True:
        parts = [np.argpartition(m_approx, size - 1)[:size] if size < n else np.arange(n)]
        if strategy == "margin-positive":
            parts.append(np.argpartition(s_neg, size - 1)[:size] if size < n else np.arange(n))
        short = np.unique(np.concatenate(parts))
        if eligible is not None:
            short = short[eligible[short]]
        exact = exact_scores(model, cache, short)
        if strategy == "margin":
            pick = select_margin(exact, k)
        elif strategy == "margin-positive":
            pick = select_margin_positive(exact, k)
        else:
            raise ValueError(f"unknown strategy {strategy!r}")
        if size >= n_eligible:
            proven = True
            break
        bound = _error_bound(model, cache, approx, short, exact)
        outside = np.ones(n, np.bool_) if eligible is None else eligible.copy()
        outside[short] = False
        ok = True
        if outside.any():
            # margins: every outside row's exact margin >= its approx margin - 2*bound/…;
            # |margin_exact - margin_approx| <= 2 * |p_exact - p_approx| <= 2 * bound
            worst_picked_margin = float(np.max(margin(exact[pick]))) if strategy == "margin" else \
                float(np.max(margin(exact[pick[_n_top(k):]]), initial=-np.inf))
            best_outside = float(np.min(m_approx[outside]))
            ok = best_outside - 2 * bound > worst_picked_margin
            if strategy == "margin-positive" and ok and _n_top(k):
                lowest_top = float(np.min(exact[pick[: _n_top(k)]]))
                ok = float(np.max(approx[outside])) + bound < lowest_top
        if ok:
            proven = True
            break
        if size >= n_eligible:
            break
        size = min(n_eligible, size * 4)
    rows = short[pick]
    return Selection(rows, exact[pick], n_eligible, {
        "scan_seconds": round(t_scan, 4), "shortlist": int(short.size), "shortlist_proven": proven,
        "seconds": round(time.perf_counter() - t0, 4),
    })


def _n_top(k: int) -> int:
    return _n_positive(k, 0.5)


@dataclass
class RoundSelection:
    ids: list[str]
    scores: list[float]
    n_scored: int
    n_eligible: int
    info: dict[str, Any] = field(default_factory=dict)


def select_for_round(vectors: Any, model_id: str, model: Any, labeled: set[str] | Sequence[str],
                     k: int, strategy: str, *, exact: bool = True) -> RoundSelection:
    """The next AL batch over the train split: the same rows as ``select_margin`` /
    ``select_margin_positive`` on ``predict_proba`` of the whole split with labeled images
    ineligible (see :func:`select_margin_exact`).

    ``exact=False`` (margin only) takes the ``k`` smallest margins of the approximate scan as
    they are, without the float32 re-score that proves the order: for a shortlist that is
    scored exactly later (the candidate pool's sweep), where a large ``k`` would otherwise
    re-score most of the split. The scores returned are then the scan's."""
    if not has_cache(vectors):
        m = vectors.matrix(model_id, "train")
        scores = model.predict_proba(m.vectors)
        labeled = labeled if isinstance(labeled, set) else set(labeled)  # the committed path
        eligible = np.fromiter((i not in labeled for i in m.ids), dtype=bool, count=len(m.ids))
        if strategy == "cluster-margin":
            pick = select_cluster_margin(scores, m.vectors, k, eligible=eligible)
        else:
            pick = (select_margin if strategy == "margin" else select_margin_positive)(
                scores, k, eligible=eligible)
        return RoundSelection([str(m.ids[i]) for i in pick], [float(scores[i]) for i in pick],
                              len(scores), int(eligible.sum()))
    train = split_cache(vectors, model_id, "train")
    eligible = ~train.mask(list(labeled))
    if not exact and strategy == "margin":
        t0 = time.perf_counter()
        approx = score_approx(model, train)
        rows = select_margin(approx, k, eligible=eligible)
        return RoundSelection(train.id_at(rows), [float(s) for s in approx[rows]], len(train),
                              int(eligible.sum()), {"scan_seconds": round(time.perf_counter() - t0, 4),
                                                    "exact": False})
    sel = select_margin_exact(model, train, k, eligible=eligible, strategy=strategy)
    return RoundSelection(train.id_at(sel.rows), [float(s) for s in sel.scores], len(train),
                          sel.n_eligible, sel.info)
