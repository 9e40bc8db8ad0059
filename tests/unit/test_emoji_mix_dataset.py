"""The emoji-mix benchmark corpus (four art sets, Unicode subgroups as concepts), on a small
subset: layout, labels.csv against the folders, a split by emoji, negatives, determinism."""

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agile_pipeline.lib.labeled_dataset import load_dataset
from agile_pipeline.research.emoji_mix_dataset import (
    CONCEPTS,
    LABEL_COLUMNS,
    OTHER,
    STYLES,
    EmojiMixSourceMissing,
    _Aug,
    compose,
    render_sprite,
    symbola_font_path,
    write_emoji_mix_dataset,
)
from tests.research.test_unseen_dataset import _digest  # byte digest of a written tree

# one emoji per distractor subgroup, two per concept (one train, one test): ~450 images
SMALL = dict(seed=5, size=32, variants=1, limit=1, progress=False)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("emoji-mix")
    stats = write_emoji_mix_dataset(root / "a", workers=2, **SMALL)  # type: ignore[arg-type]
    return root, stats


def test_layout_concepts_negatives_and_rarity(small) -> None:  # type: ignore[no-untyped-def]
    root, stats = small
    ds = load_dataset(root / "a")
    names = {c.name for c in CONCEPTS}
    assert len(names) >= 20
    assert set(ds.positives) == names  # "_other" is not a concept
    assert stats.n_failed == 0 and stats.styles == STYLES
    assert set(stats.n_per_style) == set(STYLES)
    for c in CONCEPTS:
        assert ds.negatives[c.name] == list(c.negatives)
        splits = [ds.split[k] for k in ds.positives[c.name]]
        assert splits.count("train") >= 1 and splits.count("test") >= 1, c.name
        assert stats.n_per_concept[c.name] == len(ds.positives[c.name])
        assert stats.n_test_per_concept[c.name] == splits.count("test")
    assert stats.n_images == len(ds.images) == sum(stats.n_per_concept.values()) + stats.n_distractors
    assert sum(1 for p in ds.images if p.parent.name == OTHER) == stats.n_distractors
    assert stats.n_distractors > sum(stats.n_per_concept.values())  # concepts are the minority
    with Image.open(ds.images[0]) as im:
        assert im.size == (32, 32) and im.mode == "RGB"
    readme = (root / "a" / "README.txt").read_text()
    assert "OpenMoji" in readme and "Twemoji" in readme and "CC BY 4.0" in readme


def test_labels_csv_matches_the_folders_and_splits_by_emoji(small) -> None:  # type: ignore[no-untyped-def]
    root, _ = small
    dest = root / "a"
    with (dest / "labels.csv").open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == LABEL_COLUMNS
        rows = list(reader)
    on_disk = {str(p.relative_to(dest)) for p in dest.rglob("*.png")}
    assert {r["path"] for r in rows} == on_disk
    concept_of = {c.subgroup: c.name for c in CONCEPTS}
    split_of_emoji: dict[str, set[str]] = {}
    for r in rows:
        split, folder, _ = r["path"].split("/")
        assert split == r["split"] and r["source"] in STYLES
        assert folder == (r["concept"] or OTHER)
        assert r["concept"] == concept_of.get(r["subgroup"], "")
        split_of_emoji.setdefault(r["codepoints"], set()).add(split)
    # every drawing of one emoji (all art sets) is in one split: the test emojis are unseen
    assert all(len(s) == 1 for s in split_of_emoji.values())
    assert {s for ss in split_of_emoji.values() for s in ss} == {"train", "test"}


def test_deterministic_whatever_the_workers_and_rewritable(small, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, _ = small
    b = tmp_path / "b"
    write_emoji_mix_dataset(b, workers=1, **SMALL)  # type: ignore[arg-type]
    assert _digest(root / "a") == _digest(b)
    stray = b / "train" / OTHER / "stray.png"
    stray.write_bytes(b"")
    write_emoji_mix_dataset(b, workers=2, **SMALL)  # an earlier corpus is replaced whole
    assert not stray.exists() and _digest(root / "a") == _digest(b)
    other_seed = tmp_path / "c"
    write_emoji_mix_dataset(other_seed, workers=2, **{**SMALL, "seed": 6})  # type: ignore[arg-type]
    assert _digest(other_seed) != _digest(b)


def test_refuses_a_foreign_folder_and_names_a_missing_art_set(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        write_emoji_mix_dataset(tmp_path, workers=1, **SMALL)  # type: ignore[arg-type]
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    monkeypatch.setenv("AGILE_SYMBOLA_FONT", str(tmp_path / "nope.ttf"))
    with pytest.raises(EmojiMixSourceMissing, match="fonts-symbola"):
        write_emoji_mix_dataset(tmp_path / "new", workers=1, **SMALL)  # type: ignore[arg-type]


def test_monochrome_glyphs_take_the_ink_and_augmentation_moves_the_drawing() -> None:
    font = symbola_font_path()
    assert font is not None
    sprite = render_sprite("symbola", "\U0001f41f", 96, str(font))  # fish
    assert sprite.mode == "RGBA" and sprite.getchannel("A").getbbox() is not None
    aug = _Aug(bg=(255, 255, 255), ink=(200, 0, 0), scale=0.8, angle=0.0, fx=0.5, fy=0.5)
    img = np.asarray(compose(sprite, aug, 48, mono=True)).astype(int)
    assert img.shape == (48, 48, 3)
    inked = img[(img[..., 0] > 150) & (img[..., 1] < 60)]
    assert len(inked) > 20  # red ink, not black
    moved = np.asarray(compose(sprite, _Aug(aug.bg, aug.ink, 0.5, 15.0, 0.0, 0.0), 48, mono=True))
    assert not np.array_equal(img, moved)
