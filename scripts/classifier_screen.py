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
``linear-l2=X`` (ridge logistic regression), ``kernelT`` (the product's ``kernel`` family:
ridge logistic regression on the vector plus one feature per rated image, ``relu(cos - T) / (1 -
T)``, T default 0.7; ``kernelqQ``: T the Q quantile of random-to-rated cosines), ``A&B`` (the mean logit of candidates A and B; ``A~B``: each logit divided by its s.d. over random train rows first), ``ensemble``, ``cv`` (the product's choice), and any of
them with a smoothing of the test scores over the unlabelled corpus (``A`` the weight of the
neighbours, default 0.3; ``K`` how many, default 10):

* ``+knnAkK`` — mixed with the mean score of the test image's K nearest train images (rated
  ones counted by their rating), e.g. ``linear+knn`` or ``linear+knn0.5k20``;
* ``+lpAkK`` — label propagation: ten steps of ``f = (1-A)·p + A·mean f(K neighbours)`` over the
  kNN graph of train ∪ test, rated train images clamped to their ratings;
* ``+ilpAkK`` — inductive label propagation (what the product could serve for any image): the
  ten steps above over the train images' own kNN graph only, then each test image mixed with
  its K nearest train images' propagated scores as in ``+knn``;
* ``+lknnAkK`` — mixed with the mean rating of the K most similar rated images only (what a
  model file could carry).
A suffix ``>plAkKnNtT`` distils label propagation into a model file (what the product could
ship): the candidate is trained, its train-split scores propagated over the train images' own
kNN graph (``A``, ``K`` as above; rated rows clamped), and the candidate trained again with the
up-to-``N`` unrated train images whose propagated score is at least ``T`` (defaults 0.5, 10, 50,
0.5) added as positives, e.g. ``kernel0.7>pl0.5k10n50``.
A prefix ``center:`` subtracts the train split's mean unit vector first, ``whiteS:`` also
whitens with shrinkage S (``white0.1:linear``).
"""

import argparse
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agile_pipeline.lib.metrics import compute_metrics
from agile_pipeline.lib.model_choice import (
    ModelChoiceConfig,
    fit_kernel_logistic,
    fit_ridge_logistic,
    train_round_model,
)
from agile_pipeline.lib.propagation import knn_graph, propagate, pseudo_positives
from agile_pipeline.lib.training import TrainConfig, l2_rows, train_classifier
from agile_pipeline.research import simulate


def _record_label_sets(data: Any, names: list[str], seed: int) -> dict[tuple[str, int], np.ndarray]:
    """(concept, round) -> labelled train rows of a plain run."""
    seen: dict[tuple[str, int], np.ndarray] = {}
    original = simulate._fit_round
    counter: dict[str, int] = defaultdict(int)

    def spy(X_train, idx, y, arch_round, cfg, concept, text, neg_text, X_test=None):  # type: ignore[no-untyped-def]
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


_SMOOTH = re.compile(r"(?P<kind>knn|ilp|lp|lknn)(?P<a>[0-9.]+)?(?:k(?P<k>[0-9]+))?$")


@dataclass
class Graph:
    """Nearest neighbours (most similar first) of every test image among the train images, and of
    every image of train ∪ test (rows: train then test) among all of them."""

    te_tr: np.ndarray
    all_all: np.ndarray


def _build_graph(X_tr: np.ndarray, X_te: np.ndarray, k: int = 30) -> Graph:
    te_tr = np.argsort(-(l2_rows(X_te) @ l2_rows(X_tr).T), axis=1)[:, :k]
    return Graph(te_tr=te_tr, all_all=knn_graph(np.concatenate([X_tr, X_te]), k))


def _smooth(spec: str, p_te: np.ndarray, predict: Any, X_tr: np.ndarray, X_te: np.ndarray,
            idx: np.ndarray, y: np.ndarray, g: Graph) -> np.ndarray:
    m = _SMOOTH.match(spec)
    if not m:
        raise SystemExit(f"unknown smoothing {spec!r}")
    kind, a, k = m["kind"], float(m["a"] or 0.3), int(m["k"] or 10)
    if kind == "knn":  # test scores mixed with their train neighbours' (rated ones: their rating)
        p_tr = predict(X_tr).astype(np.float64)
        p_tr[idx] = y
        return _knn_smooth(p_te, p_tr, g.te_tr[:, :k], a)
    if kind == "lknn":  # mixed with the ratings of the k most similar rated images
        s = l2_rows(X_te) @ l2_rows(X_tr[idx]).T
        kk = min(k, len(idx))
        nb = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        return (1 - a) * p_te + a * np.asarray(y, np.float64)[nb].mean(axis=1)
    if kind == "ilp":  # propagate over the train split's own graph, then mix as knn does
        f_tr = propagate(predict(X_tr).astype(np.float64), _train_graph(X_tr, k), idx, y, alpha=a)
        return _knn_smooth(p_te, f_tr, g.te_tr[:, :k], a)
    # lp: label propagation over the kNN graph of train ∪ test, rated train images clamped
    p0 = np.concatenate([predict(X_tr), p_te]).astype(np.float64)
    return propagate(p0, g.all_all[:, :k], idx, y, alpha=a)[len(X_tr):]


_PSEUDO = re.compile(r"pl(?P<a>[0-9.]+)?(?:k(?P<k>[0-9]+))?(?:n(?P<n>[0-9]+))?(?:t(?P<t>[0-9.]+))?$")
_TRAIN_GRAPHS: dict[tuple[int, int], np.ndarray] = {}


def _train_graph(X_tr: np.ndarray, k: int) -> np.ndarray:
    """The k nearest train images of every train image (most similar first; train only, so a
    model distilled from it never saw the test split)."""
    if (id(X_tr), k) not in _TRAIN_GRAPHS:
        _TRAIN_GRAPHS[(id(X_tr), k)] = knn_graph(X_tr, k)
    return _TRAIN_GRAPHS[(id(X_tr), k)]


def _pseudo_labels(spec: str, p_tr: np.ndarray, X_tr: np.ndarray, idx: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Unlabelled train rows label propagation makes confidently positive: ``plAkKnNtT`` —
    :func:`~agile_pipeline.lib.propagation.pseudo_positives` over the train images' own K-NN
    graph (A its alpha, up to N rows with a propagated score ≥ T), counted as rated positives."""
    m = _PSEUDO.match(spec)
    if not m:
        raise SystemExit(f"unknown pseudo-labelling {spec!r}")
    a, k = float(m["a"] or 0.5), int(m["k"] or 10)
    n, t = int(m["n"] or 50), float(m["t"] or 0.5)
    return pseudo_positives(p_tr.astype(np.float64), _train_graph(X_tr, k), idx, y, alpha=a, limit=n, threshold=t)


def _random_rows(n: int, idx: np.ndarray, seed: int) -> np.ndarray:
    """Up to 3,000 unlabelled train rows, the random negatives of the linear models."""
    rest = np.setdiff1d(np.arange(n), idx)
    return np.random.default_rng(seed).choice(rest, size=min(3000, rest.size), replace=False)


def _score(name: str, X_tr: np.ndarray, X_te: np.ndarray, idx: np.ndarray, y: np.ndarray,
           arch: int, seed: int, g: Graph) -> np.ndarray:
    if "&" in name or "~" in name:  # "mlp@0.001&kernel0.8": the mean logit of the parts;
        # "mlp@0.001~kernel0.8": the mean of the logits each divided by its s.d. over random train rows
        scaled = "~" in name
        rand = _random_rows(len(X_tr), idx, seed + 1)
        both = np.concatenate([X_te, X_tr[rand]])
        zs = []
        for part in name.split("~" if scaled else "&"):
            q = np.clip(_score(part, X_tr, both, idx, y, arch, seed, g), 1e-7, 1 - 1e-7)
            z = np.log(q) - np.log1p(-q)
            zs.append(z[: len(X_te)] / (z[len(X_te):].std() + 1e-9) if scaled else z[: len(X_te)])
        return 1 / (1 + np.exp(-np.mean(zs, axis=0)))
    if name.startswith(("center:", "white")):  # e.g. "center:linear", "white0.1:linear"
        prefix, _, name = name.partition(":")
        mu, T = _whitening(X_tr, 0.0 if prefix == "center" else float(prefix[5:] or 0.1))
        X_tr, X_te = (l2_rows(X_tr) - mu) @ T, (l2_rows(X_te) - mu) @ T
    if ">" in name:  # "kernel0.7>pl0.5k10n50": the base model, then refit with pseudo-positives
        first, _, spec = name.partition(">")
        p_both = _score(first, X_tr, np.concatenate([X_tr, X_te]), idx, y, arch, seed, g)
        extra = _pseudo_labels(spec, p_both[: len(X_tr)], X_tr, idx, y)
        if not len(extra):  # nothing confident enough: the base model's own test scores
            return p_both[len(X_tr):]
        return _score(first, X_tr, X_te, np.concatenate([idx, extra]),
                      np.concatenate([y, np.ones(len(extra), y.dtype)]), arch, seed, g)
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
        rand = _random_rows(len(X_tr), idx, seed)
        w, b = fit_ridge_logistic(l2_rows(X_tr[idx]), y, l2_rows(X_tr[rand]), l2=kw.get("l2", 0.3))
        def predict(X: np.ndarray) -> np.ndarray:
            return 1 / (1 + np.exp(-(l2_rows(X) @ w + b)))
    elif base.startswith("kernel"):  # the product's kernel family at threshold τ
        rand = _random_rows(len(X_tr), idx, seed)
        spec = base[6:] or "0.7"  # "kernel0.8": τ = 0.8; "kernelq0.99": τ = that quantile
        km = fit_kernel_logistic(l2_rows(X_tr[idx]), y, l2_rows(X_tr[rand]), l2=kw.get("l2", 0.3),
                                 tau=None if spec.startswith("q") else float(spec),
                                 quantile=float(spec[1:]) if spec.startswith("q") else 0.99)

        def predict(X: np.ndarray) -> np.ndarray:
            return 1 / (1 + np.exp(-km.logits(l2_rows(X))))
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
        p = _smooth(knn, p, predict, X_tr, X_te, idx, y, g)
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--candidates", default="mlp,linear,ensemble,cv,mlp@0.001,ensemble@0.001,cv@0.001")
    ap.add_argument("--min-test-pos", type=int, default=20)
    ap.add_argument("--label-sets", default="", help="folder to keep each seed's plain-run label sets in "
                    "(recorded once, read back by later screens of the same dataset)")
    a = ap.parse_args()

    from agile_pipeline.defs.resources import AgileResources
    from agile_pipeline.runner import prepare_simulation

    agile = AgileResources()
    data = prepare_simulation(a.dataset, min_test_pos=a.min_test_pos, agile=agile)
    simulate.attach_negative_phrases(data, Path(a.dataset), agile.encoder.load())
    names = sorted(data.positives)
    X_tr, X_te = data.X_train.astype(np.float32), data.X_test.astype(np.float32)
    g = _build_graph(X_tr, X_te)
    cands = [c.strip() for c in a.candidates.split(",") if c.strip()]
    table: dict[str, dict[int, list[float]]] = {c: defaultdict(list) for c in cands}
    for seed in [int(s) for s in a.seeds.split(",")]:
        cached = Path(a.label_sets) / f"seed{seed}.npz" if a.label_sets else None
        if cached and cached.exists():
            z = np.load(cached)
            sets = {(k.rsplit("@", 1)[0], int(k.rsplit("@", 1)[1])): z[k] for k in z.files}
        else:
            sets = _record_label_sets(data, names, seed)
            if cached:
                cached.parent.mkdir(parents=True, exist_ok=True)
                np.savez(cached, **{f"{c}@{r}": v for (c, r), v in sets.items()})
        for (concept, r), idx in sorted(sets.items()):
            pos = data.positives[concept]
            y_tr = np.array([i in pos for i in data.train_ids], np.int64)
            y_te = np.array([i in pos for i in data.test_ids], np.int64)
            arch = 0 if r == 0 else 1
            for c in cands:
                p = _score(c, X_tr, X_te, idx, y_tr[idx], arch, seed, g)
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
