"""Crash safety and concurrency with real processes, real SIGKILLs and the real stores.

Marked slow: they start several Python processes. Figures (labels written / lost, kills
survived) are appended to test-artifacts/reliability.jsonl for RELIABILITY.md.
"""

import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agile_pipeline.lib.state import LabelEvent
from agile_pipeline.runner import run_concept_round
from tests.reliability.helpers import env_vars, record

pytestmark = pytest.mark.slow

WRITER = textwrap.dedent('''
    import sys, uuid
    from pathlib import Path
    from agile_pipeline.lib.state import LabelEvent, StateStore
    store = StateStore(Path(sys.argv[1]))
    ids = sys.argv[3].split(",")
    k = 0
    while True:
        e = LabelEvent("c", ids[k % len(ids)], "positive" if k % 3 else "negative", sys.argv[2],
                       event_id=f"{sys.argv[2]}-{k}")
        store.add_labels([e])
        print(e.event_id, flush=True)  # acknowledged to the "rater" only after the commit
        k += 1
''')


_record = record


_env_vars = env_vars


@pytest.mark.parametrize("kill_after", [0.5, 1.5, 3.0])
def test_sigkill_of_label_writers_loses_no_acknowledged_label(loop_home, tmp_path, kill_after, artifacts_dir):
    env = loop_home
    ids = ",".join(sorted(env.store.all_image_splits())[:50])
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(env.store.path), f"r{i}", ids],
                         stdout=subprocess.PIPE, text=True, env=_env_vars())
        for i in range(3)
    ]
    time.sleep(kill_after + random.random() * 0.3)
    acked: set[str] = set()
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        out, _ = p.communicate(timeout=30)
        acked |= {line.strip() for line in out.splitlines() if line.strip()}
    stored = {r["event_id"] for r in env.store.label_events("c")}
    lost = acked - stored
    _record(artifacts_dir, test="sigkill_label_writers", acknowledged=len(acked), lost=len(lost), kills=3)
    assert acked, "the writers acknowledged nothing before the kill"
    assert not lost
    # the store is usable right away, without repair
    env.store.add_labels([LabelEvent("c", ids.split(",")[0], "skip", "after-crash")])


def test_sigkill_mid_round_leaves_no_half_model_and_next_round_runs(loop_home, artifacts_dir):
    env = loop_home
    survived = 0
    for delay in (1.0, 2.5, 4.0):
        p = subprocess.Popen([sys.executable, "-m", "agile_pipeline.cli", "round", "c", "--force"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env_vars())
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait(30)
        # whatever round is recorded has a complete model directory
        for r in env.store.rounds("c"):
            d = Path(r["model_uri"])
            assert (d / "model.pt").exists() and (d / "meta.json").exists()
        # the latest batch is whole: either the expansion batch or a full AL batch
        b = env.store.latest_batch("c")
        assert b is not None and len(b["items"]) == 100
        survived += 1
    run_concept_round("c", training={"force": True})
    assert env.store.rounds("c")[-1]["round"] == 0
    assert len(env.store.latest_batch("c")["items"]) == 100
    _record(artifacts_dir, test="sigkill_mid_round", kills=3, survived=survived)


def test_two_round_requests_at_once_one_runs_other_is_told(loop_home):
    env = loop_home
    procs = [
        subprocess.Popen([sys.executable, "-m", "agile_pipeline.cli", "round", "c", "--force"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env_vars())
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = [p.returncode for p in procs]
    assert 0 in codes, outs
    for code, (_out, err) in zip(codes, outs, strict=True):
        if code != 0:
            assert "already running" in err, err
            assert "Traceback" not in err
    rounds = env.store.rounds("c")
    assert [r["round"] for r in rounds] == [0]
    assert len(env.store.latest_batch("c")["items"]) == 100
