"""The simulated user (paper section 5): ground-truth labels play the rater.

For each concept: zero-shot, text-to-image expansion (100 images rated), then N rounds of
active learning with batch B, retraining after every batch. After each model, AUC-PR and
AUC-ROC are measured on the *whole* labeled test split (ground truth makes that possible) and
on the paper's stratified eval set.

Each step the product has as a pure function is that function, called on in-memory matrices
instead of the state store and LanceDB: the expansion sample
(:func:`~agile_pipeline.lib.selection.sample_expansion`); the round policy
(:func:`~agile_pipeline.lib.loop.plan_round`: train, keep the last model, or a recovery batch
while no positive is known) and the round numbers it gives; the training recipe
(:func:`~agile_pipeline.lib.training.train_classifier`) with the product's first-model rule
(:func:`~agile_pipeline.lib.loop.architecture_round`); margin selection with labeled images
excluded (:func:`~agile_pipeline.lib.selection.select_margin`,
:func:`~agile_pipeline.lib.selection.select_margin_positive`); the SipHash stratified eval set
(:func:`~agile_pipeline.lib.evalset.stratified_eval_set`); the zero-shot calibration
(:func:`~agile_pipeline.lib.evalset.zero_shot_calibration`, ``zero_shot_to_unit``).

The simulator's own parts: the nearest-neighbour lists (a matrix product over the train split
standing in for the vector store), the rater (ground truth), which images a recovery batch
holds (the phrases' next-nearest images, widened each time, plus ``recovery_random`` of the
batch at random; the product's :func:`~agile_pipeline.lib.loop.build_expansion` reads them
from the store and takes them round-robin), the exemplar a stuck user gives, and the
few-label variants of :mod:`agile_pipeline.research.few_shot`.
"""

import csv
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agile_pipeline import settings
from agile_pipeline.lib import propagation
from agile_pipeline.lib.candidate_pool import POOL_RANDOM, POOL_SWEEP, rows_to_score
from agile_pipeline.lib.evalset import stratified_eval_set, zero_shot_calibration, zero_shot_to_unit
from agile_pipeline.lib.labeled_dataset import SimData, load_dataset
from agile_pipeline.lib.loop import RoundFacts, RoundPlan, architecture_round, plan_round
from agile_pipeline.lib.metrics import compute_metrics
from agile_pipeline.lib.selection import (
    sample_expansion,
    select_cluster_margin,
    select_margin,
    select_margin_positive,
)
from agile_pipeline.research import few_shot

log = logging.getLogger(__name__)


@dataclass
class SimConfig:
    rounds: int = settings.AL_ROUNDS
    batch: int = settings.AL_BATCH
    strategy: str = "margin"
    seed: int = 0
    per_phrase: int = settings.EXPANSION_PER_PHRASE
    expansion: int = settings.EXPANSION_SAMPLE
    eval_per_stratum: int = settings.EVAL_PER_STRATUM
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides
    zero_shot_prior: float = 0.0  # β: score = σ(logit(p_mlp) + β·logit(zero-shot in [0,1]))
    # few-label training (issue 9), see FEW_SHOT_VARIANTS; "plain" is the paper's recipe
    few_shot: str = "plain"
    few_shot_args: dict[str, Any] = field(default_factory=dict)
    # share of a no-positive-yet recovery batch drawn uniformly from the unlabeled pool instead
    # of the phrases' next-nearest images (the product's: settings.RECOVERY_RANDOM_SHARE; 0 =
    # text neighbours only)
    recovery_random: float = settings.RECOVERY_RANDOM_SHARE
    # the app's recovery path: after a batch with no positive, the simulated user gives one
    # exemplar image of the concept (found by search, or a picture of their own uploaded),
    # which is a positive label and a query like a phrase; it is drawn at random from the
    # concept's unlabeled train positives (the user knows the concept when they see it)
    exemplar_when_stuck: bool = False
    # the app's pipelined rounds (labeling_ui.service.RoundPolicy): the next batch is selected
    # by a model trained while the last `lookahead` images of the batch were still unrated
    # (they are kept out of that selection); every model measured is the follow-up trained on
    # the batch's full labels, as in the app. 0 = the paper's protocol.
    lookahead: int = 0
    # SEALS candidate pool (issue 15, lib/candidate_pool.py): 0 = every round scores the whole
    # train split (the paper's protocol); k > 0 = only the union of the k nearest train
    # neighbours of every labelled image, phrase and exemplar, plus `pool_random` images drawn
    # uniformly from the rest, plus the previous selector's `pool_sweep` most uncertain images of
    # the whole split (the product's sweep after each pooled round's commit; 0 = none)
    pool_k: int = 0
    pool_random: int = POOL_RANDOM
    pool_sweep: int = POOL_SWEEP


FEW_SHOT_VARIANTS: dict[str, str] = {
    "plain": "the paper's MLP every round",
    "linear": "logistic regression on L2-normalised embeddings (no text), every round",
    "prior-linear": "logistic regression with the zero-shot/negative-phrase prior on its weights",
    "hybrid": "prior-linear while the labels hold < switch_pos positives, then the paper's MLP",
    "mlp-pseudo": "the paper's MLP with the phrase vectors added as labeled points",
    "prior-decay": "the paper's MLP blended with the zero-shot prior, β = c / n_pos",
    "auto": "the product's default (AGILE_MODEL_FAMILY=auto): the kernel machine on the rated images or "
            "the MLP, by the near-duplicate agreement of the labels; lp_alpha=A,lp_k=K scores the test "
            "split by label propagation over the kNN graph of train ∪ test (lp_family=kernel: kernel "
            "rounds only; lp_select=0: batches chosen on the model's own scores — the product's corpus "
            "scores), pl_n=N,pl_family=kernel refits kernel rounds with up to N graph positives (the "
            "product's; pl_alpha, pl_t, pl_k), knn_alpha=A,knn_k=K mixes in the K nearest train images' scores",
    "cv": "AGILE_MODEL_FAMILY=cv: MLP, ridge LR or their ensemble by k-fold AUC-PR on the labels "
          "(candidates=... for other families, e.g. candidates=kernel for one family)",
    "ensemble": "the mean logit of the paper's MLP and ridge LR, every round",
}


def parse_variant_args(text: str) -> dict[str, Any]:
    """``key=value,key=value`` -> args (numbers as numbers; ``a|b`` as a tuple of words)."""
    args: dict[str, Any] = {}
    for kv in filter(None, (p.strip() for p in text.split(","))):
        k, eq, v = kv.partition("=")
        if not eq or not k:
            raise ValueError(f"expected key=value, got {kv!r}")
        if "|" in v:
            args[k] = tuple(x for x in v.split("|") if x)
        else:
            try:
                args[k] = int(v)
            except ValueError:
                try:
                    args[k] = float(v)
                except ValueError:
                    args[k] = v
    return args


def attach_negative_phrases(data: SimData, dataset_path: Path, encoder: Any) -> SimData:
    """Add the dataset's negative phrases (``negatives.txt``) of the simulated concepts to
    ``data``: the simulated user types them, as the paper's users do (section 3)."""
    ds = load_dataset(Path(dataset_path))
    for c in data.positives:
        phrases = ds.negatives.get(c) or []
        if phrases:
            data.negative_phrases[c] = list(phrases)
            data.negative_vectors[c] = np.asarray(encoder.embed_texts(phrases), dtype=np.float32)
    return data


def _auc(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    m = compute_metrics(y, s)
    return float(m.auc_pr), float(m.auc_roc)


def run_concept(data: SimData, concept: str, cfg: SimConfig) -> dict[str, Any]:
    """Simulate one concept; returns its entry of ``results.json``."""
    import torch

    torch.set_num_threads(1)
    if cfg.few_shot not in FEW_SHOT_VARIANTS:
        raise ValueError(f"unknown few_shot variant {cfg.few_shot!r}: one of {', '.join(FEW_SHOT_VARIANTS)}")
    pos = data.positives[concept]
    y_train = np.array([i in pos for i in data.train_ids], dtype=np.int64)
    y_test = np.array([i in pos for i in data.test_ids], dtype=np.int64)
    text = data.text_vectors[concept]
    X_train, X_test = data.X_train, data.X_test
    test_index = {k: i for i, k in enumerate(data.test_ids)}
    test_nodes = len(X_train) + np.arange(len(X_test))  # the test rows in a train ∪ test graph
    zs_test = X_test @ text[0]
    zs_train = X_train @ text[0]
    zs_pr, zs_roc = _auc(y_test, zs_test)
    center, temp = zero_shot_calibration(zs_train)
    zs_unit = zero_shot_to_unit(zs_test, center=center, temperature=temp)
    zs_train_unit = zero_shot_to_unit(zs_train, center=center, temperature=temp)

    # expansion: nearest per_phrase train images of every phrase (negative phrases too, as in
    # the product and the paper), sample `expansion`
    neg_text = data.negative_vectors.get(concept)
    queries = text if neg_text is None or not len(neg_text) else np.concatenate([text, neg_text])
    query_names = list(data.phrases[concept]) + [
        f"not: {p}" for p in data.negative_phrases.get(concept, [])][: len(queries) - len(text)]
    found: dict[str, list[str]] = {}
    sims = X_train @ queries.T  # (n_train, n_queries)
    for j, phrase in enumerate(query_names):
        top = np.argsort(-sims[:, j], kind="stable")[: cfg.per_phrase]
        found[phrase] = [str(k) for k in top]
    picked = [int(k) for k, _ in sample_expansion(found, cfg.expansion, cfg.seed)]
    labeled = np.zeros(len(data.train_ids), dtype=bool)
    labeled[picked] = True
    last_batch: list[int] = list(picked)  # the batch just rated, in the order it was shown
    rounds: list[dict[str, Any]] = []
    first_pos_round = 0 if y_train[picked].any() else None
    eval_scores: dict[str, np.ndarray] = {"zero-shot": zs_unit}
    widen = 1
    exemplar: int | None = None
    book = _ProductRounds(concept, y_train)

    def fit(rows: np.ndarray, plan: RoundPlan) -> _RoundModel:
        return _fit_round(X_train, rows, y_train[rows], book.architecture(plan, rows), cfg,
                          concept, text, neg_text, X_test)

    in_pool = np.zeros(len(data.train_ids), dtype=bool)
    expanded = np.zeros(len(data.train_ids), dtype=bool)
    swept = np.empty(0, np.int64)  # the last pooled selection's sweep, scored by the next one
    if cfg.pool_k > 0:  # the phrases' neighbours seed the pool, as the product's expansion does
        for j in range(sims.shape[1]):
            in_pool[np.argsort(-sims[:, j], kind="stable")[: cfg.pool_k]] = True

    for r in range(cfg.rounds + 1):
        if cfg.exemplar_when_stuck and exemplar is None and not y_train[labeled].any():
            # the batch just rated held no positive: the app offers search / upload / ★
            pool = np.flatnonzero(y_train.astype(bool) & ~labeled)
            if pool.size:
                exemplar = int(np.random.default_rng(cfg.seed + 7919 * (r + 1)).choice(pool))
                labeled[exemplar] = True
                book.exemplar(exemplar)
                sims = np.concatenate([sims, (X_train @ X_train[exemplar])[:, None]], axis=1)
                if first_pos_round is None:
                    first_pos_round = r
        idx = np.flatnonzero(labeled)
        y = y_train[idx]
        entry: dict[str, Any] = {"round": r, "n_labels": int(labeled.sum()), "n_pos": int(y.sum())}
        # The app's lookahead round on this batch started with its last `lookahead` images
        # unrated; it comes before the follow-up measured here (so it is planned first) and
        # trains only when the product's policy says so (its labels hold a positive).
        idx_early = np.empty(0, dtype=np.int64)
        early_plan: RoundPlan | None = None
        early_model: _RoundModel | None = None  # the lookahead round's model when it keeps the last one
        if y.sum() > 0 and cfg.lookahead > 0 and r < cfg.rounds:
            early = labeled.copy()
            early[np.array(last_batch[-cfg.lookahead:], dtype=np.int64)] = False
            idx_early = np.flatnonzero(early)
            early_plan = book.plan(idx_early)
            if early_plan.action == "train":
                book.trained(early_plan, idx_early)  # fitted below, where it selects
            elif early_plan.action == "reuse":
                early_model = book.last_model
            else:
                early_plan = None
        plan = book.plan(idx)
        model = None
        if plan.action == "reuse":
            model = book.last_model
        if plan.action in ("train", "reuse"):
            t0 = time.perf_counter()
            if model is None:
                model = fit(idx, plan)
                book.trained(plan, idx, model)
            entry["train_s"] = round(time.perf_counter() - t0, 3)
            entry["model_kind"] = model.kind
            entry["graph_positives"] = int(model.scorer.meta.config.get("graph_positives", 0)) \
                if hasattr(model.scorer, "meta") else 0
            p_test = model.predict(X_test, zs_unit, test_nodes)
            entry["auc_pr"], entry["auc_roc"] = _auc(y_test, p_test)
            eval_scores[f"round-{r}"] = p_test
            es = stratified_eval_set(data.test_ids, eval_scores, key=settings.EVAL_KEY,
                                     per_stratum=cfg.eval_per_stratum,
                                     n_strata=settings.EVAL_STRATA)
            sel = np.array([test_index[k] for k in es.keys], dtype=np.int64)
            if 0 < y_test[sel].sum() < len(sel):
                entry["auc_pr_stratified"], _ = _auc(y_test[sel], p_test[sel])
            else:
                entry["auc_pr_stratified"] = float("nan")
        elif plan.action == "recovery":  # no positive yet
            entry.update(train_s=0.0, auc_pr=float("nan"), auc_roc=float("nan"),
                         auc_pr_stratified=float("nan"), model=False)
        else:
            raise RuntimeError(f"unexpected round plan {plan}")
        if r == cfg.rounds:
            entry["select_s"] = 0.0
            rounds.append(entry)
            break
        t0 = time.perf_counter()
        eligible = ~labeled
        selector, selector_round = model, book.last_round
        if model is not None and cfg.lookahead > 0:
            if early_plan is not None:  # the lookahead round's model selects the next batch
                selector = early_model or fit(idx_early, early_plan)
                selector_round = early_plan.round_index
            entry["lookahead_labels"] = len(idx_early) if selector is not model else int(labeled.sum())
        if selector is not None:
            rows = np.arange(len(eligible))
            if cfg.pool_k > 0:  # SEALS: grow by the labelled images' neighbours, score the pool
                new = np.flatnonzero(labeled & ~expanded)
                if new.size:
                    near = X_train @ X_train[new].T
                    top = np.argpartition(-near, min(cfg.pool_k, len(near) - 1), axis=0)[: cfg.pool_k + 1]
                    in_pool[top.ravel()] = True
                    expanded[new] = True
                rows, n_rand = rows_to_score(np.concatenate([np.flatnonzero(in_pool), swept]), eligible,
                                             cfg.pool_random, np.random.default_rng(cfg.seed * 1009 + r))
                entry.update(pool_size=int(in_pool.sum()), scored=int(rows.size), random_scored=n_rand,
                             sweep_scored=int(eligible[swept].sum()))
            p_rows = selector.predict(X_train[rows], zs_train_unit[rows], rows, selecting=True)
            sub_eligible = eligible[rows]
            if cfg.strategy == "margin-positive":
                pick = select_margin_positive(p_rows, cfg.batch, eligible=sub_eligible)
            elif cfg.strategy == "cluster-margin":
                pick = select_cluster_margin(p_rows, X_train[rows], cfg.batch, eligible=sub_eligible, seed=cfg.seed + r)
            else:
                pick = select_margin(p_rows, cfg.batch, eligible=sub_eligible)
            nxt = rows[pick]
            book.batch(nxt, "al", selector_round, int(labeled.sum()))
            if cfg.pool_k > 0 and cfg.pool_sweep > 0:  # after the commit: the whole split, this model
                rest = eligible.copy()
                rest[nxt] = False
                swept = select_margin(selector.predict(X_train, zs_train_unit, np.arange(len(X_train)),
                                                       selecting=True), cfg.pool_sweep, eligible=rest)
        else:  # no positive yet: widen the expansion to the next-nearest images per phrase
            widen += 1
            cand = []
            for j in range(sims.shape[1]):
                top = np.argsort(-sims[:, j], kind="stable")[: cfg.per_phrase * widen]
                cand += [int(k) for k in top if eligible[k]]
            cand = list(dict.fromkeys(cand))
            rng = np.random.default_rng(cfg.seed + r)
            n_rand = round(cfg.batch * cfg.recovery_random)
            nxt = np.array(rng.permutation(cand)[: cfg.batch - n_rand] if cand else [], dtype=np.int64)
            if n_rand:
                rest = np.flatnonzero(eligible & ~np.isin(np.arange(len(eligible)), nxt))
                extra = rng.choice(rest, size=min(n_rand, rest.size), replace=False)
                nxt = np.concatenate([nxt, np.sort(extra)]).astype(np.int64)
            book.batch(nxt, "expansion", book.last_round, int(labeled.sum()))
        entry["select_s"] = round(time.perf_counter() - t0, 4)
        rounds.append(entry)
        labeled[nxt] = True
        last_batch = [int(k) for k in nxt]
        if first_pos_round is None and y_train[nxt].any():
            first_pos_round = r + 1
    return {
        "name": concept,
        "n_test_pos": int(y_test.sum()),
        "n_test": len(y_test),
        "n_train_pos": int(y_train.sum()),
        "zero_shot": {"auc_pr": zs_pr, "auc_roc": zs_roc},
        "first_positive_round": first_pos_round,
        "model_trained": any(not math.isnan(e.get("auc_pr", float("nan"))) for e in rounds),
        "exemplar": None if exemplar is None else data.train_ids[exemplar],
        "rounds": rounds,
    }


class _ProductRounds:
    """The product's view of one simulated concept, so that its pure rules decide.

    The round policy (:func:`~agile_pipeline.lib.loop.plan_round`: train round n, keep the last
    model, or a recovery batch while no positive is known) and the first-model rule
    (:func:`~agile_pipeline.lib.loop.architecture_round`) read what the state store would hold:
    the latest round and the labels it saw (labels only accumulate here, so their number is
    the label cutoff), the latest batch, and the round of the batch each label was rated in (a
    batch's labels train the round after the model that chose it; an exemplar has none).
    """

    def __init__(self, concept: str, y_train: np.ndarray) -> None:
        self.concept = concept
        self.y_train = y_train
        self.label_round = np.zeros(len(y_train), dtype=np.int64)  # the expansion: round 0
        self.last_round: int | None = None
        self.last_cutoff: int | None = None
        self.last_model: _RoundModel | None = None
        self.batch_kind = "expansion"
        self.batch_cutoff = 0

    def plan(self, rows: np.ndarray) -> RoundPlan:
        n_pos = int(self.y_train[rows].sum())
        return plan_round(RoundFacts(
            self.concept, n_pos, len(rows) - n_pos, len(rows), self.last_round, self.last_cutoff,
            self.batch_kind, self.batch_cutoff))

    def architecture(self, plan: RoundPlan, rows: np.ndarray) -> int:
        assert plan.round_index is not None
        return architecture_round(plan.round_index,
                                  [None if v < 0 else int(v) for v in self.label_round[rows]])

    def trained(self, plan: RoundPlan, rows: np.ndarray, model: "_RoundModel | None" = None) -> None:
        """Round ``plan.round_index`` trained on ``rows`` (``model``: kept for a later reuse)."""
        self.last_round, self.last_cutoff = plan.round_index, len(rows)
        self.last_model = model

    def exemplar(self, row: int) -> None:
        self.label_round[row] = -1  # rated in no batch

    def batch(self, rows: np.ndarray, kind: str, chosen_by: int | None, n_labels: int) -> None:
        """The next batch, chosen by round ``chosen_by`` (``None``: before any model) when
        ``n_labels`` labels were known."""
        self.label_round[rows] = 0 if chosen_by is None else chosen_by + 1
        self.batch_kind, self.batch_cutoff = kind, n_labels


@dataclass
class _RoundModel:
    """A round's model in the simulation: its kind, scorer and blended-prior weight."""

    kind: str
    scorer: Any  # has predict_proba(X)
    beta: float = 0.0
    smoothing: "_KnnSmoothing | None" = None

    propagation: "_LabelPropagation | None" = None

    def predict(self, X: np.ndarray, zs_unit: np.ndarray, nodes: np.ndarray | None = None, *,
                selecting: bool = False) -> np.ndarray:
        """Scores of the rows ``X``; ``nodes``: their rows in the graph of train ∪ test (train
        rows first), which transductive label propagation reads its scores from (when
        ``selecting`` a batch, only if the propagation is set to select too)."""
        use = self.propagation is not None and not (selecting and not self.propagation.selects)
        if use:
            if nodes is None:
                raise ValueError("label propagation scores graph nodes: pass nodes")
            p = self.propagation.scores(self.scorer)[nodes].astype(np.float32)
        else:
            p = self.scorer.predict_proba(X)
        if self.smoothing is not None:
            p = self.smoothing.apply(X, p, self.scorer)
        return few_shot.blend_logits(p, zs_unit, self.beta) if self.beta else p


@dataclass
class _KnnSmoothing:
    """kNN smoothing of a model's scores over the train split (research screen)."""

    X_train: np.ndarray
    labeled: np.ndarray  # row numbers of the labelled train images
    y: np.ndarray
    alpha: float
    k: int
    use_labels: bool
    _p_train: np.ndarray | None = None
    _train_unit: np.ndarray | None = None

    def apply(self, X: np.ndarray, p: np.ndarray, scorer: Any) -> np.ndarray:
        if self._p_train is None:
            self._p_train = scorer.predict_proba(self.X_train).astype(np.float64)
            if self.use_labels:
                self._p_train[self.labeled] = self.y
        if self._train_unit is None:  # once per model, not per call
            self._train_unit = few_shot.unit_rows(self.X_train)
        sims = few_shot.unit_rows(X) @ self._train_unit.T
        sims[sims > 0.9999] = -np.inf  # an image is not its own neighbour
        k = min(self.k, sims.shape[1] - 1)
        nb = np.argpartition(-sims, k, axis=1)[:, :k]
        return ((1 - self.alpha) * p + self.alpha * self._p_train[nb].mean(axis=1)).astype(np.float32)


_GRAPHS: dict[tuple[int, int, int], np.ndarray] = {}


def corpus_graph(X_train: np.ndarray, X_test: np.ndarray, k: int) -> np.ndarray:
    """:func:`~agile_pipeline.lib.propagation.knn_graph` of train ∪ test (rows: train then
    test), computed once per process and split pair."""
    key = (id(X_train), id(X_test), k)
    if key not in _GRAPHS:
        _GRAPHS[key] = propagation.knn_graph(np.concatenate([X_train, X_test]), k)
    return _GRAPHS[key]


@dataclass
class _LabelPropagation:
    """Transductive label propagation of a model's scores over the kNN graph of train ∪ test
    (:mod:`agile_pipeline.lib.propagation`, the rated train rows held at their ratings):
    scores only the images in the graph (the corpus)."""

    X_all: np.ndarray  # train rows then test rows
    graph: np.ndarray
    labeled: np.ndarray
    y: np.ndarray
    alpha: float
    selects: bool = True  # False: batches are chosen on the model's own scores
    _f: np.ndarray | None = None

    def scores(self, scorer: Any) -> np.ndarray:
        if self._f is None:
            self._f = propagation.propagate(scorer.predict_proba(self.X_all), self.graph, self.labeled,
                                            self.y, alpha=self.alpha)
        return self._f


def _fit_round(X_train: np.ndarray, idx: np.ndarray, y: np.ndarray, arch_round: int,
               cfg: SimConfig, concept: str, text: np.ndarray,
               neg_text: np.ndarray | None, X_test: np.ndarray | None = None) -> _RoundModel:
    """Train a round's model on the labeled rows ``idx`` of ``X_train`` per ``cfg.few_shot``;
    ``arch_round`` is :func:`architecture_round`'s answer (0: the recipe's first model)."""
    from dataclasses import replace

    from agile_pipeline.lib.training import TrainConfig, train_classifier

    variant, args = cfg.few_shot, dict(cfg.few_shot_args)
    n_pos = int(y.sum())
    if variant in ("linear", "prior-linear") or (
            variant == "hybrid" and n_pos < int(args.get("switch_pos", 10))):
        known = few_shot.PriorLinearConfig.__dataclass_fields__
        pcfg = few_shot.PriorLinearConfig(seed=cfg.seed, **{k: v for k, v in args.items() if k in known})
        if variant == "linear":
            pcfg = replace(pcfg, prior_strength=0.0)
        lm = few_shot.fit_prior_linear(X_train[idx], y, X_train, text_pos=text, text_neg=neg_text,
                                       exclude_from_pool=idx, config=pcfg)
        return _RoundModel("linear", lm)
    if variant in ("auto", "cv", "ensemble"):
        from agile_pipeline.lib.model_choice import (
            ModelChoiceConfig,
            choice_for,
            refit_with_positives,
            train_round_model,
        )

        known_c = ModelChoiceConfig.__dataclass_fields__
        ckw = {k: v for k, v in args.items() if k in known_c}
        if isinstance(ckw.get("candidates"), str):
            ckw["candidates"] = (ckw["candidates"],)
        if variant == "ensemble":
            ckw["candidates"] = ("ensemble",)
        # auto: the product's default choice (AGILE_MODEL_FAMILY=auto); cv: cross-validation
        choice = replace(choice_for("auto" if variant == "auto" else "cv", seed=cfg.seed), **ckw)
        m = train_round_model(X_train[idx], y, X_train, round_index=arch_round,
                              config=TrainConfig(seed=cfg.seed, **cfg.train), choice=choice,
                              exclude_from_pool=idx, concept=concept)
        family = str(m.meta.config["family"])
        pl_families = args.get("pl_family", ())
        pl_families = (pl_families,) if isinstance(pl_families, str) else tuple(pl_families)
        if int(args.get("pl_n", 0)) > 0 and (not pl_families or family in pl_families):
            # graph positives (the product's kernel rounds): the train rows label propagation
            # over the corpus graph makes confident, the family refitted with them as positives
            assert X_test is not None
            extra = propagation.pseudo_positives(
                m.predict_proba(np.concatenate([X_train, X_test])),
                corpus_graph(X_train, X_test, int(args.get("pl_k", propagation.K))), idx,
                y.astype(np.float64), alpha=float(args.get("pl_alpha", propagation.PSEUDO_ALPHA)),
                limit=int(args["pl_n"]), threshold=float(args.get("pl_t", propagation.PSEUDO_THRESHOLD)),
                eligible=len(X_train))
            m = refit_with_positives(m, X_train[idx], y, X_train, extra, round_index=arch_round,
                                     config=TrainConfig(seed=cfg.seed, **cfg.train),
                                     exclude_from_pool=idx, concept=concept, choice=choice)
        smooth = None
        if float(args.get("knn_alpha", 0)) > 0:
            smooth = _KnnSmoothing(X_train, idx, y.astype(np.float64), float(args["knn_alpha"]),
                                   int(args.get("knn_k", 10)), bool(int(args.get("knn_labels", 1))))
        prop = None
        lp_families = args.get("lp_family", ())
        lp_families = (lp_families,) if isinstance(lp_families, str) else tuple(lp_families)
        if float(args.get("lp_alpha", 0)) > 0 and (not lp_families or m.meta.config["family"] in lp_families):
            assert X_test is not None
            k = int(args.get("lp_k", 10))
            graph = corpus_graph(X_train, X_test, k)
            # lp_rule=graph: only where the graph's rated neighbours agree (the product's rule)
            if args.get("lp_rule") != "graph" or propagation.should_propagate(
                    propagation.neighbour_agreement(graph, idx, y)[0]):
                prop = _LabelPropagation(np.concatenate([X_train, X_test]), graph, idx, y.astype(np.float64),
                                         float(args["lp_alpha"]), selects=bool(int(args.get("lp_select", 1))))
        return _RoundModel(str(m.meta.config["family"]), m, smoothing=smooth, propagation=prop)
    X_lab, y_lab = X_train[idx], y
    if variant == "mlp-pseudo":
        Xp, yp = few_shot.phrase_pseudo_labels(text, neg_text, X_train.shape[1])
        X_lab, y_lab = np.concatenate([X_lab, Xp]), np.concatenate([y, yp])
    model = train_classifier(X_lab, y_lab, X_train, round_index=arch_round,
                             config=TrainConfig(seed=cfg.seed, **cfg.train),
                             exclude_from_pool=idx, concept=concept)
    beta = cfg.zero_shot_prior
    if variant == "prior-decay":
        beta = few_shot.decayed_prior_weight(float(args.get("c", 1.0)), n_pos)
    return _RoundModel("mlp", model, beta)


def _worker(args: tuple[SimData, str, SimConfig]) -> dict[str, Any]:
    data, concept, cfg = args
    return run_concept(data, concept, cfg)


def run_all(data: SimData, concepts: Sequence[str], cfg: SimConfig, *, workers: int = 1,
            progress: bool = True) -> list[dict[str, Any]]:
    from tqdm import tqdm

    results: list[dict[str, Any]] = []
    bar = tqdm(total=len(concepts), desc="simulated concepts", disable=not progress, unit="concept")
    if workers <= 1:
        for c in concepts:
            results.append(run_concept(data, c, cfg))
            bar.update()
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            for res in pool.map(_worker, [(data, c, cfg) for c in concepts]):
                results.append(res)
                bar.update()
    bar.close()
    return results


def _mean_se(values: list[float]) -> tuple[float, float]:
    v = [x for x in values if not math.isnan(x)]
    if not v:
        return float("nan"), float("nan")
    mean = float(np.mean(v))
    se = float(np.std(v, ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0
    return mean, se


def summarize(concepts: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean zero-shot and per-round AUC-PR (± s.e.), overall and for easy/hard halves.

    A round where a concept has no model yet counts with AUC-PR equal to the concept's base
    rate on the test split (what a constant score achieves) so that means stay comparable.
    """
    def table(group: list[dict[str, Any]]) -> dict[str, Any]:
        n_rounds = max((len(c["rounds"]) for c in group), default=0)
        rows = []
        for r in range(n_rounds):
            vals, roc, labels = [], [], []
            for c in group:
                if r >= len(c["rounds"]):
                    continue
                e = c["rounds"][r]
                ap = e.get("auc_pr", float("nan"))
                if math.isnan(ap):  # no model yet: a constant score's AUC-PR is the base rate
                    ap = c["n_test_pos"] / max(1, c["n_test"])
                vals.append(ap)
                roc.append(e.get("auc_roc", float("nan")))
                labels.append(e["n_labels"])
            m, se = _mean_se(vals)
            rows.append({"round": r, "n_labels": int(np.mean(labels)), "auc_pr_mean": m,
                         "auc_pr_se": se, "auc_roc_mean": _mean_se(roc)[0]})
        zs, zs_se = _mean_se([c["zero_shot"]["auc_pr"] for c in group])
        return {"n_concepts": len(group), "zero_shot_auc_pr_mean": zs, "zero_shot_auc_pr_se": zs_se,
                "rounds": rows}

    ranked = sorted(concepts, key=lambda c: c["zero_shot"]["auc_pr"])
    half = len(ranked) // 2
    return {
        "all": table(concepts),
        "hard": table(ranked[:half]) if half else None,
        "easy": table(ranked[half:]) if half else None,
        "concepts_without_model": sum(1 for c in concepts if not c["model_trained"]),
        "first_positive_round": {c["name"]: c["first_positive_round"] for c in concepts},
    }


def format_table(summary: dict[str, Any]) -> str:
    """The printed table: zero-shot and each round's mean AUC-PR, all / easy / hard."""
    groups = [(k, summary[k]) for k in ("all", "easy", "hard") if summary.get(k)]
    base = groups[0][1]
    head = "| group | concepts | zero-shot | " + " | ".join(
        f"round {r['round']} ({r['n_labels']})" for r in base["rounds"]) + " |"
    sep = "|" + "---|" * (3 + len(base["rounds"]))
    lines = [head, sep]
    for name, g in groups:
        cells = [f"{r['auc_pr_mean']:.3f} ± {r['auc_pr_se']:.3f}" for r in g["rounds"]]
        lines.append(f"| {name} | {g['n_concepts']} | {g['zero_shot_auc_pr_mean']:.3f} | " + " | ".join(cells) + " |")
    lines.append(f"\nconcepts left without a model: {summary['concepts_without_model']}")
    first = summary.get("first_positive_round") or {}
    at0 = sum(1 for v in first.values() if v == 0)
    later = ", ".join(f"{k} (round {v})" for k, v in sorted(first.items()) if v)
    never = ", ".join(k for k, v in sorted(first.items()) if v is None)
    lines.append(f"first positive found by the expansion (round 0): {at0}/{len(first)} concepts"
                 + (f"; later: {later}" if later else "") + (f"; never: {never}" if never else ""))
    return "\n".join(lines)


def write_outputs(out: Path, results: dict[str, Any]) -> dict[str, Path]:
    """results.json, results.csv and auc_pr.png (mean ± s.e. against labels, zero-shot line)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "plot": out / "auc_pr.png"}
    paths["json"].write_text(json.dumps(results, indent=1, default=_json_default))
    with paths["csv"].open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["concept", "n_test_pos", "zero_shot_auc_pr", "round", "n_labels", "n_pos",
                    "auc_pr", "auc_roc", "auc_pr_stratified", "train_s", "select_s"])
        for c in results["concepts"]:
            for e in c["rounds"]:
                w.writerow([c["name"], c["n_test_pos"], c["zero_shot"]["auc_pr"], e["round"],
                            e["n_labels"], e.get("n_pos"), e.get("auc_pr"), e.get("auc_roc"),
                            e.get("auc_pr_stratified"), e.get("train_s"), e.get("select_s")])
    _plot(results, paths["plot"])
    return paths


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["summary"]
    groups = [(k, s[k]) for k in ("all", "easy", "hard") if s.get(k)]
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), dpi=100, squeeze=False)
    for ax, (name, g) in zip(axes[0], groups, strict=True):
        xs = [r["n_labels"] for r in g["rounds"]]
        ys = np.array([r["auc_pr_mean"] for r in g["rounds"]])
        se = np.array([r["auc_pr_se"] for r in g["rounds"]])
        ax.plot(xs, ys, "o-", label="agile (each dot a round)")
        ax.fill_between(xs, ys - se, ys + se, alpha=0.2)
        ax.axhline(g["zero_shot_auc_pr_mean"], color="#d62728", ls="--", label="zero-shot")
        ax.set_title(f"{name} ({g['n_concepts']} concepts)", fontsize=10)
        ax.set_xlabel("labels rated")
        ax.set_ylabel("AUC-PR (mean ± s.e.)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"simulated user: {results['dataset']} ({results['embedding_model']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def choose_concepts(available: dict[str, int], requested: Sequence[str] | None, count: int | None,
                    seed: int) -> list[str]:
    names = sorted(available)
    if requested:
        missing = [c for c in requested if c not in available]
        if missing:
            raise ValueError(f"unknown concept(s) {missing}; available: {', '.join(names[:20])}…")
        return list(requested)
    if count is not None and count < len(names):
        return sorted(random.Random(seed).sample(names, count))
    return names


def config_dict(cfg: SimConfig) -> dict[str, Any]:
    return asdict(cfg)
