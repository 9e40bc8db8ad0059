"""Where state lives and the paper's defaults.

Everything the product keeps lives under one data directory, picked by ``AGILE_HOME``
(default ``./.agile``). Nothing here reads the environment at import time: call
:func:`data_home` when a path is needed.
"""

import errno
import os
import sqlite3
import tempfile
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


DEFAULT_ENCODER = "bundled"


def default_encoder_spec() -> str:
    """The embedding model spec (``$AGILE_ENCODER`` or ``bundled``): ``bundled``,
    ``open_clip:MODEL:PRETRAINED``, ``random:DIM`` (see :func:`agile_pipeline.lib.encoders.parse_spec`).
    The one place the environment picks the encoder; the Dagster definitions and the app pass
    the value on as configuration."""
    return os.environ.get("AGILE_ENCODER", DEFAULT_ENCODER)


def dagster_ui_url() -> str:
    """The Dagster webserver's address (``$AGILE_DAGSTER_URL``, default what the quickstart
    serves), for links from MLflow runs back to the Dagster runs that made them."""
    return os.environ.get("AGILE_DAGSTER_URL", "http://127.0.0.1:3000").rstrip("/")


ASSET_GROUPS = ("corpus", "concept", "evaluation")
"""The asset groups of the code location, in the order the lineage shows them."""


def dagster_lineage_url(base: str | None = None) -> str:
    """The Dagster UI's global lineage with every asset group open (it opens them collapsed when
    there is more than one group; ``?expanded=`` is how the UI itself records open groups)."""
    from urllib.parse import quote

    groups = ",".join(f"global@global:{g}" for g in ASSET_GROUPS)
    return f"{(base or dagster_ui_url()).rstrip('/')}/asset-groups?expanded={quote(groups, safe='')}"


@dataclass(frozen=True)
class Paths:
    """Layout of the data directory (``home`` is made absolute: MLflow artifact URIs and
    subprocesses started elsewhere need it so)."""

    home: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "home", Path(self.home).expanduser().resolve())

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


# ---- data-directory faults ---------------------------------------------------------------
class DataDirError(RuntimeError):
    """The data directory (or a file in it) cannot be used; the message names the path and
    says what to do. The CLI prints it as one line."""


_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NOT_A_FOLDER = {errno.ENOTDIR, errno.EEXIST}


def explain_os_error(exc: OSError, where: Path | str) -> str:
    """One line naming the path and what to do, for an OSError met while writing ``where``."""
    path = exc.filename or where
    why = exc.strerror or str(exc)
    if exc.errno in _NOT_WRITABLE:
        return (f"data directory {where} is not writable ({path}: {why}): fix its permissions "
                "or set AGILE_HOME to a writable folder")
    if exc.errno in _NO_SPACE:
        return (f"no space to write in data directory {where} ({path}: {why}): free disk space "
                "(or raise the file-size limit) or set AGILE_HOME to a folder on another disk")
    if exc.errno in _NOT_A_FOLDER:
        return (f"data directory {where} cannot be created: {path} is a file, not a folder "
                "(move it away or set AGILE_HOME to a folder)")
    return f"cannot use data directory {where} ({path}: {why}): set AGILE_HOME to a writable folder"


def explain_sqlite_error(exc: sqlite3.Error, db: Path | str) -> str | None:
    """One line for a storage fault of the state database (full disk, read-only, I/O error);
    ``None`` for errors that are not about the storage (bugs should keep their traceback)."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc)
    if name.startswith("SQLITE_FULL") or "disk is full" in text:
        what = "the disk is full"
    elif name.startswith("SQLITE_IOERR") or "disk I/O error" in text:
        what = f"a disk I/O error ({name or text}): the disk may be full or the file-size limit reached"
    elif name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM")) or "readonly" in text \
            or "unable to open" in text:
        what = f"it cannot be written ({text})"
    else:
        return None
    return (f"writing {db} failed: {what}. The change was rolled back; free disk space, fix the "
            "folder's permissions or set AGILE_HOME to another folder, then retry")


def check_data_dir(p: Paths) -> Paths:
    """Create the data directory's layout and prove it is writable (a real file is written and
    removed). Raises :class:`DataDirError` with a one-line message naming the path."""
    home = p.home
    if home.exists() and not home.is_dir():
        raise DataDirError(f"data directory {home} is a file, not a folder: move it away or set "
                           "AGILE_HOME to a folder")
    try:
        p.ensure()
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=home)
        try:
            os.write(fd, b"agile write test\n")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        if exc.filename and Path(exc.filename).name.startswith(".write-test-"):
            exc.filename = str(home)  # name the folder, not the probe file
        raise DataDirError(explain_os_error(exc, home)) from exc
    return p


# ---- the paper's defaults (section 3.2, 4.2, appendix C) -------------------------------
EXPANSION_PER_PHRASE = 100
EXPANSION_SAMPLE = 100
# Share of a recovery batch (no positive yet) drawn uniformly from the unlabeled train images
# instead of the phrases' next-nearest ones: when the words miss the concept, nearer neighbours
# of the same words keep missing it. Measured with `agile simulate` (README, issue 9).
RECOVERY_RANDOM_SHARE = 0.5
AL_BATCH = 100


POOL_K = 100
"""SEALS candidate pool (lib/candidate_pool.py): neighbours added per labelled image, phrase and exemplar."""
POOL_RANDOM = 2000
"""Unlabelled train images outside the pool scored each pooled round too, drawn uniformly."""
POOL_SWEEP = 20_000
"""The most uncertain unlabelled train images under a pooled round's model, from one scan of the
whole split that runs after the batch is committed (while the rater rates it); the next pooled
round scores them too. What lets the pool find a mode of the concept near nothing labelled
(``scripts/pool_blind_spot.py``: 20,000 found it about two rounds sooner than 2,000 on 3 seeds at
1M, for +0.09 s of pooled selection; BENCHMARKS.md, "The pool's sweep"); 0 turns the sweep off."""
POOL_MIN_TRAIN_ROWS = 2_500_000
"""``auto``: below this many train rows (a ~5M-image corpus) every round scans the whole split,
the paper's protocol: there a full scan costs under ~3.5 s even on a 2-core AVX2 box, and at
1M the pool was seen to miss a second mode of the planted concept that the full scan found
after 10 rounds (BENCHMARKS.md)."""


def candidate_pool_mode() -> str:
    """``AGILE_CANDIDATE_POOL``: ``auto`` (default: the SEALS pool on large corpora only),
    ``on`` or ``off`` (every round scans the whole train split, the paper's protocol);
    see :mod:`agile_pipeline.lib.candidate_pool`."""
    return os.environ.get("AGILE_CANDIDATE_POOL", "auto").strip().lower() or "auto"


PROPAGATION_MAX_IMAGES = 50_000
"""``AGILE_PROPAGATION=auto``: corpus scores by label propagation (:mod:`agile_pipeline.lib.corpus_scores`)
up to this many embedded images. Its graph is exact (every image against every other, once per
table version): BENCHMARKS.md, "Corpus scores", measures its build time."""

PROPAGATION_ROUND_BUILD_IMAGES = 5_000
"""A round that finds no graph for the current table version builds it only up to this many
images (~0.3 s on the development box); above, the corpus job's ``neighbour_graph`` asset and the
app's warm-up build it, off the rater's path, and the round trains without graph positives."""


def propagation_mode() -> str:
    """``AGILE_PROPAGATION``: ``auto`` (default: the corpus's own images are scored by label
    propagation over its kNN graph, where the graph's rated neighbours agree, up to
    :data:`PROPAGATION_MAX_IMAGES` images), ``on`` (at any size) or ``off`` (the model file's
    scores everywhere)."""
    value = os.environ.get("AGILE_PROPAGATION", "auto").strip().lower() or "auto"
    if value not in ("auto", "on", "off"):
        raise ValueError(f"AGILE_PROPAGATION={value!r}: use auto, on or off")
    return value


MODEL_FAMILIES = ("auto", "cv", "paper", "mlp", "linear", "ensemble", "kernel", "mlp+kernel")


def model_family() -> str:
    """``AGILE_MODEL_FAMILY``: which classifier a round trains. ``auto`` (default) picks, per
    concept and round, the kernel machine on the rated images or the MLP by the near-duplicate
    agreement of the ratings; ``cv`` picks the MLP, a ridge logistic regression or their ensemble
    by cross-validation on the labels; ``paper`` is the paper's recipe exactly (its MLP,
    learning rate 1e-4, no choice); ``mlp``, ``linear``, ``ensemble``, ``kernel`` and
    ``mlp+kernel`` force a family. See :mod:`agile_pipeline.lib.model_choice`."""
    value = os.environ.get("AGILE_MODEL_FAMILY", "auto").strip().lower() or "auto"
    if value not in MODEL_FAMILIES:
        raise ValueError(f"AGILE_MODEL_FAMILY={value!r}: use one of {', '.join(MODEL_FAMILIES)}")
    return value


AL_ROUNDS = 5
EVAL_STRATA = 10
EVAL_PER_STRATUM = 20
RANDOM_NEGATIVES = 500_000
TRAIN_FRACTION = 0.5
