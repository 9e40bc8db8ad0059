"""Where state lives and the paper's defaults.

Everything the product keeps lives under one data directory, picked by ``AGILE_HOME``
(default ``./.agile``). Nothing here reads the environment at import time: call
:func:`data_home` when a path is needed.
"""

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOME = ".agile"

# Keys for keyed SipHash-2-4 (16 bytes each). They only need to be fixed, not secret:
# they make the train/test split and the eval-set order reproducible across machines.
SPLIT_KEY = b"agile-split-key!"
EVAL_KEY = b"agile-evalset-k!"


def data_home() -> Path:
    """The data directory (``$AGILE_HOME`` or ``./.agile``), absolute, created on demand."""
    home = Path(os.environ.get("AGILE_HOME", DEFAULT_HOME)).expanduser().resolve()
    return home


@dataclass(frozen=True)
class Paths:
    """Layout of the data directory."""

    home: Path

    @property
    def lancedb(self) -> Path:
        return self.home / "lancedb"

    @property
    def state_db(self) -> Path:
        """SQLite (WAL) file with concepts, label events and round outputs."""
        return self.home / "agile.sqlite"

    @property
    def blobs(self) -> Path:
        """Downloaded images (URL sources), stored by content hash."""
        return self.home / "blobs"

    @property
    def mlflow_db(self) -> Path:
        return self.home / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.home / "mlartifacts"

    @property
    def cache(self) -> Path:
        return self.home / "cache"

    @property
    def sources_file(self) -> Path:
        """JSON list of registered corpus sources (what the schedule and sensor refresh)."""
        return self.home / "sources.json"

    def ensure(self) -> "Paths":
        for p in (self.home, self.lancedb, self.blobs, self.mlflow_artifacts, self.cache):
            p.mkdir(parents=True, exist_ok=True)
        return self

    def mlflow_uri(self) -> str:
        """Tracking URI: ``$AGILE_MLFLOW_URI`` if set (a server), else the local sqlite store."""
        return os.environ.get("AGILE_MLFLOW_URI") or f"sqlite:///{self.mlflow_db}"


def paths() -> Paths:
    return Paths(data_home())


# ---- the paper's defaults (section 3.2, 4.2, appendix C) -------------------------------
EXPANSION_PER_PHRASE = 100
EXPANSION_SAMPLE = 100
AL_BATCH = 100
AL_ROUNDS = 5
EVAL_STRATA = 10
EVAL_PER_STRATUM = 20
RANDOM_NEGATIVES = 500_000
TRAIN_FRACTION = 0.5
