"""Data-directory faults through the real ``agile`` CLI in child processes: a missing directory
is created; a read-only directory, a file in the way and a full disk give one line naming the
path and what to do (exit code 1, no traceback), and a label import that hits the full disk
part way records nothing.

Root (CI containers) ignores ``chmod``: there the read-only directory is made immutable with
``chattr +i`` (which binds root too), and the full disk is ``RLIMIT_FSIZE`` in the child, which
binds everyone. Nothing is skipped and nothing is mocked.
"""

import contextlib
import csv
import hashlib
import os
import shutil
import sqlite3
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agile_pipeline.lib.state import LabelEvent, StateStore
from tests.labeling_ui.fakes import ingest_images
from tests.reliability.helpers import env_vars, file_size_limit, record, run_cli

IS_ROOT = os.geteuid() == 0


def _one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The CLI failed the way a user should see it: exit 1, one ``error:`` line, no traceback."""
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` -> content hash (to prove nothing was written)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[str]:
    """Make ``folder`` refuse new files for this user; yields how. Non-root: ``chmod 0555``.
    Root: ``chattr +i`` (immutable, refuses root too); if the filesystem or the container's
    capabilities do not allow it, a fault root cannot bypass either: the folder replaced by a
    regular file for the duration."""
    if not IS_ROOT:
        mode = folder.stat().st_mode
        folder.chmod(0o555)
        try:
            yield "chmod 0555"
        finally:
            folder.chmod(stat.S_IMODE(mode))
        return
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False).returncode == 0:
        try:
            yield "chattr +i (root)"
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        return
    aside = folder.with_name(folder.name + ".aside")
    folder.rename(aside)
    folder.write_text("not a folder")
    try:
        yield "file in the way (root, no chattr)"
    finally:
        folder.unlink()
        aside.rename(folder)


def test_missing_data_dir_is_created(tmp_path: Path) -> None:
    home = tmp_path / "does" / "not" / "exist" / "yet"
    r = run_cli("status", env=env_vars(AGILE_HOME=str(home)))
    assert r.returncode == 0, r.stderr
    assert f"data directory: {home}" in r.stdout
    for sub in ("agile.sqlite", "lancedb", "blobs", "cache", "mlartifacts"):
        assert (home / sub).exists(), sub
    assert not list(home.glob(".write-test-*")), "the writability probe was left behind"


@pytest.mark.parametrize("command", [["status"], ["concept", "list"], ["concept", "create", "dogs", "--no-expand"]])
def test_data_dir_that_is_a_file_or_under_a_file(tmp_path: Path, command: list[str]) -> None:
    a_file = tmp_path / "agile-home"
    a_file.write_text("I am a file")
    r = run_cli(*command, env=env_vars(AGILE_HOME=str(a_file)))
    _one_line_error(r, str(a_file), "is a file, not a folder", "AGILE_HOME")
    below = a_file / "sub"
    r = run_cli(*command, env=env_vars(AGILE_HOME=str(below)))
    _one_line_error(r, str(below), "AGILE_HOME")
    assert a_file.read_text() == "I am a file"


@pytest.mark.parametrize("command", [["status"], ["concept", "create", "dogs", "--no-expand"], ["search", "dog"]])
def test_read_only_data_dir(tmp_path: Path, command: list[str], artifacts_dir: Path) -> None:
    home = tmp_path / "home"
    assert run_cli("status", env=env_vars(AGILE_HOME=str(home))).returncode == 0
    before = _snapshot(home)
    with read_only(home) as how:
        r = run_cli(*command, env=env_vars(AGILE_HOME=str(home), AGILE_ENCODER="random:32"))
    if how.startswith("file in the way"):
        _one_line_error(r, str(home), "AGILE_HOME")
    else:
        _one_line_error(r, str(home), "not writable", "fix its permissions or set AGILE_HOME")
    assert _snapshot(home) == before, "something was written to the read-only data directory"
    record(artifacts_dir, test="read_only_data_dir", fault=how, command=" ".join(command),
           handled=True, error=r.stderr.strip())


def test_full_disk_before_anything_is_written(tmp_path: Path, artifacts_dir: Path) -> None:
    """RLIMIT_FSIZE=0: no file can grow at all, as on a full disk. A fresh data directory."""
    home = tmp_path / "home"
    r = run_cli("concept", "create", "dogs", "--no-expand", env=env_vars(AGILE_HOME=str(home)),
                preexec_fn=file_size_limit(0))
    _one_line_error(r, str(home), "no space", "free disk space")
    record(artifacts_dir, test="full_disk_fresh_dir", fault="RLIMIT_FSIZE=0", handled=True,
           error=r.stderr.strip())


@pytest.fixture
def labelled_home(tmp_path: Path) -> tuple[Path, list[str], int]:
    """A data directory with 20 pictures, concept ``c`` and 10 labels; the store closed."""
    home = tmp_path / "home"
    store = StateStore(home / "agile.sqlite")
    ids = ingest_images(store, tmp_path / "pictures", 20, seed=3)
    store.create_concept("c", ["red things"])
    store.add_labels([LabelEvent("c", i, "positive", "owner") for i in ids[:10]])
    store.close()
    return home, ids, 10


def _label_count(db: Path) -> tuple[int, str]:
    with contextlib.closing(sqlite3.connect(db)) as con:
        n = con.execute("SELECT count(*) FROM label_events").fetchone()[0]
        ok = con.execute("PRAGMA integrity_check").fetchone()[0]
    return int(n), str(ok)


def test_label_import_that_fills_the_disk_records_nothing(
    tmp_path: Path, labelled_home: tuple[Path, list[str], int], artifacts_dir: Path
) -> None:
    home, ids, n_before = labelled_home
    rows = 6000  # ~1.5 MB of WAL pages: far past the cap below
    big = tmp_path / "big.csv"
    with big.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "label", "rater"])
        for k in range(rows):
            w.writerow([ids[k % len(ids)], ("positive", "negative", "skip")[k % 3], f"rater{k % 7}"])
    largest = max(p.stat().st_size for p in home.rglob("*") if p.is_file())
    cap = largest + 128 * 1024  # the store opens and the probe passes; the import cannot fit
    env = env_vars(AGILE_HOME=str(home))
    r = run_cli("label", "c", "--from-csv", str(big), env=env, preexec_fn=file_size_limit(cap))
    line = _one_line_error(r, str(home / "agile.sqlite"), "rolled back")
    n_after, integrity = _label_count(home / "agile.sqlite")
    assert n_after == n_before, f"{n_after - n_before} labels of a failed import were kept"
    assert integrity == "ok"
    # the store is usable right away, and the same import succeeds once there is room
    r = run_cli("label", "c", "--from-csv", str(big), env=env)
    assert r.returncode == 0, r.stderr
    assert f"recorded {rows} label(s)" in r.stdout
    assert _label_count(home / "agile.sqlite") == (n_before + rows, "ok")
    record(artifacts_dir, test="label_import_full_disk", rows_in_csv=rows, cap_bytes=cap,
           labels_kept_from_failed_import=n_after - n_before, error=line)
