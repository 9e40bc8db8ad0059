"""MLflow bookkeeping: one run and one registered-model version per trained model.

The store is embedded by default (sqlite under the data directory, artifacts beside it);
``AGILE_MLFLOW_URI`` points it at a server. No MLflow model flavour is used: the artifact
is the classifier's own ``model.pt`` + ``meta.json``, loaded with
``agile_pipeline.lib.training.TrainedClassifier.load`` — fast to log and to load.
"""

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def experiment_name(concept: str) -> str:
    return f"agile-modeling/{concept}"


def registered_model_name(concept: str) -> str:
    return re.sub(r"[^a-z0-9_-]+", "-", concept.lower()) + "-classifier"


@dataclass(frozen=True)
class LoggedModel:
    run_id: str
    version: str
    name: str
    artifact_uri: str


def _client(tracking_uri: str):  # type: ignore[no-untyped-def]
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    from mlflow.tracking import MlflowClient

    for name in ("alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    ensure_sqlite_store(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri)


def ensure_sqlite_store(tracking_uri: str) -> None:
    """Create an embedded (``sqlite:///``) MLflow store crash-safely: its schema is built in a
    private file that replaces nothing until it is complete.

    MLflow builds a new store with a few dozen migrations; a process killed in the middle (the
    app warms MLflow up when it starts) would leave a half-built database that every later
    run refuses ("table ... already exists"). Here the half-built file is a temporary one that
    the next attempt ignores; a file lock keeps concurrent first users from racing.
    """
    import fcntl

    if not tracking_uri.startswith("sqlite:///"):
        return
    path = Path(tracking_uri.removeprefix("sqlite:///"))
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".init.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if path.exists():
                return
            tmp = path.with_name(f".{path.name}.init-{os.getpid()}")
            tmp.unlink(missing_ok=True)
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=f"sqlite:///{tmp}")
            client.search_experiments(max_results=1)  # builds and migrates the schema
            engine = getattr(getattr(client, "_tracking_client", None), "store", None)
            engine = getattr(engine, "engine", None)
            if engine is not None:
                engine.dispose()  # no connection left on the file we are about to move
            os.replace(tmp, path)  # complete, or not there at all
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def log_model_version(
    *,
    tracking_uri: str,
    artifact_root: Path,
    concept: str,
    round_index: int,
    model_dir: Path,
    params: Mapping[str, Any],
    metrics: Mapping[str, float],
    tags: Mapping[str, str],
) -> LoggedModel:
    """Create the run (params, metrics, tags, artifacts) and register a new model version."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    exp_name = experiment_name(concept)
    exp = client.get_experiment_by_name(exp_name)
    if exp is None:
        try:
            exp_id = client.create_experiment(
                exp_name, artifact_location=(Path(artifact_root).resolve() / re.sub(r"\W+", "_", concept)).as_uri()
            )
        except MlflowException:  # created concurrently
            exp_id = client.get_experiment_by_name(exp_name).experiment_id  # type: ignore[union-attr]
    else:
        exp_id = exp.experiment_id
    all_tags = {"agile/round": str(round_index), "agile/concept": concept, **tags}
    run = client.create_run(exp_id, run_name=f"round-{round_index}", tags=all_tags)
    run_id = run.info.run_id
    ts = 0
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), ts, round_index) for k, v in metrics.items() if v == v],
        params=[Param(k, str(v)[:6000]) for k, v in params.items()],
        tags=[RunTag(k, str(v)) for k, v in all_tags.items()],
    )
    client.log_artifacts(run_id, str(model_dir), artifact_path="model")
    client.set_terminated(run_id)
    name = registered_model_name(concept)
    try:
        client.create_registered_model(name, tags={"agile/concept": concept})
    except MlflowException:
        pass  # exists
    mv = client.create_model_version(
        name, source=f"runs:/{run_id}/model", run_id=run_id, tags=all_tags,
        description=f"{concept}: round {round_index}",
    )
    return LoggedModel(run_id=run_id, version=str(mv.version), name=name,
                       artifact_uri=f"{run.info.artifact_uri}/model")


def ui_links(tracking_uri: str, run_id: str, concept: str, version: str | None,
             ui_url: str | None = None) -> dict[str, str]:
    """Links into the MLflow UI (``AGILE_MLFLOW_UI_URL``, default ``http://127.0.0.1:5000``,
    what ``mlflow ui`` serves) for a round's run and its registered model version."""
    ui = (ui_url or os.environ.get("AGILE_MLFLOW_UI_URL") or "http://127.0.0.1:5000").rstrip("/")
    exp_id = _client(tracking_uri).get_run(run_id).info.experiment_id
    links = {"mlflow_run": f"{ui}/#/experiments/{exp_id}/runs/{run_id}"}
    if version:
        links["mlflow_model_version"] = f"{ui}/#/models/{registered_model_name(concept)}/versions/{version}"
    return links


def log_metrics(tracking_uri: str, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    """Add metrics (e.g. eval-set results computed later) to an existing run."""
    from mlflow.entities import Metric

    client = _client(tracking_uri)
    client.log_batch(run_id, metrics=[Metric(k, float(v), 0, step) for k, v in metrics.items() if v == v])


def log_artifact(tracking_uri: str, run_id: str, path: Path, artifact_path: str | None = None) -> None:
    _client(tracking_uri).log_artifact(run_id, str(path), artifact_path=artifact_path)


def model_versions(tracking_uri: str, concept: str) -> list[dict[str, Any]]:
    client = _client(tracking_uri)
    try:
        versions = client.search_model_versions(f"name = '{registered_model_name(concept)}'")
    except Exception:
        return []
    return sorted(
        ({"version": v.version, "run_id": v.run_id, "tags": dict(v.tags), "source": v.source}
         for v in versions),
        key=lambda d: int(d["version"]),
    )
