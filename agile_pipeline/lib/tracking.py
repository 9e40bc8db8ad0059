"""MLflow bookkeeping: one run and one registered-model version per trained model.

The store is embedded by default (sqlite under the data directory, artifacts beside it);
``AGILE_MLFLOW_URI`` points it at a server. Each version is a real MLflow model (a pyfunc
that scores images or embeddings: :mod:`.mlflow_model`) with its signature, input example,
requirements and the embedding model as config; the run has the label snapshot as its
training dataset input and a link back to the Dagster run. ``models:/NAME/latest`` is the
newest version (MLflow's own), the ``champion`` alias the best on the eval set
(:func:`choose_champion`).
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


def registered_model_name(concept: str, client: Any = None) -> str:
    """The concept's registered model in MLflow: ``NAME-classifier`` with each space of the name
    written as a dot (concept names are ``[a-z0-9 _-]``, so two concepts never share a model:
    ``sp ace`` -> ``sp.ace-classifier``, ``sp-ace`` -> ``sp-ace-classifier``).

    Older versions wrote spaces as ``-``; a concept whose models were registered under that
    name (the registered model's ``agile/concept`` tag is this concept) keeps it, given a
    ``client`` to look it up with.
    """
    name = concept.replace(" ", ".") + "-classifier"
    legacy = re.sub(r"[^a-z0-9_-]+", "-", concept.lower()) + "-classifier"
    if client is None or legacy == name:
        return name
    try:
        owner = dict(client.get_registered_model(legacy).tags).get("agile/concept")
    except Exception:  # not registered (MlflowException) or no store yet
        return name
    return legacy if owner == concept else name


def model_name(tracking_uri: str, concept: str) -> str:
    """:func:`registered_model_name` as the tracking store at ``tracking_uri`` has it."""
    return registered_model_name(concept, _client(tracking_uri))


@dataclass(frozen=True)
class LoggedModel:
    run_id: str
    version: str
    name: str
    artifact_uri: str


def _client(tracking_uri: str):  # type: ignore[no-untyped-def]
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    # a progress bar per artifact download (logging a model reloads it to check the input
    # example): several per round in the app's log and the CLI's output, never informative here
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow.tracking import MlflowClient

    for name in ("alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    ensure_sqlite_store(tracking_uri)
    # the registry too: MLflow otherwise takes a registry URI set globally earlier in the process
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


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
    encoder_spec: str = "bundled",
    embedding_model: str = "",
) -> LoggedModel:
    """Create the run (params, metrics, tags, the label snapshot as its dataset input, the
    MLflow model) and register a new model version; point the ``latest`` alias at it."""
    import tempfile

    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException

    from agile_pipeline.lib.mlflow_model import save_pyfunc

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
    # "Model N": the model's one name in the app, the download, MLflow and Dagster
    all_tags = {"agile/round": str(round_index), "agile/model": f"Model {round_index + 1}", "agile/concept": concept,
                **tags}
    run = client.create_run(exp_id, run_name=f"round-{round_index}", tags=all_tags)
    run_id = run.info.run_id
    ts = 0
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), ts, round_index) for k, v in metrics.items() if v == v],
        params=[Param(k, str(v)[:6000]) for k, v in params.items()],
        tags=[RunTag(k, str(v)) for k, v in all_tags.items()],
    )
    _log_label_snapshot(client, run_id, concept, model_dir)
    with tempfile.TemporaryDirectory(prefix="agile-mlflow-model-") as tmp:
        save_pyfunc(Path(tmp) / "model", Path(model_dir), encoder_spec=encoder_spec,
                    embedding_model=embedding_model, input_example=_input_example(model_dir))
        client.log_artifacts(run_id, str(Path(tmp) / "model"), artifact_path="model")
    client.set_terminated(run_id)
    name = registered_model_name(concept, client)
    try:
        client.create_registered_model(name, tags={"agile/concept": concept}, description=(
            f"Agile Modeling classifier for {concept!r}: P(concept) for images or embeddings. "
            "Aliases: latest (newest version), champion (best on the merged eval set)."))
    except MlflowException:
        pass  # exists
    mv = client.create_model_version(
        name, source=f"runs:/{run_id}/model", run_id=run_id, tags=all_tags,
        description=f"{concept}: round {round_index} (Model {round_index + 1} in the app)",
    )
    # (``latest`` needs no alias: MLflow reserves it, ``models:/NAME/latest`` is the newest)
    if "champion" not in client.get_registered_model(name).aliases:
        client.set_registered_model_alias(name, "champion", str(mv.version))  # the first model
    return LoggedModel(run_id=run_id, version=str(mv.version), name=name,
                       artifact_uri=f"{run.info.artifact_uri}/model")


def _input_example(model_dir: Path) -> Any:
    """One zero embedding of the classifier's width: an example that needs no image file."""
    import json

    try:
        dim = int(json.loads((Path(model_dir) / "meta.json").read_text())["input_dim"])
    except (OSError, KeyError, ValueError, TypeError):
        return None
    import pandas as pd

    return pd.DataFrame({"embedding": [[0.0] * dim]})


def _log_label_snapshot(client: Any, run_id: str, concept: str, model_dir: Path) -> None:
    """The labels the model was trained on (``training_labels.json``) as the run's training
    dataset input, named by concept and label cutoff."""
    import json

    import mlflow.data
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag

    path = Path(model_dir) / "training_labels.json"
    if not path.exists():
        return
    snap = json.loads(path.read_text())
    labels = dict(snap.get("labels") or {})
    df = pd.DataFrame({"image_id": list(labels), "label": [float(v) for v in labels.values()]})
    import warnings

    with warnings.catch_warnings():  # MLflow registers its local-file source class twice
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        ds = mlflow.data.from_pandas(df, source=str(path.resolve()), targets="label",
                                     name=f"{concept}-labels@{snap.get('label_cutoff', 0)}")
    client.log_inputs(run_id, datasets=[DatasetInput(
        ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "training")])])


def champion_after(current: str | None, newest: str | None, auc_pr: Mapping[str, float]) -> str | None:
    """The champion rule (README, "Using a classifier"): with no eval ratings yet (``auc_pr``
    empty) the champion is the newest version; with them, a version newer than the champion
    takes its place only with a strictly higher AUC-PR on the merged eval set, and an older
    version never takes it back. ``auc_pr`` maps version -> AUC-PR (NaN ignored)."""
    scored = {str(v): float(a) for v, a in auc_pr.items() if a == a}
    if not scored:
        return newest or current
    if current is None:
        return max(sorted(scored, key=int), key=lambda v: scored[v])
    best = current
    for v in sorted(scored, key=int):
        if int(v) > int(best) and scored[v] > scored.get(best, float("-inf")):
            best = v
    return best


def choose_champion(tracking_uri: str, concept: str, auc_pr: Mapping[str, float]) -> str | None:
    """Move the registered model's ``champion`` alias by :func:`champion_after`; returns it."""
    client = _client(tracking_uri)
    name = registered_model_name(concept, client)
    try:
        found = dict(client.get_registered_model(name).aliases).get("champion")
    except Exception:
        return None  # nothing registered yet
    current = None if found is None else str(found)
    best = champion_after(current, newest_version(client, name), auc_pr)
    if best is not None and best != current:
        client.set_registered_model_alias(name, "champion", str(best))
    return best


def load_classifier_model(tracking_uri: str, concept: str, *, version: str | int | None = None,
                          alias: str = "champion") -> tuple[Any, str]:
    """The concept's registered MLflow model (a pyfunc: :mod:`.mlflow_model`) by version, or by
    alias; returns ``(model, model URI)``."""
    import mlflow
    import mlflow.pyfunc

    client = _client(tracking_uri)  # the embedded store exists and MLflow's logs are quiet
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    name = registered_model_name(concept, client)
    if version is not None:
        uri = f"models:/{name}/{version}"
    elif alias == "latest":  # MLflow's own: the newest version
        uri = f"models:/{name}/latest"
    else:
        uri = f"models:/{name}@{alias}"
    return mlflow.pyfunc.load_model(uri), uri


def newest_version(client: Any, name: str) -> str | None:
    versions = client.search_model_versions(f"name = '{name}'")
    return str(max(int(v.version) for v in versions)) if versions else None


def version_for_alias(tracking_uri: str, concept: str, alias: str) -> str | None:
    """The version an alias points at (``latest``: the newest version), or ``None``."""
    client = _client(tracking_uri)
    name = registered_model_name(concept, client)
    try:
        if alias == "latest":
            return newest_version(client, name)
        return str(client.get_model_version_by_alias(name, alias).version)
    except Exception:
        return None


def ui_links(tracking_uri: str, run_id: str, concept: str, version: str | None,
             ui_url: str | None = None) -> dict[str, str]:
    """Links into the MLflow UI (``AGILE_MLFLOW_UI_URL``, default ``http://127.0.0.1:5000``,
    what ``mlflow ui`` serves) for a round's run and its registered model version."""
    ui = (ui_url or os.environ.get("AGILE_MLFLOW_UI_URL") or "http://127.0.0.1:5000").rstrip("/")
    client = _client(tracking_uri)
    exp_id = client.get_run(run_id).info.experiment_id
    links = {"mlflow_run": f"{ui}/#/experiments/{exp_id}/runs/{run_id}"}
    if version:
        links["mlflow_model_version"] = f"{ui}/#/models/{registered_model_name(concept, client)}/versions/{version}"
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
        versions = client.search_model_versions(f"name = '{registered_model_name(concept, client)}'")
    except Exception:
        return []
    return sorted(
        ({"version": v.version, "run_id": v.run_id, "tags": dict(v.tags), "source": v.source,
          "aliases": list(v.aliases)} for v in versions),
        key=lambda d: int(d["version"]),
    )
