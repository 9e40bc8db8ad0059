"""Keyed SipHash-2-4, one id and vectorised, and the train/test split it decides
(agile_pipeline.lib.keyed_hash)."""

import secrets

import numpy as np
import pytest

from agile_pipeline import settings
from agile_pipeline.lib.keyed_hash import (
    assign_split,
    assign_splits,
    hash_keys,
    siphash64,
    siphash64_array,
)
from tests.unit.splits import KEY, reference_siphash


def test_siphash64_matches_the_reference_vector():
    # SipHash-2-4 paper, Appendix A: key 00 01 .. 0f, empty message -> 0x726fdb47dd0e0e31
    assert siphash64(bytes(range(16)), "") == 0x726FDB47DD0E0E31
    assert siphash64(KEY, "k00") == reference_siphash("k00")
    assert 0 <= siphash64(KEY, "some/url.jpg") < 2**64
    with pytest.raises(ValueError, match="16 bytes"):
        siphash64(b"short", "x")


def test_hash_keys_is_siphash64_vectorised():
    keys = [f"img{i}" for i in range(50)] + ["ünïcode"]
    h = hash_keys(keys, KEY)
    assert h.dtype == np.uint64
    assert [int(v) for v in h] == [siphash64(KEY, k) for k in keys]


def test_siphash_array_matches_reference_and_split():
    keys = [secrets.token_hex(16) for _ in range(3000)]
    keys += ["", "a", "abcdefgh", "abcdefghi", "1234567", "ünïcode ✓", "x" * 77]
    assert (siphash64_array(keys, settings.EVAL_KEY) == hash_keys(keys, settings.EVAL_KEY)).all()
    as_bytes = np.array([k.encode() for k in keys], dtype=object).astype("S")
    assert (siphash64_array(as_bytes, settings.EVAL_KEY, chunk=7) == hash_keys(keys, settings.EVAL_KEY)).all()
    is_train = assign_splits(keys, train_fraction=0.5, key=settings.SPLIT_KEY)
    ref = [assign_split(k, train_fraction=0.5, key=settings.SPLIT_KEY) == "train" for k in keys]
    assert is_train.tolist() == ref
