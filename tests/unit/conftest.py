"""Fixtures shared by the unit tests of the split-cache stages (split cache, scan, selection,
eval set): a small LanceDB table split into train/test, and every scan mode."""

import secrets

import numpy as np
import pytest

from agile_pipeline.lib import scan
from agile_pipeline.lib.split_cache import clear_split_caches
from agile_pipeline.lib.vectors import VectorStore
from tests.unit.splits import SPLIT_DIM, SPLIT_MODEL


@pytest.fixture
def split_store(tmp_path):
    """6,000 unit vectors (a findable concept along axis 0) in several table versions."""
    clear_split_caches()
    vs = VectorStore(tmp_path / "lancedb", cache_dir=tmp_path / "cache")
    rng = np.random.default_rng(0)
    n = 6000
    ids = [secrets.token_hex(16) for _ in range(n)]
    X = rng.standard_normal((n, SPLIT_DIM)).astype(np.float32)
    X[: n // 50] += 3 * np.eye(SPLIT_DIM, dtype=np.float32)[0]  # a findable concept
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    splits = ["train" if i % 3 else "test" for i in range(n)]
    for s in range(0, n, 2500):  # several fragments / versions
        vs.add(SPLIT_MODEL, ids[s : s + 2500], splits[s : s + 2500], X[s : s + 2500])
    yield vs
    clear_split_caches()


@pytest.fixture(params=scan.SCAN_MODES)
def scan_mode_each(request, monkeypatch):
    """Every scan mode, whatever this CPU would pick (bfloat16 is slow but exact enough here)."""
    monkeypatch.setattr(scan, "_SCAN_MODE", [request.param])
    return request.param
