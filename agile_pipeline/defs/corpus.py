"""Corpus assets: ingestion + dedup -> train/test split -> image embeddings (LanceDB) -> their
ANN index and their neighbour graph."""

import time
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from agile_pipeline import settings
from agile_pipeline.defs.resources import (
    EncoderResource,
    StateResource,
    VectorsResource,
    quiet_third_party_logs,
)
from agile_pipeline.lib import corpus
from agile_pipeline.lib.ann_index import ANN_MIN_ROWS
from agile_pipeline.lib.corpus import SourceError, ingest_source
from agile_pipeline.lib.keyed_hash import assign_split


class IngestConfig(dg.Config):
    """Which sources to ingest. Empty: every source registered before (what refreshes use)."""

    sources: list[str] = Field(default_factory=list)
    workers: int = 4


class SplitConfig(dg.Config):
    train_fraction: float = settings.TRAIN_FRACTION


class EmbeddingConfig(dg.Config):
    # 16: fastest on a 2-core AVX2 box (scripts/embed_throughput.py: ~51 img/s pipelined at 16
    # vs ~30 at 64, see BENCHMARKS.md); larger batches only pay with more cores or a GPU
    batch_size: int = 16
    workers: int = 2


def registered_sources(state: StateResource) -> list[str]:
    return corpus.registered_sources(state.paths.sources_file)


def register_sources(state: StateResource, sources: list[str]) -> list[str]:
    """Remember sources so the schedule and sensor refresh them; returns the full list."""
    return corpus.register_sources(state.paths.sources_file, sources)


@dg.asset(
    group_name="corpus",
    kinds={"sqlite"},
    description=(
        "Ingestion and dedup: every image of the registered sources (folders, path/URL lists, "
        "LAION-style parquet) validated by a full decode and keyed by its content hash. "
        "Identical content and repeated URIs are kept once; bad files are skipped with a reason."
    ),
)
def image_manifest(context: dg.AssetExecutionContext, config: IngestConfig, state: StateResource) -> dg.MaterializeResult:
    quiet_third_party_logs()
    sources = config.sources or registered_sources(state)
    if not sources:
        raise dg.Failure(
            "no corpus source configured: run `agile ingest PATH` once, or pass "
            "ops.image_manifest.config.sources in the launchpad"
        )
    store = state.store()
    totals: dict[str, int] = {}
    per_source = []
    for spec in sources:
        try:
            report = ingest_source(spec, store, blob_dir=state.paths.blobs, workers=config.workers)
        except SourceError as exc:
            raise dg.Failure(str(exc)) from exc
        # registered once ingested: a source that cannot be read is never refreshed later
        register_sources(state, [spec])
        md = report.as_metadata()
        per_source.append(md)
        for k, v in md.items():
            if isinstance(v, int):
                totals[k] = totals.get(k, 0) + v
        for reason, example in report.examples.items():
            context.log.warning(f"skipped ({reason}), e.g. {example}")
        context.log.info(
            f"{spec}: {report.ingested} ingested, {report.duplicates} duplicates, "
            f"{sum(report.skipped.values())} skipped, {report.unchanged} unchanged"
        )
    counts = store.count_images()
    return dg.MaterializeResult(
        metadata={
            **totals,
            "images_total": sum(counts.values()),
            "sources": dg.MetadataValue.json(per_source),
        }
    )


@dg.asset(
    group_name="corpus",
    deps=[image_manifest],
    kinds={"sqlite"},
    description=(
        "Deterministic train/test assignment from a keyed SipHash-2-4 of the image id "
        "(default 50/50, as in the paper). Stable across machines and refreshes."
    ),
)
def train_test_assignment(config: SplitConfig, state: StateResource) -> dg.MaterializeResult:
    store = state.store()
    current = store.all_image_splits()
    wanted = {
        i: assign_split(i, train_fraction=config.train_fraction, key=settings.SPLIT_KEY)
        for i in current
    }
    changed = [(i, s) for i, s in wanted.items() if current[i] != s]
    store.set_splits(changed)
    counts = store.count_images()
    return dg.MaterializeResult(
        metadata={
            "assigned_or_changed": len(changed),
            "train": counts.get("train", 0),
            "test": counts.get("test", 0),
            "train_fraction": config.train_fraction,
        }
    )


@dg.asset(
    group_name="corpus",
    deps=[train_test_assignment],
    kinds={"lancedb", "pytorch"},
    code_version="1",
    description=(
        "One vector per image in a LanceDB table per embedding model (never mixed). "
        "Incremental: only images without a vector are embedded."
    ),
)
def image_embeddings(
    context: dg.AssetExecutionContext, config: EmbeddingConfig, state: StateResource,
    vectors: VectorsResource, encoder: EncoderResource,
) -> dg.MaterializeResult:
    from agile_pipeline.lib import distributed
    from agile_pipeline.lib.embedding import EmbeddingRun
    from agile_pipeline.lib.images import load_rgb

    quiet_third_party_logs()
    store = state.store()
    vs = vectors.vectors()
    started = time.perf_counter()
    model = encoder.load()
    model_id = model.model_id
    splits = store.all_image_splits()
    have = vs.ids(model_id)
    todo = sorted(i for i, s in splits.items() if s is not None and i not in have)
    moved = vs.update_splits(model_id, {i: s for i, s in splits.items() if s})
    rows = {r["id"]: r["path"] for r in store.image_rows(todo)}
    n_ok, failed = 0, []
    stats = None
    if todo and distributed.enabled():
        context.log.info(f"embedding {len(todo)} new images with {model_id} as Ray tasks "
                         f"({distributed.ENV_ADDRESS}={distributed.ray_address()})")
        n_ok, failed = distributed.embed_to_table_ray(
            [(i, rows[i]) for i in todo], {i: splits[i] or "train" for i in todo},
            encoder_spec=encoder.spec, lancedb_uri=vectors.paths.lancedb, model_id=model_id,
            dim=model.dim, batch_size=config.batch_size)
        vs.optimize(model_id)
    elif todo:
        context.log.info(f"embedding {len(todo)} new images with {model_id}")
        run = EmbeddingRun(
            [(i, Path(rows[i])) for i in todo],
            load_rgb,
            model,
            batch_size=config.batch_size,
            workers=config.workers,
            log=context.log,  # type: ignore[arg-type]
        )
        for batch in run.batches():
            if batch.ids:
                vs.add(model_id, batch.ids, [splits[i] or "train" for i in batch.ids], batch.vectors)
                n_ok += len(batch.ids)
            failed += batch.failed
        stats = run.stats
        vs.optimize(model_id)
    for image_id, reason in failed[:20]:
        context.log.warning(f"could not embed {image_id}: {reason}")
    seconds = time.perf_counter() - started
    md: dict[str, object] = {
        "model_id": model_id,
        "table": f"{vectors.paths.lancedb}/{model_id}",
        "embedded_now": n_ok,
        "failed_now": len(failed),
        "split_changes": moved,
        "rows_total": vs.count(model_id),
        "seconds": round(seconds, 2),
        "table_version": vs.version(model_id) if vs.exists(model_id) else 0,
    }
    if n_ok:
        md["images_per_second"] = round(n_ok / max(seconds, 1e-9), 1)
    if stats is not None and getattr(stats, "images_per_second", None):
        md["inference_images_per_second"] = round(float(stats.images_per_second), 1)
    return dg.MaterializeResult(metadata=md)  # type: ignore[arg-type]


class IndexConfig(dg.Config):
    # below this many rows an exact scan is fast and exact: no index (lib/ann_index.py)
    min_rows: int = Field(default=ANN_MIN_ROWS, ge=0)
    rebuild: bool = False


@dg.asset(
    group_name="corpus",
    deps=[image_embeddings],
    kinds={"lancedb"},
    description=(
        "LanceDB's IVF-PQ index over the embedding table, for expansion, search and the "
        "candidate pools' neighbour queries (exact re-rank of the candidates). Built once above "
        f"{ANN_MIN_ROWS:,} rows, then extended with each refresh's new rows; probes calibrated "
        "until recall@100 against exact search reaches 0.95. Smaller tables: exact search."
    ),
    check_specs=[dg.AssetCheckSpec(
        "recall_at_100", asset="embedding_index",
        description="Recall@100 of the index against exact search, on 50 train rows picked by a "
                    "fixed seed, is at least 0.95 (tables searched exactly pass).")],
)
def embedding_index(
    context: dg.AssetExecutionContext, config: IndexConfig, vectors: VectorsResource, encoder: EncoderResource,
) -> dg.MaterializeResult:
    from agile_pipeline.lib import ann_index

    vs = vectors.vectors()
    model_id = encoder.model_id()
    if not vs.exists(model_id):
        return dg.MaterializeResult(metadata={"status": "no embeddings yet"}, check_results=[
            dg.AssetCheckResult(check_name="recall_at_100", passed=True, metadata={"search": "none yet"})])
    from agile_pipeline.lib import distributed

    cal: dict[str, Any] | None = None
    if distributed.enabled():  # the build and calibration run as a Ray task on the cluster
        done = ann_index.build_index_ray(vs, model_id, min_rows=config.min_rows, rebuild=config.rebuild)
        cal = done.pop("calibration", None)
        report = ann_index.IndexReport(**done)
    else:
        report = ann_index.ensure_index(vs, model_id, min_rows=config.min_rows, rebuild=config.rebuild)
    md: dict[str, object] = {"model_id": model_id, "status": report.status, "rows": report.rows,
                             "indexed_rows": report.indexed_rows, "build_seconds": round(report.seconds, 2),
                             **{k: v for k, v in report.params.items() if k != "nprobes"}}
    if report.status == "exact":
        context.log.info(f"{report.rows:,} rows (< {config.min_rows:,}): exact search, no index")
        check = dg.AssetCheckResult(check_name="recall_at_100", passed=True,
                                    metadata={"search": "exact", "recall": 1.0})
    else:
        cal = cal or ann_index.calibrate(vs, model_id, target=ann_index.RECALL_TARGET)
        md.update(nprobes=cal["nprobes"], refine_factor=cal["refine_factor"],
                  recall_at_100=dg.MetadataValue.float(round(cal["recall"], 4)),
                  ann_ms_per_query=dg.MetadataValue.float(round(1000 * cal["ann_seconds_per_query"], 2)),
                  exact_ms_per_query=dg.MetadataValue.float(round(1000 * cal["exact_seconds_per_query"], 2)))
        check = dg.AssetCheckResult(
            check_name="recall_at_100", passed=cal["recall"] >= ann_index.RECALL_TARGET,
            metadata={"recall": round(cal["recall"], 4), "queries": int(cal["queries"]),
                      "nprobes": cal["nprobes"], "refine_factor": cal["refine_factor"],
                      "tried": dg.MetadataValue.json(cal["tried"])})
    return dg.MaterializeResult(metadata=md, check_results=[check])  # type: ignore[arg-type]


@dg.asset(
    group_name="corpus",
    deps=[image_embeddings],
    kinds={"numpy"},
    description=(
        "The exact 10-nearest-neighbour graph (cosine) of every embedded image, both splits, kept "
        "beside the split caches once per table version: the corpus scores (label propagation) "
        "and a kernel round's graph positives read it. Built here, after each refresh, so that no "
        "round waits on it (O(n²): ~3 s at 12k images, ~59 s at 50k on the 2-vCPU box); off "
        f"above {settings.PROPAGATION_MAX_IMAGES:,} images or with AGILE_PROPAGATION=off."
    ),
)
def neighbour_graph(vectors: VectorsResource, encoder: EncoderResource) -> dg.MaterializeResult:
    from agile_pipeline.lib import propagation
    from agile_pipeline.lib.corpus_scores import corpus_graph

    vs = vectors.vectors()
    model_id = encoder.model_id()
    if not vs.exists(model_id):
        return dg.MaterializeResult(metadata={"status": "no embeddings yet"})
    mode = settings.propagation_mode()
    g = corpus_graph(vs, model_id, mode=mode)
    if g is None:
        from agile_pipeline.lib.split_cache import has_cache

        status = ("off" if mode == "off" else "none: no split caches" if not has_cache(vs) else
                  f"none: over {settings.PROPAGATION_MAX_IMAGES:,} images (AGILE_PROPAGATION=on builds it)")
        return dg.MaterializeResult(metadata={"status": status, "mode": mode})
    return dg.MaterializeResult(metadata={
        "status": "built" if g.build_seconds else "current", "mode": mode,
        "images": len(g.graph), "train_images": g.n_train, "k": propagation.K,
        "build_seconds": round(g.build_seconds, 3)})


@dg.asset_check(asset=image_embeddings, blocking=True, description="Every manifest image of the current split has exactly one vector of the current model.")
def image_embeddings_complete(state: StateResource, vectors: VectorsResource, encoder: EncoderResource) -> dg.AssetCheckResult:
    store = state.store()
    vs = vectors.vectors()
    model_id = encoder.model_id()
    manifest = {i for i, s in store.all_image_splits().items() if s is not None}
    if not vs.exists(model_id):
        return dg.AssetCheckResult(passed=not manifest, metadata={"missing": len(manifest)})
    t = vs.table(model_id).to_lance().to_table(columns=["id"])
    ids = t.column("id").to_pylist()
    present = set(ids)
    missing = manifest - present
    extra = present - manifest
    dupes = len(ids) - len(present)
    return dg.AssetCheckResult(
        passed=not missing and not dupes,
        metadata={"missing": len(missing), "duplicated": dupes, "not_in_manifest": len(extra),
                  "example_missing": next(iter(missing), "")},
    )


@dg.asset_check(asset=image_manifest, description="Image ids (content hashes) are unique and every row has a path.")
def image_manifest_unique_ids(state: StateResource) -> dg.AssetCheckResult:
    rows = state.store()._read(
        "SELECT count(*) AS n, count(DISTINCT id) AS d, sum(path IS NULL OR path = '') AS nopath FROM images"
    )[0]
    return dg.AssetCheckResult(
        passed=rows["n"] == rows["d"] and not rows["nopath"],
        metadata={"rows": rows["n"], "distinct_ids": rows["d"]},
    )


corpus_refresh_job = dg.define_asset_job(
    "corpus_refresh_job",
    selection=dg.AssetSelection.assets(image_manifest, train_test_assignment, image_embeddings, embedding_index,
                                       neighbour_graph),
    executor_def=dg.in_process_executor,
    description="Ingest new images of the registered sources, split them, embed them, index them and "
                "build their neighbour graph.",
)

corpus_refresh_schedule = dg.ScheduleDefinition(
    name="corpus_refresh_schedule",
    job=corpus_refresh_job,
    cron_schedule="0 3 * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Daily refresh of every registered corpus source.",
)


def source_fingerprint(sources: list[str]) -> str:
    """Cheap change detector: file count, total size and newest mtime of each local source."""
    parts = []
    for spec in sources:
        p = Path(spec)
        if not p.exists():
            parts.append(f"{spec}:missing")
            continue
        if p.is_file():
            st = p.stat()
            parts.append(f"{spec}:{st.st_size}:{st.st_mtime_ns}")
            continue
        n = size = newest = 0
        for dirpath, _dirs, files in __import__("os").walk(p):
            for f in files:
                try:
                    st = (Path(dirpath) / f).stat()
                except OSError:
                    continue
                n += 1
                size += st.st_size
                newest = max(newest, st.st_mtime_ns)
        parts.append(f"{spec}:{n}:{size}:{newest}")
    return "|".join(parts)


@dg.sensor(
    job=corpus_refresh_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Starts a corpus refresh when files appear in (or change under) a registered source.",
)
def new_images_sensor(context: dg.SensorEvaluationContext, state: StateResource) -> dg.SensorResult | dg.SkipReason:
    sources = registered_sources(state)
    if not sources:
        return dg.SkipReason("no registered sources yet (run `agile ingest PATH`)")
    fingerprint = source_fingerprint(sources)
    if context.cursor is None:
        # first evaluation: remember the state, do not re-ingest what `agile ingest` just did
        return dg.SensorResult(skip_reason=dg.SkipReason("recorded the sources' current state"), cursor=fingerprint)
    if fingerprint == context.cursor:
        return dg.SkipReason("no change in the registered sources")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"sources-{abs(hash(fingerprint))}-{int(time.time())}")],
        cursor=fingerprint,
    )


# ---- vector-table housekeeping ------------------------------------------------------------
class HousekeepingConfig(dg.Config):
    """What the LanceDB housekeeping keeps (see :meth:`VectorStore.compact`)."""

    keep_versions: int = 5
    keep_replaced_for_minutes: float = 60.0


@dg.op(description="Compact every embedding table's small fragments and delete versions that were "
                   "replaced long enough ago that no reader can still hold them.")
def compact_vector_tables(context: dg.OpExecutionContext, config: HousekeepingConfig, vectors: VectorsResource) -> dict[str, dict[str, int]]:
    from datetime import timedelta

    vs = vectors.vectors()
    done: dict[str, dict[str, int]] = {}
    for model_id in vs.model_ids():
        done[model_id] = vs.compact(
            model_id, keep_versions=config.keep_versions,
            older_than=timedelta(minutes=config.keep_replaced_for_minutes),
        )
        context.log.info(f"{model_id}: {done[model_id]}")
    return done


@dg.job(
    description="LanceDB housekeeping: compaction and old-version cleanup of the embedding tables.",
    tags={"agile/corpus": "housekeeping"},  # queued behind a corpus refresh (dagster.yaml limit)
    executor_def=dg.in_process_executor,
)
def vectors_housekeeping_job() -> None:
    compact_vector_tables()


vectors_housekeeping_schedule = dg.ScheduleDefinition(
    name="vectors_housekeeping_schedule",
    job=vectors_housekeeping_job,
    cron_schedule="30 4 * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Daily, after the corpus refresh: compact the embedding tables, drop old versions.",
)
