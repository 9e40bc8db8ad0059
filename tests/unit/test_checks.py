"""The round's data-quality checks (run by Dagster as asset checks on the concept assets)."""

import math
import time

import torch

from agile_pipeline.lib import checks
from agile_pipeline.lib.state import LabelEvent, StateStore


def test_weights_finite_passes_a_real_model_and_catches_a_nan(tmp_path):
    state = {"0.weight": torch.ones(4, 3), "0.bias": torch.zeros(4)}
    torch.save(state, tmp_path / "model.pt")
    ok, meta = checks.classifier_weights_finite(tmp_path)
    assert ok and meta["parameters"] == 16 and meta["non_finite"] == 0
    state["0.bias"][1] = math.nan
    state["0.weight"][0, 0] = math.inf
    torch.save(state, tmp_path / "model.pt")
    ok, meta = checks.classifier_weights_finite(tmp_path)
    assert not ok and meta["non_finite"] == 2 and meta["tensors_with_non_finite"] == ["0.bias", "0.weight"]


def _store(tmp_path, n=8):
    store = StateStore(tmp_path / "agile.sqlite")
    rows = [{"id": f"{i:032x}", "uri": f"/x/{i}.png", "path": f"/x/{i}.png", "size": 1, "width": 1,
             "height": 1, "format": "PNG", "n_frames": 1, "split": "train" if i < 6 else "test",
             "source": "/x", "ingested_at": time.time()} for i in range(n)]
    store.record_ingest(rows, [])
    store.create_concept("c", [], [], owner="o", description="")
    return store, [r["id"] for r in rows]


def test_batch_check_counts_size_split_and_labels(tmp_path):
    store, ids = _store(tmp_path)
    good = store.write_batch("c", "al", 1, [{"image_id": i} for i in ids[:3]], label_cutoff=0)
    ok, meta = checks.batch_of_unlabeled_train_images(store, "c", good, batch_size=3, eligible=6)
    assert ok and meta["images"] == 3
    short = store.write_batch("c", "al", 1, [{"image_id": i} for i in ids[:2]], label_cutoff=0)
    assert not checks.batch_of_unlabeled_train_images(store, "c", short, batch_size=3, eligible=6)[0]
    # every eligible image, when fewer than the batch size are left, is fine
    assert checks.batch_of_unlabeled_train_images(store, "c", short, batch_size=3, eligible=2)[0]
    test_img = store.write_batch("c", "al", 1, [{"image_id": i} for i in (ids[0], ids[7])], label_cutoff=0)
    ok, meta = checks.batch_of_unlabeled_train_images(store, "c", test_img, batch_size=2, eligible=6)
    assert not ok and meta["not_in_train_split"] == 1
    store.add_labels([LabelEvent(concept="c", image_id=ids[4], label="positive", rater="o", purpose="train",
                                 source="x", detail=None, round=0, event_id="evt-000001", ts=time.time())])
    cutoff = store.label_cutoff("c")
    relabel = store.write_batch("c", "al", 1, [{"image_id": i} for i in ids[3:5]], label_cutoff=cutoff)
    ok, meta = checks.batch_of_unlabeled_train_images(store, "c", relabel, batch_size=2, eligible=6)
    assert not ok and meta["already_labeled"] == 1
    # a label that arrived after the selection is no fault of the batch
    later = store.write_batch("c", "al", 1, [{"image_id": ids[4]}], label_cutoff=0)
    assert checks.batch_of_unlabeled_train_images(store, "c", later, batch_size=1, eligible=6)[0]


def test_strata_filled_and_explained():
    ok, meta = checks.strata_filled({"m": [20, 5, 20]}, {"m": [300, 5, 40]}, 20)
    assert ok and meta["strata_with_fewer_images_than_per_stratum"] == 1
    ok, meta = checks.strata_filled({"m": [20, 3]}, {"m": [300, 5]}, 20)
    assert not ok and meta["underfilled_strata"] == ["m@1"]


def test_beats_zero_shot():
    def report(model, zero, n=40):  # type: ignore[no-untyped-def]
        return {"n_eval_labels": n, "models": [
            {"model": "zero-shot", "round": None, "auc_pr": zero},
            {"model": "round-0", "round": 0, "auc_pr": 0.1},
            {"model": "round-1", "round": 1, "auc_pr": model}]}
    assert checks.beats_zero_shot(report(0.6, 0.3))[0]
    ok, meta = checks.beats_zero_shot(report(0.2, 0.3))
    assert not ok and meta["model"] == "round-1"
    assert checks.beats_zero_shot(report(0.2, 0.3, n=0)) == (True, {"status": "nothing to compare yet: rate the eval set"})
    assert checks.beats_zero_shot(report(math.nan, 0.3))[0]
