"""Generators of hostile (and a few good) image files for ingestion tests.

``write_hostile_images`` writes one small file per failure mode that the image loader must
survive and returns what is expected of each; ``write_real_like_images`` writes distinct,
natural-ish small pictures for ingestion tests. Everything is deterministic and the hostile set
is well under 5 MB on disk.
"""

import hashlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, features

# --------------------------------------------------------------------------------------------
# helpers


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )


def _bilevel_png(width: int, height: int, *, full_idat: bool = True) -> bytes:
    """A single-colour 1-bit greyscale PNG built by hand (cheap even at 10k x 10k)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    if full_idat:
        row = b"\x00" * (1 + (width + 7) // 8)
        comp = zlib.compressobj(9)
        parts = [comp.compress(row) for _ in range(height)]
        parts.append(comp.flush())
        idat = b"".join(parts)
    else:
        idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _noise(rng: np.random.Generator, height: int, width: int, channels: int = 3) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _encode(im: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _frames(size: tuple[int, int], colours: list[tuple[int, int, int]]) -> list[Image.Image]:
    frames = []
    for i, colour in enumerate(colours):
        frame = Image.new("RGB", size, colour)
        ImageDraw.Draw(frame).rectangle((i * 4, i * 4, i * 4 + 10, i * 4 + 10), fill=(0, 0, 0))
        frames.append(frame)
    return frames


# --------------------------------------------------------------------------------------------
# public


def write_hostile_images(dest: Path) -> dict[str, str | None]:
    """Write one file per hostile case (and a few good images) into ``dest``.

    Returns ``{filename: expected skip reason}``, where ``None`` means the image must be
    ingested. Reasons are those of ``agile_pipeline.lib.images.SKIP_REASONS`` under default
    limits (``too_large_file`` is not generated: it needs a file above the byte limit; test it
    with a small ``max_bytes``).
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1234)
    files: dict[str, tuple[bytes, str | None]] = {}

    noise_rgb = Image.fromarray(_noise(rng, 96, 128))
    jpeg = _encode(noise_rgb, "JPEG", quality=90)
    png = _encode(noise_rgb, "PNG")

    # --- empty and non-images
    files["empty.jpg"] = (b"", "empty_file")
    files["notes.txt"] = (b"Just some text, definitely not pixels.\n" * 20, "not_an_image")
    files["text_named.jpg"] = (b"hello world, I pretend to be a JPEG\n" * 10, "not_an_image")
    files["document.pdf"] = (
        b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\nendobj\ntrailer\n%%EOF\n",
        "not_an_image",
    )
    files["page.html"] = (
        b"<!DOCTYPE html><html><head><title>404</title></head><body>Not found</body></html>\n",
        "not_an_image",
    )
    files["vector.svg"] = (
        b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
        b'<rect width="10" height="10" fill="red"/></svg>',
        "not_an_image",
    )
    random_bytes = b"\x00RND" + rng.integers(0, 256, size=4096, dtype=np.uint8).tobytes()
    files["random.bin"] = (random_bytes, "not_an_image")

    # --- truncated and corrupt
    files["truncated.jpg"] = (jpeg[: len(jpeg) // 2], "truncated")
    files["truncated_header.jpg"] = (jpeg[:200], "truncated")
    files["truncated.png"] = (png[: len(png) // 2], "truncated")
    lines = Image.new("RGB", (128, 96), (255, 255, 255))
    draw = ImageDraw.Draw(lines)
    for i in range(0, 128, 8):
        draw.line((i, 0, 127 - i, 95), fill=(i * 2, 100, 200 - i))
    broken = bytearray(_encode(lines, "PNG"))
    mid = len(broken) // 2
    broken[mid : mid + 64] = bytes(64)
    files["corrupt_mid.png"] = (bytes(broken), "corrupt")
    broken = bytearray(jpeg)
    mid = len(broken) // 2
    broken[mid : mid + 200] = rng.integers(0, 256, size=200, dtype=np.uint8).tobytes()
    files["corrupt_mid.jpg"] = (bytes(broken), "corrupt")
    broken = bytearray(jpeg)
    broken[300:2000] = b"\xff" * 1700
    files["corrupt_header.jpg"] = (bytes(broken), "corrupt")

    # --- decompression bombs
    files["bomb_10k.png"] = (_bilevel_png(10_000, 10_000), "decompression_bomb")
    files["bomb_header_30k.png"] = (
        _bilevel_png(30_000, 30_000, full_idat=False),
        "decompression_bomb",
    )

    # --- good images, including awkward but legal ones
    files["normal.jpg"] = (jpeg, None)
    files["normal.png"] = (png, None)
    frames = _frames((48, 32), [(255, 0, 0), (0, 255, 0), (0, 0, 255)])
    files["animated.gif"] = (
        _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0),
        None,
    )
    files["animated.png"] = (
        _encode(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=100),
        None,
    )
    if features.check("webp"):
        files["normal.webp"] = (_encode(noise_rgb, "WEBP", quality=80), None)
        files["animated.webp"] = (
            _encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100),
            None,
        )
    files["cmyk.jpg"] = (_encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG"), None)
    files["gray16.png"] = (
        _encode(Image.fromarray(np.full((20, 30), 32768, dtype=np.uint16)), "PNG"),
        None,
    )
    pal = Image.new("P", (32, 32), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    ImageDraw.Draw(pal).rectangle((8, 8, 23, 23), fill=1)
    files["palette_transparent.png"] = (_encode(pal, "PNG", transparency=0), None)
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).ellipse((4, 4, 27, 27), fill=(0, 0, 255, 255))
    files["rgba.png"] = (_encode(rgba, "PNG"), None)
    files["la.png"] = (_encode(Image.new("LA", (16, 16), (0, 0)), "PNG"), None)
    portrait_src = Image.new("RGB", (40, 20), (200, 30, 30))
    ImageDraw.Draw(portrait_src).rectangle((0, 0, 9, 19), fill=(20, 20, 220))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    files["exif_rotated.jpg"] = (_encode(portrait_src, "JPEG", exif=exif.tobytes()), None)
    xs = (np.arange(6000) * 255 // 5999).astype(np.uint16)
    ys = (np.arange(4000) * 255 // 3999).astype(np.uint16)
    big = np.empty((4000, 6000, 3), dtype=np.uint8)
    big[..., 0] = xs[None, :]
    big[..., 1] = ys[:, None]
    big[..., 2] = (xs[None, :] + ys[:, None]) // 2
    files["large_6000x4000.jpg"] = (_encode(Image.fromarray(big), "JPEG", quality=50), None)
    del big
    files["tiny_1x1.png"] = (_encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"), None)
    files["tiny_1x1.jpg"] = (_encode(Image.new("L", (1, 1), 128), "JPEG"), None)

    expected: dict[str, str | None] = {}
    for name, (payload, reason) in files.items():
        (dest / name).write_bytes(payload)
        expected[name] = reason
    return expected


def write_real_like_images(dest: Path, n: int, seed: int) -> list[Path]:
    """Write ``n`` distinct natural-ish pictures (gradients and shapes, 64-128 px) into ``dest``.

    Formats alternate between JPEG and PNG. Returns the paths written, in order. The same
    ``seed`` gives byte-identical files.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    paths: list[Path] = []
    i = 0
    while len(paths) < n:
        width, height = (int(v) for v in rng.integers(64, 129, size=2))
        top = rng.integers(0, 256, size=3)
        bottom = rng.integers(0, 256, size=3)
        t = np.linspace(0.0, 1.0, height)[:, None, None]
        grad = (top[None, None, :] * (1 - t) + bottom[None, None, :] * t).repeat(width, axis=1)
        grad = grad + rng.normal(0, 6, size=grad.shape)
        im = Image.fromarray(np.clip(grad, 0, 255).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(2, 7))):
            x0, x1 = sorted(int(v) for v in rng.integers(0, width, size=2))
            y0, y1 = sorted(int(v) for v in rng.integers(0, height, size=2))
            fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
            kind = int(rng.integers(0, 3))
            if kind == 0:
                draw.ellipse((x0, y0, x1 + 4, y1 + 4), fill=fill)
            elif kind == 1:
                draw.rectangle((x0, y0, x1 + 4, y1 + 4), fill=fill)
            else:
                pts = [
                    (int(rng.integers(0, width)), int(rng.integers(0, height))) for _ in range(3)
                ]
                draw.polygon(pts, fill=fill)
        fmt, ext = ("JPEG", "jpg") if i % 2 == 0 else ("PNG", "png")
        payload = _encode(im, fmt, quality=88) if fmt == "JPEG" else _encode(im, fmt)
        i += 1
        digest = hashlib.sha256(payload).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        path = dest / f"img_{seed}_{len(paths):05d}.{ext}"
        path.write_bytes(payload)
        paths.append(path)
    return paths
