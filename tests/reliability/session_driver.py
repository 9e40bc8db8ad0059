"""A scripted labeling session, the way a rater and the app run it, for the whole-session kill test.

``python -m tests.reliability.session_driver HOME LOG SEED`` (AGILE_HOME=HOME) starts the real
app server as a child process (``python -m labeling_ui --in-process``), then rates the latest
batch of concept ``c`` through its HTTP API, five ratings per request, and starts ``agile round
c`` (another child) every 15 ratings. It runs until killed.

The log is the client's memory (what the browser keeps in localStorage): ``sent ID...`` is
written (and fsynced) before a request, ``acked ID...`` after its success response. On restart,
ids sent but never acknowledged are sent again, as the app's client does; ``ready SEED`` follows
once the app answers and that re-send is acknowledged.
"""

import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

CONCEPT = "c"
RATER = "rater1"


def _log(fh, line: str) -> None:  # type: ignore[no-untyped-def]
    fh.write(line + "\n")
    fh.flush()
    os.fsync(fh.fileno())


def _post(base: str, events: list[dict[str, object]]) -> dict[str, object]:
    req = urllib.request.Request(
        f"{base}/api/labels", method="POST", headers={"Content-Type": "application/json"},
        data=json.dumps({"rater": RATER, "events": events}).encode(),
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        return dict(json.loads(resp.read()))


def _batch(base: str) -> dict[str, object]:
    with urllib.request.urlopen(f"{base}/api/batch?concept={CONCEPT}&rater={RATER}", timeout=60) as resp:
        return dict(json.loads(resp.read()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_log(log: Path) -> tuple[dict[str, dict[str, object]], set[str]]:
    """(events sent, by id; ids acknowledged). A last line cut by the kill is ignored."""
    sent: dict[str, dict[str, object]] = {}
    acked: set[str] = set()
    if not log.exists():
        return sent, acked
    text = log.read_text()
    lines = text.split("\n")[:-1]  # the part after the last newline was never completed
    for line in lines:
        kind, _, rest = line.partition(" ")
        if kind == "sent":
            for e in json.loads(rest):
                sent[str(e["event_id"])] = e
        elif kind == "acked":
            acked.update(rest.split())
    return sent, acked


def ready_count(log: Path) -> int:
    """How many sessions came up (app answering, earlier unacknowledged ratings re-sent)."""
    if not log.exists():
        return 0
    return sum(1 for line in log.read_text().split("\n")[:-1] if line.startswith("ready "))


def unacknowledged(log: Path) -> dict[str, dict[str, object]]:
    """Events sent but never acknowledged, by event id (what a client must send again)."""
    sent, acked = read_log(log)
    return {i: e for i, e in sent.items() if i not in acked}


def main(home: str, log_path: str, seed: int) -> None:
    rng = random.Random(seed)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "AGILE_HOME": home}
    # the app's and the rounds' output, for the test to show when a session stalls
    out_dir = Path(log_path).parent
    app_log = (out_dir / "session-app.log").open("ab")
    round_log = (out_dir / "session-rounds.log").open("ab")
    subprocess.Popen([sys.executable, "-m", "labeling_ui", "--in-process", "--port", str(port)], env=env,
                     stdout=app_log, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while True:
        try:
            _batch(base)
            break
        except (OSError, urllib.error.URLError):
            if time.time() > deadline:
                raise
            time.sleep(0.2)
    log = Path(log_path)
    retry = list(unacknowledged(log).values())
    with log.open("a") as fh:
        if retry:  # what the browser's localStorage would send again after a crash
            _log(fh, "sent " + json.dumps(retry))
            _post(base, retry)
            _log(fh, "acked " + " ".join(str(e["event_id"]) for e in retry))
        _log(fh, f"ready {seed}")
        round_proc: subprocess.Popen[bytes] | None = None
        n = 0
        while True:
            view = _batch(base)
            batch = view["batch"]
            todo = [it for it in view["items"] if not it["label"]]  # type: ignore[union-attr]
            if batch is None or not todo:
                if round_proc is None or round_proc.poll() is not None:
                    round_proc = subprocess.Popen([sys.executable, "-m", "agile_pipeline.cli", "round", CONCEPT],
                                                  env=env, stdout=round_log, stderr=subprocess.STDOUT)
                time.sleep(0.5)
                continue
            for k in range(0, len(todo), 5):
                events = [{
                    "concept": CONCEPT, "image_id": it["image_id"], "batch_id": batch["batch_id"],  # type: ignore[index]
                    "label": "positive" if int(it["image_id"][:2], 16) % 3 == 0 else rng.choice(["negative", "skip"]),
                    "event_id": f"s{seed}-{os.getpid()}-{n + j:05d}",
                } for j, it in enumerate(todo[k:k + 5])]
                n += len(events)
                _log(fh, "sent " + json.dumps(events))
                _post(base, events)
                _log(fh, "acked " + " ".join(str(e["event_id"]) for e in events))
                if n % 15 < 5 and (round_proc is None or round_proc.poll() is not None):
                    round_proc = subprocess.Popen([sys.executable, "-m", "agile_pipeline.cli", "round", CONCEPT],
                                                  env=env, stdout=round_log, stderr=subprocess.STDOUT)
                time.sleep(rng.uniform(0.0, 0.05))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
