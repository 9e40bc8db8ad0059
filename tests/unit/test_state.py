import multiprocessing as mp
import time

import pytest

from agile_pipeline.lib.state import LabelEvent, LabelRule, StateError, StateStore


def _image(i: int) -> dict:
    return {"id": f"img{i:04d}", "uri": f"/c/{i}.png", "path": f"/c/{i}.png", "size": 10,
            "width": 8, "height": 8, "format": "PNG", "n_frames": 1, "split": "train",
            "source": "/c", "ingested_at": time.time()}


@pytest.fixture
def store(tmp_path):
    s = StateStore(tmp_path / "state.sqlite")
    s.record_ingest([_image(i) for i in range(50)], [])
    return s


@pytest.mark.parametrize(
    ("name", "expected"),
    [("Gourmet  Tuna", "gourmet tuna"), ("stop_sign-2", "stop_sign-2"), ("a", "a")],
)
def test_concept_names_are_normalised(store, name, expected):
    assert store.create_concept(name, ["x"]).name == expected


@pytest.mark.parametrize("bad", ["", "   ", "../etc", "a/b", "x'; drop table concepts;--", "é" * 3, "a" * 80, "dot.name"])
def test_unsafe_concept_names_are_refused(store, bad):
    with pytest.raises(StateError) as err:
        store.create_concept(bad, ["x"])
    assert "concept name" in str(err.value)
    assert store.concept_names() == []


def test_duplicate_concept_is_refused(store):
    store.create_concept("tuna", ["fish"])
    with pytest.raises(StateError, match="already exists"):
        store.create_concept("Tuna", ["other"])


def test_name_is_always_a_positive_phrase(store):
    c = store.create_concept("gourmet tuna", ["seared tuna", "Gourmet Tuna"], ["canned tuna"])
    assert c.phrases == [("positive", "gourmet tuna"), ("positive", "seared tuna"),
                         ("negative", "canned tuna")]


def test_phrases_are_cleaned_and_bounded(store):
    c = store.create_concept("x", ["  a\x00b\tc  ", "", "日本 料理"], [])
    assert c.positives == ("ab c", "日本 料理")
    with pytest.raises(StateError, match="characters long"):
        store.create_concept("y", ["z" * 10_000])


def test_latest_event_per_rater_wins_and_undo_is_an_event(store):
    store.create_concept("c", ["x"])
    store.add_labels([LabelEvent("c", "img0001", "positive", "ann")])
    store.add_labels([LabelEvent("c", "img0001", "negative", "ann")])
    assert store.effective_labels("c") == {"img0001": 0}
    store.add_labels([LabelEvent("c", "img0001", "skip", "ann")])  # undo -> skip
    assert store.effective_labels("c") == {}
    assert len(store.label_events("c")) == 3  # append-only


@pytest.mark.parametrize(
    ("votes", "rule", "expected"),
    [
        # owner (the concept's owner is "owner") wins over a majority
        ({"owner": "negative", "r1": "positive", "r2": "positive"}, LabelRule(), 0),
        # without owner_wins, the majority decides
        ({"owner": "negative", "r1": "positive", "r2": "positive"}, LabelRule(owner_wins=False), 1),
        ({"r1": "positive", "r2": "negative", "r3": "negative"}, LabelRule(), 0),
        # ties are dropped by default, or resolved as configured
        ({"r1": "positive", "r2": "negative"}, LabelRule(), None),
        ({"r1": "positive", "r2": "negative"}, LabelRule(tie="positive"), 1),
        # skips abstain
        ({"r1": "positive", "r2": "skip"}, LabelRule(), 1),
    ],
)
def test_several_raters_resolve_by_rule(store, votes, rule, expected):
    store.create_concept("c", ["x"], owner="owner")
    store.add_labels([LabelEvent("c", "img0002", lab, rater) for rater, lab in votes.items()])
    assert store.effective_labels("c", rule=rule).get("img0002") == expected


def test_unknown_image_or_concept_writes_nothing(store):
    store.create_concept("c", ["x"])
    with pytest.raises(StateError, match="not in the corpus"):
        store.add_labels([LabelEvent("c", "img0001", "positive", "a"), LabelEvent("c", "nope", "positive", "a")])
    with pytest.raises(StateError, match="unknown concept"):
        store.add_labels([LabelEvent("zz", "img0001", "positive", "a")])
    with pytest.raises(StateError, match="not one of"):
        store.add_labels([LabelEvent("c", "img0001", "maybe", "a")])
    assert store.label_events("c") == []


def test_resending_an_event_is_idempotent(store):
    store.create_concept("c", ["x"])
    e = LabelEvent("c", "img0003", "positive", "a")
    assert store.add_labels([e]) == 1
    assert store.add_labels([e]) == 0
    assert len(store.label_events("c")) == 1


def test_batches_are_written_whole(store):
    store.create_concept("c", ["x"])
    items = [{"image_id": f"img{i:04d}", "source": "al", "score": 0.5} for i in range(10)]
    bid = store.write_batch("c", "al", 0, items, label_cutoff=0)
    b = store.latest_batch("c")
    assert b["batch_id"] == bid and [it["image_id"] for it in b["items"]] == [it["image_id"] for it in items]
    broken = [*items, {"source": "al"}]  # last item has no image id: the whole batch aborts
    with pytest.raises(KeyError):
        store.write_batch("c", "al", 1, broken, label_cutoff=0)
    assert store.latest_batch("c")["batch_id"] == bid


def _writer(path: str, rater: str, n: int) -> None:
    s = StateStore(__import__("pathlib").Path(path))
    for k in range(n):
        s.add_labels([LabelEvent("c", f"img{k % 50:04d}", "positive" if k % 2 else "negative", rater,
                                 event_id=f"{rater}-{k}")])


def test_two_processes_writing_1000_labels_each_lose_nothing(tmp_path):
    path = tmp_path / "state.sqlite"
    s = StateStore(path)
    s.record_ingest([_image(i) for i in range(50)], [])
    s.create_concept("c", ["x"])
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(path), f"r{i}", 1000)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    events = s.label_events("c")
    assert len(events) == 2000
    assert {e["event_id"] for e in events} == {f"r{i}-{k}" for i in range(2) for k in range(1000)}
