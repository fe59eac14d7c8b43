"""Image validation (every bad-input case), parallel validation and duplicate detection."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib

import pytest
from PIL import Image

from train.prep.dedupe import Deduplicator
from train.prep.validate import ImageInfo, ValidateOptions, validate_image, validate_many

OPTIONS = ValidateOptions(min_side=64)


def _png(size=(96, 80), colour=(10, 200, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def _jpeg(size=(96, 80)) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise(size, 60).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares `width` x `height` (valid CRC) but holds almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


def test_good_image(tmp_path):
    data = _png()
    path = tmp_path / "ok.png"
    path.write_bytes(data)
    info = validate_image(str(path), OPTIONS)
    assert isinstance(info, ImageInfo)
    assert (info.width, info.height) == (96, 80)
    assert info.sha256 == hashlib.sha256(data).hexdigest()


def test_size_is_after_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees
    path = tmp_path / "r.jpg"
    Image.new("RGB", (120, 70)).save(path, exif=exif)
    info = validate_image(str(path), ValidateOptions(min_side=16))
    assert (info.width, info.height) == (70, 120)


@pytest.mark.parametrize(
    "name, data, reason",
    [
        ("zero.png", b"", "empty file"),
        ("text.png", b"hello, this is not an image", "not an image"),
        ("truncated.jpg", _jpeg()[:-400], "corrupt image"),
        ("small.png", _png((96, 40)), "too small"),
    ],
)
def test_bad_files_are_reasons_not_crashes(tmp_path, name, data, reason):
    path = tmp_path / name
    path.write_bytes(data)
    result = validate_image(str(path), OPTIONS)
    assert isinstance(result, str) and reason in result


def test_png_bad_crc(tmp_path):
    data = bytearray(_png())
    data[29] ^= 0xFF  # inside the IHDR chunk's CRC (8 signature + 8 header + 13 data)
    path = tmp_path / "crc.png"
    path.write_bytes(bytes(data))
    result = validate_image(str(path), OPTIONS)
    assert isinstance(result, str) and "corrupt image" in result


def test_decompression_bomb_guard_and_override(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored afterwards
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_declaring(100_000, 100_000))
    result = validate_image(str(path), OPTIONS)
    assert isinstance(result, str) and "decompression bomb" in result
    # Moderately over a lowered limit (only a warning in Pillow) is refused too.
    big = tmp_path / "big.png"
    big.write_bytes(_png((300, 300)))
    results = dict(validate_many([str(big)], str, OPTIONS, workers=1, max_image_pixels=50_000))
    assert "decompression bomb" in results[str(big)]
    results = dict(validate_many([str(big)], str, OPTIONS, workers=1, max_image_pixels=200_000))
    assert isinstance(results[str(big)], ImageInfo)


def test_missing_file(tmp_path):
    result = validate_image(str(tmp_path / "gone.png"), OPTIONS)
    assert isinstance(result, str) and "cannot read" in result


def test_parallel_matches_serial_and_keeps_order(tmp_path):
    paths = []
    for index in range(40):
        path = tmp_path / f"{index:02d}.png"
        path.write_bytes(_png((64 + index, 70), (index * 5, 0, 0)) if index % 7 else b"junk")
        paths.append(str(path))
    serial = list(validate_many(paths, str, OPTIONS, workers=1))
    parallel = list(validate_many(iter(paths), str, OPTIONS, workers=2, chunk_size=3))
    assert [p for p, _ in parallel] == paths
    assert serial == parallel


def test_exact_and_near_duplicates(tmp_path):
    base = Image.radial_gradient("L").convert("RGB").resize((128, 128))
    paths = {}
    for name, image in {
        "a": base,
        "b": base.point(lambda v: min(255, v + 3)),
        "c": base.rotate(90),
    }.items():
        paths[name] = tmp_path / f"{name}.png"
        image.save(paths[name])
    paths["a_copy"] = tmp_path / "a_copy.png"
    paths["a_copy"].write_bytes(paths["a"].read_bytes())
    options = ValidateOptions(min_side=64, phash=True)
    infos = {name: validate_image(str(p), options) for name, p in paths.items()}
    exact = Deduplicator(near_dup=False)
    assert exact.check("a", infos["a"].sha256, infos["a"].phash) is None
    assert exact.check("a_copy", infos["a_copy"].sha256, None) == ("a_copy", "exact duplicate", "a")
    assert exact.check("b", infos["b"].sha256, infos["b"].phash) is None
    near = Deduplicator(near_dup=True, max_distance=4)
    assert near.check("a", infos["a"].sha256, infos["a"].phash) is None
    assert near.check("b", infos["b"].sha256, infos["b"].phash) == ("b", "near duplicate", "a")
    assert near.check("c", infos["c"].sha256, infos["c"].phash) is None
