"""Export: a trained round's model files as a download, and the evaluation's results (the
``metrics.json`` report and the ``metrics.png`` plot the pipeline writes) for the Model tab.
"""

import io
import json
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agile_pipeline.lib.state import Concept, StateError
from labeling_ui.context import ServiceContext
from labeling_ui.rounds import Rounds


def concept_dir_name(concept: str) -> str:
    return concept.replace(" ", "_")


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
            raise StateError(f"the files of round {round_index} are missing ({model_dir})")
        row = next(r for r in self._rounds.rounds_table(c.name) if r["round"] == round_index)
        embedding = "unknown"
        labels_file = model_dir / "training_labels.json"
        if labels_file.is_file():
            try:
                embedding = json.loads(labels_file.read_text()).get("embedding_model", embedding)
            except (OSError, json.JSONDecodeError):
                pass
        base = f"{concept_dir_name(c.name)}-round-{round_index:03d}"
        readme = export_readme(c, round_index, row, embedding, self.encoder_spec, base)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for p in sorted(model_dir.iterdir()):
                if p.is_file() and not p.is_symlink() and not p.name.startswith("."):
                    zf.write(p, f"{base}/{p.name}")
            zf.writestr(f"{base}/README.md", readme)
            zf.writestr(f"{base}/classifier.json", json.dumps({
                "concept": c.name, "round": round_index, "embedding_model": embedding,
                "encoder_spec": self.encoder_spec, "threshold": 0.5, "model_version": row["model_version"],
                "mlflow_run_id": row["mlflow_run_id"], "positive_labels": row["positive"],
                "negative_labels": row["negative"],
            }, indent=2))
        return f"{base}.zip", buf.getvalue()

    def metrics_report(self, concept: str) -> tuple[dict[str, Any] | None, float | None]:
        """The latest evaluation's ``metrics.json`` (written by ``model_metrics``) and its
        modification time, or ``(None, None)`` before the first evaluation."""
        c = self.store.get_concept(concept)
        p = self.home / "concepts" / concept_dir_name(c.name) / "metrics.json"
        try:
            return json.loads(p.read_text()), p.stat().st_mtime
        except (OSError, json.JSONDecodeError):
            return None, None

    def metrics_png(self, concept: str) -> Path | None:
        """The evaluation plot another part of the pipeline writes, if it exists."""
        c = self.store.get_concept(concept)
        p = self.home / "concepts" / concept_dir_name(c.name) / "metrics.png"
        return p if p.is_file() and not p.is_symlink() else None


def load_snippet(concept: str, tracking_uri: str) -> str:
    """Python that scores images with the concept's champion model through MLflow (any MLflow
    tool can load it the same way: ``mlflow models predict``, ``spark_udf``, ...)."""
    from agile_pipeline.lib.tracking import registered_model_name

    return (
        "import mlflow, pandas as pd\n"
        f"mlflow.set_tracking_uri({tracking_uri!r})\n"
        f"model = mlflow.pyfunc.load_model('models:/{registered_model_name(concept)}@champion')\n"
        "model.predict(pd.DataFrame({'image': ['photo.jpg', 'a/folder/of/images']}))\n"
        "# -> image, probability (P(concept)), is_concept (>= 0.5), error"
    )


def export_readme(
    c: Concept, round_index: int, row: Mapping[str, Any], embedding: str, spec: str, base: str
) -> str:
    return f"""# Classifier for "{c.name}" (round {round_index})

Trained by Agile Modeling on {row['positive']} positive and {row['negative']} negative ratings
(MLflow model version {row['model_version'] or 'n/a'}, run {row['mlflow_run_id'] or 'n/a'}).

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
