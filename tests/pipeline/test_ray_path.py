"""The Ray path (AGILE_RAY_ADDRESS) gives the local path's results, on a local Ray instance."""

import json
import secrets

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from agile_pipeline.lib import distributed  # noqa: E402
from agile_pipeline.lib.scan import score_approx  # noqa: E402
from agile_pipeline.lib.selection import select_for_round  # noqa: E402
from agile_pipeline.lib.split_cache import clear_split_caches, split_cache  # noqa: E402
from agile_pipeline.lib.training import train_classifier  # noqa: E402
from agile_pipeline.lib.vectors import VectorStore  # noqa: E402

MODEL = "unit-32"


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.fixture
def ray_on(local_ray, monkeypatch):
    monkeypatch.setenv(distributed.ENV_ADDRESS, "local")
    monkeypatch.setenv(distributed.ENV_SHARDS, "3")


def _store(tmp_path):
    vs = VectorStore(tmp_path / "lancedb", cache_dir=tmp_path / "cache")
    rng = np.random.default_rng(0)
    n = 5000
    X = rng.standard_normal((n, 32)).astype(np.float32)
    X[: n // 40] += 3 * np.eye(32, dtype=np.float32)[0]
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    vs.add(MODEL, [secrets.token_hex(16) for _ in range(n)],
           ["train" if i % 3 else "test" for i in range(n)], X)
    return vs


def test_scoring_fans_out_and_selects_the_same(tmp_path, monkeypatch, local_ray):
    clear_split_caches()
    vs = _store(tmp_path)
    train = vs.matrix(MODEL, "train")
    lab = np.arange(0, 300, 3)
    Xl = np.asarray(train.vectors[lab], np.float32)
    y = (Xl[:, 0] > 0.3).astype(int)
    y[:2] = 1
    model = train_classifier(Xl, y, train.vectors, round_index=1, exclude_from_pool=lab)
    labeled = {str(train.ids[i]) for i in lab}
    cache = split_cache(vs, MODEL, "train")
    local_scores = score_approx(model, cache)
    local = {s: select_for_round(vs, MODEL, model, labeled, 50, s)
             for s in ("margin", "margin-positive")}
    monkeypatch.setenv(distributed.ENV_ADDRESS, "local")
    monkeypatch.setenv(distributed.ENV_SHARDS, "3")
    ray_scores = score_approx(model, cache)
    assert ray_scores.shape == local_scores.shape
    assert np.abs(ray_scores - local_scores).max() < 1e-2
    for s, want in local.items():
        got = select_for_round(vs, MODEL, model, labeled, 50, s)
        assert got.ids == want.ids and got.scores == want.scores


def test_embedding_shards_append_to_one_table(tmp_path, ray_on):
    from agile_pipeline.lib.encoders import load_encoder
    from agile_pipeline.lib.images import load_rgb
    from tests.hostile_images import write_real_like_images

    paths = write_real_like_images(tmp_path / "imgs", 30, seed=5)
    items = [(f"img{i:03d}", str(p)) for i, p in enumerate(paths)]
    split_of = {i: ("train" if k % 2 else "test") for k, (i, _) in enumerate(items)}
    enc = load_encoder("random:32")
    n_ok, failed = distributed.embed_to_table_ray(
        items, split_of, encoder_spec="random:32", lancedb_uri=tmp_path / "lancedb",
        model_id=enc.model_id, dim=enc.dim, shards=3, batch_size=4)
    assert (n_ok, failed) == (30, [])
    vs = VectorStore(tmp_path / "lancedb")
    assert vs.count(enc.model_id) == 30
    got = vs.vectors_for(enc.model_id, [i for i, _ in items])
    local = VectorStore(tmp_path / "local-lancedb")  # the in-process path, same storage dtype
    local.add(enc.model_id, [i for i, _ in items], [split_of[i] for i, _ in items],
              enc.embed_images([load_rgb(p) for _, p in items]))
    assert np.array_equal(got, local.vectors_for(enc.model_id, [i for i, _ in items]))
    t = vs.table(enc.model_id).to_lance().to_table(columns=["id", "split"])
    assert dict(zip(t.column("id").to_pylist(), t.column("split").to_pylist(), strict=True)) == split_of


def test_a_round_through_dagster_gives_the_same_candidates_and_metrics(agile_home, tmp_path, monkeypatch, local_ray):
    from agile_pipeline.defs.concepts import loop_env
    from agile_pipeline.defs.resources import AgileResources
    from agile_pipeline.lib.loop import pending_items
    from agile_pipeline.lib.state import LabelEvent
    from agile_pipeline.runner import run_concept_round, run_concept_start, run_corpus
    from tests.hostile_images import write_real_like_images

    clear_split_caches()
    write_real_like_images(tmp_path / "corpus", 600, seed=3)
    run_corpus([str(tmp_path / "corpus")])
    res = AgileResources()
    env = loop_env(res.state, res.vectors, res.encoder)
    env.store.create_concept("rc", ["x"])
    run_concept_start("rc")

    def rate(items, purpose="train"):
        env.store.add_labels([LabelEvent("rc", it["image_id"], "positive" if int(it["image_id"][:2], 16) % 3 == 0
                                         else "negative", "owner", purpose=purpose) for it in items])

    rate(pending_items(env, "rc"))
    run_concept_round("rc")
    rate(pending_items(env, "rc", purpose="eval"), purpose="eval")
    rate(pending_items(env, "rc"))
    run_concept_round("rc")  # round 1, local
    local_batch = [(it["image_id"], it["score"]) for it in pending_items(env, "rc")]
    local_metrics = json.loads((env.concept_dir("rc") / "metrics.json").read_text())
    local_eval = json.loads((env.concept_dir("rc") / "eval_set.json").read_text())
    monkeypatch.setenv(distributed.ENV_ADDRESS, "local")
    monkeypatch.setenv(distributed.ENV_SHARDS, "2")
    for p in env.concept_dir("rc").glob("round-*/scores-*.npz"):
        p.unlink()  # make the Ray path score the test split too
    run_concept_round("rc", training={"force": True})  # same labels and seed: same model
    ray_batch = [(it["image_id"], it["score"]) for it in pending_items(env, "rc")]
    assert [i for i, _ in ray_batch] == [i for i, _ in local_batch]
    assert np.allclose([s for _, s in ray_batch], [s for _, s in local_batch], atol=1e-6)
    assert json.loads((env.concept_dir("rc") / "eval_set.json").read_text())["keys"] == local_eval["keys"]
    ray_metrics = json.loads((env.concept_dir("rc") / "metrics.json").read_text())
    for a, b in zip(ray_metrics["models"], local_metrics["models"], strict=True):
        assert a["model"] == b["model"]
        for k in ("auc_pr", "auc_roc", "f1", "accuracy"):
            assert a[k] == pytest.approx(b[k], abs=1e-6, nan_ok=True)


def test_corpus_refresh_embeds_through_ray_like_the_local_path(tmp_path, monkeypatch, local_ray):
    """The image_embeddings asset, through Dagster, with the Ray switch on and off."""
    from agile_pipeline.defs.resources import AgileResources
    from agile_pipeline.runner import run_corpus
    from tests.hostile_images import write_real_like_images

    monkeypatch.setenv("AGILE_ENCODER", "random:32")
    write_real_like_images(tmp_path / "corpus", 40, seed=9)
    local, remote = AgileResources(home=str(tmp_path / "local")), AgileResources(home=str(tmp_path / "ray"))
    assert run_corpus([str(tmp_path / "corpus")], agile=local).success
    monkeypatch.setenv(distributed.ENV_ADDRESS, "local")
    monkeypatch.setenv(distributed.ENV_SHARDS, "2")
    result = run_corpus([str(tmp_path / "corpus")], agile=remote)
    assert result.success
    model_id = local.encoder.model_id()
    a, b = local.vectors.vectors(), remote.vectors.vectors()
    ids = sorted(a.ids(model_id))
    assert len(ids) == 40 and sorted(b.ids(model_id)) == ids
    va, vb = a.vectors_for(model_id, ids), b.vectors_for(model_id, ids)
    # equal up to one float16 step (shards batch images differently than the local loop)
    assert np.abs(va - vb).max() <= 1e-4, np.abs(va - vb).max()
    md = result.asset_materializations_for_node("image_embeddings")[0].metadata
    assert md["embedded_now"].value == 40 and md["failed_now"].value == 0


def test_index_build_and_pool_queries_through_ray_match_the_local_path(tmp_path, monkeypatch, local_ray):
    """Issue 15: the embedding index is built (and calibrated) by a Ray task, and a pool's
    neighbour queries fan out over Ray tasks, with the answers of the local path."""
    from agile_pipeline.lib import ann_index

    clear_split_caches()
    vs = _store(tmp_path)
    twin = VectorStore(tmp_path / "lancedb", cache_dir=tmp_path / "cache-local")  # same table
    local = ann_index.ensure_index(twin, MODEL, min_rows=1000)
    local_cal = ann_index.calibrate(twin, MODEL)
    monkeypatch.setenv(distributed.ENV_ADDRESS, "local")
    monkeypatch.setenv(distributed.ENV_SHARDS, "3")
    built = ann_index.build_index_ray(vs, MODEL, min_rows=1000, rebuild=True)
    assert built["status"] == "rebuilt" and built["indexed_rows"] == local.indexed_rows == 5000
    assert built["calibration"]["recall"] >= ann_index.RECALL_TARGET
    assert ann_index.search_settings(vs, MODEL)["nprobes"] == built["calibration"]["nprobes"]
    # the same queries against the same index (the Ray task's build): the same neighbours
    q = vs.vectors_for(MODEL, sorted(vs.ids(MODEL))[:40])
    ray_hits = ann_index.search_ray(vs, MODEL, q, 25, split="train")
    assert ray_hits == ann_index.search(vs, MODEL, q, 25, split="train")
    assert len(ray_hits) == 40 and all(len(h) == 25 for h in ray_hits)
    # and the Ray build is as good as the local one
    recall = ann_index.recall_at_k(vs, MODEL, k=100)["recall"]  # as calibrated
    assert recall >= ann_index.RECALL_TARGET and local_cal["recall"] >= ann_index.RECALL_TARGET
