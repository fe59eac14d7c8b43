"""captioning.images.load_rgb: orientation, mode conversions, alpha on white."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from captioning.images import load_rgb


def _save(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def test_exif_orientation_applied(tmp_path):
    # 40x20 with the left half red; EXIF orientation 6 = rotate 90 degrees clockwise on display.
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(image, tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_rgb(path)
    assert out.size == (20, 40)
    top = np.asarray(out)[5, 10]
    bottom = np.asarray(out)[35, 10]
    assert top[0] > 200 and top[2] < 60  # the red left half is now on top
    assert bottom[2] > 200


def test_rgba_composited_on_white(tmp_path):
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    image.putpixel((0, 0), (0, 0, 255, 255))
    image.putpixel((1, 0), (0, 0, 0, 128))
    out = load_rgb(_save(image, tmp_path / "a.png"))
    assert out.mode == "RGB"
    assert out.getpixel((5, 5)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (0, 0, 255)
    assert all(120 <= c <= 135 for c in out.getpixel((1, 0)))


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 255, 0] + [255, 0, 0] * 255)
    image.putpixel((0, 0), 1)
    path = _save(image, tmp_path / "p.png", transparency=0)
    out = load_rgb(path)
    assert out.getpixel((2, 2)) == (255, 255, 255)  # transparent index -> white, not green
    assert out.getpixel((0, 0)) == (255, 0, 0)


def test_cmyk_jpeg(tmp_path):
    path = _save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "c.jpg")
    red = load_rgb(path).getpixel((4, 4))
    assert red[0] > 200 and red[1] < 60 and red[2] < 60


def test_16_bit_greyscale_scaled_not_clipped(tmp_path):
    array = np.full((8, 8), 32768, dtype=np.uint16)
    path = _save(Image.fromarray(array), tmp_path / "g16.png")
    assert Image.open(path).mode.startswith("I")
    value = load_rgb(path).getpixel((0, 0))
    assert value[0] == value[1] == value[2]
    assert 125 <= value[0] <= 130  # 32768/65535*255, not clipped to 255


@pytest.mark.parametrize("mode, colour", [("L", 77), ("LA", (77, 255)), ("1", 1)])
def test_greyscale_modes(tmp_path, mode, colour):
    out = load_rgb(_save(Image.new(mode, (4, 4), colour), tmp_path / "g.png"))
    assert out.mode == "RGB"
    r, g, b = out.getpixel((0, 0))
    assert r == g == b
