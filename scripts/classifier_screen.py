"""Screen classifiers on fixed label sets (issue 19): which trainer makes the most of the same labels?

A plain `agile simulate` run (the paper's MLP, margin AL) is replayed and the labelled train rows
of every concept and round recorded; every candidate below is then trained on exactly those
rows and scored on the whole test split (AUC-PR). There is no active-learning feedback here (the
labels are those the paper's MLP asked for), so this is a fast first screen; the winners are then
compared in full `agile simulate` runs, where each model picks its own batches.

    AGILE_HOME=/tmp/unseen-home python scripts/classifier_screen.py --dataset /tmp/unseen --seeds 0
    python scripts/classifier_screen.py --dataset .agile/demo_corpus --candidates mlp,linear,ensemble,knn

Candidates: ``mlp`` (the paper's; ``mlp@0.001``: with another learning rate, as for ``ensemble``
and ``cv``), ``linear`` /
``linear-l2=X`` (ridge logistic regression), ``ensemble``, ``cv`` (the product's choice), and any of
them with ``+knn`` (kNN smoothing over the train split with neighbours' labels, α = 0.3, k = 10).
A prefix ``center:`` subtracts the train split's mean unit vector first, ``whiteS:`` also
whitens with shrinkage S (``white0.1:linear``).
"""

import argparse
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from agile_pipeline.lib.metrics import compute_metrics
from agile_pipeline.lib.model_choice import (
    ModelChoiceConfig,
    fit_ridge_logistic,
    train_round_model,
)
from agile_pipeline.lib.training import TrainConfig, l2_rows, train_classifier
from agile_pipeline.research import simulate


def _record_label_sets(data: Any, names: list[str], seed: int) -> dict[tuple[str, int], np.ndarray]:
    """(concept, round) -> labelled train rows of a plain run."""
    seen: dict[tuple[str, int], np.ndarray] = {}
    original = simulate._fit_round
    counter: dict[str, int] = defaultdict(int)

    def spy(X_train, idx, y, arch_round, cfg, concept, text, neg_text):  # type: ignore[no-untyped-def]
        seen[(concept, counter[concept])] = np.array(idx)
        counter[concept] += 1
        return original(X_train, idx, y, arch_round, cfg, concept, text, neg_text)

    simulate._fit_round = spy  # type: ignore[assignment]
    try:
        for c in names:
            simulate.run_concept(data, c, simulate.SimConfig(seed=seed))
    finally:
        simulate._fit_round = original  # type: ignore[assignment]
    return seen


def _knn_smooth(p_test: np.ndarray, p_train: np.ndarray, nb: np.ndarray, alpha: float) -> np.ndarray:
    return (1 - alpha) * p_test + alpha * p_train[nb].mean(axis=1)


def _whitening(X_tr: np.ndarray, shrink: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean and ``(C + s·tr(C)/d·I)^(-1/2)`` of the train split's unit rows (``shrink`` = 0:
    centring only)."""
    U = l2_rows(X_tr).astype(np.float64)
    mu = U.mean(axis=0)
    if shrink <= 0:
        return mu.astype(np.float32), np.eye(U.shape[1], dtype=np.float32)
    C = np.cov(U - mu, rowvar=False)
    evals, evecs = np.linalg.eigh(C + shrink * np.trace(C) / C.shape[0] * np.eye(C.shape[0]))
    T = evecs @ np.diag(evals ** -0.5) @ evecs.T
    return mu.astype(np.float32), (T / np.sqrt(np.mean(np.diag(T)))).astype(np.float32)


def _score(name: str, X_tr: np.ndarray, X_te: np.ndarray, idx: np.ndarray, y: np.ndarray,
           arch: int, seed: int, nb_te: np.ndarray) -> np.ndarray:
    if name.startswith(("center:", "white")):  # e.g. "center:linear", "white0.1:linear"
        prefix, _, name = name.partition(":")
        mu, T = _whitening(X_tr, 0.0 if prefix == "center" else float(prefix[5:] or 0.1))
        X_tr, X_te = (l2_rows(X_tr) - mu) @ T, (l2_rows(X_te) - mu) @ T
    base, _, knn = name.partition("+")
    base, _, lr = base.partition("@")
    tc = TrainConfig(seed=seed, lr=float(lr) if lr else TrainConfig.lr)
    kw: dict[str, Any] = {}
    if base.startswith("linear-l2="):
        kw["l2"] = float(base.split("=", 1)[1])
        base = "linear"
    if base == "mlp":
        m = train_classifier(X_tr[idx], y, X_tr, round_index=arch, exclude_from_pool=idx,
                             config=tc)
        predict = m.predict_proba
    elif base == "linear":
        rng = np.random.default_rng(seed)
        rest = np.setdiff1d(np.arange(len(X_tr)), idx)
        rand = rng.choice(rest, size=min(3000, rest.size), replace=False)
        w, b = fit_ridge_logistic(l2_rows(X_tr[idx]), y, l2_rows(X_tr[rand]), l2=kw.get("l2", 0.3))
        def predict(X: np.ndarray) -> np.ndarray:
            return 1 / (1 + np.exp(-(l2_rows(X) @ w + b)))
    elif base in ("ensemble", "cv"):
        choice = ModelChoiceConfig(candidates=("ensemble",) if base == "ensemble" else
                                   ("mlp", "linear", "ensemble"), seed=seed)
        m = train_round_model(X_tr[idx], y, X_tr, round_index=arch, config=tc,
                              choice=choice, exclude_from_pool=idx)
        predict = m.predict_proba
    else:
        raise SystemExit(f"unknown candidate {name!r}")
    p = predict(X_te)
    if knn:
        p_tr = predict(X_tr).astype(np.float64)
        p_tr[idx] = y
        p = _knn_smooth(p, p_tr, nb_te, 0.3)
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--candidates", default="mlp,linear,ensemble,cv,mlp@0.001,ensemble@0.001,cv@0.001")
    ap.add_argument("--min-test-pos", type=int, default=20)
    a = ap.parse_args()

    from agile_pipeline.defs.resources import AgileResources
    from agile_pipeline.runner import prepare_simulation

    agile = AgileResources()
    data = prepare_simulation(a.dataset, min_test_pos=a.min_test_pos, agile=agile)
    simulate.attach_negative_phrases(data, Path(a.dataset), agile.encoder.load())
    names = sorted(data.positives)
    X_tr, X_te = data.X_train.astype(np.float32), data.X_test.astype(np.float32)
    sims = l2_rows(X_te) @ l2_rows(X_tr).T
    nb_te = np.argpartition(-sims, 10, axis=1)[:, :10]
    cands = [c.strip() for c in a.candidates.split(",") if c.strip()]
    table: dict[str, dict[int, list[float]]] = {c: defaultdict(list) for c in cands}
    for seed in [int(s) for s in a.seeds.split(",")]:
        sets = _record_label_sets(data, names, seed)
        for (concept, r), idx in sorted(sets.items()):
            pos = data.positives[concept]
            y_tr = np.array([i in pos for i in data.train_ids], np.int64)
            y_te = np.array([i in pos for i in data.test_ids], np.int64)
            arch = 0 if r == 0 else 1
            for c in cands:
                p = _score(c, X_tr, X_te, idx, y_tr[idx], arch, seed, nb_te)
                table[c][len(idx) // 100 * 100].append(float(compute_metrics(y_te, p).auc_pr))
        print(f"seed {seed}: {len(sets)} label sets", flush=True)  # noqa: T201
    budgets = sorted({b for c in cands for b in table[c]})
    print("| candidate | " + " | ".join(f"{b}" for b in budgets) + " |")  # noqa: T201
    print("|---|" + "---|" * len(budgets))  # noqa: T201
    base = table[cands[0]]
    for c in cands:
        cells = []
        for b in budgets:
            v = table[c][b]
            d = np.array(v) - np.array(base[b]) if len(v) == len(base[b]) else np.array([math.nan])
            cells.append(f"{np.mean(v):.3f} ({np.mean(d):+.3f}±{np.std(d) / math.sqrt(max(len(d), 1)):.3f})")
        print(f"| {c} | " + " | ".join(cells) + " |")  # noqa: T201


if __name__ == "__main__":
    main()
