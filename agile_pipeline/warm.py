"""Warm a long-lived process for concept rounds, so that no rater waits on a cold start.

A fresh process pays, before a round can do any real work: importing Dagster's execution
machinery, torch, MLflow, LanceDB, scikit-learn and matplotlib; loading the embedding model;
opening the vector table and building (or memory-mapping) the split caches; MLflow's first
connection to its store. Measured on the 2-core development box that is 6-10 s of a 9 s
first round, against ~2 s for the same round once warm (BENCHMARKS.md, "Session").

:func:`warm_up` pays all of it once, when the app starts, and reports what each part took.
"""

import logging
import time
from collections.abc import Callable
from typing import Any

from agile_pipeline.defs.resources import AgileResources

log = logging.getLogger(__name__)


def _timed(out: dict[str, float], key: str, fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    try:
        return fn()
    finally:
        out[key] = round(time.perf_counter() - t0, 3)


def _import_round_modules() -> None:
    import importlib

    for name in (
        "torch", "sklearn.metrics", "matplotlib.pyplot", "lancedb", "pyarrow",
        "mlflow.tracking", "mlflow.entities",
        "agile_pipeline.lib.training", "agile_pipeline.lib.selection", "agile_pipeline.lib.scan",
        "agile_pipeline.lib.int8_scan", "agile_pipeline.lib.evalset", "agile_pipeline.lib.metrics",
        "agile_pipeline.lib.evaluation", "agile_pipeline.lib.tracking", "agile_pipeline.lib.loop",
        "agile_pipeline.runner",
    ):
        importlib.import_module(name)
    import matplotlib

    matplotlib.use("Agg")


def _dagster_dry_run() -> None:
    """One tiny in-process run on an ephemeral instance: Dagster imports and caches its
    execution machinery lazily, on the first run."""
    import dagster as dg

    @dg.asset
    def agile_warm_up() -> None:
        return None

    dg.materialize([agile_warm_up], instance=dg.DagsterInstance.ephemeral(), raise_on_error=True,
                   run_config={"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}})


def _image_tower(agile: AgileResources) -> None:
    from PIL import Image

    agile.encoder.load().embed_images([Image.new("RGB", (32, 32), "white")])


def _split_caches(agile: AgileResources) -> None:
    from agile_pipeline.lib.scan import prepare_scans
    from agile_pipeline.lib.split_cache import split_cache

    vectors = agile.vectors.vectors()
    model_id = agile.encoder.model_id()
    try:
        for split in ("train", "test"):
            prepare_scans(split_cache(vectors, model_id, split))
    except (LookupError, ValueError, FileNotFoundError) as exc:  # no corpus yet: nothing to warm
        log.info("split caches not warmed: %s", exc)


def _corpus_graph(agile: AgileResources) -> None:
    from agile_pipeline.lib.corpus_scores import corpus_graph

    try:
        corpus_graph(agile.vectors.vectors(), agile.encoder.model_id())
    except (LookupError, ValueError, FileNotFoundError) as exc:  # no corpus yet: nothing to build
        log.info("corpus graph not built: %s", exc)


def _torch_kernels() -> None:
    """A tiny round training (cross-validation included) and the scan-mode probe: the first real
    round then runs at the speed of the later ones (measured: the first model at 100k took 5.1 s,
    later ones 0.5 s)."""
    import numpy as np

    from agile_pipeline.lib.model_choice import ModelChoiceConfig, train_round_model
    from agile_pipeline.lib.scan import scan_mode
    from agile_pipeline.lib.training import TrainConfig

    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 32)).astype(np.float32)
    pool = rng.standard_normal((256, 32)).astype(np.float32)
    y = (np.arange(64) % 4 == 0).astype(np.int64)
    for round_index in (0, 1):  # both architectures of the recipe
        model = train_round_model(X, y, pool, round_index=round_index, config=TrainConfig(epochs=1),
                                  choice=ModelChoiceConfig(cv_random=128))
        model.predict_proba(X)
    scan_mode()


def _mlflow_client(agile: AgileResources) -> None:
    from agile_pipeline.lib.tracking import _client

    _client(agile.paths.mlflow_uri()).search_experiments(max_results=1)


def warm_up(agile: AgileResources | None = None) -> dict[str, float]:
    """Import, load and open everything a round needs; returns seconds per part.

    Never raises for a missing corpus or model: what cannot be warmed yet is warmed by the
    first round instead (and logged).
    """
    agile = agile or AgileResources()
    parts: dict[str, float] = {}
    t0 = time.perf_counter()
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("imports", _import_round_modules),
        ("dagster_execution", _dagster_dry_run),
        ("encoder_load", agile.encoder.load),
        # the image network loads on the first image (phrase queries never need it): an
        # exemplar upload is the app's first image
        ("image_tower", lambda: _image_tower(agile)),
        # the text tower loads lazily on the first phrase: a concept's first images wait on it
        ("text_tower", lambda: agile.encoder.load().embed_texts(["a photo"])),
        ("split_caches", lambda: _split_caches(agile)),
        # the corpus graph (built once per table version: 3 s at 12k images, 59 s at 50k) feeds a
        # kernel round's graph positives and the corpus scores; built here, no round waits on it
        ("corpus_graph", lambda: _corpus_graph(agile)),
        # the first training and scan of a process pay for torch's kernels and thread pools
        ("torch_kernels", _torch_kernels),
        ("mlflow_client", lambda: _mlflow_client(agile)),
    ]
    for key, fn in steps:
        try:
            _timed(parts, key, fn)
        except Exception as exc:  # a warm-up failure must never stop the app
            log.warning("warm-up step %s failed (the first round pays for it): %s", key, exc)
    parts["seconds"] = round(time.perf_counter() - t0, 3)
    return parts


WORKER_TAG = "agile/worker"


def worker_id() -> str:
    """``host:pid`` of this process, the tag its in-process runs carry."""
    import os
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def fail_orphaned_runs(instance: Any = None) -> list[str]:
    """Mark as failed the in-process runs of app processes on this host that are gone.

    A run executed inside the app is STARTED until the app finishes it; if the app was killed
    mid-run (``kill -9``, a crash, a reboot) nothing else would ever end it, and the Dagster UI
    would show it running forever. Called when the app starts. Returns the run ids it ended.
    """
    import os
    import socket

    import dagster as dg

    from agile_pipeline.runner import instance as default_instance

    inst = instance or default_instance()
    host = socket.gethostname()
    ended: list[str] = []
    runs = inst.get_runs(filters=dg.RunsFilter(
        statuses=[dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING],
        tags={"agile/trigger": "app-in-process"}))
    for run in runs:
        worker = run.tags.get(WORKER_TAG, "")
        w_host, _, w_pid = worker.rpartition(":")
        if w_host != host or not w_pid.isdigit() or int(w_pid) == os.getpid():
            continue
        try:
            os.kill(int(w_pid), 0)
            continue  # that app is still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        inst.report_run_failed(run, f"the app process that ran it ({worker}) stopped before it finished")
        ended.append(run.run_id)
    return ended
