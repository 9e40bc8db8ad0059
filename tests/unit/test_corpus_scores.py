"""Corpus scores by label propagation (agile_pipeline.lib.corpus_scores) on real split caches
(LanceDB table + its caches): the graph is built once per table version, ratings are held, and
the predictions table carries both kinds of score."""

import secrets

import numpy as np
import pyarrow.parquet as pq
import pytest

from agile_pipeline.lib.corpus_scores import corpus_graph, corpus_scores, model_scores
from agile_pipeline.lib.predictions import score_corpus
from agile_pipeline.lib.propagation import knn_graph
from agile_pipeline.lib.state import StateStore
from tests.unit.splits import SPLIT_DIM, SPLIT_MODEL
from tests.unit.test_predictions import Dot


def test_graph_is_off_by_setting_and_above_the_size_limit(split_store, monkeypatch) -> None:
    assert corpus_graph(split_store, SPLIT_MODEL, mode="off") is None
    assert corpus_graph(split_store, SPLIT_MODEL, mode="auto", max_images=5999) is None  # 6,000 images
    assert corpus_graph(split_store, SPLIT_MODEL, mode="on", max_images=10) is not None  # on: any size
    monkeypatch.setenv("AGILE_PROPAGATION", "sometimes")
    with pytest.raises(ValueError, match="AGILE_PROPAGATION='sometimes'"):
        corpus_graph(split_store, SPLIT_MODEL)


def test_graph_is_built_once_per_table_version_over_train_then_test(split_store) -> None:
    g = corpus_graph(split_store, SPLIT_MODEL, mode="auto")
    assert g is not None and g.build_seconds > 0
    X = np.concatenate([np.asarray(c.f16, np.float32) for c in (g.train, g.test)])
    assert g.n_train == len(split_store.matrix(SPLIT_MODEL, "train").ids) and len(g.graph) == len(X) == 6000
    np.testing.assert_array_equal(g.graph, knn_graph(X, 10))
    again = corpus_graph(split_store, SPLIT_MODEL, mode="auto")
    assert again is not None and again.build_seconds == 0.0  # read back from the cache folder
    np.testing.assert_array_equal(again.graph, g.graph)
    split_store.add(SPLIT_MODEL, [secrets.token_hex(16)], ["test"],
                    np.ones((1, SPLIT_DIM), np.float32) / SPLIT_DIM**0.5)
    grown = corpus_graph(split_store, SPLIT_MODEL, mode="auto")  # a new table version: rebuilt
    assert grown is not None and len(grown.graph) == 6001 and grown.build_seconds > 0


def test_propagation_holds_train_ratings_only(split_store) -> None:
    g = corpus_graph(split_store, SPLIT_MODEL, mode="auto")
    assert g is not None
    p = model_scores(Dot(1), g)
    train_ids = g.train.id_at(np.arange(3))
    test_id = g.test.id_at([0])[0]
    got = corpus_scores(p, g, {train_ids[0]: 1, train_ids[1]: 0, train_ids[2]: 1, test_id: 1})
    assert got.propagated and got.agreement is None and got.pairs == 0  # no rated neighbours: no evidence
    f = got.corpus
    np.testing.assert_array_equal(f[:3], [1.0, 0.0, 1.0])
    assert f[g.n_train] != 1.0  # a test image's rating (an eval rating) is never held
    assert f.dtype == np.float32 and len(f) == len(p)
    assert not np.allclose(f[3:], p[3:])  # every image listens to its neighbours
    np.testing.assert_array_equal(got.model, p)


def test_no_propagation_where_the_graphs_rated_neighbours_disagree(split_store) -> None:
    g = corpus_graph(split_store, SPLIT_MODEL, mode="auto")
    assert g is not None
    p = model_scores(Dot(1), g)
    # rate positives whose nearest train neighbour is rated negative
    ratings: dict[str, int] = {}
    for i in range(0, 200, 7):
        j = next(int(j) for j in g.graph[i] if j < g.n_train)
        if str(g.train.id_at([i])[0]) in ratings or str(g.train.id_at([j])[0]) in ratings:
            continue
        ratings[g.train.id_at([i])[0]] = 1
        ratings[g.train.id_at([j])[0]] = 0
    got = corpus_scores(p, g, ratings)
    assert got.agreement is not None and got.agreement < 0.75 and got.pairs >= 10
    assert not got.propagated and got.corpus is got.model


def test_predictions_table_carries_corpus_and_model_scores(split_store, tmp_path) -> None:
    store = StateStore(tmp_path / "state.db")
    out = tmp_path / "predictions" / "c.parquet"
    g = corpus_graph(split_store, SPLIT_MODEL, mode="auto")
    assert g is not None
    calls = []

    def scores():  # type: ignore[no-untyped-def]
        calls.append(1)
        return corpus_scores(model_scores(Dot(1), g), g, {g.train.id_at([0])[0]: 1})

    res = score_corpus(store=store, vectors=split_store, model_id=SPLIT_MODEL, model=Dot(1),
                       model_version="1", out=out, corpus_scores=scores)
    t = pq.read_table(out).to_pydict()
    assert res.rows == res.scored_now == 6000 and t["propagated"] == [True] * 6000
    got = scores()
    assert res.propagated and got.propagated
    np.testing.assert_allclose(t["probability"], got.corpus, atol=1e-6)
    np.testing.assert_allclose(t["model_probability"], got.model, atol=1e-6)
    f = got.corpus
    assert t["is_concept"] == [bool(x >= 0.5) for x in t["probability"]]
    assert t["split"][: g.n_train] == ["train"] * g.n_train and set(t["split"][g.n_train:]) == {"test"}
    assert res.top[0][1] == pytest.approx(float(np.max(f)))
    n_calls = len(calls)
    same = score_corpus(store=store, vectors=split_store, model_id=SPLIT_MODEL, model=Dot(1),
                        model_version="1", out=out, corpus_scores=scores)
    assert same.scored_now == 0 and len(calls) == n_calls  # unchanged: nothing scored
    # propagation turned off: the same champion's own scores, rewritten
    plain = score_corpus(store=store, vectors=split_store, model_id=SPLIT_MODEL, model=Dot(1),
                         model_version="1", out=out)
    t = pq.read_table(out).to_pydict()
    assert plain.scored_now == 6000 and t["propagated"] == [False] * 6000
    np.testing.assert_allclose(t["probability"], t["model_probability"])
