"""Session benchmark: what a rater waits for in the deployment ``scripts/quickstart.sh`` starts.

    python -m benchmarks.session --dataset DIR --out OUT [--concept NAME] [--think 1.7]
        [--rounds 5] [--eval/--no-eval] [--synthetic N] [--lookahead L] [--keep]

(also ``agile bench-session ...``). In a fresh work directory under ``OUT`` (``OUT/agile`` is
``AGILE_HOME``, ``OUT/dagster_home`` is ``DAGSTER_HOME`` with the repository's
``dagster_home/dagster.yaml``) it

1. ingests ``--dataset`` (a labelled folder tree, every subfolder a concept) with
   ``agile ingest``, or writes the synthetic ``--synthetic N`` corpus of :mod:`benchmarks.synth`
   (the app and Dagster then run with ``AGILE_ENCODER=random:DIM``);
2. starts ``dagster-webserver``, ``dagster-daemon`` and ``agile app`` exactly as quickstart.sh
   does, in one process group (logs in ``OUT/logs``), and waits until Dagster answers, has loaded
   the code location and its daemon is healthy, and the app reports ``warm`` on ``/api/health``
   (the app's one-off preload time);
3. plays a ground-truth rater over the app's JSON API, one label per POST after ``--think``
   seconds per image, exactly as the browser does. The app starts rounds by itself as labels
   arrive (a lookahead round when ``--lookahead`` images of a batch are left, passed to the app
   as ``AGILE_APP_LOOKAHEAD``; a round when it is fully rated); the client only asks for the
   evaluation (``--client-rounds``: it asks for every round, as before automatic rounds). It measures concept created -> first image, last rating
   -> next batch (and whether that batch was ready before the last rating), eval ratings ->
   updated metrics, and the CLI (``agile candidates --ids``, ``agile search``);
4. reads Dagster's own records of every run of the concept's partition (queue time, run time,
   steps, numeric materialization metadata) and attributes each wait to the run that produced
   it;
5. writes ``OUT/session.json`` and ``OUT/session.md`` (a section for BENCHMARKS.md) and prints
   a table.

With ``--synthetic`` the text encoder is the random plumbing one: the concept's phrases carry no
meaning, so the first batch holds a planted positive only by chance; the rater then gives one
positive exemplar (the app's recovery path, ``--exemplars``) so that rounds can train. The
numbers are latencies, not model quality.
"""

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
MARKER = ".session-bench"  # written into the work dirs this benchmark may delete
PARTITION_TAG = "dagster/partition"
T = TypeVar("T")


class SessionError(RuntimeError):
    """The session cannot go on; the message says why (and where to look)."""


# ---- pure helpers (unit-tested) -----------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation (NumPy's default); ``None``
    for no values."""
    xs = sorted(float(v) for v in values)
    if not xs:
        return None
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * min(100.0, max(0.0, q)) / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def stats(values: Iterable[float | None], ndigits: int = 3) -> dict[str, Any]:
    """``{"n", "median", "p95", "min", "max", "mean", "total"}`` of the values that are numbers."""
    xs = [float(v) for v in values if isinstance(v, int | float) and v == v]
    if not xs:
        return {"n": 0, "median": None, "p95": None, "min": None, "max": None, "mean": None, "total": 0.0}

    def r(x: float | None) -> float | None:
        return None if x is None else round(x, ndigits)

    return {"n": len(xs), "median": r(statistics.median(xs)), "p95": r(percentile(xs, 95)),
            "min": r(min(xs)), "max": r(max(xs)), "mean": r(statistics.fmean(xs)), "total": r(sum(xs))}


def is_valid_concept(name: str) -> bool:
    from agile_pipeline.lib.state import StateError, validate_concept_name

    try:
        validate_concept_name(name)
    except StateError:
        return False
    return True


def choose_concept(positives: Mapping[str, set[int]], images: Sequence[Path]) -> str:
    """The default concept of a folder tree: the leaf folder (one that holds images itself)
    with the most images, ties by name; only names the app accepts."""
    leaves = {p.parent.name for p in images}
    ranked = sorted(((len(idx), name) for name, idx in positives.items()
                     if name in leaves and is_valid_concept(name)), key=lambda t: (-t[0], t[1]))
    if not ranked:
        raise SessionError("the dataset has no concept folder with a usable name "
                           "(1-64 letters, digits, spaces, '-' or '_')")
    return ranked[0][1]


@dataclass
class GroundTruth:
    """Who is positive: an image is positive iff its id is in ``positives``."""

    positives: set[str]
    known: int  # images with a resolved id (all of them for a synthetic corpus)
    unresolved: int = 0  # dataset files the state store does not know (not ingested)
    exemplar_pool: list[str] = field(default_factory=list)  # positives, train split first

    def label(self, image_id: str) -> str:
        return "positive" if image_id in self.positives else "negative"


def ground_truth(images: Sequence[Path], positive_index: Iterable[int],
                 resolve: Callable[[str], str | None]) -> GroundTruth:
    """Ground truth of a folder tree: ``images`` are every file, ``positive_index`` the indices
    of the concept's files, ``resolve`` maps a path to its image id (``None``: not ingested).
    A file that is a duplicate of a positive shares its id, so it is positive too."""
    pos_idx = set(positive_index)
    positives: set[str] = set()
    known: set[str] = set()
    unresolved = 0
    for k, p in enumerate(images):
        image_id = resolve(str(p))
        if image_id is None:
            unresolved += 1
            continue
        known.add(image_id)
        if k in pos_idx:
            positives.add(image_id)
    return GroundTruth(positives, len(known), unresolved)


def order_exemplars(positives: Iterable[str], split_of: Mapping[str, str | None]) -> list[str]:
    """Positives to offer as exemplars: train split first, then the rest, each sorted."""
    return sorted(positives, key=lambda i: (split_of.get(i) != "train", i))


def overlap(a0: float, a1: float, b0: float | None, b1: float | None) -> float:
    """Seconds that ``[a0, a1]`` and ``[b0, b1]`` share (``None`` bounds: open)."""
    lo = max(a0, b0 if b0 is not None else a0)
    hi = min(a1, b1 if b1 is not None else a1)
    return max(0.0, hi - lo)


def producer_of(marker: float | None, runs: Sequence[Mapping[str, Any]], *,
                job: str | None = None, slack: float = 1.0) -> Mapping[str, Any] | None:
    """The run that produced what the rater waited for, ``marker`` seconds since the epoch
    (the batch's ``created_at``, the metrics file's mtime): the latest-created run of ``job``
    (any job if ``None``) alive at that moment (``slack`` seconds of clock and commit jitter)."""
    if marker is None:
        return None
    alive = [r for r in runs
             if (job is None or r.get("job") == job)
             and r.get("created_at") is not None and r["created_at"] - slack <= marker
             and (r.get("start") is None or r["start"] - slack <= marker)
             and (r.get("end") is None or marker <= r["end"] + slack)]
    return max(alive, key=lambda r: r["created_at"]) if alive else None


def run_kind(run: Mapping[str, Any]) -> str | None:
    """What the app asked the run for, from its tags: lookahead, follow-up or eval (else None)."""
    tags = run.get("tags") or {}
    for tag, kind in (("agile/lookahead", "lookahead"), ("agile/followup", "follow-up"),
                      ("agile/evaluation", "eval")):
        if str(tags.get(tag, "")).lower() in ("1", "true", "yes"):
            return kind
    return None


def attribute_wait(wait: Mapping[str, Any], runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Split one wait of the rater (``start``/``end`` epoch seconds; ``marker``: when what it
    waited for was committed; optional ``job``) over the run that produced it.

    ``before_run_s``: the wait before that run was created (app -> Dagster request); ``queued_s``:
    created -> started (run queue, launch); ``run_to_ready_s``: started -> marker (run worker
    start-up and the steps up to the commit; per step in ``steps_s``); ``after_ready_s``: marker
    -> the client saw it (polling and the app's own latency). Each is the part inside the wait,
    so they add up to the wait when the marker falls inside it. ``other_runs``: runs of the
    partition that overlapped the wait (a lookahead run the round queued behind, say).
    """
    t0, t1 = float(wait["start"]), float(wait["end"])
    marker = wait.get("marker")
    out: dict[str, Any] = {"name": wait["name"], "seconds": round(t1 - t0, 3)}
    run = producer_of(marker, runs, job=wait.get("job")) or producer_of(marker, runs)
    if run is None:
        out["run_id"] = None
        out["note"] = "no run of the partition produced this" if marker is not None else "no marker"
    else:
        c, s = run["created_at"], run.get("start")
        m = float(marker) if marker is not None else t1
        out.update({
            "run_id": run["run_id"], "job": run.get("job"), "trigger": run.get("tags", {}).get("agile/trigger"),
            "lookahead": run.get("tags", {}).get("agile/lookahead"), "kind": run_kind(run),
            "run_created_before_wait": c < t0,
            "before_run_s": round(overlap(t0, t1, None, c), 3),
            "queued_s": round(overlap(t0, t1, c, s if s is not None else m), 3),
            "run_to_ready_s": round(overlap(t0, t1, s, m) if s is not None else 0.0, 3),
            "after_ready_s": round(overlap(t0, t1, m, None), 3),
            "marker_after_wait_start_s": round(m - t0, 3),
        })
        steps: dict[str, float] = {}
        first_step = min((st["start"] for st in run.get("steps", []) if st.get("start") is not None), default=None)
        if s is not None and first_step is not None:
            steps["(run start -> first step)"] = round(overlap(t0, min(t1, m), s, first_step), 3)
        for st in run.get("steps", []):
            sec = overlap(t0, min(t1, m), st.get("start"), st.get("end"))
            if sec > 0:
                steps[st["key"]] = round(sec, 3)
        out["steps_s"] = steps
    others = []
    for r in runs:
        if run is not None and r["run_id"] == run["run_id"]:
            continue
        sec = overlap(t0, t1, r.get("created_at"), r.get("end"))
        if sec > 0:
            others.append({"run_id": r["run_id"], "job": r.get("job"), "kind": run_kind(r),
                           "overlap_s": round(sec, 3)})
    out["other_runs"] = others
    return out


def session_waits(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every wait of the session as ``{"name", "start", "end", "marker", "job"}`` (epoch s)."""
    waits: list[dict[str, Any]] = []
    cr = doc.get("create") or {}
    if cr.get("create_to_first_image_s") is not None:
        waits.append({"name": "create_to_first_image", "start": cr["sent_at"], "end": cr["seen_at"],
                      "marker": (cr.get("first_batch") or {}).get("created_at"), "job": "concept_start_job"})
    waits += [{"name": f"next_batch[{r['index']}]", "start": r["last_ack_at"], "end": r["seen_at"],
               "marker": r.get("next_created_at"), "job": "concept_round_job"}
              for r in doc.get("rounds") or [] if r.get("last_rating_to_next_batch_s") is not None]
    ev = doc.get("eval") or {}
    if ev.get("eval_update_to_metrics_s") is not None:
        waits.append({"name": "eval_update_to_metrics", "start": ev["request_sent_at"], "end": ev["seen_at"],
                      "marker": ev.get("metrics_mtime"), "job": None})
    return waits


def summarize(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The headline numbers of a session document (see :func:`session_waits`)."""
    cr = doc.get("create") or {}
    rounds = doc.get("rounds") or []
    ev = doc.get("eval") or {}
    nb = [r.get("last_rating_to_next_batch_s") for r in rounds]
    ready = [r["ready_before_last_rating"] for r in rounds if r.get("ready_before_last_rating") is not None]
    waits = [cr.get("create_to_first_image_s"), *nb, ev.get("eval_update_to_metrics_s")]
    total_wait = sum(w for w in waits if isinstance(w, int | float))
    wall = doc.get("session_wall_s")
    label_ms = [x for r in rounds for x in r.get("label_post_ms_all", [])] + list(ev.get("label_post_ms_all", []))
    return {
        "create_to_first_image_s": stats([cr.get("create_to_first_image_s")]),
        "last_rating_to_next_batch_s": stats(nb),
        "eval_update_to_metrics_s": stats([ev.get("eval_update_to_metrics_s")]),
        "next_batch_ready_before_last_rating": f"{sum(ready)}/{len(ready)}",
        "batches_rated": len(rounds),
        "exemplars_given": sum(len(r.get("exemplars") or []) for r in rounds),
        "labels_posted": sum(int(r.get("rated", 0)) for r in rounds) + int(ev.get("rated", 0) or 0),
        "label_post_ms": stats(label_ms, 1),
        "session_wall_s": round(wall, 3) if isinstance(wall, int | float) else None,
        "total_wait_s": round(total_wait, 3),
        "wait_share": round(total_wait / wall, 4) if isinstance(wall, int | float) and wall > 0 else None,
    }


def deployment_env(base: Mapping[str, str], out: Path, *, encoder: str | None = None,
                   lookahead: int | None = None, bin_dir: Path | None = None,
                   trigger: str | None = None) -> dict[str, str]:
    """The environment quickstart.sh gives the deployment, pointed at ``out``."""
    env = {k: v for k, v in base.items()
           if k not in ("AGILE_DAGSTER_URL", "AGILE_APP_TRIGGER", "AGILE_APP_AUTH", "AGILE_MLFLOW_URI",
                        "AGILE_ENCODER", "AGILE_APP_LOOKAHEAD", "AGILE_APP_AUTO_ROUND")}
    env.update({
        "AGILE_HOME": str(out / "agile"), "DAGSTER_HOME": str(out / "dagster_home"),
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    })
    if bin_dir is not None:
        env["PATH"] = str(bin_dir) + os.pathsep + env.get("PATH", "")
    if encoder:
        env["AGILE_ENCODER"] = encoder
    if lookahead is not None:
        env["AGILE_APP_LOOKAHEAD"] = str(lookahead)
    if trigger:
        env["AGILE_APP_TRIGGER"] = trigger
    return env


def numeric_metadata(metadata: Mapping[str, Any]) -> dict[str, float | int]:
    """The int/float entries of a materialization's metadata (``MetadataValue`` or plain)."""
    out: dict[str, float | int] = {}
    for k, v in metadata.items():
        value = getattr(v, "value", v)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if isinstance(value, float) and value != value:
            continue
        out[str(k)] = value
    return out


def run_record(run_id: str, job: str, status: str, tags: Mapping[str, str], created_at: float,
               start: float | None, end: float | None, steps: Sequence[Mapping[str, Any]] = (),
               metadata: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """One Dagster run as the breakdown reports it (times in epoch seconds)."""
    tags = {k: v for k, v in tags.items() if k.startswith("agile/") or k == PARTITION_TAG}
    req: float | None
    try:
        req = float(tags["agile/requested_at"]) if "agile/requested_at" in tags else None
    except ValueError:
        req = None
    return {
        "run_id": run_id, "job": job, "status": status, "tags": tags,
        "created_at": created_at, "start": start, "end": end,
        "request_to_create_s": round(created_at - req, 3) if req is not None else None,
        "queue_s": round(start - created_at, 3) if start is not None else None,
        "queue_since_request_s": round(start - req, 3) if start is not None and req is not None else None,
        "run_s": round(end - start, 3) if start is not None and end is not None else None,
        "steps": [dict(s) for s in steps],
        "metadata": {k: dict(v) for k, v in (metadata or {}).items()},
    }


def _num(x: Any, spec: str = ".2f") -> str:
    return format(x, spec) if isinstance(x, int | float) and not isinstance(x, bool) and x == x else "–"


def round_rows(doc: Mapping[str, Any]) -> list[list[str]]:
    """One row per wait: what, seconds, ready before, producer run, where the time went."""
    by_name = {w["name"]: w for w in (doc.get("dagster") or {}).get("waits", [])}
    rows: list[list[str]] = []

    def where(name: str) -> list[str]:
        w = by_name.get(name) or {}
        steps = w.get("steps_s") or {}
        top = ", ".join(f"{k} {v:.2f}" for k, v in sorted(steps.items(), key=lambda kv: -kv[1])[:3])
        job = w.get("job") or "–"
        if w.get("kind"):
            job += f" ({w['kind']})"
        return [job, _num(w.get("before_run_s")), _num(w.get("queued_s")), _num(w.get("run_to_ready_s")),
                _num(w.get("after_ready_s")), top or "–"]

    cr = doc.get("create") or {}
    if cr:
        fb = cr.get("first_batch") or {}
        rows.append(["concept → first image", f"{fb.get('kind', '?')} {fb.get('size', '?')}", "–",
                     _num(cr.get("create_to_first_image_s")), "–", *where("create_to_first_image")])
    for r in doc.get("rounds") or []:
        ready = r.get("ready_before_last_rating")
        rows.append([f"batch {r['index']} ({r.get('kind')}) → next", f"{r.get('rated')}/{r.get('size')}",
                     _num(r.get("rating_s"), ".1f"), _num(r.get("last_rating_to_next_batch_s")),
                     "yes" if ready else ("no" if ready is not None else "–"),
                     *where(f"next_batch[{r['index']}]")])
    ev = doc.get("eval") or {}
    if ev.get("eval_update_to_metrics_s") is not None or ev.get("rated"):
        rows.append(["eval ratings → metrics", f"{ev.get('rated', 0)}/{ev.get('size', '?')}",
                     _num(ev.get("rating_s"), ".1f"), _num(ev.get("eval_update_to_metrics_s")), "–",
                     *where("eval_update_to_metrics")])
    return rows


ROUND_HEADER = ["wait", "rated", "rating s", "wait s", "ready before", "run", "before run s",
                "queued s", "run→ready s", "after ready s", "largest steps (s in wait)"]


def _lookahead(doc: Mapping[str, Any]) -> str:
    eff, asked = doc.get("lookahead_effective"), doc.get("lookahead")
    if eff is not None:
        return str(eff) + ("" if asked is not None else " (its default)")
    return str(asked) if asked is not None else "the app's default"


def markdown(doc: Mapping[str, Any]) -> str:
    """A section for BENCHMARKS.md: command, machine, load, headline numbers and the table."""
    m = doc.get("machine") or {}
    s = doc.get("summary") or {}
    setup = doc.get("setup") or {}
    la0, la1 = doc.get("loadavg_start") or [], doc.get("loadavg_end") or []

    def la(x: Sequence[float]) -> str:
        return " / ".join(f"{v:.2f}" for v in x) if x else "?"

    def st(key: str) -> str:
        d = s.get(key) or {}
        return f"{_num(d.get('median'))} s median, {_num(d.get('p95'))} s p95 (n = {d.get('n', 0)})"

    lines = [
        f"### Session benchmark: {doc.get('concept')!r} on {doc.get('dataset_label')} ({doc.get('started_at', '')[:10]})",
        "",
        f"Command: `{doc.get('command')}`",
        "",
        f"Machine: {m.get('cpu', '?')}, {m.get('cpu_count', '?')} cores "
        f"({' '.join(m.get('cpu_flags') or []) or 'SIMD flags not recorded'}), {_num(m.get('ram_gib'), '.1f')} GiB RAM, "
        f"{m.get('platform', '?')}; load average (1/5/15 min) {la(la0)} at start, {la(la1)} at end.",
        "",
        f"Setup (one-off, not rater waits): {doc.get('corpus_step', 'corpus')} {_num(setup.get('corpus_s'), '.1f')} s; "
        f"Dagster answering {_num(setup.get('dagster_ready_s'), '.1f')} s, code loaded "
        f"{_num(setup.get('dagster_code_loaded_s'), '.1f')} s, daemon healthy {_num(setup.get('daemon_ready_s'), '.1f')} s; "
        f"app warm {_num(setup.get('app_warm_s'), '.1f')} s after start (preload {_num((setup.get('preload') or {}).get('seconds'), '.1f')} s).",
        "",
        f"Rater: think {doc.get('think_s')} s per image, app lookahead {_lookahead(doc)}, "
        f"batches rated {s.get('batches_rated', 0)}, labels {s.get('labels_posted', 0)}, "
        f"exemplars given {s.get('exemplars_given', 0)}; "
        f"label POST {_num((s.get('label_post_ms') or {}).get('median'), '.1f')} ms median.",
        "",
        f"- concept created → first image: {st('create_to_first_image_s')}",
        f"- last rating → next batch: {st('last_rating_to_next_batch_s')}; next batch ready before the "
        f"last rating in {s.get('next_batch_ready_before_last_rating', '0/0')}",
        f"- eval ratings → metrics: {st('eval_update_to_metrics_s')}",
    ]
    for key, d in (doc.get("cli") or {}).items():
        lines.append(f"- CLI `{d.get('command_short', key)}`: {_num(d.get('median_s'))} s median of {len(d.get('runs_s', []))}")
    lines += [
        f"- session {_num(s.get('session_wall_s'), '.1f')} s, of which the rater waited "
        f"{_num(s.get('total_wait_s'), '.1f')} s (wait share {_num((s.get('wait_share') or 0) * 100, '.1f')} %)",
        "",
        "| " + " | ".join(ROUND_HEADER) + " |",
        "|" + "|".join("---" if i == 0 or i in (5, 10) else "---:" for i in range(len(ROUND_HEADER))) + "|",
    ]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in round_rows(doc)]
    if doc.get("errors"):
        lines += ["", "Errors: " + "; ".join(str(e) for e in doc["errors"])]
    return "\n".join(lines) + "\n"


# ---- machine ---------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    from benchmarks.measure import cpu_model_and_flags

    cpu, flags = cpu_model_and_flags()
    try:
        import psutil

        ram = psutil.virtual_memory().total / 2**30
    except ImportError:  # pragma: no cover - psutil is a dependency
        ram = float("nan")
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_flags": flags, "cpu_count": os.cpu_count(), "cpus_usable": usable, "ram_gib": round(ram, 1)}


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []


# ---- processes -------------------------------------------------------------------------------
def tool(name: str) -> list[str]:
    """The command of a console script of this environment (venv first)."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return [str(here)]
    found = shutil.which(name)
    if found:
        return [found]
    if name == "agile":
        return [sys.executable, "-m", "agile_pipeline.cli"]
    raise SessionError(f"{name} is not installed in this environment (run scripts/setup.sh)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _kill_group(pgid: int, grace: float = 15.0, reap: Callable[[], object] | None = None) -> str:
    """SIGTERM the process group, then SIGKILL what is left after ``grace`` seconds. ``reap``
    collects our own exited children (a zombie still counts as a member of its group)."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return "already gone"
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if reap is not None:
            reap()
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return "terminated"
        time.sleep(0.2)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return "terminated"
    return "killed"


def run_logged(cmd: Sequence[str], env: Mapping[str, str], log_path: Path, *,
               timeout: float, cwd: Path = ROOT) -> tuple[int, float]:
    """Run ``cmd`` in its own process group, output appended to ``log_path``; (rc, seconds).
    The group is killed on timeout or interrupt."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        log.write(f"$ {shlex.join(cmd)}\n".encode())
        log.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=dict(env), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except BaseException:
            _kill_group(proc.pid, grace=5, reap=proc.poll)
            proc.wait()
            raise
        return rc, time.perf_counter() - t0


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


class Deployment:
    """dagster-webserver, dagster-daemon and ``agile app`` as quickstart.sh starts them, in
    one process group (so one signal stops them and every run worker they spawned)."""

    def __init__(self, env: Mapping[str, str], logs: Path, *, dagster_port: int | None = None,
                 app_port: int | None = None) -> None:
        self.env = dict(env)
        self.logs = logs
        self.dagster_port = dagster_port or free_port()
        self.app_port = app_port or free_port()
        while self.app_port == self.dagster_port:
            self.app_port = free_port()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.pgid: int | None = None
        self.started_at: float | None = None  # perf_counter
        self._files: list[Any] = []

    @property
    def dagster_url(self) -> str:
        return f"http://127.0.0.1:{self.dagster_port}"

    @property
    def app_url(self) -> str:
        return f"http://127.0.0.1:{self.app_port}"

    def commands(self) -> dict[str, list[str]]:
        return {
            "dagster-webserver": [*tool("dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1",
                                  "-p", str(self.dagster_port)],
            "dagster-daemon": [*tool("dagster-daemon"), "run", "-w", "workspace.yaml"],
            "app": [*tool("agile"), "app", "--port", str(self.app_port), "--dagster-url", self.dagster_url],
        }

    def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.started_at = time.perf_counter()
        for name, cmd in self.commands().items():
            log = (self.logs / f"{name}.log").open("ab")
            self._files.append(log)
            log.write(f"$ {shlex.join(cmd)}\n".encode())
            log.flush()
            # a new process group in this session: the others join it (a group in another
            # session cannot be joined), and one killpg stops them all
            kw: dict[str, Any] = {"process_group": 0 if self.pgid is None else self.pgid}
            p = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, **kw)
            if self.pgid is None:
                self.pgid = p.pid
            self.procs[name] = p

    def dead(self) -> str | None:
        """A message if one of the processes has exited."""
        for name, p in self.procs.items():
            rc = p.poll()
            if rc is not None:
                log = self.logs / f"{name}.log"
                return f"{name} exited with code {rc}; last lines of {log}:\n{_tail(log)}"
        return None

    def stop(self) -> str:
        out = "not started"
        if self.pgid is not None:
            out = _kill_group(self.pgid, reap=lambda: [p.poll() for p in self.procs.values()])
        for p in self.procs.values():
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in self._files:
            f.close()
        self._files.clear()
        return out


# ---- HTTP ------------------------------------------------------------------------------------
class ApiError(RuntimeError):
    def __init__(self, method: str, path: str, status: int, detail: str) -> None:
        super().__init__(f"{method} {path} -> HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class AppClient:
    """The browser's side of the JSON API (one keep-alive connection, as a browser tab)."""

    def __init__(self, base_url: str, timeout: float = 120.0) -> None:
        import httpx

        self.base = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base, timeout=timeout, trust_env=False)

    def close(self) -> None:
        self._http.close()

    def _answer(self, method: str, path: str, resp: Any) -> Any:
        if resp.status_code >= 400:
            try:
                detail = resp.json().get("detail", resp.text)
            except (ValueError, AttributeError):
                detail = resp.text[:300]
            raise ApiError(method, path, resp.status_code, str(detail))
        return resp.json()

    def get(self, path: str, **params: Any) -> Any:
        return self._answer("GET", path, self._http.get(path, params=params))

    def post(self, path: str, body: Mapping[str, Any]) -> Any:
        resp = self._http.post(path, content=json.dumps(body).encode(),
                               headers={"Content-Type": "application/json"})
        return self._answer("POST", path, resp)


def _transient(exc: BaseException) -> bool:
    import httpx

    return isinstance(exc, httpx.TransportError) or (isinstance(exc, ApiError) and exc.status >= 500)


def wait_until(check: Callable[[], T | None], *, timeout: float, interval: float, what: str,
               dead: Callable[[], str | None] | None = None) -> tuple[T, float]:
    """Call ``check`` every ``interval`` s until it returns a value; (value, seconds). Connection
    errors and 5xx count as "not yet"; raises :class:`SessionError` on timeout or when ``dead``
    reports a dead process."""
    t0 = time.perf_counter()
    last_err = ""
    while True:
        try:
            v = check()
        except Exception as exc:
            if not _transient(exc):
                raise
            v, last_err = None, str(exc)
        if v is not None:
            return v, time.perf_counter() - t0
        if dead is not None:
            msg = dead()
            if msg:
                raise SessionError(f"waiting for {what}: {msg}")
        if time.perf_counter() - t0 > timeout:
            raise SessionError(f"{what}: not after {timeout:.0f} s" + (f" (last error: {last_err})" if last_err else ""))
        time.sleep(interval)


def _gql(client: AppClient, query: str) -> dict[str, Any]:
    data = client.post("/graphql", {"query": query, "variables": {}})
    return dict(data.get("data") or {})


_REPOS = "query { repositoriesOrError { __typename ... on RepositoryConnection { nodes { name } } } }"
_DAEMONS = "query { instance { daemonHealth { allDaemonStatuses { daemonType required healthy } } } }"


# ---- the session -----------------------------------------------------------------------------
@dataclass
class Options:
    dataset: Path | None
    out: Path
    concept: str | None = None
    think: float = 1.7
    rounds: int = 5
    eval: bool = True
    synthetic: int | None = None
    dim: int = 512
    lookahead: int | None = None
    trigger: str | None = None
    keep: bool = False
    rater: str = "bench"
    poll: float = 0.05
    timeout: float = 900.0
    stall: float = 90.0
    exemplars: bool = True
    client_rounds: bool = False
    cli_repeats: int = 3
    ready_timeout: float = 900.0
    command: str = ""


def _now() -> float:
    return time.time()


def _round_view_brief(view: Mapping[str, Any] | None) -> dict[str, Any]:
    v = view or {}
    return {k: v.get(k) for k in ("state", "job", "run_id", "batch_id", "new_batch", "requested_at",
                                  "finished_at", "message", "seconds_to_batch")}


def _in_flight(view: Mapping[str, Any] | None) -> bool:
    v = view or {}
    return bool(v.get("in_flight", v.get("state") in ("queued", "running")))


class Rater:
    """Plays the ground-truth rater over the app's API and records every wait."""

    def __init__(self, opts: Options, client: AppClient, truth: GroundTruth, deployment: Deployment,
                 log: Callable[[str], None]) -> None:
        self.o = opts
        self.c = client
        self.truth = truth
        self.dep = deployment
        self.log = log
        self.concept = ""
        self.positives_given = 0
        self.exemplars_used: list[str] = []
        self.rated: set[str] = set()

    # -- API calls
    def batch(self, purpose: str = "train") -> dict[str, Any]:
        return dict(self.c.get("/api/batch", concept=self.concept, rater=self.o.rater, purpose=purpose))

    def post_label(self, batch_id: int, image_id: str, label: str) -> float:
        ev = {"event_id": uuid.uuid4().hex, "concept": self.concept, "batch_id": batch_id,
              "image_id": image_id, "label": label, "ts": _now()}
        t0 = time.perf_counter()
        self.c.post("/api/labels", {"rater": self.o.rater, "events": [ev]})
        return (time.perf_counter() - t0) * 1000

    # -- steps
    def create(self, name: str, positives: list[str], negatives: list[str], instructions: str) -> dict[str, Any]:
        sent_at, t0 = _now(), time.perf_counter()
        resp = self.c.post("/api/concepts", {"name": name, "positives": positives, "negatives": negatives,
                                             "instructions": instructions, "rater": self.o.rater})
        response_s = time.perf_counter() - t0
        self.concept = str((resp.get("concept") or {}).get("name") or name)
        view, _ = self._poll(lambda v: v if (v.get("batch") and v.get("items")) else None,
                             what="the first batch", since=t0)
        seen_at = _now()
        return {"sent_at": sent_at, "seen_at": seen_at, "response_s": round(response_s, 3),
                "create_to_first_image_s": round(time.perf_counter() - t0, 3),
                "round_view_at_create": _round_view_brief(resp.get("round")),
                "round_view": _round_view_brief(view.get("round")),
                "first_batch": dict(view["batch"]), "_view": view}

    def _poll(self, accept: Callable[[dict[str, Any]], dict[str, Any] | None], *, what: str,
              since: float, purpose: str = "train", stall_from: float | None = None,
              last_rating_at: float | None = None) -> tuple[dict[str, Any], int]:
        """GET /api/batch every ``poll`` s until ``accept`` takes the view; (view, polls)."""
        polls = 0
        while True:
            polls += 1
            try:
                view = self.batch(purpose)
            except Exception as exc:
                if not _transient(exc):
                    raise
                view = {}
            got = accept(view) if view else None
            if got is not None:
                return got, polls
            elapsed = time.perf_counter() - since
            msg = self.dep.dead()
            if msg:
                raise SessionError(f"waiting for {what}: {msg}")
            if elapsed > self.o.timeout:
                raise SessionError(f"{what} did not come within {self.o.timeout:.0f} s; round: "
                                   f"{_round_view_brief(view.get('round'))}; see {self.dep.logs}")
            if (stall_from is not None and time.perf_counter() - stall_from > self.o.stall
                    and view and not _in_flight(view.get("round"))):
                rv = view.get("round") or {}
                when = ""
                req, fin = rv.get("requested_at"), rv.get("finished_at")
                if last_rating_at is not None and isinstance(req, int | float):
                    when = f", requested {req - last_rating_at:+.2f} s"
                    if isinstance(fin, int | float):
                        when += f" and finished {fin - last_rating_at:+.2f} s"
                    when += " from the batch's last rating"
                raise SessionError(
                    f"{what}: nothing came {self.o.stall:.0f} s after the last rating and no round is "
                    f"running (the app's latest round: state {rv.get('state')!r}, job {rv.get('job')!r}"
                    f"{when}, message {rv.get('message')!r}): the app started no round when the batch "
                    "was fully rated")
            time.sleep(self.o.poll)

    def _maybe_exemplar(self, batch_positives: int) -> str | None:
        """A rater stuck without a single positive gives one exemplar image (the recovery path)."""
        if not self.o.exemplars or self.positives_given or batch_positives:
            return None
        for image_id in self.truth.exemplar_pool:
            if image_id not in self.rated and image_id not in self.exemplars_used:
                self.c.post("/api/exemplars", {"concept": self.concept, "image_id": image_id,
                                               "polarity": "positive", "rater": self.o.rater})
                self.exemplars_used.append(image_id)
                self.positives_given += 1
                return image_id
        return None

    def rate(self, view: Mapping[str, Any], purpose: str = "train") -> dict[str, Any]:
        """Rate the batch's unrated items in order, ``think`` s before each, one POST each."""
        b = view["batch"]
        items = [it for it in view.get("items", []) if not it.get("label")]
        rec: dict[str, Any] = {"batch_id": b["batch_id"], "kind": b.get("kind"), "round": b.get("round"),
                               "size": b.get("size", len(view.get("items", []))), "created_at": b.get("created_at"),
                               "rated": 0, "positives": 0, "exemplars": [], "rating_started_at": _now()}
        lat: list[float] = []
        t0 = time.perf_counter()
        last_sent = last_ack = None
        for k, it in enumerate(items):
            if self.o.think > 0:
                time.sleep(self.o.think)
            label = self.truth.label(it["image_id"])
            if purpose == "train" and k == len(items) - 1:
                ex = self._maybe_exemplar(rec["positives"] + (label == "positive"))
                if ex:
                    rec["exemplars"].append(ex)
            last_sent = _now()
            lat.append(self.post_label(int(b["batch_id"]), it["image_id"], label))
            last_ack = _now()
            self.rated.add(it["image_id"])
            rec["rated"] += 1
            if label == "positive":
                rec["positives"] += 1
                if purpose == "train":
                    self.positives_given += 1
        rec.update({"rating_s": round(time.perf_counter() - t0, 3), "last_rating_at": last_sent,
                    "last_ack_at": last_ack, "label_post_ms": stats(lat, 1),
                    "label_post_ms_all": [round(x, 1) for x in lat]})
        return rec

    def next_batch(self, rec: dict[str, Any]) -> dict[str, Any]:
        """Wait from the last rating's ack until the app serves a newer batch with work in it."""
        rated_id = int(rec["batch_id"])
        t0 = time.perf_counter()
        if rec.get("last_ack_at") is None:
            rec["last_ack_at"] = _now()
        if self.o.client_rounds:
            rv = self.c.post("/api/rounds", {"concept": self.concept, "job": "round", "rater": self.o.rater})
            rec["client_round_view"] = _round_view_brief(rv)

        def newer(v: dict[str, Any]) -> dict[str, Any] | None:
            b = v.get("batch")
            if b and int(b["batch_id"]) > rated_id and any(not it.get("label") for it in v.get("items", [])):
                return v
            return None

        view, polls = self._poll(newer, what=f"the batch after {rated_id}", since=t0, stall_from=t0,
                                 last_rating_at=rec.get("last_rating_at"))
        wait = time.perf_counter() - t0
        b = view["batch"]
        created = b.get("created_at")
        rec.update({
            "seen_at": _now(), "last_rating_to_next_batch_s": round(wait, 3), "polls": polls,
            "next_batch_id": b["batch_id"], "next_kind": b.get("kind"), "next_round": b.get("round"),
            "next_size": b.get("size"), "next_created_at": created,
            "ready_before_last_rating": (bool(created <= rec["last_rating_at"])
                                         if isinstance(created, int | float) and rec.get("last_rating_at") else None),
            "round_view": _round_view_brief(view.get("round")),
        })
        rec["_view"] = view
        return rec

    def settle(self, timeout: float | None = None) -> float:
        """Wait until no round of the concept is in flight (not a rater wait: excluded)."""
        t0 = time.perf_counter()

        def idle() -> dict[str, Any] | None:
            v = dict(self.c.get("/api/round", concept=self.concept))
            return v if not _in_flight(v) else None

        wait_until(idle, timeout=self.o.timeout if timeout is None else timeout, interval=0.25,
                   what="the last round to finish", dead=self.dep.dead)
        return round(time.perf_counter() - t0, 3)

    def evaluate(self) -> dict[str, Any]:
        view = self.batch("eval")
        if not view.get("batch"):
            raise SessionError("the app has no evaluation batch for the concept")
        rec = self.rate(view, purpose="eval")
        posted = rec["rated"]
        counts = view.get("counts") or {}
        expected = posted + int(counts.get("positive", 0) or 0) + int(counts.get("negative", 0) or 0)
        sent_at, t0 = _now(), time.perf_counter()
        rv = self.c.post("/api/rounds", {"concept": self.concept, "job": "eval", "rater": self.o.rater})
        rec["request_response_s"] = round(time.perf_counter() - t0, 3)
        rec["request_view"] = _round_view_brief(rv)
        if rv.get("state") in ("error", "unreachable"):
            raise SessionError(f"the app refused the evaluation: {rv.get('state')}: {rv.get('message')}")

        def updated() -> dict[str, Any] | None:
            m = dict(self.c.get("/api/models", concept=self.concept))
            metrics = m.get("metrics") or {}
            mtime = m.get("metrics_mtime")
            if not metrics:
                return None
            if isinstance(mtime, int | float):
                if mtime < sent_at - 0.01:
                    return None
                if int(metrics.get("n_eval_labels", -1)) != expected:
                    # rewritten since the request, counting otherwise: done once the run is
                    rv = dict(self.c.get("/api/round", concept=self.concept))
                    return m if rv.get("job") == "eval" and rv.get("state") in ("success", "failure") else None
                return m
            return m if int(metrics.get("n_eval_labels", -1)) == expected else None

        models, _ = wait_until(updated, timeout=self.o.timeout, interval=self.o.poll,
                               what=f"metrics over {expected} eval labels", dead=self.dep.dead)
        metrics = models.get("metrics") or {}
        rec.update({
            "request_sent_at": sent_at, "seen_at": _now(),
            "eval_update_to_metrics_s": round(time.perf_counter() - t0, 3),
            "expected_eval_labels": expected, "n_eval_labels": metrics.get("n_eval_labels"),
            "metrics_mtime": models.get("metrics_mtime"),
            "models": [{k: r.get(k) for k in ("model", "n_labels", "auc_pr", "auc_roc", "f1")}
                       for r in (metrics.get("models") or [])[:12] if isinstance(r, Mapping)],
        })
        return rec


# ---- Dagster's records -----------------------------------------------------------------------
def dagster_runs(dagster_home: Path, concept: str) -> list[dict[str, Any]]:
    """Every run of the concept's partition from the instance's own storage, oldest first."""
    import dagster as dg

    out: list[dict[str, Any]] = []
    with dg.DagsterInstance.from_config(str(dagster_home)) as inst:
        records = inst.get_run_records(filters=dg.RunsFilter(tags={PARTITION_TAG: concept}))
        for rec in sorted(records, key=lambda r: r.create_timestamp):
            run = rec.dagster_run
            steps = [{"key": s.step_key, "status": s.status.value if s.status else None,
                      "start": s.start_time, "end": s.end_time,
                      "seconds": round(s.end_time - s.start_time, 3)
                      if s.start_time is not None and s.end_time is not None else None}
                     for s in inst.get_run_step_stats(run.run_id)]
            metadata: dict[str, dict[str, Any]] = {}
            for e in inst.all_logs(run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION):
                mat = e.asset_materialization
                if mat is None:
                    continue
                metadata.setdefault(mat.asset_key.to_user_string(), {}).update(numeric_metadata(mat.metadata))
            out.append(run_record(run.run_id, run.job_name, run.status.value, dict(run.tags),
                                  rec.create_timestamp.timestamp(), rec.start_time, rec.end_time,
                                  steps, metadata))
    return out


# ---- orchestration ---------------------------------------------------------------------------
def _fresh_dir(path: Path) -> None:
    if path.exists():
        if not (path / MARKER).exists():
            raise SessionError(f"{path} exists and was not made by this benchmark: choose another --out")
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / MARKER).write_text("made by benchmarks/session.py; deleted by its next run\n")


def _write(doc: Mapping[str, Any], out: Path) -> None:
    def default(o: Any) -> Any:
        if isinstance(o, Path):
            return str(o)
        if hasattr(o, "item"):
            return o.item()
        if isinstance(o, set):
            return sorted(o)
        raise TypeError(type(o))

    clean = {k: v for k, v in doc.items() if not k.startswith("_")}
    tmp = out / "session.json.tmp"
    tmp.write_text(json.dumps(clean, indent=1, default=default))
    tmp.replace(out / "session.json")
    (out / "session.md").write_text(markdown(doc))


def print_table(doc: Mapping[str, Any]) -> None:
    rows = round_rows(doc)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(ROUND_HEADER)]
        print("  ".join(h.ljust(w) for h, w in zip(ROUND_HEADER, widths, strict=True)))
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    else:
        table = Table(title=f"session: {doc.get('concept')!r} on {doc.get('dataset_label')}")
        for i, h in enumerate(ROUND_HEADER):
            table.add_column(h, justify="left" if i in (0, 5, 10) else "right")
        for r in rows:
            table.add_row(*r)
        Console(width=None if sys.stdout.isatty() else 200).print(table)
    s = doc.get("summary") or {}
    nb = s.get("last_rating_to_next_batch_s") or {}
    print(f"last rating -> next batch: median {_num(nb.get('median'))} s, p95 {_num(nb.get('p95'))} s; "
          f"session {_num(s.get('session_wall_s'), '.1f')} s, waited {_num(s.get('total_wait_s'), '.1f')} s "
          f"(wait share {_num((s.get('wait_share') or 0) * 100, '.1f')} %)")
    for key, d in (doc.get("cli") or {}).items():
        print(f"CLI {key}: median {_num(d.get('median_s'))} s ({', '.join(_num(x) for x in d.get('runs_s', []))})")


def _prepare_corpus(o: Options, out: Path, env: Mapping[str, str], doc: dict[str, Any],
                    log: Callable[[str], None]) -> tuple[GroundTruth, str, list[str], list[str]]:
    """Ingest the dataset or write the synthetic corpus; (truth, concept, positives, negatives)."""
    from agile_pipeline import settings
    from agile_pipeline.lib.state import StateStore

    home = out / "agile"
    if o.synthetic:
        from benchmarks import synth

        log(f"==> synthetic corpus: {o.synthetic:,} x {o.dim} into {home}")
        t0 = time.perf_counter()
        corpus = synth.write_corpus(home, o.synthetic, o.dim, log=log)
        doc["setup"]["corpus_s"] = round(time.perf_counter() - t0, 2)
        doc["corpus_step"] = "synthetic corpus written in"
        ids = [x.decode("ascii") for x in corpus.positives.tolist()]
        store = StateStore(settings.Paths(home).state_db)
        try:
            split_of = {r["id"]: r["split"] for r in store.image_rows(ids)}
        finally:
            store.close()
        truth = GroundTruth(set(ids), o.synthetic, 0, order_exemplars(ids, split_of))
        doc["synthetic"] = {"n": o.synthetic, "dim": o.dim, "positives": len(ids), "encoder": corpus.encoder_spec(),
                            "note": "random text encoder: phrases carry no meaning"}
        return truth, synth.CONCEPT, [synth.MODE_PHRASE], [synth.NEG_PHRASE]

    from agile_pipeline.lib.labeled_dataset import concept_phrase, load_dataset

    assert o.dataset is not None
    dataset = o.dataset.expanduser().resolve()
    ds = load_dataset(dataset)
    name = o.concept or choose_concept(ds.positives, ds.images)
    if name not in ds.positives:
        some = ", ".join(sorted(ds.positives)[:12])
        raise SessionError(f"no concept folder {name!r} in {dataset} (some there: {some})")
    log(f"==> agile ingest {dataset} (AGILE_HOME={home})")
    rc, seconds = run_logged([*tool("agile"), "ingest", str(dataset)], env, out / "logs" / "ingest.log",
                             timeout=max(o.ready_timeout, 3600))
    doc["setup"]["corpus_s"] = round(seconds, 2)
    doc["corpus_step"] = "ingest + embed"
    if rc != 0:
        raise SessionError(f"agile ingest failed (code {rc}); last lines of the log:\n{_tail(out / 'logs' / 'ingest.log')}")
    store = StateStore(settings.Paths(home).state_db)
    try:
        by_path: dict[str, str] = {}
        for r in store.image_rows():
            by_path[str(r["path"])] = str(r["id"])
            by_path.setdefault(str(r["uri"]), str(r["id"]))

        def resolve(p: str) -> str | None:
            return by_path.get(p) or store.resolve_image(p)

        truth = ground_truth(ds.images, ds.positives[name], resolve)
        split_of = {r["id"]: r["split"] for r in store.image_rows(sorted(truth.positives))}
    finally:
        store.close()
    truth.exemplar_pool = order_exemplars(truth.positives, split_of)
    doc["ground_truth"] = {"images": len(ds.images), "resolved_ids": truth.known, "unresolved": truth.unresolved,
                           "positive_ids": len(truth.positives)}
    return truth, name, [concept_phrase(name)], list(ds.negatives.get(name, []))


def _wait_ready(dep: Deployment, o: Options, doc: dict[str, Any], log: Callable[[str], None]) -> AppClient:
    """Dagster answering, code loaded, daemon healthy; the app warm. Times since start."""
    assert dep.started_at is not None
    setup = doc["setup"]
    dag = AppClient(dep.dagster_url, timeout=30)
    try:
        def since() -> float:
            assert dep.started_at is not None
            return round(time.perf_counter() - dep.started_at, 2)

        wait_until(lambda: dag._http.get("/server_info").status_code == 200 or None, timeout=o.ready_timeout,
                   interval=0.25, what="Dagster /server_info", dead=dep.dead)
        setup["dagster_ready_s"] = since()

        def repos() -> bool | None:
            r = _gql(dag, _REPOS).get("repositoriesOrError") or {}
            return True if r.get("__typename") == "RepositoryConnection" and r.get("nodes") else None

        wait_until(repos, timeout=o.ready_timeout, interval=0.5, what="Dagster code location", dead=dep.dead)
        setup["dagster_code_loaded_s"] = since()

        def daemons() -> list[dict[str, Any]] | None:
            st = ((_gql(dag, _DAEMONS).get("instance") or {}).get("daemonHealth") or {}).get("allDaemonStatuses") or []
            required = [d for d in st if d.get("required")]
            return st if required and all(d.get("healthy") for d in required) else None

        try:
            st, _ = wait_until(daemons, timeout=min(o.ready_timeout, 300), interval=0.5,
                               what="a healthy Dagster daemon", dead=dep.dead)
            setup["daemon_ready_s"] = since()
            setup["daemons"] = sorted(d["daemonType"] for d in st if d.get("required"))
        except SessionError as exc:
            doc["errors"].append(f"daemon health: {exc}")
            log(f"warning: {exc}")
    finally:
        dag.close()
    log(f"    Dagster ready after {setup.get('dagster_ready_s')} s (code {setup.get('dagster_code_loaded_s')} s, "
        f"daemon {setup.get('daemon_ready_s')} s)")
    client = AppClient(dep.app_url)
    health: dict[str, Any] = {}

    def answered() -> bool | None:
        nonlocal health
        try:
            health = dict(client.get("/api/health"))
        except ApiError as exc:
            if exc.status == 404:
                raise SessionError("the app has no GET /api/health (labeling_ui/api.py): this benchmark "
                                   "needs the JSON API it describes") from exc
            raise
        return True

    wait_until(answered, timeout=o.ready_timeout, interval=0.1, what="the app's /api/health", dead=dep.dead)
    setup["app_answered_s"] = round(time.perf_counter() - dep.started_at, 2)

    def warm() -> dict[str, Any] | None:
        h = dict(client.get("/api/health"))
        return h if h.get("warm") else None

    health, _ = wait_until(warm, timeout=o.ready_timeout, interval=0.1, what="the app to warm up", dead=dep.dead)
    setup["app_warm_s"] = round(time.perf_counter() - dep.started_at, 2)
    setup["preload"] = health.get("preload")
    setup["trigger"] = health.get("trigger")
    setup["policy"] = health.get("policy")
    if isinstance(health.get("policy"), Mapping):
        doc["lookahead_effective"] = health["policy"].get("lookahead")
    doc["health"] = health
    log(f"    app warm after {setup['app_warm_s']} s (preload {(health.get('preload') or {}).get('seconds')} s, "
        f"trigger {health.get('trigger')})")
    return client


def _cli_timings(o: Options, env: Mapping[str, str], concept: str, phrase: str, logs: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, args, short in (("candidates", ["candidates", concept, "--ids"], f"agile candidates {concept!r} --ids"),
                             ("search", ["search", phrase, "-k", "5"], f"agile search {phrase!r} -k 5")):
        runs, rcs = [], []
        for _ in range(max(1, o.cli_repeats)):
            rc, sec = run_logged([*tool("agile"), *args], env, logs / f"cli-{key}.log", timeout=600)
            runs.append(round(sec, 3))
            rcs.append(rc)
        out[key] = {"command_short": short, "runs_s": runs, "median_s": round(statistics.median(runs), 3),
                    "exit_codes": rcs}
    return out


def run_session(o: Options, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole benchmark (see the module docstring); returns the document it wrote."""
    out = o.out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    if logs.exists():
        shutil.rmtree(logs)
    logs.mkdir()
    doc: dict[str, Any] = {
        "command": o.command, "argv": sys.argv, "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(), "loadavg_start": loadavg(), "loadavg_end": None,
        "dataset": str(o.dataset.expanduser().resolve()) if o.dataset else None,
        "dataset_label": f"synthetic {o.synthetic:,}" if o.synthetic else (o.dataset.name if o.dataset else "?"),
        "concept": None, "think_s": o.think, "lookahead": o.lookahead, "rounds_requested": o.rounds,
        "eval_requested": o.eval,
        "rater": o.rater, "poll_s": o.poll, "client_rounds": o.client_rounds,
        "setup": {}, "create": None, "rounds": [], "eval": None, "cli": {}, "errors": [],
    }
    for sub in ("agile", "dagster_home"):
        _fresh_dir(out / sub)
    shutil.copy(ROOT / "dagster_home" / "dagster.yaml", out / "dagster_home" / "dagster.yaml")
    encoder = f"random:{o.dim}" if o.synthetic else None
    env = deployment_env(os.environ, out, encoder=encoder, lookahead=o.lookahead,
                         bin_dir=Path(sys.executable).parent, trigger=o.trigger)
    dep: Deployment | None = None
    client: AppClient | None = None
    interrupted = False
    try:
        truth, name, positives, negatives = _prepare_corpus(o, out, env, doc, log)
        doc["concept"] = name
        doc["phrases"] = {"positives": positives, "negatives": negatives}
        log("==> starting dagster-webserver, dagster-daemon and the app (logs in " + str(logs) + ")")
        dep = Deployment(env, logs)
        dep.start()
        doc["setup"]["ports"] = {"dagster": dep.dagster_port, "app": dep.app_port}
        client = _wait_ready(dep, o, doc, log)
        rater = Rater(o, client, truth, dep, log)
        t_start = time.perf_counter()
        settle_s = 0.0
        try:
            cr = rater.create(name, positives, negatives,
                              f"Benchmark rater: positive iff the image is in the {name!r} folder.")
            view = cr.pop("_view")
            doc["create"] = cr
            doc["concept"] = rater.concept
            log(f"==> concept {rater.concept!r}: first image after {cr['create_to_first_image_s']:.2f} s "
                f"({cr['first_batch'].get('kind')} batch of {cr['first_batch'].get('size')})")
            for i in range(o.rounds + 1):
                rec = rater.rate(view)
                rec["index"] = i
                doc["rounds"].append(rec)  # kept (with its ratings) if the next batch never comes
                try:
                    rater.next_batch(rec)
                except SessionError as exc:
                    rec["error"] = str(exc)
                    raise
                view = rec.pop("_view")
                log(f"    batch {i} ({rec['kind']}, {rec['rated']} rated, {rec['positives']} positive"
                    + (f", {len(rec['exemplars'])} exemplar" if rec["exemplars"] else "") + ") -> next "
                    f"batch {rec['next_batch_id']} after {rec['last_rating_to_next_batch_s']:.2f} s"
                    + (" (ready before the last rating)" if rec.get("ready_before_last_rating") else ""))
            session_s = time.perf_counter() - t_start
            settle_s = rater.settle()
            doc["settle_before_eval_s"] = settle_s
            if o.eval:
                t_eval = time.perf_counter()
                ev = rater.evaluate()
                doc["eval"] = ev
                session_s += time.perf_counter() - t_eval
                log(f"    eval: {ev['rated']} rated, metrics over {ev['n_eval_labels']} labels after "
                    f"{ev['eval_update_to_metrics_s']:.2f} s")
            doc["session_wall_s"] = round(session_s, 3)
        except KeyboardInterrupt:
            interrupted = True
            doc["errors"].append("interrupted")
        except (SessionError, ApiError) as exc:
            doc["errors"].append(str(exc))
            log(f"error: {exc}")
            doc["session_wall_s"] = round(time.perf_counter() - t_start - settle_s, 3)
        if not interrupted and doc["create"]:
            try:
                rater.settle(timeout=120.0 if doc["errors"] else None)
                log("==> CLI timings")
                doc["cli"] = _cli_timings(o, env, rater.concept, positives[0] if positives else name, logs)
            except KeyboardInterrupt:
                interrupted = True
            except SessionError as exc:
                doc["errors"].append(f"CLI timings: {exc}")
    except KeyboardInterrupt:
        interrupted = True
        doc["errors"].append("interrupted")
    except SessionError as exc:
        doc["errors"].append(str(exc))
        log(f"error: {exc}")
    except Exception as exc:  # a bug or an unexpected answer: recorded, the deployment stopped
        import traceback

        doc["errors"].append(f"{type(exc).__name__}: {exc}")
        doc["traceback"] = traceback.format_exc()
        log(doc["traceback"])
    finally:
        if client is not None:
            client.close()
        if dep is not None:
            doc["teardown"] = dep.stop()
        doc["loadavg_end"] = loadavg()
        if doc.get("concept") and dep is not None:
            try:
                runs = dagster_runs(out / "dagster_home", doc["concept"])
                doc["dagster"] = {"runs": runs, "waits": [attribute_wait(w, runs) for w in session_waits(doc)]}
            except Exception as exc:  # the breakdown is detail; the waits stand on their own
                doc["errors"].append(f"Dagster breakdown: {type(exc).__name__}: {exc}")
        doc["summary"] = summarize(doc)
        _write(doc, out)
        if not o.keep:
            for sub in ("agile", "dagster_home"):
                shutil.rmtree(out / sub, ignore_errors=True)
    print_table(doc)
    log(f"wrote {out / 'session.json'} and {out / 'session.md'}")
    if interrupted:
        raise KeyboardInterrupt
    return doc


def parse_args(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(prog="python -m benchmarks.session", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", type=Path, help="labelled folder tree (every subfolder is a concept)")
    src.add_argument("--synthetic", type=lambda s: int(float(s.replace("_", ""))), metavar="N",
                     help="a synthetic N-image corpus with the planted concept instead")
    p.add_argument("--out", type=Path, required=True, help="results folder (work dirs under it)")
    p.add_argument("--concept", help="concept folder to rate (default: the largest leaf folder)")
    p.add_argument("--think", type=float, default=1.7, help="seconds the rater looks at each image")
    p.add_argument("--rounds", type=int, default=5, help="AL batches to rate after the first batch")
    p.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True,
                   help="rate the eval set and ask for the evaluation at the end")
    p.add_argument("--lookahead", type=int, default=None, metavar="L",
                   help="the app's lookahead (AGILE_APP_LOOKAHEAD; 0 = off; default: the app's own)")
    p.add_argument("--trigger", choices=("in-process", "dagster"), default=None,
                   help="where the app runs rounds (AGILE_APP_TRIGGER; default: the app's own, "
                        "in-process; 'dagster': submitted to the webserver, launched by the daemon)")
    p.add_argument("--keep", action="store_true", help="keep OUT/agile and OUT/dagster_home")
    p.add_argument("--dim", type=int, default=512, help="embedding dimension of --synthetic")
    p.add_argument("--rater", default="bench", help="rater name")
    p.add_argument("--poll", type=float, default=0.05, help="seconds between polls while waiting")
    p.add_argument("--timeout", type=float, default=900.0, help="longest wait for one batch or metrics (s)")
    p.add_argument("--stall", type=float, default=90.0,
                   help="give up when no batch came and no round ran this long after the last rating (s)")
    p.add_argument("--exemplars", action=argparse.BooleanOptionalAction, default=True,
                   help="give one positive exemplar when a batch and the session hold no positive")
    p.add_argument("--client-rounds", action="store_true",
                   help="the client asks for every round (POST /api/rounds) instead of the app")
    p.add_argument("--cli-repeats", type=int, default=3, help="runs of each CLI command (median)")
    p.add_argument("--ready-timeout", type=float, default=900.0, help="longest start-up wait (s)")
    a = p.parse_args(list(argv) if argv is not None else None)
    if a.rounds < 0 or a.think < 0 or a.poll <= 0:
        p.error("--rounds and --think must be >= 0 and --poll > 0")
    if a.synthetic is not None and a.synthetic < 1000:
        p.error("--synthetic needs at least 1000 images")
    raw = list(argv) if argv is not None else sys.argv[1:]
    return Options(
        dataset=a.dataset, out=a.out, concept=a.concept, think=a.think, rounds=a.rounds, eval=a.eval,
        synthetic=a.synthetic, dim=a.dim, lookahead=a.lookahead, trigger=a.trigger, keep=a.keep, rater=a.rater, poll=a.poll,
        timeout=a.timeout, stall=a.stall, exemplars=a.exemplars, client_rounds=a.client_rounds,
        cli_repeats=a.cli_repeats, ready_timeout=a.ready_timeout,
        command="python -m benchmarks.session " + shlex.join(raw),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.session`` and ``agile bench-session``; exit code."""
    import logging

    o = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for name in ("lance", "lancedb", "alembic", "mlflow", "dagster"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        doc = run_session(o)
    except KeyboardInterrupt:
        print("interrupted: the deployment was stopped", file=sys.stderr)
        return 130
    except SessionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, old)
    return 1 if doc.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
