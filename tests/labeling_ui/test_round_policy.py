"""Automatic rounds: the app starts them as ratings arrive (RoundPolicy), with a lookahead
that prepares the next batch while the rater finishes the current one."""

from collections.abc import Sequence

from labeling_ui.rounds import RoundPolicy
from labeling_ui.service import LabelingService
from labeling_ui.trigger import FOLLOWUP_ASSETS
from tests.labeling_ui.conftest import World

ROUND = "concept_round_job"


def _service(world: World, lookahead: int) -> LabelingService:
    return LabelingService(world.store, world.trigger, home=world.home, encoder_spec="random:32",
                           policy=RoundPolicy(auto=True, lookahead=lookahead))


def _start(service: LabelingService) -> None:
    service.ratings.create_concept("red things", "red apple", "", "", owner="alice")
    service.rounds.start_concept("red things", requested_by="alice")


def _rate(service: LabelingService, items: Sequence[str], labels: Sequence[str], batch_id: int,
          rater: str = "alice") -> None:
    for image_id, label in zip(items, labels, strict=True):
        service.ratings.record_labels([{"concept": "red things", "image_id": image_id, "label": label,
                                "event_id": f"e-{rater}-{image_id[:16]}", "batch_id": batch_id}],
                              rater=rater)


def _rounds(world: World) -> list[tuple[dict[str, str], dict]]:
    return [(tags, cfg) for (job, _c, tags), cfg in zip(world.trigger.calls, world.trigger.run_configs,
                                                         strict=True) if job == ROUND]


def test_lookahead_round_starts_when_few_images_are_left_and_skips_them(world: World) -> None:
    service = _service(world, lookahead=3)
    _start(service)
    first = service.batches.latest("red things")
    assert first is not None and len(first.order) == 10
    order = list(first.order)
    _rate(service, order[:6], ["positive", "negative"] * 3, first.batch_id)
    assert _rounds(world) == []  # 4 left: nothing yet
    _rate(service, order[6:7], ["negative"], first.batch_id)  # 3 left -> the lookahead round
    rounds = _rounds(world)
    assert len(rounds) == 1
    tags, cfg = rounds[0]
    assert tags["agile/lookahead"] == "1" and tags["agile/auto"] == "1"
    assert cfg["run_config"]["ops"]["al_candidates"]["config"] == {"exclude_pending": True}
    # train, select, register; the eval work is the follow-up's
    assert cfg["selection"] == ["classifier", "al_candidates", "registered_model"]
    nxt = service.batches.latest("red things")
    assert nxt is not None and nxt.batch_id > first.batch_id
    assert not set(nxt.order) & set(order[7:])  # the 3 images still to rate are not reused
    # more ratings of the same batch start nothing new until it is finished
    _rate(service, order[7:9], ["negative", "negative"], first.batch_id)
    assert len(_rounds(world)) == 1
    # the last rating: a follow-up on the full labels (no new selection)
    _rate(service, order[9:], ["positive"], first.batch_id)
    rounds = _rounds(world)
    assert len(rounds) == 2
    tags, cfg = rounds[1]
    assert tags["agile/followup"] == "1" and cfg["selection"] == list(FOLLOWUP_ASSETS)
    assert service.batches.latest("red things").batch_id == nxt.batch_id  # type: ignore[union-attr]
    view = service.rounds.round_view("red things")
    assert view.job == "followup" and view.batch_id == nxt.batch_id


def test_without_lookahead_the_round_starts_when_the_batch_is_done(world: World) -> None:
    service = _service(world, lookahead=0)
    _start(service)
    first = service.batches.latest("red things")
    assert first is not None
    order = list(first.order)
    _rate(service, order[:9], ["positive"] + ["negative"] * 8, first.batch_id)
    assert _rounds(world) == []
    _rate(service, order[9:], ["negative"], first.batch_id)
    rounds = _rounds(world)
    assert len(rounds) == 1 and rounds[0][0]["agile/lookahead"] == "0"
    assert rounds[0][1]["run_config"] == {}
    view = service.rounds.round_view("red things")
    assert view.state == "success" and view.new_batch


def test_no_automatic_round_without_a_positive(world: World) -> None:
    service = _service(world, lookahead=3)
    _start(service)
    first = service.batches.latest("red things")
    assert first is not None
    _rate(service, list(first.order), ["negative"] * 10, first.batch_id)
    assert _rounds(world) == []  # the app's recovery notice applies instead


def test_policy_off_starts_nothing(world: World) -> None:
    service = LabelingService(world.store, world.trigger, home=world.home, encoder_spec="random:32",
                              policy=RoundPolicy(auto=False, lookahead=3))
    _start(service)
    first = service.batches.latest("red things")
    assert first is not None
    _rate(service, list(first.order), ["positive"] * 10, first.batch_id)
    assert _rounds(world) == []


def test_two_raters_one_batch_start_one_round(world: World) -> None:
    service = _service(world, lookahead=2)
    _start(service)
    first = service.batches.latest("red things")
    assert first is not None
    order = list(first.order)
    _rate(service, order[:5], ["positive"] * 5, first.batch_id, rater="alice")
    _rate(service, order[5:], ["negative"] * 5, first.batch_id, rater="bob")
    _rate(service, order, ["positive"] * 10, first.batch_id, rater="carol")
    rounds = _rounds(world)
    assert len(rounds) == 2  # one lookahead round and its follow-up, whoever rated
    assert rounds[0][0]["agile/lookahead"] == "1" and rounds[1][0].get("agile/followup") == "1"


def test_an_automatic_round_queues_behind_a_run_still_in_flight(world: World) -> None:
    """A fast rater finishes the batch while an earlier run still works: the round is queued
    behind it, never dropped (else no next batch would ever come)."""
    service = _service(world, lookahead=0)
    _start(service)
    first = service.batches.latest("red things")
    assert first is not None
    order = list(first.order)
    _rate(service, order[:5], ["positive"] * 5, first.batch_id)
    world.trigger.delay_s = 30.0
    early = service.rounds.request_round("red things", requested_by="alice")  # "train now", still running
    assert early.in_flight
    _rate(service, order[5:], ["negative"] * 5, first.batch_id)
    rounds = _rounds(world)
    assert len(rounds) == 2 and rounds[1][0]["agile/auto"] == "1"
    view = service.rounds.round_view("red things")
    assert view.run_id != early.run_id and view.auto


def test_the_app_names_the_round_job_assets_the_code_location_defines() -> None:
    """The app asks for runs and partial runs by the names in ``defs/selections.py`` (it
    starts without Dagster); the code location's jobs, built from the same names, run exactly
    those assets, and every partial selection is a real subset of the round job."""
    from agile_pipeline.definitions import defs
    from agile_pipeline.defs import concepts, selections

    d = defs()
    round_job = d.resolve_job_def(selections.ROUND_JOB)
    start_job = d.resolve_job_def(selections.START_JOB)
    in_round = {k.path[-1] for k in round_job.asset_layer.executable_asset_keys}
    assert in_round == {a.key.path[-1] for a in (concepts.classifier, concepts.al_candidates,
                                                 concepts.registered_model, concepts.eval_set,
                                                 concepts.model_metrics, concepts.concept_predictions)}
    assert {k.path[-1] for k in start_job.asset_layer.executable_asset_keys} == {
        concepts.expansion_candidates.key.path[-1], concepts.zero_shot_scores.key.path[-1]}
    for partial in (selections.FOLLOWUP_ASSETS, selections.EVAL_ASSETS, selections.LOOKAHEAD_ASSETS):
        assert set(partial) < in_round
