"""The corpus-scale fast path gives the committed path's answers (agile_pipeline.lib.scale)."""

import secrets

import numpy as np
import pytest

from agile_pipeline import settings
from agile_pipeline.lib import scale
from agile_pipeline.lib.corpus import assign_split
from agile_pipeline.lib.evalset import hash_keys, stratified_eval_set, stratum_of
from agile_pipeline.lib.selection import select_margin, select_margin_positive
from agile_pipeline.lib.training import TrainConfig, train_classifier
from agile_pipeline.lib.vectors import VectorStore

MODEL = "unit-32"
DIM = 32


def test_siphash_array_matches_reference_and_split():
    keys = [secrets.token_hex(16) for _ in range(3000)]
    keys += ["", "a", "abcdefgh", "abcdefghi", "1234567", "ünïcode ✓", "x" * 77]
    assert (scale.siphash64_array(keys, settings.EVAL_KEY) == hash_keys(keys, settings.EVAL_KEY)).all()
    as_bytes = np.array([k.encode() for k in keys], dtype=object).astype("S")
    assert (scale.siphash64_array(as_bytes, settings.EVAL_KEY, chunk=7) == hash_keys(keys, settings.EVAL_KEY)).all()
    is_train = scale.assign_splits(keys, train_fraction=0.5, key=settings.SPLIT_KEY)
    ref = [assign_split(k, train_fraction=0.5, key=settings.SPLIT_KEY) == "train" for k in keys]
    assert is_train.tolist() == ref


@pytest.fixture
def store(tmp_path):
    scale._MEMO.clear()
    vs = VectorStore(tmp_path / "lancedb", cache_dir=tmp_path / "cache")
    rng = np.random.default_rng(0)
    n = 6000
    ids = [secrets.token_hex(16) for _ in range(n)]
    X = rng.standard_normal((n, DIM)).astype(np.float32)
    X[: n // 50] += 3 * np.eye(DIM, dtype=np.float32)[0]  # a findable concept
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    splits = ["train" if i % 3 else "test" for i in range(n)]
    for s in range(0, n, 2500):  # several fragments / versions
        vs.add(MODEL, ids[s : s + 2500], splits[s : s + 2500], X[s : s + 2500])
    yield vs
    scale._MEMO.clear()


def _model(vs, round_index=1, seed=0):
    train = vs.matrix(MODEL, "train")
    lab = np.arange(0, 400, 2)
    y = (np.asarray(train.vectors[lab], np.float32)[:, 0] > 0.3).astype(int)
    y[:3] = 1
    return train_classifier(np.asarray(train.vectors[lab], np.float32), y, train.vectors,
                            round_index=round_index, exclude_from_pool=lab,
                            config=TrainConfig(seed=seed)), [str(train.ids[i]) for i in lab]


def test_split_cache_matches_matrix_and_finds_ids(store):
    m = store.matrix(MODEL, "train")
    c = scale.split_cache(store, MODEL, "train")
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
    store.add(MODEL, [secrets.token_hex(16)], ["train"], np.ones((1, DIM), np.float32) / DIM**0.5)
    c2 = scale.split_cache(store, MODEL, "train")
    assert len(c2) == len(c) + 1 and c2.version > c.version
    assert not list(c.cache_dir.glob(f"{c.tag}.*"))
    assert len(store.matrix(MODEL, "train").ids) == len(c2)


@pytest.fixture(params=scale.SCAN_MODES)
def mode(request, monkeypatch):
    """Every scan mode, whatever this CPU would pick (bfloat16 is slow but exact enough here)."""
    monkeypatch.setattr(scale, "_SCAN_MODE", [request.param])
    return request.param


@pytest.mark.parametrize("strategy", ["margin", "margin-positive"])
@pytest.mark.parametrize("shortlist", [None, 120])
def test_select_margin_exact_equals_float32_selection(store, strategy, shortlist, mode):
    model, labeled = _model(store)
    m = store.matrix(MODEL, "train")
    c = scale.split_cache(store, MODEL, "train")
    probs = model.predict_proba(m.vectors)
    eligible = ~np.isin(m.ids.astype(str), labeled)
    fn = select_margin if strategy == "margin" else select_margin_positive
    want = fn(probs, 100, eligible=eligible)
    got = scale.select_margin_exact(model, c, 100, eligible=~c.mask(labeled), strategy=strategy,
                                    shortlist=shortlist)
    assert got.rows.tolist() == want.tolist()
    assert np.allclose(got.scores, probs[want], atol=1e-6)
    assert got.info["shortlist_proven"]
    sel = scale.select_for_round(store, MODEL, model, set(labeled), 100, strategy)
    assert sel.ids == [str(m.ids[i]) for i in want]


@pytest.mark.parametrize("variant", ["default", "round0", "no_l2", "standardize"])
def test_approx_scores_close_and_strata_exact(store, variant, mode):
    train = store.matrix(MODEL, "train")
    lab = np.arange(0, 400, 2)
    X = np.asarray(train.vectors[lab], np.float32) * (3.0 if variant == "no_l2" else 1.0)
    y = (X[:, 0] > 0.3).astype(int)
    y[:3] = 1
    config = TrainConfig(input_norm="none" if variant == "no_l2" else "l2",
                         standardize=variant == "standardize")
    model = train_classifier(X, y, train.vectors, round_index=0 if variant == "round0" else 1,
                             exclude_from_pool=lab, config=config)
    c = scale.split_cache(store, MODEL, "test")
    exact = model.predict_proba(store.matrix(MODEL, "test").vectors)
    plan = scale.scan_plan(model, c)
    assert type(plan).__name__ == ("Int8Plan" if mode == "int8" else "FloatPlan")
    approx = scale.score_approx(model, c, chunk=1000)
    assert np.abs(approx - exact).max() < 0.02
    sc = scale.approx_split_scores(model, c, mode=mode)
    assert np.abs(sc.values - exact).max() <= sc.bound
    # the eval set from lazily refined approximate scores picks what the float32 scores pick
    for per_stratum in (20, 2000):
        sc = scale.approx_split_scores(model, c, mode=mode)
        sc.bound = max(sc.bound, 0.02)  # force many ambiguous rows
        got = scale.stratified_eval_set_cached(c, {"m": sc}, key=settings.EVAL_KEY,
                                               per_stratum=per_stratum)
        want = stratified_eval_set(c.str_keys()[:], {"m": exact}, key=settings.EVAL_KEY,
                                   per_stratum=per_stratum)
        assert (got.keys, got.picked_by, got.counts, got.hashes) == (
            want.keys, want.picked_by, want.counts, want.hashes)
        assert sc.exact.sum() < len(c) or per_stratum == 2000
        assert (stratum_of(sc.values[sc.exact]) == stratum_of(exact[sc.exact])).all()


def test_cached_eval_set_equals_reference(store):
    test = scale.split_cache(store, MODEL, "test")
    m = store.matrix(MODEL, "test")
    rng = np.random.default_rng(3)
    scores = {"zero-shot": rng.random(len(test)).astype(np.float32),
              "round-0": rng.beta(0.3, 3, len(test)).astype(np.float32)}
    want = stratified_eval_set([str(i) for i in m.ids], scores, key=settings.EVAL_KEY)
    for _ in range(2):  # computed, then from the cache
        got = scale.stratified_eval_set_cached(test, scores, key=settings.EVAL_KEY)
        assert got.to_dict() == want.to_dict()


def test_training_inputs_equal_the_dict_path(store):
    train = store.matrix(MODEL, "train")
    test = store.matrix(MODEL, "test")
    ids = [str(train.ids[3]), str(test.ids[4]), str(train.ids[10])]
    X_pool, X_lab, exclude = scale.training_inputs(store, MODEL, ids)
    assert np.array_equal(X_lab, store.vectors_for(MODEL, ids))
    assert exclude.tolist() == [3, 10]
    assert np.array_equal(np.asarray(X_pool), np.asarray(train.vectors))


def test_zero_shot_unit_split_matches_formula(store, tmp_path):
    from agile_pipeline.lib.evalset import zero_shot_calibration, zero_shot_to_unit

    train, test = (scale.split_cache(store, MODEL, s) for s in ("train", "test"))
    text = np.eye(DIM, dtype=np.float32)[0]
    got = scale.zero_shot_unit_split(tmp_path, text, train, test)
    tr = np.asarray(store.matrix(MODEL, "train").vectors, np.float32) @ text
    te = np.asarray(store.matrix(MODEL, "test").vectors, np.float32) @ text
    center, temp = zero_shot_calibration(tr)
    assert np.allclose(got, zero_shot_to_unit(te, center=center, temperature=temp), atol=1e-5)
    assert np.array_equal(scale.zero_shot_unit_split(tmp_path, text, train, test), got)  # cached


def test_nearest_in_split_agrees_with_lancedb_search(store):
    rng = np.random.default_rng(5)
    queries = rng.standard_normal((4, DIM)).astype(np.float32)
    queries[0] = np.eye(DIM, dtype=np.float32)[0]  # the planted direction
    cache = scale.split_cache(store, MODEL, "train")
    got = scale.nearest_in_split(cache, queries, 100, chunk=1000)  # several chunks
    for q, hits in zip(queries, got, strict=True):
        ref = store.search(MODEL, q, 100, split="train")
        assert [s for _i, s in hits] == sorted((s for _i, s in hits), reverse=True)
        # float16 rows: the same neighbours up to near-ties at the boundary
        assert len({i for i, _s in hits} & {i for i, _sp, _s in ref}) >= 97
        assert abs(hits[0][1] - ref[0][2]) < 2e-3
    assert scale.nearest_in_split(cache, queries[:1], 0) == [[]]
