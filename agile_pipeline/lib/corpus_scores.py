"""A concept's scores for the images of its own corpus: the model's scores propagated over the
corpus's nearest-neighbour graph, the rated images held at their ratings (issue 19, item 3;
:mod:`agile_pipeline.lib.propagation`).

Two kinds of score come out of a round, and the product keeps them apart:

* the **model file** (MLflow, ``TrainedClassifier``) scores any image on its own — what a
  platform team serves on new images;
* the **corpus scores** (this module) exist only for images in the embedding table: the
  predictions table's ``probability`` and the eval figure ``auc_pr_corpus``. They are
  propagated where the graph's rated neighbours share their ratings
  (:func:`corpus_scores`); elsewhere they are the model file's. The graph is built once per
  table version (exact, O(n²·d)), so it is on only up to
  :data:`~agile_pipeline.settings.PROPAGATION_MAX_IMAGES` images (``AGILE_PROPAGATION``).

Rows are in split-cache order: the train split, then the test split (the predictions table's
order). Only the ratings a model trained on are held (its round's label cutoff, train purpose):
eval ratings never enter, so the eval figure measures what propagation does for unrated images.
"""

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from agile_pipeline import settings
from agile_pipeline.lib import propagation
from agile_pipeline.lib.split_cache import SplitCache, has_cache, split_cache

log = logging.getLogger(__name__)


@dataclass
class CorpusGraph:
    """The kNN graph over train then test rows of one embedding table version."""

    train: SplitCache
    test: SplitCache
    graph: np.ndarray
    build_seconds: float

    @property
    def n_train(self) -> int:
        return len(self.train)


def corpus_graph(vectors: Any, model_id: str, *, mode: str | None = None,
                 max_images: int | None = None, build_max_images: int | None = None) -> CorpusGraph | None:
    """The table's graph (built on the first call per table version, then read from the split
    caches' folder), or ``None`` where propagation is off: ``AGILE_PROPAGATION=off``, no split
    caches, fewer than 2 images, or (``auto``) more than ``max_images`` images — and where it is
    not built yet for this table version and the table has more than ``build_max_images``."""
    mode = (mode or settings.propagation_mode())
    if mode == "off" or not has_cache(vectors):
        return None
    train, test = split_cache(vectors, model_id, "train"), split_cache(vectors, model_id, "test")
    n = len(train) + len(test)
    limit = settings.PROPAGATION_MAX_IMAGES if max_images is None else max_images
    if n < 2 or (mode == "auto" and n > limit):
        return None
    path = train.cached(f"graph-k{propagation.K}-{test.tag}")
    t0 = time.perf_counter()
    if path.exists():
        return CorpusGraph(train, test, np.load(path), 0.0)
    if build_max_images is not None and n > build_max_images:
        log.info("corpus graph of %d images not built yet for this table version (the corpus job's "
                 "neighbour_graph asset builds it)", n)
        return None
    X = np.concatenate([np.asarray(train.f16, np.float32), np.asarray(test.f16, np.float32)])
    graph = propagation.knn_graph(X, propagation.K)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, graph)
    tmp.replace(path)
    seconds = time.perf_counter() - t0
    log.info("corpus graph of %d images (k=%d) built in %.1f s", n, propagation.K, seconds)
    return CorpusGraph(train, test, graph, seconds)


@dataclass
class RoundCorpusScores:
    """A round's scores of every graph row (train then test) and what was decided."""

    model: np.ndarray  # the model file's P(concept), float32
    corpus: np.ndarray  # the corpus scores: propagated, or the model's where not
    propagated: bool
    agreement: float | None  # :func:`~agile_pipeline.lib.propagation.neighbour_agreement`
    pairs: int


def model_scores(model: Any, g: CorpusGraph) -> np.ndarray:
    """The model file's P(concept) of every graph row (train then test), float32."""
    return np.concatenate([np.asarray(model.predict_proba(c.f16), np.float32) for c in (g.train, g.test)])


def held_ratings(g: CorpusGraph, ratings: dict[str, int]) -> tuple[np.ndarray, np.ndarray, float | None, int]:
    """``(rows, ratings, agreement, pairs)``: the graph rows of the rated train images, their
    ratings, and the graph's :func:`~agile_pipeline.lib.propagation.neighbour_agreement` on them
    (what decides, before any image is scored, whether to propagate)."""
    ids = list(ratings)
    rows = g.train.positions(ids) if ids else np.empty(0, np.int64)
    keep = rows >= 0
    y = np.array([ratings[i] for i in ids], np.float64)[keep]
    agreement, pairs = propagation.neighbour_agreement(g.graph, rows[keep], y)
    return rows[keep], y, agreement, pairs


def train_ratings(env: Any, concept: str, label_cutoff: int, rule: Any = None) -> dict[str, int]:
    """The train ratings a round trained on (those up to its ``label_cutoff``)."""
    from agile_pipeline.lib.state import LabelRule

    return env.store.effective_labels(concept, purpose="train", rule=rule or LabelRule(), upto=label_cutoff)


def corpus_scores(p: np.ndarray, g: CorpusGraph, ratings: dict[str, int]) -> RoundCorpusScores:
    """``p`` (one score per graph row) propagated over the graph with the train images in
    ``ratings`` (id → 1/0) held at their ratings — if the graph's rated neighbours agree
    (:func:`~agile_pipeline.lib.propagation.should_propagate`; on the unseen glyphs, where a
    glyph's nearest rated image is often its mirrored or lookalike negative, propagation lost
    most of the gain), else ``p`` itself."""
    rows, y, agreement, pairs = held_ratings(g, ratings)
    p = np.asarray(p, np.float32)
    if not propagation.should_propagate(agreement):
        return RoundCorpusScores(p, p, False, agreement, pairs)
    f = propagation.propagate(p, g.graph, rows, y).astype(np.float32)
    return RoundCorpusScores(p, f, True, agreement, pairs)


def round_corpus_scores(env: Any, concept: str, model: Any, label_cutoff: int, g: CorpusGraph, *,
                        rule: Any = None) -> RoundCorpusScores:
    """:func:`corpus_scores` of a round's ``model``, holding the train ratings it trained on
    (those up to ``label_cutoff``)."""
    return corpus_scores(model_scores(model, g), g, train_ratings(env, concept, label_cutoff, rule))


def graph_positives(model: Any, g: CorpusGraph, ratings: dict[str, int]) -> np.ndarray:
    """Train-split rows the round's ``model`` and the graph make confidently positive
    (:func:`~agile_pipeline.lib.propagation.pseudo_positives`, the train ratings in ``ratings``
    held): the kernel rounds refit with them as positives (README, "Graph positives")."""
    rows, y, _, _ = held_ratings(g, ratings)
    return propagation.pseudo_positives(model_scores(model, g), g.graph, rows, y, alpha=propagation.PSEUDO_ALPHA,
                                        limit=propagation.PSEUDO_LIMIT, threshold=propagation.PSEUDO_THRESHOLD,
                                        eligible=g.n_train)
