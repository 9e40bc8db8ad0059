"""Export: a trained round's model files as a download, and the evaluation's results (the
``metrics.json`` report and the ``metrics.png`` plot the pipeline writes) for the Model tab.
"""

import io
import json
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agile_pipeline.lib.state import (
    Concept,
    StateError,
    concept_dir,
    concept_slug,
    concept_storage_key,
)
from labeling_ui.context import ServiceContext
from labeling_ui.rounds import Rounds


def concept_dir_name(concept: str) -> str:
    """The name of the concept's folder under ``concepts/`` (and of its predictions table):
    :func:`~agile_pipeline.lib.state.concept_storage_key`, the one mapping every caller uses."""
    return concept_storage_key(concept)


class ModelExport:
    """A concept's trained models as files, and its evaluation results.

    ``rounds`` gives each round's facts (counts, MLflow version) for the export's README.
    """

    def __init__(self, ctx: ServiceContext, rounds: Rounds) -> None:
        self.store = ctx.store
        self.home = ctx.home
        self.encoder_spec = ctx.encoder_spec
        self.tracking_uri = ctx.paths.mlflow_uri()
        self._rounds = rounds

    def model_dir(self, concept: str, round_index: int) -> Path:
        c = self.store.get_concept(concept)
        for r in self.store.rounds(c.name):
            if int(r["round"]) == round_index and r["model_uri"]:
                return Path(r["model_uri"])
        raise StateError(f"{c.name!r} has no trained round {round_index}")

    def export_zip(self, concept: str, round_index: int) -> tuple[str, bytes]:
        """A zip with the round's model files and a README saying how to apply it."""
        c = self.store.get_concept(concept)
        model_dir = self.model_dir(c.name, round_index)
        if not model_dir.is_dir():
            raise StateError(f"the files of round {round_index} are missing ({public_path(str(model_dir), self.home)})")
        row = next(r for r in self._rounds.rounds_table(c.name) if r["round"] == round_index)
        embedding = "unknown"
        labels_file = model_dir / "training_labels.json"
        if labels_file.is_file():
            try:
                embedding = json.loads(labels_file.read_text()).get("embedding_model", embedding)
            except (OSError, json.JSONDecodeError):
                pass
        # a download name, not storage: the model's one name, "Model N" in the app and MLflow
        base = f"{concept_slug(c.name)}-model-{round_index + 1}"
        spec = public_spec(self.encoder_spec, self.home)  # no server path in the download
        readme = export_readme(c, round_index, row, embedding, spec, base)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for p in sorted(model_dir.iterdir()):
                if p.is_file() and not p.is_symlink() and not p.name.startswith("."):
                    zf.write(p, f"{base}/{p.name}")
            zf.writestr(f"{base}/README.md", readme)
            zf.writestr(f"{base}/classifier.json", json.dumps({
                "concept": c.name, "model": f"Model {round_index + 1}", "round": round_index,
                "embedding_model": embedding,
                "encoder_spec": spec, "threshold": 0.5, "model_version": row["model_version"],
                "mlflow_run_id": row["mlflow_run_id"], "positive_labels": row["positive"],
                "negative_labels": row["negative"],
            }, indent=2))
        return f"{base}.zip", buf.getvalue()

    def metrics_report(self, concept: str) -> tuple[dict[str, Any] | None, float | None]:
        """The latest evaluation's ``metrics.json`` (written by ``model_metrics``) and its
        modification time, or ``(None, None)`` before the first evaluation."""
        c = self.store.get_concept(concept)
        p = concept_dir(self.store, self.home, c.name, create=False) / "metrics.json"
        try:
            return json.loads(p.read_text()), p.stat().st_mtime
        except (OSError, json.JSONDecodeError):
            return None, None

    def metrics_png(self, concept: str) -> Path | None:
        """The evaluation plot another part of the pipeline writes, if it exists."""
        c = self.store.get_concept(concept)
        p = concept_dir(self.store, self.home, c.name, create=False) / "metrics.png"
        return p if p.is_file() and not p.is_symlink() else None


def public_path(path: str, home: Path | None) -> str:
    """A server path as shown to raters: ``$AGILE_HOME/...`` inside the data directory, relative
    inside the app's working directory, else ``PATH/TO/<name>`` (never the absolute path)."""
    p = Path(path)
    if not p.is_absolute():
        return path
    for base, prefix in ((home, "$AGILE_HOME/"), (Path.cwd(), "")):
        if base is None:
            continue
        try:
            return prefix + p.resolve().relative_to(Path(base).resolve()).as_posix()
        except (ValueError, OSError):
            continue
    return f"PATH/TO/{p.name}"


def public_spec(spec: str, home: Path | None) -> str:
    """An encoder spec as shown in an export: a local checkpoint path in it (``open_clip:MODEL:
    /path/ckpt.pt``) through :func:`public_path`."""
    parts = spec.split(":")
    return ":".join(public_path(x, home) if x.startswith(("/", "~")) else x for x in parts)


def public_tracking_uri(tracking_uri: str, home: Path | None) -> str:
    """Python for the tracking URI in :func:`load_snippet`: a local store's path through
    :func:`public_path` (``$AGILE_HOME`` expanded by ``os.path.expandvars``), a server's URL
    without credentials."""
    from urllib.parse import urlsplit, urlunsplit

    for scheme in ("sqlite:///", "file://"):
        if tracking_uri.startswith(scheme) and Path(tracking_uri[len(scheme):]).is_absolute():
            shown = scheme + public_path(tracking_uri[len(scheme):], home)
            return f"os.path.expandvars({shown!r})" if "$AGILE_HOME" in shown else repr(shown)
    if Path(tracking_uri).is_absolute():  # a bare path
        shown = public_path(tracking_uri, home)
        return f"os.path.expandvars({shown!r})" if "$AGILE_HOME" in shown else repr(shown)
    parts = urlsplit(tracking_uri)
    if parts.netloc and "@" in parts.netloc:
        parts = parts._replace(netloc=parts.netloc.rsplit("@", 1)[1])
    return repr(urlunsplit(parts))


def load_snippet(concept: str, tracking_uri: str, *, home: Path | None = None,
                 registered_model: str | None = None) -> str:
    """Python that scores images with the concept's champion model through MLflow (any MLflow
    tool can load it the same way: ``mlflow models predict``, ``spark_udf``, ...). The tracking
    store's path is written relative to ``$AGILE_HOME`` (the data directory, ``home``), never as
    the server's absolute path."""
    from agile_pipeline.lib.tracking import registered_model_name

    # the name the round was registered under (recorded with the round), else the rule's
    name = registered_model or registered_model_name(concept)
    uri = public_tracking_uri(tracking_uri, home)
    return (
        ("import os, mlflow, pandas as pd\n# $AGILE_HOME: the app's data directory\n"
         if uri.startswith("os.") else "import mlflow, pandas as pd\n")
        + f"mlflow.set_tracking_uri({uri})\n"
        f"model = mlflow.pyfunc.load_model('models:/{name}@champion')\n"
        "model.predict(pd.DataFrame({'image': ['photo.jpg', 'a/folder/of/images']}))\n"
        "# -> image, probability (P(concept)), is_concept (>= 0.5), error"
    )


def export_readme(
    c: Concept, round_index: int, row: Mapping[str, Any], embedding: str, spec: str, base: str
) -> str:
    return f"""# Classifier for "{c.name}": Model {round_index + 1}

Trained by Agile Modeling on {row['positive']} positive and {row['negative']} negative ratings
(Model {round_index + 1} in the app; in MLflow: model version {row['model_version'] or 'n/a'},
tag `agile/model`, run {row['mlflow_run_id'] or 'n/a'}; round {round_index} in the data directory).

- Embedding model: `{embedding}` (encoder spec `{spec}`) — the classifier scores image
  *embeddings* from this model; embed new images with the same spec.
- Threshold: **0.5** on the returned probability (P(positive) >= 0.5 means "is {c.name}").
- Files: `model.pt` (PyTorch state dict), `meta.json` (architecture and training facts),
  `training_labels.json` (which labels it was trained on), `classifier.json` (this summary).

## Load and apply

```python
from agile_pipeline.lib.encoders import load_encoder
from agile_pipeline.lib.images import load_rgb
from agile_pipeline.lib.training import TrainedClassifier

clf = TrainedClassifier.load("{base}")            # this folder, unzipped
encoder = load_encoder("{spec}")                  # must give model id {embedding}
X = encoder.embed_images([load_rgb("photo.jpg")])
p = clf.predict_proba(X)                            # P(positive) per image
print(p >= 0.5)
```

Positive phrases: {", ".join(p for k, p in c.phrases if k == "positive")}
Negative phrases: {", ".join(c.negatives) or "none"}
"""
