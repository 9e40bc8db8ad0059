"""Evaluation of a concept's models against zero-shot, on the user's own eval labels.

The eval set is built on the *test* split only, by stratified sampling without weights
(paper 4.2, appendix E) over every model of the concept and the zero-shot baseline. Eval
labels are stored with ``purpose='eval'`` and never train a model.

With split caches (:mod:`.split_cache`), the eval set comes from every model's scores over the
whole test split computed once per table version (:func:`eval_set_for`), and an evaluation
scores only the rated rows (:func:`rated_test_scores`); without them, the same numbers come
from ``VectorStore.matrix``.
"""

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agile_pipeline import settings
from agile_pipeline.lib.evalset import (
    SplitScores,
    model_split_scores,
    save_split_scores,
    stratified_eval_set,
    stratified_eval_set_cached,
    zero_shot_calibration,
    zero_shot_to_unit,
    zero_shot_unit_split,
)
from agile_pipeline.lib.loop import CandidateBatch, LoopEnv, LoopError
from agile_pipeline.lib.metrics import bootstrap_auc_pr, compute_metrics
from agile_pipeline.lib.scan import exact_scores
from agile_pipeline.lib.split_cache import SplitCache, has_cache, split_cache
from agile_pipeline.lib.state import LabelRule

log = logging.getLogger(__name__)

ZERO_SHOT = "zero-shot"


def zero_shot_unit_scores(env: LoopEnv, concept: str, ids: np.ndarray) -> np.ndarray:
    """Zero-shot scores of ``ids`` mapped into [0, 1].

    The cosine is mapped with a logistic whose centre and width come from the concept's
    cosines on the *train* split (:func:`zero_shot_calibration`: the top 0.1% of train images
    score above 0.5, the top 1% above 0.1). It never looks at the test images it scores, so
    the strata of one test image do not depend on which others exist.
    """
    from agile_pipeline.lib.loop import load_zero_shot

    z = load_zero_shot(env, concept)
    if z is None:
        raise LoopError(
            f"no zero-shot scores for {concept!r} yet: run the concept's start job "
            f"(`agile concept expand {concept!r}`) first"
        )
    all_ids, cos = z
    splits = env.store.all_image_splits()
    train_cos = np.array([c for i, c in zip(all_ids, cos, strict=True) if splits.get(str(i)) == "train"])
    center, temp = zero_shot_calibration(train_cos if train_cos.size >= 2 else cos)
    index = {str(i): k for k, i in enumerate(all_ids)}
    sel = np.array([cos[index[str(i)]] for i in ids], dtype=np.float32)
    return zero_shot_to_unit(sel, center=center, temperature=temp)


def model_test_scores(env: LoopEnv, concept: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Test-split ids and the [0,1] score of every model of the concept (zero-shot included)."""
    from agile_pipeline.lib.training import TrainedClassifier

    test = env.vectors.matrix(env.model_id, "test")
    scores: dict[str, np.ndarray] = {ZERO_SHOT: zero_shot_unit_scores(env, concept, test.ids)}
    for r in env.store.rounds(concept):
        model = TrainedClassifier.load(Path(r["model_uri"]))
        scores[f"round-{r['round']}"] = model.predict_proba(test.vectors)
    return test.ids, scores


def build_eval_set(
    env: LoopEnv,
    concept: str,
    *,
    per_stratum: int = settings.EVAL_PER_STRATUM,
    n_strata: int = settings.EVAL_STRATA,
    run_id: str | None = None,
) -> CandidateBatch:
    """Stratified SipHash eval set over all models; queued as a batch of kind ``eval``."""
    import time

    t0 = time.perf_counter()
    c = env.store.get_concept(concept)
    if has_cache(env.vectors):
        es, scores = eval_set_for(env, c.name, key=settings.EVAL_KEY,
                                  per_stratum=per_stratum, n_strata=n_strata)
    else:
        ids, scores = model_test_scores(env, c.name)
        es = stratified_eval_set(
            [str(i) for i in ids], scores, key=settings.EVAL_KEY, per_stratum=per_stratum,
            n_strata=n_strata,
        )
    items = [
        {"image_id": k, "source": "eval",
         "detail": ", ".join(f"{m}@{s}" for m, s in es.picked_by[k])}
        for k in es.keys
    ]
    info = {"counts": es.counts, "stratum_sizes": es.stratum_sizes, "models": list(scores),
            "per_stratum": per_stratum, "n_strata": n_strata}
    cutoff = env.store.label_cutoff(c.name)
    rounds = env.store.rounds(c.name)
    batch_id = env.store.write_batch(
        c.name, "eval", rounds[-1]["round"] if rounds else -1, items, label_cutoff=cutoff,
        run_id=run_id, info=info,
    )
    (env.concept_dir(c.name) / "eval_set.json").write_text(json.dumps(es.to_dict()))
    return CandidateBatch(c.name, "eval", -1, batch_id, items, time.perf_counter() - t0, info)


def evaluate(
    env: LoopEnv,
    concept: str,
    *,
    zero_shot_threshold: float = 0.5,
    rule: LabelRule = LabelRule(),
    tracking: bool = True,
) -> dict[str, Any]:
    """Metrics of every model and zero-shot on the same ratings — every eval rating so far (the
    eval sets of all rounds, merged) — with a 90% bootstrap interval for AUC-PR; writes a JSON
    and a plot."""
    c = env.store.get_concept(concept)
    labels = env.store.effective_labels(c.name, purpose="eval", rule=rule)
    if has_cache(env.vectors):  # score only the rated rows, no scan of the test split
        rated, rated_scores = rated_test_scores(env, c.name, list(labels))
    else:
        ids, scores = model_test_scores(env, c.name)
        index = {str(i): k for k, i in enumerate(ids)}
        rated = [i for i in labels if i in index]
        rated_scores = {name: s[[index[i] for i in rated]] for name, s in scores.items()}
    y = np.array([labels[i] for i in rated], dtype=np.int64)
    rows: list[dict[str, Any]] = []
    rounds = {f"round-{r['round']}": r for r in env.store.rounds(c.name)}
    corpus = corpus_test_scores(env, c.name, rated, list(rounds.values()), rule=rule) if rated else {}
    for name, s in rated_scores.items():
        sel = s if rated else np.zeros(0, np.float32)
        thr = zero_shot_threshold if name == ZERO_SHOT else 0.5
        r = rounds.get(name)
        row: dict[str, Any] = {
            "model": name, "round": r["round"] if r else None,
            "n_labels": (r["n_pos"] + r["n_neg"]) if r else 0,
            "model_version": r["model_version"] if r else None, "threshold": thr,
            "auc_pr": float("nan"), "auc_roc": float("nan"), "f1": float("nan"),
            "accuracy": float("nan"), "n_eval": len(rated), "n_eval_pos": int(y.sum()),
            "auc_pr_lo": float("nan"), "auc_pr_hi": float("nan"),
        }
        if rated:  # nothing to measure until the user has rated part of the eval set
            m = compute_metrics(y, sel, threshold=thr)
            lo, hi = bootstrap_auc_pr(y, sel)
            row.update(auc_pr=m.auc_pr, auc_roc=m.auc_roc, f1=m.f1, accuracy=m.accuracy,
                       auc_pr_lo=lo, auc_pr_hi=hi)
        if name in corpus:  # the same ratings against the corpus scores (label propagation)
            m = compute_metrics(y, corpus[name], threshold=thr)
            lo, hi = bootstrap_auc_pr(y, corpus[name])
            row.update(auc_pr_corpus=m.auc_pr, auc_roc_corpus=m.auc_roc,
                       auc_pr_corpus_lo=lo, auc_pr_corpus_hi=hi)
        rows.append(row)
    report = {"concept": c.name, "n_eval_labels": len(rated), "models": rows}
    out_dir = env.concept_dir(c.name)
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=1, default=float))
    plot = plot_auc_pr(rows, out_dir / "metrics.png", title=f"{c.name}: AUC-PR on {len(rated)} eval labels")
    report["plot"] = str(plot)
    if tracking and rated:
        from agile_pipeline.lib.tracking import log_artifact, log_metrics

        for row in rows:
            r = rounds.get(row["model"])
            if r and r.get("mlflow_run_id"):
                log_metrics(env.paths.mlflow_uri(), r["mlflow_run_id"], {
                    f"eval_{k}": float(row[k]) for k in ("auc_pr", "auc_roc", "f1", "accuracy",
                                                         "auc_pr_corpus", "auc_roc_corpus") if k in row
                } | {"eval_n": float(row["n_eval"])}, step=int(r["round"]))
        last = rounds[max(rounds, key=lambda k: rounds[k]["round"])] if rounds else None
        if last and last.get("mlflow_run_id"):
            log_artifact(env.paths.mlflow_uri(), last["mlflow_run_id"], plot, "evaluation")
    return report


def corpus_test_scores(env: Any, concept: str, rated: Sequence[str], rounds: Sequence[dict[str, Any]], *,
                       rule: LabelRule = LabelRule()) -> dict[str, np.ndarray]:
    """``{"round-N": corpus scores of the rated test images}`` for every round whose corpus
    scores are propagated (:func:`~agile_pipeline.lib.corpus_scores.corpus_scores`; ``{}`` where
    the corpus has no graph, :func:`~agile_pipeline.lib.corpus_scores.corpus_graph`)."""
    from agile_pipeline.lib.corpus_scores import (
        corpus_graph,
        corpus_scores,
        held_ratings,
        model_scores,
        train_ratings,
    )
    from agile_pipeline.lib.propagation import should_propagate
    from agile_pipeline.lib.training import TrainedClassifier

    g = corpus_graph(env.vectors, env.model_id)
    if g is None:
        return {}
    rows = g.test.positions(list(rated))
    if (rows < 0).any():  # a rated image left the table since: no like-for-like figure
        return {}
    out = {}
    for r in rounds:
        ratings = train_ratings(env, concept, int(r["label_cutoff"]), rule)
        if not should_propagate(held_ratings(g, ratings)[2]):
            continue  # its corpus scores are the model file's: nothing to score again
        model = TrainedClassifier.load(Path(r["model_uri"]))
        out[f"round-{r['round']}"] = corpus_scores(model_scores(model, g), g, ratings).corpus[g.n_train + rows]
    return out


def plot_auc_pr(rows: list[dict[str, Any]], path: Path, *, title: str) -> Path:
    """AUC-PR against number of training labels, zero-shot as a horizontal line (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    models = sorted((r for r in rows if r["model"] != ZERO_SHOT), key=lambda r: r["n_labels"])
    xs = [r["n_labels"] for r in models]
    ys = [r["auc_pr"] for r in models]
    if xs:
        ax.plot(xs, ys, "o-", color="#1f77b4", label="agile model (each dot a round; bar: 90% interval)")
        lo = [r.get("auc_pr_lo", float("nan")) for r in models]
        hi = [r.get("auc_pr_hi", float("nan")) for r in models]
        bars = [(x, y, y - a, b - y) for x, y, a, b in zip(xs, ys, lo, hi, strict=True) if a == a and b == b]
        if bars:
            bx, by, blo, bhi = (list(t) for t in zip(*bars, strict=True))
            ax.errorbar(bx, by, yerr=[blo, bhi], fmt="none", ecolor="#1f77b4", alpha=0.5, capsize=3)
    corpus = [(r["n_labels"], r["auc_pr_corpus"]) for r in models if "auc_pr_corpus" in r]
    if corpus:
        ax.plot(*zip(*corpus, strict=True), "s--", color="#2ca02c",
                label="corpus scores (propagated over the corpus)")
    zs = next((r["auc_pr"] for r in rows if r["model"] == ZERO_SHOT), float("nan"))
    if zs == zs:
        ax.axhline(zs, color="#d62728", linestyle="--", label=f"zero-shot ({zs:.2f})")
    ax.set_xlabel("training labels")
    ax.set_ylabel("AUC-PR (eval set)")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # nothing to explain before the first eval ratings
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


# ---- over the split caches: no scan of the test split per evaluation -------------------------
def _zero_shot_text(env: Any, concept: str) -> np.ndarray:
    """The concept's zero-shot text vector, saved by its start job."""
    path = env.concept_dir(concept) / "zero_shot.npz"
    text = None
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            text = np.asarray(z["text"], np.float32) if "text" in z.files else None
    if text is None:
        raise LoopError(
            f"no zero-shot scores for {concept!r} yet: run the concept's start job "
            f"(`agile concept expand {concept!r}`) first"
        )
    return text


def test_split_scores(env: Any, concept: str, *, n_strata: int = 10) -> tuple[SplitCache, dict[str, Any]]:
    """The test split and every model's scores on it for the eval set (zero-shot first, exact;
    then one :class:`SplitScores` per round, each computed once per table version).
    ``n_strata`` is accepted for compatibility (the scores do not depend on it)."""
    del n_strata
    from agile_pipeline.lib.training import TrainedClassifier

    test = split_cache(env.vectors, env.model_id, "test")
    train = split_cache(env.vectors, env.model_id, "train")
    text = _zero_shot_text(env, concept)
    scores: dict[str, Any] = {
        ZERO_SHOT: zero_shot_unit_split(env.concept_dir(concept), text, train, test)}
    for r in env.store.rounds(concept):
        model_dir = Path(r["model_uri"])
        scores[f"round-{r['round']}"] = model_split_scores(
            _LazyModel(model_dir, TrainedClassifier.load), model_dir, test)
    return test, scores


class _LazyModel:
    """A saved classifier loaded on first use (cached scores usually need no model)."""

    def __init__(self, model_dir: Path, load: Any) -> None:
        self._dir, self._load, self._model = model_dir, load, None

    def __getattr__(self, name: str) -> Any:
        if self._model is None:
            self._model = self._load(self._dir)
        return getattr(self._model, name)


def eval_set_for(env: Any, concept: str, *, key: bytes, per_stratum: int, n_strata: int) -> tuple[Any, dict[str, Any]]:
    """The concept's eval set over the whole test split (what ``build_eval_set`` needs)."""
    test, scores = test_split_scores(env, concept)
    es = stratified_eval_set_cached(test, scores, key=key, per_stratum=per_stratum, n_strata=n_strata)
    for r in env.store.rounds(concept):
        sc = scores.get(f"round-{r['round']}")
        if isinstance(sc, SplitScores):
            save_split_scores(sc, Path(r["model_uri"]), test)
    return es, scores


def rated_test_scores(env: Any, concept: str, ids: Sequence[str]) -> tuple[list[str], dict[str, np.ndarray]]:
    """``(rated, scores)``: the given ids that are in the test split, and every model's
    float32 score of just those rows (zero-shot first) — no scan of the split."""
    from agile_pipeline.lib.training import TrainedClassifier

    test = split_cache(env.vectors, env.model_id, "test")
    train = split_cache(env.vectors, env.model_id, "train")
    pos = test.positions(list(ids))
    rated = [i for i, p in zip(ids, pos.tolist(), strict=True) if p >= 0]
    rows = pos[pos >= 0]
    text = _zero_shot_text(env, concept)
    scores = {ZERO_SHOT: zero_shot_unit_split(env.concept_dir(concept), text, train, test)[rows]}
    for r in env.store.rounds(concept):
        model = TrainedClassifier.load(Path(r["model_uri"]))
        scores[f"round-{r['round']}"] = exact_scores(model, test, rows)
    return rated, scores
