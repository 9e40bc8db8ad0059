"""Whole rounds on a bench corpus kept with ``agile bench --keep``: what the rater waits for.

    python -m benchmarks.rounds --home /work/bench-work/corpus-10000000-d512 --rounds 3

Each round rates the bench concept's pending batch from the planted truth and runs the round
job through Dagster in process, as the bench's ``round_end_to_end`` rows do, going on from the
concept's current state (rounds pile up labels: a concept at round 20 trains and scores more
than one at round 5). It prints, per round: seconds from submit until the next batch is
committed (what the app waits for), the run's whole length, the training and selection
figures from the steps' Dagster metadata (family, images scored, rows read from the split
cache instead of the concept's working set), and each step's start and end from submit. The
first round of a process also pays for imports and cold caches. ``--pool`` sets
``AGILE_CANDIDATE_POOL`` (default ``on``: the bench's ``round_end_to_end_pool``).
"""

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from agile_pipeline import settings
from agile_pipeline.lib.split_cache import split_cache
from benchmarks import suite, synth


def _bench(home: Path, n: int, dim: int) -> suite.Bench:
    from agile_pipeline.defs.resources import AgileResources
    from agile_pipeline.lib.loop import LoopEnv
    from agile_pipeline.lib.state import StateStore
    from agile_pipeline.lib.vectors import VectorStore

    corpus = synth.write_corpus(home, n, dim)  # reuses the kept corpus (same parameters)
    paths = settings.Paths(home).ensure()
    vectors = VectorStore(paths.lancedb, cache_dir=paths.cache)
    env = LoopEnv(StateStore(paths.state_db), vectors, corpus.model_id, paths)
    train, test = (split_cache(vectors, corpus.model_id, s) for s in ("train", "test"))
    spec = corpus.encoder_spec()
    return suite.Bench(n, corpus, env, train, test, suite._truth(train, corpus.positives),
                       suite._truth(test, corpus.positives), spec, AgileResources(home=str(home), encoder=spec),
                       AgileResources(home=str(home), encoder=spec, split_caches=False))


def _timeline(run_id: str, wall0: float) -> dict[str, list[float]]:
    import dagster as dg

    out: dict[str, list[float]] = {}
    for e in dg.DagsterInstance.get().all_logs(run_id):
        de = e.dagster_event
        if de is not None and de.step_key and de.event_type_value in ("STEP_START", "STEP_SUCCESS"):
            out.setdefault(de.step_key, []).append(round(e.timestamp - wall0, 3))
    return out


def _rounds(home: Path, n: int, dim: int, count: int, pool: str) -> list[dict[str, Any]]:
    import dagster as dg

    b = _bench(home, n, dim)
    if not b.env.store.pending_items(synth.CONCEPT):
        raise SystemExit(f"{home}: the bench concept has no pending batch (run agile bench with --keep first)")
    rows: list[dict[str, Any]] = []
    print(f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, {home} ({n:,} images), pool {pool}")
    for _ in range(count):
        wall0 = time.time()
        _s, info = suite._one_round(b)
        run = dg.DagsterInstance.get().get_runs(limit=1)[0]
        info["steps_from_submit"] = _timeline(run.run_id, wall0)
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
        rows.append(info)
        print(f"round {info['round']}: next batch after {info['timed_seconds']:.2f} s (run {info['run_seconds']:.0f} s); "
              f"train {info['train_seconds']} s ({info['family']}), classifier step {info['classifier_seconds']} s; "
              f"select {info['select_seconds']} s over {info['images_scored']:,} images; "
              f"split-cache reads outside the working set {info['working_set_misses']}, "
              f"{info['working_set_written']} rows in the next one; load {info['loadavg_1m']}")
        for step, t in info["steps_from_submit"].items():
            print(f"    {step:22s} {' -> '.join(f'{x:.2f}' for x in t)}")
    b.env.store.close()
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.rounds", description=__doc__.split("\n")[0])
    ap.add_argument("--home", required=True, help="a corpus folder under the bench's --workdir")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pool", choices=("on", "off", "auto"), default="on")
    ap.add_argument("--out", type=Path, help="also write the rounds as JSON here")
    a = ap.parse_args(argv)
    home = Path(a.home).resolve()
    meta = json.loads((home / "synthetic.json").read_text())["params"]
    for name in ("lance", "lancedb", "alembic", "mlflow", "dagster"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with suite._env_vars(AGILE_HOME=str(home), AGILE_ENCODER=f"{synth.MODEL_SPEC_PREFIX}{meta['dim']}",
                         DAGSTER_HOME=str(home / "dagster_home"), AGILE_CANDIDATE_POOL=a.pool):
        rows = _rounds(home, int(meta["n"]), int(meta["dim"]), a.rounds, a.pool)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(rows, indent=1, default=str))
    return rows


if __name__ == "__main__":
    main()
