"""Pipeline triggers: the in-process runner and the Dagster GraphQL client's failure modes."""

import socket
import threading
import time

import pytest

from labeling_ui.trigger import (
    FOLLOWUP_ASSETS,
    DagsterGraphQLTrigger,
    InProcessTrigger,
    TriggerUnavailable,
)


def _wait(trigger: InProcessTrigger, run_id: str, timeout: float = 5.0):  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = trigger.status(run_id)
        if s.finished:
            return s
        time.sleep(0.02)
    raise AssertionError("run did not finish")


def test_in_process_runs_one_at_a_time_and_reports_status() -> None:
    gate = threading.Event()
    seen: list[str] = []

    def start(concept: str) -> str:
        gate.wait(5)
        seen.append(concept)
        return "dagster-run-1"

    t = InProcessTrigger(run_start=start, run_round=lambda c, cfg: "dagster-run-2")
    h = t.start_concept("cats")
    assert h.kind == "in-process" and h.url is None
    assert t.status(h.run_id).state in ("queued", "running")
    assert t.active_run("cats", "concept_start_job") == h
    gate.set()
    s = _wait(t, h.run_id)
    assert s.state == "success" and s.dagster_run_id == "dagster-run-1"
    assert t.active_run("cats", "concept_start_job") is None
    assert _wait(t, t.run_round("cats").run_id).state == "success"
    t.shutdown()


def test_in_process_failure_carries_the_message() -> None:
    def boom(concept: str, cfg: object) -> str:
        raise RuntimeError("no positive labels yet for 'cats'")

    t = InProcessTrigger(run_start=lambda c: "x", run_round=boom)
    s = _wait(t, t.run_round("cats").run_id)
    assert s.state == "failure" and "no positive labels" in s.message
    t.shutdown()


def test_dagster_not_running_is_reported_fast_and_plainly() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    t = DagsterGraphQLTrigger(f"http://127.0.0.1:{port}", timeout_s=3)
    t0 = time.perf_counter()
    with pytest.raises(TriggerUnavailable, match="not reachable") as info:
        t.run_round("cats")
    assert time.perf_counter() - t0 < 3
    assert "ratings are saved" in str(info.value)
    assert t.ping() is False


@pytest.mark.parametrize("url", ["ftp://x", "http://", "not a url at all:://"])
def test_dagster_url_must_be_http(url: str) -> None:
    with pytest.raises(ValueError):
        DagsterGraphQLTrigger(url)


def test_dagster_run_url() -> None:
    t = DagsterGraphQLTrigger("http://127.0.0.1:3000/")
    assert t.run_url("abc") == "http://127.0.0.1:3000/runs/abc"


def test_follow_up_waits_for_other_runs_and_a_newer_one_replaces_it() -> None:
    gate = threading.Event()
    calls: list[tuple[str, str]] = []

    def round_(concept: str, cfg: dict) -> str:
        calls.append((concept, "followup" if cfg.get("followup") else "round"))
        if not cfg.get("followup"):
            gate.wait(10)
        return f"run-{len(calls)}"

    t = InProcessTrigger(run_start=lambda c: "x", run_round=round_, followup_delay_s=0.05)
    look = t.run_round("cats")  # a lookahead round, still running
    first = t.run_round("cats", run_config={"followup": True}, selection=FOLLOWUP_ASSETS)
    second = t.run_round("cats", run_config={"followup": True}, selection=FOLLOWUP_ASSETS)
    assert t.status(first.run_id).state == "canceled"  # superseded while it waited
    time.sleep(0.3)
    assert t.status(second.run_id).state == "queued"  # waits while the round runs
    gate.set()
    assert _wait(t, look.run_id).state == "success"
    assert _wait(t, second.run_id).state == "success"
    assert calls == [("cats", "round"), ("cats", "followup")]
    t.shutdown()
