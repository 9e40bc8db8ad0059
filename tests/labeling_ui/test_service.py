"""The app's backend without HTTP or Gradio: concepts, label writes, rounds, export."""

import io
import json
import zipfile

import pytest

from agile_pipeline.lib.state import StateError, concept_dir
from labeling_ui.ratings import split_phrases
from labeling_ui.service import LabelingService
from tests.labeling_ui.conftest import World
from tests.labeling_ui.fakes import FakeTrigger


def _event(world: World, concept: str, image_id: str, label: str = "positive", **kw):  # type: ignore[no-untyped-def]
    batch = world.service.batches.latest(concept)
    assert batch is not None
    return {"concept": concept, "image_id": image_id, "label": label,
            "event_id": kw.pop("event_id", f"ev{image_id[:12]}{label[:3]}"), "batch_id": batch.batch_id, **kw}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("red apple\nfire truck\n\n", ["red apple", "fire truck"]),  # one phrase per line
        ("tuna, seared", ["tuna, seared"]),  # commas stay inside a phrase
        ("  padded  \r\n", ["padded"]),
        ("", []),
        (None, []),
    ],
)
def test_split_phrases(text, expected):  # type: ignore[no-untyped-def]
    assert split_phrases(text) == expected


def test_create_concept_stores_owner_phrases_and_instructions(world: World) -> None:
    c = world.service.ratings.create_concept("Red Things", "red apple\nfire truck", "orange", "Only red.", owner="alice")
    assert c.name == "red things"
    v = world.service.ratings.concept_view("red things")
    assert v["positives"] == ["red things", "red apple", "fire truck"]
    assert v["negatives"] == ["orange"]
    assert v["instructions"] == "Only red."
    assert v["owner"] == "alice"


@pytest.mark.parametrize("name", ["../etc", "a/b", "x'; drop table concepts; --", "", "."])
def test_create_concept_rejects_unsafe_names(world: World, name: str) -> None:
    with pytest.raises(StateError):
        world.service.ratings.create_concept(name, "", "", "", owner="alice")


def test_create_concept_needs_a_rater_name(world: World) -> None:
    with pytest.raises(StateError, match="name"):
        world.service.ratings.create_concept("ok", "", "", "", owner="  ")


def test_start_concept_asks_the_trigger_and_reports_the_new_batch(world: World) -> None:
    world.service.ratings.create_concept("red things", "", "", "", owner="alice")
    view = world.service.rounds.start_concept("red things", requested_by="alice")
    assert world.trigger.calls[0][0] == "concept_start_job"
    assert world.trigger.calls[0][2]["agile/requested_by"] == "alice"
    assert view.run_url and view.run_url.startswith("http://dagster.test/runs/")
    polled = world.service.rounds.round_view("red things")
    assert polled.state == "success"
    assert polled.new_batch and polled.batch_id is not None


def test_labels_are_stored_with_rater_and_batch_provenance(world: World, concept_with_batch: str) -> None:
    batch = world.service.batches.latest(concept_with_batch)
    assert batch is not None
    image_id = batch.order[0]
    res = world.service.ratings.record_labels([_event(world, concept_with_batch, image_id)], rater="bob")
    assert res == {"received": 1, "new": 1}
    (row,) = world.store.label_events(concept_with_batch)
    assert row["rater"] == "bob"
    assert row["source"] == "expansion"
    assert row["detail"] == concept_with_batch
    assert row["round"] == 0  # the expansion batch's round: before any model
    assert row["purpose"] == "train"


def test_label_writes_are_idempotent_on_event_id(world: World, concept_with_batch: str) -> None:
    batch = world.service.batches.latest(concept_with_batch)
    assert batch is not None
    ev = _event(world, concept_with_batch, batch.order[0], event_id="retry-me-123")
    assert world.service.ratings.record_labels([ev], rater="bob")["new"] == 1
    assert world.service.ratings.record_labels([ev, ev], rater="bob")["new"] == 0  # a retried post
    assert len(world.store.label_events(concept_with_batch)) == 1


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"label": "maybe"}, "label"),
        ({"image_id": "../../etc/passwd"}, "hex id"),
        ({"image_id": "0" * 32}, "not in batch"),  # well-formed but not in this batch
        ({"event_id": "x"}, "event_id"),
        ({"batch_id": None}, "batch_id"),
        ({"batch_id": 99999}, "not a batch"),
        ({"concept": "../x"}, "not allowed"),
    ],
)
def test_bad_label_events_are_refused_and_nothing_is_written(
    world: World, concept_with_batch: str, patch: dict, message: str
) -> None:
    batch = world.service.batches.latest(concept_with_batch)
    assert batch is not None
    good = _event(world, concept_with_batch, batch.order[0])
    bad = {**_event(world, concept_with_batch, batch.order[1]), **patch}
    with pytest.raises(StateError, match=message):
        world.service.ratings.record_labels([good, bad], rater="bob")
    assert world.store.label_events(concept_with_batch) == []  # all or nothing


def test_label_from_another_concepts_batch_is_refused(world: World, concept_with_batch: str) -> None:
    world.service.ratings.create_concept("blue things", "", "", "", owner="alice")
    ev = _event(world, concept_with_batch, world.service.batches.latest(concept_with_batch).order[0])  # type: ignore[union-attr]
    ev["concept"] = "blue things"
    with pytest.raises(StateError, match="not a batch of"):
        world.service.ratings.record_labels([ev], rater="bob")


def test_batch_view_shows_this_raters_labels_only(world: World, concept_with_batch: str) -> None:
    batch = world.service.batches.latest(concept_with_batch)
    assert batch is not None
    world.service.ratings.record_labels([_event(world, concept_with_batch, batch.order[0], "negative")], rater="bob")
    mine = world.service.ratings.batch_view(concept_with_batch, "bob")
    theirs = world.service.ratings.batch_view(concept_with_batch, "carol")
    assert mine["done"] == 1 and mine["items"][0]["label"] == "negative"
    assert theirs["done"] == 0
    assert mine["concept"]["instructions"] == "Only red."
    assert mine["batch"]["size"] == len(batch.order)


def test_round_needs_a_positive_label(world: World, concept_with_batch: str) -> None:
    batch = world.service.batches.latest(concept_with_batch)
    assert batch is not None
    world.service.ratings.record_labels([_event(world, concept_with_batch, batch.order[0], "negative")], rater="bob")
    with pytest.raises(StateError, match="no image is rated positive"):
        world.service.rounds.request_round(concept_with_batch, requested_by="bob")
    assert not [c for c in world.trigger.calls if c[0] == "concept_round_job"]


def _rate_all(world: World, concept: str, rater: str = "bob") -> None:
    batch = world.service.batches.latest(concept)
    assert batch is not None
    events = [_event(world, concept, i, "positive" if k % 2 else "negative", event_id=f"{rater}-{batch.batch_id}-{k:04d}")
              for k, i in enumerate(batch.order)]
    world.service.ratings.record_labels(events, rater=rater)


def test_round_runs_and_the_next_batch_appears(world: World, concept_with_batch: str) -> None:
    _rate_all(world, concept_with_batch)
    before = world.service.batches.latest(concept_with_batch)
    view = world.service.rounds.request_round(concept_with_batch, requested_by="bob")
    assert view.job == "round"
    job, _concept, tags = world.trigger.calls[-1]
    assert job == "concept_round_job" and tags["agile/round"] == "0"
    done = world.service.rounds.round_view(concept_with_batch)
    assert done.state == "success" and done.new_batch
    after = world.service.batches.latest(concept_with_batch)
    assert after is not None and before is not None and after.batch_id > before.batch_id
    assert after.kind == "al"
    assert done.seconds_to_batch is not None and done.seconds_to_batch >= 0
    # nothing new rated: a second request is refused instead of training the same model again
    with pytest.raises(StateError, match="nothing new"):
        world.service.rounds.request_round(concept_with_batch, requested_by="bob")


def test_a_second_request_while_running_joins_the_running_round(world: World, concept_with_batch: str) -> None:
    world.trigger.delay_s = 30.0
    _rate_all(world, concept_with_batch)
    first = world.service.rounds.request_round(concept_with_batch, requested_by="bob")
    second = world.service.rounds.request_round(concept_with_batch, requested_by="carol")
    assert second.run_id == first.run_id
    assert "already running" in second.message
    assert sum(1 for c in world.trigger.calls if c[0] == "concept_round_job") == 1


def test_unreachable_pipeline_keeps_ratings_and_offers_the_in_process_fallback(
    world: World, concept_with_batch: str
) -> None:
    _rate_all(world, concept_with_batch)
    n_labels = len(world.store.label_events(concept_with_batch))
    world.trigger.unreachable = True
    view = world.service.rounds.request_round(concept_with_batch, requested_by="bob")
    assert view.state == "unreachable"
    assert "not reachable" in view.message and view.fallback_offered
    assert len(world.store.label_events(concept_with_batch)) == n_labels  # nothing lost
    view2 = world.service.rounds.request_round(concept_with_batch, requested_by="bob", in_process=True)
    assert view2.kind == "in-process"
    assert world.service.rounds.round_view(concept_with_batch).state == "success"


def test_failed_run_shows_the_pipelines_reason(world: World, concept_with_batch: str) -> None:
    _rate_all(world, concept_with_batch)
    world.trigger.fail_with = "no positive labels yet for 'red things'"
    world.service.rounds.request_round(concept_with_batch, requested_by="bob")
    view = world.service.rounds.round_view(concept_with_batch)
    assert view.state == "failure" and "no positive labels" in view.message


def test_export_zip_holds_model_files_and_a_readme(world: World, concept_with_batch: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model_dir = tmp_path / "round-000"
    model_dir.mkdir()
    (model_dir / "model.pt").write_bytes(b"weights")
    (model_dir / "meta.json").write_text(json.dumps({"input_dim": 32}))
    (model_dir / "training_labels.json").write_text(json.dumps({"embedding_model": "random-32"}))
    (model_dir / ".secret").write_text("not exported")
    world.store.record_round(concept_with_batch, 0, label_cutoff=1, model_uri=str(model_dir), model_version="1",
                             mlflow_run_id="abc", n_pos=3, n_neg=7, train_seconds=1.0)
    name, data = world.service.export.export_zip(concept_with_batch, 0)
    assert name == "red_things-model-1.zip"
    zf = zipfile.ZipFile(io.BytesIO(data))
    names = set(zf.namelist())
    base = "red_things-model-1/"
    assert {base + "model.pt", base + "meta.json", base + "README.md", base + "classifier.json"} <= names
    assert base + ".secret" not in names
    readme = zf.read(base + "README.md").decode()
    assert "random-32" in readme and "0.5" in readme and "TrainedClassifier.load" in readme
    assert json.loads(zf.read(base + "classifier.json"))["threshold"] == 0.5
    with pytest.raises(StateError):
        world.service.export.export_zip(concept_with_batch, 7)


def test_metrics_png_is_shown_only_when_the_evaluation_wrote_it(world: World, concept_with_batch: str) -> None:
    assert world.service.export.metrics_png(concept_with_batch) is None
    d = concept_dir(world.store, world.home, concept_with_batch, create=False)
    d.mkdir(parents=True)
    (d / "metrics.png").write_bytes(b"\x89PNG fake")
    assert world.service.export.metrics_png(concept_with_batch) == d / "metrics.png"


def test_two_services_share_the_store_like_two_app_processes(world: World, concept_with_batch: str) -> None:
    other = LabelingService(world.store, FakeTrigger(world.store, world.ids), home=world.home)
    batch = world.service.batches.latest(concept_with_batch)
    assert batch is not None
    world.service.ratings.record_labels([_event(world, concept_with_batch, batch.order[0], event_id="same-event-1")], rater="bob")
    assert other.ratings.record_labels([_event(world, concept_with_batch, batch.order[0], event_id="same-event-1")], rater="bob")["new"] == 0
    assert other.ratings.batch_view(concept_with_batch, "bob")["done"] == 1


def test_eval_ratings_are_stored_as_eval_and_rescoring_is_asked(world: World, concept_with_batch: str) -> None:
    with pytest.raises(StateError, match="no model"):
        world.service.rounds.request_eval(concept_with_batch, requested_by="bob")
    _rate_all(world, concept_with_batch)
    world.service.rounds.request_round(concept_with_batch, requested_by="bob")
    world.service.rounds.round_view(concept_with_batch)
    with pytest.raises(StateError, match="no evaluation ratings"):
        world.service.rounds.request_eval(concept_with_batch, requested_by="bob")
    labeled = world.store.labeled_image_ids(concept_with_batch)
    test_ids = [i for i in world.ids if i not in labeled][:5]
    eval_id = world.store.write_batch(concept_with_batch, "eval", 0,
                                      [{"image_id": i, "source": "eval", "detail": "m0@3"} for i in test_ids],
                                      label_cutoff=0)
    view = world.service.ratings.batch_view(concept_with_batch, "bob", "eval")
    assert view["batch"]["batch_id"] == eval_id and view["done"] == 0
    world.service.ratings.record_labels([{"concept": concept_with_batch, "image_id": test_ids[0], "label": "positive",
                                  "event_id": "eval-ev-0001", "batch_id": eval_id}], rater="bob")
    row = world.store.label_events(concept_with_batch, purpose="eval")[0]
    assert (row["purpose"], row["source"], row["round"]) == ("eval", "eval", 0)
    v = world.service.rounds.request_eval(concept_with_batch, requested_by="bob")
    assert v.job == "eval" and world.trigger.calls[-1][2]["agile/evaluation"] == "1"
