"""The split cache gives the committed path's rows and ids (agile_pipeline.lib.split_cache), and
the labeled rows of a round come from it (agile_pipeline.lib.training.training_inputs)."""

import secrets

import numpy as np

from agile_pipeline.lib.split_cache import split_cache
from agile_pipeline.lib.training import training_inputs
from tests.unit.splits import SPLIT_DIM, SPLIT_MODEL


def test_split_cache_matches_matrix_and_finds_ids(split_store):
    m = split_store.matrix(SPLIT_MODEL, "train")
    c = split_cache(split_store, SPLIT_MODEL, "train")
    assert c.id_at(np.arange(len(c))) == [str(i) for i in m.ids]
    assert np.array_equal(np.asarray(c.f16), np.asarray(m.vectors))
    assert np.allclose(c.norms, np.linalg.norm(np.asarray(m.vectors, np.float32), axis=1))
    q = [str(m.ids[5]), "nope", str(m.ids[-1]), "f" * 40, str(m.ids[5])]
    assert c.positions(q).tolist() == [5, -1, len(m.ids) - 1, -1, 5]
    mask = c.mask(q)
    assert mask.sum() == 2 and mask[5] and mask[-1]
    bf = np.load(c.bf16_path).view(np.uint16).astype(np.uint32) << 16
    assert np.allclose(bf.view(np.float32), np.asarray(m.vectors, np.float32), atol=1e-2)
    # a new table version gets a new cache; the old one is gone
    split_store.add(SPLIT_MODEL, [secrets.token_hex(16)], ["train"], np.ones((1, SPLIT_DIM), np.float32) / SPLIT_DIM**0.5)
    c2 = split_cache(split_store, SPLIT_MODEL, "train")
    assert len(c2) == len(c) + 1 and c2.version > c.version
    assert not list(c.cache_dir.glob(f"{c.tag}.*"))
    assert len(split_store.matrix(SPLIT_MODEL, "train").ids) == len(c2)


def test_training_inputs_equal_the_dict_path(split_store):
    train = split_store.matrix(SPLIT_MODEL, "train")
    test = split_store.matrix(SPLIT_MODEL, "test")
    ids = [str(train.ids[3]), str(test.ids[4]), str(train.ids[10])]
    X_pool, X_lab, exclude = training_inputs(split_store, SPLIT_MODEL, ids)
    assert np.array_equal(X_lab, split_store.vectors_for(SPLIT_MODEL, ids))
    assert exclude.tolist() == [3, 10]
    assert np.array_equal(np.asarray(X_pool), np.asarray(train.vectors))
