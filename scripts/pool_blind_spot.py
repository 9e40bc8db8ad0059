"""The SEALS pool's blind spot on the bench's planted concept, and what closes it (issue 15).

``PYTHONPATH=. python scripts/pool_blind_spot.py --n 1000000 --seeds 0,1,2 --rounds 10`` (from the
repository root: it uses the bench's corpus generator, :mod:`benchmarks.synth`)

In memory, on the bench's synthetic corpus (:mod:`benchmarks.synth`: positives in four modes,
the phrases near two of them): the expansion batch (100 of the phrases' nearest train images),
then ``--rounds`` rounds of 100 picked by margin, labelled by the planted truth, each round's
model trained as the product trains it (:func:`~agile_pipeline.lib.model_choice.train_round_model`)
and scored by AUC-PR on the whole test split. Three ways to find the candidates:

* ``full`` — every unlabelled train image (the paper's protocol);
* ``pool`` — the SEALS pool (the 100 nearest train images of every phrase and labelled image,
  exact) plus 2,000 uniform rows of the rest, as ``AGILE_CANDIDATE_POOL=on`` did before the sweep;
* ``pool+sweep`` — the same plus the ``--sweep`` most uncertain images (default: the product's
  ``POOL_SWEEP``) of a whole-split scan with the previous round's model (what
  :func:`agile_pipeline.lib.loop.sweep_candidate_pool` keeps).

A harness: neighbours are exact, not through the index, and nothing goes through Dagster; the
bench's ``pool_quality`` runs the product's own path.
"""

from typing import Annotated

import numpy as np
import typer
from sklearn.metrics import average_precision_score

from agile_pipeline.lib.candidate_pool import POOL_K, POOL_RANDOM, POOL_SWEEP
from agile_pipeline.lib.model_choice import train_round_model
from agile_pipeline.lib.selection import select_margin
from benchmarks import synth

VARIANTS = ("full", "pool", "pool+sweep")


def _knn(queries: np.ndarray, X: np.ndarray, k: int) -> np.ndarray:
    return np.argpartition(-(queries @ X.T), k, axis=1)[:, :k].ravel()


def run_variant(X: np.ndarray, y: np.ndarray, X_test: np.ndarray, y_test: np.ndarray,
                phrases: np.ndarray, first: np.ndarray, variant: str, rounds: int, seed: int,
                k: int = POOL_K, n_random: int = POOL_RANDOM, n_sweep: int = POOL_SWEEP) -> tuple[list[float], int]:
    """AUC-PR after the expansion labels and after each round; positives labelled at the end."""
    labeled = list(first)
    pool = set(_knn(phrases, X, k).tolist()) | set(_knn(X[first], X, k).tolist())
    sweep = np.empty(0, np.int64)
    rng = np.random.default_rng(seed + 100)
    aps: list[float] = []
    for r in range(rounds + 1):
        lab = np.array(labeled)
        model = train_round_model(X[lab], y[lab].astype(int), X, round_index=r, exclude_from_pool=lab)
        aps.append(round(float(average_precision_score(y_test, model.predict_proba(X_test))), 4))
        if r == rounds:
            break
        eligible = np.ones(len(X), bool)
        eligible[lab] = False
        if variant == "full":
            rows = np.flatnonzero(eligible)
        else:
            members = np.array(sorted(pool))
            parts = [members[eligible[members]], rng.choice(np.flatnonzero(eligible), n_random, replace=False)]
            if variant == "pool+sweep":
                parts.append(sweep[eligible[sweep]])
            rows = np.unique(np.concatenate(parts))
        pick = rows[select_margin(model.predict_proba(X[rows]), 100)]
        labeled += pick.tolist()
        if variant != "full":
            pool |= set(_knn(X[pick], X, k).tolist())
        if variant == "pool+sweep":  # after the batch is committed: this model's most uncertain
            eligible[pick] = False
            rest = np.flatnonzero(eligible)
            sweep = rest[select_margin(model.predict_proba(X[rest]), n_sweep)]
    return aps, int(y[labeled].sum())


def main(
    n: Annotated[int, typer.Option(help="Corpus size (half train, half test).")] = 1_000_000,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds (the expansion sample).")] = "0,1,2",
    rounds: Annotated[int, typer.Option(help="AL rounds after the expansion labels.")] = 10,
    variants: Annotated[str, typer.Option(help="Comma-separated: full, pool, pool+sweep.")] = ",".join(VARIANTS),
    dim: Annotated[int, typer.Option(help="Vector dimension (the bench's default).")] = 512,
    sweep: Annotated[int, typer.Option(help="Sweep size of pool+sweep (the product's default).")] = POOL_SWEEP,
) -> None:
    chosen = [v for v in variants.split(",") if v]
    bad = [v for v in chosen if v not in VARIANTS]
    if bad:
        raise typer.BadParameter(f"unknown variant(s) {bad}: use {', '.join(VARIANTS)}")
    geo = synth.geometry(dim, seed=0)
    _, X_all, kind = synth.make_batch(geo, n, seed=1)
    truth = kind == 1
    train = np.random.default_rng(7).random(n) < 0.5
    X, y, X_test, y_test = X_all[train], truth[train], X_all[~train], truth[~train]
    typer.echo(f"{n:,} vectors ({dim}-d): {len(X):,} train ({int(y.sum())} positive), "
               f"{len(X_test):,} test ({int(y_test.sum())} positive)")
    phrases = np.stack([geo.phrase_vectors[p] for p in (synth.CONCEPT, synth.MODE_PHRASE, synth.NEG_PHRASE)])
    results: dict[str, list[list[float]]] = {v: [] for v in chosen}
    for seed in (int(s) for s in seeds.split(",")):
        near = np.unique(_knn(phrases[:2], X, 100))
        first = np.random.default_rng(seed).choice(near, size=min(100, len(near)), replace=False)
        for v in chosen:
            aps, pos = run_variant(X, y, X_test, y_test, phrases, first, v, rounds, seed, n_sweep=sweep)
            results[v].append(aps)
            typer.echo(f"seed {seed} {v:>10}: AUC-PR by round {aps}; {pos} positives labelled")
    typer.echo("\nmean AUC-PR by round (0 = the expansion labels):")
    for v, runs in results.items():
        a = np.array(runs)
        typer.echo(f"{v:>10}: {np.round(a.mean(0), 3).tolist()}  (last round: "
                   f"{a[:, -1].mean():.3f} ± {a[:, -1].std(ddof=1) / np.sqrt(len(a)) if len(a) > 1 else 0:.3f} s.e.)")


if __name__ == "__main__":
    typer.run(main)
