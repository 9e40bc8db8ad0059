"""The app's round worker: warm-up, and runs left STARTED by an app process that died."""

import logging
import os
import socket
import subprocess
import sys

import dagster as dg
from dagster._core.storage.dagster_run import DagsterRun, DagsterRunStatus

from agile_pipeline.warm import WORKER_TAG, fail_orphaned_runs, warm_up


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_runs_of_a_dead_app_process_are_marked_failed(tmp_path) -> None:
    inst = dg.DagsterInstance.ephemeral(tempdir=str(tmp_path))
    host = socket.gethostname()
    runs = {
        "dead": {WORKER_TAG: f"{host}:{_dead_pid()}"},
        "alive": {WORKER_TAG: f"{host}:{os.getppid()}"},
        "other-host": {WORKER_TAG: "elsewhere:1"},
    }
    for name, tags in runs.items():
        inst.add_run(DagsterRun(job_name="concept_round_job", run_id=f"run-{name}",
                                status=DagsterRunStatus.STARTED,
                                tags={"agile/trigger": "app-in-process", **tags}))
    assert fail_orphaned_runs(inst) == ["run-dead"]
    status = {name: inst.get_run_by_id(f"run-{name}").status for name in runs}  # type: ignore[union-attr]
    assert status == {"dead": DagsterRunStatus.FAILURE, "alive": DagsterRunStatus.STARTED,
                      "other-host": DagsterRunStatus.STARTED}
    assert fail_orphaned_runs(inst) == []


def test_warm_up_reports_every_part_without_a_corpus(agile_home, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="agile_pipeline"):
        parts = warm_up()
    # the warm-up's own dry training is not the user's: it must not print warnings
    assert not [r for r in caplog.records if r.name.startswith("agile_pipeline.lib")], caplog.text
    for key in ("imports", "dagster_execution", "encoder_load", "image_tower", "text_tower", "split_caches",
                "torch_kernels", "mlflow_client", "seconds"):
        assert key in parts and parts[key] >= 0


def test_warm_up_builds_the_corpus_graph_so_no_round_waits_on_it(corpus) -> None:
    from agile_pipeline.lib.corpus_scores import corpus_graph

    parts = warm_up(corpus)
    assert parts["corpus_graph"] >= 0
    g = corpus_graph(corpus.vectors.vectors(), corpus.encoder.model_id())
    assert g is not None and g.build_seconds == 0.0 and len(g.graph) == 800  # read back, not built
