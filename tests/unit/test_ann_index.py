"""The ANN index over an embedding table (agile_pipeline.lib.ann_index): real LanceDB IVF-PQ."""

import numpy as np
import pytest

from agile_pipeline.lib import ann_index
from agile_pipeline.lib.split_cache import clear_split_caches, split_cache
from agile_pipeline.lib.vectors import VectorStore


@pytest.fixture
def clustered_store(tmp_path):
    """20,000 unit vectors in 64 dims around 200 centres (how real embeddings look), 2/3 train."""
    clear_split_caches()
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((200, 64)).astype(np.float32)
    X = centres[rng.integers(0, 200, 20_000)] + 0.6 * rng.standard_normal((20_000, 64)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    vs = VectorStore(tmp_path / "lancedb", cache_dir=tmp_path / "cache")
    vs.add("m", [f"{i:016x}" for i in range(len(X))], ["train" if i % 3 else "test" for i in range(len(X))], X)
    yield vs, X
    clear_split_caches()


def test_small_tables_are_searched_exactly_without_an_index(clustered_store):
    vs, X = clustered_store
    report = ann_index.ensure_index(vs, "m")  # 20k < ANN_MIN_ROWS
    assert report.status == "exact" and not ann_index.has_index(vs, "m")
    hits = ann_index.search(vs, "m", X[[1, 2]], 5, split="train")
    assert hits[0][0][0] == f"{1:016x}" and abs(hits[0][0][2] - 1.0) < 1e-5  # itself first
    assert all(s == "train" for h in hits for _i, s, _v in h)
    assert [h[2] for h in hits[1]] == sorted((h[2] for h in hits[1]), reverse=True)


def test_index_is_built_calibrated_to_recall_and_extended_without_a_cache_rebuild(clustered_store):
    vs, X = clustered_store
    train = split_cache(vs, "m", "train")
    data_version = vs.data_version("m")
    report = ann_index.ensure_index(vs, "m", min_rows=10_000)
    assert report.status == "built" and report.indexed_rows == 20_000 and ann_index.has_index(vs, "m")
    # the index build committed a table version but changed no row: the split cache stands
    assert vs.version("m") > data_version and vs.data_version("m") == data_version
    assert split_cache(vs, "m", "train").tag == train.tag
    cal = ann_index.calibrate(vs, "m")
    assert cal["recall"] >= ann_index.RECALL_TARGET, cal["tried"]
    assert ann_index.search_settings(vs, "m")["nprobes"] == cal["nprobes"]
    again = ann_index.recall_at_k(vs, "m", k=100)  # the kept setting gives the calibrated recall
    assert again["recall"] == pytest.approx(cal["recall"])
    # a refresh's new rows are added to the index, not rebuilt from scratch
    new = X[:300] + 0.01
    vs.add("m", [f"n{i}" for i in range(300)], ["train"] * 300, new / np.linalg.norm(new, axis=1, keepdims=True))
    report = ann_index.ensure_index(vs, "m", min_rows=10_000)
    assert report.status == "extended" and report.indexed_rows == 20_300 and report.unindexed_rows == 0
    assert ann_index.search(vs, "m", X[[0]], 2, split="train")[0][0][0] in {f"{0:016x}", "n0"}
    assert ann_index.ensure_index(vs, "m", min_rows=10_000).status == "current"


def test_index_candidates_map_to_split_cache_rows_by_row_id(clustered_store):
    """The re-rank reads the index's candidates as LanceDB row ids, not image ids: each must land
    on the cache row of its own image, and rows of the other split on none."""
    vs, X = clustered_store
    ann_index.ensure_index(vs, "m", min_rows=10_000)
    tbl = vs.table("m")
    train = split_cache(vs, "m", "train")
    res = (tbl.search(X[0], vector_column_name="vector").distance_type("cosine").nprobes(8).limit(600)
           .with_row_id(True).select(["id", "split"]).to_arrow())
    rows = train.rowid_positions(res.column("_rowid").to_numpy(), tbl)
    splits = res.column("split").to_pylist()
    assert {"train", "test"} <= set(splits) and train.cached("rowids").exists()
    for row, image_id, split in zip(rows.tolist(), res.column("id").to_pylist(), splits, strict=True):
        assert (train.key_at(row) == image_id) if split == "train" else row == -1
    assert train.rowid_positions(np.empty(0, np.uint64), tbl).size == 0
