"""Whole-split scans agree with the float32 model and with LanceDB (agile_pipeline.lib.scan)."""

import numpy as np

from agile_pipeline.lib.scan import nearest_in_split
from agile_pipeline.lib.split_cache import split_cache
from tests.unit.splits import SPLIT_DIM, SPLIT_MODEL


def test_nearest_in_split_agrees_with_lancedb_search(split_store):
    rng = np.random.default_rng(5)
    queries = rng.standard_normal((4, SPLIT_DIM)).astype(np.float32)
    queries[0] = np.eye(SPLIT_DIM, dtype=np.float32)[0]  # the planted direction
    cache = split_cache(split_store, SPLIT_MODEL, "train")
    got = nearest_in_split(cache, queries, 100, chunk=1000)  # several chunks
    for q, hits in zip(queries, got, strict=True):
        ref = split_store.search(SPLIT_MODEL, q, 100, split="train")
        assert [s for _i, s in hits] == sorted((s for _i, s in hits), reverse=True)
        # float16 rows: the same neighbours up to near-ties at the boundary
        assert len({i for i, _s in hits} & {i for i, _sp, _s in ref}) >= 97
        assert abs(hits[0][1] - ref[0][2]) < 2e-3
    assert nearest_in_split(cache, queries[:1], 0) == [[]]
