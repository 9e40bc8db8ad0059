"""Screen the rule that chooses between the kernel machine and the MLP (issue 19), on fixed label sets.

Replays the label sets that ``scripts/classifier_screen.py --label-sets DIR`` recorded from a
plain run (the paper's MLP, margin AL); on each it trains the paper's MLP (the baseline), the MLP
at lr 1e-3 and the kernel machine (τ = 0.7), computes the near-duplicate agreement of the labels
(:func:`agile_pipeline.lib.model_choice.near_duplicate_agreement`) and reports, per label count,
the mean AUC-PR difference to the paper's MLP of "the kernel if agreement ≥ T (or undefined),
else the MLP" for every threshold T, with the share of rounds that chose the kernel. With
``--cv`` it also reports how often 4-fold cross-validation of the two picks the kernel.

    python scripts/classifier_screen.py --dataset .agile/demo_corpus --label-sets /tmp/ls/demo --candidates mlp
    python scripts/choice_rule_screen.py --dataset .agile/demo_corpus --label-sets /tmp/ls/demo/seed0.npz
"""

import argparse
from dataclasses import replace
from typing import Any

import numpy as np

from agile_pipeline.lib.metrics import compute_metrics
from agile_pipeline.lib.model_choice import (
    ModelChoiceConfig,
    cross_validate,
    fit_kernel_logistic,
    near_duplicate_agreement,
)
from agile_pipeline.lib.training import (
    TrainConfig,
    l2_rows,
    sample_random_negatives,
    train_classifier,
)


def _auc_pr(y: np.ndarray, p: np.ndarray) -> float:
    return float(compute_metrics(y, p).auc_pr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--label-sets", required=True, help="a seedN.npz written by classifier_screen.py")
    ap.add_argument("--thresholds", default="0.6,0.7,0.75,0.8")
    ap.add_argument("--cv", action="store_true", help="also: how often 4-fold CV of the two picks the kernel")
    ap.add_argument("--min-test-pos", type=int, default=20)
    a = ap.parse_args()

    from agile_pipeline.defs.resources import AgileResources
    from agile_pipeline.runner import prepare_simulation

    data = prepare_simulation(a.dataset, min_test_pos=a.min_test_pos, agile=AgileResources())
    X_tr, X_te = l2_rows(data.X_train.astype(np.float32)), l2_rows(data.X_test.astype(np.float32))
    z = np.load(a.label_sets)
    sets = {(k.rsplit("@", 1)[0], int(k.rsplit("@", 1)[1])): z[k] for k in z.files}
    rows: list[dict[str, Any]] = []
    for (concept, r), idx in sorted(sets.items()):
        pos = data.positives[concept]
        y = np.array([i in pos for i in data.train_ids], np.int64)[idx]
        y_te = np.array([i in pos for i in data.test_ids], np.int64)
        arch = 0 if r == 0 else 1
        rand = np.sort(sample_random_negatives(np.random.default_rng(0), len(X_tr), 3000, idx))
        plain = train_classifier(X_tr[idx], y, X_tr, round_index=arch, exclude_from_pool=idx,
                                 config=TrainConfig(seed=0))
        mlp = train_classifier(X_tr[idx], y, X_tr, round_index=arch, exclude_from_pool=idx,
                               config=TrainConfig(seed=0, lr=1e-3))
        km = fit_kernel_logistic(X_tr[idx], y, X_tr[rand], l2=0.3, tau=0.7)
        agreement, _close = near_duplicate_agreement(X_tr[idx], y, tau=0.7)
        row = {"labels": len(idx) // 100 * 100, "plain": _auc_pr(y_te, plain.predict_proba(X_te)),
               "mlp": _auc_pr(y_te, mlp.predict_proba(X_te)),
               "kernel": _auc_pr(y_te, 1 / (1 + np.exp(-km.logits(X_te)))), "agreement": agreement}
        if a.cv and min(int(y.sum()), int(len(y) - y.sum())) >= 6:
            choice = ModelChoiceConfig(candidates=("mlp", "kernel"), workers=1)
            scores = cross_validate(X_tr[idx], y, X_tr[rand], round_index=arch,
                                    train=replace(TrainConfig(seed=0), lr=1e-3), choice=choice)
            row["cv_picks_kernel"] = float(scores["kernel"] > scores["mlp"])
        rows.append(row)
    budgets = sorted({r["labels"] for r in rows})

    def line(name: str, pick: Any) -> None:
        cells = []
        for b in budgets:
            rs = [r for r in rows if r["labels"] == b]
            d = [(r["kernel"] if pick(r) else r["mlp"]) - r["plain"] for r in rs]
            share = np.mean([bool(pick(r)) for r in rs])
            cells.append(f"{np.mean(d):+.3f} ({share:.0%} kernel)")
        print(f"| {name} | " + " | ".join(cells) + " |")  # noqa: T201

    print("| rule (− the paper's MLP) | " + " | ".join(str(b) for b in budgets) + " |")  # noqa: T201
    print("|---|" + "---|" * len(budgets))  # noqa: T201
    line("MLP lr 1e-3", lambda r: False)
    line("kernel machine", lambda r: True)
    for t in (float(x) for x in a.thresholds.split(",")):
        line(f"kernel if agreement ≥ {t}", lambda r, t=t: r["agreement"] is None or r["agreement"] >= t)
    line("the better of the two on test", lambda r: r["kernel"] > r["mlp"])
    if a.cv:
        picks = {b: [r["cv_picks_kernel"] for r in rows if r["labels"] == b and "cv_picks_kernel" in r]
                 for b in budgets}
        print("CV picks the kernel: " + ", ".join(  # noqa: T201
            f"{b}: {np.mean(v):.0%}" for b, v in picks.items() if v))


if __name__ == "__main__":
    main()
