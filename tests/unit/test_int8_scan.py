"""The int8 scan (agile_pipeline.lib.int8_scan): the uint8 copy of a split, the quantized MLP
through PyTorch's real FBGEMM kernels, and when it must step aside for the float scan."""

import pickle

import numpy as np
import pytest
import torch

from agile_pipeline.lib import int8_scan, scan
from agile_pipeline.lib.npy_io import iter_npy_rows
from agile_pipeline.lib.split_cache import clear_split_caches, split_cache
from agile_pipeline.lib.training import TrainConfig, build_mlp, train_classifier

pytestmark = pytest.mark.skipif(not int8_scan.supported(), reason="no x86/FBGEMM quantized engine")


def _write_bf16(path, X):
    bits = torch.from_numpy(np.ascontiguousarray(X, np.float32)).to(torch.bfloat16).view(torch.int16)
    np.save(path, bits.numpy().view(np.uint16))
    return path


def _unit(rng, n, d, outlier=None):
    X = rng.standard_normal((n, d)).astype(np.float32)
    if outlier is not None:  # CLIP-like: one coordinate consistently large
        X[:, outlier] += 8.0
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def test_u8_rows_quantize_every_row_once_and_atomically(tmp_path):
    rng = np.random.default_rng(0)
    X = _unit(rng, 3001, 64, outlier=5)
    path = _write_bf16(tmp_path / "t.bf16.npy", X)
    u8_path, s = int8_scan.u8_rows(path, chunk=500)
    q = np.load(u8_path)
    assert q.shape == X.shape and q.dtype == np.uint8
    assert 1 <= q.min() and q.max() <= 127  # 7 bits: FBGEMM's vpmaddubsw cannot saturate
    xb = int8_scan._bf16_to_f32(np.load(path))
    assert np.abs((q.astype(np.float32) - int8_scan.X_ZERO_POINT) * s - xb).max() <= s / 2 + 1e-7
    assert s == pytest.approx(np.abs(xb).max() / int8_scan.X_LEVELS)
    assert not list(tmp_path.glob("*.tmp"))
    mtime = u8_path.stat().st_mtime_ns
    assert int8_scan.u8_rows(path) == (u8_path, s) and u8_path.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("hidden", [(16,), (128, 128, 128), (32, 8)])
def test_int8_plan_scores_close_to_float32(tmp_path, hidden):
    rng = np.random.default_rng(1)
    X = _unit(rng, 20000, 128, outlier=3)
    lab = np.arange(0, 2000, 4)
    y = (X[lab, 7] > 0.05).astype(int)
    model = train_classifier(X[lab], y, X, round_index=1, exclude_from_pool=lab,
                             config=TrainConfig(hidden_later=hidden, seed=3))
    path = _write_bf16(tmp_path / "t.bf16.npy", X)
    plan = int8_scan.plan_for(model.module, path)
    exact = model.predict_proba(X)
    got = plan.score(chunk=3000)
    assert got.shape == exact.shape and got.dtype == np.float32
    err = np.abs(got - exact)
    assert err.max() < 0.05 and err.mean() < 0.01, (err.max(), err.mean())
    # a row range is the same slice of the whole scan, and the plan survives pickling (Ray)
    part = pickle.loads(pickle.dumps(plan)).score(4567, 9876, chunk=1000)
    assert np.allclose(part, got[4567:9876], atol=1e-5)  # chunking may change float sums
    assert plan.score(5, 5).shape == (0,)


def test_which_models_and_rows_the_int8_scan_takes():
    plain = build_mlp(32, (8,), 0.5)
    l2 = build_mlp(32, (8,), 0.5, l2_input=True)
    unit, scaled = np.ones(10, np.float32), np.full(10, 3.0, np.float32)
    assert int8_scan.applicable(l2, scaled)  # normalises its input itself
    assert int8_scan.applicable(plain, unit)
    assert not int8_scan.applicable(plain, scaled)  # would need a per-row scale before the ReLU
    assert not int8_scan.applicable(build_mlp(32, (), 0.5, l2_input=True), unit)  # no hidden layer
    assert not int8_scan.applicable(torch.nn.Sequential(torch.nn.Linear(32, 8), torch.nn.Tanh(),
                                                        torch.nn.Linear(8, 1)), unit)


def test_scan_plan_falls_back_to_float_where_int8_does_not_apply(tmp_path, monkeypatch):
    from agile_pipeline.lib.vectors import VectorStore

    clear_split_caches()
    vs = VectorStore(tmp_path / "db", cache_dir=tmp_path / "cache")
    rng = np.random.default_rng(2)
    X = rng.standard_normal((600, 16)).astype(np.float32) * 2  # norms far from 1
    vs.add("m", [f"i{i}" for i in range(600)], ["train"] * 600, X)
    c = split_cache(vs, "m", "train")
    model = train_classifier(X[:100], (X[:100, 0] > 0).astype(int), X, round_index=1,
                             exclude_from_pool=np.arange(100), config=TrainConfig(input_norm="none"))
    monkeypatch.setattr(scan, "_SCAN_MODE", ["int8"])
    assert isinstance(scan.scan_plan(model, c), scan.FloatPlan)
    assert np.abs(scan.score_approx(model, c) - model.predict_proba(X)).max() < 0.02
    clear_split_caches()


def test_caller_buffers_are_checked(tmp_path):
    path = _write_bf16(tmp_path / "t.bf16.npy", np.ones((10, 4), np.float32))
    with pytest.raises(ValueError, match="buffers"):
        list(iter_npy_rows(path, 4, buffers=[np.empty((4, 4), np.uint16)]))
    with pytest.raises(ValueError, match="buffers"):
        list(iter_npy_rows(path, 4, buffers=[np.empty((4, 4), np.float32)] * 2))


def test_scan_mode_override(monkeypatch):
    monkeypatch.setattr(scan, "_SCAN_MODE", [])
    monkeypatch.setenv("AGILE_SCAN_DTYPE", "int8")
    assert scan.scan_mode() == "int8"
    assert scan.scan_compute_dtype() == torch.float32
    monkeypatch.setattr(scan, "_SCAN_MODE", [])
    monkeypatch.setenv("AGILE_SCAN_DTYPE", "bfloat16")
    assert scan.scan_compute_dtype() == torch.bfloat16
    monkeypatch.setattr(scan, "_SCAN_MODE", [])
    monkeypatch.setenv("AGILE_SCAN_DTYPE", "nonsense")
    assert scan.scan_mode() in scan.SCAN_MODES  # measured instead, with a warning
