"""Label propagation over the corpus's kNN graph (agile_pipeline.lib.propagation)."""

import numpy as np
import pytest

from agile_pipeline.lib.propagation import knn_graph, propagate


def _points(n: int = 300, d: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def test_knn_graph_is_the_exact_cosine_neighbours_in_any_block_size() -> None:
    X = _points()
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    s = U.astype(np.float64) @ U.T.astype(np.float64)
    np.fill_diagonal(s, -np.inf)
    g = knn_graph(X, 7, block=64)  # five blocks
    assert g.shape == (300, 7) and g.dtype == np.int64
    assert not (g == np.arange(300)[:, None]).any()  # never the image itself
    np.testing.assert_allclose(np.take_along_axis(s, g, axis=1), -np.sort(-s, axis=1)[:, :7], atol=1e-5)
    np.testing.assert_array_equal(g, knn_graph(X, 7, block=1000))  # one block: the same graph


def test_knn_graph_of_a_tiny_corpus_has_every_other_image_and_refuses_one_image() -> None:
    g = knn_graph(_points(4), 10)
    assert g.shape == (4, 3)
    assert all(set(row) == set(range(4)) - {i} for i, row in enumerate(g.tolist()))
    with pytest.raises(ValueError, match="at least 2"):
        knn_graph(_points(1), 10)


def test_propagation_holds_ratings_and_reaches_the_neighbours_of_a_positive() -> None:
    # a chain 0-1-2-3-4-5: each image's neighbours are the ones beside it
    graph = np.array([[1, 1], [0, 2], [1, 3], [2, 4], [3, 5], [4, 4]])
    p = np.full(6, 0.2)
    f = propagate(p, graph, np.array([0]), np.array([1.0]), alpha=0.5)
    assert f[0] == 1.0
    assert f[1] > f[2] > f[3] > f[4] >= f[5] > 0.2  # the rating fades along the chain
    np.testing.assert_array_equal(propagate(p, graph, np.array([0]), np.array([1.0]), alpha=0.0)[1:], p[1:])
    g = propagate(p, graph, np.array([0, 5]), np.array([1.0, 0.0]), alpha=0.5)
    assert g[5] == 0.0 and g[4] < f[4]  # a negative rating pulls its neighbours down


def test_propagation_refuses_bad_settings() -> None:
    graph = np.array([[1], [0]])
    with pytest.raises(ValueError, match="alpha"):
        propagate(np.zeros(2), graph, np.array([0]), np.array([1.0]), alpha=1.0)
    with pytest.raises(ValueError, match="3 scores for a graph of 2"):
        propagate(np.zeros(3), graph, np.array([0]), np.array([1.0]))


def test_corpus_graph_benchmark_prints_its_figures(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.corpus_graph import main

    (row,) = main(["--sizes", "500", "--dim", "16", "--repeats", "1"])
    assert row["images"] == 500 and row["build_s"] > 0 and row["propagate_ms"] > 0
    assert row["graph_mib"] == pytest.approx(500 * 10 * 8 / 2**20)
    assert "| 500 |" in capsys.readouterr().out


def test_neighbour_agreement_reads_each_rated_positives_nearest_rated_neighbour() -> None:
    from agile_pipeline.lib.propagation import neighbour_agreement, should_propagate

    # rows' neighbours, most similar first; rated: 0 (+), 1 (+), 2 (-), 3 (+)
    graph = np.array([[5, 1, 2], [2, 0, 4], [1, 0, 3], [4, 5, 6], [0, 1, 2], [0, 1, 2], [0, 1, 2]])
    rated, y = np.array([0, 1, 2, 3]), np.array([1, 1, 0, 1])
    # 0's nearest rated is 1 (+): agrees; 1's is 2 (-): disagrees; 3 has no rated neighbour
    assert neighbour_agreement(graph, rated, y) == (0.5, 2)
    assert not should_propagate(0.5) and should_propagate(0.75) and should_propagate(None)
    assert neighbour_agreement(graph, np.array([3, 2]), np.array([1, 0])) == (None, 0)  # no evidence


def test_pseudo_positives_are_the_most_confident_unrated_eligible_rows() -> None:
    from agile_pipeline.lib.propagation import pseudo_positives

    # a chain 0-1-...-7; 0 rated positive: its neighbours along the chain become confident
    graph = np.array([[1, 1], [0, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7], [6, 6]])
    p = np.array([0.9, 0.6, 0.6, 0.6, 0.1, 0.1, 0.1, 0.1])
    f = propagate(p, graph, np.array([0]), np.array([1.0]), alpha=0.5)
    got = pseudo_positives(p, graph, np.array([0]), np.array([1.0]), alpha=0.5, limit=10, threshold=0.5)
    assert 0 not in got  # a rated image is never a pseudo-label
    np.testing.assert_array_equal(got, np.flatnonzero(f[1:] >= 0.5)[np.argsort(-f[1:][f[1:] >= 0.5])] + 1)
    assert list(got[:1]) == [1] and 4 not in got  # most confident first; the low end stays out
    assert list(pseudo_positives(p, graph, np.array([0]), np.array([1.0]), alpha=0.5, limit=1)) == [1]
    assert set(pseudo_positives(p, graph, np.array([0]), np.array([1.0]), alpha=0.5, eligible=2)) <= {1}
    assert not len(pseudo_positives(p, graph, np.array([0]), np.array([1.0]), threshold=1.01))
