"""Compare two sets of `agile simulate` runs (e.g. two strategies, one run per seed), paired by
concept and seed: mean AUC-PR at each label count for each set, and the mean paired difference
(B - A) with its standard error over every (concept, seed) pair.

    python scripts/compare_sims.py sim-out/cm-margin-s0 sim-out/cm-margin-s1 -- \\
        sim-out/cm-cluster-margin-s0 sim-out/cm-cluster-margin-s1
"""

import json
import sys
from pathlib import Path

import numpy as np


def _scores(runs: list[str]) -> dict[tuple[str, str, int], float]:
    """(run index, concept, labels) -> AUC-PR, and concepts that never got a model."""
    out: dict[tuple[str, str, int], float] = {}
    for i, run in enumerate(runs):
        data = json.loads((Path(run) / "results.json").read_text())
        for c in data["concepts"]:
            for r in c["rounds"]:
                out[(str(i), c["name"], int(r["n_labels"]))] = float(r["auc_pr"])
    return out


def _no_model(runs: list[str]) -> int:
    return sum(not c["model_trained"] for run in runs
               for c in json.loads((Path(run) / "results.json").read_text())["concepts"])


def main(argv: list[str]) -> None:
    if "--" not in argv:
        raise SystemExit(__doc__)
    cut = argv.index("--")
    a_runs, b_runs = argv[:cut], argv[cut + 1:]
    if len(a_runs) != len(b_runs) or not a_runs:
        raise SystemExit("give the same number of runs (one per seed, in the same seed order) on each side")
    a, b = _scores(a_runs), _scores(b_runs)
    labels = sorted({k[2] for k in a} & {k[2] for k in b})
    out = sys.stdout.write
    out(f"{'labels':>7} {'A mean':>8} {'B mean':>8} {'B - A':>8} {'s.e.':>7} {'pairs':>6}\n")
    for n in labels:
        keys = sorted(k for k in a if k[2] == n and k in b)
        da = np.array([a[k] for k in keys])
        db = np.array([b[k] for k in keys])
        ok = ~(np.isnan(da) | np.isnan(db))
        d = db[ok] - da[ok]
        se = d.std(ddof=1) / np.sqrt(d.size) if d.size > 1 else float("nan")
        out(f"{n:>7} {np.nanmean(da):8.3f} {np.nanmean(db):8.3f} {d.mean():+8.3f} {se:7.3f} {d.size:>6}\n")
    out(f"concepts without a model: A {_no_model(a_runs)}, B {_no_model(b_runs)} (over {len(a_runs)} runs)\n")


if __name__ == "__main__":
    main(sys.argv[1:])
