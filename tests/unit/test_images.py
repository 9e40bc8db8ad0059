"""Safe image loading: every hostile file is ingested correctly or rejected for the right reason."""

import hashlib
import io
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from agile_pipeline.lib import images
from agile_pipeline.lib.images import (
    SKIP_REASONS,
    ImageInfo,
    ImageRejected,
    inspect_image,
    load_rgb,
    load_rgb_with_info,
    read_bytes,
)
from tests.hostile_images import write_hostile_images, write_real_like_images


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str | None]]:
    dest = tmp_path_factory.mktemp("hostile")
    return dest, write_hostile_images(dest)


def _outcome(source: bytes | Path) -> str | None:
    try:
        image = load_rgb(source)
    except ImageRejected as exc:
        assert exc.reason in SKIP_REASONS
        return exc.reason
    assert image.mode == "RGB"
    assert max(image.size) <= 512
    return None


def test_hostile_set_is_small_and_covers_every_reason(
    hostile: tuple[Path, dict[str, str | None]],
) -> None:
    dest, expected = hostile
    total = sum(p.stat().st_size for p in dest.iterdir())
    assert total < 5 * 1024 * 1024
    assert set(expected.values()) >= set(SKIP_REASONS) - {"too_large_file", "unreadable"} | {None}


def test_every_hostile_file_has_the_expected_outcome(
    hostile: tuple[Path, dict[str, str | None]],
) -> None:
    dest, expected = hostile
    got_from_path = {name: _outcome(dest / name) for name in expected}
    got_from_bytes = {name: _outcome((dest / name).read_bytes()) for name in expected}
    assert got_from_path == expected
    assert got_from_bytes == expected


def test_inspect_agrees_with_load(hostile: tuple[Path, dict[str, str | None]]) -> None:
    dest, expected = hostile
    for name, reason in expected.items():
        data = (dest / name).read_bytes()
        if reason is None:
            info = inspect_image(data)
            assert isinstance(info, ImageInfo)
            assert info.width >= 1 and info.height >= 1 and info.n_frames >= 1
        else:
            with pytest.raises(ImageRejected) as excinfo:
                inspect_image(data)
            assert excinfo.value.reason == reason, name
            assert excinfo.value.detail


def test_global_pillow_and_warning_state_untouched(
    hostile: tuple[Path, dict[str, str | None]],
) -> None:
    dest, expected = hostile
    filters_before = list(warnings.filters)
    max_pixels_before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(_outcome, [dest / name for name in expected] * 2))
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert list(warnings.filters) == filters_before
    assert Image.MAX_IMAGE_PIXELS == max_pixels_before
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_16_bit_grey_is_scaled_not_saturated(hostile: tuple[Path, dict[str, str | None]]) -> None:
    dest, _ = hostile
    image, info = load_rgb_with_info(dest / "gray16.png")
    assert info.mode.startswith("I")
    arr = np.asarray(image)
    assert arr.shape == (20, 30, 3)
    assert abs(int(arr.mean()) - 128) <= 1


def test_cmyk_jpeg_becomes_the_right_rgb(hostile: tuple[Path, dict[str, str | None]]) -> None:
    dest, _ = hostile
    image, info = load_rgb_with_info(dest / "cmyk.jpg")
    assert info.mode == "CMYK"
    r, g, b = np.asarray(image).reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 60 and b < 60


def test_transparency_is_composited_on_white(hostile: tuple[Path, dict[str, str | None]]) -> None:
    dest, _ = hostile
    pal = np.asarray(load_rgb(dest / "palette_transparent.png"))
    assert tuple(pal[0, 0]) == (255, 255, 255)
    assert tuple(pal[16, 16]) == (255, 0, 0)
    rgba = np.asarray(load_rgb(dest / "rgba.png"))
    assert tuple(rgba[0, 0]) == (255, 255, 255)
    assert tuple(rgba[16, 16]) == (0, 0, 255)
    la = np.asarray(load_rgb(dest / "la.png"))
    assert (la == 255).all()


def test_exif_orientation_is_applied(hostile: tuple[Path, dict[str, str | None]]) -> None:
    dest, _ = hostile
    data = (dest / "exif_rotated.jpg").read_bytes()
    info = inspect_image(data)
    assert (info.width, info.height) == (20, 40)
    arr = np.asarray(load_rgb(data)).astype(int)
    assert arr.shape == (40, 20, 3)
    # The blue stripe stored on the left is on top once rotated 90 degrees clockwise.
    assert arr[:8, :, 2].mean() > 150 and arr[:8, :, 0].mean() < 100
    assert arr[-8:, :, 0].mean() > 150 and arr[-8:, :, 2].mean() < 100


@pytest.mark.parametrize("name", ["animated.gif", "animated.png", "animated.webp"])
def test_animations_give_first_frame_and_frame_count(
    hostile: tuple[Path, dict[str, str | None]], name: str
) -> None:
    dest, expected = hostile
    if name not in expected:
        pytest.skip(f"{name} not generated (no codec)")
    image, info = load_rgb_with_info(dest / name)
    assert info.n_frames == 3
    r, g, b = np.asarray(image)[-1, -1].astype(int)
    assert r > 200 and g < 60 and b < 60  # first frame is red


def test_large_jpeg_is_decoded_reduced_and_fast(
    hostile: tuple[Path, dict[str, str | None]],
) -> None:
    dest, _ = hostile
    start = time.perf_counter()
    image, info = load_rgb_with_info(dest / "large_6000x4000.jpg", max_side=256)
    elapsed = time.perf_counter() - start
    assert (info.width, info.height) == (6000, 4000)
    assert image.size == (256, 171)
    assert elapsed < 2.0


def test_tiny_images_are_kept_and_never_upscaled(
    hostile: tuple[Path, dict[str, str | None]],
) -> None:
    dest, _ = hostile
    assert load_rgb(dest / "tiny_1x1.png", max_side=512).size == (1, 1)
    assert load_rgb(dest / "tiny_1x1.jpg").getpixel((0, 0)) == (128, 128, 128)
    assert load_rgb(dest / "normal.png", max_side=None).size == (128, 96)


def test_max_pixels_is_a_local_limit(hostile: tuple[Path, dict[str, str | None]]) -> None:
    dest, _ = hostile
    data = (dest / "normal.jpg").read_bytes()  # 128 x 96 = 12288 pixels
    with pytest.raises(ImageRejected) as excinfo:
        inspect_image(data, max_pixels=10_000)
    assert excinfo.value.reason == "decompression_bomb"
    assert inspect_image(data, max_pixels=12_288).width == 128
    with pytest.raises(ImageRejected):
        load_rgb(data, max_pixels=10_000)
    assert Image.MAX_IMAGE_PIXELS != 10_000


def test_read_bytes_limits_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    path.write_bytes(b"x" * 100)
    assert read_bytes(path, max_bytes=100) == b"x" * 100
    with pytest.raises(ImageRejected) as excinfo:
        read_bytes(path, max_bytes=99)
    assert excinfo.value.reason == "too_large_file"
    with pytest.raises(ImageRejected) as excinfo:
        load_rgb(path, max_bytes=10)
    assert excinfo.value.reason == "too_large_file"
    for bad in (tmp_path / "missing.jpg", tmp_path):
        with pytest.raises(ImageRejected) as excinfo:
            read_bytes(bad)
        assert excinfo.value.reason == "unreadable"
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert read_bytes(empty) == b""
    with pytest.raises(ImageRejected) as excinfo:
        load_rgb(str(empty))
    assert excinfo.value.reason == "empty_file"


def test_image_rejected_validates_reason() -> None:
    exc = ImageRejected("corrupt", "bad bytes")
    assert exc.reason == "corrupt" and exc.detail == "bad bytes"
    assert "corrupt" in str(exc)
    with pytest.raises(ValueError):
        ImageRejected("nope")


def test_mutated_files_never_raise_anything_else(
    hostile: tuple[Path, dict[str, str | None]],
) -> None:
    """Cuts and byte flips of good files: decoded to RGB or rejected, nothing else."""
    dest, _ = hostile
    rng = np.random.default_rng(7)
    names = ["normal.jpg", "normal.png", "animated.gif", "cmyk.jpg", "gray16.png", "rgba.png"]
    if (dest / "animated.webp").exists():
        names.append("animated.webp")
    for name in names:
        data = (dest / name).read_bytes()
        for _ in range(25):
            mutated = bytearray(data)
            if rng.random() < 0.5:
                mutated = mutated[: int(rng.integers(1, len(data)))]
            else:
                for pos in rng.integers(0, len(data), size=int(rng.integers(1, 8))):
                    mutated[int(pos)] = int(rng.integers(0, 256))
            reason = _outcome(bytes(mutated))
            assert reason is None or reason in SKIP_REASONS


def test_bytearray_source_and_thread_safety(hostile: tuple[Path, dict[str, str | None]]) -> None:
    dest, _ = hostile
    data = bytearray((dest / "normal.jpg").read_bytes())
    assert load_rgb(data).size == (128, 96)
    results: list[tuple[int, int]] = []
    lock = threading.Lock()

    def work() -> None:
        size = load_rgb(bytes(data)).size
        with lock:
            results.append(size)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [(128, 96)] * 8


def test_real_like_images_are_distinct_deterministic_and_loadable(tmp_path: Path) -> None:
    paths = write_real_like_images(tmp_path / "a", 20, seed=3)
    again = write_real_like_images(tmp_path / "b", 20, seed=3)
    assert len(paths) == 20
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    assert len(set(digests)) == 20
    assert digests == [hashlib.sha256(p.read_bytes()).hexdigest() for p in again]
    assert {p.suffix for p in paths} == {".jpg", ".png"}
    for p in paths:
        image, info = load_rgb_with_info(p)
        assert 64 <= info.width <= 128 and 64 <= info.height <= 128
        assert np.asarray(image).std() > 0


def test_allowed_formats_exclude_exotic_ones() -> None:
    assert "JPEG" in images.ALLOWED_FORMATS and "PNG" in images.ALLOWED_FORMATS
    assert "EPS" not in images.ALLOWED_FORMATS
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "TGA")  # a legal image, but not a format we accept
    with pytest.raises(ImageRejected) as excinfo:
        load_rgb(buf.getvalue())
    assert excinfo.value.reason == "not_an_image"
