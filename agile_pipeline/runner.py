"""Run the asset graph in-process (CLI, app fallback, tests) with the project's resources.

When ``DAGSTER_HOME`` is set, runs are recorded in that instance, so they appear in the
Dagster UI next to runs launched there; otherwise an ephemeral instance is used.
"""

import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg

from agile_pipeline.definitions import definitions_for
from agile_pipeline.defs import concepts, corpus, selections
from agile_pipeline.defs.resources import AgileResources

START_JOB = selections.START_JOB
ROUND_JOB = selections.ROUND_JOB
CORPUS_JOB = corpus.corpus_refresh_job.name


class RunFailed(RuntimeError):
    """A materialization failed; the message is the user-facing reason."""


def instance() -> dg.DagsterInstance:
    if os.environ.get("DAGSTER_HOME"):
        return dg.DagsterInstance.get()
    return dg.DagsterInstance.ephemeral()


def ensure_partition(inst: dg.DagsterInstance, concept: str) -> None:
    if not inst.has_dynamic_partition(concepts.concept_partitions.name, concept):  # type: ignore[arg-type]
        inst.add_dynamic_partitions(concepts.concept_partitions.name, [concept])  # type: ignore[arg-type]


_DEFS: dict[int, tuple[AgileResources, dg.Definitions]] = {}
_DEFS_LOCK = threading.Lock()


def definitions(agile: AgileResources) -> dg.Definitions:
    """The code location's assets and named jobs, bound to ``agile``'s resources (cached per
    :class:`AgileResources` object)."""
    with _DEFS_LOCK:
        hit = _DEFS.get(id(agile))
        if hit is not None and hit[0] is agile:
            return hit[1]
        defs = definitions_for(agile)
        _DEFS[id(agile)] = (agile, defs)
        return defs


def _run(
    job: str,
    *,
    selection: Sequence[str] | None = None,
    partition_key: str | None = None,
    run_config: Mapping[str, Any] | None = None,
    agile: AgileResources | None = None,
    inst: dg.DagsterInstance | None = None,
    tags: Mapping[str, str] | None = None,
    run_id: str | None = None,
) -> dg.ExecuteInProcessResult:
    """Execute the named job (or ``selection``, asset names, of it) in this process, recorded
    in the Dagster instance (so the run shows under its job name in the Dagster UI)."""
    inst = inst or instance()
    run_config = dict(run_config or {})
    if selection is not None and "ops" in run_config:  # config only for the selected steps
        run_config["ops"] = {k: v for k, v in run_config["ops"].items() if k in selection}
    # Step events go to the run's event log (Dagster UI); the caller reports failures itself.
    run_config.setdefault("loggers", {"console": {"config": {"log_level": "CRITICAL"}}})
    if partition_key is not None:
        ensure_partition(inst, partition_key)
    job_def = definitions(agile or AgileResources()).resolve_job_def(job)
    result = job_def.execute_in_process(
        run_config=run_config,
        instance=inst,
        partition_key=partition_key,
        raise_on_error=False,
        asset_selection=[dg.AssetKey(a) for a in selection] if selection is not None else None,
        run_id=run_id,
        tags=dict(tags or {}),
    )
    if not result.success:
        raise RunFailed(failure_message(result))
    return result


def failure_message(result: dg.ExecuteInProcessResult) -> str:
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data is not None:
            err = event.step_failure_data.error
            if err is None:
                continue
            desc = getattr(event.step_failure_data.user_failure_data, "description", None)
            if desc:
                return str(desc)
            # the innermost cause is the user's problem; Dagster's wrapper adds noise
            while err.cause is not None:
                err = err.cause
            return err.message.strip()
    return "the run failed (see the Dagster logs)"


def step_seconds(result: dg.ExecuteInProcessResult) -> dict[str, float]:
    """How long each step of the run took (Dagster's own step durations), in run order."""
    out: dict[str, float] = {}
    for ev in result.get_step_success_events():
        ms = getattr(ev.event_specific_data, "duration_ms", None)
        if ev.step_key and ms is not None:
            out[ev.step_key] = round(float(ms) / 1000, 3)
    return out


def metadata_of(result: dg.ExecuteInProcessResult, asset: Any) -> dict[str, Any]:
    mats = result.asset_materializations_for_node(asset.op.name)
    if not mats:
        return {}
    return {k: getattr(v, "value", v) for k, v in mats[-1].metadata.items()}


def run_corpus(sources: Sequence[str], *, workers: int = 4, agile: AgileResources | None = None) -> dg.ExecuteInProcessResult:
    return _run(
        CORPUS_JOB,
        run_config={"ops": {"image_manifest": {"config": {"sources": list(sources), "workers": workers}}}},
        agile=agile,
        tags={"agile/corpus": "refresh"},
    )


def run_concept_start(
    concept: str,
    *,
    seed: int = 0,
    agile: AgileResources | None = None,
    tags: Mapping[str, str] | None = None,
    run_id: str | None = None,
) -> dg.ExecuteInProcessResult:
    return _run(
        START_JOB,
        partition_key=concept,
        run_config={"ops": {"expansion_candidates": {"config": {"seed": seed}}}},
        agile=agile, tags=tags, run_id=run_id,
    )


def run_concept_round(
    concept: str,
    *,
    training: Mapping[str, Any] | None = None,
    sampling: Mapping[str, Any] | None = None,
    agile: AgileResources | None = None,
    tags: Mapping[str, str] | None = None,
    run_id: str | None = None,
    selection: Sequence[str] | None = None,
) -> dg.ExecuteInProcessResult:
    """One round: train, select the next batch, MLflow, eval set, metrics. ``selection``
    (asset names of the round job, e.g. :data:`selections.FOLLOWUP_ASSETS`) runs part of it."""
    return _run(
        ROUND_JOB,
        selection=selection,
        partition_key=concept,
        run_config={"ops": {
            "classifier": {"config": dict(training or {})},
            "al_candidates": {"config": dict(sampling or {})},
        }},
        agile=agile, tags=tags, run_id=run_id,
    )


def run_concept_eval(
    concept: str,
    *,
    agile: AgileResources | None = None,
    tags: Mapping[str, str] | None = None,
    run_id: str | None = None,
) -> dg.ExecuteInProcessResult:
    """Rebuild the eval set and re-score every model on the eval labels rated so far."""
    return _run(ROUND_JOB, selection=selections.EVAL_ASSETS, partition_key=concept, agile=agile,
                tags=tags, run_id=run_id)


def prepare_simulation(dataset_path: str, *, min_test_pos: int = 20, agile: AgileResources | None = None):  # type: ignore[no-untyped-def]
    """Ingest + embed a labeled dataset into the data directory and return ``SimData``
    (with every concept that has at least ``min_test_pos`` test positives)."""
    import tempfile
    from pathlib import Path

    import numpy as np

    from agile_pipeline.lib.labeled_dataset import SimData, concept_phrase, load_dataset

    agile = agile or AgileResources()
    ds = load_dataset(Path(dataset_path))
    if ds.root.is_file():  # a CSV: ingest exactly its images
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as fh:
            fh.write("\n".join(str(p) for p in ds.images))
        run_corpus([fh.name], agile=agile)
    else:
        run_corpus([str(ds.root)], agile=agile)
    store = agile.state.store()
    encoder = agile.encoder.load()
    vectors = agile.vectors.vectors()
    manifest_split = store.all_image_splits()
    ids: list[str | None] = [store.resolve_image(str(p)) for p in ds.images]
    split_of: dict[str, str] = {}
    for image_id, given in zip(ids, ds.split, strict=True):
        if image_id is not None:
            split_of[image_id] = given or manifest_split.get(image_id) or "train"
    train_ids = sorted(i for i, s in split_of.items() if s == "train")
    test_ids = sorted(i for i, s in split_of.items() if s == "test")
    positives = {
        c: {ids[k] for k in members if ids[k] is not None} for c, members in ds.positives.items()
    }
    test_set = set(test_ids)
    keep = {c: p for c, p in positives.items() if len(p & test_set) >= min_test_pos}  # type: ignore[operator]
    phrases = {
        c: [concept_phrase(c)] + ([ds.descriptions[c]] if c in ds.descriptions else [])
        for c in keep
    }
    text_vectors = {c: np.asarray(encoder.embed_texts(p), dtype=np.float32) for c, p in phrases.items()}
    return SimData(
        embedding_model=encoder.model_id,
        train_ids=train_ids,
        test_ids=test_ids,
        X_train=vectors.vectors_for(encoder.model_id, train_ids),
        X_test=vectors.vectors_for(encoder.model_id, test_ids),
        positives=keep,  # type: ignore[arg-type]
        phrases=phrases,
        text_vectors=text_vectors,
    )
