"""The corpus predictions table (agile_pipeline.lib.predictions.score_corpus) on real split
caches: a new champion rescores the same rows in place, an unchanged one writes nothing, and a
corpus refresh scores only the new images."""

import secrets

import numpy as np
import pyarrow.parquet as pq

from agile_pipeline.lib.predictions import score_corpus
from agile_pipeline.lib.state import StateStore
from tests.unit.splits import SPLIT_DIM, SPLIT_MODEL


class Dot:
    """A linear scorer on the stored vectors: P = sigmoid(w·x)."""

    def __init__(self, seed: int) -> None:
        self.w = np.random.default_rng(seed).normal(size=SPLIT_DIM).astype(np.float32)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return (1 / (1 + np.exp(-np.asarray(X, np.float32) @ self.w))).astype(np.float32)


def _table(out):
    t = pq.read_table(out)
    return {i: (p, v) for i, p, v in zip(t.column("image_id").to_pylist(), t.column("probability").to_pylist(),
                                         t.column("model_version").to_pylist(), strict=True)}


def test_predictions_rescore_in_place_skip_when_unchanged_and_extend_on_refresh(split_store, tmp_path):
    store = StateStore(tmp_path / "state.db")
    out = tmp_path / "predictions" / "c.parquet"
    ids = [str(i) for m in (split_store.matrix(SPLIT_MODEL, s) for s in ("train", "test")) for i in m.ids]
    X = split_store.vectors_for(SPLIT_MODEL, ids)

    first = score_corpus(store=store, vectors=split_store, model_id=SPLIT_MODEL, model=Dot(1),
                         model_version="1", out=out)
    assert first.rescored_all and first.scored_now == first.rows == len(ids)
    got = _table(out)
    assert np.allclose([got[i][0] for i in ids], Dot(1).predict_proba(X), atol=1e-6)

    written = out.stat().st_mtime_ns
    same = score_corpus(store=store, vectors=split_store, model_id=SPLIT_MODEL, model=Dot(1),
                        model_version="1", out=out)
    assert same.scored_now == 0 and same.rows == len(ids) and same.top == first.top
    assert out.stat().st_mtime_ns == written  # nothing rewritten

    second = score_corpus(store=store, vectors=split_store, model_id=SPLIT_MODEL, model=Dot(2),
                          model_version="2", out=out)
    assert second.rescored_all and second.scored_now == len(ids)
    got = _table(out)
    assert set(got) == set(ids) and {v for _, v in got.values()} == {"2"}
    want = Dot(2).predict_proba(X)
    assert np.allclose([got[i][0] for i in ids], want, atol=1e-6)
    best = int(np.argmax(want))
    assert second.top[0] == (ids[best], float(want[best]))  # no paths in this store: the id

    new_id = secrets.token_hex(16)
    v = np.ones((1, SPLIT_DIM), np.float32) / SPLIT_DIM**0.5
    split_store.add(SPLIT_MODEL, [new_id], ["train"], v)
    refreshed = score_corpus(store=store, vectors=split_store, model_id=SPLIT_MODEL, model=Dot(2),
                             model_version="2", out=out)
    assert refreshed.scored_now == 1 and refreshed.rows == len(ids) + 1 and not refreshed.rescored_all
    v = split_store.vectors_for(SPLIT_MODEL, [new_id])  # as stored (float16)
    assert np.isclose(_table(out)[new_id][0], Dot(2).predict_proba(v)[0], atol=1e-6)
    # a new champion after the refresh: the appended table is not in cache order, so it is rebuilt
    third = score_corpus(store=store, vectors=split_store, model_id=SPLIT_MODEL, model=Dot(3),
                         model_version="3", out=out)
    got = _table(out)
    assert third.rows == len(got) == len(ids) + 1
    assert np.allclose([got[i][0] for i in [*ids, new_id]],
                       Dot(3).predict_proba(np.vstack([X, v])), atol=1e-6)
