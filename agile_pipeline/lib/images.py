"""Safe image inspection and loading.

Every image that enters the system (folder ingestion, URL downloads, the app's thumbnailer, the
embedder) goes through this module. Each input is either decoded correctly or rejected with an
:class:`ImageRejected` whose ``reason`` is one of :data:`SKIP_REASONS`; no input may raise any
other exception or hang.

What is handled:

* empty files, non-images (text, HTML, PDF, random bytes) and formats outside
  :data:`ALLOWED_FORMATS`;
* truncated and corrupt files: the image is always fully decoded (``load()``) with Pillow's
  ``ImageFile.LOAD_TRUNCATED_IMAGES`` left at its default of ``False`` (``verify()`` alone lets
  truncated JPEGs through);
* decompression bombs: ``width * height`` from the header is checked against ``max_pixels``
  *before* any pixel is decoded; Pillow's own ``DecompressionBombWarning`` /
  ``DecompressionBombError`` are caught locally, without touching global settings;
* animated GIF / WebP / APNG (first frame, ``n_frames`` recorded), CMYK JPEGs (ICC-aware when
  the file carries a profile), 16-bit greyscale (scaled, not saturated), palette / LA / RGBA
  transparency (composited on white), EXIF orientation, very large JPEGs (decoded reduced with
  ``draft()``), and 1x1 images.
"""

import io
import logging
import struct
import threading
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

logger = logging.getLogger(__name__)

SKIP_REASONS: tuple[str, ...] = (
    "empty_file",
    "not_an_image",
    "truncated",
    "corrupt",
    "decompression_bomb",
    "too_large_file",
    "unreadable",
)
"""Every reason an image can be skipped for (``ImageRejected.reason``)."""

MAX_PIXELS = 64_000_000
"""Default cap on ``width * height`` read from the header, checked before decoding."""

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
"""Default cap on the size of an image file read from disk."""

DEFAULT_MAX_SIDE = 512
"""Default longest side of images returned by :func:`load_rgb`."""

_WANTED_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF", "PPM", "ICO")

_MAGIC_PREFIXES: tuple[bytes, ...] = (
    b"\xff\xd8",  # JPEG / MPO
    b"\x89PNG",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"\x00\x00\x01\x00",  # ICO
)

# EXIF orientation -> transpose that makes the image upright (same table as ImageOps).
_ORIENTATION_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION_TAG = 0x0112

# ``warnings.catch_warnings`` mutates process-global state; serialise our own use of it. It
# only wraps ``Image.open`` (header parsing), so decoding still runs in parallel.
_OPEN_LOCK = threading.Lock()


class ImageRejected(Exception):
    """An input that cannot be used as an image.

    ``reason`` is one of :data:`SKIP_REASONS` (machine readable, used for skip counts);
    ``detail`` is a human readable explanation.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {SKIP_REASONS}")
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass(frozen=True)
class ImageInfo:
    """What :func:`inspect_image` learned about a decodable image.

    ``width``/``height`` are after EXIF orientation is applied; ``format`` is Pillow's format
    name (``"JPEG"``, ``"PNG"``, ...); ``mode`` is the stored mode (``"CMYK"``, ``"I;16"``, ...);
    ``n_frames`` is 1 for still images.
    """

    width: int
    height: int
    format: str
    mode: str
    n_frames: int


def allowed_formats() -> tuple[str, ...]:
    """Pillow format names this module will open (those of :data:`_WANTED_FORMATS` available)."""
    Image.init()
    return tuple(f for f in _WANTED_FORMATS if f in Image.OPEN)


ALLOWED_FORMATS: tuple[str, ...] = allowed_formats()
"""Image formats accepted; anything else is ``not_an_image``."""


def read_bytes(path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Read a whole file, refusing files larger than ``max_bytes``.

    Raises :class:`ImageRejected` with reason ``too_large_file`` or ``unreadable`` (missing file,
    permission denied, a directory, I/O error). An empty file is returned as ``b""``; the
    decoding functions reject it as ``empty_file``.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise ImageRejected("unreadable", f"{path} is not a regular file")
        if size > max_bytes:
            raise ImageRejected(
                "too_large_file", f"{path} is {size} bytes, over the limit of {max_bytes}"
            )
        with path.open("rb") as fh:
            data = fh.read(max_bytes + 1)
    except ImageRejected:
        raise
    except OSError as exc:
        raise ImageRejected("unreadable", f"{path}: {exc}") from exc
    if len(data) > max_bytes:  # the file grew while we read it
        raise ImageRejected("too_large_file", f"{path} is over the limit of {max_bytes} bytes")
    return data


def inspect_image(data: bytes, *, max_pixels: int = MAX_PIXELS) -> ImageInfo:
    """Check that ``data`` is a complete, decodable, reasonably sized image and describe it.

    The first frame is decoded in full (JPEGs at reduced DCT scale, which still reads and
    checks the whole bitstream). Raises :class:`ImageRejected` otherwise.
    """
    im, info = _decode(data, max_pixels=max_pixels, draft_side=256)
    im.close()
    return info


def load_rgb(
    source: bytes | str | Path,
    *,
    max_side: int | None = DEFAULT_MAX_SIDE,
    max_pixels: int = MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Image.Image:
    """Decode an image to an upright 8-bit RGB image whose longest side is at most ``max_side``.

    ``source`` is raw bytes or a file path. Transparency is composited on white, 16-bit data
    is scaled to 8 bits, CMYK is converted to RGB, animations give their first frame, and the
    image is never upscaled. ``max_side=None`` keeps the full resolution. Raises
    :class:`ImageRejected` for anything that is not a usable image.
    """
    image, _info = load_rgb_with_info(
        source, max_side=max_side, max_pixels=max_pixels, max_bytes=max_bytes
    )
    return image


def load_rgb_with_info(
    source: bytes | str | Path,
    *,
    max_side: int | None = DEFAULT_MAX_SIDE,
    max_pixels: int = MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[Image.Image, ImageInfo]:
    """Like :func:`load_rgb`, also returning the :class:`ImageInfo` (one decode for both)."""
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be positive or None, got {max_side}")
    data = source if isinstance(source, bytes | bytearray | memoryview) else None
    if data is None:
        data = read_bytes(Path(source), max_bytes=max_bytes)
    im, info = _decode(bytes(data), max_pixels=max_pixels, draft_side=max_side)
    try:
        rgb = _to_rgb(im)
        if max_side is not None and max(rgb.size) > max_side:
            rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS, reducing_gap=2.0)
        orientation = _orientation(im)
        if orientation in _ORIENTATION_TRANSPOSE:
            rgb = rgb.transpose(_ORIENTATION_TRANSPOSE[orientation])
    except ImageRejected:
        raise
    except MemoryError as exc:
        raise ImageRejected("decompression_bomb", f"out of memory converting: {exc}") from exc
    except Exception as exc:
        raise ImageRejected("corrupt", f"cannot convert {info.mode} to RGB: {exc}") from exc
    finally:
        im.close()
    return rgb, info


# --------------------------------------------------------------------------------------------
# internals


def _looks_like_image(data: bytes) -> bool:
    if data.startswith(_MAGIC_PREFIXES):
        return True
    return data[:4] == b"RIFF" and data[8:12] == b"WEBP"


def _quiet_open(
    data: bytes, formats: tuple[str, ...]
) -> tuple[ImageFile.ImageFile, list[warnings.WarningMessage]]:
    """``Image.open`` (header only) with its warnings captured instead of emitted."""
    with _OPEN_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        im = Image.open(io.BytesIO(data), formats=formats)
    return im, caught


def _open(data: bytes, max_pixels: int) -> ImageFile.ImageFile:
    """``Image.open`` with format allowlist and local decompression-bomb handling."""
    if not data:
        raise ImageRejected("empty_file", "zero bytes")
    try:
        im, caught = _quiet_open(data, ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageRejected("decompression_bomb", str(exc)) from exc
    except UnidentifiedImageError as exc:
        if _looks_like_image(data):
            raise ImageRejected("corrupt", "image signature present but header unreadable") from exc
        raise ImageRejected("not_an_image", "not a recognised image format") from exc
    except (EOFError, OSError, SyntaxError, ValueError) as exc:
        raise _classify_decode_error(exc) from exc
    except MemoryError as exc:
        raise ImageRejected("decompression_bomb", f"out of memory reading header: {exc}") from exc
    except Exception as exc:
        raise ImageRejected("corrupt", f"header: {type(exc).__name__}: {exc}") from exc

    width, height = im.size
    pixels = max(1, width) * max(1, height)
    bomb_warned = any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught)
    if pixels > max_pixels:
        im.close()
        raise ImageRejected(
            "decompression_bomb",
            f"{width}x{height} = {pixels} pixels exceeds the limit of {max_pixels}",
        )
    if bomb_warned:
        logger.debug("Pillow warned about %dx%d, but it is within max_pixels", width, height)
    if width < 1 or height < 1:
        im.close()
        raise ImageRejected("corrupt", f"invalid size {width}x{height}")
    return im


def _classify_decode_error(exc: BaseException) -> ImageRejected:
    message = str(exc)
    lowered = message.lower()
    if isinstance(exc, EOFError) or "truncated" in lowered or "premature end" in lowered:
        return ImageRejected("truncated", message or type(exc).__name__)
    return ImageRejected("corrupt", f"{type(exc).__name__}: {message}")


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_EXIF_ORIENTATION_TAG, 1)
        return int(value) if isinstance(value, int) else 1
    except Exception:  # malformed EXIF is not a reason to drop an otherwise good image
        return 1


def _count_frames(data: bytes, im: ImageFile.ImageFile) -> int:
    if im.format not in ("GIF", "TIFF", "MPO"):
        # PNG (acTL), WebP and AVIF know their frame count from the header without seeking.
        try:
            return max(1, int(getattr(im, "n_frames", 1) or 1))
        except Exception:
            return 1
    # Counting GIF/TIFF frames seeks through the file; do it on a separate handle so that
    # the decoded first frame is untouched, and never fail the image for a bad later frame.
    try:
        with _quiet_open(data, (im.format,))[0] as other:
            return max(1, int(getattr(other, "n_frames", 1)))
    except Exception as exc:
        logger.debug("could not count frames: %s", exc)
        return 1


def _check_png_chunks(data: bytes) -> None:
    """Verify the CRC of every critical PNG chunk.

    Pillow's decoder does not check IDAT CRCs (nor zlib's Adler-32 once it has all rows), so
    bytes damaged mid-file would otherwise decode to silent garbage. Like libpng, a bad CRC in
    an ancillary chunk (text, EXIF, ...) is tolerated.
    """
    view = memoryview(data)
    pos = 8
    end = len(data)
    while pos < end:
        if pos + 8 > end:
            raise ImageRejected("truncated", f"PNG chunk header cut at byte {pos}")
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        stop = pos + 8 + length
        if stop + 4 > end:
            raise ImageRejected("truncated", f"PNG chunk {kind!r} cut at byte {end}")
        critical = not (kind[0] & 0x20)
        if critical:
            (stored,) = struct.unpack(">I", data[stop : stop + 4])
            if zlib.crc32(view[pos + 4 : stop]) & 0xFFFFFFFF != stored:
                raise ImageRejected("corrupt", f"bad CRC in PNG chunk {kind!r} at byte {pos}")
        if kind == b"IEND":
            return
        pos = stop + 4


def _decode(
    data: bytes, *, max_pixels: int, draft_side: int | None
) -> tuple[ImageFile.ImageFile, ImageInfo]:
    """Open, size-check and fully decode the first frame; return it with its info."""
    im = _open(data, max_pixels)
    fmt = im.format or "UNKNOWN"
    mode = im.mode
    width, height = im.size
    try:
        if fmt == "PNG":
            _check_png_chunks(data)
        n_frames = 1
        if fmt in ("GIF", "PNG", "WEBP", "TIFF", "MPO", "AVIF"):
            n_frames = _count_frames(data, im)
        orientation = _orientation(im)
        if draft_side is not None and fmt in ("JPEG", "MPO"):
            im.draft(im.mode, (draft_side, draft_side))
        # No warnings.catch_warnings() here: it is process-global state and decoding runs in
        # parallel threads; Pillow's pixel-count warnings cannot fire below max_pixels anyway.
        im.load()
    except ImageRejected:
        im.close()
        raise
    except MemoryError as exc:
        im.close()
        raise ImageRejected("decompression_bomb", f"out of memory decoding: {exc}") from exc
    except (EOFError, OSError, SyntaxError, ValueError) as exc:
        im.close()
        raise _classify_decode_error(exc) from exc
    except Exception as exc:
        im.close()
        raise ImageRejected("corrupt", f"{type(exc).__name__}: {exc}") from exc
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return im, ImageInfo(width=width, height=height, format=fmt, mode=mode, n_frames=n_frames)


def _scale_to_uint8(arr: np.ndarray, sixteen_bit: bool) -> np.ndarray:
    if sixteen_bit:
        wide = arr.astype(np.uint32)
        return ((wide * 255 + 32767) // 65535).astype(np.uint8)
    values = arr.astype(np.float64)
    lo = float(values.min()) if values.size else 0.0
    hi = float(values.max()) if values.size else 0.0
    if arr.dtype.kind == "f":
        if lo >= 0.0 and hi <= 1.0:
            values = values * 255.0
    elif lo >= 0 and hi <= 255:
        pass
    elif lo >= 0 and hi <= 65535:
        values = values * (255.0 / 65535.0)
    elif hi > lo:
        values = (values - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    icc = im.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            dst = ImageCms.createProfile("sRGB")
            converted = ImageCms.profileToProfile(im, src, dst, outputMode="RGB")
            if converted is not None:
                return converted
        except Exception as exc:  # a broken profile: fall back to the plain formula
            logger.debug("ICC conversion of CMYK image failed: %s", exc)
    return im.convert("RGB")


def _white_background(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    out = Image.new("RGB", rgba.size, (255, 255, 255))
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (alpha composited on white)."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im.copy() if isinstance(im, ImageFile.ImageFile) else im
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(im)
        grey = _scale_to_uint8(arr, sixteen_bit=mode.startswith("I;16"))
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(im)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB", "1") and "transparency" in im.info
    ):
        return _white_background(im)
    if mode == "P":
        palette_mode = im.palette.mode if im.palette is not None else "RGB"
        if "A" in palette_mode:
            return _white_background(im)
    return im.convert("RGB")
