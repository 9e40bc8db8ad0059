"""Margin sampling, margin + positive mining, streaming selection and expansion sampling."""

import numpy as np
import pytest

from agile_pipeline.lib.selection import (
    StreamingSelector,
    diversify_by_cluster,
    margin,
    sample_expansion,
    select_cluster_margin,
    select_for_round,
    select_margin,
    select_margin_exact,
    select_margin_positive,
)
from agile_pipeline.lib.split_cache import split_cache
from tests.unit.splits import SPLIT_MODEL, trained_on_split


def _brute_margin(scores: np.ndarray, k: int, eligible: np.ndarray | None = None) -> np.ndarray:
    """Reference: full lexsort by (margin, index)."""
    idx = np.arange(len(scores)) if eligible is None else np.flatnonzero(eligible)
    m = margin(scores[idx])
    return idx[np.lexsort((idx, m))][:k]


def _brute_margin_positive(
    scores: np.ndarray, k: int, eligible: np.ndarray | None = None, frac: float = 0.5
) -> np.ndarray:
    idx = np.arange(len(scores)) if eligible is None else np.flatnonzero(eligible)
    k = min(k, len(idx))
    k_pos = int(np.floor(k * frac + 0.5))
    top = idx[np.lexsort((idx, -scores[idx].astype(np.float64)))][:k_pos]
    rest = np.setdiff1d(idx, top)
    m = margin(scores[rest])
    return np.concatenate([top, rest[np.lexsort((rest, m))][: k - k_pos]])


def _tied_scores(n: int, seed: int) -> np.ndarray:
    """Scores on a coarse grid (many exact ties, symmetric pairs like 0.25/0.75)."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 17, n) / 16).astype(np.float32)


@pytest.mark.parametrize(
    ("p", "expected"),
    [
        ([0.0, 0.5, 1.0], [1.0, 0.0, 1.0]),
        ([0.25, 0.75], [0.5, 0.5]),
        ([0.375, 0.625, 0.5], [0.25, 0.25, 0.0]),
    ],
)
def test_margin_is_abs_2p_minus_1(p, expected):
    np.testing.assert_array_equal(margin(np.array(p, dtype=np.float32)), expected)
    assert margin(np.array(p, dtype=np.float32)).dtype == np.float32


@pytest.mark.parametrize(
    ("scores", "k", "eligible", "expected"),
    [
        # margins: .25 .25 0 .25 .25 .75 -> 0.5 first, then the .25 ties by index
        ([0.375, 0.625, 0.5, 0.625, 0.375, 0.875], 3, None, [2, 0, 1]),
        ([0.375, 0.625, 0.5, 0.625, 0.375, 0.875], 5, None, [2, 0, 1, 3, 4]),
        # row 2 (the most uncertain) and row 0 are already labeled
        ([0.375, 0.625, 0.5, 0.625, 0.375, 0.875], 3,
         [False, True, False, True, True, True], [1, 3, 4]),
        # k larger than the eligible rows: all eligible rows, in margin order
        ([0.9, 0.5, 0.1, 0.6], 10, [True, True, False, True], [1, 3, 0]),
        ([0.9, 0.5], 0, None, []),
    ],
)
def test_select_margin_table(scores, k, eligible, expected):
    elig = None if eligible is None else np.array(eligible)
    got = select_margin(np.array(scores, dtype=np.float32), k, eligible=elig)
    assert got.tolist() == expected
    assert got.dtype == np.int64


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 7, 100, 999])
def test_select_margin_matches_a_full_sort_with_ties(seed, k):
    s = _tied_scores(1000, seed)
    elig = np.random.default_rng(seed + 10).random(1000) < 0.7
    assert np.array_equal(select_margin(s, k), _brute_margin(s, k))
    assert np.array_equal(select_margin(s, k, eligible=elig), _brute_margin(s, k, elig))


def test_select_margin_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        select_margin(np.array([0.1, np.nan]), 1)
    with pytest.raises(ValueError, match="mask"):
        select_margin(np.array([0.1, 0.2]), 1, eligible=np.array([1, 0]))


def test_margin_positive_composition_and_no_duplicates():
    # scores k/64 (exact in binary): the 4 highest are mined as positives, then the 4 nearest
    # 0.5 by margin: 32/64 (margin 0), 31 and 33 (2/64, tie by index), 30 and 34 (4/64) -> 30
    s = np.arange(65) / 64
    got = select_margin_positive(s, 8)
    assert got.tolist() == [64, 63, 62, 61, 32, 31, 33, 30]
    odd = select_margin_positive(s, 7)  # 3.5 rounds half up: 4 positives, 3 by margin
    assert odd.tolist() == [64, 63, 62, 61, 32, 31, 33]
    five = select_margin_positive(s, 5)  # 2.5 rounds half up too (not to even)
    assert five.tolist() == [64, 63, 62, 32, 31]


def test_margin_positive_does_not_repeat_rows_when_top_scores_are_uncertain():
    # every score is near 0.5: the top-scoring rows are also the smallest-margin rows
    s = np.array([0.5, 0.51, 0.49, 0.52, 0.48, 0.53], dtype=np.float64)
    got = select_margin_positive(s, 4)
    assert got[:2].tolist() == [5, 3]  # highest scores
    assert got[2:].tolist() == [0, 1]  # then smallest margins, skipping 3 and 5 (ties by index)
    assert len(set(got.tolist())) == 4


@pytest.mark.parametrize("frac", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("seed", range(3))
def test_margin_positive_matches_reference(frac, seed):
    s = _tied_scores(500, seed)
    elig = np.random.default_rng(seed).random(500) < 0.8
    for k in (1, 10, 101, 600):
        got = select_margin_positive(s, k, eligible=elig, positive_fraction=frac)
        assert np.array_equal(got, _brute_margin_positive(s, k, elig, frac))
        assert len(np.unique(got)) == len(got)
        assert elig[got].all()


@pytest.mark.parametrize("chunk", [1, 3, 64, 250, 999, 5000])
@pytest.mark.parametrize("strategy", ["margin", "margin_positive"])
def test_streaming_equals_one_shot(chunk, strategy):
    rng = np.random.default_rng(chunk)
    n, k = 3000, 100
    s = np.where(rng.random(n) < 0.5, _tied_scores(n, chunk), rng.random(n)).astype(np.float32)
    elig = rng.random(n) < 0.9
    one_shot = (select_margin(s, k, eligible=elig) if strategy == "margin"
                else select_margin_positive(s, k, eligible=elig))
    sel = StreamingSelector(k, strategy=strategy)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        sel.feed(np.arange(start, stop), s[start:stop], eligible=elig[start:stop])
    ids, scores = sel.result()
    assert np.array_equal(ids, one_shot)
    np.testing.assert_array_equal(scores, s[one_shot])
    assert sel.n_seen == n and sel.n_eligible == int(elig.sum())


def test_streaming_with_string_ids_and_fewer_rows_than_k():
    sel = StreamingSelector(10)
    sel.feed(np.array(["b", "a"]), np.array([0.5, 0.5]))
    sel.feed(np.array(["c"]), np.array([0.9]))
    ids, scores = sel.result()
    assert ids.tolist() == ["a", "b", "c"]  # equal margins: ties by id
    assert scores.tolist() == [0.5, 0.5, 0.9]


def test_streaming_keeps_only_o_k_state():
    sel = StreamingSelector(5)
    rng = np.random.default_rng(0)
    for start in range(0, 100_000, 10_000):
        sel.feed(np.arange(start, start + 10_000), rng.random(10_000))
        assert sel._margin.values.size <= 5


def test_streaming_empty_and_validation():
    assert StreamingSelector(3).result()[0].size == 0
    with pytest.raises(ValueError):
        StreamingSelector(3, strategy="entropy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        StreamingSelector(3).feed(np.arange(3), np.zeros(2))


CANDIDATES = {
    "gourmet tuna": ["a", "b", "c", "d"],
    "seared tuna": ["c", "e", "f"],
    "canned tuna": ["a", "g", "h", "e"],  # negative phrase: hard negatives
}


def test_expansion_sample_is_deterministic_and_records_first_phrase():
    got = sample_expansion(CANDIDATES, 5, seed=7)
    assert got == sample_expansion(CANDIDATES, 5, seed=7)
    assert len(got) == 5 and len({i for i, _ in got}) == 5
    first = {"a": "gourmet tuna", "b": "gourmet tuna", "c": "gourmet tuna", "d": "gourmet tuna",
             "e": "seared tuna", "f": "seared tuna", "g": "canned tuna", "h": "canned tuna"}
    for image_id, phrase in got:
        assert first[image_id] == phrase


def test_expansion_takes_the_whole_union_when_it_is_small():
    got = sample_expansion(CANDIDATES, 100, seed=0)
    assert sorted(i for i, _ in got) == list("abcdefgh")
    assert dict(got)["e"] == "seared tuna" and dict(got)["a"] == "gourmet tuna"


def test_expansion_seed_changes_the_sample_and_empty_input():
    samples = {tuple(sample_expansion(CANDIDATES, 3, seed=s)) for s in range(10)}
    assert len(samples) > 1
    assert sample_expansion({}, 10, seed=0) == []
    assert sample_expansion(CANDIDATES, 0, seed=0) == []


# ---- over a split cache: the float32 picks from an approximate scan ----------------------------
@pytest.mark.parametrize("strategy", ["margin", "margin-positive"])
@pytest.mark.parametrize("shortlist", [None, 120])
def test_select_margin_exact_equals_float32_selection(split_store, strategy, shortlist, scan_mode_each):
    model, labeled = trained_on_split(split_store)
    m = split_store.matrix(SPLIT_MODEL, "train")
    c = split_cache(split_store, SPLIT_MODEL, "train")
    probs = model.predict_proba(m.vectors)
    eligible = ~np.isin(m.ids.astype(str), labeled)
    fn = select_margin if strategy == "margin" else select_margin_positive
    want = fn(probs, 100, eligible=eligible)
    got = select_margin_exact(model, c, 100, eligible=~c.mask(labeled), strategy=strategy,
                                    shortlist=shortlist)
    assert got.rows.tolist() == want.tolist()
    assert np.allclose(got.scores, probs[want], atol=1e-6)
    assert got.info["shortlist_proven"]
    sel = select_for_round(split_store, SPLIT_MODEL, model, set(labeled), 100, strategy)
    assert sel.ids == [str(m.ids[i]) for i in want]


def test_approximate_pick_for_the_sweep_is_the_scans_smallest_margins(split_store, scan_mode_each):
    """exact=False (the pool's sweep) skips the float32 proof: the k smallest margins of the
    scan, never a labelled row, nearly the same rows as the exact pick."""
    from agile_pipeline.lib.selection import score_approx

    model, labeled = trained_on_split(split_store)
    c = split_cache(split_store, SPLIT_MODEL, "train")
    eligible = ~c.mask(labeled)
    approx = score_approx(model, c)
    sel = select_for_round(split_store, SPLIT_MODEL, model, set(labeled), 100, "margin", exact=False)
    want = select_margin(approx, 100, eligible=eligible)
    assert sel.ids == c.id_at(want)
    assert not set(sel.ids) & set(labeled)
    assert sel.info["exact"] is False and np.allclose(sel.scores, approx[want])
    exact = select_for_round(split_store, SPLIT_MODEL, model, set(labeled), 100, "margin")
    assert len(set(sel.ids) & set(exact.ids)) >= 80


# ---- cluster-margin: the most uncertain, one per cluster ------------------------------------
def _near_duplicates(groups: int, per: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(groups, dim))
    return np.repeat(centres, per, axis=0) + 0.01 * rng.normal(size=(groups * per, dim))


def test_cluster_margin_takes_one_image_per_group_of_near_duplicates() -> None:
    x = _near_duplicates(groups=10, per=30)
    rng = np.random.default_rng(1)
    scores = 0.5 + rng.choice([-1, 1], size=len(x)) * rng.uniform(0.05, 0.2, size=len(x))
    scores[:30] = 0.5 + rng.uniform(-0.01, 0.01, size=30)  # group 0: the 30 most uncertain of all
    plain = select_margin(scores, 10)
    assert set(plain.tolist()) <= set(range(30))  # margin alone: ten copies of one picture
    got = select_cluster_margin(scores, x, 10, pool=30)
    assert sorted(int(i) // 30 for i in got) == list(range(10))  # one from every group
    m = np.abs(2 * scores - 1)
    for i in got:  # and from each group its most uncertain
        g = int(i) // 30
        assert m[i] == m[g * 30:(g + 1) * 30].min()
    assert np.all(np.diff(m[got]) >= 0)  # ordered by margin


def test_cluster_margin_respects_eligibility_and_small_pools() -> None:
    x = _near_duplicates(groups=5, per=4)
    scores = np.linspace(0.3, 0.7, len(x))
    eligible = np.ones(len(x), bool)
    eligible[::2] = False
    got = select_cluster_margin(scores, x, 3, eligible=eligible)
    assert len(got) == 3 and eligible[got].all()
    assert select_cluster_margin(scores, x, 50, eligible=eligible).tolist() == \
        select_margin(scores, 50, eligible=eligible).tolist()  # fewer rows than the batch: all of them
    with pytest.raises(ValueError, match="vectors"):
        diversify_by_cluster(np.zeros(4), np.zeros((3, 2)), 2)


def test_cluster_margin_over_a_split_cache_is_the_float32_answer(split_store, scan_mode_each) -> None:
    model, labeled = trained_on_split(split_store)
    m = split_store.matrix(SPLIT_MODEL, "train")
    c = split_cache(split_store, SPLIT_MODEL, "train")
    probs = model.predict_proba(m.vectors)
    eligible = ~np.isin(m.ids.astype(str), labeled)
    want = select_cluster_margin(probs, m.vectors, 20, eligible=eligible)
    got = select_margin_exact(model, c, 20, eligible=~c.mask(labeled), strategy="cluster-margin")
    assert got.rows.tolist() == want.tolist() and got.info["pool"] == 200
    sel = select_for_round(split_store, SPLIT_MODEL, model, set(labeled), 20, "cluster-margin")
    assert sel.ids == [str(m.ids[i]) for i in want]
