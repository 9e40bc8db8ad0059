"""Rounds and their progress: what the app asks the pipeline to run for a concept (its first
batch, a training round, the evaluation), the state of that run as the UI shows it, the rounds
trained so far, and the :class:`RoundPolicy` by which ratings start rounds by themselves.

Every batch, model and round is written by the concept jobs, which the app only *asks* to run,
through the :class:`~labeling_ui.trigger.PipelineTrigger`; the run's state is polled (at most
every ``status_cache_s`` seconds per concept) when a view asks for it.
"""

import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from agile_pipeline.defs.selections import FOLLOWUP_ASSETS, LOOKAHEAD_ASSETS, ROUND_JOB, START_JOB
from agile_pipeline.lib.loop import plan_round, round_facts
from agile_pipeline.lib.state import StateError
from labeling_ui.batches import Batches
from labeling_ui.context import ServiceContext
from labeling_ui.trigger import (
    PipelineTrigger,
    RunHandle,
    RunStatus,
    TriggerError,
    TriggerUnavailable,
)

JobKind = Literal["start", "round", "eval", "followup"]


@dataclass(frozen=True)
class RoundPolicy:
    """When the app starts rounds by itself (``auto``), so that a rater never presses a button
    and, with ``lookahead``, never waits.

    * ``lookahead = L > 0``: when only L images of the batch being rated are left unrated, a
      round starts on the labels so far, with those L images kept out of its selection; when
      the batch ends, the next one is usually there already. A *follow-up* round then trains
      on the batch's full labels in the background (MLflow version, eval set, metrics) while
      the rater works on the new batch.
    * ``lookahead = 0`` (the paper's protocol): the round starts when the batch is fully rated.

    Nothing starts while the labels hold no positive (the app offers search and exemplars).
    """

    auto: bool = False
    lookahead: int = 0


@dataclass
class RoundRequest:
    """What the app asked the pipeline to do for a concept, and what came of it."""

    concept: str
    job: JobKind
    handle: RunHandle | None
    requested_by: str
    requested_at: float
    batch_before: int | None
    label_cutoff: int
    status: RunStatus | None = None
    checked_at: float = 0.0
    finished_at: float | None = None
    unreachable: str | None = None
    error: str | None = None
    lookahead: bool = False
    auto: bool = False


@dataclass
class RoundView:
    """JSON-able view of a concept's pipeline activity, for the rating widget and the UI."""

    concept: str
    state: str = "idle"  # idle|queued|running|success|failure|canceled|unreachable|error
    job: str | None = None
    run_id: str | None = None
    run_url: str | None = None
    kind: str | None = None
    message: str = ""
    requested_by: str | None = None
    requested_at: float | None = None
    finished_at: float | None = None
    batch_id: int | None = None
    new_batch: bool = False
    fallback_offered: bool = False
    seconds_to_batch: float | None = None
    round_index: int | None = None
    lookahead: bool = False
    auto: bool = False
    eval_to_rate: int = 0  # images of the evaluation set nobody has rated yet

    @property
    def in_flight(self) -> bool:
        return self.state in ("queued", "running")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["in_flight"] = self.in_flight
        return d


class Rounds:
    """A concept's rounds: requests to the pipeline, their progress, the models trained.

    ``trigger`` runs the jobs; ``fallback`` (optional) runs them inside the app when the rater
    asks for that after ``trigger`` was unreachable. ``batches`` gives the batch a rating was
    made in and the label counts (no round starts while the labels hold no positive).
    """

    def __init__(
        self,
        ctx: ServiceContext,
        batches: Batches,
        trigger: PipelineTrigger,
        *,
        fallback: PipelineTrigger | None = None,
        status_cache_s: float = 0.75,
        policy: RoundPolicy | None = None,
    ) -> None:
        self.store = ctx.store
        self.trigger = trigger
        self.fallback = fallback
        self.policy = policy or RoundPolicy()
        self._batches = batches
        self._status_cache_s = status_cache_s
        self._requests: dict[str, RoundRequest] = {}
        self._lock = threading.RLock()
        # concept -> {"lookahead"|"round"|"followup": batch id it was started for}
        self._auto: dict[str, dict[str, int]] = {}

    # ---- requests ---------------------------------------------------------------------------
    def _trigger_for(self, in_process: bool) -> PipelineTrigger:
        if in_process:
            if self.fallback is None:
                raise StateError("running rounds inside the app is not enabled here")
            return self.fallback
        return self.trigger

    def start_concept(self, concept: str, *, requested_by: str, in_process: bool = False) -> RoundView:
        """Ask the pipeline for the concept's first batch (expansion + zero-shot)."""
        c = self.store.get_concept(concept)
        return self._request(c.name, "start", requested_by, in_process)

    def request_round(self, concept: str, *, requested_by: str, in_process: bool = False) -> RoundView:
        """Ask the pipeline to train on every rating so far and select the next batch."""
        c = self.store.get_concept(concept)
        plan = plan_round(round_facts(self.store, c.name), rater_request=True)
        if plan.action == "refuse":
            raise StateError(plan.reason)
        return self._request(c.name, "round", requested_by, in_process)

    def request_eval(self, concept: str, *, requested_by: str, in_process: bool = False) -> RoundView:
        """Ask the pipeline to re-score every model on the evaluation ratings so far."""
        c = self.store.get_concept(concept)
        if not self.store.rounds(c.name):
            raise StateError(f"{c.name!r} has no model to evaluate yet: rate a batch and train one first")
        if not self.store.effective_labels(c.name, purpose="eval"):
            raise StateError("no evaluation ratings yet: rate the evaluation set first")
        return self._request(c.name, "eval", requested_by, in_process)

    def _request(self, concept: str, job: JobKind, requested_by: str, in_process: bool, *,
                 lookahead: bool = False, auto: bool = False) -> RoundView:
        requested_by = (requested_by or "").strip() or "unknown"
        job_name = START_JOB if job == "start" else ROUND_JOB
        trigger = self._trigger_for(in_process)
        with self._lock:
            current = self._requests.get(concept)
            if current is not None:
                self._poll(current, force=True)
            busy = current is not None and current.handle is not None and not self._finished(current)
            # automatic rounds queue behind whatever runs (the pipeline runs a concept's rounds
            # one after another; the policy's marks keep them from repeating), and anything
            # queues behind a follow-up; a rater's own request while one runs is told so
            queue_behind = busy and current is not None and (auto or current.job == "followup")
            if busy and current is not None and not queue_behind:
                view = self._view(current)
                what = {"round": "round", "start": "search", "eval": "evaluation"}[current.job]
                view.message = (
                    f"a {what} is already running for {concept!r} (asked by "
                    f"{current.requested_by}); its result will show here"
                )
                return view
            latest = self.store.latest_batch(concept, ("expansion", "al"))
            req = RoundRequest(
                concept=concept, job=job, handle=None, requested_by=requested_by,
                requested_at=time.time(), batch_before=latest["batch_id"] if latest else None,
                label_cutoff=self.store.label_cutoff(concept), lookahead=lookahead, auto=auto,
            )
            try:
                active = None if queue_behind else trigger.active_run(concept, job_name)
                if active is not None:
                    req.handle = active
                    req.error = None
                else:
                    tags = {"agile/requested_by": requested_by, "agile/label_cutoff": str(req.label_cutoff),
                            "agile/source": "labeling-app", "agile/requested_at": f"{req.requested_at:.3f}",
                            "agile/auto": "1" if auto else "0"}
                    if job == "start":
                        req.handle = trigger.start_concept(concept, tags=tags)
                    elif job == "eval":
                        req.handle = trigger.run_eval(concept, tags={**tags, "agile/evaluation": "1"})
                    elif job == "followup":
                        req.handle = trigger.run_round(
                            concept, tags={**tags, "agile/followup": "1"}, selection=FOLLOWUP_ASSETS)
                    else:
                        run_config = None
                        if lookahead:
                            run_config = {"ops": {
                                "classifier": {"config": {"lookahead": True}},
                                "al_candidates": {"config": {"exclude_pending": True}},
                            }}
                        req.handle = trigger.run_round(concept, run_config=run_config, tags={
                            **tags, "agile/round": str(self.store.next_round_index(concept)),
                            "agile/lookahead": "1" if lookahead else "0"},
                            selection=LOOKAHEAD_ASSETS if lookahead else None)
            except TriggerUnavailable as exc:
                req.unreachable = str(exc)
            except TriggerError as exc:
                req.error = str(exc)
            self._requests[concept] = req
            return self._view(req)

    # ---- progress ---------------------------------------------------------------------------
    @staticmethod
    def _finished(req: RoundRequest) -> bool:
        return req.status is not None and req.status.finished

    def _poll(self, req: RoundRequest, *, force: bool = False) -> None:
        if req.handle is None or self._finished(req):
            return
        if not force and time.time() - req.checked_at < self._status_cache_s:
            return
        trigger = self.fallback if req.handle.kind == "in-process" and self.fallback else self.trigger
        try:
            status = trigger.status(req.handle.run_id)
        except TriggerUnavailable as exc:
            req.status = RunStatus("running", f"lost contact with the pipeline ({exc}); retrying")
            req.checked_at = time.time()
            return
        except TriggerError as exc:
            status = RunStatus("failure", str(exc))
        req.status = status
        req.checked_at = time.time()
        if status.finished and req.finished_at is None:
            req.finished_at = time.time()

    def round_view(self, concept: str) -> RoundView:
        with self._lock:
            req = self._requests.get(concept)
        if req is None:
            view = RoundView(concept=concept, round_index=self._last_round_index(concept))
        else:
            self._poll(req)  # outside the lock: a slow pipeline never stalls other concepts
            view = self._view(req)
        # the eval set waits to be rated: the widget offers it (a good use of a round's wait)
        view.eval_to_rate = len(self.store.pending_items(concept, None, purpose="eval"))
        return view

    def _last_round_index(self, concept: str) -> int | None:
        rounds = self.store.rounds(concept)
        return int(rounds[-1]["round"]) if rounds else None

    def _view(self, req: RoundRequest) -> RoundView:
        view = RoundView(
            concept=req.concept, job=req.job, requested_by=req.requested_by,
            requested_at=req.requested_at, finished_at=req.finished_at,
            round_index=self._last_round_index(req.concept), lookahead=req.lookahead, auto=req.auto,
        )
        if req.unreachable:
            return replace(view, state="unreachable", message=req.unreachable,
                           fallback_offered=self.fallback is not None)
        if req.error or req.handle is None:
            return replace(view, state="error", message=req.error or "the pipeline refused the request")
        view.run_id, view.run_url, view.kind = req.handle.run_id, req.handle.url, req.handle.kind
        status = req.status or RunStatus("queued")
        view.state = status.state
        view.message = status.message
        latest = self.store.latest_batch(req.concept, ("expansion", "al"))
        if latest is not None:
            view.batch_id = int(latest["batch_id"])
            view.new_batch = req.batch_before is None or view.batch_id > req.batch_before
            if view.new_batch and status.state == "success":
                last_ts = self._last_label_ts(req.concept)
                if last_ts is not None and req.job == "round" and not req.lookahead:
                    view.seconds_to_batch = round(float(latest["created_at"]) - last_ts, 2)
        if status.state == "success" and not view.new_batch and req.job == "round":
            view.message = view.message or "the run finished but selected no new images"
        return view

    def _last_label_ts(self, concept: str) -> float | None:
        events = self.store.label_events(concept, purpose="train")
        return float(events[-1]["ts"]) if events else None

    # ---- automatic rounds --------------------------------------------------------------------
    def auto_round(self, concept: str, batch_id: int, *, requested_by: str) -> RoundView | None:
        """Start the round the :class:`RoundPolicy` calls for after a rating of ``batch_id``
        (see there); ``None`` when none is due."""
        ref = self._batches.by_id(batch_id)
        if ref is None or ref.kind not in ("expansion", "al"):
            return None
        latest = self.store.latest_batch(concept, ("expansion", "al"))
        if latest is None:
            return None
        labeled = self.store.labeled_image_ids(concept)
        left = sum(1 for i in ref.order if i not in labeled)
        is_latest = int(latest["batch_id"]) == batch_id
        with self._lock:
            marks = self._auto.setdefault(concept, {})
            if is_latest and left == 0 and marks.get("lookahead") != batch_id:
                action = "round" if marks.get("round") != batch_id else None
            elif left == 0 and marks.get("lookahead") == batch_id:
                action = "followup" if marks.get("followup") != batch_id else None
            elif is_latest and 0 < left <= self.policy.lookahead:
                action = "lookahead" if batch_id not in (marks.get("lookahead"), marks.get("round")) else None
            else:
                action = None
            if action is None:
                return None
            if action != "followup" and plan_round(round_facts(self.store, concept)).action == "recovery":
                return None  # nothing to learn from yet: the app's recovery notice applies
            marks[action] = batch_id
        if action == "followup":
            view = self._request(concept, "followup", requested_by, False, auto=True)
        else:
            view = self._request(concept, "round", requested_by, False,
                                 lookahead=action == "lookahead", auto=True)
        if view.state in ("error", "unreachable"):  # not started: a later rating may try again
            with self._lock:
                if self._auto.get(concept, {}).get(action) == batch_id:
                    del self._auto[concept][action]
        return view

    # ---- models and the round worker -----------------------------------------------------------
    def rounds_table(self, concept: str) -> list[dict[str, Any]]:
        return [
            {
                "round": int(r["round"]),
                "positive": r["n_pos"],
                "negative": r["n_neg"],
                "model_version": r["model_version"],
                "mlflow_run_id": r["mlflow_run_id"],
                "model_dir": r["model_uri"],
                "train_seconds": r["train_seconds"],
                "dagster_run_id": r["run_id"],
                "finished_at": r["finished_at"],
                "hidden": (r.get("info") or {}).get("hidden"),
                "family": str((r.get("info") or {}).get("family", "mlp")),
                "model_choice": (r.get("info") or {}).get("model_choice") or {},
                "graph_positives": int((r.get("info") or {}).get("graph_positives", 0)),
                "lookahead": bool((r.get("info") or {}).get("lookahead")),
                "registered_model": (r.get("info") or {}).get("registered_model"),
            }
            for r in self.store.rounds(concept)
        ]

    def health(self) -> dict[str, Any]:
        """The round worker's warm-up (see :class:`labeling_ui.trigger.InProcessTrigger`)."""
        warm_state = getattr(self.trigger, "warm_state", None)
        state = warm_state() if callable(warm_state) else {"warm": True, "preload": {}}
        return {"warm": bool(state.get("warm")), "trigger": self.trigger.describe(),
                "preload": state.get("preload", {}),
                "policy": {"auto": self.policy.auto, "lookahead": self.policy.lookahead}}
