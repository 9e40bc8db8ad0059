"""Synthetic corpora in the project's real layout, with a planted concept.

``N`` unit vectors of dimension ``dim`` go into the ``embeddings__<model>`` LanceDB table
(schema :func:`agile_pipeline.lib.vectors.embedding_schema`, the ``split`` column from the
project's keyed SipHash split, computed vectorised) and every image into the state store's
``images`` manifest, written in large batches.

The planted concept ("planted concept"): in a random orthonormal basis ``e0, e1, …``, the
concept-name text vector is ``t = e0``; positives (0.1%) lie around four visual modes whose
cosine with ``t`` is 0.55, 0.45, 0.35 and 0.25; hard negatives (0.4%) around four directions
at cosine 0.45 with ``t`` that share a component with the modes; the rest around 2,000 random
cluster centres. Zero-shot (cosine with ``t``) ranks the first mode well and mixes the others
with the hard negatives, so a trained model has room to beat it, as in the paper.
"""

import json
import math
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agile_pipeline import settings
from agile_pipeline.lib.keyed_hash import assign_splits

MODEL_SPEC_PREFIX = "random:"  # the round job resolves the model id from AGILE_ENCODER
POS_RATE = 0.001
HARD_RATE = 0.004
MODE_COS = (0.55, 0.45, 0.35, 0.25)
HARD_COS = 0.45
N_CENTERS = 2000
CONCEPT = "planted concept"
MODE_PHRASE = "planted concept, second look"
NEG_PHRASE = "look-alike of the planted concept"

_HEX = np.array([list(f"{i:02x}".encode()) for i in range(256)], dtype=np.uint8)


def model_id_for(dim: int) -> str:
    """The embedding model id whose table the corpus fills (``random:<dim>`` encoder spec)."""
    return f"random-{dim}"


@dataclass
class Geometry:
    """The planted directions (all unit vectors, float32)."""

    dim: int
    text: np.ndarray  # concept-name text vector
    modes: np.ndarray  # (4, dim) positive modes
    hard: np.ndarray  # (4, dim) hard-negative directions
    centers: np.ndarray  # (N_CENTERS, dim)
    phrase_vectors: dict[str, np.ndarray]


def geometry(dim: int, seed: int = 0) -> Geometry:
    if dim < 12:
        raise ValueError("dim must be >= 12")
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((dim, 12)))
    e = q.T.astype(np.float64)  # 12 orthonormal rows
    t = e[0]
    modes = np.stack([c * t + math.sqrt(1 - c * c) * e[1 + m] for m, c in enumerate(MODE_COS)])
    hard = []
    for j in range(4):
        side = 0.6 * e[1 + j] + 0.8 * e[5 + j]
        hard.append(HARD_COS * t + math.sqrt(1 - HARD_COS**2) * side)
    centers = rng.standard_normal((N_CENTERS, dim))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)

    def unit(v: np.ndarray) -> np.ndarray:
        return (v / np.linalg.norm(v)).astype(np.float32)

    phrases = {
        CONCEPT: unit(t),
        MODE_PHRASE: unit(modes[1] + 0.3 * e[11]),
        NEG_PHRASE: unit(hard[0] + 0.3 * e[10]),
    }
    return Geometry(dim, unit(t), np.stack([unit(m) for m in modes]),
                    np.stack([unit(h) for h in hard]), centers.astype(np.float32), phrases)


def random_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` ids shaped like the project's (32 lowercase hex chars of a 128-bit digest), ``S32``."""
    raw = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
    return _HEX[raw].reshape(n, 32).view("S32").reshape(n)


def make_batch(geo: Geometry, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids S32, vectors float32 unit rows, kind int8: 1 positive, 2 hard negative, 0 other)``."""
    rng = np.random.default_rng(seed)
    ids = random_ids(rng, n)
    u = rng.random(n)
    kind = np.where(u < POS_RATE, 1, np.where(u < POS_RATE + HARD_RATE, 2, 0)).astype(np.int8)
    # row i is table[direction[i]] + isotropic noise of norm ~1
    table = _direction_table(geo)
    which = rng.integers(0, 4, size=n)
    direction = rng.integers(0, N_CENTERS, size=n)
    direction[kind == 1] = N_CENTERS + which[kind == 1]
    direction[kind == 2] = N_CENTERS + 4 + which[kind == 2]
    x = rng.standard_normal((n, geo.dim), dtype=np.float32)
    x *= np.float32(1.0 / math.sqrt(geo.dim))
    x += table[direction]
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    x /= norms[:, None]
    return ids, x, kind


def _direction_table(geo: Geometry) -> np.ndarray:
    return np.concatenate([geo.centers, geo.modes, geo.hard]).astype(np.float32)


@dataclass
class Corpus:
    """A written corpus: where it lives and the ground truth."""

    home: Path
    n: int
    dim: int
    model_id: str
    positives: np.ndarray  # S32 ids of planted positives (all splits)
    geometry: Geometry
    build_seconds: float
    manifest_seconds: float

    def encoder_spec(self) -> str:
        return f"{MODEL_SPEC_PREFIX}{self.dim}"


def _manifest_rows(ids: np.ndarray, is_train: np.ndarray, now: float) -> list[tuple[Any, ...]]:
    str_ids = np.char.decode(ids, "ascii").tolist()
    splits = np.where(is_train, "train", "test").tolist()
    return [
        (i, f"synthetic://{i}", f"synthetic/{i}.jpg", 1, 1, 1, "JPEG", 1, s, "synthetic", now)
        for i, s in zip(str_ids, splits, strict=True)
    ]


def write_corpus(home: Path, n: int, dim: int = 512, *, seed: int = 0, batch: int = 1 << 17,
                 manifest: bool = True, log: Any = None) -> Corpus:
    """Write ``n`` planted vectors into ``home`` (an ``AGILE_HOME`` layout); idempotent: an
    existing complete corpus with the same parameters is reused."""
    import pyarrow as pa

    from agile_pipeline.lib.state import StateStore
    from agile_pipeline.lib.vectors import VectorStore, embedding_schema, table_name

    home = Path(home)
    paths = settings.Paths(home).ensure()
    meta_path = home / "synthetic.json"
    truth_path = home / "synthetic_positives.npy"
    model_id = model_id_for(dim)
    geo = geometry(dim, seed)
    want = {"n": n, "dim": dim, "seed": seed, "batch": batch, "manifest": manifest, "format": 1}
    if meta_path.exists() and truth_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("params") == want:
            return Corpus(home, n, dim, model_id, np.load(truth_path), geo,
                          meta["build_seconds"], meta["manifest_seconds"])
    t0 = time.perf_counter()
    vs = VectorStore(paths.lancedb, cache_dir=paths.cache)
    schema = embedding_schema(dim)
    name = table_name(model_id)
    if name in vs.table_names():
        vs.db.drop_table(name)
    store = StateStore(paths.state_db)
    store.close()
    con = sqlite3.connect(paths.state_db, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=OFF")
    con.execute("DELETE FROM images WHERE source = 'synthetic'")
    positives: list[np.ndarray] = []
    tbl = None
    t_manifest = 0.0
    now = time.time()
    for b, start in enumerate(range(0, n, batch)):
        m = min(batch, n - start)
        ids, x, kind = make_batch(geo, m, seed * 1_000_003 + b)
        is_train = assign_splits(ids, train_fraction=settings.TRAIN_FRACTION, key=settings.SPLIT_KEY)
        positives.append(ids[kind == 1])
        str_ids = pa.array(np.char.decode(ids, "ascii"), pa.string())
        data = pa.table({
            "id": str_ids,
            "split": pa.array(np.where(is_train, "train", "test"), pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim),
            "model_id": pa.array(np.full(m, model_id), pa.string()),
        }, schema=schema)
        if tbl is None:
            tbl = vs.db.create_table(name, data=data, schema=schema)
        else:
            tbl.add(data)
        if manifest:
            tm = time.perf_counter()
            con.execute("BEGIN")
            con.executemany(
                "INSERT OR REPLACE INTO images (id, uri, path, size, width, height, format, "
                "n_frames, split, source, ingested_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                _manifest_rows(ids, is_train, now),
            )
            con.execute("COMMIT")
            t_manifest += time.perf_counter() - tm
        if log and (b % 10 == 0):
            log(f"  wrote {start + m:,}/{n:,} rows ({time.perf_counter() - t0:.0f}s)")
    con.close()
    pos = np.concatenate(positives) if positives else np.empty(0, "S32")
    np.save(truth_path, pos)
    seconds = time.perf_counter() - t0
    meta_path.write_text(json.dumps({"params": want, "build_seconds": seconds,
                                     "manifest_seconds": t_manifest}))
    return Corpus(home, n, dim, model_id, pos, geo, seconds, t_manifest)


class PlantedTextEncoder:
    """Stands in for the text tower: the planted phrases map to their planted vectors."""

    def __init__(self, corpus: Corpus) -> None:
        self.model_id = corpus.model_id
        self.dim = corpus.dim
        self._vectors = corpus.geometry.phrase_vectors

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        out = []
        for t in texts:
            if t not in self._vectors:
                raise KeyError(f"no planted vector for phrase {t!r}")
            out.append(self._vectors[t])
        return np.stack(out).astype(np.float32)
