"""SIGKILL of a whole labeling session at a random point: the app server, the rater's client
and any ``agile round`` it started, all at once (one process group), a few seeded times.

Every rating the client got a success response for (and logged before the kill) must be
stored, exactly once; ratings sent but never acknowledged are sent again on restart, as the
app's client does from localStorage, and are stored once; the next round runs cleanly.
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agile_pipeline.runner import run_concept_round
from tests.reliability.helpers import REPO, env_vars, record
from tests.reliability.session_driver import read_log, ready_count

pytestmark = pytest.mark.slow

KILLS = 3


def _start_session(home: Path, log: Path, seed: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.reliability.session_driver", str(home), str(log), str(seed)],
        env=env_vars(AGILE_HOME=str(home)), cwd=REPO, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def _train_exhausted(store) -> bool:  # type: ignore[no-untyped-def]
    """Every train image has a rating of concept ``c``: a long session has nothing left to rate."""
    train = {i for i, s in store.all_image_splits().items() if s == "train"}
    return train <= {r["image_id"] for r in store.label_events("c")}


def _wait_for_session(p: subprocess.Popen[bytes], log: Path, store, timeout: float = 240) -> None:  # type: ignore[no-untyped-def]
    """Wait until the session started last is up (its re-sends acknowledged) and has had a new
    rating acknowledged, or has nothing left to rate (every train image rated: a fast machine
    gets there within the kills)."""
    ready_before, acked_before = ready_count(log), len(read_log(log)[1])
    deadline = time.time() + timeout
    while not (ready_count(log) > ready_before
               and (len(read_log(log)[1]) > acked_before or _train_exhausted(store))):
        if p.poll() is not None:
            raise AssertionError(f"the session ended by itself: {p.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        if time.time() > deadline:
            try:  # leave no app server behind when the test gives up
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(30)
            err = p.stderr.read().decode(errors="replace")[-2000:] if p.stderr else ""  # type: ignore[union-attr]
            tails = {name: (log.parent / name).read_text(errors="replace")[-1500:]
                     for name in ("session-app.log", "session-rounds.log") if (log.parent / name).exists()}
            env = {k: v for k, v in os.environ.items() if k.startswith(("AGILE_", "DAGSTER_", "GRADIO_"))}
            raise AssertionError(f"the session acknowledged nothing in {timeout:.0f} s; its stderr: {err!r}; "
                                 f"environment: {env}; logs: {tails}")
        time.sleep(0.2)


def _kill_group(p: subprocess.Popen[bytes]) -> None:
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(30)
    deadline = time.time() + 30  # the group's other members (app server, round) are gone too
    while time.time() < deadline:
        try:
            os.killpg(p.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError("processes of the killed session survived")


def _assert_batch_whole(store) -> int:  # type: ignore[no-untyped-def]
    """The latest batch is whole: 100 images, or every train image still unlabelled when it was
    built (a long session runs out of them); none listed twice."""
    b = store.latest_batch("c")
    assert b is not None
    items = [it["image_id"] for it in b["items"]]
    assert len(items) == len(set(items))
    if len(items) != 100:
        labelled = {r["image_id"] for r in store.label_events("c", upto=b["label_cutoff"])}
        train = {i for i, s in store.all_image_splits().items() if s == "train"}
        assert len(items) == len(train - labelled), (len(items), len(train - labelled))
    return len(items)


def _session_rows(store) -> list[dict[str, object]]:  # type: ignore[no-untyped-def]
    return [dict(r) for r in store.label_events("c") if str(r["event_id"]).startswith("s")]


def test_sigkill_of_the_whole_session_loses_no_acknowledged_label(loop_home, tmp_path: Path, artifacts_dir: Path) -> None:
    env = loop_home
    home = env.store.path.parent
    log = tmp_path / "client.log"
    rng = random.Random(4242)
    figures = []
    for i in range(KILLS):
        p = _start_session(home, log, seed=i)
        _wait_for_session(p, log, env.store)
        time.sleep(rng.uniform(0.5, 8.0))  # a random point: mid-post, mid-round or in between
        _kill_group(p)
        sent, acked = read_log(log)
        rows = _session_rows(env.store)
        stored = [str(r["event_id"]) for r in rows]
        assert len(stored) == len(set(stored)), "a rating was stored twice"
        lost = acked - set(stored)
        assert not lost, f"{len(lost)} acknowledged ratings lost (e.g. {sorted(lost)[:3]})"
        # whatever round is recorded is whole; the latest batch is whole
        for r in env.store.rounds("c"):
            d = Path(r["model_uri"])
            assert (d / "model.pt").exists() and (d / "meta.json").exists(), d
        _assert_batch_whole(env.store)
        figures.append({"acked": len(acked), "sent_not_acked": len(set(sent) - acked),
                        "stored": len(stored), "rounds": len(env.store.rounds("c")),
                        "train_exhausted": _train_exhausted(env.store)})
    # restart: the client re-sends what was never acknowledged; every sent rating is stored once
    sent_before = set(read_log(log)[0])
    p = _start_session(home, log, seed=KILLS)
    _wait_for_session(p, log, env.store)
    _kill_group(p)
    sent, acked = read_log(log)
    stored = [str(r["event_id"]) for r in _session_rows(env.store)]
    assert len(stored) == len(set(stored))
    assert sent_before <= set(stored), "a rating sent before a kill was never stored"
    assert acked <= set(stored)
    # the next round runs cleanly, without repair
    result = run_concept_round("c", training={"force": True})
    assert result.success
    last = env.store.rounds("c")[-1]
    assert (Path(last["model_uri"]) / "model.pt").exists()
    _assert_batch_whole(env.store)
    record(artifacts_dir, test="sigkill_whole_session", kills=KILLS, per_kill=figures,
           acknowledged=len(acked), stored=len(stored), lost=0, duplicates=0,
           rounds_recorded=len(env.store.rounds("c")))
