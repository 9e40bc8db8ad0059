"""The one resource every asset uses: where state lives and which embedding model runs."""

import logging
import os
from typing import Any

import dagster as dg
from pydantic import PrivateAttr

from agile_pipeline.lib.state import StateStore
from agile_pipeline.settings import Paths, data_home


class AgileHome(dg.ConfigurableResource):
    """The data directory (``home``; empty means ``$AGILE_HOME`` or ``./.agile``) and the
    embedding model spec (``encoder``: ``bundled``, ``open_clip:NAME:PRETRAINED`` ...)."""

    home: str = ""
    encoder: str = ""

    _store: Any = PrivateAttr(default=None)

    @property
    def paths(self) -> Paths:
        from pathlib import Path

        return Paths(Path(self.home).expanduser().resolve() if self.home else data_home()).ensure()

    @property
    def encoder_spec(self) -> str:
        return self.encoder or os.environ.get("AGILE_ENCODER", "bundled")

    def state(self) -> StateStore:
        if self._store is None:
            self._store = StateStore(self.paths.state_db)
        return self._store

    def vectors(self):  # type: ignore[no-untyped-def]
        from agile_pipeline.lib.vectors import VectorStore

        return VectorStore(self.paths.lancedb, cache_dir=self.paths.cache)

    def load_encoder(self):  # type: ignore[no-untyped-def]
        from agile_pipeline.lib.encoders import load_encoder

        return load_encoder(self.encoder_spec)

    def model_id(self) -> str:
        """The embedding model id without loading weights where the spec allows it."""
        from agile_pipeline.lib.encoders import load_encoder, model_id_for_spec

        return model_id_for_spec(self.encoder_spec) or str(load_encoder(self.encoder_spec).model_id)


def quiet_third_party_logs() -> None:
    for name in ("lance", "lancedb", "alembic", "mlflow", "urllib3", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
