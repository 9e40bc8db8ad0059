"""MLflow bookkeeping against a real embedded store (agile_pipeline.lib.tracking)."""

from pathlib import Path

from agile_pipeline import settings
from agile_pipeline.lib import tracking


def test_relative_data_directory_logs_and_registers(tmp_path, monkeypatch):
    """A relative AGILE_HOME / artifact root (e.g. ``agile bench --out bench-out``) used to
    fail with "relative path can't be expressed as a file URI"."""
    monkeypatch.chdir(tmp_path)
    paths = settings.Paths(Path("rel-home"))
    assert paths.home == tmp_path / "rel-home"
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "meta.json").write_text("{}")
    for root in (Path("artifacts"), paths.mlflow_artifacts):
        logged = tracking.log_model_version(
            tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=root,
            concept=f"red car {root.name}", round_index=0, model_dir=model_dir, params={"lr": 1e-4},
            metrics={"auc_pr": 0.5}, tags={})
        assert logged.version == "1"
        assert logged.artifact_uri.startswith("file://" + str(tmp_path))
