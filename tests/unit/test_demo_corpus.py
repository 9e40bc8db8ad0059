"""The OpenMoji demo corpus: parsing emoji-test.txt, matching SVGs, writing the labeled corpus."""

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agile_pipeline.lib import demo_corpus
from agile_pipeline.lib.demo_corpus import (
    EmojiDataMissing,
    EmojiEntry,
    find_emoji_test_file,
    parse_emoji_test,
    slugify,
    write_demo_corpus,
)

# Real codepoints (OpenMoji has SVGs for them), in the emoji-test.txt format. Exercises:
# groups/subgroups, an old-style line without the E-version, FE0F dropped by OpenMoji
# (263A FE0F -> 263A.svg), a ZWJ sequence, a skin-tone variant, the Component and Flags groups,
# non-fully-qualified statuses, a name collision and a codepoint OpenMoji has no SVG for.
SNIPPET = """\
# emoji-test.txt
# Date: 2099-01-01
# Version: 99.0

# group: Smileys & Emotion

# subgroup: face-smiling
1F600                                      ; fully-qualified     # 😀 E1.0 grinning face
1F603                                      ; fully-qualified     # 😃 grinning face with big eyes

# subgroup: face-affection
263A FE0F                                  ; fully-qualified     # ☺️ E0.6 smiling face
263A                                       ; unqualified         # ☺ E0.6 smiling face

# Smileys & Emotion subtotal:		4

# group: People & Body

# subgroup: hand-fingers-open
1F44B                                      ; fully-qualified     # 👋 E0.6 waving hand
1F44B 1F3FB                                ; fully-qualified     # 👋🏻 E1.0 waving hand: light skin tone

# subgroup: person-role
1F468 200D 1F373                           ; fully-qualified     # 👨‍🍳 E4.0 man cook

# group: Component

# subgroup: skin-tone
1F3FB                                      ; component           # 🏻 E1.0 light skin tone

# group: Animals & Nature

# subgroup: animal-mammal
1F436                                      ; fully-qualified     # 🐶 E0.6 dog face
1F415                                      ; fully-qualified     # 🐕 E0.7 dog
10FFFD                                     ; fully-qualified     # ? E99.0 imaginary creature

# group: Food & Drink

# subgroup: food-prepared
1F355                                      ; fully-qualified     # 🍕 E0.6 pizza

# group: Symbols

# subgroup: keycap
0023 FE0F 20E3                             ; fully-qualified     # #️⃣ E0.6 keycap: #
0023 20E3                                  ; unqualified         # #⃣ E0.6 keycap: #
002A FE0F 20E3                             ; fully-qualified     # *️⃣ E2.0 keycap: *

# group: Flags

# subgroup: country-flag
1F1FA 1F1F8                                ; fully-qualified     # 🇺🇸 E0.6 flag: United States
"""


@pytest.fixture
def snippet_file(tmp_path: Path) -> Path:
    path = tmp_path / "emoji-test.txt"
    path.write_text(SNIPPET, encoding="utf-8")
    return path


def _real_emoji_test() -> Path | None:
    try:
        return find_emoji_test_file()
    except EmojiDataMissing:
        return None


def _read_labels(dest: Path) -> list[dict[str, str]]:
    with (dest / "labels.csv").open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == ["path", "group", "subgroup", "name", "codepoints"]
        return list(reader)


def _check_corpus(dest: Path, size: int) -> list[dict[str, str]]:
    rows = _read_labels(dest)
    pngs = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*.png"))
    assert sorted(r["path"] for r in rows) == pngs
    for row in rows:
        parts = row["path"].split("/")
        assert len(parts) == 3
        assert parts[0] == slugify(row["group"]) and parts[1] == slugify(row["subgroup"])
        with Image.open(dest / row["path"]) as im:
            assert im.mode == "RGB" and im.size == (size, size)
            arr = np.asarray(im)
        assert arr.std() > 0
        assert tuple(arr[0, 0]) == (255, 255, 255)  # white background, not transparent
    readme = (dest / "README.txt").read_text(encoding="utf-8")
    assert "All emojis designed by OpenMoji" in readme and "CC BY-SA 4.0" in readme
    assert "emoji-test.txt" in readme
    return rows


def test_parse_emoji_test_snippet(snippet_file: Path) -> None:
    entries = parse_emoji_test(snippet_file)
    assert all(e.status == "fully-qualified" for e in entries)
    assert len(entries) == 13
    first = entries[0]
    assert first == EmojiEntry(
        codepoints=("1F600",),
        status="fully-qualified",
        group="Smileys & Emotion",
        subgroup="face-smiling",
        name="grinning face",
    )
    by_name = {e.name: e for e in entries}
    assert by_name["grinning face with big eyes"].subgroup == "face-smiling"  # no E-version
    assert by_name["man cook"].codepoints == ("1F468", "200D", "1F373")
    assert by_name["man cook"].key == "1F468-200D-1F373"
    assert by_name["keycap: #"].group == "Symbols"
    assert by_name["flag: United States"].group == "Flags"
    every = parse_emoji_test(snippet_file, statuses=("fully-qualified", "unqualified", "component"))
    assert len(every) == 16


def test_slugify() -> None:
    assert slugify("Animals & Nature") == "animals-and-nature"
    assert slugify("animal-mammal") == "animal-mammal"
    assert slugify("dog face") == "dog-face"
    assert slugify("keycap: #") == "keycap"
    assert slugify("man’s shoe") == "mans-shoe"
    assert slugify("piñata") == "pinata"
    assert slugify("flag: Côte d’Ivoire") == "flag-cote-divoire"


def test_missing_emoji_test_file_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(demo_corpus.EMOJI_TEST_ENV, raising=False)
    monkeypatch.setattr(demo_corpus, "EMOJI_TEST_LOCATIONS", (tmp_path / "nope.txt",))
    with pytest.raises(EmojiDataMissing) as excinfo:
        find_emoji_test_file()
    message = str(excinfo.value)
    assert "unicode-data" in message and "AGILE_EMOJI_TEST" in message
    assert isinstance(excinfo.value, FileNotFoundError)

    monkeypatch.setenv(demo_corpus.EMOJI_TEST_ENV, str(tmp_path / "missing.txt"))
    with pytest.raises(EmojiDataMissing, match="unicode-data"):
        find_emoji_test_file()


def test_env_override_wins(snippet_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(demo_corpus.EMOJI_TEST_ENV, str(snippet_file))
    assert find_emoji_test_file() == snippet_file


def test_write_demo_corpus_from_snippet(snippet_file: Path, tmp_path: Path) -> None:
    dest = tmp_path / "corpus"
    stats = write_demo_corpus(dest, size=64, workers=1, emoji_test=snippet_file, progress=False)
    # 13 fully-qualified - skin tone - flag = 11 candidates, one without an SVG.
    assert stats.n_missing_svg == 1
    assert (stats.n_written, stats.n_skipped_existing, stats.n_failed) == (10, 0, 0)
    rows = _check_corpus(dest, 64)
    paths = {r["path"] for r in rows}
    assert "animals-and-nature/animal-mammal/dog-face.png" in paths
    assert "smileys-and-emotion/face-affection/smiling-face.png" in paths  # FE0F-less SVG
    assert "people-and-body/person-role/man-cook.png" in paths
    assert "symbols/keycap/keycap.png" in paths
    assert "symbols/keycap/keycap-002a-fe0f-20e3.png" in paths  # collision gets codepoints
    assert not any("skin-tone" in p or p.startswith(("flags/", "component/")) for p in paths)
    dog = next(r for r in rows if r["name"] == "dog face")
    assert (dog["group"], dog["subgroup"], dog["codepoints"]) == (
        "Animals & Nature",
        "animal-mammal",
        "1F436",
    )

    # Idempotent: a re-run renders nothing and keeps the same labels.
    again = write_demo_corpus(dest, size=64, workers=1, emoji_test=snippet_file, progress=False)
    assert (again.n_written, again.n_skipped_existing) == (0, 10)
    assert _read_labels(dest) == rows


@pytest.mark.skipif(_real_emoji_test() is None, reason="unicode-data not installed")
def test_write_demo_corpus_limit_30_real_data(tmp_path: Path) -> None:
    dest = tmp_path / "corpus"
    stats = write_demo_corpus(dest, limit=30, workers=2, progress=False)
    assert stats.n_written == 30 and stats.n_failed == 0
    rows = _check_corpus(dest, 128)
    assert len(rows) == 30
    assert len({r["group"] for r in rows}) >= 5  # the limit spreads over the groups
    assert not {r["group"] for r in rows} & {"Component", "Flags"}
    assert not any("skin tone" in r["name"] for r in rows)
