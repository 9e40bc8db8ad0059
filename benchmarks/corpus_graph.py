"""What corpus scores cost (issue 19): the exact kNN graph build and one propagation, by size.

    python -m benchmarks.corpus_graph --sizes 2000,12000,50000 --dim 384

Random unit vectors (the cost does not depend on what they show): the graph build is the
once-per-table-version cost (``concept_predictions`` / ``model_metrics`` pay it on the first
call after a corpus refresh, then read it back), the propagation the per-model cost
(ten steps over ``k`` = 10 neighbours). Prints a Markdown table and the machine.
"""

import argparse
import time

import numpy as np

from agile_pipeline.lib.propagation import K, knn_graph, propagate
from benchmarks import measure


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="2000,12000,50000")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--repeats", type=int, default=3, help="propagations timed per size (median)")
    a = ap.parse_args(argv)
    m = measure.machine()
    print(measure.describe(m))
    print("| images | graph build (s) | graph (MiB) | one propagation (ms) |")
    print("|---:|---:|---:|---:|")
    rows = []
    for n in (int(s) for s in a.sizes.split(",") if s.strip()):
        X = np.random.default_rng(n).standard_normal((n, a.dim)).astype(np.float32)
        t0 = time.perf_counter()
        g = knn_graph(X, K)
        build = time.perf_counter() - t0
        p = np.random.default_rng(1).random(n)
        rated = np.arange(0, min(n, 600), 3)
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            propagate(p, g, rated, np.ones(len(rated)))
            times.append(time.perf_counter() - t0)
        row = {"images": n, "build_s": build, "graph_mib": g.nbytes / 2**20,
               "propagate_ms": 1000 * float(np.median(times))}
        rows.append(row)
        print(f"| {n:,} | {build:.2f} | {row['graph_mib']:.1f} | {row['propagate_ms']:.1f} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
