"""An unseen labeled dataset of rare, text-unfriendly concepts, built from packages alone.

Sources (no download at run time):

* handwritten digits: scikit-learn's bundled ``load_digits`` (1,797 8x8 scans, UCI), upscaled
  to ``size`` pixels with random ink/paper colours, a small rotation and offset;
* glyphs: letters rendered with the fonts matplotlib ships (DejaVu Sans/Serif/Mono in upright,
  bold and oblique/italic styles, STIX), with random colours, size, rotation and position;
* shapes: random circles, rectangles, stripes and noise (plain distractors).

Ten concepts, each ``per_concept`` images (``~1.6%`` of the ~3,000-image corpus with the
defaults), chosen to be hard for text: particular handwritten digits, a lowercase ``g``, a
capital ``Q``, an *italic* lowercase ``a`` (upright ``a`` is among the distractors), *outlined*
capitals (filled capitals are distractors), a *mirrored* capital ``R`` (plain ``R`` is a
distractor), the Greek lambda and the ampersand. Everything else is a distractor: the other
digits, the other letters, shapes.

Layout, read by ``agile simulate --dataset`` (:func:`agile_pipeline.lib.labeled_dataset.load_dataset`)::

    DEST/train/<concept>/<nnnnn>.png   DEST/train/<concept>/negatives.txt
    DEST/test/<concept>/<nnnnn>.png    (negative phrases, one a line)
    DEST/train/_other/<nnnnn>.png      (folders starting with "_" are not concepts)
    DEST/labels.csv                    (path, concept or "", split, source, detail)

Deterministic: the same ``seed`` and ``size`` give byte-identical PNGs.
"""

import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

OTHER = "_other"

UPRIGHT_FONTS: tuple[str, ...] = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf",
)
ITALIC_FONTS: tuple[str, ...] = (
    "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf", "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
)

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class ConceptSpec:
    """One concept: its folder name (the phrase), how to draw a positive, negative phrases."""

    name: str
    kind: str  # "digit", "glyph", "italic", "outline", "mirror"
    chars: str  # digit(s) or character(s) drawn
    negatives: tuple[str, ...]


CONCEPTS: tuple[ConceptSpec, ...] = (
    ConceptSpec("handwritten-seven", "digit", "7", ("handwritten one", "handwritten four")),
    ConceptSpec("handwritten-zero", "digit", "0", ("letter o", "handwritten six")),
    ConceptSpec("handwritten-three", "digit", "3", ("handwritten eight", "handwritten five")),
    ConceptSpec("lowercase-g", "glyph", "g", ("lowercase q", "lowercase y")),
    ConceptSpec("capital-q", "glyph", "Q", ("capital o", "capital c")),
    ConceptSpec("italic-lowercase-a", "italic", "a", ("upright lowercase a", "lowercase o")),
    ConceptSpec("outlined-capital-letter", "outline", "ABDEHKMNPRTUVWXYZ",
                ("filled capital letter", "bold letter")),
    ConceptSpec("mirrored-capital-r", "mirror", "R", ("capital r", "capital p")),
    ConceptSpec("greek-lambda", "glyph", "\u03bb", ("lowercase y", "lowercase x")),
    ConceptSpec("ampersand", "glyph", "&", ("plus sign", "capital s")),
)

# distractor letters: everything but the concepts' characters (upright "a", filled capitals and
# plain "R" are deliberately among them: hard negatives for the style concepts)
DISTRACTOR_CHARS = "abcdefhijklmnoprstuvwxyzABCDEFGHIJKLMNOPRSTUVWXYZ"


@dataclass
class UnseenStats:
    n_images: int
    n_per_concept: dict[str, int]
    n_distractors: int
    seconds: float


def font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _colours(rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(ink, paper) with enough luminance contrast."""
    while True:
        ink = rng.integers(0, 256, 3)
        paper = rng.integers(0, 256, 3)
        lum = lambda c: 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]  # noqa: E731
        if abs(lum(ink) - lum(paper)) > 90:
            return tuple(int(v) for v in ink), tuple(int(v) for v in paper)  # type: ignore[return-value]


def render_digit(scan: np.ndarray, rng: np.random.Generator, size: int) -> Image.Image:
    """An 8x8 scan (values 0..16) as a ``size`` x ``size`` RGB image in random colours."""
    ink, paper = _colours(rng)
    side = int(size * rng.uniform(0.55, 0.85))
    v = Image.fromarray((np.clip(scan, 0, 16) * (255 / 16)).astype(np.uint8), "L")
    v = v.resize((side, side), Image.Resampling.BICUBIC)
    v = v.rotate(float(rng.uniform(-15, 15)), resample=Image.Resampling.BILINEAR, expand=False)
    mask = Image.new("L", (size, size), 0)
    x0 = int(rng.integers(0, size - side + 1))
    y0 = int(rng.integers(0, size - side + 1))
    mask.paste(v, (x0, y0))
    return Image.composite(Image.new("RGB", (size, size), ink), Image.new("RGB", (size, size), paper), mask)


def render_glyph(char: str, font_path: Path, rng: np.random.Generator, size: int, *,
                 outline: bool = False, mirror: bool = False) -> Image.Image:
    """``char`` in the font at ``font_path``: random colours, size, rotation and position;
    ``outline`` draws only the contour, ``mirror`` flips the glyph left-right."""
    ink, paper = _colours(rng)
    font = ImageFont.truetype(str(font_path), int(size * rng.uniform(0.45, 0.75)))
    big = size * 2
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    if outline:
        w = max(2, size // 32)
        draw.text((big / 2, big / 2), char, font=font, fill=0, anchor="mm", stroke_width=w,
                  stroke_fill=255)
        inner = Image.new("L", (big, big), 0)
        ImageDraw.Draw(inner).text((big / 2, big / 2), char, font=font, fill=255, anchor="mm")
        mask = Image.fromarray(np.where(np.asarray(inner) > 127, 0, np.asarray(mask)).astype(np.uint8))
    else:
        draw.text((big / 2, big / 2), char, font=font, fill=255, anchor="mm")
    if mirror:
        mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    mask = mask.rotate(float(rng.uniform(-12, 12)), resample=Image.Resampling.BILINEAR)
    box = mask.getbbox() or (0, 0, big, big)
    glyph = mask.crop(box)
    if glyph.width > size or glyph.height > size:
        glyph.thumbnail((size, size))
    canvas = Image.new("L", (size, size), 0)
    x0 = int(rng.integers(0, size - glyph.width + 1))
    y0 = int(rng.integers(0, size - glyph.height + 1))
    canvas.paste(glyph, (x0, y0))
    return Image.composite(Image.new("RGB", (size, size), ink), Image.new("RGB", (size, size), paper), canvas)


def render_shape(rng: np.random.Generator, size: int) -> Image.Image:
    """A random circle, rectangle, stripe pattern or noise texture."""
    ink, paper = _colours(rng)
    img = Image.new("RGB", (size, size), paper)
    draw = ImageDraw.Draw(img)
    kind = int(rng.integers(0, 4))
    if kind == 0:
        r = int(size * rng.uniform(0.15, 0.4))
        cx, cy = (int(v) for v in rng.integers(r, size - r + 1, 2))
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=ink)
    elif kind == 1:
        x0, y0 = (int(v) for v in rng.integers(0, size // 2, 2))
        x1, y1 = (int(v) for v in rng.integers(size // 2, size, 2))
        draw.rectangle((x0, y0, x1, y1), outline=ink, width=int(rng.integers(2, 8)))
    elif kind == 2:
        step = int(rng.integers(6, 20))
        for x in range(0, size, step):
            draw.rectangle((x, 0, x + step // 2, size), fill=ink)
        img = img.rotate(float(rng.uniform(0, 180)), fillcolor=paper)
    else:
        noise = rng.random((size // 8, size // 8)) > 0.5
        m = Image.fromarray((noise * 255).astype(np.uint8), "L").resize((size, size), Image.Resampling.NEAREST)
        img = Image.composite(Image.new("RGB", (size, size), ink), img, m)
    return img


def _concept_image(spec: ConceptSpec, rng: np.random.Generator, size: int, fonts: Path,
                   scans: dict[int, list[np.ndarray]]) -> Image.Image:
    if spec.kind == "digit":
        return render_digit(scans[int(spec.chars)].pop(), rng, size)
    char = spec.chars[int(rng.integers(0, len(spec.chars)))]
    if spec.kind == "italic":
        return render_glyph(char, fonts / ITALIC_FONTS[int(rng.integers(0, len(ITALIC_FONTS)))], rng, size)
    font = fonts / UPRIGHT_FONTS[int(rng.integers(0, len(UPRIGHT_FONTS)))]
    if spec.kind == "glyph" and char == "\u03bb" and font.name.startswith("STIX"):
        font = fonts / "DejaVuSans.ttf"
    return render_glyph(char, font, rng, size, outline=spec.kind == "outline",
                        mirror=spec.kind == "mirror")


def write_unseen_dataset(dest: Path, *, seed: int = 0, size: int = 96, per_concept: int = 48,
                         n_glyph_distractors: int = 1000, n_shapes: int = 250,
                         test_fraction: float = 0.5) -> UnseenStats:
    """Write the dataset (see the module docstring) into ``dest``; returns counts."""
    from sklearn.datasets import load_digits

    t0 = time.perf_counter()
    dest = Path(dest)
    rng = np.random.default_rng(seed)
    fonts = font_dir()
    digits = load_digits()
    order = rng.permutation(len(digits.target))
    scans: dict[int, list[np.ndarray]] = {d: [] for d in range(10)}
    for k in order:
        scans[int(digits.target[k])].append(np.asarray(digits.images[k]))
    concept_digits = {int(s.chars) for s in CONCEPTS if s.kind == "digit"}

    rows: list[tuple[str, str, str, str, str]] = []
    counter = 0

    def save(img: Image.Image, split: str, folder: str, source: str, detail: str) -> None:
        nonlocal counter
        path = dest / split / folder / f"{counter:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, format="PNG", optimize=False)
        rows.append((str(path.relative_to(dest)), "" if folder == OTHER else folder, split, source, detail))
        counter += 1

    def split_for(i: int, n: int) -> str:
        return "test" if i < math.ceil(n * test_fraction) else "train"

    per: dict[str, int] = {}
    for spec in CONCEPTS:
        for split in ("train", "test"):
            d = dest / split / spec.name
            d.mkdir(parents=True, exist_ok=True)
            (d / "negatives.txt").write_text("\n".join(spec.negatives) + "\n", encoding="utf-8")
        for i in range(per_concept):
            img = _concept_image(spec, rng, size, fonts, scans)
            save(img, split_for(i, per_concept), spec.name, spec.kind, spec.chars)
        per[spec.name] = per_concept
    n_dis = 0
    for digit in range(10):  # the rest of the concept digits is dropped (they are positives)
        if digit in concept_digits:
            continue
        pool = scans[digit]
        for i, scan in enumerate(pool):
            save(render_digit(scan, rng, size), split_for(i, len(pool)), OTHER, "digit", str(digit))
            n_dis += 1
    for i in range(n_glyph_distractors):
        char = DISTRACTOR_CHARS[int(rng.integers(0, len(DISTRACTOR_CHARS)))]
        italic = rng.random() < 0.25 and char != "a"
        names = ITALIC_FONTS if italic else UPRIGHT_FONTS
        font = fonts / names[int(rng.integers(0, len(names)))]
        save(render_glyph(char, font, rng, size), split_for(i, n_glyph_distractors), OTHER,
             "glyph", char)
        n_dis += 1
    for i in range(n_shapes):
        save(render_shape(rng, size), split_for(i, n_shapes), OTHER, "shape", "")
        n_dis += 1
    with (dest / "labels.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "concept", "split", "source", "detail"])
        w.writerows(rows)
    return UnseenStats(counter, per, n_dis, time.perf_counter() - t0)
