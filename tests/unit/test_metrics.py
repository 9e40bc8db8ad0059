"""Metrics against hand-computed tiny cases, and the zero-shot cosine score."""

import math

import numpy as np
import pytest

from agile_pipeline.lib.metrics import Metrics, compute_metrics, zero_shot_scores

# y = [0, 0, 1, 1], scores = [0.1, 0.4, 0.35, 0.8]
# Ranked by score: 0.8 (+), 0.4 (-), 0.35 (+), 0.1 (-).
# AP = sum over positives of precision at its rank / n_pos = (1/1 + 2/3) / 2 = 5/6.
# ROC: of the 4 (pos, neg) pairs, the positive wins 3 (0.8>0.1, 0.8>0.4, 0.35>0.1) -> 0.75.
# At 0.5: predicted [0, 0, 0, 1]: TP 1, FP 0, FN 1 -> F1 = 2/(2+0+1) = 2/3; accuracy 3/4.
# At 0.3: predicted [0, 1, 1, 1]: TP 2, FP 1, FN 0 -> F1 = 4/5; accuracy 3/4.
Y = [0, 0, 1, 1]
S = [0.1, 0.4, 0.35, 0.8]


@pytest.mark.parametrize(
    ("threshold", "f1", "acc"),
    [(0.5, 2 / 3, 0.75), (0.3, 0.8, 0.75), (0.9, 0.0, 0.5), (0.0, 2 / 3, 0.5)],
)
def test_hand_computed_case(threshold, f1, acc):
    m = compute_metrics(np.array(Y), np.array(S), threshold=threshold)
    assert m.auc_pr == pytest.approx(5 / 6)
    assert m.auc_roc == pytest.approx(0.75)
    assert m.f1 == pytest.approx(f1)
    assert m.accuracy == pytest.approx(acc)
    assert (m.n, m.n_pos, m.threshold) == (4, 2, threshold)


def test_threshold_is_inclusive():
    # a score exactly at the threshold counts as positive
    m = compute_metrics(np.array([1, 0]), np.array([0.5, 0.2]))
    assert (m.f1, m.accuracy) == (1.0, 1.0)


def test_perfect_and_inverted_rankings():
    perfect = compute_metrics(np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.2, 0.8]))
    assert (perfect.auc_pr, perfect.auc_roc, perfect.f1, perfect.accuracy) == (1, 1, 1, 1)
    inverted = compute_metrics(np.array([1, 0]), np.array([0.1, 0.9]))
    assert inverted.auc_roc == 0.0
    assert inverted.auc_pr == pytest.approx(0.5)  # the positive comes second: precision 1/2


@pytest.mark.parametrize("y", [[0, 0, 0], [1, 1, 1]])
def test_one_class_gives_nan_aucs(y):
    m = compute_metrics(np.array(y), np.array([0.2, 0.6, 0.9]))
    assert math.isnan(m.auc_pr) and math.isnan(m.auc_roc)
    assert m.accuracy == pytest.approx(np.mean(np.array(y) == (np.array([0.2, 0.6, 0.9]) >= 0.5)))
    assert m.n_pos == sum(y)


def test_no_positives_anywhere_gives_zero_f1_not_a_warning():
    m = compute_metrics(np.array([0, 0]), np.array([0.1, 0.2]))
    assert m.f1 == 0.0 and m.accuracy == 1.0


@pytest.mark.parametrize(
    ("y", "s", "match"),
    [
        ([0, 1], [0.1], "labels"),
        ([], [], "empty"),
        ([0, 2], [0.1, 0.2], "0 or 1"),
        ([0, 1], [0.1, float("nan")], "NaN"),
    ],
)
def test_invalid_inputs(y, s, match):
    with pytest.raises(ValueError, match=match):
        compute_metrics(np.array(y), np.array(s))


def test_metrics_to_dict():
    d = compute_metrics(np.array(Y), np.array(S)).to_dict()
    assert set(d) == {"auc_pr", "auc_roc", "f1", "accuracy", "n", "n_pos", "threshold"}
    assert isinstance(compute_metrics(np.array(Y), np.array(S)), Metrics)


def test_zero_shot_scores_are_cosines():
    X = np.array([[3, 4], [0, 0], [1, 0], [-2, 0]], dtype=np.float32)
    got = zero_shot_scores(X, np.array([2.0, 0.0]))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, [0.6, 0.0, 1.0, -1.0], atol=1e-7)


def test_zero_shot_scores_chunks_and_float16():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((1000, 16)).astype(np.float16)
    t = rng.standard_normal(16)
    ref = (X.astype(np.float64) @ t) / (np.linalg.norm(X.astype(np.float64), axis=1) * np.linalg.norm(t))
    np.testing.assert_allclose(zero_shot_scores(X, t), ref, atol=1e-5)
    np.testing.assert_allclose(zero_shot_scores(X, t, batch=33), zero_shot_scores(X, t), atol=1e-6)
    assert (zero_shot_scores(X, np.zeros(16)) == 0).all()
    with pytest.raises(ValueError, match="shape"):
        zero_shot_scores(X, np.ones(3))


def test_bootstrap_interval_brackets_auc_pr_and_narrows_with_more_ratings():
    from agile_pipeline.lib.metrics import bootstrap_auc_pr

    rng = np.random.default_rng(1)
    widths = []
    for n in (40, 400):
        y = (rng.random(n) < 0.3).astype(int)
        s = np.clip(0.35 * y + rng.random(n) * 0.8, 0, 1)
        lo, hi = bootstrap_auc_pr(y, s)
        point = compute_metrics(y, s).auc_pr
        assert lo <= point <= hi
        widths.append(hi - lo)
        assert bootstrap_auc_pr(y, s) == (lo, hi)  # seeded: the same interval every time
    assert widths[1] < widths[0] / 2
    assert all(np.isnan(bootstrap_auc_pr(np.array([1, 1]), np.array([0.2, 0.9]))))  # one class


def test_vectorised_resample_auc_pr_equals_scikit_learn_on_each_resample():
    from sklearn.metrics import average_precision_score

    from agile_pipeline.lib.metrics import weighted_average_precisions

    rng = np.random.default_rng(3)
    n = 60
    y = (rng.random(n) < 0.3).astype(int)
    s = np.round(rng.random(n) + 0.3 * y, 1)  # rounded: many tied scores
    draws = rng.integers(0, n, size=(40, n))
    weights = np.stack([np.bincount(d, minlength=n) for d in draws]).astype(float)
    got = weighted_average_precisions(y, s, weights)
    for d, g in zip(draws, got, strict=True):
        if 0 < y[d].sum() < n:
            assert g == pytest.approx(average_precision_score(y[d], s[d]), abs=1e-12)
    assert np.isnan(weighted_average_precisions(y, s, (1 - y)[None, :].astype(float)))[0]  # no positives
