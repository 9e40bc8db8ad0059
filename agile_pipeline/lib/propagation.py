"""Label propagation over the corpus's nearest-neighbour graph (issue 19, item 3).

A classifier scores each image on its own; images of one concept often sit in tight groups
(the same emoji in four art sets, the same product photographed twice), and a few ratings
reach further when a score also listens to the image's neighbours. Over the kNN graph of the
whole corpus (every image and its ``k`` most similar images by cosine), ten steps of

    f = (1 - alpha) · p + alpha · mean of f over the k neighbours

start from the model's scores ``p``, with the rated images held at their ratings (Zhou et al.,
"Learning with local and global consistency", NIPS 2003, with a kNN graph). The result scores
only images in the graph: it is the corpus's score, not a model file for new images.
"""

import numpy as np

ALPHA = 0.4  # the neighbours' weight (README, "Corpus scores": 0.3-0.5 measured)
K = 10  # neighbours per image
STEPS = 10
MIN_AGREEMENT = 0.75  # propagate when the graph's rated neighbours agree at least this often


def knn_graph(X: np.ndarray, k: int = K, *, block: int = 2048) -> np.ndarray:
    """The ``k`` most similar rows (cosine) of every row of ``X``, most similar first, never the
    row itself: an ``(n, k)`` int64 array. Exact, in blocks of up to ``block`` rows (O(n²·d);
    a block's similarities are kept under ~512 MiB)."""
    n = len(X)
    if n < 2:
        raise ValueError(f"a neighbour graph needs at least 2 images, got {n}")
    k = min(k, n - 1)
    block = max(16, min(block, (1 << 27) // n))
    U = np.asarray(X, np.float32)
    U = U / np.maximum(np.linalg.norm(U, axis=1, keepdims=True), 1e-12)
    out = np.empty((n, k), np.int64)
    for a in range(0, n, block):
        s = U[a:a + block] @ U.T
        s[np.arange(len(s)), np.arange(a, a + len(s))] = -np.inf  # not its own neighbour
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(s, part, axis=1), axis=1, kind="stable")
        out[a:a + block] = np.take_along_axis(part, order, axis=1)
    return out


def propagate(p: np.ndarray, graph: np.ndarray, rated: np.ndarray, ratings: np.ndarray, *,
              alpha: float = ALPHA, steps: int = STEPS) -> np.ndarray:
    """The model's scores ``p`` (one per graph row) propagated over ``graph``; rows ``rated``
    held at ``ratings`` (1 positive, 0 negative). float64, one per row."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    if len(p) != len(graph):
        raise ValueError(f"{len(p)} scores for a graph of {len(graph)} images")
    rated = np.asarray(rated, np.int64)
    ratings = np.asarray(ratings, np.float64)
    p0 = np.asarray(p, np.float64).copy()
    p0[rated] = ratings
    f = p0.copy()
    for _ in range(steps):
        f = (1 - alpha) * p0 + alpha * f[graph].mean(axis=1)
        f[rated] = ratings
    return f


def neighbour_agreement(graph: np.ndarray, rated: np.ndarray, ratings: np.ndarray) -> tuple[float | None, int]:
    """How far the graph's neighbours share the ratings: of the rated positives with a rated
    image among their graph neighbours, the fraction whose most similar rated neighbour is a
    positive too; ``(None, 0)`` when no rated positive has one. The graph's counterpart of
    :func:`~agile_pipeline.lib.model_choice.near_duplicate_agreement`."""
    label = dict(zip(np.asarray(rated, np.int64).tolist(), np.asarray(ratings).astype(int).tolist(), strict=True))
    agree = pairs = 0
    for row, y in label.items():
        if y != 1:
            continue
        nearest = next((label[j] for j in graph[row].tolist() if j in label), None)
        if nearest is not None:
            pairs += 1
            agree += nearest == 1
    return (agree / pairs if pairs else None), pairs


def should_propagate(agreement: float | None, min_agreement: float | None = None) -> bool:
    """Propagate unless the ratings say the graph's neighbours disagree (no evidence: propagate);
    ``min_agreement`` defaults to :data:`MIN_AGREEMENT`."""
    return agreement is None or agreement >= (MIN_AGREEMENT if min_agreement is None else min_agreement)


PSEUDO_ALPHA = 0.5  # self-training's propagation (README, "Graph positives")
PSEUDO_LIMIT = 50  # at most this many graph positives per round
PSEUDO_THRESHOLD = 0.5  # ... each with a propagated score at least this


def pseudo_positives(p: np.ndarray, graph: np.ndarray, rated: np.ndarray, ratings: np.ndarray, *,
                     alpha: float = PSEUDO_ALPHA, limit: int = PSEUDO_LIMIT,
                     threshold: float = PSEUDO_THRESHOLD, eligible: int | None = None) -> np.ndarray:
    """Rows (not ``rated``; below ``eligible`` if given) that the model's scores ``p``
    propagated over ``graph`` make confidently positive: up to ``limit`` with a propagated score
    ≥ ``threshold``, most confident first. A model refitted with them as positives carries some
    of the graph's smoothing into its file (self-training on the graph: Iscen et al., "Label
    propagation for deep semi-supervised learning", CVPR 2019)."""
    f = propagate(p, graph, rated, ratings, alpha=alpha)
    f[np.asarray(rated, np.int64)] = -np.inf
    if eligible is not None:
        f[eligible:] = -np.inf
    order = np.argsort(-f, kind="stable")[:limit]
    return order[f[order] >= threshold]
