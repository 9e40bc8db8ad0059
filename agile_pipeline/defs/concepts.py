"""Concept assets, one dynamic partition per concept.

``expansion_candidates`` -> (rater labels, written by the app/CLI) -> ``classifier`` ->
``al_candidates``; ``zero_shot_scores`` is the baseline every model is compared with.
"""

import time
from typing import Literal

import dagster as dg

from agile_pipeline import settings
from agile_pipeline.defs.resources import AgileHome, quiet_third_party_logs
from agile_pipeline.lib.loop import LoopEnv, LoopError

concept_partitions = dg.DynamicPartitionsDefinition(name="concepts")


def loop_env(agile: AgileHome) -> LoopEnv:
    return LoopEnv(agile.state(), agile.vectors(), agile.model_id(), agile.paths)


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
    # lookahead setting); the model is trained the same way, this only marks it
    lookahead: bool = False


class MarginSamplingConfig(dg.Config):
    batch_size: int = settings.AL_BATCH
    strategy: Literal["margin", "margin-positive"] = "margin"
    # leave out the current batch's images nobody has rated yet (a lookahead round)
    exclude_pending: bool = False


concept_labels = dg.AssetSpec(
    "concept_labels",
    group_name="labeling",
    partitions_def=concept_partitions,
    kinds={"sqlite"},
    description=(
        "Rating events written by the labeling app and `agile label` (append-only, one row per "
        "rating, with rater, time, purpose and provenance). Not materialized by Dagster."
    ),
)


@dg.asset(
    group_name="expansion",
    partitions_def=concept_partitions,
    deps=["image_embeddings"],
    kinds={"lancedb"},
    description=(
        "Text-to-image expansion: the nearest unlabeled train images of every positive and "
        "negative phrase, 100 sampled (seeded) from their union for the first rating batch."
    ),
)
def expansion_candidates(context: dg.AssetExecutionContext, config: ExpansionConfig, agile: AgileHome) -> dg.MaterializeResult:
    from agile_pipeline.lib.loop import build_expansion

    quiet_third_party_logs()
    env = loop_env(agile)
    batch = _user_errors(lambda: build_expansion(
        env, context.partition_key, agile.load_encoder(), per_phrase=config.per_phrase,
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
def zero_shot_scores(context: dg.AssetExecutionContext, agile: AgileHome) -> dg.MaterializeResult:
    from agile_pipeline.lib.loop import zero_shot

    env = loop_env(agile)
    ids, scores = _user_errors(lambda: zero_shot(env, context.partition_key, agile.load_encoder()))
    top = [str(ids[k]) for k in scores.argsort()[::-1][:5]]
    return dg.MaterializeResult(metadata={
        "images_scored": len(scores), "max_cosine": float(scores.max()) if len(scores) else 0.0,
        "top_images": dg.MetadataValue.json(top),
    })


@dg.asset(
    group_name="training",
    partitions_def=concept_partitions,
    deps=[concept_labels],
    kinds={"pytorch"},
    code_version="1",
    description=(
        "The concept's classifier: the paper's MLP (1x16 first, then 3x128) on frozen "
        "embeddings, trained on every train label plus random negatives (one model per round; "
        "its MLflow run and model version are `registered_model`)."
    ),
)
def classifier(context: dg.AssetExecutionContext, config: TrainingConfig, agile: AgileHome) -> dg.MaterializeResult:
    from agile_pipeline.lib.loop import NO_POSITIVES_ADVICE, label_counts, train_round
    from agile_pipeline.lib.state import LabelRule
    from agile_pipeline.lib.training import TrainConfig

    quiet_third_party_logs()
    env = loop_env(agile)
    t0 = time.perf_counter()
    rule = LabelRule(owner_wins=config.owner_wins, tie=config.tie)
    n_pos, n_neg = _user_errors(lambda: label_counts(env, context.partition_key, rule))
    if n_pos == 0:  # nothing to learn from: the selection step queues a recovery batch instead
        context.log.warning(NO_POSITIVES_ADVICE.format(name=context.partition_key, neg=n_neg))
        return dg.MaterializeResult(metadata={
            "trained": False, "n_pos": 0, "n_neg": n_neg,
            "status": "no positive labels yet: recovery batch instead of a model",
        })
    result = _user_errors(lambda: train_round(
        env, context.partition_key,
        config=TrainConfig(seed=config.seed, epochs=config.epochs, random_negatives=config.random_negatives),
        rule=rule, force=config.force, run_id=context.run.run_id, tracking=False,
        lookahead=config.lookahead,
    ))
    if result.reused:
        context.log.info(f"no new labels since round {result.round_index}: kept that model")
    for w in result.warnings:
        context.log.warning(w)
    return dg.MaterializeResult(metadata={
        "trained": True,
        "round": result.round_index, "n_pos": result.n_pos, "n_neg": result.n_neg,
        "label_cutoff": result.label_cutoff, "reused_previous_round": result.reused,
        "lookahead": config.lookahead,
        "train_seconds": round(result.train_seconds, 3),
        "seconds_total": round(time.perf_counter() - t0, 3),
        "model_dir": str(result.model_dir),
    })


@dg.asset(
    group_name="active_learning",
    partitions_def=concept_partitions,
    deps=[classifier],
    kinds={"numpy"},
    description=(
        "The next batch to rate: unlabeled train images with the smallest margin "
        "|P(pos) - P(neg)| under the latest model (or margin + positive mining)."
    ),
)
def al_candidates(context: dg.AssetExecutionContext, config: MarginSamplingConfig, agile: AgileHome) -> dg.MaterializeResult:
    from agile_pipeline.lib.loop import build_expansion, label_counts, select_candidates

    env = loop_env(agile)
    n_pos, _n_neg = _user_errors(lambda: label_counts(env, context.partition_key))
    if n_pos == 0:
        rec = _user_errors(lambda: build_expansion(
            env, context.partition_key, agile.load_encoder(), sample=config.batch_size,
            run_id=context.run.run_id, recovery=True,
        ))
        return dg.MaterializeResult(metadata={
            "batch_id": rec.batch_id, "candidates": len(rec.items), "strategy": "recovery",
            "round": rec.round_index, "images_scored": 0, "select_seconds": round(rec.seconds, 3),
            "status": "no positive labels yet: half next-nearest images of every phrase and exemplar, half at random",
        })
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
        "score_min": min(scores) if scores else 0.0, "score_max": max(scores) if scores else 0.0,
    })


@dg.asset(
    group_name="training",
    partitions_def=concept_partitions,
    deps=[classifier, al_candidates],
    kinds={"mlflow"},
    description=(
        "The round's MLflow run (params, metrics, model files, tags) and a new version of the "
        "registered model `<concept>-classifier`. Runs after the next batch is committed, so "
        "the rater never waits on it."
    ),
)
def registered_model(context: dg.AssetExecutionContext, agile: AgileHome) -> dg.MaterializeResult:
    from agile_pipeline.lib.loop import register_round

    quiet_third_party_logs()
    env = loop_env(agile)
    t0 = time.perf_counter()
    run_id, version, logged = _user_errors(lambda: register_round(
        env, context.partition_key, run_id=context.run.run_id))
    rounds = env.store.rounds(context.partition_key)
    return dg.MaterializeResult(metadata={
        "round": int(rounds[-1]["round"]) if rounds else -1,
        "mlflow_run_id": run_id or "", "model_version": version or "",
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
)
def eval_set(context: dg.AssetExecutionContext, config: EvalSetConfig, agile: AgileHome) -> dg.MaterializeResult:
    from agile_pipeline.lib.evaluation import build_eval_set

    env = loop_env(agile)
    batch = _user_errors(lambda: build_eval_set(
        env, context.partition_key, per_stratum=config.per_stratum, n_strata=config.n_strata,
        run_id=context.run.run_id,
    ))
    labeled = env.store.effective_labels(context.partition_key, purpose="eval")
    pending = sum(1 for it in batch.items if it["image_id"] not in labeled)
    return dg.MaterializeResult(metadata={
        "eval_images": len(batch.items), "to_rate": pending, "models": len(batch.info["models"]),
        "per_model_per_stratum": dg.MetadataValue.json(batch.info["counts"]),
    })


@dg.asset(
    group_name="evaluation",
    partitions_def=concept_partitions,
    deps=[eval_set],
    kinds={"mlflow"},
    description=(
        "AUC-PR (primary), AUC-ROC, F1 and accuracy of every model version and zero-shot on "
        "the rated eval set; logged to each model's MLflow run, with the AUC-PR plot."
    ),
)
def model_metrics(context: dg.AssetExecutionContext, config: MetricsConfig, agile: AgileHome) -> dg.MaterializeResult:
    from agile_pipeline.lib.evaluation import evaluate

    env = loop_env(agile)
    report = _user_errors(lambda: evaluate(
        env, context.partition_key, zero_shot_threshold=config.zero_shot_threshold,
    ))
    table = "\n".join(
        ["| model | labels | AUC-PR | AUC-ROC | F1 | accuracy |", "|---|---|---|---|---|---|"]
        + [f"| {r['model']} | {r['n_labels']} | {r['auc_pr']:.3f} | {r['auc_roc']:.3f} | "
           f"{r['f1']:.3f} | {r['accuracy']:.3f} |" for r in report["models"]]
    )
    png = open(report["plot"], "rb").read()
    import base64

    return dg.MaterializeResult(metadata={
        "eval_labels": report["n_eval_labels"],
        "metrics": dg.MetadataValue.md(table),
        "plot": dg.MetadataValue.md(
            f"![AUC-PR](data:image/png;base64,{base64.b64encode(png).decode()})"
        ),
        "plot_path": dg.MetadataValue.path(report["plot"]),
    })


def _user_errors(fn):  # type: ignore[no-untyped-def]
    """Turn a user-facing loop error into a Dagster failure with just its message."""
    from agile_pipeline.lib.state import StateError

    try:
        return fn()
    except (LoopError, StateError, LookupError) as exc:
        raise dg.Failure(description=str(exc).strip("'\"")) from exc


concept_start_job = dg.define_asset_job(
    "concept_start_job",
    selection=dg.AssetSelection.assets(expansion_candidates, zero_shot_scores),
    executor_def=dg.in_process_executor,
    description="Start a concept: expansion candidates for the first batch and zero-shot scores.",
)

ROUND_ASSETS = (classifier, al_candidates, registered_model, eval_set, model_metrics)
# what the round job runs when only part of it is wanted (``asset_selection`` of a run)
FOLLOWUP_ASSETS = ("classifier", "registered_model", "eval_set", "model_metrics")
EVAL_ASSETS = ("eval_set", "model_metrics")

concept_round_job = dg.define_asset_job(
    "concept_round_job",
    selection=dg.AssetSelection.assets(*ROUND_ASSETS),
    executor_def=dg.in_process_executor,
    description=(
        "One active-learning round: retrain on all labels, select the next batch, extend the "
        "eval set with the new model's strata and re-score every model on the eval labels."
    ),
)
