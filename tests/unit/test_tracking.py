"""MLflow bookkeeping against a real embedded store (agile_pipeline.lib.tracking)."""

import os
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


def test_embedded_store_is_created_whole_or_not_at_all(tmp_path) -> None:
    """A process killed while MLflow builds its schema leaves a private temporary file, never
    a half-built store that every later run would refuse."""
    db = tmp_path / "mlflow.db"
    (tmp_path / ".mlflow.db.init-99999").write_bytes(b"half-built by a killed process")
    uri = f"sqlite:///{db}"
    tracking.ensure_sqlite_store(uri)
    assert db.exists()
    tracking.ensure_sqlite_store(uri)  # idempotent
    client = tracking._client(uri)
    assert client.search_experiments(max_results=5)  # the default experiment: a complete store
    assert not list(tmp_path.glob(f".mlflow.db.init-{os.getpid()}"))


def test_mlflow_artifact_progress_bars_are_off_unless_asked_for(tmp_path, monkeypatch) -> None:
    """MLflow draws a bar per artifact download (several per round in the app's log); the
    product's client turns them off, and leaves a user's own setting alone."""
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR

    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    tracking._client(f"sqlite:///{tmp_path / 'a.db'}")
    assert MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.get() is False
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true")
    tracking._client(f"sqlite:///{tmp_path / 'b.db'}")
    assert MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.get() is True
