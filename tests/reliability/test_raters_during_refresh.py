"""Three raters (two on one concept, one on another) write 1,000 labels each from their own
processes while rounds of both concepts run through Dagster and a corpus refresh ingests and
embeds new images: nothing is lost or stored twice, no lock error reaches a rater, and no batch
built meanwhile lists an image that was already labelled when it was built."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from agile_pipeline.lib.loop import pending_items
from agile_pipeline.lib.state import LabelEvent, StateStore
from agile_pipeline.runner import run_concept_round, run_concept_start, run_corpus
from tests.hostile_images import write_real_like_images
from tests.reliability.helpers import env_vars, record

LABELS_EACH = 1000


def rate(db: str, concept: str, rater: str, ids_file: str, log: str) -> None:
    """A rater's process: one label per request, logged after the store acknowledged it."""
    store = StateStore(Path(db))
    ids = Path(ids_file).read_text().split()
    with open(log, "a") as out:
        for k in range(LABELS_EACH):
            ev = LabelEvent(concept, ids[k % len(ids)], ("positive", "negative")[(k // 7) % 2], rater,
                            event_id=f"{rater}-{k:05d}")
            try:
                store.add_labels([ev])
            except Exception as exc:  # anything reaching the rater counts as a failure
                out.write(f"ERR {type(exc).__name__}: {exc}\n")
                out.flush()
                continue
            out.write(f"ACK {ev.event_id}\n")
            out.flush()
            time.sleep(0.015)  # a fast rater's pace, so the labels span the runs


@pytest.mark.slow
def test_three_raters_while_rounds_and_a_refresh_run(loop_home, tmp_path: Path, artifacts_dir: Path) -> None:
    env = loop_home
    store = env.store
    env.store.create_concept("d", ["y"])
    run_concept_start("d")
    first_d = pending_items(env, "d")
    store.add_labels([LabelEvent("d", it["image_id"], "positive" if k % 5 == 0 else "negative", "owner")
                      for k, it in enumerate(first_d)])
    train = sorted(i for i, s in store.all_image_splits().items() if s == "train")
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("\n".join(train))
    new_images = tmp_path / "new"
    write_real_like_images(new_images, 120, seed=77)

    raters = [("c", "ann"), ("c", "bob"), ("d", "cy")]
    procs, logs = [], {}
    t0 = time.perf_counter()
    for concept, rater in raters:
        logs[rater] = tmp_path / f"{rater}.log"
        code = (f"from tests.reliability.test_raters_during_refresh import rate; "
                f"rate({str(store.path)!r}, {concept!r}, {rater!r}, {str(ids_file)!r}, {str(logs[rater])!r})")
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env_vars()))
    # meanwhile: rounds of both concepts and a corpus refresh, through Dagster
    time.sleep(1.0)
    runs_start = time.time()
    runs = {"refresh": run_corpus([str(tmp_path / "corpus"), str(new_images)]).success}
    for k in range(2):
        runs[f"round c {k}"] = run_concept_round("c").success
        runs[f"round d {k}"] = run_concept_round("d").success
    runs_end = time.time()
    for p in procs:
        assert p.wait(timeout=600) == 0
    seconds = time.perf_counter() - t0

    assert all(runs.values()), runs
    stored = {r["event_id"]: r for c in ("c", "d") for r in store.label_events(c)}
    during = [r for r in stored.values() if r["rater"] in ("ann", "bob", "cy") and runs_start <= r["ts"] <= runs_end]
    assert len(during) >= 300, f"only {len(during)} labels were written while the runs ran"
    total_acked = lost = errors = 0
    for concept, rater in raters:
        lines = logs[rater].read_text().splitlines()
        errs = [x for x in lines if x.startswith("ERR")]
        acked = [x.split()[1] for x in lines if x.startswith("ACK")]
        assert not errs, errs[:3]
        assert len(acked) == len(set(acked)) == LABELS_EACH
        missing = [e for e in acked if e not in stored or stored[e]["concept"] != concept]
        assert not missing, missing[:3]
        total_acked += len(acked)
        lost += len(missing)
        errors += len(errs)
    # no event stored twice (event ids are unique keys; counted per concept)
    for c in ("c", "d"):
        ev = [r["event_id"] for r in store.label_events(c)]
        assert len(ev) == len(set(ev))
    # every batch built during the test skips what was labelled when it was built
    batch_ids = [r["batch_id"] for r in store._read("SELECT batch_id FROM batches WHERE kind = 'al'")]
    assert len(batch_ids) == 4
    for bid in batch_ids:
        b = store.get_batch(bid)
        assert b is not None and b["items"]
        labelled = {r["image_id"] for r in store.label_events(b["concept"], upto=b["label_cutoff"])}
        assert not labelled & {it["image_id"] for it in b["items"]}, bid
    assert len(store.all_image_splits()) >= 700 + 100  # the refresh landed meanwhile
    record(artifacts_dir, test="raters_during_refresh", raters=len(raters), labels_acked=total_acked,
           labels_lost=lost, rater_errors=errors, runs=len(runs), al_batches_checked=len(batch_ids),
           seconds=round(seconds, 1),
           labels_written_during_runs=len(during))
