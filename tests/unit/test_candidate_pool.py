"""The SEALS candidate pool's pure parts (agile_pipeline.lib.candidate_pool)."""

import numpy as np
import pytest

from agile_pipeline.lib import candidate_pool as cp


def _exact_search(X: np.ndarray):  # the k nearest rows by cosine, as ids "r<row>"
    def search(q: np.ndarray, k: int) -> list[list[str]]:
        sims = q @ X.T
        return [[f"r{j}" for j in np.argsort(-s, kind="stable")[:k]] for s in sims]
    return search


def test_use_pool_by_mode_and_size():
    assert not cp.use_pool("off", 10**9)
    assert cp.use_pool("on", 10)
    assert cp.use_pool("auto", cp.POOL_MIN_TRAIN_ROWS) and not cp.use_pool("auto", cp.POOL_MIN_TRAIN_ROWS - 1)
    with pytest.raises(ValueError, match="unknown candidate pool mode 'sometimes'"):
        cp.use_pool("sometimes", 10)


def test_pool_grows_by_the_neighbours_of_new_keys_only():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((500, 8)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    pool = cp.CandidatePool(k=5)
    search = _exact_search(X)
    calls: list[int] = []

    def counting(q: np.ndarray, k: int) -> list[list[str]]:
        calls.append(len(q))
        return search(q, k)

    added = pool.grow(["a", "b"], X[[3, 7]], counting)
    expected = set(search(X[[3]], 5)[0]) | set(search(X[[7]], 5)[0])
    assert pool.ids == expected and added == len(expected) and pool.expanded == {"a", "b"}
    # a key already expanded is not searched again; a new one is
    added = pool.grow(["a", "c"], X[[3, 11]], counting)
    assert calls == [2, 1]
    assert set(search(X[[11]], 5)[0]) <= pool.ids and added == len(pool.ids) - len(expected)
    assert pool.missing(["a", "d", "d", "c"]) == ["d"]


def test_rows_to_score_takes_eligible_pool_rows_and_a_uniform_sample_of_the_rest():
    n = 10_000
    eligible = np.ones(n, bool)
    eligible[:100] = False  # labelled
    pool_rows = np.array([5, 50, 500, 501, 501, 9_999, -1, n + 3])
    rows, n_random = cp.rows_to_score(pool_rows, eligible, 300, np.random.default_rng(1))
    assert n_random == 300
    assert {500, 501, 9_999} <= set(rows.tolist())  # eligible members; 5 and 50 are labelled
    assert not {5, 50} & set(rows.tolist())
    assert len(rows) == len(set(rows.tolist())) == 303 and eligible[rows].all()
    assert (np.diff(rows) > 0).all()
    # the random rows are spread over the split, not its start
    extra = np.setdiff1d(rows, [500, 501, 9_999])
    assert extra.min() < 2_000 and extra.max() > 8_000
    # asking for more random rows than there are eligible ones outside the pool takes them all
    small = np.zeros(50, bool)
    small[[1, 2, 3, 40]] = True
    rows, n_random = cp.rows_to_score(np.array([1]), small, 100, np.random.default_rng(0))
    assert rows.tolist() == [1, 2, 3, 40] and n_random == 3


def test_pool_file_round_trips_and_a_k_change_starts_over(tmp_path):
    path = cp.pool_path(tmp_path, "m")
    assert cp.load(path).ids == set()  # none yet
    pool = cp.CandidatePool({"x", "y"}, {"img1", "query:positive:cat"}, k=7)
    with cp.locked(path):
        cp.save(path, pool)
    back = cp.load(path, k=7)
    assert back.ids == {"x", "y"} and back.expanded == {"img1", "query:positive:cat"} and back.k == 7
    assert cp.load(path, k=8).ids == set()  # grown with another k: rebuilt from the labels
    path.write_bytes(b"torn")  # a file cut short is treated as no pool, never an error
    assert cp.load(path, k=7).ids == set()
    assert not list(tmp_path.glob("*.tmp*"))


def test_pool_file_keeps_the_sweep_in_order_and_reads_a_file_from_before_it(tmp_path):
    path = cp.pool_path(tmp_path, "m")
    cp.save(path, cp.CandidatePool({"x"}, {"img1"}, k=7, sweep=["b", "a", "c"]))
    assert cp.load(path, k=7).sweep == ["b", "a", "c"]  # most uncertain first, as the scan ranked
    np.savez(path.with_suffix(".tmp.npz"), ids=np.array([b"x"]), expanded=np.array([b"img1"]), k=np.int64(7))
    path.with_suffix(".tmp.npz").replace(path)  # a pool written before sweeps existed
    old = cp.load(path, k=7)
    assert old.ids == {"x"} and old.sweep == []
