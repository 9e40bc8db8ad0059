"""A concept's working set (agile_pipeline.lib.working_set) on real split caches: the rows it
serves are the split cache's rows, whatever it holds; a round trained through it is the round
trained on the split cache; a new version of the split leaves the old file behind."""

import secrets

import numpy as np
import pytest

from agile_pipeline.lib.model_choice import choice_for, kernel_random_rows, train_round_model
from agile_pipeline.lib.split_cache import split_cache
from agile_pipeline.lib.training import TrainConfig, mlp_random_rows, training_inputs
from agile_pipeline.lib.working_set import concept_rows, working_set_path, write_working_set
from tests.unit.splits import SPLIT_DIM, SPLIT_MODEL


def test_rows_come_from_the_working_set_where_it_has_them_and_equal_the_split_cache(split_store, tmp_path):
    train = split_cache(split_store, SPLIT_MODEL, "train")
    empty = concept_rows(tmp_path, train)  # no file yet: everything from the split cache
    want = np.array([7, 3, 3000, 3, 0, len(train) - 1])
    assert np.array_equal(empty.rows_f32(want), train.rows_f32(want)) and empty.misses == len(want)

    held = np.array([3, 7, 11, 500, 2999, -4, len(train) + 9])  # invalid rows are dropped
    assert write_working_set(tmp_path, train, held) == 5
    src = concept_rows(tmp_path, train)
    assert src.rows.tolist() == [3, 7, 11, 500, 2999]
    got = src.rows_f32(want)
    assert np.array_equal(got, train.rows_f32(want))
    assert (src.hits, src.misses) == (3, 3)  # 7, 3, 3 held; 3000, 0, the last not
    assert np.array_equal(src[np.array([500, 1])], np.asarray(train.f16[[500, 1]]))
    assert src.shape == (len(train), SPLIT_DIM) and src.ndim == 2
    with pytest.raises(TypeError):
        src[5]

    # rewritten from the old file plus the split cache: still the split cache's rows
    write_working_set(tmp_path, train, np.array([7, 42, 3000]))
    again = concept_rows(tmp_path, train)
    assert np.array_equal(again.rows_f32(np.array([3000, 42, 7])), train.rows_f32(np.array([3000, 42, 7])))
    assert again.misses == 0

    # a new table version: a new split cache, the old file is not read and goes at the next write
    split_store.add(SPLIT_MODEL, [secrets.token_hex(16)], ["train"], np.ones((1, SPLIT_DIM), np.float32))
    newer = split_cache(split_store, SPLIT_MODEL, "train")
    assert len(concept_rows(tmp_path, newer).rows) == 0
    write_working_set(tmp_path, newer, np.array([1, 2]))
    assert [p.name for p in tmp_path.glob("working_set-*.npy")] == [working_set_path(tmp_path, newer).name]


def test_a_round_trained_through_the_working_set_is_the_round_trained_on_the_split_cache(split_store, tmp_path):
    train = split_cache(split_store, SPLIT_MODEL, "train")
    lab_rows = np.arange(0, 300, 3)
    ids = train.id_at(lab_rows)
    y = (train.rows_f32(lab_rows)[:, 0] > 0.2).astype(int)
    y[:4] = 1
    choice = choice_for("auto")
    # what a prefetch would hold: the labelled rows and both families' random negatives
    write_working_set(tmp_path, train, np.concatenate([
        lab_rows, kernel_random_rows(choice, len(train), lab_rows),
        mlp_random_rows(TrainConfig(), len(train), lab_rows, 8000)]))
    for family in ("kernel", "mlp"):
        models = []
        for rows in (None, lambda c: concept_rows(tmp_path, c)):
            X_pool, X_lab, exclude = training_inputs(split_store, SPLIT_MODEL, ids, rows=rows)
            models.append(train_round_model(X_lab, y, X_pool, round_index=1, choice=choice_for(family),
                                            exclude_from_pool=exclude))
            if rows is not None:
                assert X_pool.misses == 0 and X_pool.hits > len(ids)
        X = train.rows_f32(np.arange(len(train)))
        assert np.array_equal(models[0].predict_proba(X), models[1].predict_proba(X)), family
