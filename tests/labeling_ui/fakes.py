"""Test doubles for the labeling app: a real state store on a small generated corpus, and a
trigger that plays the pipeline (writes the next batch) without Dagster or torch."""

import hashlib
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from agile_pipeline.lib.state import StateStore
from labeling_ui.trigger import ROUND_JOB, START_JOB, RunHandle, RunStatus, TriggerUnavailable
from tests.hostile_images import write_real_like_images


def ingest_images(store: StateStore, folder: Path, n: int, seed: int = 0) -> list[str]:
    """Record the pictures in ``folder`` in the manifest (train split); write ``n`` first if
    the folder is empty."""
    paths = sorted(p for p in Path(folder).glob("*") if p.is_file()) if Path(folder).is_dir() else []
    if not paths:
        paths = write_real_like_images(folder, n, seed)
    rows, ids = [], []
    for p in paths:
        data = p.read_bytes()
        image_id = hashlib.blake2b(data, digest_size=16).hexdigest()
        with Image.open(p) as im:
            w, h, fmt = im.width, im.height, im.format or "PNG"
        rows.append({"id": image_id, "uri": str(p), "path": str(p), "size": len(data), "width": w,
                     "height": h, "format": fmt, "n_frames": 1, "split": "train",
                     "source": str(folder), "ingested_at": time.time()})
        ids.append(image_id)
    store.record_ingest(rows, [])
    return ids


class FakeTrigger:
    """Plays the pipeline: ``start_concept`` writes an expansion batch, ``run_round`` records a
    round and writes an AL batch, from the not-yet-labelled images, after ``delay_s``."""

    def __init__(
        self,
        store: StateStore,
        image_ids: list[str],
        *,
        batch_size: int = 10,
        delay_s: float = 0.0,
        kind: Literal["dagster", "in-process"] = "dagster",
        unreachable: bool = False,
        fail_with: str | None = None,
    ) -> None:
        self.store = store
        self.image_ids = image_ids
        self.batch_size = batch_size
        self.delay_s = delay_s
        self.kind = kind
        self.unreachable = unreachable
        self.fail_with = fail_with
        self.calls: list[tuple[str, str, dict[str, str]]] = []
        self.run_configs: list[dict[str, Any]] = []  # per call: run config and asset selection
        self._runs: dict[str, tuple[RunHandle, float, RunStatus | None]] = {}
        self._selection: dict[str, list[str] | None] = {}
        self._lock = threading.Lock()

    def describe(self) -> str:
        return "a fake pipeline"

    def _next_items(self, concept: str, source: str, detail: str) -> list[dict[str, Any]]:
        labeled = self.store.labeled_image_ids(concept)
        queued: set[str] = set()
        latest = self.store.latest_batch(concept)
        if latest is not None:
            queued = {it["image_id"] for it in latest["items"]}
        free = [i for i in self.image_ids if i not in labeled and i not in queued]
        return [{"image_id": i, "source": source, "detail": detail} for i in free[: self.batch_size]]

    def _submit(self, job: str, concept: str, tags: Mapping[str, str] | None,
                run_config: Mapping[str, Any] | None = None,
                selection: list[str] | None = None) -> RunHandle:
        if self.unreachable:
            raise TriggerUnavailable("Dagster is not reachable at http://127.0.0.1:9 (connection refused)")
        self.calls.append((job, concept, dict(tags or {})))
        self.run_configs.append({"run_config": dict(run_config or {}), "selection": selection})
        run_id = uuid.uuid4().hex
        handle = RunHandle(run_id, job, concept, self.kind,
                           f"http://dagster.test/runs/{run_id}" if self.kind == "dagster" else None)
        with self._lock:
            self._runs[run_id] = (handle, time.time(), None)
            self._selection[run_id] = selection
        if self.delay_s == 0:
            self._finish(run_id)
        return handle

    def _finish(self, run_id: str) -> RunStatus:
        with self._lock:
            handle, _t0, done = self._runs[run_id]
            if done is not None:
                return done
            if self.fail_with:
                status = RunStatus("failure", self.fail_with, run_id)
            elif handle.job.endswith("[eval]"):
                status = RunStatus("success", "", run_id)
            elif handle.job == START_JOB:
                items = self._next_items(handle.concept, "expansion", handle.concept)
                self.store.write_batch(handle.concept, "expansion", 0, items,
                                       label_cutoff=self.store.label_cutoff(handle.concept), run_id=run_id)
                status = RunStatus("success", "", run_id)
            else:
                concept = handle.concept
                cutoff = self.store.label_cutoff(concept)
                labels = self.store.effective_labels(concept)
                r = self.store.next_round_index(concept)
                self.store.record_round(
                    concept, r, label_cutoff=cutoff, run_id=run_id, model_uri=f"/nonexistent/round-{r:03d}",
                    model_version=str(r + 1), mlflow_run_id=f"mlf{r}", n_pos=sum(labels.values()),
                    n_neg=len(labels) - sum(labels.values()), train_seconds=0.5,
                )
                selection = self._selection.get(run_id)
                if selection is None or "al_candidates" in selection:  # a follow-up selects nothing
                    items = self._next_items(concept, "al:margin", f"round {r}")
                    self.store.write_batch(concept, "al", r + 1, items, label_cutoff=cutoff, run_id=run_id)
                status = RunStatus("success", "", run_id)
            self._runs[run_id] = (handle, _t0, status)
            return status

    def start_concept(self, concept: str, *, tags: Mapping[str, str] | None = None) -> RunHandle:
        return self._submit(START_JOB, concept, tags)

    def run_round(self, concept: str, *, tags: Mapping[str, str] | None = None,
                  run_config: Mapping[str, Any] | None = None,
                  selection: Sequence[str] | None = None) -> RunHandle:
        return self._submit(ROUND_JOB, concept, tags, run_config,
                            list(selection) if selection is not None else None)

    def run_eval(self, concept: str, *, tags: Mapping[str, str] | None = None) -> RunHandle:
        return self._submit("concept_round_job[eval]", concept, tags)

    def status(self, run_id: str) -> RunStatus:
        with self._lock:
            _handle, t0, done = self._runs[run_id]
        if done is not None:
            return done
        if time.time() - t0 < self.delay_s:
            return RunStatus("running")
        return self._finish(run_id)

    def active_run(self, concept: str, job: str) -> RunHandle | None:
        with self._lock:
            runs = list(self._runs.values())
        for handle, t0, done in runs:
            if handle.concept == concept and handle.job == job and done is None and time.time() - t0 < self.delay_s:
                return handle
        return None
