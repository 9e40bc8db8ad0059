"""Pure logic of agile_pipeline.lib.model_choice: ridge LR, the folded ensemble, the CV choice."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from agile_pipeline.lib.model_choice import (
    PAPER,
    ModelChoiceConfig,
    fit_ridge_logistic,
    fold_ensemble,
    recipe_weights,
    train_round_model,
)
from agile_pipeline.lib.training import TrainConfig, TrainedClassifier, l2_rows, train_classifier


def _planted(seed: int = 0, n: int = 3000, d: int = 32, prevalence: float = 0.05):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=d)
    c /= np.linalg.norm(c)
    y = (rng.random(n) < prevalence).astype(np.int64)
    X = rng.normal(size=(n, d)) + 2.5 * y[:, None] * c
    return l2_rows(X.astype(np.float32)), y


def _labels(X: np.ndarray, y: np.ndarray, n_pos: int, n_neg: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.choice(np.flatnonzero(y == 1), n_pos, replace=False),
                          rng.choice(np.flatnonzero(y == 0), n_neg, replace=False)])
    return idx, X[idx], y[idx]


def test_recipe_weights_mass_and_shares() -> None:
    y = np.array([1, 1, 0, 0, 0, 0])
    lab, rand = recipe_weights(y, 10)
    assert lab.sum() + rand.sum() == pytest.approx(len(y))
    assert lab[y == 1].sum() == pytest.approx(0.5 * len(y))
    assert lab[y == 0].sum() == pytest.approx(0.25 * len(y))
    assert rand.sum() == pytest.approx(0.25 * len(y))
    lab, rand = recipe_weights(np.array([1, 1]), 4)  # no labelled negatives: share to the random
    assert lab.sum() == pytest.approx(1.0) and rand.sum() == pytest.approx(1.0)
    lab, rand = recipe_weights(np.array([1, 0]), 0)  # no random negatives: share to the labelled
    assert rand.size == 0 and lab[1] == pytest.approx(1.0)


def test_ridge_logistic_separates_a_planted_concept_and_shrinks_with_l2() -> None:
    X, y = _planted()
    idx, X_lab, y_lab = _labels(X, y, 30, 60)
    rest = np.setdiff1d(np.arange(len(X)), idx)
    w, b = fit_ridge_logistic(X_lab, y_lab, X[rest[:1000]], l2=0.3)
    from sklearn.metrics import average_precision_score

    assert average_precision_score(y, X @ w + b) > 0.5  # prevalence 0.05
    w_big, _ = fit_ridge_logistic(X_lab, y_lab, X[rest[:1000]], l2=30.0)
    assert np.linalg.norm(w_big) < 0.5 * np.linalg.norm(w)


@pytest.mark.parametrize("round_index", [0, 1])
def test_fold_ensemble_is_exactly_the_mean_logit(round_index: int, tmp_path) -> None:
    X, y = _planted(1)
    idx, X_lab, y_lab = _labels(X, y, 20, 40)
    mlp = train_classifier(X_lab, y_lab, X, round_index=round_index, exclude_from_pool=idx,
                           config=TrainConfig(epochs=2))
    w, b = fit_ridge_logistic(X_lab, y_lab, X[:500], l2=0.3)
    ens = fold_ensemble(mlp, w, b)
    probe = X[:400] * 3.0  # not unit: the folded model normalises like the MLP does
    lm = np.log(mlp.predict_proba(probe).astype(np.float64))
    lm -= np.log1p(-mlp.predict_proba(probe).astype(np.float64))
    expect = 0.5 * (lm + l2_rows(probe) @ w.astype(np.float64) + b)
    got = ens.predict_proba(probe).astype(np.float64)
    np.testing.assert_allclose(np.log(got) - np.log1p(-got), expect, atol=2e-3)
    ens.meta.config["family"] = "ensemble"
    ens.save(tmp_path / "m")
    back = TrainedClassifier.load(tmp_path / "m")
    np.testing.assert_allclose(back.predict_proba(probe), ens.predict_proba(probe), atol=1e-6)


@pytest.mark.parametrize("round_index", [0, 1])
def test_fold_mlp_kernel_is_exactly_the_mean_logit(round_index: int, tmp_path) -> None:
    """The mlp+kernel family's one file: the MLP's units plus one per labelled image in the
    first layer, two more per later layer, and exactly the mean of the two logits."""
    from agile_pipeline.lib.model_choice import fit_kernel_logistic, fold_mlp_kernel

    X, y = _planted(4)
    idx, X_lab, y_lab = _labels(X, y, 20, 40)
    mlp = train_classifier(X_lab, y_lab, X, round_index=round_index, exclude_from_pool=idx,
                           config=TrainConfig(epochs=2))
    km = fit_kernel_logistic(X_lab, y_lab, X[:500], l2=0.3, tau=0.2)
    assert np.count_nonzero(km.v) > 0  # the kernel units matter in this check
    folded = fold_mlp_kernel(mlp, km)
    first = mlp.meta.hidden[0] + len(X_lab) + 2
    assert folded.meta.hidden == (first, *(h + 2 for h in mlp.meta.hidden[1:]))
    probe = X[:400] * 3.0
    pm = mlp.predict_proba(probe).astype(np.float64)
    expect = 0.5 * (np.log(pm) - np.log1p(-pm) + km.logits(l2_rows(probe)))
    got = folded.predict_proba(probe).astype(np.float64)
    np.testing.assert_allclose(np.log(got) - np.log1p(-got), expect, atol=2e-3)
    folded.save(tmp_path / "m")
    back = TrainedClassifier.load(tmp_path / "m")
    np.testing.assert_allclose(back.predict_proba(probe), folded.predict_proba(probe), atol=1e-6)


def test_choice_records_scores_and_picks_the_best_family() -> None:
    X, y = _planted(2)
    idx, X_lab, y_lab = _labels(X, y, 40, 80)
    m = train_round_model(X_lab, y_lab, X, round_index=1, exclude_from_pool=idx,
                          choice=ModelChoiceConfig(workers=1))
    mc = m.meta.config["model_choice"]
    assert set(mc["cv_auc_pr"]) == {"mlp", "linear", "ensemble"}
    assert mc["family"] == m.meta.config["family"] == max(mc["cv_auc_pr"], key=mc["cv_auc_pr"].get)
    assert all(0.0 <= v <= 1.0 for v in mc["cv_auc_pr"].values())
    assert m.meta.n_pos == 40
    assert np.isfinite(m.predict_proba(X)).all()
    # deterministic, folds on one thread or three: the same inputs choose and train the same model
    again = train_round_model(X_lab, y_lab, X, round_index=1, exclude_from_pool=idx,
                              choice=ModelChoiceConfig(workers=3))
    assert again.meta.config["model_choice"]["cv_auc_pr"] == mc["cv_auc_pr"]
    np.testing.assert_array_equal(again.predict_proba(X[:50]), m.predict_proba(X[:50]))


def test_kernel_machine_folds_exactly_into_one_mlp_file(tmp_path) -> None:
    """The kernel family's MLP (a hidden unit per labelled image) gives the kernel machine's own
    logit, saves and loads like any model, and wins where a concept is a set of tight clusters
    that no hyperplane separates."""
    from agile_pipeline.lib.model_choice import fit_kernel_logistic

    rng = np.random.default_rng(5)
    centres = l2_rows(rng.normal(size=(40, 8)).astype(np.float32))
    members = np.repeat(np.arange(40), 30)
    X = l2_rows((centres[members] + 0.05 * rng.normal(size=(1200, 8))).astype(np.float32))
    y = (members % 2 == 0).astype(np.int64)  # half the clusters, at random directions
    idx = rng.choice(1200, 300, replace=False)
    m = train_round_model(X[idx], y[idx], X, round_index=1, exclude_from_pool=idx,
                          choice=ModelChoiceConfig(candidates=("kernel",), fallback="kernel", workers=1))
    assert m.meta.config["family"] == "kernel" and m.meta.hidden == (302,)
    km = fit_kernel_logistic(X[idx], y[idx], X[np.sort(rng.choice(np.setdiff1d(np.arange(1200), idx), 500,
                                                                   replace=False))], l2=0.3, tau=0.7)
    from agile_pipeline.lib.model_choice import kernel_classifier

    folded = kernel_classifier(km, m.meta)
    np.testing.assert_allclose(folded.predict_proba(X), 1 / (1 + np.exp(-km.logits(X))), atol=1e-5)
    m.save(tmp_path)
    np.testing.assert_array_equal(TrainedClassifier.load(tmp_path).predict_proba(X), m.predict_proba(X))
    rest = np.setdiff1d(np.arange(1200), idx)
    cv = train_round_model(X[idx], y[idx], X, round_index=1, exclude_from_pool=idx,
                           choice=ModelChoiceConfig(candidates=("linear", "kernel"), workers=1))
    scores = cv.meta.config["model_choice"]["cv_auc_pr"]
    assert scores["kernel"] > scores["linear"] + 0.1 and cv.meta.config["family"] == "kernel"
    from sklearn.metrics import average_precision_score

    assert average_precision_score(y[rest], cv.predict_proba(X[rest])) > 0.95


def test_near_duplicate_agreement_counts_what_the_closest_rated_image_of_a_positive_is() -> None:
    from agile_pipeline.lib.model_choice import near_duplicate_agreement

    rng = np.random.default_rng(0)
    centres = l2_rows(rng.normal(size=(6, 16)).astype(np.float32))
    twin = lambda c: l2_rows((c + 0.01 * rng.normal(size=c.shape)).astype(np.float32))  # noqa: E731
    X = np.concatenate([centres, twin(centres)])
    same = np.array([1, 1, 1, 0, 0, 0] * 2)  # every positive's twin is a positive
    assert near_duplicate_agreement(X, same, tau=0.9) == (1.0, 6)
    swapped = np.array([1, 1, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0])  # two twins rated negative
    agreement, close = near_duplicate_agreement(X, swapped, tau=0.9)
    assert close == 4 and agreement == pytest.approx(2 / 4)  # the third pair agrees, both ways
    assert near_duplicate_agreement(centres, np.array([1, 0, 1, 0, 1, 0]), tau=0.9) == (None, 0)
    assert near_duplicate_agreement(X, np.zeros(12), tau=0.9) == (None, 0)


def test_the_agreement_rule_picks_the_kernel_where_near_duplicates_share_labels() -> None:
    """auto (the default): the kernel machine where a positive's closest rated image is a positive
    (tight clusters of one label), the MLP where it is a negative (lookalike pairs of opposite
    labels), with the evidence in the model's choice record, and no cross-validation."""
    from agile_pipeline.lib.model_choice import choice_for

    rng = np.random.default_rng(6)
    centres = l2_rows(rng.normal(size=(40, 8)).astype(np.float32))
    members = np.repeat(np.arange(40), 6)
    X = l2_rows((centres[members] + 0.03 * rng.normal(size=(240, 8))).astype(np.float32))
    clusters = (members % 2 == 0).astype(np.int64)
    m = train_round_model(X, clusters, X, round_index=1, choice=replace(choice_for("auto"), workers=1))
    mc = m.meta.config["model_choice"]
    assert m.meta.config["family"] == mc["family"] == "kernel" and mc["agreement"] == 1.0
    assert mc["close_positives"] == 120 and mc["cv_auc_pr"] == {} and "agreement 1.00" in mc["reason"]
    lookalikes = (np.arange(240) % 2 == 0).astype(np.int64)  # half of every cluster: a coin flip
    m = train_round_model(X, lookalikes, X, round_index=1, choice=replace(choice_for("auto"), workers=1))
    mc = m.meta.config["model_choice"]
    assert m.meta.config["family"] == "mlp" and mc["agreement"] < 0.75 and m.meta.hidden == (128, 128, 128)
    with pytest.raises(ValueError, match="exactly two"):
        ModelChoiceConfig(candidates=("kernel", "mlp", "linear"), rule="agreement")


def test_few_positives_fall_back_without_cross_validation() -> None:
    X, y = _planted(3)
    idx, X_lab, y_lab = _labels(X, y, 3, 50)
    m = train_round_model(X_lab, y_lab, X, round_index=0, exclude_from_pool=idx,
                          choice=ModelChoiceConfig(fallback="linear"))
    assert m.meta.config["family"] == "linear" and m.meta.hidden == ()
    assert "fewer than 6" in m.meta.config["model_choice"]["reason"]
    assert m.meta.config["model_choice"]["cv_auc_pr"] == {}


def test_paper_config_is_the_plain_mlp() -> None:
    X, y = _planted(4)
    idx, X_lab, y_lab = _labels(X, y, 20, 40)
    m = train_round_model(X_lab, y_lab, X, round_index=1, exclude_from_pool=idx, choice=PAPER)
    plain = train_classifier(X_lab, y_lab, X, round_index=1, exclude_from_pool=idx)
    assert m.meta.config["family"] == "mlp" and m.meta.hidden == (128, 128, 128)
    for a, b in zip(m.module.state_dict().values(), plain.module.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_bad_choice_config_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown model families"):
        ModelChoiceConfig(candidates=("mlp", "forest"))
    with pytest.raises(ValueError, match="folds"):
        ModelChoiceConfig(folds=1)
    with pytest.raises(ValueError, match="kernel_tau"):
        ModelChoiceConfig(kernel_tau=1.0)


def test_settings_map_to_choices() -> None:
    from agile_pipeline.lib.model_choice import choice_for

    assert choice_for("paper") == PAPER and PAPER.mlp_lr is None
    cv = choice_for("cv", seed=3)
    assert cv.candidates == ("mlp", "linear", "ensemble") and cv.seed == 3 and cv.mlp_lr == 1e-3
    assert cv.cross_validates
    assert choice_for("linear").candidates == ("linear",) and choice_for("linear").fallback == "linear"
    assert choice_for("kernel").candidates == ("kernel",)
    auto = choice_for("auto", seed=3)
    assert auto.candidates == ("kernel", "mlp") and auto.rule == "agreement" and not auto.cross_validates
    assert auto.seed == 3 and auto.mlp_lr == 1e-3 and auto.kernel_tau == 0.7
    with pytest.raises(ValueError, match="unknown model family"):
        choice_for("forest")


def test_the_mlp_candidates_train_at_the_choice_learning_rate() -> None:
    X, y = _planted(5)
    idx, X_lab, y_lab = _labels(X, y, 20, 40)
    fast = train_round_model(X_lab, y_lab, X, round_index=1, exclude_from_pool=idx,
                             choice=ModelChoiceConfig(candidates=("mlp",)))
    assert fast.meta.config["lr"] == 1e-3
    same = train_classifier(X_lab, y_lab, X, round_index=1, exclude_from_pool=idx, config=TrainConfig(lr=1e-3))
    np.testing.assert_array_equal(fast.predict_proba(X[:64]), same.predict_proba(X[:64]))
    paper = train_round_model(X_lab, y_lab, X, round_index=1, exclude_from_pool=idx, choice=PAPER)
    assert paper.meta.config["lr"] == 1e-4


def test_a_lookahead_round_reuses_the_last_cross_validated_family() -> None:
    from agile_pipeline.lib.model_choice import reuse_choice

    auto = ModelChoiceConfig()
    cv = {"family": "linear", "folds": 4, "cv_auc_pr": {"mlp": 0.5, "linear": 0.6, "ensemble": 0.55}}
    reused = reuse_choice(auto, cv)
    assert reused.candidates == ("linear",) and not reused.cross_validates
    assert reused.mlp_lr == auto.mlp_lr and reused.ridge_l2 == auto.ridge_l2
    X, y = _planted(4)
    idx, X_lab, y_lab = _labels(X, y, 30, 60)
    m = train_round_model(X_lab, y_lab, X, round_index=1, exclude_from_pool=idx, choice=reused)
    mc = m.meta.config["model_choice"]
    assert mc["family"] == "linear" and mc["cv_auc_pr"] == {} and "last cross-validated" in mc["reason"]
    # nothing to reuse: no earlier CV (a fallback round has folds 0), a fixed family, no record
    assert reuse_choice(auto, {"family": "linear", "folds": 0}) == auto
    assert reuse_choice(auto, None) == auto
    fixed = ModelChoiceConfig(candidates=("mlp",), fallback="mlp")
    assert reuse_choice(fixed, cv) == fixed


def test_refit_with_graph_positives_keeps_the_family_and_the_rated_counts(tmp_path) -> None:
    """A kernel round refitted with graph positives: the same family, the extra rows scored as
    positives, the model file's counts still the ratings', and the original choice's report."""
    from agile_pipeline.lib.model_choice import choice_for, refit_with_positives
    from agile_pipeline.lib.propagation import knn_graph, pseudo_positives

    rng = np.random.default_rng(7)
    centres = l2_rows(rng.normal(size=(30, 8)).astype(np.float32))
    members = np.repeat(np.arange(30), 40)
    X = l2_rows((centres[members] + 0.15 * rng.normal(size=(1200, 8))).astype(np.float32))
    y = (members < 6).astype(np.int64)  # six clusters of 40
    idx = np.concatenate([np.flatnonzero(y == 1)[::40], rng.choice(np.flatnonzero(y == 0), 40, replace=False)])
    m = train_round_model(X[idx], y[idx], X, round_index=0, exclude_from_pool=idx, choice=choice_for("kernel"))
    extra = pseudo_positives(m.predict_proba(X), knn_graph(X, 10), idx, y[idx].astype(np.float64))
    assert 0 < len(extra) <= 50 and y[extra].mean() > 0.9  # the positives' cluster mates
    refit = refit_with_positives(m, X[idx], y[idx], X, extra, round_index=0, exclude_from_pool=idx)
    assert refit.meta.config["family"] == "kernel" and refit.meta.config["graph_positives"] == len(extra)
    assert refit.meta.n_pos == 6 and refit.meta.n_neg == 40
    assert refit.meta.config["model_choice"] == m.meta.config["model_choice"]
    assert refit.predict_proba(X[extra]).mean() > m.predict_proba(X[extra]).mean()
    refit.save(tmp_path)
    assert TrainedClassifier.load(tmp_path).meta.config["graph_positives"] == len(extra)
    assert refit_with_positives(m, X[idx], y[idx], X, np.empty(0, np.int64), round_index=0) is m
