"""Which classifier a round trains: chosen per concept, each round, from the concept's own labels.

The paper's recipe trains one family, its MLP (:mod:`agile_pipeline.lib.training`). Which
family makes the most of a few hundred labels depends on the concept, so :func:`train_round_model`
chooses, by one of two rules:

* **the near-duplicate agreement** (``rule="agreement"``, the default ``auto`` setting: the
  kernel machine or the MLP). A kernel machine on the rated images scores an image by the rated
  images it nearly duplicates, which pays where near-duplicates share labels (the same emoji in
  four art sets) and hurts where a positive's closest rated image is a negative (a mirrored
  letter). :func:`near_duplicate_agreement` measures exactly that on the ratings: the first
  candidate (the kernel) unless it is below ``agreement_min``, then the second (the MLP). No
  training beyond the chosen family's;
* **cross-validation** (``rule="cv"``, the ``cv`` setting): k-fold AUC-PR of every candidate on
  the labels, the best trained on all of them.

The families:

* ``mlp`` — the paper's MLP as :func:`~agile_pipeline.lib.training.train_classifier` trains it,
  with Adam's learning rate ``mlp_lr`` = 1e-3 instead of the paper's 1e-4: with the recipe's 300
  steps the paper's rate barely moves the weights from their initialisation, and on all three
  benchmarks 10x the rate wins by more than anything else (README, "Better classifiers from the
  same labels");
* ``linear`` — ridge logistic regression (scikit-learn, L-BFGS) on L2-normalised embeddings,
  ``½ λ ‖w‖²`` with ``λ = ridge_l2``; rows weighted as the recipe mixes its batches (half the mass
  on labelled positives, a quarter on labelled negatives, a quarter on random train images taken
  as negatives), the total mass being the number of labels;
* ``ensemble`` — the mean of the two models' logits;
* ``kernel`` — ridge logistic regression on the normalised embedding *plus one feature per
  labelled image*, ``relu(cos(x, xᵢ) - τ) / (1 - τ)`` (τ = ``kernel_tau``): a kernel machine
  that keeps what is near each rated image (the same emoji in another art set) where a linear
  model averages it away. Its hidden layer has one unit per label, so scanning a split costs
  O(labels) per row, not O(hidden);
* ``mlp+kernel`` — the mean of the MLP's and the kernel machine's logits (measured, not chosen
  by default: the MLP's larger logits drown the kernel where it wins).

**Cross-validation.** The labelled rows are split into ``folds`` stratified folds and a sample
of ``cv_random`` unlabelled train rows (random negatives) into as many; every fold trains each
base family on the other folds and scores its own held-out labels plus its held-out random
negatives, weighted as in training. The score is weighted average precision (AUC-PR,
scikit-learn), the mean over folds; the ensembles are scored from the same folds' models, so
they cost no extra training. Ties go to the family listed first in ``candidates``. With fewer
than ``min_pos_for_cv`` positives (or negatives) a fold has too few to rank anything, so the
round trains ``fallback`` without cross-validation and says so. Cross-validating the MLP against
the kernel machine on emoji-mix picks the kernel in 32–67 % of the rounds (by label count),
though it is the better of the two on the test split in 77 % of them (fixed-label screen,
README): that is why the default decides by agreement instead.

``PAPER`` (setting ``AGILE_MODEL_FAMILY=paper``) is the paper's recipe exactly: its MLP at
learning rate 1e-4 every round, no choice.

**One model file whatever the family.** A linear model is an MLP with no hidden layer; the
kernel machine an MLP whose hidden units are the labelled images (:func:`kernel_classifier`); the
ensembles are folded *exactly* into one wider MLP (:func:`fold_units`: extra first-layer units,
summed into two non-negative units that later layers pass on), so saving, loading, the int8
scans, MLflow and the export read every family the same way. The family and the evidence of
the choice are in :attr:`ClassifierMeta.config` (``family``, ``model_choice``).
"""

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from agile_pipeline.lib.torch_runtime import torch_threads
from agile_pipeline.lib.training import (
    ClassifierMeta,
    TrainConfig,
    TrainedClassifier,
    build_mlp,
    l2_rows,
    not_enough_labels,
    sample_random_negatives,
    train_classifier,
)

log = logging.getLogger(__name__)

FAMILIES = ("mlp", "linear", "ensemble", "kernel", "mlp+kernel")
CV_CANDIDATES = ("mlp", "linear", "ensemble")


@dataclass(frozen=True)
class ModelChoiceConfig:
    """How a round picks its family (defaults: see the README's model-choice tables)."""

    candidates: tuple[str, ...] = CV_CANDIDATES
    folds: int = 4
    min_pos_for_cv: int = 6
    fallback: str = "linear"
    ridge_l2: float = 0.3
    # the kernel families' similarity threshold (cosine of unit vectors; screen on emoji-mix);
    # None: the ``kernel_quantile`` quantile of the cosines between random train images and the
    # rated ones (measured worse on emoji-mix: README)
    kernel_tau: float | None = 0.7
    kernel_quantile: float = 0.99
    # how two candidates are chosen between: "cv" (k-fold AUC-PR) or "agreement" (the first
    # candidate unless the near-duplicate agreement of the labels is below agreement_min, see
    # near_duplicate_agreement; agreement_pairs close positives needed to decide against it)
    rule: str = "cv"
    agreement_min: float = 0.75
    agreement_pairs: int = 1
    cv_random: int = 3000
    workers: int = 2
    seed: int = 0
    # the MLP candidates' Adam learning rate (None: the TrainConfig's, the paper's 1e-4)
    mlp_lr: float | None = 1e-3
    # why a single candidate was set (recorded as the choice's reason; see reuse_choice)
    reason: str = ""

    def __post_init__(self) -> None:
        bad = [c for c in (*self.candidates, self.fallback) if c not in FAMILIES]
        if bad or not self.candidates:
            raise ValueError(f"unknown model families {bad}: use {', '.join(FAMILIES)}")
        if self.folds < 2:
            raise ValueError("folds must be at least 2")
        if self.kernel_tau is not None and not 0.0 <= self.kernel_tau < 1.0:
            raise ValueError("kernel_tau must be in [0, 1)")
        if not 0.0 < self.kernel_quantile < 1.0:
            raise ValueError("kernel_quantile must be in (0, 1)")
        if self.rule not in ("cv", "agreement"):
            raise ValueError(f"unknown choice rule {self.rule!r}: use cv or agreement")
        if self.rule == "agreement" and len(self.candidates) != 2:
            raise ValueError("the agreement rule chooses between exactly two candidates")

    @property
    def cross_validates(self) -> bool:
        return len(self.candidates) > 1 and self.rule == "cv"

    @property
    def chooses(self) -> bool:
        return len(self.candidates) > 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["candidates"] = list(self.candidates)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelChoiceConfig":
        known = set(cls.__dataclass_fields__)
        kw = {k: v for k, v in d.items() if k in known}
        if "candidates" in kw:
            kw["candidates"] = tuple(kw["candidates"])
        return cls(**kw)


PAPER = ModelChoiceConfig(candidates=("mlp",), fallback="mlp", mlp_lr=None)
"""The paper's recipe exactly: its MLP (learning rate 1e-4) every round, no cross-validation."""


def choice_for(family: str, *, seed: int = 0) -> ModelChoiceConfig:
    """The :class:`ModelChoiceConfig` of a ``model_family`` setting: ``auto`` (the default)
    chooses the kernel machine or the MLP by :func:`near_duplicate_agreement`; ``cv``
    cross-validates :data:`CV_CANDIDATES`; a family name trains that family every round;
    ``paper`` is the paper's recipe exactly (its MLP with its learning rate)."""
    if family == "auto":
        return ModelChoiceConfig(candidates=("kernel", "mlp"), fallback="kernel", rule="agreement", seed=seed)
    if family == "cv":
        return ModelChoiceConfig(seed=seed)
    if family == "paper":
        return replace(PAPER, seed=seed)
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}: use auto, {', '.join(FAMILIES)}")
    return ModelChoiceConfig(candidates=(family,), fallback=family, seed=seed)


def reuse_choice(choice: ModelChoiceConfig, previous: dict[str, Any] | None) -> ModelChoiceConfig:
    """``choice`` without its cross-validation when an earlier round of the concept already
    cross-validated (``previous``: that round's ``model_choice`` record): its family, trained
    the same way. A lookahead round uses this (the app starts it while the rater finishes the
    batch, and the rater may be waiting for it); the follow-up round on the batch's full labels
    cross-validates again. Anything else (no earlier cross-validated choice, a fixed family)
    returns ``choice`` unchanged."""
    if not choice.cross_validates or not previous or not previous.get("folds"):
        return choice
    family = str(previous.get("family", ""))
    if family not in choice.candidates:
        return choice
    return replace(choice, candidates=(family,), fallback=family,
                   reason="the last cross-validated choice (a lookahead round does not cross-validate)")


@dataclass
class ChoiceReport:
    """What the cross-validation saw and chose (kept in the model's meta, MLflow and Dagster)."""

    family: str
    reason: str
    cv_auc_pr: dict[str, float]
    folds: int
    seconds: float
    # the agreement rule's evidence (near_duplicate_agreement); None / 0 under cross-validation
    agreement: float | None = None
    close_positives: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- ridge logistic regression ----------------------------------------------------------------
def recipe_weights(y: np.ndarray, n_random: int, *, frac_pos: float = 0.5, frac_neg: float = 0.25,
                   frac_random: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """Per-row weights of the labelled rows and of the random negatives.

    Positives share ``frac_pos`` of the mass, labelled negatives ``frac_neg``, random negatives
    ``frac_random`` (a missing source hands its share to the other negatives); the total mass is
    ``len(y)`` (at least 1).
    """
    y = np.asarray(y)
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    fn = frac_neg if n_neg else 0.0
    fr = frac_random if n_random else 0.0
    if not n_neg:
        fr += frac_neg if n_random else 0.0
    if not n_random:
        fn += frac_random if n_neg else 0.0
    fp = frac_pos if n_pos else 0.0
    total = fp + fn + fr
    if total <= 0:
        return np.zeros(len(y)), np.zeros(n_random)
    mass = float(max(1, len(y)))
    lab = np.where(y == 1, mass * fp / total / max(n_pos, 1), mass * fn / total / max(n_neg, 1))
    rand = np.full(n_random, mass * fr / total / max(n_random, 1))
    return lab.astype(np.float64), rand


def fit_ridge_logistic(X_lab_unit: np.ndarray, y: np.ndarray, X_rand_unit: np.ndarray,
                       *, l2: float) -> tuple[np.ndarray, float]:
    """``(w, b)`` of ``σ(w·x̂ + b)`` on unit rows: labelled rows plus random negatives, weighted
    by :func:`recipe_weights`, ridge ``½ l2 ‖w‖²`` (the intercept is not penalised)."""
    from sklearn.linear_model import LogisticRegression

    w_lab, w_rand = recipe_weights(y, len(X_rand_unit))
    X = np.concatenate([X_lab_unit, X_rand_unit]).astype(np.float64)
    t = np.concatenate([np.asarray(y, np.int64), np.zeros(len(X_rand_unit), np.int64)])
    lr = LogisticRegression(C=1.0 / l2, solver="lbfgs", max_iter=300)
    lr.fit(X, t, sample_weight=np.concatenate([w_lab, w_rand]))
    return lr.coef_[0].astype(np.float32), float(lr.intercept_[0])


@dataclass
class KernelModel:
    """``σ(w·x̂ + Σᵢ vᵢ relu(uᵢ·x̂ - τ) / (1 - τ) + b)`` over the labelled unit rows ``U``."""

    U: np.ndarray
    tau: float
    w: np.ndarray
    v: np.ndarray
    b: float

    def logits(self, X_unit: np.ndarray) -> np.ndarray:
        return kernel_features(X_unit, self.U, self.tau) @ np.concatenate([self.w, self.v]).astype(np.float64) + self.b


def kernel_features(X_unit: np.ndarray, U: np.ndarray, tau: float) -> np.ndarray:
    """``[x̂, relu(x̂·uᵢ - τ) / (1 - τ) for every row uᵢ of U]`` of every unit row."""
    sims = np.asarray(X_unit, np.float32) @ np.asarray(U, np.float32).T
    return np.concatenate([X_unit, np.maximum(sims - tau, 0.0) / (1.0 - tau)], axis=1)


def kernel_threshold(X_rand_unit: np.ndarray, U: np.ndarray, quantile: float) -> float:
    """The kernel's τ for a corpus: the ``quantile`` quantile of the cosines between random train
    images and the rated ones, so that a unit fires only on images closer to its rated image
    than almost any random one (a near-duplicate), however similar the corpus is overall. Kept
    in [0, 0.95]; 0.7 without random rows."""
    if not len(X_rand_unit) or not len(U):
        return 0.7
    sims = np.asarray(X_rand_unit, np.float32) @ np.asarray(U, np.float32).T
    return float(np.clip(np.quantile(sims, quantile), 0.0, 0.95))


def fit_kernel_logistic(X_lab_unit: np.ndarray, y: np.ndarray, X_rand_unit: np.ndarray,
                        *, l2: float, tau: float | None, quantile: float = 0.99) -> KernelModel:
    """The ``kernel`` family: :func:`fit_ridge_logistic` on :func:`kernel_features` with the
    labelled rows as the kernel's centres (``tau`` None: :func:`kernel_threshold`)."""
    U = np.asarray(X_lab_unit, np.float32)
    if tau is None:
        tau = kernel_threshold(X_rand_unit, U, quantile)
    coef, b = fit_ridge_logistic(kernel_features(U, U, tau), y, kernel_features(X_rand_unit, U, tau), l2=l2)
    d = U.shape[1]
    return KernelModel(U=U, tau=float(tau), w=coef[:d], v=coef[d:], b=b)


def kernel_classifier(km: KernelModel, meta: ClassifierMeta) -> TrainedClassifier:
    """:class:`KernelModel` as one MLP with an exact logit: a hidden unit per labelled image
    (weights ``uᵢ``, bias ``-τ``, output weight ``vᵢ / (1 - τ)``) and two that carry ``±w·x̂``
    through the ReLU (output weights ``+1``, ``-1``)."""
    L, d = km.U.shape
    with torch.random.fork_rng(devices=[]):
        module = build_mlp(d, (L + 2,), 0.0, l2_input=True)
    first, last = module[0], module[-1]
    assert isinstance(first, nn.Linear) and isinstance(last, nn.Linear)
    w = torch.from_numpy(np.asarray(km.w, np.float32))
    with torch.no_grad():
        first.weight[:L] = torch.from_numpy(np.asarray(km.U, np.float32))
        first.bias[:L] = -km.tau
        first.weight[L], first.weight[L + 1] = w, -w
        first.bias[L:] = 0.0
        last.weight.zero_()
        last.weight[0, :L] = torch.from_numpy(np.asarray(km.v, np.float32) / (1.0 - km.tau))
        last.weight[0, L], last.weight[0, L + 1] = 1.0, -1.0
        last.bias.fill_(float(km.b))
    module.eval()
    return TrainedClassifier(module=module, meta=replace(meta, hidden=(L + 2,), config={
        **meta.config, "dropout": 0.0, "kernel_tau": km.tau}))


def linear_classifier(w: np.ndarray, b: float, meta: ClassifierMeta) -> TrainedClassifier:
    """``σ(w·x̂ + b)`` as a :class:`TrainedClassifier` (no hidden layer, L2-normalising input)."""
    d = int(w.shape[0])
    with torch.random.fork_rng(devices=[]):
        module = build_mlp(d, (), 0.0, l2_input=True)
    with torch.no_grad():
        module[0].weight.copy_(torch.from_numpy(np.asarray(w, np.float32)).unsqueeze(0))
        module[0].bias.fill_(float(b))
    module.eval()
    return TrainedClassifier(module=module, meta=replace(meta, hidden=()))


def fold_ensemble(mlp: TrainedClassifier, w: np.ndarray, b: float) -> TrainedClassifier:
    """One MLP whose logit is exactly ``½ (mlp logit + w·x̂ + b)``: :func:`fold_units` with two
    units ``relu(±w·x̂)`` (their difference is ``w·x̂``)."""
    w = np.asarray(w, np.float32)
    return fold_units(mlp, np.stack([w, -w]), np.zeros(2, np.float32), np.array([0.5, -0.5]),
                      mlp_weight=0.5, bias=0.5 * b)


def fold_mlp_kernel(mlp: TrainedClassifier, km: KernelModel) -> TrainedClassifier:
    """One MLP whose logit is exactly ``½ (mlp logit + kernel logit)`` (the ``mlp+kernel``
    family): the kernel machine's units (:func:`kernel_classifier`) beside the MLP's."""
    U = np.asarray(km.U, np.float32)
    w = np.asarray(km.w, np.float32)
    W = np.concatenate([U, w[None], -w[None]])
    bias = np.concatenate([np.full(len(U), -km.tau, np.float32), np.zeros(2, np.float32)])
    v = np.concatenate([np.asarray(km.v, np.float64) / (1.0 - km.tau), [1.0, -1.0]])
    folded = fold_units(mlp, W, bias, 0.5 * v, mlp_weight=0.5, bias=0.5 * km.b)
    folded.meta = replace(folded.meta, config={**folded.meta.config, "kernel_tau": km.tau})
    return folded


def fold_units(mlp: TrainedClassifier, W: np.ndarray, b_units: np.ndarray, v: np.ndarray, *,
               mlp_weight: float, bias: float) -> TrainedClassifier:
    """One MLP whose logit is exactly ``mlp_weight · (mlp logit) + Σⱼ vⱼ relu(Wⱼ·x̂ + bⱼ) + bias``.

    The first layer gains the rows ``W`` (bias ``b_units``). With one hidden layer the output
    layer weighs them by ``v``; with more, the second layer sums them into two non-negative units
    (``Σ vⱼ⁺ hⱼ`` and ``Σ vⱼ⁻ hⱼ``), every further layer passes those on through an identity block
    (a ReLU of a non-negative value is the value) and the output adds their difference. So extra
    units cost one wide first layer, not a wide network. Dropout is inactive at inference.
    """
    if not mlp.meta.hidden:
        raise ValueError("folding needs an MLP with at least one hidden layer")
    W = np.asarray(W, np.float32)
    v = np.asarray(v, np.float64)
    m = W.shape[0]
    linears = [layer for layer in mlp.module if isinstance(layer, nn.Linear)]
    one_layer = len(mlp.meta.hidden) == 1
    hidden = (mlp.meta.hidden[0] + m, *(h + 2 for h in mlp.meta.hidden[1:]))
    dropout = float(mlp.meta.config.get("dropout", 0.5))
    l2 = mlp.meta.config.get("input_norm", "none") == "l2"
    with torch.random.fork_rng(devices=[]):
        module = build_mlp(mlp.meta.input_dim, hidden, dropout, l2_input=l2)
    new = [layer for layer in module if isinstance(layer, nn.Linear)]
    pos = torch.from_numpy(np.maximum(v, 0.0).astype(np.float32))
    neg = torch.from_numpy(np.maximum(-v, 0.0).astype(np.float32))
    with torch.no_grad():
        for i, (src, dst) in enumerate(zip(linears, new, strict=True)):
            dst.weight.zero_()
            dst.bias.zero_()
            h_in, h_out = src.in_features, src.out_features
            if i == len(linears) - 1:  # output
                dst.weight[:, :h_in] = mlp_weight * src.weight
                dst.bias.copy_(mlp_weight * src.bias + bias)
                if one_layer:
                    dst.weight[0, h_in:] = torch.from_numpy(v.astype(np.float32))
                else:
                    dst.weight[0, h_in], dst.weight[0, h_in + 1] = 1.0, -1.0
                continue
            dst.weight[:h_out, :h_in] = src.weight
            dst.bias[:h_out] = src.bias
            if i == 0:
                dst.weight[h_out:] = torch.from_numpy(W)
                dst.bias[h_out:] = torch.from_numpy(np.asarray(b_units, np.float32))
            elif i == 1:
                dst.weight[h_out, h_in:], dst.weight[h_out + 1, h_in:] = pos, neg
            else:
                dst.weight[h_out, h_in] = dst.weight[h_out + 1, h_in + 1] = 1.0
    module.eval()
    return TrainedClassifier(module=module, meta=replace(mlp.meta, hidden=hidden))


# ---- the agreement rule ------------------------------------------------------------------------
def near_duplicate_agreement(X_lab_unit: np.ndarray, y: np.ndarray, *, tau: float) -> tuple[float | None, int]:
    """Whether the ratings are smooth at the scale of near-duplicates: of the rated positives
    whose most similar other rated image has cosine ≥ ``tau``, the fraction whose that image is
    positive too (None without any), and how many such positives there are.

    A kernel machine on the rated images scores an image by its near-duplicates among them, so it
    pays where they share labels (the same emoji in another art set: 0.9 on emoji-mix) and hurts
    where the closest rated image of a positive is usually a negative (a mirrored letter, a
    lookalike glyph: 0.14–0.5 on the unseen glyphs); see the README's tables."""
    y = np.asarray(y).reshape(-1)
    pos = np.flatnonzero(y == 1)
    if pos.size == 0 or len(y) < 2:
        return None, 0
    sims = np.asarray(X_lab_unit[pos], np.float32) @ np.asarray(X_lab_unit, np.float32).T
    sims[np.arange(pos.size), pos] = -np.inf
    nearest = sims.argmax(axis=1)
    close = sims[np.arange(pos.size), nearest] >= tau
    if not close.any():
        return None, 0
    return float((y[nearest[close]] == 1).mean()), int(close.sum())


# ---- cross-validation -------------------------------------------------------------------------
def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def _stratified_folds(y: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Fold number of every label: each class dealt round-robin in a random order."""
    fold = np.empty(len(y), np.int64)
    for cls in (0, 1):
        idx = np.flatnonzero(y == cls)
        fold[rng.permutation(idx)] = np.arange(idx.size) % k
    return fold


def cross_validate(
    X_lab_unit: np.ndarray, y: np.ndarray, X_rand_unit: np.ndarray, *, round_index: int,
    train: TrainConfig, choice: ModelChoiceConfig,
) -> dict[str, float]:
    """Mean weighted AUC-PR over ``choice.folds`` folds of every family in ``choice.candidates``."""
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(choice.seed)
    k = choice.folds
    fold = _stratified_folds(y, k, rng)
    rfold = rng.permutation(len(X_rand_unit)) % k
    need_mlp = any(c in ("mlp", "ensemble", "mlp+kernel") for c in choice.candidates)
    need_lin = any(c in ("linear", "ensemble") for c in choice.candidates)
    need_kernel = any(c in ("kernel", "mlp+kernel") for c in choice.candidates)

    def one(f: int) -> dict[str, float]:
        tr, te = fold != f, fold == f
        rtr, rte = rfold != f, rfold == f
        X_te = np.concatenate([X_lab_unit[te], X_rand_unit[rte]])
        y_te = np.concatenate([y[te], np.zeros(int(rte.sum()), np.int64)])
        w_te = np.concatenate(recipe_weights(y[te], int(rte.sum())))
        logits: dict[str, np.ndarray] = {}
        if need_mlp:
            cfg = replace(train, random_negatives=int(rtr.sum()), seed=train.seed + f, num_threads=None)
            m = train_classifier(X_lab_unit[tr], y[tr], X_rand_unit[rtr], round_index=round_index, config=cfg)
            logits["mlp"] = _logit(m.predict_proba(X_te))
        if need_lin:
            w, b = fit_ridge_logistic(X_lab_unit[tr], y[tr], X_rand_unit[rtr], l2=choice.ridge_l2)
            logits["linear"] = X_te @ w.astype(np.float64) + b
        if need_mlp and need_lin:
            logits["ensemble"] = 0.5 * (logits["mlp"] + logits["linear"])
        if need_kernel:
            km = fit_kernel_logistic(X_lab_unit[tr], y[tr], X_rand_unit[rtr], l2=choice.ridge_l2,
                                     tau=choice.kernel_tau, quantile=choice.kernel_quantile)
            logits["kernel"] = km.logits(X_te)
        if need_mlp and need_kernel:
            logits["mlp+kernel"] = 0.5 * (logits["mlp"] + logits["kernel"])
        return {c: float(average_precision_score(y_te, logits[c], sample_weight=w_te))
                for c in choice.candidates}

    # one fold per core; every training draws from its own generator, so each is deterministic,
    # and torch's intra-op threads are set once for all of them
    with torch_threads(train.num_threads), ThreadPoolExecutor(max(1, min(choice.workers, k))) as pool:
        per_fold = list(pool.map(one, range(k)))
    return {c: float(np.mean([s[c] for s in per_fold])) for c in choice.candidates}


def kernel_random_rows(choice: ModelChoiceConfig, n_pool: int, exclude: np.ndarray | None) -> np.ndarray:
    """The unlabelled train rows (sorted) a round's kernel machine, linear model and
    cross-validation take as random negatives: ``choice.cv_random`` of them, seeded by
    ``choice.seed``, none in ``exclude`` (the labelled rows)."""
    return np.sort(sample_random_negatives(np.random.default_rng(choice.seed), n_pool, choice.cv_random, exclude))


def train_round_model(
    X_labeled: np.ndarray,
    y: np.ndarray,
    X_pool: np.ndarray,
    *,
    round_index: int,
    config: TrainConfig = TrainConfig(),
    choice: ModelChoiceConfig = ModelChoiceConfig(),
    exclude_from_pool: np.ndarray | None = None,
    concept: str | None = None,
) -> TrainedClassifier:
    """A round's classifier: the family ``choice`` picks (see the module docstring), trained on
    every label. Arguments and errors as :func:`~agile_pipeline.lib.training.train_classifier`;
    ``round_index`` is the architecture round (0: the recipe's first, smaller MLP)."""
    t0 = time.perf_counter()
    if choice.mlp_lr is not None:
        config = replace(config, lr=choice.mlp_lr)
    y = np.asarray(y).reshape(-1).astype(np.int64)
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    scores: dict[str, float] = {}
    X_lab_unit = l2_rows(np.asarray(X_labeled, np.float32)) if len(y) else np.empty((0, X_pool.shape[1]), np.float32)
    agreement: float | None = None
    close = 0
    if not choice.chooses:
        family, reason = choice.candidates[0], choice.reason or "only candidate"
    elif choice.rule == "agreement":
        agreement, close = near_duplicate_agreement(
            X_lab_unit, y, tau=0.7 if choice.kernel_tau is None else choice.kernel_tau)
        first, second = choice.candidates
        if agreement is None or close < choice.agreement_pairs:
            family = first
            reason = (f"near-duplicate agreement: {close} rated positives have a near-duplicate among "
                      f"the ratings, too few to decide against the {first}")
        else:
            family = first if agreement >= choice.agreement_min else second
            reason = (f"near-duplicate agreement {agreement:.2f}: of the {close} rated positives with a "
                      f"near-duplicate among the ratings, {agreement:.0%} have a positive one "
                      f"({'≥' if family == first else '<'} {choice.agreement_min:.0%})")
    elif min(n_pos, n_neg) < choice.min_pos_for_cv:
        family = choice.fallback
        reason = (f"{n_pos} positive and {n_neg} negative labels: fewer than {choice.min_pos_for_cv} of a "
                  f"class to cross-validate, so the fallback ({choice.fallback})")
    else:
        family, reason = "", ""
    need_rand = family != "mlp"
    X_rand_unit = np.empty((0, X_pool.shape[1]), np.float32)
    if need_rand:
        idx = kernel_random_rows(choice, X_pool.shape[0], exclude_from_pool)
        X_rand_unit = l2_rows(np.asarray(X_pool[idx], np.float32))
    if not family:
        scores = cross_validate(X_lab_unit, y, X_rand_unit, round_index=round_index, train=config, choice=choice)
        family = max(choice.candidates, key=lambda c: (scores[c], -choice.candidates.index(c)))
        reason = f"highest {choice.folds}-fold AUC-PR"
    cv_seconds = time.perf_counter() - t0

    if n_pos == 0:  # the same refusal, whatever the family
        raise not_enough_labels("positive", concept)

    def fit_mlp() -> TrainedClassifier:
        return train_classifier(X_labeled, y, X_pool, round_index=round_index,
                                config=replace(config, num_threads=None),
                                exclude_from_pool=exclude_from_pool, concept=concept)

    def fit_linear() -> tuple[np.ndarray, float]:
        return fit_ridge_logistic(X_lab_unit, y, X_rand_unit, l2=choice.ridge_l2)

    def fit_kernel() -> KernelModel:
        return fit_kernel_logistic(X_lab_unit, y, X_rand_unit, l2=choice.ridge_l2, tau=choice.kernel_tau,
                                   quantile=choice.kernel_quantile)

    with torch_threads(config.num_threads), ThreadPoolExecutor(max(1, min(choice.workers, 2))) as pool:
        mlp_job = pool.submit(fit_mlp) if family in ("mlp", "ensemble", "mlp+kernel") else None
        lin_job = pool.submit(fit_linear) if family in ("linear", "ensemble") else None
        kernel_job = pool.submit(fit_kernel) if family in ("kernel", "mlp+kernel") else None
        mlp = mlp_job.result() if mlp_job else None
        lin = lin_job.result() if lin_job else None
        km = kernel_job.result() if kernel_job else None
    meta = ClassifierMeta(input_dim=int(X_lab_unit.shape[1]), hidden=(), n_pos=n_pos, n_neg=n_neg,
                          n_random_neg=len(X_rand_unit), train_seconds=0.0,
                          round_index=int(round_index), config=config.to_dict())
    if km is not None:
        model = kernel_classifier(km, meta) if mlp is None else fold_mlp_kernel(mlp, km)
    elif mlp is not None and lin is not None:
        model = fold_ensemble(mlp, *lin)
    elif lin is not None:
        model = linear_classifier(*lin, meta)
    else:
        assert mlp is not None
        model = mlp
    seconds = time.perf_counter() - t0
    report = ChoiceReport(family=family, reason=reason, cv_auc_pr={k: round(v, 4) for k, v in scores.items()},
                          folds=choice.folds if scores else 0, seconds=round(cv_seconds, 3),
                          agreement=None if agreement is None else round(agreement, 4), close_positives=close)
    model.meta = replace(model.meta, train_seconds=round(seconds, 4), config={
        **model.meta.config, "input_norm": "l2", "family": family, "model_choice": report.to_dict(),
        "ridge_l2": choice.ridge_l2})
    log.info("%s%s chosen (%s) in %.2fs; CV AUC-PR %s", f"{concept}: " if concept else "", family,
             reason, seconds, report.cv_auc_pr or "—")
    return model


def family_of(meta: ClassifierMeta) -> str:
    """The family of a saved model (models from before the choice existed are MLPs)."""
    return str(meta.config.get("family", "mlp"))


def refit_with_positives(
    model: TrainedClassifier,
    X_labeled: np.ndarray,
    y: np.ndarray,
    X_pool: np.ndarray,
    extra_rows: np.ndarray,
    *,
    round_index: int,
    config: TrainConfig = TrainConfig(),
    exclude_from_pool: np.ndarray | None = None,
    concept: str | None = None,
    choice: ModelChoiceConfig | None = None,
) -> TrainedClassifier:
    """``model``'s family trained again with the pool rows ``extra_rows`` added as positives
    (graph positives: :func:`~agile_pipeline.lib.propagation.pseudo_positives`) and kept out of
    its random negatives, with the settings of the ``choice`` that trained it (narrowed to that
    family). The model file records how many (``graph_positives``), the original choice's
    report, and the rated counts as ``n_pos``/``n_neg``."""
    extra_rows = np.asarray(extra_rows, np.int64)
    if not len(extra_rows):
        return model
    family = family_of(model.meta)
    y = np.asarray(y).reshape(-1).astype(np.int64)
    exclude = np.asarray(exclude_from_pool if exclude_from_pool is not None else [], np.int64)
    refit = train_round_model(
        np.concatenate([np.asarray(X_labeled, np.float32), np.asarray(X_pool[extra_rows], np.float32)]),
        np.concatenate([y, np.ones(len(extra_rows), np.int64)]), X_pool, round_index=round_index,
        config=config, choice=replace(choice or choice_for(family, seed=config.seed), candidates=(family,),
                                      fallback=family, rule="cv", reason="graph positives added"),
        exclude_from_pool=np.concatenate([exclude, extra_rows]), concept=concept)
    refit.meta = replace(refit.meta, n_pos=model.meta.n_pos, n_neg=model.meta.n_neg,
                         train_seconds=round(model.meta.train_seconds + refit.meta.train_seconds, 4),
                         config={**refit.meta.config, "model_choice": model.meta.config.get("model_choice"),
                                 "graph_positives": len(extra_rows)})
    return refit
