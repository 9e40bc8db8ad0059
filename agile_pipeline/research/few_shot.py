"""Few-positive training: use the phrases, the zero-shot direction and the labels together.

With a handful of positives the paper's MLP (:mod:`agile_pipeline.lib.training`) barely leaves
its initialisation. :func:`fit_prior_linear` fits instead a logistic regression on L2-normalised
embeddings whose weights have a Gaussian prior centred on the *zero-shot direction*:

    logit(x) = w · x̂ + b,    minimise  Σᵢ ωᵢ · BCE(yᵢ, logit(xᵢ)) + ½ λ ‖w − w₀‖²
    w₀ = s · (t̂ / σₜ − ρ · n̂ / σₙ)

where ``t̂`` is the mean of the positive phrases' text vectors (unit), ``n̂`` the mean of the
negative phrases' (hard-negative direction), ``σ`` the spread of each direction's cosine over
the pool (so ``s`` is in logit units, whatever the embedding), ``ρ`` the weight of the negative
phrases. With no labels the model *is* the zero-shot score (minus the negative phrases); as
labels accumulate the data term outweighs the prior and the weights move away from it — the
prior fades by itself, no schedule needed. Row weights ``ωᵢ`` follow the paper's batch mix:
half the mass on labeled positives, a quarter on labeled negatives, a quarter on random pool
images taken as negatives; the total mass is the number of labels.

The result is linear in ``x̂``, so :meth:`LinearModel.to_classifier` turns it into the
project's :class:`~agile_pipeline.lib.training.TrainedClassifier` (an MLP with no hidden layer
and an L2-normalising input layer): it saves, loads and scores like any round's model.

:func:`phrase_pseudo_labels` is the other way to feed phrases to any trainer: the phrase
vectors themselves as extra labeled points (positive phrases positive, negative phrases
negative). :func:`decayed_prior_weight` is the weight for a zero-shot prior blended after
training that decays with the number of positives.
"""

from dataclasses import dataclass

import numpy as np

from agile_pipeline.lib.model_choice import recipe_weights as recipe_weights


@dataclass(frozen=True)
class PriorLinearConfig:
    """Hyper-parameters of :func:`fit_prior_linear` (defaults chosen on the demo corpus)."""

    l2: float = 1.0  # λ: strength of the pull towards w₀
    prior_strength: float = 2.0  # s: logit spread of the prior direction over the pool
    negative_weight: float = 0.5  # ρ: weight of the negative-phrase direction in w₀
    # "fixed": w = v + w₀ (the prior's scale is imposed); "feature": w = v + a·w₀ with a learned
    # (pulled towards 1 by ½·prior_l2·(a − 1)²), so the labels decide how far to trust the text
    prior_mode: str = "fixed"
    prior_l2: float = 1.0
    random_negatives: int = 4000
    frac_pos: float = 0.5
    frac_neg: float = 0.25
    frac_random: float = 0.25
    max_iter: int = 200
    seed: int = 0


@dataclass
class LinearModel:
    """``P(positive | x) = σ(w · x/‖x‖ + b)``."""

    w: np.ndarray
    b: float
    n_pos: int = 0
    n_neg: int = 0
    n_random_neg: int = 0

    def decision(self, X: np.ndarray, *, batch: int = 262144) -> np.ndarray:
        """The logit for every row of ``X`` (any float dtype; computed in chunks)."""
        out = np.empty(X.shape[0], dtype=np.float32)
        w = self.w.astype(np.float32)
        for s in range(0, X.shape[0], batch):
            c = np.asarray(X[s : s + batch], dtype=np.float32)
            norms = np.maximum(np.linalg.norm(c, axis=1), 1e-12)
            out[s : s + len(c)] = (c @ w) / norms + self.b
        return out

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        z = self.decision(X)
        return (1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))).astype(np.float32)

    def to_classifier(self, *, round_index: int = 0, config: dict | None = None):  # type: ignore[no-untyped-def]
        """The same model as a :class:`TrainedClassifier` (no hidden layer, L2 input)."""
        from agile_pipeline.lib.model_choice import linear_classifier
        from agile_pipeline.lib.training import ClassifierMeta

        meta = ClassifierMeta(
            input_dim=int(self.w.shape[0]), hidden=(), n_pos=self.n_pos, n_neg=self.n_neg,
            n_random_neg=self.n_random_neg, train_seconds=0.0, round_index=round_index,
            config={"input_norm": "l2", "dropout": 0.0, "kind": "prior-linear", **(config or {})},
        )
        return linear_classifier(self.w, self.b, meta)


def unit_rows(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), float64."""
    X = np.asarray(X, dtype=np.float64)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def mean_direction(vectors: np.ndarray | None) -> np.ndarray | None:
    """Unit mean of the unit rows of ``vectors`` (``None`` for no rows)."""
    if vectors is None or len(vectors) == 0:
        return None
    m = unit_rows(np.atleast_2d(vectors)).mean(axis=0)
    n = np.linalg.norm(m)
    return m / n if n > 0 else None


def prior_weights(pool_unit: np.ndarray, text_pos: np.ndarray | None, text_neg: np.ndarray | None,
                  *, strength: float, negative_weight: float) -> np.ndarray:
    """w₀ (see the module docstring); zeros when there is no phrase or ``strength`` is 0."""
    d = pool_unit.shape[1]
    w0 = np.zeros(d)
    if strength <= 0:
        return w0
    for direction, sign in ((mean_direction(text_pos), 1.0), (mean_direction(text_neg), -negative_weight)):
        if direction is None or sign == 0:
            continue
        spread = float(np.std(pool_unit @ direction)) if len(pool_unit) > 1 else 1.0
        w0 += sign * strength * direction / max(spread, 1e-6)
    return w0


def _sample_pool(rng: np.random.Generator, n_pool: int, k: int, exclude: np.ndarray | None) -> np.ndarray:
    mask = np.zeros(n_pool, dtype=bool)
    if exclude is not None and len(exclude):
        ex = np.asarray(exclude)
        if ex.dtype == np.bool_:
            mask |= ex
        else:
            mask[ex.astype(np.int64)] = True
    eligible = np.flatnonzero(~mask)
    if eligible.size <= k:
        return eligible
    return np.sort(rng.choice(eligible, size=k, replace=False))


def fit_prior_linear(
    X_labeled: np.ndarray,
    y: np.ndarray,
    X_pool: np.ndarray,
    *,
    text_pos: np.ndarray | None = None,
    text_neg: np.ndarray | None = None,
    exclude_from_pool: np.ndarray | None = None,
    config: PriorLinearConfig = PriorLinearConfig(),
) -> LinearModel:
    """Logistic regression with a zero-shot (and negative-phrase) prior on the weights.

    Args:
        X_labeled: ``(n, d)`` embeddings of the rated images.
        y: ``(n,)`` labels 0/1 (may be all 0, or empty: then the model is the prior).
        X_pool: ``(N, d)`` unlabeled train embeddings; ``random_negatives`` rows are drawn as
            negatives (never rows in ``exclude_from_pool``) and set the prior's scale.
        text_pos / text_neg: ``(k, d)`` text vectors of the positive / negative phrases.
    """
    from scipy.optimize import minimize

    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    X_lab = unit_rows(np.asarray(X_labeled).reshape(len(y), -1)) if len(y) else np.empty((0, X_pool.shape[1]))
    rng = np.random.default_rng(config.seed)
    rand_idx = _sample_pool(rng, X_pool.shape[0], config.random_negatives, exclude_from_pool)
    X_rand = unit_rows(np.asarray(X_pool[rand_idx])) if rand_idx.size else np.empty((0, X_lab.shape[1]))
    w0 = prior_weights(X_rand if len(X_rand) > 1 else X_lab, text_pos, text_neg,
                       strength=config.prior_strength, negative_weight=config.negative_weight)
    w_lab, w_rand = recipe_weights(y, len(X_rand), frac_pos=config.frac_pos, frac_neg=config.frac_neg,
                                frac_random=config.frac_random)
    X = np.concatenate([X_lab, X_rand])
    t = np.concatenate([y, np.zeros(len(X_rand))])
    om = np.concatenate([w_lab, w_rand])
    offset = X @ w0
    lam = config.l2
    if config.prior_mode not in ("fixed", "feature"):
        raise ValueError(f"prior_mode must be 'fixed' or 'feature', got {config.prior_mode!r}")
    learn_a = config.prior_mode == "feature" and bool(np.any(w0))
    d = X.shape[1]

    def f(theta: np.ndarray) -> tuple[float, np.ndarray]:
        v, a, b = theta[:d], (theta[d + 1] if learn_a else 1.0), theta[d]
        z = X @ v + a * offset + b
        # BCE with logits, stable: softplus(z) - t z
        loss = np.logaddexp(0.0, z) - t * z
        p = 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))
        g = om * (p - t)
        val = float(om @ loss) + 0.5 * lam * float(v @ v)
        grad = [X.T @ g + lam * v, [g.sum()]]
        if learn_a:
            val += 0.5 * config.prior_l2 * (a - 1.0) ** 2
            grad.append([float(g @ offset) + config.prior_l2 * (a - 1.0)])
        return val, np.concatenate(grad)

    theta = np.zeros(d + 2 if learn_a else d + 1)
    if learn_a:
        theta[d + 1] = 1.0
    if len(X):  # start from the prior itself (v = 0, b = 0, a = 1)
        theta = minimize(f, theta, jac=True, method="L-BFGS-B",
                         options={"maxiter": config.max_iter}).x
    a_fit = float(theta[d + 1]) if learn_a else 1.0
    return LinearModel(w=theta[:d] + a_fit * w0, b=float(theta[d]), n_pos=int((y == 1).sum()),
                       n_neg=int((y == 0).sum()), n_random_neg=len(X_rand))


def phrase_pseudo_labels(text_pos: np.ndarray | None, text_neg: np.ndarray | None,
                         dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Phrase vectors as extra labeled rows: positive phrases 1, negative phrases 0."""
    rows = [np.atleast_2d(a) for a in (text_pos, text_neg) if a is not None and len(a)]
    X = np.concatenate(rows).astype(np.float32) if rows else np.empty((0, dim), np.float32)
    n_pos = 0 if text_pos is None else len(np.atleast_2d(text_pos)) if len(text_pos) else 0
    y = np.concatenate([np.ones(n_pos, np.int64), np.zeros(len(X) - n_pos, np.int64)])
    return X, y


def decayed_prior_weight(c: float, n_pos: int) -> float:
    """β = c / n_pos for a blended zero-shot prior (``c`` when there is no positive)."""
    return float(c) / max(1, int(n_pos))


def blend_logits(p: np.ndarray, prior_unit: np.ndarray, beta: float) -> np.ndarray:
    """σ(logit p + β · logit prior) with both in (0, 1)."""
    eps = 1e-6
    lp = np.log(np.clip(p, eps, 1 - eps) / np.clip(1 - p, eps, 1))
    lz = np.log(np.clip(prior_unit, eps, 1 - eps) / np.clip(1 - prior_unit, eps, 1))
    return (1.0 / (1.0 + np.exp(-(lp + beta * lz)))).astype(np.float32)
