"""`agile bench` / `agile bench-session` launch the checkout's benchmarks; agile_pipeline never
imports them (they import it)."""

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

import agile_pipeline
from agile_pipeline import bench
from agile_pipeline.cli import app


def test_agile_bench_runs_the_checkouts_suite_from_any_folder(tmp_path: Path) -> None:
    decoy = tmp_path / "benchmarks"  # a package of that name where the user stands is not ours
    decoy.mkdir()
    (decoy / "__init__.py").write_text("raise SystemExit('imported the wrong benchmarks')\n")
    for cmd, option in (("bench", "--sizes"), ("bench-session", "--synthetic")):
        out = subprocess.run([sys.executable, "-m", "agile_pipeline.cli", cmd, "--help"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120,
                             check=False)
        assert out.returncode == 0, out.stderr
        assert option in out.stdout


def test_without_a_checkout_the_error_says_where_the_suite_is(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(bench, "__file__", str(tmp_path / "agile_pipeline" / "bench.py"))
    res = CliRunner().invoke(app, ["bench", "--sizes", "1000"])
    assert res.exit_code == 1
    assert "ships with the source checkout" in res.output


def test_the_product_package_never_imports_the_benchmarks() -> None:
    root = Path(agile_pipeline.__file__).parent
    for f in root.rglob("*.py"):
        text = f.read_text(encoding="utf-8")
        assert "from benchmarks" not in text and "import benchmarks" not in text, f
