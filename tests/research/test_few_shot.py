"""Pure logic of agile_pipeline.research.few_shot (fast: small synthetic data)."""

from dataclasses import replace

import numpy as np
import pytest

from agile_pipeline.lib.metrics import compute_metrics
from agile_pipeline.research.few_shot import (
    LinearModel,
    PriorLinearConfig,
    blend_logits,
    decayed_prior_weight,
    fit_prior_linear,
    mean_direction,
    phrase_pseudo_labels,
    prior_weights,
)


def _planted(seed: int = 0, n: int = 3000, d: int = 32, prevalence: float = 0.02):
    """Unit vectors; positives lean towards a concept direction c."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=d)
    c /= np.linalg.norm(c)
    y = (rng.random(n) < prevalence).astype(np.int64)
    X = rng.normal(size=(n, d)) + 2.5 * y[:, None] * c
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X.astype(np.float32), y, c


def test_mean_direction_and_prior_weights() -> None:
    assert mean_direction(None) is None
    assert mean_direction(np.empty((0, 3))) is None
    m = mean_direction(np.array([[2.0, 0, 0], [0, 3.0, 0]]))
    assert m is not None and np.allclose(m, [2**-0.5, 2**-0.5, 0])
    X, _, c = _planted()
    w0 = prior_weights(X, c[None], None, strength=2.0, negative_weight=0.5)
    # the prior's logit spread over the pool is `strength`
    assert float(np.std(X @ w0)) == pytest.approx(2.0, rel=1e-6)
    assert not np.any(prior_weights(X, c[None], None, strength=0.0, negative_weight=0.5))
    neg = prior_weights(X, c[None], -c[None], strength=1.0, negative_weight=1.0)
    assert float(neg @ c) > float(w0 @ c) / 2  # a negative phrase opposite c pushes along c


def test_fit_prior_linear_without_labels_is_the_prior() -> None:
    X, y, c = _planted()
    m = fit_prior_linear(np.empty((0, X.shape[1])), np.empty(0), X, text_pos=c[None],
                         config=PriorLinearConfig(random_negatives=0))
    assert np.allclose(m.w / np.linalg.norm(m.w), c, atol=1e-6)
    ap_prior = compute_metrics(y, m.predict_proba(X)).auc_pr
    assert ap_prior > 0.5


def test_fit_prior_linear_learns_from_few_labels_and_is_deterministic() -> None:
    X, y, c = _planted(1)
    rng = np.random.default_rng(0)
    pos = rng.choice(np.flatnonzero(y == 1), 3, replace=False)
    neg = rng.choice(np.flatnonzero(y == 0), 40, replace=False)
    idx = np.concatenate([pos, neg])
    cfg = PriorLinearConfig(prior_strength=0.0, random_negatives=500)
    m = fit_prior_linear(X[idx], y[idx], X, exclude_from_pool=idx, config=cfg)
    rest = np.setdiff1d(np.arange(len(y)), idx)
    assert compute_metrics(y[rest], m.predict_proba(X[rest])).auc_pr > 0.15  # base rate ~0.02
    m2 = fit_prior_linear(X[idx], y[idx], X, exclude_from_pool=idx, config=cfg)
    assert np.array_equal(m.w, m2.w) and m.b == m2.b
    assert (m.n_pos, m.n_neg, m.n_random_neg) == (3, 40, 500)
    # a wrong text prior is overridden when the prior scale is learned ("feature" mode)
    wrong = -c[None]
    fixed = fit_prior_linear(X[idx], y[idx], X, text_pos=wrong, exclude_from_pool=idx,
                             config=PriorLinearConfig(prior_strength=3.0, random_negatives=500))
    learned = fit_prior_linear(X[idx], y[idx], X, text_pos=wrong, exclude_from_pool=idx,
                               config=PriorLinearConfig(prior_strength=3.0, random_negatives=500,
                                                        prior_mode="feature", prior_l2=0.01))
    ap = lambda mm: compute_metrics(y[rest], mm.predict_proba(X[rest])).auc_pr  # noqa: E731
    assert ap(learned) > ap(fixed)
    with pytest.raises(ValueError):
        fit_prior_linear(X[idx], y[idx], X, config=PriorLinearConfig(prior_mode="nope"))
    with pytest.raises(ValueError):
        fit_prior_linear(X[:2], np.array([1, 2]), X)


def test_linear_model_to_classifier_scores_the_same(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from agile_pipeline.lib.training import TrainedClassifier

    rng = np.random.default_rng(3)
    m = LinearModel(w=rng.normal(size=8), b=-0.3, n_pos=2, n_neg=5)
    X = (rng.normal(size=(50, 8)) * 3).astype(np.float32)  # not unit rows: normalised inside
    clf = m.to_classifier(round_index=1)
    assert np.allclose(clf.predict_proba(X), m.predict_proba(X), atol=1e-5)
    clf.save(tmp_path / "m")
    loaded = TrainedClassifier.load(tmp_path / "m")
    assert loaded.meta.hidden == () and loaded.meta.n_pos == 2
    assert np.allclose(loaded.predict_proba(X), m.predict_proba(X), atol=1e-5)


def test_pseudo_labels_and_priors() -> None:
    X, y = phrase_pseudo_labels(np.ones((2, 4)), np.zeros((1, 4)), 4)
    assert X.shape == (3, 4) and y.tolist() == [1, 1, 0]
    X, y = phrase_pseudo_labels(np.ones((1, 4)), None, 4)
    assert y.tolist() == [1]
    X, y = phrase_pseudo_labels(None, None, 4)
    assert X.shape == (0, 4) and y.size == 0
    assert decayed_prior_weight(1.0, 0) == 1.0 and decayed_prior_weight(1.0, 4) == 0.25
    p = np.array([0.2, 0.5, 0.9])
    assert np.allclose(blend_logits(p, np.full(3, 0.5), 1.0), p, atol=1e-6)  # neutral prior
    assert np.all(blend_logits(p, np.full(3, 0.9), 1.0) > p)


def _sim_data():  # type: ignore[no-untyped-def]
    from agile_pipeline.lib.labeled_dataset import SimData

    X, y, c = _planted(5, n=1200, d=16, prevalence=0.03)
    ids = [f"i{k:04d}" for k in range(len(y))]
    tr, te = ids[:600], ids[600:]
    rng = np.random.default_rng(1)
    neg = rng.normal(size=(1, 16)).astype(np.float32)
    return SimData("synthetic", tr, te, X[:600], X[600:],
                   {"planted": {i for i, v in zip(ids, y, strict=True) if v}},
                   {"planted": ["planted"]}, {"planted": (c[None] + 0.5 * neg).astype(np.float32)},
                   {"planted": ["other"]}, {"planted": neg})


@pytest.mark.parametrize("variant", ["plain", "linear", "prior-linear", "hybrid", "mlp-pseudo",
                                     "prior-decay"])
def test_simulated_concept_with_each_variant(variant: str) -> None:
    from agile_pipeline.research.simulate import SimConfig, format_table, run_concept, summarize

    data = _sim_data()
    cfg = SimConfig(rounds=1, batch=20, per_phrase=30, expansion=30, eval_per_stratum=5,
                    few_shot=variant)
    res = run_concept(data, "planted", cfg)
    assert res["model_trained"] and res["first_positive_round"] is not None
    kinds = {e.get("model_kind") for e in res["rounds"] if "model_kind" in e}
    assert kinds <= {"mlp", "linear"}
    if variant in ("linear", "prior-linear", "hybrid"):  # few positives: the linear model
        assert res["rounds"][0]["model_kind"] == "linear"
    assert all(0 <= e["auc_pr"] <= 1 for e in res["rounds"])
    text = format_table(summarize([res]))
    assert "concepts left without a model: 0" in text and "first positive found" in text


def test_unknown_variant_is_refused() -> None:
    from agile_pipeline.research.simulate import SimConfig, run_concept

    with pytest.raises(ValueError, match="few_shot"):
        run_concept(_sim_data(), "planted", SimConfig(few_shot="magic"))


def test_a_stuck_user_gives_an_exemplar_and_gets_a_model() -> None:
    """A text-unfriendly concept (its phrase points away from it): the plain recipe finds no
    positive and trains nothing; with the app's recovery path (one exemplar after a batch with
    no positive) a model is trained from round 0 and finds more positives."""
    from agile_pipeline.research.simulate import SimConfig, run_concept

    data = _sim_data()
    data.text_vectors["planted"] = -data.text_vectors["planted"]  # the words mislead
    data.negative_vectors.pop("planted")
    data.negative_phrases.pop("planted")
    base = dict(rounds=2, batch=20, per_phrase=30, expansion=30, eval_per_stratum=5)
    plain = run_concept(data, "planted", SimConfig(**base))
    helped = run_concept(data, "planted", SimConfig(**base, exemplar_when_stuck=True))
    assert plain["rounds"][0]["n_pos"] == 0 and plain["exemplar"] is None
    assert helped["exemplar"] in data.positives["planted"]
    assert helped["first_positive_round"] == 0 and helped["rounds"][0].get("model_kind") == "mlp"
    assert helped["rounds"][0]["n_labels"] == plain["rounds"][0]["n_labels"] + 1
    assert helped["rounds"][-1]["n_pos"] > 1  # the model found positives beyond the exemplar
    again = run_concept(data, "planted", SimConfig(**base, exemplar_when_stuck=True))
    assert again["exemplar"] == helped["exemplar"]  # seeded


def test_simulated_lookahead_selects_with_the_early_model_and_measures_the_full_one() -> None:
    from agile_pipeline.research.simulate import SimConfig, run_concept

    data = _sim_data()
    base = SimConfig(rounds=2, batch=20, per_phrase=30, expansion=30, eval_per_stratum=5)
    plain = run_concept(data, "planted", base)
    look = run_concept(data, "planted", replace(base, lookahead=5))
    # the models measured are trained on the same number of labels ...
    assert [e["n_labels"] for e in look["rounds"]] == [e["n_labels"] for e in plain["rounds"]]
    # ... but each next batch was chosen by a model that had 5 fewer (when it had a positive)
    for e in look["rounds"][:-1]:
        assert e["lookahead_labels"] in (e["n_labels"] - 5, e["n_labels"])
    assert any(e["lookahead_labels"] == e["n_labels"] - 5 for e in look["rounds"][:-1])
    assert all("lookahead_labels" not in e for e in plain["rounds"])
    # the paper's protocol is unchanged by the option's existence (seeded: same models)
    again = run_concept(data, "planted", base)
    assert [e["auc_pr"] for e in again["rounds"]] == [e["auc_pr"] for e in plain["rounds"]]


def test_simulated_pool_scores_the_previous_selectors_sweep() -> None:
    """With the SEALS pool, each selection after the first also scores the previous model's most
    uncertain images of the whole split (the product's sweep); ``pool_sweep=0`` scores none."""
    from agile_pipeline.research.simulate import SimConfig, run_concept

    data = _sim_data()
    base = SimConfig(rounds=3, batch=20, per_phrase=30, expansion=30, eval_per_stratum=5,
                     pool_k=5, pool_random=10, pool_sweep=30)
    res = run_concept(data, "planted", base)
    pooled = [e for e in res["rounds"] if "pool_size" in e]
    assert len(pooled) >= 2 and pooled[0]["sweep_scored"] == 0  # none before the first selection
    assert all(0 < e["sweep_scored"] <= 30 for e in pooled[1:])
    assert all(e["scored"] <= e["pool_size"] + e["sweep_scored"] + e["random_scored"] for e in pooled)
    off = run_concept(data, "planted", replace(base, pool_sweep=0))
    assert all(e["sweep_scored"] == 0 for e in off["rounds"] if "pool_size" in e)


def test_label_propagation_clamps_the_ratings_and_lifts_the_planted_concept() -> None:
    from agile_pipeline.research.simulate import SimConfig, run_concept

    data = _sim_data()
    base = SimConfig(rounds=2, batch=20, per_phrase=30, expansion=30, eval_per_stratum=5, few_shot="auto")
    plain = run_concept(data, "planted", base)
    lp = run_concept(data, "planted", replace(base, few_shot_args={"lp_alpha": 0.5, "lp_k": 10}))
    assert lp["model_trained"]
    # the same first model, its test scores mixed with their neighbours': a different ranking
    assert [e["auc_pr"] for e in lp["rounds"]] != [e["auc_pr"] for e in plain["rounds"]]
    assert all(0 <= e["auc_pr"] <= 1 for e in lp["rounds"])


def test_label_propagation_scores_graph_nodes_with_ratings_clamped() -> None:
    from agile_pipeline.research.simulate import _LabelPropagation, corpus_graph

    data = _sim_data()
    X_all = np.concatenate([data.X_train, data.X_test])
    rated = np.array([0, 1, 2])

    class Constant:  # a model that scores every image 0.5
        def predict_proba(self, X: np.ndarray) -> np.ndarray:
            return np.full(len(X), 0.5)

    lp = _LabelPropagation(X_all, corpus_graph(data.X_train, data.X_test, 10), rated,
                           np.array([1.0, 0.0, 1.0]), alpha=0.5)
    f = lp.scores(Constant())
    np.testing.assert_array_equal(f[rated], [1.0, 0.0, 1.0])
    nb = corpus_graph(data.X_train, data.X_test, 10)
    near_pos = np.flatnonzero((nb == 0).any(axis=1) & ~np.isin(np.arange(len(f)), rated))
    assert near_pos.size and (f[near_pos] > 0.5).any()  # a rated positive lifts its neighbours
    assert lp.scores(Constant()) is f  # propagated once per model


def test_graph_positives_refit_the_kernel_rounds_only() -> None:
    """``pl_n``: a kernel round is refitted with its graph positives (the product's rule); an MLP
    round is not touched."""
    from agile_pipeline.research.simulate import SimConfig, run_concept

    data = _sim_data()
    base = SimConfig(rounds=2, batch=20, per_phrase=30, expansion=30, eval_per_stratum=5, few_shot="cv",
                     few_shot_args={"candidates": "kernel"})
    plain = run_concept(data, "planted", base)
    gp = run_concept(data, "planted", replace(base, few_shot_args={"candidates": "kernel", "pl_n": 20,
                                                                  "pl_family": "kernel", "pl_t": 0.0}))
    assert all(e.get("graph_positives", 0) == 0 for e in plain["rounds"])
    trained = [e for e in gp["rounds"] if "model_kind" in e]
    assert trained and all(e["model_kind"] == "kernel" and e["graph_positives"] == 20 for e in trained)
    # the refit is a different model: the first model's test scores rank differently
    assert trained[0]["auc_pr"] != next(e for e in plain["rounds"] if "model_kind" in e)["auc_pr"]
    mlp = run_concept(data, "planted", replace(base, few_shot_args={"candidates": "mlp", "pl_n": 20,
                                                                   "pl_family": "kernel", "pl_t": 0.0}))
    assert all(e.get("graph_positives", 0) == 0 for e in mlp["rounds"])
