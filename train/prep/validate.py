"""Image validation: decode every image fully, in parallel worker processes.

Truncated files fail here, not in epoch 3. Each image is opened from its bytes (hashed with
sha256 on the way), loaded completely, oriented and converted to RGB exactly as the trainer will
(`captioning.images.to_rgb`), checked against the minimum side and Pillow's decompression-bomb limit.
Workers return small `ImageInfo` results or a reason string; no exception escapes a worker.
With `thumb_dir` set they also write each decoded image's WebP thumbnail there (for the report's
gallery), while the decoded picture is in hand: the report never decodes an image again.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from PIL import Image, UnidentifiedImageError

from captioning.images import (
    HEADER_BYTES,
    MAX_IMAGE_BYTES,
    has_alpha,
    open_image,
    sniff_format,
    to_rgb,
)

T = TypeVar("T")
R = TypeVar("R")


THUMB_SIDE = 256  # longest side of a report thumbnail, in pixels
THUMB_QUALITY = 75  # WebP quality of thumbnails (small files; the gallery is for reviewing, not pixels)


@dataclass(frozen=True)
class ValidateOptions:
    min_side: int = 512
    phash: bool = False  # compute the perceptual hash for near-duplicate detection
    thumb_dir: str | None = None  # write `thumb_dir/NAME` WebP thumbnails (names given per image)


@dataclass(frozen=True)
class ImageInfo:
    width: int  # after EXIF orientation
    height: int
    sha256: str  # of the file bytes
    format: str
    mode: str  # before conversion to RGB
    phash: int | None  # 64-bit DCT hash (imagehash.phash), if asked for
    has_alpha: bool = False  # transparency: kept by the trainer as the loss mask (train.masked_loss)


def set_pixel_limit(max_image_pixels: int | None) -> None:
    """Pillow's decompression-bomb limit for this process (None keeps Pillow's default)."""
    if max_image_pixels is not None:
        Image.MAX_IMAGE_PIXELS = max_image_pixels


def write_thumbnail(rgb: Image.Image, path: str) -> None:
    """A WebP copy of `rgb`, at most THUMB_SIDE on its longest side (best effort: the report
    shows a placeholder for a thumbnail that could not be written)."""
    scale = THUMB_SIDE / max(rgb.size)
    size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
    # reducing_gap=1: a box reduce by the whole factor first, then a tiny resize (~3x faster than
    # Pillow's default thumbnail path; the box filter is what a thumbnail wants anyway).
    thumb = rgb.resize(size, Image.Resampling.BILINEAR, reducing_gap=1.0) if scale < 1 else rgb
    try:
        thumb.save(path, "WEBP", quality=THUMB_QUALITY, method=0)
    except OSError:
        pass  # a full disk fails the dataset write itself, with one line naming OUT


def validate_image(path: str, options: ValidateOptions, thumb_name: str | None = None) -> ImageInfo | str:
    """Decode `path` fully; an `ImageInfo`, or the reason it cannot be used.

    The signature and the size are checked before the file is read whole, and only the
    accepted formats are decoded (`captioning.images`). With `options.thumb_dir` and a
    `thumb_name`, every decodable image gets a thumbnail (too small ones too: the report shows
    them among the rejected).
    """
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            header = handle.read(HEADER_BYTES)
            if not header:
                return "empty file (0 bytes)"
            if sniff_format(header) is None:
                return "not an image (unrecognised format)"
            if size > MAX_IMAGE_BYTES:
                return f"too large: {size} bytes, over the {MAX_IMAGE_BYTES // 2**20} MiB limit for one image"
            data = header + handle.read()
    except OSError as error:
        return f"cannot read: {error.strerror or error}"
    try:
        with warnings.catch_warnings():
            # Above MAX_IMAGE_PIXELS Pillow only warns (it raises above twice that): refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open_image(io.BytesIO(data)) as image:
                image_format, mode = image.format or "unknown", image.mode
                image.load()
                alpha = has_alpha(image)
                rgb = to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        return f"decompression bomb guard: {error} (raise the limit with --max-image-pixels)"
    except UnidentifiedImageError:
        # e.g. a PNG whose IHDR checksum is wrong: Pillow cannot identify it at all
        return f"corrupt image: {sniff_format(header)} signature but unreadable header"
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        # Truncated data raises OSError, bad PNG checksums SyntaxError.
        return f"corrupt image: {error}"
    width, height = rgb.size
    if options.thumb_dir is not None and thumb_name is not None:
        write_thumbnail(rgb, os.path.join(options.thumb_dir, thumb_name))
    if min(width, height) < options.min_side:
        return f"too small: {width}x{height}, shorter side below {options.min_side}"
    phash = None
    if options.phash:
        import imagehash

        phash = int(str(imagehash.phash(rgb)), 16)
    return ImageInfo(width, height, hashlib.sha256(data).hexdigest(), image_format, mode, phash, alpha)


def _validate_chunk(paths: list[str], thumbs: list[str | None], options: ValidateOptions) -> list[ImageInfo | str]:
    return [validate_image(path, options, thumb) for path, thumb in zip(paths, thumbs)]


def ordered_chunked_map(
    submit: Callable[[list[T]], object], items: Iterable[T], chunk_size: int, window: int
) -> Iterator[tuple[list[T], list[R]]]:
    """Lazily map over `items` in chunks, at most `window` chunks in flight, in input order.

    `Executor.map` would consume the whole listing up front; this keeps memory bounded by the
    window however large the dataset.
    """
    pending: deque = deque()
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == chunk_size:
            pending.append((chunk, submit(chunk)))
            chunk = []
            if len(pending) >= window:
                done_chunk, future = pending.popleft()
                yield done_chunk, future.result()
    if chunk:
        pending.append((chunk, submit(chunk)))
    while pending:
        done_chunk, future = pending.popleft()
        yield done_chunk, future.result()


def validate_many(
    items: Iterable[T],
    path_of: Callable[[T], str],
    options: ValidateOptions,
    workers: int,
    max_image_pixels: int | None = None,
    chunk_size: int = 16,
    thumb_of: Callable[[T], str] | None = None,
) -> Iterator[tuple[T, ImageInfo | str]]:
    """(item, result) for every item, in input order; `workers` > 1 uses a process pool.
    `thumb_of` names each item's thumbnail in `options.thumb_dir`."""
    set_pixel_limit(max_image_pixels)
    thumb_of = thumb_of or (lambda item: None)
    if workers <= 1:
        for item in items:
            yield item, validate_image(path_of(item), options, thumb_of(item))
        return
    # The platform's default start method: fork on Linux starts workers in milliseconds and needs
    # no `if __name__ == "__main__"` guard in user scripts; workers only touch PIL and hashlib.
    with ProcessPoolExecutor(
        workers, initializer=set_pixel_limit, initargs=(max_image_pixels,)
    ) as pool:
        yield from _pooled(pool, items, path_of, thumb_of, options, workers, chunk_size)


def _pooled(pool: Executor, items, path_of, thumb_of, options, workers, chunk_size):
    def submit(chunk):
        return pool.submit(_validate_chunk, [path_of(item) for item in chunk], [thumb_of(item) for item in chunk],
                           options)

    for chunk, results in ordered_chunked_map(submit, items, chunk_size, window=workers * 4):
        yield from zip(chunk, results)
