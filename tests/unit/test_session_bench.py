"""The session benchmark's pure parts and its rater protocol, against a fake app (no servers).

The whole-deployment run (``python -m benchmarks.session``) starts Dagster and the app and takes
minutes: it is not part of the test suite.
"""

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks import session as sb


# ---- statistics ------------------------------------------------------------------------------
def test_percentile_matches_numpy() -> None:
    xs = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6]
    for q in (0, 25, 50, 90, 95, 100):
        assert sb.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert sb.percentile([], 50) is None
    assert sb.percentile([2.5], 95) == 2.5


def test_stats_ignores_missing_values() -> None:
    s = sb.stats([1.0, None, 3.0, float("nan"), 2.0])
    assert s["n"] == 3 and s["median"] == 2.0 and s["total"] == 6.0 and s["max"] == 3.0
    assert sb.stats([None])["median"] is None


# ---- dataset and ground truth ------------------------------------------------------------------
def _tree(root: Path, files: dict[str, int]) -> None:
    for rel, n in files.items():
        d = root / rel
        d.mkdir(parents=True, exist_ok=True)
        for k in range(n):
            (d / f"{k}.png").write_bytes(b"x")


def test_choose_concept_takes_the_largest_leaf(tmp_path: Path) -> None:
    from agile_pipeline.lib.labeled_dataset import load_dataset

    _tree(tmp_path, {"animals/cat": 3, "animals/dog": 5, "food/cake": 5, "food/bread": 2, "_other": 9})
    ds = load_dataset(tmp_path)
    # "animals" has more images but is not a leaf; dog and cake tie: by name
    assert sb.choose_concept(ds.positives, ds.images) == "cake"


def test_choose_concept_needs_a_usable_name() -> None:
    with pytest.raises(sb.SessionError):
        sb.choose_concept({"a.b": {0}}, [Path("/d/a.b/0.png")])


def test_ground_truth_resolves_paths_and_duplicates(tmp_path: Path) -> None:
    images = [tmp_path / "cat" / "a.png", tmp_path / "cat" / "b.png", tmp_path / "dog" / "c.png",
              tmp_path / "dog" / "dup-of-a.png", tmp_path / "dog" / "not-ingested.png"]
    ids = {str(images[0]): "id-a", str(images[1]): "id-b", str(images[2]): "id-c", str(images[3]): "id-a"}
    truth = sb.ground_truth(images, [0, 1], ids.get)
    assert truth.positives == {"id-a", "id-b"}
    assert truth.known == 3 and truth.unresolved == 1
    assert truth.label("id-a") == "positive" and truth.label("id-c") == "negative"
    assert truth.label("never-seen") == "negative"


def test_order_exemplars_prefers_the_train_split() -> None:
    assert sb.order_exemplars({"b", "a", "c"}, {"a": "test", "b": "train", "c": "train"}) == ["b", "c", "a"]


# ---- mapping waits to runs ---------------------------------------------------------------------
def _run(run_id: str, created: float, start: float | None, end: float | None, job: str = "concept_round_job",
         steps: list[dict[str, Any]] | None = None, **tags: str) -> dict[str, Any]:
    return sb.run_record(run_id, job, "SUCCESS", {"dagster/partition": "cats", **tags, "other": "x"},
                         created, start, end, steps or [])


def test_overlap() -> None:
    assert sb.overlap(0, 10, 2, 4) == 2
    assert sb.overlap(0, 10, -5, 3) == 3
    assert sb.overlap(0, 10, 12, 20) == 0
    assert sb.overlap(0, 10, None, None) == 10
    assert sb.overlap(0, 10, 8, None) == 2


def test_run_record_queue_and_run_times() -> None:
    r = _run("r1", 100.0, 101.5, 110.0, **{"agile/requested_at": "99.5", "agile/lookahead": "1"})
    assert r["tags"] == {"dagster/partition": "cats", "agile/requested_at": "99.5", "agile/lookahead": "1"}
    assert r["queue_s"] == 1.5 and r["run_s"] == 8.5
    assert r["request_to_create_s"] == 0.5 and r["queue_since_request_s"] == 2.0
    q = _run("r2", 100.0, None, None)
    assert q["queue_s"] is None and q["run_s"] is None and q["request_to_create_s"] is None


def test_run_kind() -> None:
    assert sb.run_kind(_run("a", 0, 1, 2, **{"agile/lookahead": "1"})) == "lookahead"
    assert sb.run_kind(_run("a", 0, 1, 2, **{"agile/lookahead": "0", "agile/followup": "1"})) == "follow-up"
    assert sb.run_kind(_run("a", 0, 1, 2, **{"agile/evaluation": "1"})) == "eval"
    assert sb.run_kind(_run("a", 0, 1, 2, **{"agile/lookahead": "0"})) is None


def test_producer_is_the_latest_run_alive_at_the_marker() -> None:
    runs = [_run("start", 0, 1, 5, job="concept_start_job"), _run("a", 10, 11, 20), _run("b", 12, 21, 30)]
    assert sb.producer_of(15, runs)["run_id"] == "a"
    assert sb.producer_of(25, runs)["run_id"] == "b"
    assert sb.producer_of(3, runs, job="concept_start_job")["run_id"] == "start"
    assert sb.producer_of(3, runs, job="concept_round_job") is None
    assert sb.producer_of(None, runs) is None
    assert sb.producer_of(100, runs) is None


def test_attribute_wait_splits_the_wait_over_its_run() -> None:
    steps = [{"key": "classifier", "start": 13.0, "end": 16.0}, {"key": "al_candidates", "start": 16.0, "end": 17.5},
             {"key": "eval_set", "start": 17.5, "end": 19.0}]
    producer = _run("p", 11.0, 12.0, 19.0, steps=steps, **{"agile/trigger": "batch-complete"})
    lookahead = _run("la", 5.0, 6.0, 11.5, **{"agile/lookahead": "1"})
    wait = {"name": "next_batch[0]", "start": 10.0, "end": 17.8, "marker": 17.5, "job": "concept_round_job"}
    a = sb.attribute_wait(wait, [lookahead, producer])
    assert a["run_id"] == "p" and a["trigger"] == "batch-complete"
    assert a["before_run_s"] == 1.0 and a["queued_s"] == 1.0 and a["run_to_ready_s"] == 5.5
    assert a["after_ready_s"] == pytest.approx(0.3)
    assert a["before_run_s"] + a["queued_s"] + a["run_to_ready_s"] + a["after_ready_s"] == pytest.approx(a["seconds"])
    # only what happened before the batch was committed counts; eval_set ran after it
    assert a["steps_s"] == {"(run start -> first step)": 1.0, "classifier": 3.0, "al_candidates": 1.5}
    assert a["other_runs"] == [{"run_id": "la", "job": "concept_round_job", "kind": "lookahead", "overlap_s": 1.5}]
    assert a["kind"] is None
    assert a["run_created_before_wait"] is False


def test_attribute_wait_when_the_batch_was_ready_before() -> None:
    producer = _run("p", 1.0, 2.0, 9.0)
    a = sb.attribute_wait({"name": "w", "start": 10.0, "end": 10.05, "marker": 8.0}, [producer])
    assert a["run_id"] == "p" and a["run_created_before_wait"] is True
    assert a["before_run_s"] == 0 and a["queued_s"] == 0 and a["run_to_ready_s"] == 0
    assert a["after_ready_s"] == pytest.approx(0.05)
    b = sb.attribute_wait({"name": "w", "start": 10.0, "end": 11.0, "marker": 50.0}, [producer])
    assert b["run_id"] is None and "note" in b


def _doc() -> dict[str, Any]:
    return {
        "create": {"sent_at": 100.0, "seen_at": 104.0, "create_to_first_image_s": 4.0,
                   "first_batch": {"batch_id": 1, "kind": "expansion", "size": 3, "created_at": 103.0}},
        "rounds": [
            {"index": 0, "kind": "expansion", "size": 3, "rated": 3, "positives": 1, "rating_s": 5.1,
             "last_ack_at": 110.0, "seen_at": 112.0, "last_rating_to_next_batch_s": 2.0,
             "next_created_at": 111.5, "ready_before_last_rating": False, "label_post_ms_all": [5.0, 7.0, 6.0]},
            {"index": 1, "kind": "al", "size": 2, "rated": 2, "positives": 0, "rating_s": 3.4,
             "last_ack_at": 120.0, "seen_at": 120.1, "last_rating_to_next_batch_s": 0.1,
             "next_created_at": 119.0, "ready_before_last_rating": True, "label_post_ms_all": [4.0, 4.0]},
        ],
        "eval": {"rated": 4, "size": 4, "rating_s": 7.0, "request_sent_at": 130.0, "seen_at": 133.0,
                 "eval_update_to_metrics_s": 3.0, "metrics_mtime": 132.5, "label_post_ms_all": [5.0]},
        "session_wall_s": 40.0,
    }


def test_session_waits_and_summary() -> None:
    doc = _doc()
    waits = sb.session_waits(doc)
    assert [w["name"] for w in waits] == ["create_to_first_image", "next_batch[0]", "next_batch[1]",
                                          "eval_update_to_metrics"]
    assert waits[1] == {"name": "next_batch[0]", "start": 110.0, "end": 112.0, "marker": 111.5,
                        "job": "concept_round_job"}
    s = sb.summarize(doc)
    assert s["total_wait_s"] == pytest.approx(4.0 + 2.0 + 0.1 + 3.0)
    assert s["wait_share"] == pytest.approx(9.1 / 40.0, abs=1e-4)
    assert s["last_rating_to_next_batch_s"]["median"] == pytest.approx(1.05)
    assert s["next_batch_ready_before_last_rating"] == "1/2"
    assert s["labels_posted"] == 9 and s["batches_rated"] == 2
    assert s["label_post_ms"]["n"] == 6


def test_summary_without_eval_or_wall() -> None:
    doc = _doc()
    doc["eval"] = None
    doc.pop("session_wall_s")
    s = sb.summarize(doc)
    assert s["eval_update_to_metrics_s"]["n"] == 0 and s["wait_share"] is None


def test_markdown_has_the_table_and_headline() -> None:
    doc = _doc()
    doc.update({"concept": "cats", "dataset_label": "demo", "command": "python -m benchmarks.session --x",
                "machine": {"cpu": "Some CPU", "cpu_flags": ["avx2"], "cpu_count": 2, "ram_gib": 7.8,
                            "platform": "Linux"},
                "loadavg_start": [0.5, 0.4, 0.3], "loadavg_end": [1.5, 0.9, 0.5], "think_s": 1.7,
                "lookahead": None, "lookahead_effective": 10,
                "started_at": "2025-01-02T03:04:05+00:00",
                "cli": {"search": {"command_short": "agile search 'cats' -k 5", "runs_s": [1, 2, 3], "median_s": 2.0}}})
    doc["summary"] = sb.summarize(doc)
    doc["dagster"] = {"waits": [sb.attribute_wait(w, [_run("p", 109.0, 110.5, 115.0)])
                                for w in sb.session_waits(doc)]}
    md = sb.markdown(doc)
    assert "### Session benchmark: 'cats' on demo (2025-01-02)" in md
    assert "`python -m benchmarks.session --x`" in md
    assert "0.50 / 0.40 / 0.30 at start" in md
    assert "Some CPU, 2 cores (avx2)" in md  # the SIMD flags the timings depend on
    assert "agile search 'cats' -k 5" in md
    assert "app lookahead 10 (its default)" in md
    table = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert len(table) == 2 + 4  # header, rule, create, two batches, eval
    assert all(ln.count("|") == len(sb.ROUND_HEADER) + 1 for ln in table)
    assert "concept_round_job" in table[3]  # next_batch[0] was produced by run p
    sb.print_table(doc)  # rich or plain: must not fail


# ---- environment, metadata, arguments ---------------------------------------------------------
def test_deployment_env(tmp_path: Path) -> None:
    base = {"PATH": "/usr/bin", "AGILE_HOME": "/elsewhere", "AGILE_APP_TRIGGER": "in-process",
            "AGILE_ENCODER": "bundled", "KEEP": "1"}
    env = sb.deployment_env(base, tmp_path, bin_dir=Path("/venv/bin"))
    assert env["AGILE_HOME"] == str(tmp_path / "agile")
    assert env["DAGSTER_HOME"] == str(tmp_path / "dagster_home")
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["PATH"].startswith("/venv/bin") and env["KEEP"] == "1"
    assert "AGILE_APP_TRIGGER" not in env and "AGILE_ENCODER" not in env and "AGILE_APP_LOOKAHEAD" not in env
    env = sb.deployment_env({**base, "AGILE_APP_AUTO_ROUND": "0"}, tmp_path, encoder="random:64", lookahead=3)
    assert env["AGILE_ENCODER"] == "random:64" and env["AGILE_APP_LOOKAHEAD"] == "3"
    assert "AGILE_APP_AUTO_ROUND" not in env  # the app's own policy: rounds start by themselves


def test_numeric_metadata_keeps_numbers_only() -> None:
    import dagster as dg

    md = {"train_seconds": dg.MetadataValue.float(1.25), "n": dg.MetadataValue.int(7), "plain": 2.5,
          "flag": dg.MetadataValue.bool(True), "text": dg.MetadataValue.text("x"), "nan": float("nan")}
    assert sb.numeric_metadata(md) == {"train_seconds": 1.25, "n": 7, "plain": 2.5}


def test_parse_args() -> None:
    o = sb.parse_args(["--dataset", "d", "--out", "o"])
    assert o.think == 1.7 and o.rounds == 5 and o.eval and o.lookahead is None and not o.keep
    assert o.command == "python -m benchmarks.session --dataset d --out o"
    o = sb.parse_args(["--synthetic", "1_000_000", "--out", "o", "--no-eval", "--lookahead", "2", "--keep"])
    assert o.synthetic == 1_000_000 and not o.eval and o.lookahead == 2 and o.keep and o.dataset is None
    with pytest.raises(SystemExit):
        sb.parse_args(["--dataset", "d", "--synthetic", "5000", "--out", "o"])
    with pytest.raises(SystemExit):
        sb.parse_args(["--out", "o"])


def test_fresh_dir_refuses_foreign_folders(tmp_path: Path) -> None:
    (tmp_path / "agile").mkdir()
    with pytest.raises(sb.SessionError):
        sb._fresh_dir(tmp_path / "agile")
    sb._fresh_dir(tmp_path / "mine")
    (tmp_path / "mine" / "old").write_text("x")
    sb._fresh_dir(tmp_path / "mine")
    assert not (tmp_path / "mine" / "old").exists()


# ---- the rater against a fake app --------------------------------------------------------------
class FakeApp:
    """The JSON API as the benchmark uses it; it builds the next batch a few polls after a batch
    is fully rated (or, with ``lookahead``, when one image is left)."""

    def __init__(self, batches: list[list[str]], *, polls_to_next: int = 3, lookahead: bool = False) -> None:
        self.future = list(batches)
        self.batches: list[dict[str, Any]] = []
        self.labels: dict[str, str] = {}
        self.posts: list[tuple[str, dict[str, Any]]] = []
        self.polls_to_next = polls_to_next
        self.lookahead = lookahead
        self.countdown: int | None = None
        self.eval_items = ["e1", "e2", "e3"]
        self.eval_labels: dict[str, str] = {}
        self.metrics: dict[str, Any] | None = None
        self.metrics_polls = 0
        self.eval_requested_at: float | None = None

    def _publish(self) -> None:
        if self.future:
            self.batches.append({"batch_id": len(self.batches) + 1, "kind": "al" if self.batches else "expansion",
                                 "round": len(self.batches), "created_at": time.time(),
                                 "items": self.future.pop(0)})

    def get(self, path: str, **params: Any) -> dict[str, Any]:
        if path == "/api/batch":
            if params["purpose"] == "eval":
                return {"batch": {"batch_id": 99, "kind": "eval", "round": 1, "size": 3},
                        "items": [{"image_id": i, "label": self.eval_labels.get(i)} for i in self.eval_items],
                        "counts": {"positive": 0, "negative": 0}}
            if self.countdown is not None:
                self.countdown -= 1
                if self.countdown <= 0:
                    self.countdown = None
                    self._publish()
            if not self.batches:
                return {"batch": None, "items": [], "round": {"state": "running", "in_flight": True}}
            b = self.batches[-1]
            return {"batch": {k: b[k] for k in ("batch_id", "kind", "round", "created_at")} | {"size": len(b["items"])},
                    "items": [{"image_id": i, "label": self.labels.get(i)} for i in b["items"]],
                    "round": {"state": "running", "in_flight": True}}
        if path == "/api/round":
            return {"state": "success", "in_flight": False, "job": "eval" if self.eval_requested_at else "round"}
        if path == "/api/models":
            if self.eval_requested_at is not None:
                self.metrics_polls += 1
                if self.metrics_polls >= 2:
                    return {"rounds": [], "metrics": {"n_eval_labels": len(self.eval_labels), "models": []},
                            "metrics_mtime": time.time()}
            return {"rounds": [], "metrics": None, "metrics_mtime": None}
        raise AssertionError(path)

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.posts.append((path, body))
        if path == "/api/concepts":
            self.countdown = 2
            return {"concept": {"name": body["name"].lower()}, "round": {"state": "queued"}}
        if path == "/api/labels":
            assert len(body["events"]) == 1
            ev = body["events"][0]
            assert 8 <= len(ev["event_id"]) <= 64 and ev["concept"] == "cats"
            if ev["batch_id"] == 99:
                self.eval_labels[ev["image_id"]] = ev["label"]
                return {"ok": True}
            self.labels[ev["image_id"]] = ev["label"]
            items = self.batches[-1]["items"]
            left = sum(1 for i in items if i not in self.labels)
            if left == 0 and self.countdown is None and not (self.lookahead and self._published_early):
                self.countdown = self.polls_to_next
            if self.lookahead and left == 1:
                self._publish()  # ready before the last rating
                self._published_early = True
            elif left == 0:
                self._published_early = False
            return {"ok": True}
        if path == "/api/exemplars":
            self.labels[body["image_id"]] = "positive"
            return {"ok": True}
        if path == "/api/rounds":
            if body["job"] == "eval":
                self.eval_requested_at = time.time()
            return {"state": "queued", "job": body["job"]}
        raise AssertionError(path)

    _published_early = False


class _Dep:
    logs = Path("/nonexistent")

    @staticmethod
    def dead() -> None:
        return None


def _rater(app: FakeApp, positives: set[str], tmp_path: Path, **kw: Any) -> sb.Rater:
    opts = sb.Options(dataset=None, out=tmp_path, think=0.0, poll=0.001, timeout=5.0, stall=2.0, **kw)
    truth = sb.GroundTruth(positives, 100, 0, exemplar_pool=["ex1", "ex2"])
    return sb.Rater(opts, app, truth, _Dep(), lambda s: None)  # type: ignore[arg-type]


def test_rater_rates_one_label_per_post_and_times_the_next_batch(tmp_path: Path) -> None:
    app = FakeApp([["a", "b", "c"], ["d", "e"], ["f"]], polls_to_next=3)
    r = _rater(app, {"b", "d"}, tmp_path)
    cr = r.create("Cats", ["cats"], [], "")
    assert r.concept == "cats" and cr["first_batch"]["batch_id"] == 1
    assert cr["create_to_first_image_s"] >= 0 and cr["seen_at"] >= cr["sent_at"]
    rec = r.rate(cr["_view"])
    assert rec["rated"] == 3 and rec["positives"] == 1 and rec["exemplars"] == []
    labels = [(b["events"][0]["image_id"], b["events"][0]["label"]) for p, b in app.posts if p == "/api/labels"]
    assert labels == [("a", "negative"), ("b", "positive"), ("c", "negative")]
    rec = r.next_batch(rec)
    assert rec["next_batch_id"] == 2 and rec["polls"] == 3
    assert rec["ready_before_last_rating"] is False
    assert rec["last_rating_to_next_batch_s"] >= 0
    # the default mode never asks for a training round: the app starts them
    assert not [b for p, b in app.posts if p == "/api/rounds"]


def test_rater_sees_a_lookahead_batch_at_once(tmp_path: Path) -> None:
    app = FakeApp([["a", "b"], ["c", "d"]], lookahead=True)
    r = _rater(app, {"a"}, tmp_path)
    view = r.create("cats", ["cats"], [], "")["_view"]
    rec = r.next_batch(r.rate(view))
    assert rec["next_batch_id"] == 2 and rec["polls"] == 1 and rec["ready_before_last_rating"] is True


def test_rater_gives_an_exemplar_when_stuck(tmp_path: Path) -> None:
    app = FakeApp([["a", "b"], ["c"]])
    r = _rater(app, {"zzz"}, tmp_path)
    view = r.create("cats", ["cats"], [], "")["_view"]
    rec = r.rate(view)
    assert rec["exemplars"] == ["ex1"]
    paths = [p for p, _ in app.posts]
    assert paths == ["/api/concepts", "/api/labels", "/api/exemplars", "/api/labels"]  # before the last rating
    # once there is a positive, no more exemplars
    rec2 = r.rate(r.next_batch(rec)["_view"])
    assert rec2["exemplars"] == []


def test_rater_stalls_when_the_app_starts_no_round(tmp_path: Path) -> None:
    app = FakeApp([["a"]])
    r = _rater(app, {"a"}, tmp_path)
    r.o.stall = 0.05
    view = r.create("cats", ["cats"], [], "")["_view"]
    rec = r.rate(view)
    app.get = lambda path, **p: {"batch": {"batch_id": 1, "kind": "expansion", "round": 0, "size": 1},  # type: ignore[method-assign]
                                 "items": [{"image_id": "a", "label": "positive"}],
                                 "round": {"state": "success", "in_flight": False}}
    with pytest.raises(sb.SessionError, match="started no round when the batch was fully rated"):
        r.next_batch(rec)


def test_client_rounds_mode_asks_for_each_round(tmp_path: Path) -> None:
    app = FakeApp([["a"], ["b"]])
    r = _rater(app, {"a"}, tmp_path, client_rounds=True)
    view = r.create("cats", ["cats"], [], "")["_view"]
    r.next_batch(r.rate(view))
    assert [b["job"] for p, b in app.posts if p == "/api/rounds"] == ["round"]


def test_rater_evaluates(tmp_path: Path) -> None:
    app = FakeApp([["a"]])
    r = _rater(app, {"e2"}, tmp_path)
    r.concept = "cats"
    ev = r.evaluate()
    assert ev["rated"] == 3 and ev["positives"] == 1
    assert ev["n_eval_labels"] == 3 == ev["expected_eval_labels"]
    assert ev["eval_update_to_metrics_s"] >= 0 and ev["seen_at"] >= ev["request_sent_at"]
    assert [b["job"] for p, b in app.posts if p == "/api/rounds"] == ["eval"]
    json.dumps(ev)


# ---- Dagster's records -----------------------------------------------------------------------
def test_dagster_runs_reads_a_partition_run(tmp_path: Path) -> None:
    import dagster as dg

    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    parts = dg.DynamicPartitionsDefinition(name="concepts")

    @dg.asset(partitions_def=parts)
    def classifier() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"train_seconds": 0.25, "n_pos": 3, "note": "x"})

    with dg.DagsterInstance.from_config(str(tmp_path)) as inst:
        inst.add_dynamic_partitions("concepts", ["cats", "dogs"])
        t0 = time.time()
        assert dg.materialize([classifier], instance=inst, partition_key="cats",
                              tags={"agile/requested_at": str(t0), "agile/trigger": "test"}).success
        dg.materialize([classifier], instance=inst, partition_key="dogs")
    runs = sb.dagster_runs(tmp_path, "cats")
    assert len(runs) == 1
    r = runs[0]
    assert r["status"] == "SUCCESS" and r["tags"]["agile/trigger"] == "test"
    assert r["created_at"] >= t0 - 1 and r["start"] >= r["created_at"] - 1 and r["end"] >= r["start"]
    assert r["queue_s"] is not None and r["run_s"] is not None and r["request_to_create_s"] is not None
    assert [s["key"] for s in r["steps"]] == ["classifier"] and r["steps"][0]["status"] == "SUCCESS"
    assert r["metadata"] == {"classifier": {"train_seconds": 0.25, "n_pos": 3}}
