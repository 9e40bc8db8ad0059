"""LanceDB housekeeping (``VectorStore.compact``) against a reader that is mid-scan.

Real tables, real threads: a reader streams the table at version N in small batches while a
writer upserts rows and compaction + version cleanup run over and over. The reader must get
exactly the rows of version N, and the versions outside the kept window must be gone.
"""

import threading
import time
from datetime import timedelta
from pathlib import Path

import lance
import numpy as np
import pytest

from agile_pipeline.lib.vectors import VectorStore
from tests.reliability.helpers import record

DIM = 16
MODEL = "m"


def _vectors(start: int, n: int, salt: float = 0.0) -> np.ndarray:
    """Row k's vector encodes k (and a salt for updates), so a wrong row is visible."""
    k = np.arange(start, start + n, dtype=np.float32)[:, None]
    return np.hstack([k, np.full((n, 1), salt, np.float32), np.ones((n, DIM - 2), np.float32)])


def _ids(start: int, n: int) -> list[str]:
    return [f"r{k:07d}" for k in range(start, start + n)]


def _fill(vs: VectorStore, fragments: int, rows: int) -> None:
    for f in range(fragments):
        vs.add(MODEL, _ids(f * rows, rows), ["train"] * rows, _vectors(f * rows, rows))


def _uri(vs: VectorStore) -> str:
    return str(vs.table(MODEL).to_lance().uri)


def _data_files(vs: VectorStore) -> int:
    return len(list((Path(_uri(vs)) / "data").glob("*.lance")))


@pytest.fixture
def store(tmp_path: Path) -> VectorStore:
    vs = VectorStore(tmp_path / "lancedb")
    _fill(vs, fragments=30, rows=200)  # 30 small fragments: compaction has work to do
    return vs


def _scan_slowly(ds: "lance.LanceDataset", first_read: threading.Event, pause_s: float) -> dict[str, np.ndarray]:
    got: dict[str, np.ndarray] = {}
    for batch in ds.to_batches(columns=["id", "vector"], batch_size=50):
        vecs = batch.column("vector").flatten().to_numpy(zero_copy_only=False).reshape(batch.num_rows, DIM)
        for i, v in zip(batch.column("id").to_pylist(), vecs, strict=True):
            assert i not in got, f"row {i} read twice"
            got[i] = v
        first_read.set()
        time.sleep(pause_s)
    return got


def test_reader_mid_scan_survives_writers_compaction_and_cleanup(store: VectorStore, artifacts_dir: Path) -> None:
    window = timedelta(seconds=4)
    n_rows = store.count(MODEL)
    # upserts before N: version N's fragments carry deletion files, which later upserts replace
    touched = list(range(0, n_rows, 97))
    for k in touched:
        store.add(MODEL, _ids(k, 1), ["train"], _vectors(k, 1, salt=0.5))
    version_n = store.version(MODEL)
    # version N was *written* longer ago than the window: Lance's own age rule would drop it
    # at the first cleanup after the next write, under the feet of a reader that opened it.
    time.sleep(window.total_seconds() + 0.5)
    reader_ds = lance.dataset(_uri(store), version=version_n)
    first_read = threading.Event()
    stop = threading.Event()
    errors: list[BaseException] = []
    runs: list[dict[str, int]] = []
    written = [0]

    def writer() -> None:
        try:
            first_read.wait(10)
            k = 1_000_000
            while not stop.is_set():
                store.add(MODEL, _ids(k, 100), ["train"] * 100, _vectors(k, 100))  # new rows
                for j in touched[(written[0] // 120) % len(touched)::17]:  # upserts of N's rows
                    store.add(MODEL, _ids(j, 1), ["test"], _vectors(j, 1, salt=1.0))
                written[0] += 120
                k += 100
                time.sleep(0.05)
        except BaseException as exc:
            errors.append(exc)

    def housekeeper() -> None:
        try:
            first_read.wait(10)
            while not stop.is_set():
                runs.append(store.compact(MODEL, keep_versions=1, older_than=window))
                time.sleep(0.1)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer), threading.Thread(target=housekeeper)]
    for t in threads:
        t.start()
    try:
        got = _scan_slowly(reader_ds, first_read, pause_s=0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors
    assert len(got) == n_rows
    expected = dict(zip(_ids(0, n_rows), _vectors(0, n_rows), strict=True))
    for k in touched:
        expected[_ids(k, 1)[0]] = _vectors(k, 1, salt=0.5)[0]
    assert set(got) == set(expected)
    wrong = [i for i, v in got.items() if not np.array_equal(v, expected[i])]
    assert not wrong, f"{len(wrong)} rows differ from version {version_n} (first {wrong[0]})"
    # the housekeeping really ran while the reader was reading, and really rewrote files
    assert len(runs) >= 2, runs
    assert sum(r["fragments_removed"] for r in runs) > 0
    assert written[0] > 0
    # the latest version has every row the writers wrote
    assert store.count(MODEL) == n_rows + (written[0] // 120) * 100
    record(artifacts_dir, test="lancedb_compaction_vs_reader", rows_read=len(got), rows_wrong=len(wrong),
           compactions=len(runs), fragments_removed=sum(r["fragments_removed"] for r in runs),
           versions_removed=sum(r["versions_removed"] for r in runs), rows_written_concurrently=written[0])


def test_versions_outside_the_kept_window_are_removed(store: VectorStore, artifacts_dir: Path) -> None:
    window = timedelta(seconds=1)
    old_versions = [int(v["version"]) for v in lance.dataset(_uri(store)).versions()]
    old_last = old_versions[-1]
    files_before = _data_files(store)
    time.sleep(window.total_seconds() + 0.3)
    store.add(MODEL, _ids(10_000, 50), ["train"] * 50, _vectors(10_000, 50))
    store.add(MODEL, _ids(10_050, 50), ["train"] * 50, _vectors(10_050, 50))
    out = store.compact(MODEL, keep_versions=2, older_than=window)
    kept = [int(v["version"]) for v in lance.dataset(_uri(store)).versions()]
    # every version replaced before the window went; the last old one was replaced just now
    assert kept[0] == old_last, kept
    assert out["versions_removed"] == len(old_versions) - 1
    assert out["fragments_removed"] > 0
    for gone in old_versions[:-1]:
        with pytest.raises(ValueError, match="not found"):
            lance.dataset(_uri(store), version=gone)
    assert lance.dataset(_uri(store), version=old_last).count_rows() == 6000  # kept: still readable
    assert store.count(MODEL) == 6100
    time.sleep(window.total_seconds() + 0.3)
    out2 = store.compact(MODEL, keep_versions=2, older_than=window)
    kept2 = [int(v["version"]) for v in lance.dataset(_uri(store)).versions()]
    assert kept2 == kept[-2:], kept2  # only the newest two are left
    # the newest two are the compaction's own pair: the second newest still holds the small
    # files. Keeping one version frees them.
    time.sleep(window.total_seconds() + 0.3)
    out3 = store.compact(MODEL, keep_versions=1, older_than=window)
    assert [int(v["version"]) for v in lance.dataset(_uri(store)).versions()] == kept[-1:]
    files_after = _data_files(store)
    assert out3["data_files_removed"] > 0
    assert files_after == 1 < files_before
    # the table is whole and searchable after housekeeping
    m = store.matrix(MODEL, "train", dtype=np.float32)
    assert len(m.ids) == 6100 and m.vectors[m.index_of()["r0000123"], 0] == 123
    assert store.search(MODEL, _vectors(7, 1)[0], 1)[0][0] is not None
    record(artifacts_dir, test="lancedb_version_window", versions_before=len(old_versions) + 2,
           versions_after=1, removed=out["versions_removed"] + out2["versions_removed"] + out3["versions_removed"],
           data_files_before=files_before, data_files_after=files_after)


def test_compact_refuses_to_keep_zero_versions_and_ignores_missing_tables(tmp_path: Path) -> None:
    vs = VectorStore(tmp_path / "lancedb")
    assert vs.compact("nothing-here")["versions_removed"] == 0
    _fill(vs, 2, 10)
    with pytest.raises(ValueError, match="keep_versions"):
        vs.compact(MODEL, keep_versions=0)
