"""How the app starts a concept's jobs: the running Dagster webserver, or in this process.

The app depends on the narrow :class:`PipelineTrigger` protocol only:

* :class:`DagsterGraphQLTrigger` (default) asks the Dagster webserver over GraphQL to run
  ``concept_start_job`` / ``concept_round_job`` for the concept's partition (the partition is
  added first), so every round is a run that platform teams see in the Dagster UI.
* :class:`InProcessTrigger` materializes the same assets inside the app process
  (:mod:`agile_pipeline.runner`): the fallback when Dagster is not reachable, and what tests use
  where no webserver runs.

Both are safe to share between sessions and threads; neither is ever put in ``gr.State``.
"""

import json
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from agile_pipeline.defs.selections import (  # the job and selection names, defined once
    CONCEPT_PARTITIONS,
    EVAL_ASSETS,
    FOLLOWUP_ASSETS,
    ROUND_JOB,
    START_JOB,
)

log = logging.getLogger(__name__)

PARTITION_TAG = "dagster/partition"

RunState = Literal["queued", "running", "success", "failure", "canceled"]
FINISHED: tuple[RunState, ...] = ("success", "failure", "canceled")


class TriggerUnavailable(RuntimeError):
    """The pipeline cannot be reached (the Dagster webserver is down or elsewhere)."""


class TriggerError(RuntimeError):
    """The pipeline answered but refused the request; the message says why."""


@dataclass(frozen=True)
class RunHandle:
    """A submitted run: ``run_id`` is the Dagster run id (in-process: a handle id)."""

    run_id: str
    job: str
    concept: str
    kind: Literal["dagster", "in-process"]
    url: str | None = None
    submitted_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class RunStatus:
    state: RunState
    message: str = ""
    dagster_run_id: str | None = None

    @property
    def finished(self) -> bool:
        return self.state in FINISHED


class PipelineTrigger(Protocol):
    """Starts a concept's jobs and reports on them."""

    kind: Literal["dagster", "in-process"]

    def describe(self) -> str: ...

    def start_concept(self, concept: str, *, tags: Mapping[str, str] | None = None) -> RunHandle: ...

    def run_round(
        self,
        concept: str,
        *,
        tags: Mapping[str, str] | None = None,
        run_config: Mapping[str, Any] | None = None,
        selection: Sequence[str] | None = None,
    ) -> RunHandle: ...

    def run_eval(self, concept: str, *, tags: Mapping[str, str] | None = None) -> RunHandle: ...

    def status(self, run_id: str) -> RunStatus: ...

    def active_run(self, concept: str, job: str) -> RunHandle | None: ...


# ---- Dagster over GraphQL -----------------------------------------------------------------
_DAGSTER_STATES: dict[str, RunState] = {
    "QUEUED": "queued",
    "NOT_STARTED": "queued",
    "STARTING": "queued",
    "MANAGED": "queued",
    "STARTED": "running",
    "SUCCESS": "success",
    "FAILURE": "failure",
    "CANCELING": "canceled",
    "CANCELED": "canceled",
}

_REPOS_QUERY = """
query AgileRepos {
  repositoriesOrError {
    __typename
    ... on RepositoryConnection { nodes { name location { name } jobs { name } } }
    ... on PythonError { message }
  }
}
"""

_ADD_PARTITION = """
mutation AgileAddPartition($selector: RepositorySelector!, $def: String!, $key: String!) {
  addDynamicPartition(repositorySelector: $selector, partitionsDefName: $def, partitionKey: $key) {
    __typename
    ... on PythonError { message }
    ... on UnauthorizedError { message }
  }
}
"""

_ACTIVE_RUNS = """
query AgileActiveRuns($filter: RunsFilter!) {
  runsOrError(filter: $filter, limit: 1) {
    __typename
    ... on Runs { results { runId jobName status tags { key value } } }
  }
}
"""

_FAILURE_QUERY = """
query AgileRunFailure($runId: ID!) {
  logsForRun(runId: $runId) {
    __typename
    ... on EventConnection {
      events {
        __typename
        ... on ExecutionStepFailureEvent {
          message
          error { message }
          failureMetadata { description }
        }
        ... on RunFailureEvent { message }
      }
    }
  }
}
"""


class DagsterGraphQLTrigger:
    """Runs the concept jobs on a Dagster webserver (``dagster dev`` / ``dagster-webserver``)."""

    kind: Literal["dagster", "in-process"] = "dagster"

    def __init__(self, url: str = "http://127.0.0.1:3000", *, timeout_s: float = 15.0) -> None:
        parsed = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"Dagster URL {url!r} must look like http://HOST:PORT")
        self.url = f"{parsed.scheme}://{parsed.netloc}{parsed.path.rstrip('/')}"
        self._host = parsed.hostname
        self._port = parsed.port
        self._https = parsed.scheme == "https"
        self._prefix = parsed.path.rstrip("/")
        self._timeout_s = timeout_s
        self._client_obj: Any = None
        self._selector: dict[str, str] | None = None
        self._lock = threading.Lock()

    def describe(self) -> str:
        return f"Dagster at {self.url}"

    def run_url(self, run_id: str) -> str:
        return f"{self.url}/runs/{run_id}"

    # -- transport
    def _client(self) -> Any:
        with self._lock:
            if self._client_obj is None:
                from dagster_graphql import DagsterGraphQLClient

                self._client_obj = DagsterGraphQLClient(
                    self._host, port_number=self._port, use_https=self._https,
                    timeout=int(self._timeout_s), path_prefix=self._prefix,
                )
            return self._client_obj

    def _gql(self, query: str, variables: Mapping[str, Any] | None = None) -> dict[str, Any]:
        body = json.dumps({"query": query, "variables": dict(variables or {})}).encode()
        req = urllib.request.Request(
            f"{self.url}/graphql", data=body, method="POST",
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=self._timeout_s) as resp:
                payload = json.loads(resp.read().decode())
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
            raise TriggerUnavailable(self._unreachable(exc)) from exc
        except json.JSONDecodeError as exc:
            raise TriggerUnavailable(
                f"{self.url} answered, but not like a Dagster webserver ({exc}); check --dagster-url"
            ) from exc
        if payload.get("errors"):
            raise TriggerError("; ".join(str(e.get("message", e)) for e in payload["errors"]))
        return dict(payload.get("data") or {})

    def _unreachable(self, exc: BaseException) -> str:
        reason = getattr(exc, "reason", exc)
        return (
            f"Dagster is not reachable at {self.url} ({reason}). Your ratings are saved. "
            "Start it with `dagster dev` (or point the app at it with --dagster-url), "
            "or run this round inside the app instead."
        )

    def ping(self) -> bool:
        try:
            self._gql("query AgilePing { version }")
        except (TriggerUnavailable, TriggerError):
            return False
        return True

    # -- partitions and jobs
    def _repository_selector(self, job: str) -> dict[str, str]:
        if self._selector is not None:
            return self._selector
        data = self._gql(_REPOS_QUERY)["repositoriesOrError"]
        if data.get("__typename") != "RepositoryConnection":
            raise TriggerError(f"Dagster could not list its code locations: {data.get('message', data)}")
        for node in data["nodes"]:
            if any(j["name"] == job for j in node.get("jobs", [])):
                self._selector = {
                    "repositoryLocationName": node["location"]["name"],
                    "repositoryName": node["name"],
                }
                return self._selector
        raise TriggerError(
            f"{self.url} has no job {job!r}: is the webserver running this project "
            "(`dagster dev -w workspace.yaml`)?"
        )

    def ensure_partition(self, concept: str, job: str = START_JOB) -> None:
        selector = self._repository_selector(job)
        res = self._gql(_ADD_PARTITION, {"selector": selector, "def": CONCEPT_PARTITIONS, "key": concept})
        out = res.get("addDynamicPartition") or {}
        kind = out.get("__typename")
        if kind in ("AddDynamicPartitionSuccess", "DuplicateDynamicPartitionError"):
            return
        raise TriggerError(f"Dagster refused to add the partition {concept!r}: {out.get('message', kind)}")

    def _submit(
        self,
        job: str,
        concept: str,
        tags: Mapping[str, str] | None,
        run_config: Mapping[str, Any] | None,
        asset_selection: list[str] | None = None,
    ) -> RunHandle:
        from dagster_graphql import DagsterGraphQLClientError

        self.ensure_partition(concept, job)
        selector = self._selector or {}
        all_tags = {PARTITION_TAG: concept, **dict(tags or {})}
        try:
            run_id = self._client().submit_job_execution(
                job,
                repository_location_name=selector.get("repositoryLocationName"),
                repository_name=selector.get("repositoryName"),
                run_config=dict(run_config or {}),
                tags=all_tags,
                asset_selection=asset_selection,
            )
        except DagsterGraphQLClientError as exc:
            if "connecting" in str(exc).lower():
                raise TriggerUnavailable(self._unreachable(exc)) from exc
            raise TriggerError(f"Dagster refused the {job} run for {concept!r}: {exc}") from exc
        return RunHandle(run_id, job, concept, "dagster", self.run_url(run_id))

    def start_concept(self, concept: str, *, tags: Mapping[str, str] | None = None) -> RunHandle:
        return self._submit(START_JOB, concept, tags, None)

    def run_round(
        self,
        concept: str,
        *,
        tags: Mapping[str, str] | None = None,
        run_config: Mapping[str, Any] | None = None,
        selection: Sequence[str] | None = None,
    ) -> RunHandle:
        cfg = dict(run_config or {})
        if selection is not None and "ops" in cfg:
            cfg["ops"] = {k: v for k, v in cfg["ops"].items() if k in selection}
        return self._submit(ROUND_JOB, concept, tags, cfg,
                            asset_selection=list(selection) if selection is not None else None)

    def run_eval(self, concept: str, *, tags: Mapping[str, str] | None = None) -> RunHandle:
        """The round job's evaluation assets only: the eval set and every model's metrics."""
        return self._submit(ROUND_JOB, concept, tags, None, asset_selection=list(EVAL_ASSETS))

    def status(self, run_id: str) -> RunStatus:
        data = self._gql(
            "query AgileRunStatus($runId: ID!) { runOrError(runId: $runId) { __typename "
            "... on Run { status } ... on RunNotFoundError { message } ... on PythonError { message } } }",
            {"runId": run_id},
        )["runOrError"]
        if data.get("__typename") != "Run":
            raise TriggerError(f"Dagster does not know run {run_id}: {data.get('message', data)}")
        state = _DAGSTER_STATES.get(str(data["status"]), "running")
        message = self.failure_message(run_id) if state == "failure" else ""
        return RunStatus(state, message, run_id)

    def failure_message(self, run_id: str) -> str:
        """The user-facing reason of a failed run (the asset's ``dg.Failure`` description)."""
        try:
            data = self._gql(_FAILURE_QUERY, {"runId": run_id})["logsForRun"]
        except (TriggerUnavailable, TriggerError) as exc:
            return f"the run failed (details unavailable: {exc})"
        for ev in data.get("events", []) if isinstance(data, dict) else []:
            if ev.get("__typename") == "ExecutionStepFailureEvent":
                desc = (ev.get("failureMetadata") or {}).get("description")
                err = (ev.get("error") or {}).get("message")
                return str(desc or err or ev.get("message") or "a step failed").strip()
        for ev in data.get("events", []) if isinstance(data, dict) else []:
            if ev.get("__typename") == "RunFailureEvent":
                return str(ev.get("message") or "the run failed").strip()
        return "the run failed (see the Dagster UI for its logs)"

    def active_run(self, concept: str, job: str) -> RunHandle | None:
        data = self._gql(_ACTIVE_RUNS, {"filter": {
            "pipelineName": job,
            "tags": [{"key": PARTITION_TAG, "value": concept}],
            "statuses": ["QUEUED", "NOT_STARTED", "STARTING", "STARTED"],
        }})["runsOrError"]
        results = data.get("results") or []
        if not results:
            return None
        run_id = results[0]["runId"]
        return RunHandle(run_id, job, concept, "dagster", self.run_url(run_id))


# ---- in this process ----------------------------------------------------------------------
@dataclass
class _Job:
    handle: RunHandle
    future: "Future[str]"
    followup: bool = False


class InProcessTrigger:
    """Runs the concept jobs inside this long-lived app process, one at a time, as real runs
    of the named Dagster jobs (``concept_start_job``, ``concept_round_job``) recorded in the
    Dagster instance of ``$DAGSTER_HOME``: the Dagster UI shows each run with its steps,
    asset materializations, metadata, partition and tags, like a run its daemon launched.

    What it saves the rater: the run queue (the daemon's dequeue loop) and a fresh process per
    run that imports Dagster, torch and MLflow and loads the embedding model again (the
    "cold start", most of a round's wait). With ``warm=True`` the process pays that once, in
    the background, when the app starts (:func:`agile_pipeline.warm.warm_up`), as the round
    worker's first task (rounds asked for meanwhile queue behind it).

    The run id is chosen before the run starts, so the app can link to the run at once
    (``dagster_url``). A follow-up run (``run_round`` with an asset ``selection``, which the app
    asks for when a batch ends after its lookahead round) waits ``followup_delay_s`` and until
    no other run of the concept is queued, and a newer follow-up of the same concept replaces
    one still waiting: a fast rater's next lookahead round never queues behind it.
    ``run_start`` / ``run_round`` / ``run_eval`` default to
    :mod:`agile_pipeline.runner`; tests may pass their own callables (``concept -> run id``).
    """

    kind: Literal["dagster", "in-process"] = "in-process"

    def __init__(
        self,
        *,
        home: str | None = None,
        run_start: Callable[[str], str] | None = None,
        run_round: Callable[[str, Mapping[str, Any]], str] | None = None,
        run_eval: Callable[[str], str] | None = None,
        dagster_url: str | None = None,
        warm: bool = False,
        followup_delay_s: float = 3.0,
    ) -> None:
        self._home = home
        self._custom_start = run_start
        self._custom_round = run_round
        self._custom_eval = run_eval
        self._dagster_url = dagster_url.rstrip("/") if dagster_url else None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agile-round")
        self._jobs: dict[str, _Job] = {}
        self._lock = threading.Lock()
        self._agile_obj: Any = None
        # concept -> the follow-up run waiting to start: (run id, what to run, its future)
        self._deferred: dict[str, tuple[str, Callable[[str], str], Future[str]]] = {}
        self._followup_delay_s = followup_delay_s
        self._warm: dict[str, Any] = {"warm": not warm, "started_at": time.time(), "preload": {}}
        if warm:  # on the round worker itself: what it opens (MLflow's store, ...) stays its own
            self._pool.submit(self._warm_up)

    def describe(self) -> str:
        return "this app process (warm; runs recorded in Dagster)" if self._dagster_url else "this app process"

    # -- warm-up
    def _warm_up(self) -> None:
        try:
            from agile_pipeline.warm import fail_orphaned_runs, warm_up

            parts = warm_up(self._agile())
            try:
                ended = fail_orphaned_runs()
                if ended:
                    log.warning("marked %d run(s) of a stopped app process as failed: %s",
                                len(ended), ", ".join(ended))
            except Exception as exc:
                log.warning("could not check for runs of a stopped app process: %s", exc)
        except Exception as exc:  # never fatal: the first round pays instead
            log.warning("warm-up failed: %s", exc)
            parts = {"error": str(exc)}
        with self._lock:
            self._warm.update(warm=True, preload=parts, finished_at=time.time())
        log.info("round worker warm: %s", parts)

    def warm_state(self) -> dict[str, Any]:
        """``{"warm": bool, "preload": {part: seconds}, ...}`` for the app's health route."""
        with self._lock:
            return dict(self._warm)

    def wait_warm(self, timeout_s: float = 300.0) -> bool:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.warm_state()["warm"]:
                return True
            time.sleep(0.05)
        return False

    def _agile(self) -> Any:
        with self._lock:
            if self._agile_obj is None:
                from agile_pipeline.defs.resources import AgileResources

                self._agile_obj = AgileResources(home=self._home or "")
            return self._agile_obj

    # -- runs
    def _run_url(self, run_id: str) -> str | None:
        return f"{self._dagster_url}/runs/{run_id}" if self._dagster_url else None

    def _submit(self, job: str, concept: str, fn: Callable[[str], str]) -> RunHandle:
        run_id = str(uuid.uuid4())
        handle = RunHandle(run_id, job, concept, "in-process", self._run_url(run_id))
        with self._lock:
            self._jobs[handle.run_id] = _Job(handle, self._pool.submit(fn, run_id))
        return handle

    def _submit_followup(self, job: str, concept: str, fn: Callable[[str], str]) -> RunHandle:
        run_id = str(uuid.uuid4())
        handle = RunHandle(run_id, job, concept, "in-process", self._run_url(run_id))
        fut: Future[str] = Future()
        with self._lock:
            old = self._deferred.pop(concept, None)
            if old is not None:
                old[2].cancel()  # superseded: the new one trains on every label the old had
            self._deferred[concept] = (run_id, fn, fut)
            self._jobs[run_id] = _Job(handle, fut, followup=True)
        self._arm(concept, run_id)
        return handle

    def _arm(self, concept: str, run_id: str) -> None:
        t = threading.Timer(self._followup_delay_s, self._release, (concept, run_id))
        t.daemon = True
        t.start()

    def _release(self, concept: str, run_id: str) -> None:
        with self._lock:
            entry = self._deferred.get(concept)
            if entry is None or entry[0] != run_id:
                return  # superseded or already released
            busy = any(j.handle.concept == concept and not j.followup and not j.future.done()
                       for j in self._jobs.values())
            if not busy:
                del self._deferred[concept]
        if busy:
            self._arm(concept, run_id)
            return
        _rid, fn, fut = entry

        def task() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(fn(run_id))
            except BaseException as exc:
                fut.set_exception(exc)

        try:
            self._pool.submit(task)
        except RuntimeError:  # the app is shutting down: the follow-up never runs
            fut.cancel()

    @staticmethod
    def _tags(tags: Mapping[str, str] | None) -> dict[str, str]:
        from agile_pipeline.warm import WORKER_TAG, worker_id

        return {"agile/trigger": "app-in-process", WORKER_TAG: worker_id(),
                **{str(k): str(v) for k, v in dict(tags or {}).items()}}

    def _runner(self, name: str, concept: str, tags: Mapping[str, str] | None,
                **kwargs: Any) -> Callable[[str], str]:
        """A run of ``agile_pipeline.runner.<name>`` for the pool, as a function of its run id."""

        def run(run_id: str) -> str:
            from agile_pipeline import runner

            fn = getattr(runner, name)
            return str(fn(concept, agile=self._agile(), tags=self._tags(tags), run_id=run_id,
                          **kwargs).run_id)

        return run

    def start_concept(self, concept: str, *, tags: Mapping[str, str] | None = None) -> RunHandle:
        if self._custom_start is not None:
            custom = self._custom_start
            return self._submit(START_JOB, concept, lambda _rid: custom(concept))
        return self._submit(START_JOB, concept, self._runner("run_concept_start", concept, tags))

    def run_round(
        self,
        concept: str,
        *,
        tags: Mapping[str, str] | None = None,
        run_config: Mapping[str, Any] | None = None,
        selection: Sequence[str] | None = None,
    ) -> RunHandle:
        cfg = dict(run_config or {})
        followup = selection is not None and tuple(selection) == FOLLOWUP_ASSETS
        submit = self._submit_followup if followup else self._submit
        if self._custom_round is not None:
            custom = self._custom_round
            return submit(ROUND_JOB, concept, lambda _rid: custom(concept, cfg))

        ops = dict(cfg.get("ops", {}))
        return submit(ROUND_JOB, concept, self._runner(
            "run_concept_round", concept, tags,
            training=dict(ops.get("classifier", {}).get("config", {})),
            sampling=dict(ops.get("al_candidates", {}).get("config", {})),
            selection=list(selection) if selection is not None else None))

    def run_eval(self, concept: str, *, tags: Mapping[str, str] | None = None) -> RunHandle:
        if self._custom_eval is not None:
            custom = self._custom_eval
            return self._submit(ROUND_JOB, concept, lambda _rid: custom(concept))

        return self._submit(ROUND_JOB, concept, self._runner("run_concept_eval", concept, tags))

    def status(self, run_id: str) -> RunStatus:
        with self._lock:
            job = self._jobs.get(run_id)
        if job is None:
            raise TriggerError(f"no run {run_id} in this app process (was the app restarted?)")
        fut = job.future
        if not fut.done():
            return RunStatus("running" if fut.running() else "queued")
        if fut.cancelled():
            return RunStatus("canceled", "replaced by a newer follow-up round")
        exc = fut.exception()
        if exc is not None:
            return RunStatus("failure", str(exc).strip("'\"") or type(exc).__name__)
        return RunStatus("success", "", fut.result())

    def active_run(self, concept: str, job: str) -> RunHandle | None:
        with self._lock:
            jobs = list(self._jobs.values())
        for j in jobs:
            if j.handle.concept == concept and j.handle.job == job and not j.future.done():
                return j.handle
        return None

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
