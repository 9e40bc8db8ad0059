"""The real thing: ``dagster dev`` (webserver + daemon) runs the concept jobs the app asks for
over GraphQL; the app's ratings drive a round; the next batch comes back.

Slow (starting Dagster and each run's subprocess takes tens of seconds on two cores).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from labeling_ui import handlers
from labeling_ui.app import build_app
from labeling_ui.config import UiSettings
from labeling_ui.session import LabelingSession
from labeling_ui.trigger import DagsterGraphQLTrigger
from tests.hostile_images import write_real_like_images
from tests.labeling_ui.conftest import LOCAL

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _graphql(url: str, query: str, variables: dict | None = None) -> dict:
    req = urllib.request.Request(f"{url}/graphql", data=json.dumps({"query": query, "variables": variables or {}}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())["data"]


@pytest.fixture
def dagster_dev(agile_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", dagster_home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    corpus = tmp_path / "pictures"
    write_real_like_images(corpus, 320, seed=11)
    from agile_pipeline.runner import run_corpus

    run_corpus([str(corpus)], workers=2)
    port = _free_port()
    log = (tmp_path / "dagster.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dagster", "dev", "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO, env={**os.environ, "DAGSTER_HOME": str(dagster_home)}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while not DagsterGraphQLTrigger(url, timeout_s=5).ping():
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("dagster dev did not start:\n" + (tmp_path / "dagster.log").read_text()[-3000:])
            time.sleep(1)
        # the code location must be loaded too, not just the webserver
        while True:
            data = _graphql(url, "{ repositoriesOrError { ... on RepositoryConnection { nodes { jobs { name } } } } }")
            names = {j["name"] for n in data["repositoriesOrError"].get("nodes", []) for j in n["jobs"]}
            if "concept_round_job" in names:
                break
            if time.time() > deadline:
                raise RuntimeError("the code location did not load")
            time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _wait_round(service, concept: str, timeout: float = 300):  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    while time.time() < deadline:
        view = service.rounds.round_view(concept)
        if not view.in_flight:
            return view
        time.sleep(1)
    raise AssertionError(f"the run for {concept!r} did not finish in {timeout} s")


def test_app_runs_a_round_on_the_dagster_webserver(dagster_dev: str, agile_home: Path) -> None:
    settings = UiSettings(home=agile_home, trigger="dagster", dagster_url=dagster_dev, auto_round=False)
    app = build_app(settings)
    service = app.state.service
    assert isinstance(service.rounds.trigger, DagsterGraphQLTrigger)

    # create + start through the Gradio handler: partition added, concept_start_job launched
    view = handlers.on_create(service, settings, LabelingSession(), "sunny colours", "yellow\norange", "grey",
                              "warm colours", "dana")
    started = json.loads(view.widget)["round"]
    assert started["kind"] == "dagster" and started["run_url"].startswith(dagster_dev + "/runs/")
    first = _wait_round(service, "sunny colours")
    assert first.new_batch, first.message
    batch = service.batches.latest("sunny colours")
    assert batch is not None and len(batch.order) == 100

    # rate the batch through the app's JSON endpoint
    events = [{"concept": "sunny colours", "image_id": i, "label": "positive" if k % 4 == 0 else "negative",
               "event_id": f"dana-{k:05d}", "batch_id": batch.batch_id} for k, i in enumerate(batch.order)]
    with TestClient(app, base_url=LOCAL) as client:
        r = client.post("/api/labels", json={"rater": "dana", "events": events})
        assert r.status_code == 200 and r.json()["new"] == 100

    # the round, asked the way the rating widget asks it
    session = LabelingSession().with_concept("sunny colours")
    asked = handlers.on_widget_action(service, settings, session, {"action": "round", "concept": "sunny colours", "rater": "dana"})
    asked_round = json.loads(asked.widget)["round"]
    assert asked_round["job"] == "round" and asked_round["kind"] == "dagster"
    done = _wait_round(service, "sunny colours")
    assert done.state == "success", done.message
    assert done.new_batch and done.seconds_to_batch is not None

    rounds = service.store.rounds("sunny colours")
    assert len(rounds) == 1 and rounds[0]["run_id"] == asked_round["run_id"]
    assert rounds[0]["n_pos"] == 25 and rounds[0]["n_neg"] == 75
    nxt = service.batches.latest("sunny colours")
    assert nxt is not None and nxt.kind == "al" and not set(nxt.order) & set(batch.order)

    # Dagster recorded the run under the concept's partition, with who asked
    tags = _graphql(dagster_dev, "query($id: ID!) { runOrError(runId: $id) { ... on Run { status jobName tags { key value } } } }",
                    {"id": asked_round["run_id"]})["runOrError"]
    assert tags["status"] == "SUCCESS" and tags["jobName"] == "concept_round_job"
    kv = {t["key"]: t["value"] for t in tags["tags"]}
    assert kv["dagster/partition"] == "sunny colours" and kv["agile/requested_by"] == "dana"


def test_warm_app_runs_rounds_as_named_dagster_runs_without_waiting(dagster_dev: str, agile_home: Path) -> None:
    """The default: rounds run in the warmed app process, start by themselves as ratings
    arrive (lookahead), and are recorded in the webserver's instance as runs of the named jobs."""
    settings = UiSettings(home=agile_home, dagster_url=dagster_dev, lookahead=10)
    app = build_app(settings)
    service = app.state.service
    assert service.rounds.trigger.kind == "in-process"
    assert service.rounds.trigger.wait_warm(240), "the round worker did not warm up"
    with TestClient(app, base_url=LOCAL) as client:
        assert client.get("/api/health").json()["warm"] is True
        r = client.post("/api/concepts", json={"name": "sunny colours", "positives": ["yellow"],
                                               "negatives": ["grey"], "rater": "dana"})
        assert r.status_code == 200, r.text
        started = r.json()["round"]
        assert started["run_url"] == f"{dagster_dev}/runs/{started['run_id']}"
        first = _wait_round(service, "sunny colours")
        assert first.state == "success" and first.new_batch, first.message
        batch = service.batches.latest("sunny colours")
        assert batch is not None and len(batch.order) == 100
        events = [{"concept": "sunny colours", "image_id": i, "label": "positive" if k % 4 == 0 else "negative",
                   "event_id": f"dana-{k:05d}", "batch_id": batch.batch_id} for k, i in enumerate(batch.order)]
        # 90 ratings: the lookahead round starts by itself and queues the next batch
        assert client.post("/api/labels", json={"rater": "dana", "events": events[:90]}).status_code == 200
        look = client.get("/api/round", params={"concept": "sunny colours"}).json()
        assert look["job"] == "round" and look["lookahead"] is True and look["auto"] is True
        done = _wait_round(service, "sunny colours")
        assert done.state == "success" and done.new_batch, done.message
        nxt = service.batches.latest("sunny colours")
        assert nxt is not None and nxt.kind == "al" and not set(nxt.order) & set(batch.order)
        # the last 10: a follow-up round trains on all 100 labels, in the background
        assert client.post("/api/labels", json={"rater": "dana", "events": events[90:]}).status_code == 200
        follow = _wait_round(service, "sunny colours")
        assert follow.job == "followup" and follow.state == "success", follow.message
        models = client.get("/api/models", params={"concept": "sunny colours"}).json()
    rounds = service.store.rounds("sunny colours")
    assert [(r["n_pos"] + r["n_neg"]) for r in rounds] == [90, 100]
    assert all(r["model_version"] for r in rounds)  # both registered in MLflow
    assert models["metrics"] is not None and len(models["rounds"]) == 2
    assert service.batches.latest("sunny colours").batch_id == nxt.batch_id  # type: ignore[union-attr]

    # the webserver's instance has every run, under the named jobs, with partition and tags
    runs = _graphql(dagster_dev, """query { runsOrError(filter: {tags: [{key: "dagster/partition", value: "sunny colours"}]}) {
        ... on Runs { results { runId jobName status tags { key value } assetMaterializations { assetKey { path } } } } } }""")
    results = runs["runsOrError"]["results"]
    assert {r["jobName"] for r in results} == {"concept_start_job", "concept_round_job"}
    assert all(r["status"] == "SUCCESS" for r in results) and len(results) == 3
    by_id = {r["runId"]: r for r in results}
    look_run = by_id[look["run_id"]]
    kv = {t["key"]: t["value"] for t in look_run["tags"]}
    assert kv["agile/lookahead"] == "1" and kv["agile/requested_by"] == "dana"
    assert kv["agile/trigger"] == "app-in-process"
    assets = [m["assetKey"]["path"][-1] for m in look_run["assetMaterializations"]]
    assert assets == ["classifier", "al_candidates", "registered_model"]  # eval: the follow-up's
    follow_assets = [m["assetKey"]["path"][-1] for m in by_id[follow.run_id]["assetMaterializations"]]  # type: ignore[index]
    assert follow_assets == ["classifier", "registered_model", "eval_set", "model_metrics",
                             "concept_predictions"]
