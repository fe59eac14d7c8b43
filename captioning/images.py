"""Decode any image file into the RGB picture the model sees.

Shared by dataset prep (validation), the WD tagger and the trainer's latent cache, so every stage
agrees on orientation and colour: EXIF orientation applied, palette/CMYK/16-bit/greyscale converted
to 8-bit RGB, transparency composited onto white (what the WD taggers were trained on and what
Animagine's dataset builder does). `load_mask` reads the transparency (or a mask image) back as
the trainer's loss mask.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

WHITE = (255, 255, 255)

# The formats behind the image suffixes we read (JPEG includes MPO). Without `formats=` Pillow guesses among ~40
# formats by content: EPS bytes in a file named `.png` would be handed to Ghostscript, a
# PostScript interpreter, and other rare decoders widen what a crafted file can reach.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF", "AVIF")
# A single training image above this is not an image we want (a 2 GB file would be read whole
# into each worker's memory); Pillow's pixel limit guards the decoded size separately.
MAX_IMAGE_BYTES = 256 * 2**20
HEADER_BYTES = 16


def sniff_format(header: bytes) -> str | None:
    """The accepted format whose signature starts `header` (16 bytes), or None."""
    if header.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if header.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if header.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if header.startswith(b"RIFF") and header[8:12] == b"WEBP":
        return "WEBP"
    if header.startswith(b"BM"):
        return "BMP"
    if header.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    if header[4:8] == b"ftyp":
        return "AVIF"
    return None


def open_image(source: str | Path | BinaryIO) -> Image.Image:
    """`Image.open` limited to `ACCEPTED_FORMATS` (UnidentifiedImageError for anything else)."""
    return Image.open(source, formats=ACCEPTED_FORMATS)


def _to_8bit(image: Image.Image) -> Image.Image:
    """High-bit-depth single-channel modes ("I;16", "I", "F") scaled into 8-bit "L".

    Pillow's own `convert("L")` clips 16-bit values at 255 instead of scaling them, which turns
    most 16-bit greyscale PNGs white.
    """
    array = np.asarray(image, dtype=np.float64)
    peak = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
    if image.mode == "F" and array.max(initial=0) <= 1.0:
        peak = 1.0
    scaled = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def has_alpha(image: Image.Image) -> bool:
    """True when the opened image carries transparency (an alpha channel or a tRNS colour)."""
    return image.mode in ("RGBA", "LA", "La", "PA", "RGBa") or "transparency" in image.info


def load_mask(path: str | Path) -> Image.Image:
    """A loss mask as 8-bit "L", oriented like the image: the alpha channel of an image that has
    one, otherwise the grey level of a mask image (`name.mask.png`: white = train, black = ignore).

    Raises:
        OSError / PIL.UnidentifiedImageError: unreadable, truncated or not an image.
    """
    with open_image(path) as image:
        image.load()
        image = ImageOps.exif_transpose(image) or image
        if has_alpha(image):
            return image.convert("RGBA").getchannel("A")
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
            return _to_8bit(image)
        return image.convert("L")


def to_rgb(image: Image.Image) -> Image.Image:
    """An opened image as 8-bit RGB: orientation applied, alpha composited on white."""
    image = ImageOps.exif_transpose(image) or image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = _to_8bit(image)
    if image.mode == "P":
        # A palette may carry transparency (tRNS): expand it to RGBA so it is composited below.
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "La", "PA", "RGBa") or (
        image.mode == "L" and "transparency" in image.info
    ):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, WHITE)
        background.paste(image, mask=image.getchannel("A"))
        return background
    if image.mode != "RGB":
        # CMYK, YCbCr, LAB, L, 1: Pillow's conversions are correct for these.
        image = image.convert("RGB")
    return image


def load_rgb(path: str | Path | BinaryIO) -> Image.Image:
    """Open `path` fully and return it as RGB (see module docstring).

    Raises:
        OSError / PIL.UnidentifiedImageError: unreadable, truncated or not an image.
        PIL.Image.DecompressionBombError: more pixels than `Image.MAX_IMAGE_PIXELS` allows.
    """
    with open_image(path) as image:
        image.load()
        return to_rgb(image)
