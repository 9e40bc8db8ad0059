import os
from pathlib import Path

import pytest

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture
def agile_home(tmp_path, monkeypatch):
    """A fresh data directory for one test, with the plumbing (random) encoder by default."""
    home = tmp_path / "agile"
    monkeypatch.setenv("AGILE_HOME", str(home))
    monkeypatch.setenv("AGILE_ENCODER", "random:32")
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    return home


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
