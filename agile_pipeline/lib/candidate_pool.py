"""A concept's candidate pool for active learning (SEALS: Coleman et al., "Similarity Search for
Efficient Active Learning and Search of Rare Concepts", AAAI 2022).

The paper's protocol scores every unlabelled train image each round, so a round costs
O(corpus). SEALS scores only the *pool*: the union of the ``k`` nearest unlabelled train
neighbours of every labelled image (and, here, of every phrase and exemplar), grown each round
by the neighbours of the newly labelled images. A round then costs O(labels x k), whatever the
corpus size; the authors report the same mean AP and recall as the global scan at up to three
orders of magnitude less selection cost. Two changes for this product:

* a small uniform sample of the rest of the split (:data:`POOL_RANDOM`) is scored with the
  pool, so a concept whose positives sit far from everything labelled can still surface them;
* after each pooled selection, once the batch is committed (off the rater's wait), one scan of
  the whole split with that round's model keeps its :data:`POOL_SWEEP` most uncertain
  unlabelled images (:attr:`CandidatePool.sweep`); the next round scores them with the pool.
  Neighbourhoods of the labels cannot reach a mode of the concept that nothing labelled is
  near (SEALS' blind spot), and a uniform sample of a few thousand rarely lands on its few
  uncertain images; the sweep finds them as the full scan would, one round later;
* the neighbours of a batch's images are fetched when the batch is *selected* (in the round's
  follow-up, while the rater rates it), so the next round finds them in the pool already;
  whatever was labelled and never expanded (a crash, labels from elsewhere) is expanded at the
  start of the next selection, so the pool always holds the neighbours of every labelled image.

Random training negatives still come from the whole split (:mod:`.training`); only the AL
candidates are restricted. Below :data:`POOL_MIN_TRAIN_ROWS` train rows the full scan is fast
(the paper's protocol exactly) and the pool is not used, unless asked for.

This module is pure: the neighbour search is passed in (:mod:`.loop` gives it the ANN index or
the split cache), and the pool is one ``.npz`` file per concept written atomically.
"""

import os
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agile_pipeline import settings
from agile_pipeline.lib.file_lock import exclusive

# k (SEALS' neighbours per labelled image; 100 by the simulated-user study in the README), the
# random sample, and the ``auto`` threshold (settings.POOL_MIN_TRAIN_ROWS says why)
POOL_K, POOL_RANDOM, POOL_MIN_TRAIN_ROWS = settings.POOL_K, settings.POOL_RANDOM, settings.POOL_MIN_TRAIN_ROWS
POOL_SWEEP = settings.POOL_SWEEP
POOL_MODES = ("auto", "on", "off")

NeighbourSearch = Callable[[np.ndarray, int], list[list[str]]]
"""``(queries (m, d) float32, k) -> k nearest train image ids per query``."""


def use_pool(mode: str, n_train: int, min_rows: int = POOL_MIN_TRAIN_ROWS) -> bool:
    """Whether a round scores the pool (``on``), the whole split (``off``), or decides by the
    split's size (``auto``)."""
    if mode not in POOL_MODES:
        raise ValueError(f"unknown candidate pool mode {mode!r}: use one of {', '.join(POOL_MODES)}")
    return mode == "on" or (mode == "auto" and n_train >= min_rows)


@dataclass
class CandidatePool:
    """Pool members, the queries (image ids, or ``phrase:…`` keys) already expanded, and the
    last sweep's most uncertain images (scored with the members, not members themselves)."""

    ids: set[str] = field(default_factory=set)
    expanded: set[str] = field(default_factory=set)
    k: int = POOL_K
    sweep: list[str] = field(default_factory=list)

    def missing(self, keys: Iterable[str]) -> list[str]:
        """The keys (in order, once each) whose neighbours are not in the pool yet."""
        return [q for q in dict.fromkeys(keys) if q not in self.expanded]

    def add(self, keys: Sequence[str], neighbours: Sequence[Sequence[str]]) -> int:
        """Record ``neighbours`` of each of ``keys``; returns how many ids joined the pool."""
        before = len(self.ids)
        for key, hits in zip(keys, neighbours, strict=True):
            self.ids.update(hits)
            self.expanded.add(key)
        return len(self.ids) - before

    def grow(self, keys: Sequence[str], vectors: np.ndarray, search: NeighbourSearch) -> int:
        """Add the ``k`` nearest neighbours of the not-yet-expanded ``keys`` (their query
        ``vectors`` row by row); returns how many ids joined the pool."""
        todo = [j for j, q in enumerate(keys) if q not in self.expanded]
        if not todo:
            return 0
        hits = search(np.asarray(vectors, np.float32)[todo], self.k)
        return self.add([keys[j] for j in todo], hits)


def rows_to_score(pool_rows: np.ndarray, eligible: np.ndarray, n_random: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """The split rows a pooled round scores: the eligible pool rows plus ``n_random`` eligible
    rows outside the pool drawn uniformly (sorted, unique); and how many of them were random.

    ``eligible`` is the split's boolean mask of unlabelled (and not pending) rows. The random
    draw rejects pool members by resampling, so it costs O(n_random), not O(split)."""
    n = eligible.shape[0]
    pool_rows = np.unique(pool_rows[(pool_rows >= 0) & (pool_rows < n)])
    in_pool = pool_rows[eligible[pool_rows]]
    member = np.zeros(n, np.bool_) if n <= 4 * 10**7 else None
    if member is not None:
        member[pool_rows] = True
    outside_eligible = int(eligible.sum()) - int(eligible[pool_rows].sum())
    want = max(0, min(int(n_random), outside_eligible))
    picked: list[np.ndarray] = []
    got = 0
    for _ in range(64):
        if got >= want:
            break
        cand = rng.integers(0, n, size=2 * (want - got) + 16)
        cand = cand[np.sort(np.unique(cand, return_index=True)[1])]  # once each, in draw order
        ok = eligible[cand] & (~member[cand] if member is not None else ~np.isin(cand, pool_rows))
        cand = cand[ok]
        if picked:
            cand = cand[~np.isin(cand, np.concatenate(picked))]
        cand = cand[: want - got]
        picked.append(cand)
        got += cand.size
    extra = np.concatenate(picked) if picked else np.empty(0, np.int64)
    return np.unique(np.concatenate([in_pool, extra]).astype(np.int64)), int(extra.size)


# ---- storage ---------------------------------------------------------------------------------
def pool_path(concept_dir: Path, model_id: str) -> Path:
    return Path(concept_dir) / f"candidate_pool-{model_id}.npz"


def locked(path: Path) -> AbstractContextManager[None]:
    """One read-modify-write of a pool file at a time, across processes (blocking: growing it
    takes a second or two)."""
    return exclusive(path)


def load(path: Path, k: int = POOL_K) -> CandidatePool:
    """The pool stored at ``path``; an empty one when there is none, or when it was grown with
    another ``k`` (it is rebuilt from the labels at the next selection)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["k"]) != k:
                return CandidatePool(k=k)
            sweep = [b.decode() for b in z["sweep"].tolist()] if "sweep" in z.files else []
            return CandidatePool({b.decode() for b in z["ids"].tolist()},
                                 {b.decode() for b in z["expanded"].tolist()}, k, sweep)
    except (OSError, KeyError, ValueError):  # none yet, or a torn file from before a crash
        return CandidatePool(k=k)


def save(path: Path, pool: CandidatePool) -> None:
    """Write ``pool`` atomically (a crash leaves the old file or the new one)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")
    enc = lambda xs: np.array(sorted(x.encode() for x in xs), dtype=bytes)  # noqa: E731
    np.savez(tmp, ids=enc(pool.ids) if pool.ids else np.empty(0, "S1"),
             expanded=enc(pool.expanded) if pool.expanded else np.empty(0, "S1"), k=np.int64(pool.k),
             sweep=np.array([x.encode() for x in pool.sweep], dtype=bytes) if pool.sweep else np.empty(0, "S1"))
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(path)
