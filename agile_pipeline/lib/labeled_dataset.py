"""Labeled image datasets: a folder tree or CSV of images and the concepts each is positive for.

:func:`load_dataset` reads one (``agile simulate --dataset``); :func:`concept_phrase` turns a
concept folder name into its phrase. :class:`SimData` is such a dataset once ingested and
embedded (train/test matrices aligned with image ids), as
:func:`agile_pipeline.runner.prepare_simulation` returns it for the simulated user
(:mod:`agile_pipeline.research.simulate`).
"""

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}


@dataclass
class LabeledDataset:
    """Images (paths) and the concepts each is positive for; optional given split."""

    root: Path
    images: list[Path]
    positives: dict[str, set[int]]  # concept -> indices into images
    split: list[str | None]  # "train"/"test" when the dataset defines it
    descriptions: dict[str, str] = field(default_factory=dict)
    negatives: dict[str, list[str]] = field(default_factory=dict)  # concept -> negative phrases


def concept_phrase(name: str) -> str:
    """Folder name -> phrase: separators become spaces (``animal-mammal`` -> ``animal mammal``)."""
    return " ".join(re.split(r"[-_/\s]+", name)).strip()


def load_dataset(path: Path) -> LabeledDataset:
    """A folder tree (every subfolder is a concept; an image is positive for every folder above
    it; top-level ``train/`` and ``test/`` are the split) or a CSV of ``image,concept`` rows.

    A concept folder may hold ``description.txt``: its text is added to the concept's phrases,
    and ``negatives.txt``: the concept's negative phrases, one a line. Folders whose name starts
    with ``_`` are not concepts (their images are negatives for every concept).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset {str(path)!r} does not exist")
    if path.is_file():
        return _load_csv(path)
    top = {p.name for p in path.iterdir() if p.is_dir()}
    roots = [(path / "train", "train"), (path / "test", "test")] if {"train", "test"} <= top else [(path, None)]
    images: list[Path] = []
    split: list[str | None] = []
    positives: dict[str, set[int]] = {}
    descriptions: dict[str, str] = {}
    negatives: dict[str, list[str]] = {}
    for root, sp in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel = Path(dirpath).relative_to(root)
            for d in rel.parts:
                desc = Path(dirpath) / "description.txt"
                if d == rel.parts[-1] and desc.exists():
                    descriptions[d] = desc.read_text(encoding="utf-8", errors="replace").strip()
                neg = Path(dirpath) / "negatives.txt"
                if d == rel.parts[-1] and neg.exists():
                    text = neg.read_text(encoding="utf-8", errors="replace")
                    negatives[d] = [ln.strip() for ln in text.splitlines() if ln.strip()]
            for f in sorted(filenames):
                if Path(f).suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                k = len(images)
                images.append(Path(dirpath) / f)
                split.append(sp)
                for d in rel.parts:
                    if not d.startswith("_"):
                        positives.setdefault(d, set()).add(k)
    return LabeledDataset(path, images, positives, split, descriptions, negatives)


def _load_csv(path: Path) -> LabeledDataset:
    images: list[Path] = []
    index: dict[str, int] = {}
    positives: dict[str, set[int]] = {}
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = {c.lower(): c for c in reader.fieldnames or []}
        img_col = cols.get("image") or cols.get("path")
        con_col = cols.get("concept") or cols.get("label")
        if not img_col or not con_col:
            raise ValueError(f"{path} needs columns image (or path) and concept")
        for row in reader:
            p = Path(row[img_col])
            if not p.is_absolute():
                p = path.parent / p
            key = str(p)
            if key not in index:
                index[key] = len(images)
                images.append(p)
            positives.setdefault(row[con_col].strip(), set()).add(index[key])
    return LabeledDataset(path, images, positives, [None] * len(images))


@dataclass
class SimData:
    """A labeled dataset ingested and embedded: train/test matrices aligned with image ids,
    each concept's positives, phrases and their text vectors."""

    embedding_model: str
    train_ids: list[str]
    test_ids: list[str]
    X_train: np.ndarray
    X_test: np.ndarray
    positives: dict[str, set[str]]  # concept -> image ids
    phrases: dict[str, list[str]]   # concept -> text phrases
    text_vectors: dict[str, np.ndarray]  # concept -> (n_phrases, dim); first = concept name
    negative_phrases: dict[str, list[str]] = field(default_factory=dict)
    negative_vectors: dict[str, np.ndarray] = field(default_factory=dict)  # (n_neg_phrases, dim)
