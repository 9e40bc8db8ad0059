"""Gradio handlers called directly: what each screen shows after each action."""

import json

import gradio as gr
import pytest

from labeling_ui import handlers
from labeling_ui.config import UiSettings
from labeling_ui.handlers import NO_CHANGE
from labeling_ui.session import LabelingSession
from tests.labeling_ui.conftest import World

SETTINGS = UiSettings()


def _create(world: World, name: str = "red things", rater: str | None = "alice") -> handlers.View:
    return handlers.on_create(world.service, SETTINGS, LabelingSession(), name, "red apple\nfire truck",
                              "orange", "Only <b>red</b>.", rater)


def test_first_visit_opens_the_concept_screen(world: World) -> None:
    view = handlers.on_load(world.service, SETTINGS, LabelingSession(), None)
    assert view.tab == "concept" and view.choices == []
    assert json.loads(view.widget)["concept"] is None
    assert view.timer is False


def test_create_needs_a_rater_name(world: World) -> None:
    with pytest.raises(gr.Error, match="name"):
        _create(world, rater="")


def test_create_stores_the_concept_and_starts_the_search(world: World) -> None:
    view = _create(world)
    assert view.session.concept == "red things"
    assert view.choices == ["red things"] and view.concept == "red things"
    assert view.tab == "rate"
    assert view.form["editing"] is True and view.form["positives"] == "red apple\nfire truck"
    assert world.trigger.calls[0][:2] == ("concept_start_job", "red things")
    cfg = json.loads(view.widget)
    assert cfg["concept"] == "red things" and cfg["round"]["job"] == "start"
    assert any("saved" in m for m in view.infos)
    assert world.store.get_concept("red things").owner == "alice"


def test_create_shows_store_errors_plainly(world: World) -> None:
    _create(world)
    with pytest.raises(gr.Error, match="already exists"):
        _create(world)
    with pytest.raises(gr.Error, match="not allowed"):
        _create(world, name="../../etc")


def test_open_concept_with_a_batch_goes_to_rating(world: World, concept_with_batch: str) -> None:
    view = handlers.open_concept(world.service, SETTINGS, LabelingSession(), concept_with_batch)
    assert view.tab == "rate"
    assert view.form["name"] == concept_with_batch
    assert "Only red." in view.raters


def test_invite_link_and_query_string_open_the_concept(world: World, concept_with_batch: str) -> None:
    view = handlers.on_load(world.service, SETTINGS, LabelingSession(), "Red  Things")
    assert view.session.concept == concept_with_batch and view.tab == "rate"
    unknown = handlers.on_load(world.service, SETTINGS, LabelingSession(), "<script>")
    assert unknown.session.concept is None


def test_signed_in_user_is_the_requester(world: World, concept_with_batch: str) -> None:
    auth = UiSettings(auth=[("alice", "pw")])
    view = handlers.on_load(world.service, auth, LabelingSession().with_user("alice"), None)
    assert view.session.user == "alice"
    assert handlers.requester(view.session, "mallory") == "alice"
    assert json.loads(handlers.widget_value(view.session, auth))["user"] == "alice"


def test_round_from_the_widget_then_tick_until_done(world: World, concept_with_batch: str) -> None:
    world.trigger.delay_s = 0.2
    session = LabelingSession().with_concept(concept_with_batch)
    batch = world.service.batches.latest(concept_with_batch)
    assert batch is not None
    world.service.ratings.record_labels([{"concept": concept_with_batch, "image_id": batch.order[0], "label": "positive",
                                  "event_id": "e-00000001", "batch_id": batch.batch_id}], rater="bob")
    view = handlers.on_widget_action(world.service, SETTINGS, session, {"action": "round", "concept": concept_with_batch})
    assert view.timer is True
    assert json.loads(view.widget)["round"]["state"] in ("queued", "running")
    import time

    time.sleep(0.3)
    done = handlers.on_tick(world.service, SETTINGS, session)
    assert done.timer is False
    r = json.loads(done.widget)["round"]
    assert r["state"] == "success" and r["new_batch"]
    assert "Model" in done.model and "<table" in done.model


def test_widget_action_for_another_concept_is_refused(world: World, concept_with_batch: str) -> None:
    session = LabelingSession().with_concept(concept_with_batch)
    with pytest.raises(gr.Error, match="another tab"):
        handlers.on_widget_action(world.service, SETTINGS, session, {"action": "round", "concept": "blue"})
    with pytest.raises(gr.Error, match="unknown action"):
        handlers.on_widget_action(world.service, SETTINGS, session, {"action": "rm -rf", "concept": concept_with_batch})


def test_round_without_positive_ratings_explains_what_to_do(world: World, concept_with_batch: str) -> None:
    session = LabelingSession().with_concept(concept_with_batch)
    with pytest.raises(gr.Error, match="no image is rated positive"):
        handlers.on_widget_action(world.service, SETTINGS, session, {"action": "round", "concept": concept_with_batch})


def test_unreachable_dagster_is_said_plainly(world: World, concept_with_batch: str) -> None:
    world.trigger.unreachable = True
    session = LabelingSession().with_concept(concept_with_batch)
    view = handlers.on_find_again(world.service, SETTINGS, session, "alice")
    r = json.loads(view.widget)["round"]
    assert r["state"] == "unreachable" and r["fallback_offered"]
    assert "not reachable" in r["message"]


def test_panels_escape_user_text(world: World) -> None:
    _create(world)
    world.service.ratings.update_concept("red things", "", "", "<script>alert(1)</script>")
    html = handlers.raters_panel(world.service, SETTINGS, "red things")
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_tick_without_concept_stops_polling(world: World) -> None:
    view = handlers.on_tick(world.service, SETTINGS, LabelingSession())
    assert view.timer is False and view.widget is NO_CHANGE


def test_the_kind_column_names_the_family_and_says_why_it_was_chosen() -> None:
    """The Model tab's Kind cell: the family's name, and as its tooltip the cross-validation
    scores (AGILE_MODEL_FAMILY=cv) or the reason of the default's agreement rule."""
    agreement = {"family": "kernel", "model_choice": {
        "family": "kernel", "cv_auc_pr": {}, "agreement": 0.93, "close_positives": 40,
        "reason": "near-duplicate agreement 0.93: of the 40 rated positives with a near-duplicate "
                  "among the ratings, 93% have a positive one (≥ 75%)"}}
    cell = handlers._family_cell(agreement)
    assert 'data-family="kernel"' in cell and ">kernel machine on the rated images<" in cell
    assert "93% have a positive one" in cell and "graph positives" not in cell
    cell = handlers._family_cell({**agreement, "graph_positives": 50})  # refitted with graph positives
    assert ">kernel machine on the rated images + 50 graph positives<" in cell
    assert "(≥ 75%); also trained on 50 unrated images" in cell
    assert "images + 1 graph positive<" in handlers._family_cell({**agreement, "graph_positives": 1})
    cv = {"family": "ensemble", "model_choice": {"family": "ensemble", "folds": 4,
                                                 "cv_auc_pr": {"mlp": 0.5, "linear": 0.6, "ensemble": 0.7}}}
    cell = handlers._family_cell(cv)
    assert "4-fold cross-validation" in cell and "MLP + logistic regression 0.700" in cell


@pytest.mark.parametrize("corpus", [True, False])
def test_the_model_tab_shows_the_collections_figure_beside_the_model_files(world: World, corpus: bool) -> None:
    """With corpus scores (label propagation) the Model tab has a second AUC-PR column, named
    for what it measures; without them, one column as before."""
    from labeling_ui.export import concept_dir_name

    _create(world)
    c = "red things"
    world.store.record_round(c, 0, label_cutoff=0, model_uri="/nowhere/round-000", model_version="1",
                             mlflow_run_id=None, n_pos=3, n_neg=97, train_seconds=0.5)
    world.store.record_round(c, 1, label_cutoff=0, model_uri="/nowhere/round-001", model_version="2",
                             mlflow_run_id=None, n_pos=3, n_neg=97, train_seconds=0.5)
    row = {"model": "round-0", "auc_pr": 0.41, "auc_pr_lo": 0.3, "auc_pr_hi": 0.5}
    if corpus:  # round 0 a kernel machine (propagated), round 1 an MLP (its own scores)
        row |= {"auc_pr_corpus": 0.63, "auc_pr_corpus_lo": 0.55, "auc_pr_corpus_hi": 0.71}
    mlp = {"model": "round-1", "auc_pr": 0.45, "auc_pr_lo": 0.3, "auc_pr_hi": 0.5}
    d = world.home / "concepts" / concept_dir_name(c)
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.json").write_text(json.dumps({"concept": c, "n_eval_labels": 40, "models": [row, mlp]}))
    panel = handlers.model_panel(world.service, c)
    assert "0.41" in panel and "0.45" in panel
    assert ("AUC-PR, your collection" in panel) is corpus and ("AUC-PR, model file" in panel) is corpus
    assert ('data-slot="auc-corpus">0.63' in panel) is corpus and ("0.55–0.71" in panel) is corpus
    assert ("= model file</span>" in panel) is corpus  # round 1's collection scores are its own
