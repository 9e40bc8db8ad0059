"""The code MLflow runs to load a concept classifier (MLflow's "models from code"): it is copied
into every registered model and names :class:`~agile_pipeline.lib.mlflow_model.ConceptClassifier`
as the model, so nothing is pickled (no CloudPickle warning, no object deserialised on load)."""

import mlflow

from agile_pipeline.lib.mlflow_model import ConceptClassifier

mlflow.models.set_model(ConceptClassifier())
