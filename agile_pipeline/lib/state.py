"""The product's transactional state: image manifest, concepts, label events, batches, rounds.

Storage decision (see DESIGN.md hazards): DuckDB allows one writing *process* per file, but
rater sessions, the CLI and Dagster runs all write at once. This state therefore lives in one
SQLite file in WAL mode: any number of processes read and write it concurrently, a writer
waits (``busy_timeout``) instead of failing, and ``synchronous=FULL`` makes a committed label
survive a killed process or a power cut. Bulk vectors live in LanceDB (``vectors.py``).

Every label is an *event* (append-only). Undo is a new event. The effective label of an image
is resolved at read time (:meth:`StateStore.effective_labels`).
"""

import fcntl
import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

LABELS = ("positive", "negative", "skip")
UPLOAD_SPLIT = "upload"
"""Split of images a user uploaded as exemplars (``lib/uploads.py``): labelled and embedded,
but never in the corpus's train or test split (no expansion, AL or eval candidate)."""
PURPOSES = ("train", "eval")
Label = Literal["positive", "negative", "skip"]

_CONCEPT_NAME = re.compile(r"^[a-z0-9][a-z0-9 _\-]{0,62}[a-z0-9]$|^[a-z0-9]$")
_RATER_NAME = re.compile(r"[\w][\w .@'\-]{0,62}[\w.]|\w", re.UNICODE)
MAX_PHRASE_CHARS = 300
MAX_PHRASES = 50

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,
    uri TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    format TEXT NOT NULL,
    n_frames INTEGER NOT NULL DEFAULT 1,
    split TEXT,
    source TEXT NOT NULL,
    ingested_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS images_split ON images(split);
CREATE INDEX IF NOT EXISTS images_path ON images(path);
CREATE TABLE IF NOT EXISTS ingest_log (
    uri TEXT PRIMARY KEY,
    size INTEGER,
    mtime REAL,
    status TEXT NOT NULL,          -- ingested | duplicate | skipped
    reason TEXT,
    image_id TEXT,
    source TEXT NOT NULL,
    seen_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS concepts (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    positives TEXT NOT NULL,
    negatives TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS label_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    concept TEXT NOT NULL REFERENCES concepts(name),
    image_id TEXT NOT NULL REFERENCES images(id),
    label TEXT NOT NULL CHECK (label IN ('positive','negative','skip')),
    rater TEXT NOT NULL,
    ts REAL NOT NULL,
    purpose TEXT NOT NULL CHECK (purpose IN ('train','eval')),
    source TEXT NOT NULL,
    detail TEXT,
    round INTEGER
);
CREATE INDEX IF NOT EXISTS label_events_concept ON label_events(concept, purpose, image_id);
CREATE TABLE IF NOT EXISTS batches (
    batch_id INTEGER PRIMARY KEY AUTOINCREMENT,
    concept TEXT NOT NULL,
    kind TEXT NOT NULL,            -- expansion | al | eval
    round INTEGER NOT NULL,
    created_at REAL NOT NULL,
    label_cutoff INTEGER NOT NULL, -- max label seq the batch was built against
    run_id TEXT,
    info TEXT
);
CREATE INDEX IF NOT EXISTS batches_concept ON batches(concept, kind, batch_id);
CREATE TABLE IF NOT EXISTS batch_items (
    batch_id INTEGER NOT NULL REFERENCES batches(batch_id),
    rank INTEGER NOT NULL,
    image_id TEXT NOT NULL,
    source TEXT NOT NULL,
    detail TEXT,
    score REAL,
    PRIMARY KEY (batch_id, rank)
);
CREATE TABLE IF NOT EXISTS rounds (
    concept TEXT NOT NULL,
    round INTEGER NOT NULL,
    label_cutoff INTEGER NOT NULL,
    run_id TEXT,
    model_uri TEXT,
    model_version TEXT,
    mlflow_run_id TEXT,
    n_pos INTEGER, n_neg INTEGER,
    train_seconds REAL,
    select_seconds REAL,
    info TEXT,
    finished_at REAL NOT NULL,
    PRIMARY KEY (concept, round)
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS concept_members (
    concept TEXT NOT NULL REFERENCES concepts(name),
    user TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('viewer','rater','owner')),
    granted_by TEXT NOT NULL,
    granted_at REAL NOT NULL,
    invite_id TEXT,                -- the invite it came through (access ends when it is revoked)
    PRIMARY KEY (concept, user)
);
CREATE TABLE IF NOT EXISTS concept_invites (
    invite_id TEXT PRIMARY KEY,    -- a public handle; the token itself is never stored
    token_sha256 TEXT NOT NULL UNIQUE,
    concept TEXT NOT NULL REFERENCES concepts(name),
    role TEXT NOT NULL CHECK (role IN ('viewer','rater')),
    note TEXT NOT NULL DEFAULT '',
    created_by TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL,
    revoked_at REAL,
    revoked_by TEXT,
    uses INTEGER NOT NULL DEFAULT 0,
    last_used_at REAL
);
CREATE INDEX IF NOT EXISTS concept_invites_concept ON concept_invites(concept);
CREATE TABLE IF NOT EXISTS exemplars (
    concept TEXT NOT NULL,
    image_id TEXT NOT NULL,
    polarity TEXT NOT NULL CHECK (polarity IN ('positive','negative')),
    added_by TEXT NOT NULL,
    added_at REAL NOT NULL,
    PRIMARY KEY (concept, image_id)
);
"""


class StateError(ValueError):
    """A user-facing error: the message says what is wrong and what to do."""


@dataclass(frozen=True)
class Concept:
    name: str
    owner: str
    description: str
    positives: tuple[str, ...]
    negatives: tuple[str, ...]

    @property
    def phrases(self) -> list[tuple[str, str]]:
        """(polarity, phrase) pairs; the name always leads the positives."""
        pos = [self.name.replace("_", " ").replace("-", " ")]
        pos += [p for p in self.positives if p.lower() != pos[0].lower()]
        return [("positive", p) for p in pos] + [("negative", n) for n in self.negatives]


@dataclass(frozen=True)
class LabelEvent:
    concept: str
    image_id: str
    label: str
    rater: str
    purpose: str = "train"
    source: str = "manual"
    detail: str | None = None
    round: int | None = None
    event_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    ts: float = field(default_factory=time.time)


@dataclass(frozen=True)
class LabelRule:
    """How several raters' labels of one image combine.

    ``owner_wins``: the concept owner's latest label decides when they gave one.
    Otherwise the majority of raters' latest non-skip labels decides; ``tie`` says what a
    tie becomes: ``"drop"`` (no label; default), ``"positive"`` or ``"negative"``.
    """

    owner_wins: bool = True
    tie: Literal["drop", "positive", "negative"] = "drop"

    def describe(self) -> str:
        owner = "the concept owner's label wins; otherwise " if self.owner_wins else ""
        return f"{owner}majority of raters' latest labels; ties: {self.tie}"


def validate_concept_name(name: str) -> str:
    """Normalise and check a concept name; raise :class:`StateError` with advice if unsafe."""
    norm = " ".join(name.strip().lower().split())
    if not norm:
        raise StateError("concept name is empty: give a short name such as 'gourmet tuna'")
    if not _CONCEPT_NAME.match(norm):
        raise StateError(
            f"concept name {name!r} is not allowed: use 1-64 letters, digits, spaces, '-' or '_' "
            "(no slashes, dots, quotes or other symbols), starting and ending with a letter or digit"
        )
    return norm


def valid_rater_name(name: str) -> bool:
    """1-64 letters, digits, spaces and ``.@'-_``; no control characters or slashes.

    The one rule for rater (and owner) names, used by the app and the CLI alike. The whole
    string must match: a trailing newline is not a name character.
    """
    return isinstance(name, str) and _RATER_NAME.fullmatch(name) is not None


def clean_text(raw: str, *, keep_lines: bool = False) -> str:
    """User text with control and format characters removed (the rule phrases and
    instructions share).

    Characters that are neither printable nor whitespace are dropped: control characters
    (NUL, BEL, ESC, so no terminal escape sequence survives as one), format characters such as
    U+202E (right-to-left override) and zero-width marks, unassigned and private-use code
    points. Every other whitespace character becomes a space, except, with ``keep_lines``,
    newlines (``\r\n`` and ``\r`` become ``\n``) and tabs, which multi-line text such as rater
    instructions legitimately uses. Leading and trailing whitespace is stripped.
    """
    text = str(raw)
    if keep_lines:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    out = []
    for ch in text:
        if keep_lines and ch in "\n\t":
            out.append(ch)
        elif ch.isspace():
            out.append(" ")
        elif ch.isprintable():
            out.append(ch)
    return "".join(out).strip()


def clean_instructions(text: str) -> str:
    """Rater instructions cleaned like phrases (:func:`clean_text`), keeping lines and tabs."""
    return clean_text(text, keep_lines=True)


def validate_phrases(phrases: Iterable[str], kind: str) -> tuple[str, ...]:
    """Clean phrases: strip, drop control characters, reject over-long ones."""
    out: list[str] = []
    for raw in phrases:
        cleaned = " ".join(clean_text(raw).split())
        if not cleaned:
            continue
        if len(cleaned) > MAX_PHRASE_CHARS:
            raise StateError(
                f"{kind} phrase is {len(cleaned)} characters long; keep each phrase under "
                f"{MAX_PHRASE_CHARS} characters (describe one visual mode per phrase)"
            )
        if cleaned.lower() not in (o.lower() for o in out):
            out.append(cleaned)
    if len(out) > MAX_PHRASES:
        raise StateError(f"too many {kind} phrases ({len(out)}); at most {MAX_PHRASES}")
    return tuple(out)


# ---- where a concept's files live ----------------------------------------------------------
CONCEPTS_DIR = "concepts"
_KEYED_SINCE = "concept_dirs_keyed_since"  # meta key: when concept folders became keyed


def _norm_name(name: str) -> str:
    return " ".join(str(name).strip().lower().split())


def concept_slug(name: str) -> str:
    """The readable part of a concept's storage key (spaces as ``_``); not unique on its own:
    ``sp ace`` and ``sp_ace`` share it. Also the base name of a model export."""
    return _norm_name(name).replace(" ", "_")


def concept_storage_key(name: str) -> str:
    """THE mapping of a concept name to its storage (folder ``concepts/<key>/`` with its
    rounds, zero-shot scores, eval set, metrics and round lock; ``predictions/<key>.parquet``).

    ``<readable slug>.<8 hex of BLAKE2b of the exact (normalised) name>``, e.g.
    ``sp_ace.1f0c9d2a``: two names that read alike (``sp ace``, ``sp_ace``) get different keys.
    A concept name cannot hold a dot, so a key never equals an old-style folder name
    (:func:`legacy_concept_dir_name`), and :meth:`StateStore.create_concept` refuses a name whose
    key equals an existing concept's, so keys are unique by construction.
    """
    norm = _norm_name(name)
    digest = hashlib.blake2b(norm.encode("utf-8"), digest_size=4).hexdigest()
    return f"{concept_slug(norm)}.{digest}"


def legacy_concept_dir_name(name: str) -> str:
    """The folder name versions before keyed folders used (``name.replace(" ", "_")``), which
    two names could share; only read to migrate such folders (:func:`concept_dir`)."""
    return concept_slug(name)


def _payload(concept: str, image_id: str, label: str, rater: str, purpose: str) -> tuple[str, ...]:
    """What a label event says; a retried event must say the same."""
    return (concept, image_id, label, rater, purpose)


def _reused_event_message(event_id: str, where: str) -> str:
    return (f"event id {event_id[:64]!r} is {where} for a different rating (another rater, "
            "image, label, concept or purpose); nothing was stored: give every rating its own "
            "event id")


class StateStore:
    """Thread- and process-safe access to the SQLite state file.

    One connection per thread; every write is a short ``BEGIN IMMEDIATE`` transaction, and
    label writes are idempotent on ``event_id`` (a retried request never duplicates a label).
    """

    def __init__(self, path: Path, *, busy_timeout_s: float = 60.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._busy_ms = int(busy_timeout_s * 1000)
        self._local = threading.local()
        self._conn().executescript(SCHEMA)  # idempotent; executescript manages its own commit

    # ---- connections ------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        con: sqlite3.Connection | None = getattr(self._local, "con", None)
        if con is None:
            try:
                con = sqlite3.connect(self.path, timeout=self._busy_ms / 1000, isolation_level=None)
            except sqlite3.OperationalError as exc:
                raise StateError(
                    f"cannot open the state database {self.path}: {exc}. Check that AGILE_HOME "
                    "points at a writable directory"
                ) from exc
            con.row_factory = sqlite3.Row
            con.execute(f"PRAGMA busy_timeout={self._busy_ms}")
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")
            con.execute("PRAGMA foreign_keys=ON")
            self._local.con = con
        return con

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        con = self._conn()
        for attempt in range(20):
            try:
                con.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as exc:  # busy beyond busy_timeout: back off
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                time.sleep(min(0.05 * 2**attempt, 2.0))
        else:
            raise StateError(f"the state database {self.path} stayed locked; try again")
        try:
            yield con
            con.execute("COMMIT")
        except BaseException:
            # SQLite may have rolled back already (e.g. SQLITE_FULL): a second ROLLBACK would
            # raise "no transaction is active" and hide the real error
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        return self._conn().execute(sql, params).fetchall()

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None

    # ---- images -----------------------------------------------------------------------
    def known_uris(self, source: str) -> dict[str, tuple[int | None, float | None]]:
        rows = self._read("SELECT uri, size, mtime FROM ingest_log WHERE source = ?", (source,))
        return {r["uri"]: (r["size"], r["mtime"]) for r in rows}

    def has_image(self, image_id: str) -> bool:
        return bool(self._read("SELECT 1 FROM images WHERE id = ?", (image_id,)))

    def record_ingest(
        self,
        images: Sequence[dict[str, Any]],
        log_rows: Sequence[dict[str, Any]],
    ) -> int:
        """Insert new manifest rows (ignoring ids already present) and ingest-log rows.

        Returns the number of images actually inserted (0 for content already present).
        """
        with self._write() as con:
            before = con.total_changes
            con.executemany(
                "INSERT OR IGNORE INTO images (id, uri, path, size, width, height, format, "
                "n_frames, split, source, ingested_at) VALUES (:id, :uri, :path, :size, :width, "
                ":height, :format, :n_frames, :split, :source, :ingested_at)",
                images,
            )
            inserted = con.total_changes - before
            con.executemany(
                "INSERT OR REPLACE INTO ingest_log (uri, size, mtime, status, reason, image_id, "
                "source, seen_at) VALUES (:uri, :size, :mtime, :status, :reason, :image_id, "
                ":source, :seen_at)",
                log_rows,
            )
        return inserted

    def images_without_split(self) -> list[str]:
        return [r["id"] for r in self._read("SELECT id FROM images WHERE split IS NULL")]

    def all_image_splits(self) -> dict[str, str | None]:
        """Split of every *corpus* image (``None``: not assigned yet). Uploaded exemplars
        (split :data:`UPLOAD_SPLIT`) are left out, so the split and embedding assets never
        move them into train or test."""
        rows = self._read("SELECT id, split FROM images WHERE split IS NULL OR split != ?", (UPLOAD_SPLIT,))
        return {r["id"]: r["split"] for r in rows}

    def set_splits(self, assignments: Iterable[tuple[str, str]]) -> int:
        rows = [(split, image_id) for image_id, split in assignments]
        with self._write() as con:
            con.executemany("UPDATE images SET split = ? WHERE id = ?", rows)
        return len(rows)

    def image_rows(self, ids: Sequence[str] | None = None) -> list[sqlite3.Row]:
        if ids is None:
            return self._read("SELECT * FROM images ORDER BY id")
        out: list[sqlite3.Row] = []
        for i in range(0, len(ids), 900):
            chunk = list(ids[i : i + 900])
            marks = ",".join("?" * len(chunk))
            out += self._read(f"SELECT * FROM images WHERE id IN ({marks})", chunk)
        return out

    def image_path(self, image_id: str) -> Path | None:
        rows = self._read("SELECT path FROM images WHERE id = ?", (image_id,))
        return Path(rows[0]["path"]) if rows else None

    def resolve_image(self, ref: str) -> str | None:
        """An image id from an id or a path (absolute, or as ingested)."""
        ref = ref.strip()
        if self.has_image(ref):
            return ref
        for candidate in {ref, str(Path(ref).expanduser().resolve())}:
            rows = self._read("SELECT id FROM images WHERE path = ? OR uri = ?", (candidate, candidate))
            if rows:
                return str(rows[0]["id"])
        rows = self._read(
            "SELECT image_id FROM ingest_log WHERE uri = ? AND image_id IS NOT NULL", (ref,)
        )
        return str(rows[0]["image_id"]) if rows else None

    def count_images(self) -> dict[str, int]:
        rows = self._read("SELECT coalesce(split, 'unassigned') AS s, count(*) AS n FROM images GROUP BY s")
        return {r["s"]: r["n"] for r in rows}

    def ingest_summary(self) -> dict[str, int]:
        rows = self._read(
            "SELECT status || coalesce(':' || reason, '') AS k, count(*) AS n FROM ingest_log GROUP BY k"
        )
        return {r["k"]: r["n"] for r in rows}

    # ---- concepts ---------------------------------------------------------------------
    def create_concept(
        self,
        name: str,
        positives: Iterable[str] = (),
        negatives: Iterable[str] = (),
        *,
        owner: str = "owner",
        description: str = "",
    ) -> Concept:
        name = validate_concept_name(name)
        pos = validate_phrases(positives, "positive")
        neg = validate_phrases(negatives, "negative")
        desc = clean_instructions(description)
        key = concept_storage_key(name)
        now = time.time()
        with self._write() as con:
            if con.execute("SELECT 1 FROM concepts WHERE name = ?", (name,)).fetchone():
                raise StateError(
                    f"concept {name!r} already exists: open it, edit it with "
                    f"`agile concept edit`, or pick another name"
                )
            clash = [r["name"] for r in con.execute("SELECT name FROM concepts")
                     if concept_storage_key(r["name"]) == key]
            if clash:  # a hash collision of two names that read alike: astronomically rare
                raise StateError(
                    f"concept {name!r} would share its storage folder with {clash[0]!r}; "
                    "pick another name"
                )
            # concepts created from now on never had an old-style (shared) folder
            con.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)",
                        (_KEYED_SINCE, repr(now)))
            con.execute(
                "INSERT INTO concepts VALUES (?, ?, ?, ?, ?, ?, ?)",
                (name, owner, desc, json.dumps(pos), json.dumps(neg), now, now),
            )
        return self.get_concept(name)

    def update_concept(
        self,
        name: str,
        *,
        positives: Iterable[str] | None = None,
        negatives: Iterable[str] | None = None,
        description: str | None = None,
    ) -> Concept:
        current = self.get_concept(name)
        pos = validate_phrases(positives, "positive") if positives is not None else current.positives
        neg = validate_phrases(negatives, "negative") if negatives is not None else current.negatives
        desc = clean_instructions(description) if description is not None else current.description
        with self._write() as con:
            con.execute(
                "UPDATE concepts SET positives = ?, negatives = ?, description = ?, updated_at = ? "
                "WHERE name = ?",
                (json.dumps(pos), json.dumps(neg), desc, time.time(), current.name),
            )
        return self.get_concept(current.name)

    def get_concept(self, name: str) -> Concept:
        norm = " ".join(name.strip().lower().split())
        rows = self._read("SELECT * FROM concepts WHERE name = ?", (norm,))
        if not rows:
            known = ", ".join(self.concept_names()) or "none yet"
            raise StateError(
                f"unknown concept {name!r} (known: {known}); create it with "
                f"`agile concept create NAME --pos PHRASE`"
            )
        r = rows[0]
        return Concept(
            r["name"], r["owner"], r["description"], tuple(json.loads(r["positives"])),
            tuple(json.loads(r["negatives"])),
        )

    def concept_names(self) -> list[str]:
        return [r["name"] for r in self._read("SELECT name FROM concepts ORDER BY name")]

    def concept_owners(self) -> dict[str, str]:
        """Every concept's owner, by name (in name order)."""
        return {r["name"]: r["owner"] for r in self._read("SELECT name, owner FROM concepts ORDER BY name")}

    # ---- members and invites (policy: ``lib/access.py``) --------------------------------
    def set_member(self, concept: str, user: str, role: str, *, granted_by: str,
                   invite_id: str | None = None) -> None:
        """Give ``user`` ``role`` on ``concept`` (replacing any role they had there)."""
        c = self.get_concept(concept)
        with self._write() as con:
            con.execute(
                "INSERT OR REPLACE INTO concept_members VALUES (?, ?, ?, ?, ?, ?)",
                (c.name, user, role, granted_by, time.time(), invite_id),
            )

    def remove_member(self, concept: str, user: str) -> bool:
        c = self.get_concept(concept)
        with self._write() as con:
            return con.execute("DELETE FROM concept_members WHERE concept = ? AND user = ?",
                               (c.name, user)).rowcount > 0

    def members(self, concept: str | None = None, *, user: str | None = None) -> list[dict[str, Any]]:
        """Membership rows (with their invite's ``revoked_at``), of one concept or one user."""
        where, params = [], []
        if concept is not None:
            where.append("m.concept = ?")
            params.append(" ".join(concept.strip().lower().split()))
        if user is not None:
            where.append("m.user = ?")
            params.append(user)
        rows = self._read(
            "SELECT m.*, i.revoked_at AS invite_revoked_at FROM concept_members m "
            "LEFT JOIN concept_invites i ON i.invite_id = m.invite_id"
            + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY m.concept, m.granted_at",
            params,
        )
        return [dict(r) for r in rows]

    def create_invite(self, concept: str, role: str, *, token_sha256: str, created_by: str,
                      expires_at: float | None = None, note: str = "") -> dict[str, Any]:
        c = self.get_concept(concept)
        invite_id = uuid.uuid4().hex[:12]
        with self._write() as con:
            con.execute(
                "INSERT INTO concept_invites (invite_id, token_sha256, concept, role, note, created_by, "
                "created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (invite_id, token_sha256, c.name, role, note, created_by, time.time(), expires_at),
            )
        return self.invite(invite_id) or {}

    def invite(self, invite_id: str) -> dict[str, Any] | None:
        rows = self._read("SELECT * FROM concept_invites WHERE invite_id = ?", (invite_id,))
        return dict(rows[0]) if rows else None

    def invite_by_token_sha256(self, digest: str) -> dict[str, Any] | None:
        rows = self._read("SELECT * FROM concept_invites WHERE token_sha256 = ?", (digest,))
        return dict(rows[0]) if rows else None

    def invites(self, concept: str) -> list[dict[str, Any]]:
        c = self.get_concept(concept)
        rows = self._read("SELECT * FROM concept_invites WHERE concept = ? ORDER BY created_at", (c.name,))
        return [dict(r) for r in rows]

    def revoke_invite(self, invite_id: str, *, revoked_by: str) -> bool:
        """Revoke an invite (idempotent); True when it was active until now."""
        with self._write() as con:
            return con.execute(
                "UPDATE concept_invites SET revoked_at = ?, revoked_by = ? "
                "WHERE invite_id = ? AND revoked_at IS NULL", (time.time(), revoked_by, invite_id),
            ).rowcount > 0

    def record_invite_use(self, invite_id: str) -> None:
        with self._write() as con:
            con.execute("UPDATE concept_invites SET uses = uses + 1, last_used_at = ? WHERE invite_id = ?",
                        (time.time(), invite_id))

    # ---- labels -----------------------------------------------------------------------
    def add_labels(self, events: Sequence[LabelEvent]) -> int:
        """Append label events atomically (all or none). Returns how many were new.

        Raises :class:`StateError` for an unknown concept, unknown image, bad label or
        purpose; nothing is written in that case. Re-sending an event (same ``event_id``)
        is a no-op, so clients can retry safely. Event ids are global (not per rater): an
        ``event_id`` already stored (or repeated in ``events``) with a different payload
        (concept, image, label, rater or purpose) is refused with :class:`StateError` and
        nothing is written, so an acknowledgement always means the event is stored.
        """
        if not events:
            return 0
        concepts = set(self.concept_names())
        for e in events:
            if e.label not in LABELS:
                raise StateError(f"label {e.label!r} is not one of {', '.join(LABELS)}")
            if e.purpose not in PURPOSES:
                raise StateError(f"purpose {e.purpose!r} is not one of {', '.join(PURPOSES)}")
            if e.concept not in concepts:
                raise StateError(f"unknown concept {e.concept!r}; create it first")
            if not e.rater.strip():
                raise StateError("a label needs a rater name")
        ids = sorted({e.image_id for e in events})
        known = {r["id"] for r in self.image_rows(ids)}
        missing = [i for i in ids if i not in known]
        if missing:
            raise StateError(
                f"{len(missing)} label(s) name images that are not in the corpus "
                f"(first: {missing[0]!r}); use an image id or path from `agile search` or "
                "`agile candidates`"
            )
        rows = [
            (e.event_id, e.concept, e.image_id, e.label, e.rater.strip(), e.ts, e.purpose,
             e.source, e.detail, e.round)
            for e in events
        ]
        payload: dict[str, tuple[str, ...]] = {}
        for e in events:
            p = _payload(e.concept, e.image_id, e.label, e.rater.strip(), e.purpose)
            if payload.setdefault(e.event_id, p) != p:
                raise StateError(_reused_event_message(e.event_id, "used twice in this request"))
        with self._write() as con:
            ids_ = list(payload)
            for i in range(0, len(ids_), 900):
                chunk = ids_[i : i + 900]
                for r in con.execute(
                    "SELECT event_id, concept, image_id, label, rater, purpose FROM label_events "
                    f"WHERE event_id IN ({','.join('?' * len(chunk))})", chunk,
                ):
                    stored = _payload(r["concept"], r["image_id"], r["label"], r["rater"], r["purpose"])
                    if stored != payload[r["event_id"]]:
                        raise StateError(_reused_event_message(r["event_id"], "already used"))
            before = con.total_changes
            con.executemany(
                "INSERT OR IGNORE INTO label_events (event_id, concept, image_id, label, rater, ts, "
                "purpose, source, detail, round) VALUES (?,?,?,?,?,?,?,?,?,?)",
                rows,
            )
            return con.total_changes - before

    def label_cutoff(self, concept: str) -> int:
        rows = self._read(
            "SELECT coalesce(max(seq), 0) AS m FROM label_events WHERE concept = ?", (concept,)
        )
        return int(rows[0]["m"])

    def label_events(self, concept: str, *, purpose: str | None = None, upto: int | None = None) -> list[sqlite3.Row]:
        sql = "SELECT * FROM label_events WHERE concept = ?"
        params: list[Any] = [concept]
        if purpose:
            sql += " AND purpose = ?"
            params.append(purpose)
        if upto is not None:
            sql += " AND seq <= ?"
            params.append(upto)
        return self._read(sql + " ORDER BY seq", params)

    def rater_labels(self, concept: str, rater: str, purpose: str = "train") -> dict[str, str]:
        """This rater's own latest label per image (what they see in the app)."""
        rows = self._read(
            "SELECT image_id, label FROM label_events WHERE seq IN (SELECT max(seq) FROM "
            "label_events WHERE concept = ? AND rater = ? AND purpose = ? GROUP BY image_id)",
            (concept, rater, purpose),
        )
        return {r["image_id"]: r["label"] for r in rows}

    def effective_labels(
        self,
        concept: str,
        *,
        purpose: str = "train",
        rule: LabelRule = LabelRule(),
        upto: int | None = None,
    ) -> dict[str, int]:
        """Resolved labels {image_id: 1 positive / 0 negative}; skips and ties are absent."""
        owner = self.get_concept(concept).owner
        latest: dict[str, dict[str, str]] = {}
        for r in self.label_events(concept, purpose=purpose, upto=upto):
            latest.setdefault(r["image_id"], {})[r["rater"]] = r["label"]
        out: dict[str, int] = {}
        for image_id, by_rater in latest.items():
            if rule.owner_wins and by_rater.get(owner) in ("positive", "negative"):
                out[image_id] = int(by_rater[owner] == "positive")
                continue
            pos = sum(v == "positive" for v in by_rater.values())
            neg = sum(v == "negative" for v in by_rater.values())
            if pos > neg:
                out[image_id] = 1
            elif neg > pos:
                out[image_id] = 0
            elif pos and rule.tie != "drop":
                out[image_id] = int(rule.tie == "positive")
        return out

    def labeled_image_ids(self, concept: str, *, upto: int | None = None) -> set[str]:
        """Images any rater has labelled (any purpose, skips included): never re-queued.
        ``upto``: only events up to that sequence number (a label cutoff)."""
        if upto is None:
            rows = self._read("SELECT DISTINCT image_id FROM label_events WHERE concept = ?", (concept,))
        else:
            rows = self._read("SELECT DISTINCT image_id FROM label_events WHERE concept = ? AND seq <= ?",
                              (concept, upto))
        return {r["image_id"] for r in rows}

    def label_history(self, concept: str) -> list[dict[str, Any]]:
        """Every label event of a concept with its image path (the audit trail), oldest first."""
        rows = self._read(
            "SELECT e.seq, e.event_id, e.concept, e.image_id, i.path AS image_path, e.label, "
            "e.rater, e.ts, e.purpose, e.source, e.detail, e.round FROM label_events e "
            "LEFT JOIN images i ON i.id = e.image_id WHERE e.concept = ? ORDER BY e.seq",
            (concept,),
        )
        return [dict(r) for r in rows]

    def add_exemplar(self, concept: str, image_id: str, polarity: str, added_by: str) -> None:
        """Store an exemplar image and record it as the adder's label, in one transaction.

        Exemplars drive expansion like phrases do, and count as training labels.
        """
        if polarity not in ("positive", "negative"):
            raise StateError(f"exemplar polarity {polarity!r} must be positive or negative")
        c = self.get_concept(concept)
        if not self.has_image(image_id):
            raise StateError(f"image {image_id!r} is not in the corpus; pick one from a batch or a search")
        now = time.time()
        with self._write() as con:
            con.execute(
                "INSERT OR REPLACE INTO exemplars VALUES (?, ?, ?, ?, ?)",
                (c.name, image_id, polarity, added_by, now),
            )
            con.execute(
                "INSERT INTO label_events (event_id, concept, image_id, label, rater, ts, purpose, "
                "source, detail, round) VALUES (?, ?, ?, ?, ?, ?, 'train', 'exemplar', NULL, NULL)",
                (uuid.uuid4().hex, c.name, image_id, polarity, added_by, now),
            )

    def exemplars(self, concept: str) -> list[dict[str, Any]]:
        rows = self._read("SELECT * FROM exemplars WHERE concept = ? ORDER BY added_at", (concept,))
        return [dict(r) for r in rows]

    # ---- batches (candidate sets) -------------------------------------------------------
    def write_batch(
        self,
        concept: str,
        kind: str,
        round_index: int,
        items: Sequence[dict[str, Any]],
        *,
        label_cutoff: int,
        run_id: str | None = None,
        info: dict[str, Any] | None = None,
    ) -> int:
        """Write a whole candidate batch in one transaction: readers see all of it or none."""
        with self._write() as con:
            cur = con.execute(
                "INSERT INTO batches (concept, kind, round, created_at, label_cutoff, run_id, info) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (concept, kind, round_index, time.time(), label_cutoff, run_id, json.dumps(info or {})),
            )
            batch_id = int(cur.lastrowid or 0)
            con.executemany(
                "INSERT INTO batch_items (batch_id, rank, image_id, source, detail, score) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (batch_id, i, it["image_id"], it.get("source", kind), it.get("detail"),
                     it.get("score"))
                    for i, it in enumerate(items)
                ],
            )
        return batch_id

    def latest_batch(self, concept: str, kinds: Sequence[str] = ("expansion", "al")) -> dict[str, Any] | None:
        marks = ",".join("?" * len(kinds))
        rows = self._read(
            f"SELECT * FROM batches WHERE concept = ? AND kind IN ({marks}) "
            "ORDER BY batch_id DESC LIMIT 1",
            (concept, *kinds),
        )
        return self._batch(rows[0]) if rows else None

    def get_batch(self, batch_id: int) -> dict[str, Any] | None:
        rows = self._read("SELECT * FROM batches WHERE batch_id = ?", (batch_id,))
        return self._batch(rows[0]) if rows else None

    def _batch(self, row: sqlite3.Row) -> dict[str, Any]:
        b = dict(row)
        b["info"] = json.loads(b["info"] or "{}")
        b["items"] = [
            dict(r)
            for r in self._read(
                "SELECT * FROM batch_items WHERE batch_id = ? ORDER BY rank", (b["batch_id"],)
            )
        ]
        return b

    def pending_items(
        self, concept: str, rater: str | None = None, *, purpose: str = "train"
    ) -> list[dict[str, Any]]:
        """The latest batch's items not yet labelled (by ``rater``, or by anyone).

        ``purpose='train'``: the latest expansion or AL batch; ``'eval'``: the eval set.
        """
        kinds = ("eval",) if purpose == "eval" else ("expansion", "al")
        batch = self.latest_batch(concept, kinds)
        if batch is None:
            return []
        if rater:
            done = set(self.rater_labels(concept, rater, purpose))
        elif purpose == "eval":
            done = set(self.effective_labels(concept, purpose="eval"))
        else:
            done = self.labeled_image_ids(concept)
        return [it for it in batch["items"] if it["image_id"] not in done]

    # ---- rounds -----------------------------------------------------------------------
    def record_round(self, concept: str, round_index: int, **fields: Any) -> None:
        info = json.dumps(fields.pop("info", {}))
        cols = ["concept", "round", "info", "finished_at", *fields.keys()]
        vals = [concept, round_index, info, time.time(), *fields.values()]
        with self._write() as con:
            con.execute(
                f"INSERT OR REPLACE INTO rounds ({', '.join(cols)}) VALUES ({','.join('?' * len(cols))})",
                vals,
            )

    def update_round(self, concept: str, round_index: int, **fields: Any) -> None:
        """Set some columns of an existing round (e.g. its MLflow ids, logged after the batch)."""
        if not fields:
            return
        allowed = {"model_version", "mlflow_run_id", "select_seconds", "run_id"}
        bad = set(fields) - allowed
        if bad:
            raise ValueError(f"update_round cannot set {sorted(bad)}")
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._write() as con:
            con.execute(
                f"UPDATE rounds SET {sets} WHERE concept = ? AND round = ?",
                [*fields.values(), concept, round_index],
            )

    def merge_round_info(self, concept: str, round_index: int, **items: Any) -> None:
        """Add keys to a round's ``info`` (e.g. the name its model was registered under)."""
        with self._write() as con:
            row = con.execute("SELECT info FROM rounds WHERE concept = ? AND round = ?",
                              (concept, round_index)).fetchone()
            if row is None:
                return
            info = {**(json.loads(row["info"]) if row["info"] else {}), **items}
            con.execute("UPDATE rounds SET info = ? WHERE concept = ? AND round = ?",
                        (json.dumps(info), concept, round_index))

    def rounds(self, concept: str) -> list[dict[str, Any]]:
        rows = self._read("SELECT * FROM rounds WHERE concept = ? ORDER BY round", (concept,))
        out = []
        for r in rows:
            d = dict(r)
            d["info"] = json.loads(d["info"] or "{}")
            out.append(d)
        return out

    def relocate_round_files(self, concept: str, old_dir: Path, new_dir: Path) -> int:
        """Point the concept's rounds whose ``model_uri`` lies in ``old_dir`` at the same files
        under ``new_dir`` (a moved concept folder); returns how many rounds changed."""
        old = Path(old_dir).resolve()
        with self._write() as con:
            changed = []
            for r in con.execute("SELECT round, model_uri FROM rounds WHERE concept = ?", (concept,)):
                if not r["model_uri"]:
                    continue
                try:
                    rel = Path(r["model_uri"]).resolve().relative_to(old)
                except ValueError:
                    continue
                changed.append((str(Path(new_dir).resolve() / rel), concept, r["round"]))
            con.executemany("UPDATE rounds SET model_uri = ? WHERE concept = ? AND round = ?", changed)
        return len(changed)

    def concepts_before_keyed_dirs(self) -> list[str]:
        """Concepts created before this database's first concept with a keyed folder
        (:func:`concept_storage_key`): only these can own an old-style folder."""
        mark = self._read("SELECT value FROM meta WHERE key = ?", (_KEYED_SINCE,))
        if not mark:
            return self.concept_names()
        rows = self._read("SELECT name FROM concepts WHERE created_at < ? ORDER BY name",
                          (float(mark[0]["value"]),))
        return [r["name"] for r in rows]

    def next_round_index(self, concept: str) -> int:
        rows = self._read("SELECT coalesce(max(round) + 1, 0) AS n FROM rounds WHERE concept = ?", (concept,))
        return int(rows[0]["n"])


def concept_dir(store: StateStore, home: Path, concept: str, *, create: bool = True) -> Path:
    """The folder of a concept's files, ``home/concepts/<concept_storage_key(concept)>/``
    (created unless ``create=False``): the one place that maps a concept to its folder.

    Old data: versions before keyed folders used ``concepts/<name with spaces as _>/``, which
    ``sp ace`` and ``sp_ace`` shared. Such a folder is migrated the first time the concept's
    folder is asked for, when it unambiguously belongs to this concept: it is renamed to the
    keyed name, the rounds' stored ``model_uri`` paths are updated first (so a crash between
    the two is finished by the next call), and ``predictions/<old>.parquet`` is renamed too.
    Only concepts created before this database's first keyed concept can own an old folder (a
    concept created since never wrote one). When several such concepts map to the same old
    folder, its files are mixed and nobody can tell whose they are: :class:`StateError` says
    so and how to resolve it (move or delete the folder), and nothing is moved.
    """
    home = Path(home)
    d = home / CONCEPTS_DIR / concept_storage_key(concept)
    if not d.is_dir():
        _migrate_legacy_dir(store, home, _norm_name(concept), d)
    if create:
        d.mkdir(parents=True, exist_ok=True)
    return d


def _migrate_legacy_dir(store: StateStore, home: Path, name: str, target: Path) -> None:
    root = home / CONCEPTS_DIR
    legacy = root / legacy_concept_dir_name(name)
    if legacy.is_symlink() or not legacy.is_dir():
        return
    owners = [n for n in store.concepts_before_keyed_dirs() if legacy_concept_dir_name(n) == legacy.name]
    if name not in owners:
        return  # a concept created since keyed folders: the old folder is not its own
    if len(owners) > 1:
        keys = "; ".join(f"{o!r}: {root / concept_storage_key(o)}" for o in owners)
        raise StateError(
            f"the folder {legacy} holds the files of the concepts "
            f"{', '.join(repr(o) for o in owners)} together (older versions gave them one folder, "
            "so each overwrote the other's rounds and scores): it cannot be told whose they are. "
            f"Move it to the folder of the concept it belongs to ({keys}) or delete it, then "
            "rebuild the files with `agile concept expand NAME` and `agile round NAME --force`"
        )
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".migrate.lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # one migration at a time, across processes
        try:
            if target.exists() or legacy.is_symlink() or not legacy.is_dir():
                return  # another process migrated it meanwhile
            moved = store.relocate_round_files(name, legacy, target)
            os.rename(legacy, target)
            old_pred = home / "predictions" / f"{legacy.name}.parquet"
            new_pred = home / "predictions" / f"{target.name}.parquet"
            if old_pred.is_file() and not new_pred.exists():
                os.replace(old_pred, new_pred)
            log.info("moved %s to %s (%d round paths updated)", legacy, target, moved)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
