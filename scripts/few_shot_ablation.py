"""Compare few-label training variants with the plain recipe (issue 9, "use every signal").

Run from the repo root with AGILE_HOME set (the dataset is ingested and embedded into it on the
first run), e.g.::

    agile demo-corpus --kind glyphs .agile/unseen_glyphs
    python scripts/few_shot_ablation.py --dataset .agile/unseen_glyphs --seeds 0,1,2
    python scripts/few_shot_ablation.py --dataset .agile/demo_corpus --seeds 0,1,2

``--lookaheads 0,10`` compares the app's pipelined rounds (the next batch selected by a model
trained before the last 10 images of a batch were rated) with the paper's protocol::

    python scripts/few_shot_ablation.py --dataset .agile/demo_corpus --variants plain \
        --seeds 0,1,2 --rounds 5 --lookaheads 0,10,20

Every variant runs on the same concepts and seeds (expansion of 100, then ``--rounds`` rounds of
margin active learning with batch 100). Prints a markdown table: mean AUC-PR (over concepts,
then averaged over seeds) at each label budget, concepts left without a model, and the rounds
at which concepts found their first positive; writes the raw results to ``--out``.
"""

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from agile_pipeline.research.simulate import (
    FEW_SHOT_VARIANTS,
    SimConfig,
    attach_negative_phrases,
    parse_variant_args,
    run_all,
    summarize,
)


def _variant(spec: str) -> tuple[str, dict[str, Any]]:
    """``name`` or ``name:key=value,key=value`` -> (name, args)."""
    name, _, rest = spec.partition(":")
    args = parse_variant_args(rest)
    if name not in FEW_SHOT_VARIANTS:
        raise SystemExit(f"unknown variant {name!r}: one of {', '.join(FEW_SHOT_VARIANTS)}")
    return name, args


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--variants", default="plain,linear,prior-linear,hybrid,mlp-pseudo,prior-decay")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--min-test-pos", type=int, default=20)
    ap.add_argument("--out", default="sim-out/few_shot")
    ap.add_argument("--exemplar-when-stuck", action="store_true",
                    help="the simulated user gives one exemplar image after a batch with no positive")
    ap.add_argument("--recovery-random", type=float, default=0.0,
                    help="share of a no-positive recovery batch drawn at random from the pool")
    ap.add_argument("--lookaheads", default="0",
                    help="comma-separated lookaheads (the app's pipelined rounds; 0 = the paper's protocol)")
    a = ap.parse_args()

    from agile_pipeline.defs.resources import AgileResources
    from agile_pipeline.runner import prepare_simulation

    agile = AgileResources()
    data = prepare_simulation(a.dataset, min_test_pos=a.min_test_pos, agile=agile)
    attach_negative_phrases(data, Path(a.dataset), agile.encoder.load())
    names = sorted(data.positives)
    seeds = [int(s) for s in a.seeds.split(",")]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{a.dataset}: {len(names)} concepts, {len(data.train_ids)} train / "  # noqa: T201
          f"{len(data.test_ids)} test images, {data.embedding_model}, seeds {seeds}, "
          f"{len(data.negative_phrases)} concepts with negative phrases")
    rows = []
    lookaheads = [int(x) for x in a.lookaheads.split(",")]
    specs = [(v.strip(), look) for v in a.variants.split(";" if ";" in a.variants else ",")
             for look in lookaheads]
    for spec, look in specs:
        name, args = _variant(spec)
        if len(lookaheads) > 1 or look:
            spec = f"{spec}, lookahead {look}"
        per_seed, no_model, first = [], [], []
        for seed in seeds:
            cfg = SimConfig(rounds=a.rounds, seed=seed, few_shot=name, few_shot_args=args,
                            recovery_random=a.recovery_random,
                            exemplar_when_stuck=a.exemplar_when_stuck, lookahead=look)
            res = run_all(data, names, cfg, workers=a.workers, progress=False)
            s = summarize(res)
            per_seed.append([r["auc_pr_mean"] for r in s["all"]["rounds"]])
            no_model.append(s["concepts_without_model"])
            first += [v for v in s["first_positive_round"].values()]
            (out / f"{Path(a.dataset).name}-{spec.replace(':', '_').replace(', ', '-').replace(' ', '')}-seed{seed}.json").write_text(
                json.dumps({"config": cfg.__dict__, "concepts": res, "summary": s}, default=str))
        m = np.mean(np.array(per_seed), axis=0)
        found = [v for v in first if v is not None]
        rows.append((spec, m, float(np.mean(no_model)), sum(v is None for v in first),
                     float(np.mean(found)) if found else math.nan, max(found, default=0)))
        print(spec, " ".join(f"{v:.3f}" for v in m), flush=True)  # noqa: T201
    budgets = [100 * (r + 1) for r in range(a.rounds + 1)]
    print("\n| variant | " + " | ".join(f"{b} labels" for b in budgets)  # noqa: T201
          + " | concepts without a model | first positive round (mean / max) |")
    print("|---|" + "---|" * (len(budgets) + 2))  # noqa: T201
    for spec, m, nm, never, mean_first, max_first in rows:
        print(f"| {spec} | " + " | ".join(f"{v:.3f}" for v in m)  # noqa: T201
              + f" | {nm:g} | {mean_first:.2f} / {max_first}" + (f" ({never} never)" if never else "") + " |")


if __name__ == "__main__":
    main()
