"""The paper's MLP recipe: architecture per round, labels, determinism, and that it learns."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score
from torch import nn

from agile_pipeline.lib.training import (
    L2NormLinear,
    NotEnoughLabels,
    TrainConfig,
    TrainedClassifier,
    _batch_counts,
    _fold_standardization,
    build_mlp,
    sample_random_negatives,
    train_classifier,
)

D = 48
FAST = TrainConfig(epochs=2)  # for tests about plumbing, not about what is learned


def _unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def _planted(n: int, seed: int, prevalence: float = 0.03) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors with a common component; positives lean towards one hidden direction."""
    rng = np.random.default_rng(1234)  # the same concept direction for every call
    u = _unit(rng.standard_normal((1, D)))[0]
    common = _unit(rng.standard_normal((1, D)))[0]
    rs = np.random.default_rng(seed)
    x = _unit(rs.standard_normal((n, D))) + 0.8 * common
    y = (rs.random(n) < prevalence).astype(np.int64)
    x[y == 1] += 0.9 * u
    return _unit(x), y


@pytest.fixture(scope="module")
def task() -> dict[str, np.ndarray]:
    pool, y_pool = _planted(6000, seed=1)
    test, y_test = _planted(4000, seed=2)
    rng = np.random.default_rng(3)
    pos = rng.choice(np.flatnonzero(y_pool == 1), 30, replace=False)
    neg = rng.choice(np.flatnonzero(y_pool == 0), 70, replace=False)
    lab = np.concatenate([pos, neg])
    return {
        "pool": pool, "lab": lab, "X": pool[lab], "y": y_pool[lab],
        "test": test, "y_test": y_test,
    }


def _linear_shapes(clf: TrainedClassifier) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in clf.module if isinstance(m, nn.Linear)]


def test_learns_the_planted_concept(task):
    base_rate = task["y_test"].mean()
    for round_index in (0, 1):
        clf = train_classifier(
            task["X"], task["y"], task["pool"], round_index=round_index,
            exclude_from_pool=task["lab"],
        )
        ap = average_precision_score(task["y_test"], clf.predict_proba(task["test"]))
        assert ap > 0.6, (round_index, ap)
        assert ap > 10 * base_rate


@pytest.mark.parametrize(
    ("round_index", "shapes"),
    [
        (0, [(D, 16), (16, 1)]),
        (1, [(D, 128), (128, 128), (128, 128), (128, 1)]),
        (4, [(D, 128), (128, 128), (128, 128), (128, 1)]),
    ],
)
def test_round_zero_is_1x16_and_later_rounds_3x128(task, round_index, shapes):
    clf = train_classifier(task["X"], task["y"], task["pool"], round_index=round_index, config=FAST)
    assert _linear_shapes(clf) == shapes
    assert clf.meta.hidden == tuple(s[1] for s in shapes[:-1])
    assert clf.meta.round_index == round_index
    dropouts = [m.p for m in clf.module if isinstance(m, nn.Dropout)]
    assert dropouts == [0.5] * len(clf.meta.hidden)
    assert isinstance(clf.module[0], L2NormLinear)


def test_paper_defaults():
    c = TrainConfig()
    assert (c.hidden_first, c.hidden_later) == ((16,), (128, 128, 128))
    assert (c.dropout, c.weight_decay, c.lr, c.epochs) == (0.5, 1e-4, 1e-4, 10)
    assert (c.random_negatives, c.frac_pos, c.frac_neg, c.frac_random) == (500_000, 0.5, 0.25, 0.25)
    assert TrainConfig.from_dict(c.to_dict()) == c


def test_same_seed_gives_bit_identical_weights_and_predictions(task):
    a = train_classifier(task["X"], task["y"], task["pool"], round_index=1)
    b = train_classifier(task["X"], task["y"], task["pool"], round_index=1)
    for (ka, va), (kb, vb) in zip(a.module.state_dict().items(), b.module.state_dict().items(), strict=True):
        assert ka == kb
        assert torch.equal(va, vb)
    assert np.array_equal(a.predict_proba(task["test"]), b.predict_proba(task["test"]))


def test_different_seed_gives_different_model(task):
    a = train_classifier(task["X"], task["y"], task["pool"], round_index=1)
    b = train_classifier(
        task["X"], task["y"], task["pool"], round_index=1, config=TrainConfig(seed=1)
    )
    assert not np.array_equal(a.predict_proba(task["test"]), b.predict_proba(task["test"]))


def test_global_rng_and_thread_count_are_left_alone(task):
    threads = torch.get_num_threads()
    state = torch.random.get_rng_state()
    train_classifier(task["X"], task["y"], task["pool"], round_index=0, config=FAST)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.get_num_threads() == threads


def test_no_positive_labels_is_not_enough_and_says_what_to_do(task):
    with pytest.raises(NotEnoughLabels) as exc:
        train_classifier(
            task["X"][:5], np.zeros(5, int), task["pool"], round_index=0, concept="gourmet tuna"
        )
    msg = str(exc.value)
    assert "no positive labels yet for 'gourmet tuna'" in msg
    assert "rate at least one image as positive" in msg
    assert isinstance(exc.value, ValueError)


def test_no_negatives_of_any_kind_is_not_enough(task):
    with pytest.raises(NotEnoughLabels, match="no negatives"):
        train_classifier(
            task["X"][:5], np.ones(5, int), np.empty((0, D), np.float32), round_index=0
        )
    # the pool is all labeled: nothing is left to serve as a random negative either
    with pytest.raises(NotEnoughLabels, match="no negatives"):
        train_classifier(
            task["X"][:5], np.ones(5, int), task["X"][:5], round_index=0,
            exclude_from_pool=np.ones(5, bool), config=FAST,
        )


def test_no_labeled_negatives_trains_on_random_negatives_with_a_warning(task):
    pos = task["y"] == 1
    clf = train_classifier(task["X"][pos], task["y"][pos], task["pool"], round_index=0, config=FAST)
    assert clf.meta.n_neg == 0 and clf.meta.n_random_neg > 0
    assert any("no labeled negatives" in w for w in clf.meta.warnings)


def test_no_pool_trains_on_labels_with_a_warning(task):
    clf = train_classifier(task["X"], task["y"], np.empty((0, D), np.float32), round_index=0, config=FAST)
    assert clf.meta.n_random_neg == 0
    assert any("without random negatives" in w for w in clf.meta.warnings)


@pytest.mark.parametrize("bad", [[0, 1, 2], [0, 1, -1], [0.5, 1, 0]])
def test_labels_must_be_zero_or_one(task, bad):
    with pytest.raises(ValueError, match="0 or 1") as exc:
        train_classifier(task["X"][:3], np.array(bad), task["pool"], round_index=0, config=FAST)
    assert not isinstance(exc.value, NotEnoughLabels)


def test_shape_mismatches_are_rejected(task):
    with pytest.raises(ValueError, match="labels"):
        train_classifier(task["X"], task["y"][:-1], task["pool"], round_index=0, config=FAST)
    with pytest.raises(ValueError, match="X_pool"):
        train_classifier(task["X"], task["y"], task["pool"][:, :-1], round_index=0, config=FAST)


def test_meta_records_what_was_trained(task):
    clf = train_classifier(
        task["X"], task["y"], task["pool"], round_index=2, exclude_from_pool=task["lab"]
    )
    m = clf.meta
    assert (m.input_dim, m.n_pos, m.n_neg) == (D, 30, 70)
    assert m.n_random_neg == len(task["pool"]) - len(task["lab"])  # pool < 500k: all of it
    assert m.train_seconds > 0 and math.isfinite(m.final_loss)
    assert m.config["lr"] == 1e-4 and m.warnings == []


@pytest.mark.parametrize(
    ("n_pos", "n_neg", "steps"),
    [
        (30, 70, 30),  # few labels: the 30-step floor
        (1000, 10, 32),  # ceil(1000 / 32): every positive once per epoch
        (10, 1000, 63),  # ceil(1000 / 16): every labeled negative once per epoch
    ],
)
def test_epoch_length_covers_every_label_with_a_floor(n_pos, n_neg, steps):
    rng = np.random.default_rng(0)
    X = _unit(rng.standard_normal((n_pos + n_neg, 8)))
    y = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    pool = _unit(rng.standard_normal((500, 8)))
    cfg = TrainConfig(epochs=1)
    clf = train_classifier(X, y, pool, round_index=0, config=cfg)
    assert clf.meta.steps_per_epoch == steps
    assert clf.meta.n_random_seen == min(500, steps * 16)


@pytest.mark.parametrize(
    ("batch", "fracs", "expected"),
    [
        (64, (0.5, 0.25, 0.25), (32, 16, 16)),
        (32, (0.5, 0.25, 0.25), (16, 8, 8)),
        (64, (0.5, 0.0, 0.5), (32, 0, 32)),
        (10, (0.5, 0.25, 0.25), (5, 3, 2)),
        (3, (0.5, 0.25, 0.25), (1, 1, 1)),
    ],
)
def test_batch_composition(batch, fracs, expected):
    assert _batch_counts(batch, fracs) == expected


@pytest.mark.parametrize("as_mask", [True, False])
def test_random_negatives_never_include_labeled_rows(as_mask):
    n = 1000
    excl = np.arange(0, n, 3)
    arg = np.isin(np.arange(n), excl) if as_mask else excl
    rng = np.random.default_rng(0)
    got = sample_random_negatives(rng, n, 10_000, arg)
    assert len(got) == n - len(excl) and len(np.unique(got)) == len(got)
    assert not np.isin(got, excl).any()
    small = sample_random_negatives(np.random.default_rng(0), n, 50, arg)
    assert len(small) == 50 and not np.isin(small, excl).any()


def test_exclusion_as_mask_or_indices_trains_the_same_model(task):
    mask = np.zeros(len(task["pool"]), bool)
    mask[task["lab"]] = True
    a = train_classifier(task["X"], task["y"], task["pool"], round_index=0, exclude_from_pool=mask, config=FAST)
    b = train_classifier(
        task["X"], task["y"], task["pool"], round_index=0, exclude_from_pool=task["lab"], config=FAST
    )
    assert np.array_equal(a.predict_proba(task["test"]), b.predict_proba(task["test"]))


def test_save_and_load_round_trip(task, tmp_path):
    clf = train_classifier(task["X"], task["y"], task["pool"], round_index=1, config=FAST)
    clf.save(tmp_path / "m")
    state = torch.random.get_rng_state()
    back = TrainedClassifier.load(tmp_path / "m")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert back.meta == clf.meta
    assert np.array_equal(back.predict_proba(task["test"]), clf.predict_proba(task["test"]))


def test_predict_proba_streams_chunks_and_accepts_float16(task):
    clf = train_classifier(task["X"], task["y"], task["pool"], round_index=1, config=FAST)
    X16 = task["test"][:1000].astype(np.float16)
    whole = clf.predict_proba(X16)
    assert whole.dtype == np.float32 and whole.shape == (1000,)
    assert ((whole >= 0) & (whole <= 1)).all()
    np.testing.assert_allclose(clf.predict_proba(X16, batch=37), whole, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(clf.predict_proba(X16.astype(np.float32)), whole)
    with pytest.raises(ValueError, match="shape"):
        clf.predict_proba(task["test"][:, :5])


def test_inputs_are_l2_normalised_inside_the_model(task):
    clf = train_classifier(task["X"], task["y"], task["pool"], round_index=1)
    X = task["test"][:500]
    np.testing.assert_allclose(clf.predict_proba(7.5 * X), clf.predict_proba(X), atol=1e-5)
    # training on rescaled embeddings gives (nearly) the same model
    scaled = train_classifier(9 * task["X"], task["y"], 9 * task["pool"], round_index=1)
    np.testing.assert_allclose(scaled.predict_proba(X), clf.predict_proba(X), atol=1e-4)


def test_standardization_is_folded_exactly_into_the_first_layer():
    torch.manual_seed(0)
    module = build_mlp(6, (5,), 0.5).eval()
    rng = np.random.default_rng(0)
    mean, inv_std = rng.standard_normal(6), rng.random(6) + 0.5
    x = rng.standard_normal((20, 6))
    with torch.no_grad():
        before = module(torch.from_numpy(((x - mean) * inv_std).astype(np.float32)))
        _fold_standardization(module, mean, inv_std)
        after = module(torch.from_numpy(x.astype(np.float32)))
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_optional_standardization_still_learns(task):
    clf = train_classifier(
        task["X"], task["y"], task["pool"], round_index=0, config=TrainConfig(standardize=True)
    )
    ap = average_precision_score(task["y_test"], clf.predict_proba(task["test"]))
    assert ap > 10 * task["y_test"].mean()


@pytest.mark.parametrize(("round_index", "label_rounds", "expected"), [
    (0, [0, 0], 0),            # the first round
    (1, [0, 0, 0], 0),         # a follow-up on the first batch's labels: still the first model
    (1, [0, 0, 1], 1),         # a label from an active-learning batch: the later model
    (2, [0, None, 1], 2),      # labels from outside any batch (CLI import) don't change that
    (1, [0, 0, None], 0),      # ... nor make a follow-up on the first batch (+ an exemplar) later
    (3, [None, None], 3),
])
def test_first_model_is_the_one_trained_on_the_first_batch(round_index, label_rounds, expected):  # type: ignore[no-untyped-def]
    from agile_pipeline.lib.loop import architecture_round

    assert architecture_round(round_index, label_rounds) == expected
