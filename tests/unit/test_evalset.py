"""Stratified sampling without weights (paper 4.2, Appendix E), checked by hand."""

import numpy as np
import pytest

from agile_pipeline import settings
from agile_pipeline.lib.evalset import (
    EvalSet,
    approx_split_scores,
    stratified_eval_set,
    stratified_eval_set_cached,
    stratum_of,
    zero_shot_calibration,
    zero_shot_to_unit,
    zero_shot_unit_split,
)
from agile_pipeline.lib.keyed_hash import hash_keys
from agile_pipeline.lib.scan import scan_plan, score_approx
from agile_pipeline.lib.split_cache import split_cache
from agile_pipeline.lib.training import TrainConfig, train_classifier
from tests.unit.splits import KEY, SPLIT_DIM, SPLIT_MODEL, reference_siphash


@pytest.mark.parametrize(
    ("score", "dtype", "stratum"),
    [
        (0.0, np.float64, 0),
        (0.0999, np.float64, 0),
        (0.1, np.float64, 1),  # a boundary belongs to the upper stratum
        (0.1, np.float32, 1),
        (0.3, np.float64, 3),  # 0.3 * 10 would round to 2.999..., boundaries are compared instead
        (0.3, np.float32, 3),
        (0.7, np.float32, 7),  # float32(0.7) < 0.7, still stratum 7: boundaries use the scores' dtype
        (0.5, np.float16, 5),
        (0.95, np.float64, 9),
        (np.nextafter(1.0, 0.0), np.float64, 9),
        (1.0, np.float64, 9),  # 1.0 goes to the last stratum [0.9, 1.0]
        (1.0, np.float32, 9),
    ],
)
def test_stratum_boundaries(score, dtype, stratum):
    assert stratum_of(np.array([score], dtype=dtype)).tolist() == [stratum]


def test_stratum_of_other_counts_and_range_checks():
    assert stratum_of(np.array([0, 1 / 3, 0.5, 2 / 3, 1.0]), 3).tolist() == [0, 1, 1, 2, 2]
    assert stratum_of(np.array([1 + 1e-9, -1e-9])).tolist() == [9, 0]  # rounding noise: clipped
    for bad in ([1.01], [-0.2], [np.nan]):
        with pytest.raises(ValueError):
            stratum_of(np.array(bad))
    assert stratum_of(np.array([], dtype=np.float32)).size == 0


# ---- the hand-computed example -------------------------------------------------------------
# 30 keys k00..k29, KEY above. Their SipHash-2-4 values in ascending order (checked below):
HASH_ORDER = [
    "k00", "k01", "k28", "k15", "k24", "k05", "k27", "k26", "k04", "k25",
    "k29", "k19", "k17", "k10", "k07", "k23", "k02", "k06", "k03", "k18",
    "k11", "k21", "k16", "k09", "k14", "k20", "k13", "k08", "k22", "k12",
]
KEYS = [f"k{i:02d}" for i in range(30)]
THIRD = 1 / 3
# 3 strata: [0, 1/3), [1/3, 2/3), [2/3, 1].
# Model A: k00-k09 -> stratum 0, k10-k19 -> stratum 1, k20-k29 -> stratum 2, with boundary
# values: k09 = 0.3333 (just below 1/3: stratum 0), k10 = 1/3 (stratum 1), k28 = 2/3 (stratum 2),
# k24 = 1.0 (stratum 2).
A = np.array([0.1] * 10 + [0.5] * 10 + [0.9] * 10)
A[9], A[10], A[28], A[24] = 0.3333, THIRD, 2 * THIRD, 1.0
# Model B: k00-k04 -> stratum 2, k05-k14 -> stratum 0, k15-k29 -> stratum 1, with
# k10 = 0.3333 (stratum 0) and k00 = 1.0 (stratum 2).
B = np.array([0.9] * 5 + [0.2] * 10 + [0.5] * 15)
B[10], B[0] = 0.3333, 1.0
# per_stratum = 2: each (model, stratum) takes its first 2 keys in HASH_ORDER.
#   A/0 {k00..k09}: k00, k01          B/0 {k05..k14}: k05, k10   (k10 at 0.3333 is in stratum 0)
#   A/1 {k10..k19}: k15, k19          B/1 {k15..k29}: k28, k15
#   A/2 {k20..k29}: k28, k24          B/2 {k00..k04}: k00, k01
# Overlaps: k00, k01 (A/0 and B/2), k15 (A/1 and B/1), k28 (A/2 and B/1).
# Union (8 keys, 12 picks), in hash order: k00 k01 k28 k15 k24 k05 k19 k10.
EXPECTED_KEYS = ["k00", "k01", "k28", "k15", "k24", "k05", "k19", "k10"]
EXPECTED_PICKED_BY = {
    "k00": [("A", 0), ("B", 2)],
    "k01": [("A", 0), ("B", 2)],
    "k28": [("A", 2), ("B", 1)],
    "k15": [("A", 1), ("B", 1)],
    "k24": [("A", 2)],
    "k05": [("B", 0)],
    "k19": [("A", 1)],
    "k10": [("B", 0)],
}


def test_hand_example_hash_order_is_what_the_comments_say():
    assert sorted(KEYS, key=reference_siphash) == HASH_ORDER
    assert stratum_of(A, 3).tolist() == [0] * 10 + [1] * 10 + [2] * 10
    assert stratum_of(B, 3).tolist() == [2] * 5 + [0] * 10 + [1] * 15


def test_hand_example_selection():
    ev = stratified_eval_set(KEYS, {"A": A, "B": B}, key=KEY, per_stratum=2, n_strata=3)
    assert ev.keys == EXPECTED_KEYS
    assert ev.picked_by == EXPECTED_PICKED_BY
    # every model contributes equally: per_stratum from each stratum
    assert ev.counts == {"A": [2, 2, 2], "B": [2, 2, 2]}
    assert ev.stratum_sizes == {"A": [10, 10, 10], "B": [10, 15, 5]}
    assert ev.for_model("A") == ["k00", "k01", "k28", "k15", "k24", "k19"]
    assert ev.for_model("B") == ["k00", "k01", "k28", "k15", "k05", "k10"]
    assert len(ev) == 8 and ev.hashes["k00"] == reference_siphash("k00")


def test_hand_example_boundaries_matter():
    # if k10 (B) were at 1/3 it would leave B/0 (k07 takes its place) and not reach B/1
    b2 = B.copy()
    b2[10] = THIRD
    ev = stratified_eval_set(KEYS, {"A": A, "B": b2}, key=KEY, per_stratum=2, n_strata=3)
    assert ("B", 0) in ev.picked_by["k07"] and "k10" not in ev.picked_by


def test_small_strata_contribute_everything_and_input_order_does_not_matter():
    ev = stratified_eval_set(KEYS, {"A": A, "B": B}, key=KEY, per_stratum=6, n_strata=3)
    assert ev.counts["B"] == [6, 6, 5]  # B's top stratum holds only 5 keys
    perm = np.random.default_rng(0).permutation(30)
    shuffled = stratified_eval_set(
        [KEYS[i] for i in perm], {"A": A[perm], "B": B[perm]}, key=KEY, per_stratum=6, n_strata=3
    )
    assert shuffled.keys == ev.keys and shuffled.picked_by == ev.picked_by


def test_identical_models_overlap_completely():
    one = stratified_eval_set(KEYS, {"A": A}, key=KEY, per_stratum=2, n_strata=3)
    two = stratified_eval_set(KEYS, {"A": A, "A2": A.copy()}, key=KEY, per_stratum=2, n_strata=3)
    assert two.keys == one.keys  # the hash makes agreeing models pick the same images


def test_precomputed_hashes_give_the_same_set_and_json_round_trip():
    h = hash_keys(KEYS, KEY)
    a = stratified_eval_set(KEYS, {"A": A, "B": B}, key=KEY, per_stratum=2, n_strata=3)
    b = stratified_eval_set(KEYS, {"A": A, "B": B}, key=KEY, per_stratum=2, n_strata=3, hashes=h)
    assert a == b
    assert EvalSet.from_dict(a.to_dict()) == a


def test_paper_defaults_on_a_larger_set():
    rng = np.random.default_rng(0)
    keys = [f"https://img/{i}.jpg" for i in range(5000)]
    models = {"round0": rng.random(5000) ** 4, "round1": rng.random(5000) ** 6}
    ev = stratified_eval_set(keys, models, key=KEY)
    for name, counts in ev.counts.items():
        sizes = ev.stratum_sizes[name]
        assert counts == [min(20, s) for s in sizes]
        assert sum(sizes) == 5000
    assert len(ev) <= sum(sum(c) for c in ev.counts.values())
    assert len(set(ev.keys)) == len(ev.keys)
    hashes = [ev.hashes[k] for k in ev.keys]
    assert hashes == sorted(hashes)


def test_duplicate_keys_and_bad_scores_are_rejected():
    with pytest.raises(ValueError, match="duplicate"):
        stratified_eval_set(["a", "b", "a"], {"m": np.array([0.1, 0.2, 0.3])}, key=KEY)
    with pytest.raises(ValueError, match="shape"):
        stratified_eval_set(["a", "b"], {"m": np.array([0.1])}, key=KEY)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        stratified_eval_set(["a", "b"], {"m": np.array([0.1, 0.3 + 1])}, key=KEY)


# ---- zero-shot cosines into [0, 1] ----------------------------------------------------------


def test_zero_shot_to_unit_is_a_fixed_monotone_logistic():
    cos = np.array([-1.0, 0.0, 0.2, 0.28, 0.3, 0.4, 1.0])
    u = zero_shot_to_unit(cos)
    assert u.dtype == np.float32
    assert ((u >= 0) & (u <= 1)).all() and (np.diff(u) >= 0).all()
    assert u[3] == pytest.approx(0.5)  # the CLIP threshold 0.28 maps to 0.5
    # each cosine maps on its own: scoring other images does not move it
    assert zero_shot_to_unit(cos[2:3])[0] == u[2]
    # the middle strata cover center ± T·ln 9
    edge = 0.28 + 0.02 * np.log(9)
    assert zero_shot_to_unit(np.array([edge]))[0] == pytest.approx(0.9, abs=1e-6)


def test_zero_shot_to_unit_spreads_a_narrow_cosine_band_over_the_strata():
    cos = np.linspace(0.2, 0.36, 100)
    naive = stratum_of((cos + 1) / 2)
    assert set(naive.tolist()) == {6}  # (c + 1) / 2 puts the whole band in one stratum
    assert set(stratum_of(zero_shot_to_unit(cos)).tolist()) == set(range(10))


def test_zero_shot_calibration_from_background_quantiles():
    bg = np.random.default_rng(0).normal(0.05, 0.02, 100_000)
    center, temp = zero_shot_calibration(bg)
    u = zero_shot_to_unit(bg, center=center, temperature=temp)
    assert np.mean(u >= 0.5) == pytest.approx(0.001, abs=3e-4)
    assert np.mean(u >= 0.1) == pytest.approx(0.01, abs=1e-3)
    with pytest.raises(ValueError):
        zero_shot_to_unit(bg, temperature=0.0)


# ---- over a split cache: scan scores with a bound, refined where a pick could change ----------
@pytest.mark.parametrize("variant", ["default", "round0", "no_l2", "standardize"])
def test_approx_scores_close_and_strata_exact(split_store, variant, scan_mode_each):
    train = split_store.matrix(SPLIT_MODEL, "train")
    lab = np.arange(0, 400, 2)
    X = np.asarray(train.vectors[lab], np.float32) * (3.0 if variant == "no_l2" else 1.0)
    y = (X[:, 0] > 0.3).astype(int)
    y[:3] = 1
    config = TrainConfig(input_norm="none" if variant == "no_l2" else "l2",
                         standardize=variant == "standardize")
    model = train_classifier(X, y, train.vectors, round_index=0 if variant == "round0" else 1,
                             exclude_from_pool=lab, config=config)
    c = split_cache(split_store, SPLIT_MODEL, "test")
    exact = model.predict_proba(split_store.matrix(SPLIT_MODEL, "test").vectors)
    plan = scan_plan(model, c)
    assert type(plan).__name__ == ("Int8Plan" if scan_mode_each == "int8" else "FloatPlan")
    approx = score_approx(model, c, chunk=1000)
    assert np.abs(approx - exact).max() < 0.02
    sc = approx_split_scores(model, c, mode=scan_mode_each)
    assert np.abs(sc.values - exact).max() <= sc.bound
    # the eval set from lazily refined approximate scores picks what the float32 scores pick
    for per_stratum in (20, 2000):
        sc = approx_split_scores(model, c, mode=scan_mode_each)
        sc.bound = max(sc.bound, 0.02)  # force many ambiguous rows
        got = stratified_eval_set_cached(c, {"m": sc}, key=settings.EVAL_KEY,
                                               per_stratum=per_stratum)
        want = stratified_eval_set(c.str_keys()[:], {"m": exact}, key=settings.EVAL_KEY,
                                   per_stratum=per_stratum)
        assert (got.keys, got.picked_by, got.counts, got.hashes) == (
            want.keys, want.picked_by, want.counts, want.hashes)
        assert sc.exact.sum() < len(c) or per_stratum == 2000
        assert (stratum_of(sc.values[sc.exact]) == stratum_of(exact[sc.exact])).all()


def test_cached_eval_set_equals_reference(split_store):
    test = split_cache(split_store, SPLIT_MODEL, "test")
    m = split_store.matrix(SPLIT_MODEL, "test")
    rng = np.random.default_rng(3)
    scores = {"zero-shot": rng.random(len(test)).astype(np.float32),
              "round-0": rng.beta(0.3, 3, len(test)).astype(np.float32)}
    want = stratified_eval_set([str(i) for i in m.ids], scores, key=settings.EVAL_KEY)
    for _ in range(2):  # computed, then from the cache
        got = stratified_eval_set_cached(test, scores, key=settings.EVAL_KEY)
        assert got.to_dict() == want.to_dict()


def test_zero_shot_unit_split_matches_formula(split_store, tmp_path):
    train, test = (split_cache(split_store, SPLIT_MODEL, s) for s in ("train", "test"))
    text = np.eye(SPLIT_DIM, dtype=np.float32)[0]
    got = zero_shot_unit_split(tmp_path, text, train, test)
    tr = np.asarray(split_store.matrix(SPLIT_MODEL, "train").vectors, np.float32) @ text
    te = np.asarray(split_store.matrix(SPLIT_MODEL, "test").vectors, np.float32) @ text
    center, temp = zero_shot_calibration(tr)
    assert np.allclose(got, zero_shot_to_unit(te, center=center, temperature=temp), atol=1e-5)
    assert np.array_equal(zero_shot_unit_split(tmp_path, text, train, test), got)  # cached
