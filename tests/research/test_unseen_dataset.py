"""The unseen glyph/digit dataset: layout, rarity, determinism, readable by load_dataset."""

import hashlib
from pathlib import Path

import numpy as np

from agile_pipeline.lib.labeled_dataset import load_dataset
from agile_pipeline.research.unseen_dataset import (
    CONCEPTS,
    OTHER,
    render_digit,
    render_glyph,
    write_unseen_dataset,
)


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_small_dataset_layout_and_determinism(tmp_path: Path) -> None:
    kw = dict(seed=3, size=32, per_concept=4, n_glyph_distractors=20, n_shapes=8)
    stats = write_unseen_dataset(tmp_path / "a", **kw)  # type: ignore[arg-type]
    write_unseen_dataset(tmp_path / "b", **kw)  # type: ignore[arg-type]
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert stats.n_images == 4 * len(CONCEPTS) + stats.n_distractors
    ds = load_dataset(tmp_path / "a")
    assert set(ds.positives) == {c.name for c in CONCEPTS}  # "_other" is not a concept
    assert all(len(p) == 4 for p in ds.positives.values())
    assert {s for s in ds.split} == {"train", "test"}
    for c in CONCEPTS:
        assert ds.negatives[c.name] == list(c.negatives)
        test = [k for k in ds.positives[c.name] if ds.split[k] == "test"]
        assert len(test) == 2
    n_other = sum(1 for p in ds.images if p.parent.name == OTHER)
    assert n_other == stats.n_distractors
    # rare: each concept is a small fraction of the corpus
    assert max(len(p) for p in ds.positives.values()) / len(ds.images) < 0.05
    assert (tmp_path / "a" / "labels.csv").read_text().startswith("path,concept,split")


def test_renderers_shapes_and_styles() -> None:
    from agile_pipeline.research.unseen_dataset import font_dir

    rng = np.random.default_rng(0)
    img = render_digit(np.eye(8) * 16, rng, 48)
    assert img.size == (48, 48) and img.mode == "RGB"
    font = font_dir() / "DejaVuSans.ttf"
    plain = np.asarray(render_glyph("R", font, np.random.default_rng(1), 64))
    mirrored = np.asarray(render_glyph("R", font, np.random.default_rng(1), 64, mirror=True))
    outlined = np.asarray(render_glyph("R", font, np.random.default_rng(1), 64, outline=True))
    assert plain.shape == mirrored.shape == outlined.shape == (64, 64, 3)
    assert not np.array_equal(plain, mirrored)
    assert not np.array_equal(plain, outlined)
