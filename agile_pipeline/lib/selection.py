"""Choosing which images the user rates next (paper sections 3.2 and 4.4).

* :func:`select_margin` — margin (uncertainty) sampling: the rows whose predicted probability is
  closest to 0.5, i.e. the smallest ``|P(pos) - P(neg)| = |2p - 1|``.
* :func:`select_margin_positive` — Mullapudi et al. (2021): half the batch from the highest
  scores (positive mining), the rest by margin, without duplicates.
* :class:`StreamingSelector` — the same selections over scores that arrive in chunks (a scan of
  a 10M-row table), keeping O(k) state.
* :func:`sample_expansion` — the text-to-image expansion sample: a seeded sample of the union of
  the per-phrase nearest-neighbour lists, remembering which phrase found each image.

Every selection is deterministic: ties are broken by row index (or id), and selection uses
``np.argpartition`` (linear time), never a full sort of the scores.
"""

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

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
