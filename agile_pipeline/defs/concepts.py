"""Concept assets, one dynamic partition per concept.

``expansion_candidates`` -> (rater labels, written by the app/CLI) -> ``classifier`` ->
``al_candidates``; ``zero_shot_scores`` is the baseline every model is compared with.
"""

import time
from typing import Literal

import dagster as dg

from agile_pipeline import settings
from agile_pipeline.defs import selections
from agile_pipeline.defs.corpus import corpus_refresh_job
from agile_pipeline.defs.resources import (
    EncoderResource,
    StateResource,
    VectorsResource,
    quiet_third_party_logs,
)
from agile_pipeline.lib import checks
from agile_pipeline.lib.loop import LoopEnv, LoopError

concept_partitions = dg.DynamicPartitionsDefinition(name=selections.CONCEPT_PARTITIONS)


def loop_env(state: StateResource, vectors: VectorsResource, encoder: EncoderResource) -> LoopEnv:
    """What the loop functions work on: the state store, the vector store, the model id and
    the data directory's layout."""
    return LoopEnv(state.store(), vectors.vectors(), encoder.model_id(), state.paths, encoder.spec)


class ExpansionConfig(dg.Config):
    per_phrase: int = settings.EXPANSION_PER_PHRASE
    sample: int = settings.EXPANSION_SAMPLE
    seed: int = 0


class TrainingConfig(dg.Config):
    seed: int = 0
    epochs: int = 10
    random_negatives: int = settings.RANDOM_NEGATIVES
    force: bool = False
    owner_wins: bool = True
    tie: Literal["drop", "positive", "negative"] = "drop"
    # started while the rater still had a few images of the batch left (see the app's
    # lookahead setting); it trains the family of the last cross-validated round without
    # cross-validating again (the follow-up on the batch's full labels does)
    lookahead: bool = False
    # auto: the kernel machine on the rated images or the MLP, by the near-duplicate agreement of
    # the ratings; cv: the MLP, ridge logistic regression or their ensemble, chosen per round by
    # cross-validation on the labels; paper: the paper's recipe exactly; mlp / linear / ensemble /
    # kernel / mlp+kernel: that family every round; empty: the AGILE_MODEL_FAMILY setting (default auto)
    model_family: Literal["", "auto", "cv", "paper", "mlp", "linear", "ensemble", "kernel", "mlp+kernel"] = ""


class MarginSamplingConfig(dg.Config):
    batch_size: int = settings.AL_BATCH
    strategy: Literal["margin", "margin-positive", "cluster-margin"] = "margin"
    # leave out the current batch's images nobody has rated yet (a lookahead round)
    exclude_pending: bool = False


concept_labels = dg.AssetSpec(
    "concept_labels",
    group_name="concept",
    partitions_def=concept_partitions,
    kinds={"sqlite"},
    description=(
        "Rating events written by the labeling app and `agile label` (append-only, one row per "
        "rating, with rater, time, purpose and provenance). Not materialized by Dagster."
    ),
)


@dg.asset(
    group_name="concept",
    partitions_def=concept_partitions,
    deps=["image_embeddings"],
    kinds={"lancedb"},
    description=(
        "Text-to-image expansion: the nearest unlabeled train images of every positive and "
        "negative phrase, 100 sampled (seeded) from their union for the first rating batch."
    ),
)
def expansion_candidates(
    context: dg.AssetExecutionContext, config: ExpansionConfig,
    state: StateResource, vectors: VectorsResource, encoder: EncoderResource,
) -> dg.MaterializeResult:
    from agile_pipeline.lib.loop import build_expansion

    quiet_third_party_logs()
    env = loop_env(state, vectors, encoder)
    batch = _user_errors(lambda: build_expansion(
        env, context.partition_key, encoder.load(), per_phrase=config.per_phrase,
        sample=config.sample, seed=config.seed, run_id=context.run.run_id,
    ))
    by_phrase: dict[str, int] = {}
    for it in batch.items:
        by_phrase[it["detail"]] = by_phrase.get(it["detail"], 0) + 1
    return dg.MaterializeResult(metadata={
        "batch_id": batch.batch_id, "candidates": len(batch.items),
        "union_of_neighbours": batch.info["union"], "per_phrase": dg.MetadataValue.json(by_phrase),
        "seconds": round(batch.seconds, 2),
    })


@dg.asset(
    group_name="evaluation",
    partitions_def=concept_partitions,
    deps=["image_embeddings"],
    kinds={"numpy"},
    description="Zero-shot baseline: cosine of every image with the concept-name text vector.",
)
def zero_shot_scores(
    context: dg.AssetExecutionContext,
    state: StateResource, vectors: VectorsResource, encoder: EncoderResource,
) -> dg.MaterializeResult:
    from agile_pipeline.lib.loop import zero_shot

    env = loop_env(state, vectors, encoder)
    ids, scores = _user_errors(lambda: zero_shot(env, context.partition_key, encoder.load()))
    top = [str(ids[k]) for k in scores.argsort()[::-1][:5]]
    return dg.MaterializeResult(metadata={
        "images_scored": len(scores), "max_cosine": float(scores.max()) if len(scores) else 0.0,
        "top_images": dg.MetadataValue.json(top),
    })


@dg.asset(
    group_name="concept",
    partitions_def=concept_partitions,
    deps=[concept_labels],
    kinds={"pytorch"},
    code_version="2",  # 2: kernel rounds train on graph positives too
    check_specs=[dg.AssetCheckSpec(
        "weights_finite", asset="classifier", blocking=True,
        description="Every weight of the round's classifier is finite (no NaN/inf); a model "
                    "that fails never selects a batch.")],
    description=(
        "The concept's classifier on frozen embeddings, trained on every train label plus random "
        "negatives (one model per round; its MLflow run and model version are `registered_model`): "
        "by default a kernel machine on the rated images or the paper's MLP (1x16 first, then 3x128), "
        "chosen by the near-duplicate agreement of the ratings (`family`, `family_reason`, "
        "`near_duplicate_agreement`); a kernel round also trains on up to 50 unrated images that "
        "label propagation over the corpus graph makes confidently positive (`graph_positives`); "
        "with `model_family` cv, the MLP, a ridge logistic regression or their ensemble by "
        "cross-validation (`cv_auc_pr_*`)."
    ),
)
def classifier(
    context: dg.AssetExecutionContext, config: TrainingConfig,
    state: StateResource, vectors: VectorsResource, encoder: EncoderResource,
) -> dg.MaterializeResult:
    from agile_pipeline.lib.loop import plan_round, round_facts, train_round
    from agile_pipeline.lib.model_choice import choice_for
    from agile_pipeline.lib.state import LabelRule
    from agile_pipeline.lib.training import TrainConfig

    quiet_third_party_logs()
    env = loop_env(state, vectors, encoder)
    t0 = time.perf_counter()
    rule = LabelRule(owner_wins=config.owner_wins, tie=config.tie)
    facts = _user_errors(lambda: round_facts(env.store, context.partition_key, rule))
    plan = plan_round(facts, force=config.force)
    if plan.action == "recovery":  # nothing to learn from: al_candidates queues a recovery batch
        context.log.warning(plan.reason)
        return dg.MaterializeResult(metadata={
            "trained": False, "n_pos": 0, "n_neg": facts.n_neg,
            "status": "no positive labels yet: recovery batch instead of a model",
        }, check_results=[dg.AssetCheckResult(check_name="weights_finite", passed=True,
                                              metadata={"status": "no model this round"})])
    choice = choice_for(config.model_family or settings.model_family(), seed=config.seed)
    result = _user_errors(lambda: train_round(
        env, context.partition_key,
        config=TrainConfig(seed=config.seed, epochs=config.epochs, random_negatives=config.random_negatives),
        rule=rule, force=config.force, run_id=context.run.run_id, tracking=False,
        lookahead=config.lookahead, choice=choice,
    ))
    if result.reused:
        context.log.info(f"no new labels since round {result.round_index}: kept that model")
    for w in result.warnings:
        context.log.warning(w)
    return dg.MaterializeResult(metadata={
        "trained": True, "model": f"Model {result.round_index + 1}",
        "family": result.family,
        "family_reason": result.model_choice.get("reason", ""),
        **{f"cv_auc_pr_{k}": dg.MetadataValue.float(float(v))
           for k, v in (result.model_choice.get("cv_auc_pr") or {}).items()},
        **({"near_duplicate_agreement": dg.MetadataValue.float(float(result.model_choice["agreement"]))}
           if result.model_choice.get("agreement") is not None else {}),
        "round": result.round_index, "n_pos": result.n_pos, "n_neg": result.n_neg,
        "graph_positives": result.graph_positives,
        "label_cutoff": result.label_cutoff, "reused_previous_round": result.reused,
        "lookahead": config.lookahead,
        "train_seconds": round(result.train_seconds, 3), **result.working_set,
        "seconds_total": round(time.perf_counter() - t0, 3),
        "model_dir": str(result.model_dir),
    }, check_results=[_check("weights_finite", lambda: checks.classifier_weights_finite(result.model_dir))])


@dg.asset(
    group_name="concept",
    partitions_def=concept_partitions,
    deps=[classifier],
    kinds={"numpy"},
    description=(
        "The next batch to rate: unlabeled train images with the smallest margin "
        "|P(pos) - P(neg)| under the latest model (or margin + positive mining)."
    ),
    check_specs=[dg.AssetCheckSpec(
        "batch_of_unlabeled_train_images", asset="al_candidates",
        description="The batch holds the batch size (or every eligible image) of distinct "
                    "train images, none labelled when it was selected.")],
)
def al_candidates(
    context: dg.AssetExecutionContext, config: MarginSamplingConfig,
    state: StateResource, vectors: VectorsResource, encoder: EncoderResource,
) -> dg.MaterializeResult:
    from agile_pipeline.lib.loop import build_expansion, plan_round, round_facts, select_candidates

    env = loop_env(state, vectors, encoder)
    plan = plan_round(_user_errors(lambda: round_facts(env.store, context.partition_key)))
    if plan.action == "recovery":
        rec = _user_errors(lambda: build_expansion(
            env, context.partition_key, encoder.load(), sample=config.batch_size,
            run_id=context.run.run_id, recovery=True,
        ))
        return dg.MaterializeResult(metadata={
            "batch_id": rec.batch_id, "candidates": len(rec.items), "strategy": "recovery",
            "round": rec.round_index, "images_scored": 0, "select_seconds": round(rec.seconds, 3),
            "status": "no positive labels yet: half next-nearest images of every phrase and exemplar, half at random",
        }, check_results=[_check("batch_of_unlabeled_train_images", lambda: checks.batch_of_unlabeled_train_images(
            env.store, context.partition_key, rec.batch_id, batch_size=config.batch_size,
            eligible=len(rec.items)))])
    batch = _user_errors(lambda: select_candidates(
        env, context.partition_key, batch_size=config.batch_size, strategy=config.strategy,
        run_id=context.run.run_id, exclude_pending=config.exclude_pending,
    ))
    scores = [it["score"] for it in batch.items]
    return dg.MaterializeResult(metadata={
        "batch_id": batch.batch_id, "round": batch.round_index, "candidates": len(batch.items),
        "strategy": config.strategy, "images_scored": batch.info["scored"],
        "select_seconds": round(batch.seconds, 3),
        "excluded_pending": batch.info.get("excluded_pending", 0),
        **{k: batch.info[k] for k in ("candidate_pool", "pool_size", "pool_k", "pool_scored", "random_scored",
                                      "sweep_scored", "pool_added", "pool_grow_seconds", "pool_swept",
                                      "pool_sweep_seconds", "working_set_rows", "working_set_misses",
                                      "working_set_written", "working_set_seconds") if k in batch.info},
        "score_min": min(scores) if scores else 0.0, "score_max": max(scores) if scores else 0.0,
    }, check_results=[_check("batch_of_unlabeled_train_images", lambda: checks.batch_of_unlabeled_train_images(
        env.store, context.partition_key, batch.batch_id, batch_size=config.batch_size,
        eligible=int(batch.info["eligible"])))])


@dg.asset(
    group_name="concept",
    partitions_def=concept_partitions,
    deps=[classifier, al_candidates],
    kinds={"mlflow"},
    description=(
        "The round's MLflow run (params, metrics, model files, tags) and a new version of the "
        "registered model `<concept>-classifier`. Runs after the next batch is committed, so "
        "the rater never waits on it."
    ),
)
def registered_model(
    context: dg.AssetExecutionContext,
    state: StateResource, vectors: VectorsResource, encoder: EncoderResource,
) -> dg.MaterializeResult:
    from agile_pipeline.lib.loop import register_round

    quiet_third_party_logs()
    env = loop_env(state, vectors, encoder)
    t0 = time.perf_counter()
    run_id, version, logged = _user_errors(lambda: register_round(
        env, context.partition_key, run_id=context.run.run_id))
    rounds = env.store.rounds(context.partition_key)
    links: dict[str, dg.MetadataValue] = {}
    if run_id:
        from agile_pipeline.lib.tracking import ui_links

        try:
            links = {k: dg.MetadataValue.url(v) for k, v in ui_links(
                env.paths.mlflow_uri(), run_id, context.partition_key, version).items()}
        except Exception as exc:  # a link is a convenience: never fail the round for it
            context.log.warning(f"no MLflow UI links: {exc}")
    return dg.MaterializeResult(metadata={
        "round": int(rounds[-1]["round"]) if rounds else -1,
        "mlflow_run_id": run_id or "", "model_version": version or "",
        **links,
        "logged_now": logged, "mlflow_seconds": round(time.perf_counter() - t0, 3),
    })


class EvalSetConfig(dg.Config):
    per_stratum: int = settings.EVAL_PER_STRATUM
    n_strata: int = settings.EVAL_STRATA


class MetricsConfig(dg.Config):
    zero_shot_threshold: float = 0.5


@dg.asset(
    group_name="evaluation",
    partitions_def=concept_partitions,
    deps=[registered_model, zero_shot_scores],
    kinds={"numpy"},
    description=(
        "The eval set (test split only): for every model and zero-shot, 10 score strata, the "
        "20 images of lowest keyed SipHash-2-4 in each; merged. Queued for eval ratings."
    ),
    check_specs=[dg.AssetCheckSpec(
        "strata_filled", asset="eval_set",
        description="Every model's every score stratum gave its 20 images, or all the test "
                    "images it has (counted in the metadata).")],
)
def eval_set(
    context: dg.AssetExecutionContext, config: EvalSetConfig,
    state: StateResource, vectors: VectorsResource, encoder: EncoderResource,
) -> dg.MaterializeResult:
    from agile_pipeline.lib.evaluation import build_eval_set

    env = loop_env(state, vectors, encoder)
    batch = _user_errors(lambda: build_eval_set(
        env, context.partition_key, per_stratum=config.per_stratum, n_strata=config.n_strata,
        run_id=context.run.run_id,
    ))
    labeled = env.store.effective_labels(context.partition_key, purpose="eval")
    pending = sum(1 for it in batch.items if it["image_id"] not in labeled)
    return dg.MaterializeResult(metadata={
        "eval_images": len(batch.items), "to_rate": pending, "models": len(batch.info["models"]),
        "per_model_per_stratum": dg.MetadataValue.json(batch.info["counts"]),
    }, check_results=[_check("strata_filled", lambda: checks.strata_filled(
        batch.info["counts"], batch.info["stratum_sizes"], config.per_stratum))])


@dg.asset(
    group_name="evaluation",
    partitions_def=concept_partitions,
    deps=[eval_set],
    kinds={"mlflow"},
    description=(
        "AUC-PR (primary), AUC-ROC, F1 and accuracy of every model version and zero-shot on "
        "the rated eval set; logged to each model's MLflow run, with the AUC-PR plot."
    ),
    check_specs=[dg.AssetCheckSpec(
        "beats_zero_shot", asset="model_metrics",
        description="The newest model's AUC-PR on the eval ratings is at least zero-shot's "
                    "(a warning: more ratings usually fix it).")],
)
def model_metrics(
    context: dg.AssetExecutionContext, config: MetricsConfig,
    state: StateResource, vectors: VectorsResource, encoder: EncoderResource,
) -> dg.MaterializeResult:
    from agile_pipeline.lib.evaluation import evaluate

    env = loop_env(state, vectors, encoder)
    report = _user_errors(lambda: evaluate(
        env, context.partition_key, zero_shot_threshold=config.zero_shot_threshold,
    ))
    table = "\n".join(
        ["| model | labels | AUC-PR | AUC-PR (corpus scores) | AUC-ROC | F1 | accuracy |",
         "|---|---|---|---|---|---|---|"]
        + [f"| {r['model']} | {r['n_labels']} | {r['auc_pr']:.3f} | "
           + (f"{r['auc_pr_corpus']:.3f}" if "auc_pr_corpus" in r else "—")  # not propagated
           + f" | {r['auc_roc']:.3f} | {r['f1']:.3f} | {r['accuracy']:.3f} |" for r in report["models"]]
    )
    png = open(report["plot"], "rb").read()
    import base64

    # numbers the Dagster UI charts over materializations (the asset's Plots tab): the newest
    # model and zero-shot on the eval ratings so far
    numbers: dict[str, dg.MetadataValue] = {}
    models = [r for r in report["models"] if r["model"] != "zero-shot"]
    latest = max(models, key=lambda r: r["round"]) if models else None
    zero = next((r for r in report["models"] if r["model"] == "zero-shot"), None)
    for prefix, row, keys in (("", latest, ("auc_pr", "auc_roc", "f1", "accuracy", "auc_pr_corpus")),
                              ("zero_shot_", zero, ("auc_pr", "auc_roc", "f1", "accuracy"))):
        for key in keys:
            value = float("nan") if row is None else float(row.get(key, float("nan")))
            if value == value:  # not NaN: no eval ratings yet, or no corpus scores
                numbers[prefix + key] = dg.MetadataValue.float(value)
    if latest is not None:
        numbers["model_round"] = dg.MetadataValue.int(int(latest["round"]))
        numbers["training_labels"] = dg.MetadataValue.int(int(latest["n_labels"]))
    champion = _move_champion(context, env, report)
    if champion:
        numbers["champion_version"] = dg.MetadataValue.int(int(champion))
    return dg.MaterializeResult(metadata={
        **numbers,
        "eval_labels": report["n_eval_labels"],
        "metrics": dg.MetadataValue.md(table),
        "plot": dg.MetadataValue.md(
            f"![AUC-PR](data:image/png;base64,{base64.b64encode(png).decode()})"
        ),
        "plot_path": dg.MetadataValue.path(report["plot"]),
    }, check_results=[_with_severity(_check("beats_zero_shot", lambda: checks.beats_zero_shot(report)),
                                     dg.AssetCheckSeverity.WARN)])


@dg.asset(
    group_name="concept",
    partitions_def=concept_partitions,
    deps=[model_metrics],
    kinds={"parquet"},
    description=(
        "The champion classifier applied to every embedded image of the corpus: "
        "$AGILE_HOME/predictions/<concept storage key>.parquet (image_id, split, path, probability, "
        "is_concept, model_version, model_probability, propagated), DuckDB-queryable. `probability` "
        "is the corpus score: on corpora up to AGILE_PROPAGATION's size, the champion's scores "
        "propagated over the corpus's kNN graph with its training ratings held, where the graph's "
        "rated neighbours agree on the ratings (`neighbour_agreement`); "
        "`model_probability` is the model file's own answer. Rescored when the champion changes; "
        "after a corpus refresh, extended with the new images (all rescored when propagated)."
    ),
)
def concept_predictions(
    context: dg.AssetExecutionContext,
    state: StateResource, vectors: VectorsResource, encoder: EncoderResource,
) -> dg.MaterializeResult:
    from pathlib import Path

    from agile_pipeline.lib.corpus_scores import (
        RoundCorpusScores,
        corpus_graph,
        round_corpus_scores,
    )
    from agile_pipeline.lib.predictions import predictions_path, score_corpus
    from agile_pipeline.lib.tracking import version_for_alias
    from agile_pipeline.lib.training import TrainedClassifier

    env = loop_env(state, vectors, encoder)
    concept = env.store.get_concept(context.partition_key).name
    t0 = time.perf_counter()
    version = version_for_alias(env.paths.mlflow_uri(), concept, "champion")
    row = next((r for r in env.store.rounds(concept) if version and r["model_version"] == version), None)
    if row is None:
        return dg.MaterializeResult(metadata={"status": "no registered champion yet: nothing scored"})
    model = TrainedClassifier.load(Path(row["model_uri"]))
    graph = corpus_graph(env.vectors, env.model_id)

    def scores() -> RoundCorpusScores:
        assert graph is not None
        return round_corpus_scores(env, concept, model, int(row["label_cutoff"]), graph)

    res = score_corpus(
        store=env.store, vectors=env.vectors, model_id=env.model_id, model=model, model_version=version,
        out=predictions_path(env.paths.home, env.concept_dir(concept).name),
        corpus_scores=None if graph is None else scores)
    top = "\n".join(["| image | P(concept) |", "|---|---|"]
                    + [f"| {name} | {p:.3f} |" for name, p in res.top])
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(res.path)),
        "rows": dg.MetadataValue.int(res.rows),
        "scored_now": dg.MetadataValue.int(res.scored_now),
        "rescored_all": res.rescored_all,
        "propagated": res.propagated,
        **({"neighbour_agreement": dg.MetadataValue.float(float(res.agreement))}
           if res.agreement is not None else {}),
        "champion_version": dg.MetadataValue.int(int(version)),
        "champion_round": dg.MetadataValue.int(int(row["round"])),
        "top_images": dg.MetadataValue.md(top),
        "query": dg.MetadataValue.text(
            f"duckdb -c \"SELECT path, probability FROM '{res.path}' ORDER BY probability DESC LIMIT 20\""),
        "seconds": round(time.perf_counter() - t0, 3),
    })


concept_predictions_job = dg.define_asset_job(
    selections.PREDICTIONS_JOB,
    selection=dg.AssetSelection.assets(concept_predictions),
    executor_def=dg.in_process_executor,
    description="Score the corpus with a concept's champion (after a corpus refresh).",
)


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.SUCCESS,
    monitored_jobs=[corpus_refresh_job],
    request_job=concept_predictions_job,
    description="After a corpus refresh, score the new images with every concept's champion.",
)
def predictions_after_refresh(context: dg.RunStatusSensorContext):  # type: ignore[no-untyped-def]
    for concept in context.instance.get_dynamic_partitions(selections.CONCEPT_PARTITIONS):
        yield dg.RunRequest(run_key=f"{context.dagster_run.run_id}:{concept}", partition_key=concept)


def _move_champion(context: dg.AssetExecutionContext, env: LoopEnv, report: dict) -> str | None:
    """Point the MLflow ``champion`` alias by the rule of :func:`tracking.choose_champion`,
    from every model's AUC-PR on the merged eval set (none before the first eval rating)."""
    from agile_pipeline.lib.tracking import choose_champion

    auc = {str(r["model_version"]): float(r["auc_pr"]) for r in report["models"]
           if r.get("model_version") and report["n_eval_labels"]}
    try:
        return choose_champion(env.paths.mlflow_uri(), context.partition_key, auc)
    except Exception as exc:  # the alias is bookkeeping: never fail the metrics for it
        context.log.warning(f"champion alias not moved: {exc}")
        return None


def _check(name: str, fn):  # type: ignore[no-untyped-def]
    """An asset check result from a pure check (``(passed, metadata)``); a check that cannot
    run fails with the reason instead of failing the asset."""
    try:
        passed, meta = fn()
    except Exception as exc:
        return dg.AssetCheckResult(check_name=name, passed=False,
                                   metadata={"error": f"{type(exc).__name__}: {exc}"[:500]})
    return dg.AssetCheckResult(check_name=name, passed=bool(passed),
                               metadata={k: _meta(v) for k, v in meta.items()})


def _with_severity(result: dg.AssetCheckResult, severity: dg.AssetCheckSeverity) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(check_name=result.check_name, passed=result.passed,
                               metadata=result.metadata, severity=severity)


def _meta(v):  # type: ignore[no-untyped-def]
    return dg.MetadataValue.json(v) if isinstance(v, list | dict) else v


def _user_errors(fn):  # type: ignore[no-untyped-def]
    """Turn a user-facing loop error into a Dagster failure with just its message."""
    from agile_pipeline.lib.state import StateError

    try:
        return fn()
    except (LoopError, StateError, LookupError) as exc:
        raise dg.Failure(description=str(exc).strip("'\"")) from exc


concept_start_job = dg.define_asset_job(
    selections.START_JOB,
    selection=dg.AssetSelection.assets(*selections.START_ASSETS),
    executor_def=dg.in_process_executor,
    description="Start a concept: expansion candidates for the first batch and zero-shot scores.",
)

concept_round_job = dg.define_asset_job(
    selections.ROUND_JOB,
    selection=dg.AssetSelection.assets(*selections.ROUND_ASSETS),
    executor_def=dg.in_process_executor,
    description=(
        "One active-learning round: retrain on all labels, select the next batch, extend the "
        "eval set with the new model's strata and re-score every model on the eval labels."
    ),
)
