"""The benchmark suite end to end at a tiny size: results.json has the documented schema."""

import json
import math
from pathlib import Path

from agile_pipeline.lib.candidate_pool import POOL_SWEEP
from benchmarks import rounds
from benchmarks.cli import run_bench

REQUIRED = {"expansion_exact", "expansion_ann", "al_round", "train", "eval_set", "round_end_to_end",
            "pool_growth", "al_round_pool", "pool_quality"}


def test_bench_writes_results_json(tmp_path, monkeypatch):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.chdir(tmp_path)  # relative folders, as `agile bench --out bench-out` gives them
    out = tmp_path / "out"
    lines: list[str] = []
    doc = run_bench([20_000], Path("out"), dim=32, repeats=1, workdir=Path("work"), plain_epochs=1,
                    random_negatives=2_000, baseline_round_repeats=1, ray=True, log=lines.append, keep=True)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["results"] == json.loads(json.dumps(doc["results"]))
    assert isinstance(on_disk["machine"], str) and on_disk["machine"]
    rows = {r["name"]: r for r in on_disk["results"]}
    assert REQUIRED <= set(rows)
    for r in on_disk["results"]:
        assert isinstance(r["name"], str)
        assert r["n"] == 20_000
        assert isinstance(r["seconds"], float) and r["seconds"] >= 0
        assert isinstance(r["peak_rss_gib"], float) and r["peak_rss_gib"] >= 0
        assert r["baseline_seconds"] is None or isinstance(r["baseline_seconds"], float)
    for name in REQUIRED - {"round_end_to_end"}:  # the round's baseline needs the fast path wired in
        assert isinstance(rows[name]["baseline_seconds"], float), name
        assert math.isfinite(rows[name]["baseline_seconds"])
    # the fast paths give the straightforward paths' answers
    assert rows["al_round"]["same_selection_as_baseline"] is True
    assert rows["al_round"]["shortlist_proven"] is True
    assert rows["al_round_ray"]["same_selection_as_local"] is True  # the Ray switch changes nothing
    # the round counts until the next batch is written, within the whole run's time
    assert 0 < rows["round_end_to_end"]["seconds"] <= max(rows["round_end_to_end"]["run_seconds"])
    assert rows["eval_set"]["same_eval_set_as_baseline"] is True
    assert rows["expansion_exact"]["baseline_recall_at_100"] >= 0.99
    # issue 15: the index is calibrated to the recall target; the pool is grown and scored
    assert rows["embedding_index"]["recall_at_100"] >= 0.95, rows["embedding_index"]["tried"]
    assert rows["expansion_ann"]["recall_at_100"] >= 0.9
    assert rows["pool_growth"]["recall"] >= 0.9 and rows["pool_growth"]["queries"] == 100
    pooled = rows["al_round_pool"]
    assert 0 < pooled["pool_size"] < 20_000 and 0 < pooled["sweep_scored"] <= POOL_SWEEP
    assert pooled["rows_scored"] <= pooled["pool_size"] + pooled["sweep_scored"] + pooled["random_scored"]
    assert 0 <= pooled["overlap_with_full_scan"] <= 100
    # its baseline is the full scan with the same model (the al_round row), not another row's
    assert pooled["baseline_runs"] == rows["al_round"]["runs"]
    quality = rows["pool_quality"]
    assert len(quality["auc_pr_pooled"]) == len(quality["auc_pr_full_scan"]) == 6
    assert all(0.0 <= a <= 1.0 for a in quality["auc_pr_pooled"] + quality["auc_pr_full_scan"])
    assert rows["round_end_to_end_pool"]["next_candidates"] == [100]
    assert rows["round_end_to_end"]["next_candidates"] == [100]
    assert 0.0 <= rows["train"]["auc_pr"] <= 1.0
    choice = rows["train_model_choice"]  # issue 19: the default round training, beside the recipe's
    assert choice["family"] in ("kernel", "mlp") and 0.0 <= choice["auc_pr"] <= 1.0
    assert choice["cv_auc_pr"] == {} and "near-duplicate" in choice["reason"]
    assert choice["hidden"] == ([choice["labels"] + 2] if choice["family"] == "kernel" else [128, 128, 128])
    assert choice["auc_pr_paper_recipe"] == rows["train"]["auc_pr"]
    cv = rows["train_model_choice_cv"]
    assert cv["family"] in ("mlp", "linear", "ensemble") and 0.0 <= cv["auc_pr"] <= 1.0
    if cv["cv_auc_pr"]:  # cross-validated: the best family won
        assert cv["cv_auc_pr"][cv["family"]] == max(cv["cv_auc_pr"].values())
    else:  # too few positives at this tiny size: the fallback, without cross-validation
        assert cv["family"] == "linear"
    scan = rows["al_round_model_choice"]
    assert scan["family"] == choice["family"] and scan["rows_scored"] == rows["al_round"]["rows_scored"]
    assert any(line.startswith("round_end_to_end") for line in lines)
    assert (tmp_path / "work" / "corpus-20000-d32" / "dagster_home").is_dir()  # kept, as asked

    # more rounds on the kept corpus (benchmarks.rounds): the last pooled round wrote the concept's
    # working set, so the next one reads every row it trains on and scores from it
    more = rounds.main(["--home", "work/corpus-20000-d32", "--rounds", "1", "--out", "rounds.json"])
    assert json.loads(Path("rounds.json").read_text()) == json.loads(json.dumps(more, default=str))
    (r,) = more
    assert r["next_candidates"] == 100 and r["candidate_pool"] is True
    assert r["working_set_misses"] == {"classifier": 0, "al_candidates": 0}
    assert 0 < r["timed_seconds"] <= r["run_seconds"]
    assert r["steps_from_submit"]["classifier"][0] < r["steps_from_submit"]["al_candidates"][0]


def test_bench_deletes_its_corpus_unless_kept(tmp_path, monkeypatch):
    """Without ``keep`` the synthetic corpus (up to ~45 GB at 10M) is gone after its size."""
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    doc = run_bench([20_000], Path("out"), dim=32, repeats=1, workdir=Path("work"), plain_epochs=0,
                    random_negatives=500, ann=False, pool=False, baseline_round=False, log=lambda _: None)
    assert {r["name"] for r in doc["results"]} >= {"corpus_write", "al_round"}
    assert (tmp_path / "out" / "results.json").is_file()
    assert (tmp_path / "work").is_dir() and not (tmp_path / "work" / "corpus-20000-d32").exists()
