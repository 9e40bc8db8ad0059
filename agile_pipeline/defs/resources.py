"""The Dagster resources, one per role: the state store, the vector store, the encoder.

``state`` (:class:`StateResource`) and ``vectors`` (:class:`VectorsResource`) share the data
directory setting (``home``); ``encoder`` (:class:`EncoderResource`) holds the embedding model
spec, which the definitions take from :func:`agile_pipeline.settings.default_encoder_spec`.
:class:`AgileResources` builds the three for one data directory and binds them by name.
"""

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg
from pydantic import PrivateAttr

from agile_pipeline.lib.state import StateStore
from agile_pipeline.settings import Paths, data_home, default_encoder_spec

if TYPE_CHECKING:  # imported when used: LanceDB and the encoders are not needed to load defs
    from agile_pipeline.lib.encoders import ImageTextEncoder
    from agile_pipeline.lib.vectors import VectorStore


class DataHomeResource(dg.ConfigurableResource):
    """The data directory setting the state and vector resources share (``home``; empty
    means ``$AGILE_HOME`` or ``./.agile``, read when used)."""

    home: str = ""

    @property
    def paths(self) -> Paths:
        return Paths(Path(self.home).expanduser().resolve() if self.home else data_home()).ensure()


class StateResource(DataHomeResource):
    """The state database (concepts, ratings, rounds, the image manifest) and the files kept
    beside it (registered sources, downloaded images, MLflow's store)."""

    _store: Any = PrivateAttr(default=None)

    def store(self) -> StateStore:
        if self._store is None:
            self._store = StateStore(self.paths.state_db)
        return self._store


class VectorsResource(DataHomeResource):
    """The vector store: one LanceDB table per embedding model, and its split caches."""

    split_caches: bool = True  # off: rounds take the straightforward path (a benchmark baseline)

    def vectors(self) -> "VectorStore":
        from agile_pipeline.lib.vectors import VectorStore

        paths = self.paths
        return VectorStore(paths.lancedb, cache_dir=paths.cache, split_caches=self.split_caches)


class EncoderResource(dg.ConfigurableResource):
    """The embedding model, by spec (``bundled``, ``open_clip:NAME:PRETRAINED``, ``random:DIM``)."""

    spec: str

    def load(self) -> "ImageTextEncoder":
        """The loaded encoder (cached per spec by :func:`~agile_pipeline.lib.encoders.load_encoder`)."""
        from agile_pipeline.lib.encoders import load_encoder

        return load_encoder(self.spec)

    def model_id(self) -> str:
        """The embedding model id without loading weights where the spec allows it."""
        from agile_pipeline.lib.encoders import model_id_for_spec

        return model_id_for_spec(self.spec) or str(self.load().model_id)


class AgileResources:
    """The three role resources over one data directory, for binding in the definitions and
    for in-process callers (CLI, warm-up, runner). ``home``: the data directory (empty:
    ``$AGILE_HOME`` or ``./.agile``, read when used); ``encoder``: the model spec (empty:
    :func:`~agile_pipeline.settings.default_encoder_spec`, read now); ``split_caches=False``
    runs rounds without the split caches (the benchmarks' baseline)."""

    def __init__(self, home: str = "", encoder: str = "", *, split_caches: bool = True) -> None:
        self.state = StateResource(home=home)
        self.vectors = VectorsResource(home=home, split_caches=split_caches)
        self.encoder = EncoderResource(spec=encoder or default_encoder_spec())

    @property
    def paths(self) -> Paths:
        return self.state.paths

    def as_dict(self) -> dict[str, dg.ConfigurableResource]:
        """The resources by the keys the assets name them with."""
        return {"state": self.state, "vectors": self.vectors, "encoder": self.encoder}

    def __repr__(self) -> str:
        return f"AgileResources(home={self.state.home!r}, encoder={self.encoder.spec!r})"


def quiet_third_party_logs() -> None:
    for name in ("lance", "lancedb", "alembic", "mlflow", "urllib3", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
