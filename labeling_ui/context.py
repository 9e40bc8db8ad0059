"""What every part of the app's backend shares: the data directory's resources, and the input
checks more than one part applies.

:class:`ServiceContext` holds the state store, the data directory and the encoder spec, and is
the one place that builds the embedding model and the vector store (lazily, on first use, so
the app starts without loading either). The parts of the backend (:mod:`labeling_ui.ratings`,
:mod:`labeling_ui.rounds`, :mod:`labeling_ui.export`, :mod:`labeling_ui.exemplar_search`)
receive it from :class:`~labeling_ui.service.LabelingService`.
"""

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from agile_pipeline.lib.state import StateError, StateStore
from agile_pipeline.settings import Paths
from labeling_ui.config import valid_rater_name

if TYPE_CHECKING:
    from agile_pipeline.lib.encoders import ImageTextEncoder
    from agile_pipeline.lib.vectors import VectorStore

IMAGE_ID = re.compile(r"^[0-9a-f]{32}\Z")


def check_rater(rater: str | None) -> str:
    """The rater's name, stripped; :class:`StateError` when it is missing or not a valid name."""
    name = (rater or "").strip()
    if not name or not valid_rater_name(name):
        raise StateError(
            "tell us your name first (1-64 letters, digits, spaces or .@'-_): every rating is "
            "stored under the name of the person who made it"
        )
    return name


@dataclass
class ServiceContext:
    """The shared resources of one app process: ``store`` (the multi-process-safe state store),
    ``home`` (the data directory) and ``encoder_spec`` (the embedding model of the corpus).

    :meth:`encoder` and :meth:`vectors` build the embedding model and the vector store on first
    use and keep them; a build that fails raises and is tried again on the next call.
    """

    store: StateStore
    home: Path
    encoder_spec: str = "bundled"
    paths: Paths = field(init=False)
    _encoder: "ImageTextEncoder | None" = field(default=None, init=False, repr=False)
    _vectors: "VectorStore | None" = field(default=None, init=False, repr=False)
    _encoder_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _vectors_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self.home = Path(self.home)
        self.paths = Paths(self.home)

    def encoder(self) -> "ImageTextEncoder":
        """The embedding model named by ``encoder_spec`` (loaded on first use)."""
        with self._encoder_lock:
            if self._encoder is None:
                from agile_pipeline.lib.encoders import load_encoder

                self._encoder = load_encoder(self.encoder_spec)
            return self._encoder

    def vectors(self) -> "VectorStore":
        """The image embeddings of the data directory (opened on first use)."""
        with self._vectors_lock:
            if self._vectors is None:
                from agile_pipeline.lib.vectors import VectorStore

                self._vectors = VectorStore(self.paths.lancedb, cache_dir=self.paths.cache)
            return self._vectors
