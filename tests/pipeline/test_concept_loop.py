"""The concept loop through Dagster's real `materialize`, MLflow's sqlite store and LanceDB.

Uses the plumbing (random) encoder: these tests check the machinery, not semantics.
"""

import json
from pathlib import Path

import mlflow
import pytest

from agile_pipeline.defs.concepts import (
    al_candidates,
    classifier,
    eval_set,
    expansion_candidates,
    model_metrics,
    registered_model,
)
from agile_pipeline.lib.loop import pending_items
from agile_pipeline.lib.state import LabelEvent
from agile_pipeline.lib.tracking import model_versions
from agile_pipeline.runner import (
    RunFailed,
    metadata_of,
    run_concept_eval,
    run_concept_round,
    run_concept_start,
    run_corpus,
)
from tests.hostile_images import write_real_like_images


def _env(agile):
    from agile_pipeline.defs.concepts import loop_env

    return loop_env(agile.state, agile.vectors, agile.encoder)


def _rate(env, concept, items, truth, rater="owner", purpose="train"):
    env.store.add_labels([
        LabelEvent(concept, it["image_id"], "positive" if truth(it["image_id"]) else "negative",
                   rater, purpose=purpose, source=it["source"], detail=it.get("detail"))
        for it in items
    ])


def test_rounds_register_versions_and_select_uncertain_unlabeled(corpus):
    env = _env(corpus)
    env.store.create_concept("blobs", ["red blob"], ["blue square"])
    r = run_concept_start("blobs")
    m = metadata_of(r, expansion_candidates)
    assert m["candidates"] == 100, m
    first = pending_items(env, "blobs")
    assert len(first) == 100
    train_ids = {i for i, s in env.store.all_image_splits().items() if s == "train"}
    assert {it["image_id"] for it in first} <= train_ids
    # a deterministic "truth": a quarter of the images are positive
    truth = lambda i: int(i[:2], 16) % 4 == 0  # noqa: E731
    _rate(env, "blobs", first, truth)

    for expected_round in (0, 1):
        res = run_concept_round("blobs")
        c = metadata_of(res, classifier)
        a = metadata_of(res, al_candidates)
        assert c["round"] == expected_round
        assert a["candidates"] == 100
        batch = pending_items(env, "blobs")
        labeled = env.store.labeled_image_ids("blobs")
        assert all(it["image_id"] not in labeled for it in batch)
        assert all(it["image_id"] in train_ids for it in batch)
        # the selected images are the least certain: scores closest to 0.5 among the eligible
        scores = [it["score"] for it in batch]
        assert max(abs(s - 0.5) for s in scores) <= 0.5
        # Dagster ran the round's data-quality checks on the concept assets, and they passed
        evals = {e.check_name: e for e in res.get_asset_check_evaluations()}
        assert set(evals) == {"weights_finite", "batch_of_unlabeled_train_images", "strata_filled",
                              "beats_zero_shot"}
        assert all(e.passed for e in evals.values()), {k: e.metadata for k, e in evals.items()}
        assert evals["batch_of_unlabeled_train_images"].metadata["images"].value == 100
        assert res.dagster_run.job_name == "concept_round_job"  # a named job, not an ephemeral one
        mv = metadata_of(res, registered_model)
        assert mv["model_version"] == str(expected_round + 1)
        assert mv["mlflow_run"] == f"http://127.0.0.1:5000/#/experiments/{mv['mlflow_run'].split('/')[5]}/runs/{mv['mlflow_run_id']}"
        assert mv["mlflow_model_version"].endswith(f"/#/models/blobs-classifier/versions/{expected_round + 1}")
        _rate(env, "blobs", batch, truth)

    versions = model_versions(env.paths.mlflow_uri(), "blobs")
    assert [v["tags"]["agile/round"] for v in versions] == ["0", "1"]
    assert all(v["tags"]["agile/embedding_model"] == env.model_id for v in versions)
    metas = [json.loads((env.concept_dir("blobs") / f"round-{i:03d}" / "meta.json").read_text())
             for i in (0, 1)]
    # the family each round chose (by default: the kernel machine or the MLP, by the near-duplicate
    # agreement of the ratings), recorded in the model, MLflow and the store
    families = [m["config"]["family"] for m in metas]
    recipe = [[16], [128, 128, 128]]  # the paper's first and later MLPs
    # kernel: a unit per label and per graph positive
    shapes = {"mlp": lambda h, n: h, "kernel": lambda h, n: [n + 2]}
    assert [m["hidden"] for m in metas] == [
        shapes[f](h, m["n_pos"] + m["n_neg"] + m["config"].get("graph_positives", 0))
        for f, h, m in zip(families, recipe, metas, strict=True)]
    assert [v["tags"]["agile/model_family"] for v in versions] == families
    assert [r["info"]["family"] for r in env.store.rounds("blobs")] == families
    for m, v in zip(metas, versions, strict=True):
        mc = m["config"]["model_choice"]
        assert mc["cv_auc_pr"] == {} and mc["folds"] == 0  # no cross-validation by default
        agreement = mc["agreement"]
        assert m["config"]["family"] == ("kernel" if agreement is None or agreement >= 0.75 else "mlp")
        if agreement is not None:
            run = mlflow.MlflowClient(env.paths.mlflow_uri()).get_run(v["run_id"])
            assert run.data.metrics["near_duplicate_agreement"] == pytest.approx(agreement)
    assert "near-duplicate" in mc["reason"]


def test_a_kernel_round_trains_on_graph_positives_and_records_them(corpus, monkeypatch):
    """A kernel round refits with the unrated train images that label propagation over the corpus
    graph makes confident (here any propagated score counts, so all 50 places fill): they are
    unrated train images, listed beside the round's labels, counted in Dagster, the store and
    MLflow, and a hidden unit each; AGILE_PROPAGATION=off trains on the ratings alone."""
    from agile_pipeline.lib import propagation

    monkeypatch.setenv("AGILE_MODEL_FAMILY", "kernel")
    monkeypatch.setattr(propagation, "PSEUDO_THRESHOLD", 0.0)
    env = _env(corpus)
    env.store.create_concept("gp", ["red blob"], ["blue square"])
    run_concept_start("gp")
    _rate(env, "gp", pending_items(env, "gp"), lambda i: int(i[:2], 16) % 4 == 0)
    res = run_concept_round("gp")
    assert metadata_of(res, classifier)["graph_positives"] == propagation.PSEUDO_LIMIT == 50
    saved = json.loads((env.concept_dir("gp") / "round-000" / "training_labels.json").read_text())
    extra = saved["graph_positives"]
    splits = env.store.all_image_splits()
    assert len(set(extra)) == 50 and not set(extra) & set(saved["labels"])
    assert all(splits[i] == "train" for i in extra)
    meta = json.loads((env.concept_dir("gp") / "round-000" / "meta.json").read_text())
    assert meta["config"]["graph_positives"] == 50 and meta["hidden"] == [len(saved["labels"]) + 50 + 2]
    assert meta["n_pos"] + meta["n_neg"] == len(saved["labels"])  # the model file counts ratings
    assert env.store.rounds("gp")[0]["info"]["graph_positives"] == 50
    run = mlflow.MlflowClient(env.paths.mlflow_uri()).get_run(model_versions(env.paths.mlflow_uri(), "gp")[0]["run_id"])
    assert run.data.params["graph_positives"] == "50"
    monkeypatch.setenv("AGILE_PROPAGATION", "off")
    again = run_concept_round("gp", training={"force": True})
    assert metadata_of(again, classifier)["graph_positives"] == 0
    assert json.loads((env.concept_dir("gp") / "round-000" / "training_labels.json").read_text())[
        "graph_positives"] == []


def test_cv_chooses_by_cross_validation_and_logs_the_scores(corpus, monkeypatch):
    """AGILE_MODEL_FAMILY=cv: the MLP, the ridge logistic regression or their ensemble, whichever
    scores best in cross-validation on the ratings, with every score in MLflow and Dagster."""
    monkeypatch.setenv("AGILE_MODEL_FAMILY", "cv")
    env = _env(corpus)
    env.store.create_concept("cvd", ["x"])
    run_concept_start("cvd")
    _rate(env, "cvd", pending_items(env, "cvd"), lambda i: int(i[-1], 16) < 8)
    res = run_concept_round("cvd")
    md = metadata_of(res, classifier)
    meta = json.loads((env.concept_dir("cvd") / "round-000" / "meta.json").read_text())
    scores = meta["config"]["model_choice"]["cv_auc_pr"]
    assert set(scores) == {"mlp", "linear", "ensemble"}
    assert md["family"] == meta["config"]["family"] == max(scores, key=scores.get)
    assert meta["hidden"] == {"mlp": [16], "linear": [], "ensemble": [18]}[md["family"]]
    run = mlflow.MlflowClient(env.paths.mlflow_uri()).get_run(model_versions(env.paths.mlflow_uri(), "cvd")[0]["run_id"])
    for k, x in scores.items():
        assert run.data.metrics[f"cv_auc_pr_{k}"] == pytest.approx(x) == pytest.approx(md[f"cv_auc_pr_{k}"])


@pytest.mark.parametrize("family", ["kernel", "mlp+kernel"])
def test_the_kernel_families_run_a_whole_round_as_an_ordinary_model_file(corpus, monkeypatch, family):
    """AGILE_MODEL_FAMILY=kernel / mlp+kernel: the round trains the kernel machine (alone, or
    averaged with the MLP), saved as an MLP with one hidden unit per label (plus two, plus the
    MLP's own), and everything after it (int8/bf16 scans, the checks, MLflow) reads it like any
    other model."""
    monkeypatch.setenv("AGILE_MODEL_FAMILY", family)
    env = _env(corpus)
    env.store.create_concept("kern", ["red blob"], ["blue square"])
    run_concept_start("kern")
    truth = lambda i: int(i[:2], 16) % 4 == 0  # noqa: E731
    _rate(env, "kern", pending_items(env, "kern"), truth)
    res = run_concept_round("kern")
    assert metadata_of(res, classifier)["family"] == family
    assert metadata_of(res, al_candidates)["candidates"] == 100
    assert all(e.passed for e in res.get_asset_check_evaluations()
               if e.check_name in ("weights_finite", "batch_of_unlabeled_train_images"))
    meta = json.loads((env.concept_dir("kern") / "round-000" / "meta.json").read_text())
    n_labels = len(env.store.labeled_image_ids("kern"))
    mlp_units = 16 if family == "mlp+kernel" else 0  # the recipe's first MLP: one layer of 16
    # a kernel round may also train on graph positives (a hidden unit each); mlp+kernel does not
    extra = int(meta["config"].get("graph_positives", 0))
    assert extra == metadata_of(res, classifier)["graph_positives"] and (family == "kernel" or extra == 0)
    assert meta["config"]["family"] == family and meta["hidden"] == [mlp_units + n_labels + extra + 2]
    assert model_versions(env.paths.mlflow_uri(), "kern")[0]["tags"]["agile/model_family"] == family


def test_same_labels_and_seed_give_the_same_model(corpus):
    env = _env(corpus)
    env.store.create_concept("same", ["x"])
    run_concept_start("same")
    _rate(env, "same", pending_items(env, "same"), lambda i: int(i[-1], 16) < 5)
    run_concept_round("same")
    first = (env.concept_dir("same") / "round-000" / "model.pt").read_bytes()
    cand1 = [it["image_id"] for it in pending_items(env, "same")]
    res = run_concept_round("same", training={"force": True})
    assert metadata_of(res, classifier)["round"] == 0
    assert (env.concept_dir("same") / "round-000" / "model.pt").read_bytes() == first
    assert [it["image_id"] for it in pending_items(env, "same")] == cand1
    # without force and without new labels, the round is not retrained
    res = run_concept_round("same")
    assert metadata_of(res, classifier)["reused_previous_round"] is True


def test_a_lookahead_round_trains_the_last_cross_validated_family(corpus, monkeypatch):
    """With AGILE_MODEL_FAMILY=cv, the app's lookahead round (the rater may be waiting) skips the
    cross-validation: it trains the family the last cross-validated round chose; the follow-up
    cross-validates."""
    monkeypatch.setenv("AGILE_MODEL_FAMILY", "cv")
    env = _env(corpus)
    env.store.create_concept("ahead", ["x"])
    run_concept_start("ahead")
    half = lambda i: int(i[-1], 16) < 8  # noqa: E731 - about half positive: enough to cross-validate
    _rate(env, "ahead", pending_items(env, "ahead"), half)
    first = metadata_of(run_concept_round("ahead"), classifier)
    assert first["cv_auc_pr_mlp"] >= 0  # round 0 cross-validated
    _rate(env, "ahead", pending_items(env, "ahead"), half)
    res = run_concept_round("ahead", training={"lookahead": True}, sampling={"exclude_pending": True})
    md = metadata_of(res, classifier)
    assert md["round"] == 1 and md["family"] == first["family"]
    assert "last cross-validated" in md["family_reason"]
    assert not any(k.startswith("cv_auc_pr_") for k in md)
    info = env.store.rounds("ahead")[-1]["info"]
    assert info["lookahead"] is True and info["model_choice"]["folds"] == 0


def test_eval_set_is_test_split_and_metrics_are_computed(corpus, monkeypatch, capsys):
    from agile_pipeline.lib import propagation

    # the ratings below are random with respect to the vectors; any neighbour agreement counts here
    monkeypatch.setattr(propagation, "MIN_AGREEMENT", 0.0)
    env = _env(corpus)
    env.store.create_concept("ev", ["x"])
    run_concept_start("ev")
    truth = lambda i: int(i[:2], 16) % 3 == 0  # noqa: E731
    _rate(env, "ev", pending_items(env, "ev"), truth)
    res = run_concept_round("ev")
    ev = metadata_of(res, eval_set)
    items = pending_items(env, "ev", purpose="eval")
    assert ev["eval_images"] == len(items) > 0
    splits = env.store.all_image_splits()
    assert all(splits[it["image_id"]] == "test" for it in items)
    _rate(env, "ev", items, truth, purpose="eval")
    md = metadata_of(run_concept_eval("ev"), model_metrics)
    report = json.loads((env.concept_dir("ev") / "metrics.json").read_text())
    assert report["n_eval_labels"] == len(items)
    assert {r["model"] for r in report["models"]} == {"zero-shot", "round-0"}
    assert all(0 <= r["auc_pr"] <= 1 for r in report["models"])
    # a small corpus: the round's corpus scores (label propagation) are measured on the same ratings
    from agile_pipeline.lib.corpus_scores import corpus_graph, round_corpus_scores
    from agile_pipeline.lib.metrics import compute_metrics
    from agile_pipeline.lib.training import TrainedClassifier

    g = corpus_graph(env.vectors, env.model_id)
    r0 = env.store.rounds("ev")[0]
    got = round_corpus_scores(env, "ev", TrainedClassifier.load(Path(r0["model_uri"])), int(r0["label_cutoff"]), g)
    assert got.propagated
    f = got.corpus
    ids = [it["image_id"] for it in items]
    want = compute_metrics([int(truth(i)) for i in ids], f[g.n_train + g.test.positions(ids)]).auc_pr
    row = next(r for r in report["models"] if r["model"] == "round-0")
    assert row["auc_pr_corpus"] == pytest.approx(want) and md["auc_pr_corpus"] == pytest.approx(want)
    assert "zero_shot_auc_pr_corpus" not in md and "auc_pr_corpus" not in report["models"][0]
    from agile_pipeline.cli import _print_metrics

    _print_metrics("ev")  # what `agile evaluate` prints: the corpus figure beside the model file's
    out = capsys.readouterr().out
    assert "AUC-PR (corpus scores)" in out and f"{want:.3f}" in out.split("round-0")[1].splitlines()[0]
    assert (env.concept_dir("ev") / "metrics.png").stat().st_size > 1000
    # eval labels never train: the training label count is unchanged
    assert len(env.store.effective_labels("ev", purpose="train")) == 100


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("unknown", "unknown concept"),
    ],
)
def test_round_errors_say_what_to_do(corpus, setup, message):
    with pytest.raises(RunFailed, match=message):
        run_concept_round("nope")


def test_no_positive_yet_queues_a_recovery_batch_then_an_exemplar_trains(corpus):
    env = _env(corpus)
    env.store.create_concept("rare", ["x", "y"], ["z"])
    run_concept_start("rare")
    first = pending_items(env, "rare")
    _rate(env, "rare", first, lambda i: False)
    res = run_concept_round("rare")
    assert metadata_of(res, classifier)["trained"] is False
    rec = pending_items(env, "rare")
    assert len(rec) == 100
    assert {it["source"] for it in rec} == {"recovery"}
    assert not {it["image_id"] for it in rec} & {it["image_id"] for it in first}
    # half at random from the unlabeled train images, half round-robin over every query: the
    # name, two phrases and the negative phrase
    rand = [it for it in rec if it["detail"] == "random unlabeled image"]
    assert len(rand) == 50
    assert len({it["detail"] for it in rec} - {"random unlabeled image"}) == 4
    splits = env.store.all_image_splits()
    labeled_before = {it["image_id"] for it in first}
    assert all(splits[it["image_id"]] == "train" and it["image_id"] not in labeled_before for it in rand)
    assert len({it["image_id"] for it in rec}) == 100
    # an exemplar is a positive label and a new query
    ex = rec[0]["image_id"]
    env.store.add_exemplar("rare", ex, "positive", "owner")
    res = run_concept_round("rare")
    assert metadata_of(res, classifier)["trained"] is True
    assert metadata_of(res, classifier)["n_pos"] == 1


def test_uploaded_exemplar_drives_expansion_trains_and_never_joins_a_split(corpus, tmp_path):
    """An uploaded file (not in the corpus) is embedded on the fly: its nearest train images
    become expansion candidates, it trains the model as a labelled example, and neither the
    AL batch, the eval set nor a corpus refresh ever takes it into train or test."""
    from agile_pipeline.lib.loop import build_expansion
    from agile_pipeline.lib.state import UPLOAD_SPLIT
    from agile_pipeline.lib.uploads import add_uploaded_exemplar

    env = _env(corpus)
    encoder = corpus.encoder.load()
    env.store.create_concept("uploaded", ["x"])
    run_concept_start("uploaded")
    first = pending_items(env, "uploaded")
    _rate(env, "uploaded", first, lambda i: False)  # no positive in the first batch
    data = write_real_like_images(tmp_path / "mine", 1, seed=4242)[0].read_bytes()
    corpus_version = env.vectors.version(env.model_id)
    res = add_uploaded_exemplar(env.store, env.vectors, encoder, env.paths.blobs, "uploaded", data,
                                added_by="owner", filename="mine.png")
    up = res.image_id
    assert not res.in_corpus and res.stored
    assert env.vectors.version(env.model_id) == corpus_version  # split caches stay valid
    splits = env.store.all_image_splits()
    assert up not in splits and env.store.image_rows([up])[0]["split"] == UPLOAD_SPLIT

    # expansion: the upload is a query; its nearest unlabelled train images are candidates
    labeled = env.store.labeled_image_ids("uploaded")
    vec = env.vectors.vectors_for(env.model_id, [up])[0]
    near = [i for i, _s, _d in env.vectors.search(env.model_id, vec, 5 + len(labeled), split="train")
            if i not in labeled][:5]
    batch = build_expansion(env, "uploaded", encoder, per_phrase=5, sample=100)
    key = f"positive:exemplar {up[:8]}"
    assert batch.info["found_per_phrase"][key] == 5
    ids = {it["image_id"] for it in batch.items}
    assert set(near) <= ids and up not in ids
    assert all(splits[i] == "train" for i in ids)
    # the concept's own start job (Dagster) runs with the uploaded exemplar too
    r = run_concept_start("uploaded", seed=1)
    assert metadata_of(r, expansion_candidates)["candidates"] == 100
    assert up not in {it["image_id"] for it in pending_items(env, "uploaded")}

    # training: the upload is the one positive; a model is trained on it
    res_round = run_concept_round("uploaded")
    c = metadata_of(res_round, classifier)
    assert c["trained"] is True and c["n_pos"] == 1
    labels = json.loads((env.concept_dir("uploaded") / "round-000" / "training_labels.json").read_text())
    assert labels["labels"][up] == 1
    al = env.store.latest_batch("uploaded", ("al",))
    assert al is not None and up not in {it["image_id"] for it in al["items"]}
    ev = env.store.latest_batch("uploaded", ("eval",))
    assert ev is not None and ev["items"]
    assert up not in {it["image_id"] for it in ev["items"]}
    assert all(splits[it["image_id"]] == "test" for it in ev["items"])

    # a corpus refresh leaves it where it is, and the embedding check still passes
    src = tmp_path / "corpus"
    r = run_corpus([str(src)])
    checks = [e for e in r.get_asset_check_evaluations() if e.check_name == "image_embeddings_complete"]
    assert checks and all(e.passed for e in checks)
    assert env.store.image_rows([up])[0]["split"] == UPLOAD_SPLIT
    # its vector lives outside the corpus table (whose version keys the split caches)
    t = env.vectors.table(env.model_id).to_lance().to_table(columns=["id"], filter=f"id = '{up}'")
    assert t.num_rows == 0 and env.vectors.upload_ids(env.model_id, [up]) == {up}
    assert env.vectors.vectors_for(env.model_id, [up]).shape == (1, 32)
