"""The paper's classifier: a small MLP on frozen image embeddings (Appendix C).

Recipe (all defaults of :class:`TrainConfig`, all configurable):

* First model (``round_index == 0``): one hidden layer of 16 units; every later model: three
  hidden layers of 128 units. ReLU, dropout 0.5 after every hidden layer.
* Binary cross-entropy (``BCEWithLogitsLoss``), Adam with lr 1e-4 and weight decay 1e-4,
  10 epochs.
* Up to 500k random rows of the unlabeled train pool are labeled negative.
* Every batch is half labeled positives (upsampled), a quarter labeled negatives and a quarter
  random negatives.

**Epoch length.** The paper does not say how long an epoch is when positives are upsampled and
random negatives outnumber the labels a thousandfold. Here an epoch is

    steps_per_epoch = max(min_steps_per_epoch, ceil(n_pos / pos_per_batch),
                          ceil(n_neg / neg_per_batch))

batches of ``batch_size`` rows (defaults: at least 30 steps of 64 rows = 32 positives + 16
labeled negatives + 16 random negatives). Every labeled example is shown at least once per
epoch: positives and negatives are drawn as back-to-back shuffled passes over the labeled set
(balanced upsampling), and an epoch never has fewer than 30 Adam steps. The random negatives are
one shuffled stream across all epochs, so a run sees as many *distinct* random negatives as it
has random slots (4,800 with the defaults), drawn from the up-to-500k random set. A default run
with up to ~500 labeled negatives is 300 Adam steps; its cost grows with the number of labels,
never with the pool size (~0.6 s CPU for 3x128 at 1280-d, ~0.25 s for the 1x16 first model).

Why 30: with lr 1e-4 the weights move about 1e-4 per Adam step, so what matters is the number of
steps. On a planted-concept benchmark (clustered unit vectors, 1% prevalence, labels drawn from
the text neighbourhood as expansion does; 3 seeds; AP on 20k held-out rows, 1280-d, zero-shot AP
0.39) the pure "show each label once" epoch (~10 steps, 100 in all) barely leaves the
initialisation with 100 labels (AP 0.05–0.12), 10 steps/epoch reaches 0.28–0.59, 30 steps
0.60–0.79, and 100 steps 0.55–0.79 at 3x the time; with 300–500 labels 30 steps give 0.84–0.86
and 100 steps 0.72–0.86 (overfitting starts).

**Inputs.** Rows are L2-normalised inside the model (``input_norm="l2"``, the paper's CLIP/ALIGN
embeddings are unit vectors), so lr 1e-4 means the same whatever scale the embedding backend
produces; for unit-norm inputs this is a no-op. Optional per-feature standardization
(``standardize=True``, mean/std of the random-negative sample) is available but off: it scales
unit-vector coordinates up ~sqrt(d)-fold, which acts like a far larger learning rate and
overfits a few hundred labels (AP 0.34–0.67 vs 0.60–0.86 with the default on the benchmark).
After training, standardization is folded into the first linear layer and the L2 normalisation
is computed inside it (:class:`L2NormLinear`), so the saved model is a plain MLP and inference
makes no extra copy of the input.

**Labels.** Skips never reach this module. ``y`` must hold only 0 and 1. At least one labeled
positive is required (:class:`NotEnoughLabels` otherwise). Without labeled negatives the model
still trains, on positives against random negatives (who take the labeled negatives' quarter),
and says so in ``meta.warnings``; only when there are neither labeled nor random negatives is it
fatal.

**Determinism.** Index sampling uses a NumPy ``Generator`` seeded with ``config.seed``;
initialisation and dropout draw from a ``torch.Generator`` seeded with ``config.seed``, never
torch's global RNG, so the caller's RNG state is untouched and trainings on several threads at
once (the cross-validation of :mod:`agile_pipeline.lib.model_choice`) are each deterministic. Training runs with ``num_threads`` (default 1) intra-op
threads — fastest for these small batches, immune to OpenMP spin-waiting on a busy machine, and
it makes the weights independent of the host's core count. Same inputs + seed → bit-identical
weights.
"""

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from agile_pipeline.lib.torch_runtime import torch_threads

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.pt"
META_FILE = "meta.json"


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters; the defaults are the paper's recipe (Appendix C).

    ``batch_size``, ``min_steps_per_epoch``, ``input_norm``, ``standardize`` and ``num_threads``
    are this implementation's choices for what the paper leaves open (see the module docstring).
    """

    hidden_first: tuple[int, ...] = (16,)
    hidden_later: tuple[int, ...] = (128, 128, 128)
    dropout: float = 0.5
    weight_decay: float = 1e-4
    lr: float = 1e-4
    epochs: int = 10
    batch_size: int = 64
    min_steps_per_epoch: int = 30
    random_negatives: int = 500_000
    frac_pos: float = 0.5
    frac_neg: float = 0.25
    frac_random: float = 0.25
    input_norm: Literal["l2", "none"] = "l2"
    standardize: bool = False
    standardize_sample: int = 20_000
    num_threads: int | None = 1
    seed: int = 0

    def hidden_for(self, round_index: int) -> tuple[int, ...]:
        """Hidden layer sizes for a round: ``hidden_first`` for round 0, else ``hidden_later``."""
        return tuple(self.hidden_first if round_index == 0 else self.hidden_later)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (tuples become lists)."""
        d = asdict(self)
        d["hidden_first"] = list(self.hidden_first)
        d["hidden_later"] = list(self.hidden_later)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Inverse of :meth:`to_dict`; unknown keys are ignored (forward compatibility)."""
        known = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in known}
        for k in ("hidden_first", "hidden_later"):
            if k in kw:
                kw[k] = tuple(int(v) for v in kw[k])
        return cls(**kw)


class NotEnoughLabels(ValueError):
    """The labels cannot train a classifier yet; the message says what to do."""


@dataclass
class ClassifierMeta:
    """What was trained and on what; stored next to the weights as JSON."""

    input_dim: int
    hidden: tuple[int, ...]
    n_pos: int
    n_neg: int
    n_random_neg: int
    train_seconds: float
    round_index: int
    steps_per_epoch: int = 0
    n_random_seen: int = 0
    final_loss: float = float("nan")
    config: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ClassifierMeta":
        """Inverse of :meth:`to_dict`; unknown keys are ignored."""
        known = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in known}
        kw["hidden"] = tuple(int(h) for h in kw["hidden"])
        return cls(**kw)


class L2NormLinear(nn.Linear):
    """``Linear`` applied to the L2-normalised input: ``W (x / |x|) + b``.

    A narrow layer (fewer outputs than inputs: the MLPs' first layers) computes
    ``(x Wᵀ) / |x| + b``, so no normalised copy of a large input chunk is made; a wide one (the
    kernel machine's unit per labelled image, thousands of them) normalises the input and adds
    the bias inside the matrix product, so no pass is made over the far larger output. Zero rows stay zero.
    Same parameters (and state-dict keys) as :class:`torch.nn.Linear`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norms = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12)
        if self.out_features > self.in_features:
            return nn.functional.linear(x / norms, self.weight, self.bias)
        return nn.functional.linear(x, self.weight) / norms + self.bias


def build_mlp(
    input_dim: int, hidden: tuple[int, ...], dropout: float, *, l2_input: bool = False
) -> nn.Sequential:
    """``Linear → ReLU → Dropout`` per hidden layer, then ``Linear(·, 1)`` producing a logit.

    With ``l2_input`` the first layer is an :class:`L2NormLinear`.
    """
    layers: list[nn.Module] = []
    prev = input_dim
    for i, h in enumerate(hidden):
        linear = L2NormLinear(prev, h) if (i == 0 and l2_input) else nn.Linear(prev, h)
        layers += [linear, nn.ReLU(inplace=True), nn.Dropout(dropout)]  # in place: one pass less
        prev = h
    layers.append(L2NormLinear(prev, 1) if (not hidden and l2_input) else nn.Linear(prev, 1))
    return nn.Sequential(*layers)


@dataclass
class TrainedClassifier:
    """A trained MLP (``module`` outputs one logit per row) and its :class:`ClassifierMeta`."""

    module: nn.Sequential
    meta: ClassifierMeta

    def predict_proba(self, X: np.ndarray, *, batch: int = 32768) -> np.ndarray:
        """P(positive) for every row of ``X`` as float32, computed in chunks of ``batch`` rows.

        ``X`` may be float16 or float32 (or a memmap of either); each chunk is converted to
        float32 on the fly, so peak extra memory is one float32 chunk and its hidden layers
        (``batch × (dim + widest layer) × 4`` bytes: 400 MB for the default with a kernel
        machine of 2,000 units). Chunks this size are also faster than larger ones: what a
        chunk allocates is reused while warm instead of being faulted in afresh.
        """
        X = np.asarray(X) if not isinstance(X, np.memmap) else X
        if X.ndim != 2 or X.shape[1] != self.meta.input_dim:
            raise ValueError(
                f"expected an array of shape (n, {self.meta.input_dim}), got {X.shape}"
            )
        n = X.shape[0]
        out = np.empty(n, dtype=np.float32)
        self.module.eval()
        with torch.inference_mode():
            for start in range(0, n, batch):
                chunk = np.ascontiguousarray(X[start : start + batch], dtype=np.float32)
                logits = self.module(torch.from_numpy(chunk)).squeeze(1)
                out[start : start + len(chunk)] = torch.sigmoid(logits).numpy()
        return out

    def save(self, path: Path) -> None:
        """Write ``model.pt`` (state dict) and ``meta.json`` into directory ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        torch.save(self.module.state_dict(), path / WEIGHTS_FILE)
        (path / META_FILE).write_text(json.dumps(self.meta.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: Path) -> "TrainedClassifier":
        """Read a directory written by :meth:`save`."""
        path = Path(path)
        meta = ClassifierMeta.from_dict(json.loads((path / META_FILE).read_text()))
        dropout = float(meta.config.get("dropout", 0.5))
        l2 = meta.config.get("input_norm", "none") == "l2"
        with torch.random.fork_rng(devices=[]):  # initial weights are overwritten anyway
            module = build_mlp(meta.input_dim, meta.hidden, dropout, l2_input=l2)
        state = torch.load(path / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        module.load_state_dict(state)
        module.eval()
        return cls(module=module, meta=meta)


def _batch_counts(batch_size: int, fracs: tuple[float, float, float]) -> tuple[int, int, int]:
    """Split ``batch_size`` rows between (positives, negatives, random) in proportion to
    ``fracs`` (zero for an empty source), each non-empty source getting at least one row."""
    total = sum(fracs)
    raw = [batch_size * f / total for f in fracs]
    counts = [max(1, math.floor(r)) if f > 0 else 0 for r, f in zip(raw, fracs, strict=True)]
    # hand the rounding remainder to the sources with the largest fractional parts
    order = sorted(range(3), key=lambda i: (-(raw[i] - math.floor(raw[i])), i))
    i = 0
    while sum(counts) < batch_size:
        j = order[i % 3]
        if fracs[j] > 0:
            counts[j] += 1
        i += 1
    while sum(counts) > batch_size:  # only when max(1, ·) forced extra rows
        j = max(range(3), key=lambda k: counts[k])
        counts[j] -= 1
    return counts[0], counts[1], counts[2]


def _cyclic_passes(rng: np.random.Generator, n: int, total: int) -> np.ndarray:
    """``total`` indices into ``range(n)`` made of back-to-back shuffled passes (balanced
    upsampling: every index appears ``floor`` or ``ceil`` of ``total / n`` times)."""
    if n == 0 or total == 0:
        return np.empty(0, dtype=np.int64)
    reps = -(-total // n)
    return np.concatenate([rng.permutation(n) for _ in range(reps)])[:total]


def _exclusion_mask(exclude: np.ndarray | None, n_pool: int) -> np.ndarray | None:
    """Normalise ``exclude_from_pool`` (bool mask or index array) to a bool mask or ``None``."""
    if exclude is None:
        return None
    exclude = np.asarray(exclude)
    if exclude.dtype == np.bool_:
        if exclude.shape != (n_pool,):
            raise ValueError(f"exclude_from_pool mask has shape {exclude.shape}, pool has {n_pool} rows")
        return exclude
    mask = np.zeros(n_pool, dtype=np.bool_)
    if exclude.size:
        idx = exclude.astype(np.int64, copy=False)
        if idx.min() < 0 or idx.max() >= n_pool:
            raise ValueError("exclude_from_pool indices out of range of the pool")
        mask[idx] = True
    return mask


def sample_random_negatives(
    rng: np.random.Generator, n_pool: int, k: int, exclude: np.ndarray | None
) -> np.ndarray:
    """Up to ``k`` distinct pool rows not in ``exclude``, in random order (seeded)."""
    mask = _exclusion_mask(exclude, n_pool)
    if mask is None:
        k = min(k, n_pool)
        return rng.choice(n_pool, size=k, replace=False) if k else np.empty(0, np.int64)
    eligible = np.flatnonzero(~mask)
    k = min(k, eligible.size)
    if k == 0:
        return np.empty(0, np.int64)
    return eligible[rng.choice(eligible.size, size=k, replace=False)]


def mlp_random_rows(config: TrainConfig, n_pool: int, exclude: np.ndarray | None, first: int) -> np.ndarray:
    """The first ``first`` random negatives :func:`train_classifier` draws with ``config`` on a
    pool of ``n_pool`` rows without ``exclude`` — the ones a run reads when it has no more than
    ``first`` random slots (epochs x steps x the batch's random share; 4,800 with the defaults
    and up to ~1,000 labels)."""
    rows = sample_random_negatives(np.random.default_rng(config.seed), n_pool, config.random_negatives, exclude)
    return rows[:first]


def _gather(X: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` of ``X`` as float32, reading in sorted order (kind to memmaps)."""
    if idx.size == 0:
        return np.empty((0, X.shape[1]), dtype=np.float32)
    order = np.argsort(idx, kind="stable")
    rows = np.asarray(X[idx[order]], dtype=np.float32)
    out = np.empty_like(rows)
    out[order] = rows
    return out


def _fold_standardization(module: nn.Sequential, mean: np.ndarray, inv_std: np.ndarray) -> None:
    """Fold ``x ↦ (x - mean) * inv_std`` into the first linear layer, in place."""
    first = module[0]
    assert isinstance(first, nn.Linear)
    with torch.no_grad():
        w = first.weight.double()
        m = torch.from_numpy(mean).double()
        s = torch.from_numpy(inv_std).double()
        w_new = w * s
        b_new = first.bias.double() - w_new @ m
        first.weight.copy_(w_new.float())
        first.bias.copy_(b_new.float())


def l2_rows(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), float32."""
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return (X / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def _to_l2_input(module: nn.Sequential) -> None:
    """Swap the first layer for an :class:`L2NormLinear` with the same weights, in place."""
    first = module[0]
    assert isinstance(first, nn.Linear)
    l2 = nn.utils.skip_init(L2NormLinear, first.in_features, first.out_features)
    l2.load_state_dict(first.state_dict())
    module[0] = l2


_GLOBAL_RNG = threading.Lock()  # fork_rng saves and restores torch's global RNG: one at a time


class _SeededDropout(nn.Dropout):
    """``nn.Dropout`` drawing its masks from its own generator, so that trainings on several
    threads at once stay deterministic (torch's global RNG is shared by every thread)."""

    def __init__(self, p: float, generator: torch.Generator) -> None:
        super().__init__(p)
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        return x * torch.empty_like(x).bernoulli_(keep, generator=self.generator).div_(keep)


def _init_mlp(input_dim: int, hidden: tuple[int, ...], dropout: float, seed: int) -> nn.Sequential:
    """:func:`build_mlp` with weights drawn from a generator seeded with ``seed`` (no global RNG)."""
    gen = torch.Generator().manual_seed(seed)
    with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):  # the default init is replaced below
        module = build_mlp(input_dim, hidden, dropout)
    with torch.no_grad():
        for layer in module:
            if isinstance(layer, nn.Linear):  # nn.Linear's own default: U(-1/sqrt(fan_in), ..)
                bound = 1.0 / math.sqrt(layer.in_features)
                layer.weight.uniform_(-bound, bound, generator=gen)
                layer.bias.uniform_(-bound, bound, generator=gen)
    for i, layer in enumerate(module):
        if isinstance(layer, nn.Dropout):
            module[i] = _SeededDropout(layer.p, gen)
    return module


def _fit(
    table: torch.Tensor,
    batch_rows: torch.Tensor,
    batch_y: torch.Tensor,
    *,
    hidden: tuple[int, ...],
    config: TrainConfig,
    last_steps: int,
) -> tuple[nn.Sequential, float]:
    """The optimisation loop; returns the module and its mean loss over the last epoch.

    Initialisation and dropout draw from one generator seeded with ``config.seed`` (never
    torch's global RNG), so several trainings may run on threads at once, each deterministic.
    """
    total_steps = batch_rows.shape[0]
    losses = torch.zeros(min(last_steps, total_steps))
    module = _init_mlp(table.shape[1], hidden, config.dropout, config.seed)
    opt = torch.optim.Adam(
        module.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True
    )
    loss_fn = nn.BCEWithLogitsLoss()
    module.train()
    first_logged = total_steps - losses.shape[0]
    for step in range(total_steps):
        xb = table[batch_rows[step]]
        loss = loss_fn(module(xb), batch_y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= first_logged:
            losses[step - first_logged] = loss.detach()
    module.eval()
    for i, layer in enumerate(module):  # the saved model is a plain MLP
        if isinstance(layer, _SeededDropout):
            module[i] = nn.Dropout(layer.p)
    return module, float(losses.mean()) if losses.numel() else float("nan")


def not_enough_labels(what: str, concept: str | None) -> NotEnoughLabels:
    name = f" for {concept!r}" if concept else ""
    if what == "positive":
        return NotEnoughLabels(
            f"no positive labels yet{name}: rate at least one image as positive "
            "(or add an exemplar) before training"
        )
    return NotEnoughLabels(
        f"no negatives{name}: there are no negative labels and no unlabeled images to use as "
        "random negatives; rate at least one image as negative or ingest more images"
    )


def train_classifier(
    X_labeled: np.ndarray,
    y: np.ndarray,
    X_pool: np.ndarray,
    *,
    round_index: int,
    config: TrainConfig = TrainConfig(),
    exclude_from_pool: np.ndarray | None = None,
    concept: str | None = None,
) -> TrainedClassifier:
    """Train the paper's MLP on labeled embeddings plus random pool negatives.

    Args:
        X_labeled: ``(n, d)`` embeddings of the rated images (float16 or float32).
        y: ``(n,)`` labels, 1 = positive, 0 = negative (skips must be filtered out already).
        X_pool: ``(N, d)`` embeddings of the unlabeled train split (may be a memmap; only the
            rows actually used are read).
        round_index: 0 for the first model (``hidden_first``), later rounds ``hidden_later``.
        config: hyper-parameters (the paper's by default).
        exclude_from_pool: rows of ``X_pool`` that are labeled (bool mask of length ``N`` or an
            index array); they are never drawn as random negatives.
        concept: only used to make error messages specific.

    Raises:
        NotEnoughLabels: no labeled positive, or no negative of any kind.
        ValueError: malformed inputs (shapes, labels other than 0/1).

    See the module docstring for the epoch definition, standardization and determinism.
    """
    t0 = time.perf_counter()
    X_labeled = np.asarray(X_labeled)
    y = np.asarray(y).reshape(-1)
    if X_labeled.ndim != 2:
        raise ValueError(f"X_labeled must be 2-D, got shape {X_labeled.shape}")
    if X_labeled.shape[0] != y.shape[0]:
        raise ValueError(f"{X_labeled.shape[0]} labeled rows but {y.shape[0]} labels")
    if X_pool.ndim != 2 or X_pool.shape[1] != X_labeled.shape[1]:
        raise ValueError(
            f"X_pool must have shape (N, {X_labeled.shape[1]}), got {tuple(X_pool.shape)}"
        )
    if y.size and not np.isin(y, (0, 1)).all():
        bad = sorted({v.item() for v in np.unique(y)} - {0, 1})
        raise ValueError(f"labels must be 0 or 1 (skips are filtered by the caller); got {bad}")
    if config.epochs < 1 or config.batch_size < 3:
        raise ValueError("epochs must be >= 1 and batch_size >= 3")
    if config.frac_pos <= 0 or config.frac_neg < 0 or config.frac_random < 0:
        raise ValueError("frac_pos must be > 0 and frac_neg, frac_random >= 0")
    if config.frac_neg + config.frac_random <= 0:
        raise ValueError("frac_neg + frac_random must be > 0")

    d = X_labeled.shape[1]
    y = y.astype(np.int64)
    pos_idx = np.flatnonzero(y == 1)
    neg_idx = np.flatnonzero(y == 0)
    if pos_idx.size == 0:
        raise not_enough_labels("positive", concept)

    rng = np.random.default_rng(config.seed)
    random_idx = sample_random_negatives(  # what mlp_random_rows gives: keep the two in step
        rng, X_pool.shape[0], config.random_negatives, exclude_from_pool
    )
    if neg_idx.size == 0 and random_idx.size == 0:
        raise not_enough_labels("negative", concept)

    warnings: list[str] = []
    if neg_idx.size == 0:
        warnings.append(
            "no labeled negatives: trained on labeled positives against random negatives only"
        )
    if random_idx.size == 0:
        warnings.append("no unlabeled pool images: trained without random negatives")
    elif random_idx.size < config.random_negatives:
        log.debug("pool offers %d random negatives (< %d)", random_idx.size, config.random_negatives)

    # positives keep their share; a missing negative source hands its share to the other
    frac_neg = config.frac_neg if neg_idx.size else 0.0
    frac_rand = config.frac_random if random_idx.size else 0.0
    if not neg_idx.size:
        frac_rand += config.frac_neg
    if not random_idx.size:
        frac_neg += config.frac_random
    fracs = (config.frac_pos, frac_neg, frac_rand)
    b_pos, b_neg, b_rand = _batch_counts(config.batch_size, fracs)
    steps = config.min_steps_per_epoch
    steps = max(steps, -(-pos_idx.size // b_pos))
    if b_neg:
        steps = max(steps, -(-neg_idx.size // b_neg))
    total_steps = steps * config.epochs

    # Which rows each slot of each batch sees, for the whole run (cheap: indices only).
    pos_stream = pos_idx[_cyclic_passes(rng, pos_idx.size, total_steps * b_pos)]
    neg_stream = neg_idx[_cyclic_passes(rng, neg_idx.size, total_steps * b_neg)]
    # random_idx is already in random order: consume it as one stream so the run sees as many
    # distinct random negatives as it has slots (cycling through reshuffled passes only when the
    # random set is smaller than the number of slots).
    n_rand_slots = total_steps * b_rand
    if b_rand:
        if n_rand_slots <= random_idx.size:
            rand_stream_pos = np.arange(n_rand_slots)
        else:
            rand_stream_pos = _cyclic_passes(rng, random_idx.size, n_rand_slots)
        used = np.unique(rand_stream_pos)
        rand_rows = _gather(X_pool, random_idx[used])
        rand_local = np.searchsorted(used, rand_stream_pos)
        n_random_seen = int(used.size)
    else:
        rand_rows = np.empty((0, d), np.float32)
        rand_local = np.empty(0, np.int64)
        n_random_seen = 0

    X_lab = np.ascontiguousarray(X_labeled, dtype=np.float32)
    if config.input_norm == "l2":
        X_lab = l2_rows(X_lab)
        rand_rows = l2_rows(rand_rows)
    elif config.input_norm != "none":
        raise ValueError(f"input_norm must be 'l2' or 'none', got {config.input_norm!r}")
    mean = inv_std = None
    if config.standardize:
        ref = rand_rows[: config.standardize_sample] if rand_rows.shape[0] else X_lab
        ref64 = ref.astype(np.float64)
        mean = ref64.mean(axis=0)
        std = ref64.std(axis=0)
        inv_std = 1.0 / np.maximum(std, 1e-6 * max(float(std.max()), 1e-12))
        X_lab = ((X_lab - mean) * inv_std).astype(np.float32)
        rand_rows = ((rand_rows - mean) * inv_std).astype(np.float32)
    X_lab_t = torch.from_numpy(X_lab)
    rand_t = torch.from_numpy(rand_rows)

    hidden = config.hidden_for(round_index)
    # One table of rows (labeled, then the random negatives in use) and, per step, the row
    # numbers of its batch: positives, labeled negatives, random negatives.
    table = torch.cat([X_lab_t, rand_t])
    batch_rows = torch.from_numpy(
        np.concatenate(
            [
                pos_stream.reshape(total_steps, b_pos),
                neg_stream.reshape(total_steps, b_neg),
                (rand_local + X_lab.shape[0]).reshape(total_steps, b_rand),
            ],
            axis=1,
        )
    )
    batch_y = torch.cat([torch.ones(b_pos), torch.zeros(b_neg + b_rand)]).unsqueeze(1)

    with torch_threads(config.num_threads):
        module, final_loss = _fit(
            table, batch_rows, batch_y, hidden=hidden, config=config, last_steps=steps
        )
    module.eval()
    if mean is not None and inv_std is not None:
        _fold_standardization(module, mean, inv_std)
    if config.input_norm == "l2":
        _to_l2_input(module)

    seconds = time.perf_counter() - t0
    meta = ClassifierMeta(
        input_dim=d,
        hidden=hidden,
        n_pos=int(pos_idx.size),
        n_neg=int(neg_idx.size),
        n_random_neg=int(random_idx.size),
        train_seconds=round(seconds, 4),
        round_index=int(round_index),
        steps_per_epoch=int(steps),
        n_random_seen=n_random_seen,
        final_loss=final_loss,
        config=config.to_dict(),
        warnings=warnings,
    )
    for w in warnings:
        log.warning("%s%s", f"{concept}: " if concept else "", w)
    log.info(
        "trained round %d MLP %s on %d pos / %d neg / %d random in %.2fs (%d steps)",
        round_index, hidden, meta.n_pos, meta.n_neg, meta.n_random_neg, seconds, total_steps,
    )
    return TrainedClassifier(module=module, meta=meta)


# ---- the labeled rows of a round ---------------------------------------------------------------
def training_inputs(vectors: Any, model_id: str, ids: Sequence[str],
                    rows: Callable[[Any], Any] | None = None) -> tuple[Any, np.ndarray, np.ndarray]:
    """``(X_pool, X_labeled, exclude)`` for :func:`train_classifier`: the train split's float16
    matrix, the labeled rows as float32 (train split first, then test, then any split), and
    the train rows of the labeled ids — the values ``matrix``/``vectors_for``/``index_of`` give,
    without building a dict of the split.

    ``rows`` (with split caches): maps the train split's cache to what the train rows are read
    through — a concept's :class:`~agile_pipeline.lib.working_set.RowSource` — which is then
    also ``X_pool``."""
    from agile_pipeline.lib.split_cache import has_cache, split_cache

    if not has_cache(vectors):
        train_m = vectors.matrix(model_id, "train")
        index = train_m.index_of()
        X_lab = vectors.vectors_for(model_id, ids)
        return train_m.vectors, X_lab, np.array([index[i] for i in ids if i in index], np.int64)
    train = split_cache(vectors, model_id, "train")
    source = rows(train) if rows is not None else train
    pos = train.positions(ids)
    X_lab = np.empty((len(ids), train.dim), np.float32)
    inside = pos >= 0
    X_lab[inside] = source.rows_f32(pos[inside])
    if not inside.all():
        rest = np.flatnonzero(~inside)
        test = split_cache(vectors, model_id, "test")
        tpos = test.positions([ids[i] for i in rest])
        found = tpos >= 0
        X_lab[rest[found]] = test.rows_f32(tpos[found])
        if not found.all():
            X_lab[rest[~found]] = vectors.vectors_for(model_id, [ids[i] for i in rest[~found]])
    return (source if rows is not None else train.f16), X_lab, pos[inside]
