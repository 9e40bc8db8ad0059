"""Corpus assets through Dagster's real `materialize` on real files."""

import shutil

import pytest

from agile_pipeline.defs.corpus import image_embeddings, image_manifest, train_test_assignment
from agile_pipeline.defs.resources import AgileResources
from agile_pipeline.lib.corpus import IGNORED_SUFFIXES, SourceError, scan_source
from agile_pipeline.runner import RunFailed, metadata_of, run_corpus
from tests.hostile_images import write_hostile_images, write_real_like_images


def test_ingest_hostile_folder_embeds_good_skips_bad_with_reasons(agile_home, tmp_path):
    src = tmp_path / "src"
    expected = {
        name: reason for name, reason in write_hostile_images(src / "bad").items()
        if not name.endswith(tuple(IGNORED_SUFFIXES))  # label/notes files are not tried
    }
    write_real_like_images(src / "good", 40, seed=1)
    # duplicates: the same content under another name, in a subfolder
    (src / "good" / "copies").mkdir()
    first = sorted((src / "good").glob("*.*"))[:3]
    for p in first:
        shutil.copy(p, src / "good" / "copies" / ("copy-" + p.name))

    result = run_corpus([str(src)])
    m = metadata_of(result, image_manifest)
    good_hostile = sum(1 for r in expected.values() if r is None)
    assert m["ingested"] == 40 + good_hostile
    assert m["duplicates"] == 3
    for reason in {r for r in expected.values() if r}:
        assert m[f"skipped_{reason}"] == sum(1 for r in expected.values() if r == reason), reason
    e = metadata_of(result, image_embeddings)
    assert e["embedded_now"] == 40 + good_hostile
    assert e["failed_now"] == 0
    assert result.get_asset_check_evaluations()  # checks ran
    assert all(c.passed for c in result.get_asset_check_evaluations())
    s = metadata_of(result, train_test_assignment)
    assert s["train"] + s["test"] == 40 + good_hostile
    assert 0 < s["train"] < s["train"] + s["test"]


def test_second_run_embeds_only_new_files(agile_home, tmp_path):
    src = tmp_path / "src"
    write_real_like_images(src, 30, seed=2)
    run_corpus([str(src)])
    write_real_like_images(src / "new", 10, seed=3)
    result = run_corpus([str(src)])
    m = metadata_of(result, image_manifest)
    assert m["ingested"] == 10
    assert m["unchanged_since_last_scan"] == 30
    assert metadata_of(result, image_embeddings)["embedded_now"] == 10
    assert metadata_of(result, image_embeddings)["rows_total"] == 40


def test_split_is_deterministic_across_data_dirs(agile_home, tmp_path, monkeypatch):
    src = tmp_path / "src"
    write_real_like_images(src, 30, seed=4)
    run_corpus([str(src)])
    first = AgileResources().state.store().all_image_splits()
    monkeypatch.setenv("AGILE_HOME", str(tmp_path / "other"))
    run_corpus([str(src)])
    assert AgileResources().state.store().all_image_splits() == first


def test_switching_model_builds_a_separate_table(agile_home, tmp_path, monkeypatch):
    src = tmp_path / "src"
    write_real_like_images(src, 12, seed=5)
    run_corpus([str(src)])
    monkeypatch.setenv("AGILE_ENCODER", "random:16")
    result = run_corpus([str(src)])
    assert metadata_of(result, image_embeddings)["embedded_now"] == 12
    vs = AgileResources().vectors.vectors()
    assert vs.count("random-32") == 12 if vs.exists("random-32") else True
    tables = vs.db.list_tables().tables
    assert len([t for t in tables if t.startswith("embeddings__")]) == 2


def test_unreachable_source_fails_with_its_name(agile_home, tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(SourceError, match="no-such-folder"):
        list(scan_source(str(missing)))
    with pytest.raises(RunFailed, match="no-such-folder"):
        run_corpus([str(missing)])


def test_list_and_parquet_sources(agile_home, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "imgs"
    write_real_like_images(src, 6, seed=6)
    files = sorted(str(p) for p in src.iterdir())
    (tmp_path / "list.txt").write_text("# my images\n" + "\n".join(files[:3]) + "\n")
    pq.write_table(pa.table({"url": files[3:]}), tmp_path / "laion.parquet")
    r1 = run_corpus([str(tmp_path / "list.txt")])
    r2 = run_corpus([str(tmp_path / "laion.parquet")])
    assert metadata_of(r1, image_manifest)["ingested"] == 3
    assert metadata_of(r2, image_manifest)["ingested"] == 3


def test_housekeeping_job_compacts_every_embedding_table(agile_home, tmp_path):
    """The scheduled Dagster job (real `execute_in_process`) compacts and keeps the rows."""
    from agile_pipeline.definitions import defs
    from agile_pipeline.defs.corpus import vectors_housekeeping_job

    src = tmp_path / "src"
    write_real_like_images(src, 12, seed=7)
    run_corpus([str(src)])
    write_real_like_images(src / "more", 6, seed=8)
    run_corpus([str(src)])
    vs = AgileResources().vectors.vectors()
    before = vs.count("random-32")
    result = vectors_housekeeping_job.execute_in_process(
        resources=AgileResources().as_dict(),
        run_config={"ops": {"compact_vector_tables": {"config": {"keep_versions": 1, "keep_replaced_for_minutes": 0}}}},
    )
    assert result.success
    out = result.output_for_node("compact_vector_tables")
    assert set(out) == {"random_32"}
    assert out["random_32"]["versions_kept"] == 1
    assert vs.count("random-32") == before == 18
    assert "vectors_housekeeping_schedule" in {s.name for s in defs().schedules}
