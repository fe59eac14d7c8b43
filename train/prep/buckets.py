"""Aspect-ratio buckets and the resize/crop that fits an image into its bucket.

The default set is the Animagine XL 4.0 model card's resolutions, at its 1024² area or scaled to a
larger one (`max_area`, prep's `--max-area`: the same aspect ratios on the 64-pixel grid).
`all_buckets()` is the NovelAI/sd-scripts style enumeration (steps of 64, bounded area). The recorded resize and crop
give SDXL's micro-conditioning exactly (Podell et al. 2023, "SDXL", sec. 2.2):
original_size=(height, width), crops_coords_top_left=(crop_top, crop_left),
target_size=(bucket_height, bucket_width).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from train.names import CARD_AREA, CARD_RESOLUTIONS, scale_bucket

Bucket = tuple[int, int]  # (width, height)

CARD_BUCKETS: tuple[Bucket, ...] = CARD_RESOLUTIONS  # the model card's training resolutions


def all_buckets(
    step: int = 64, max_area: int = CARD_AREA, min_side: int = 512, max_side: int = 2048
) -> tuple[Bucket, ...]:
    """Every (width, height) in multiples of `step` with sides in [min_side, max_side] and
    width * height <= max_area."""
    sides = range(min_side, max_side + 1, step)
    return tuple((w, h) for w in sides for h in sides if w * h <= max_area)


MAX_AREA = 2048 * 2048  # `max_area` bound: 4x the card's area, where SDXL's composition falls apart


def card_buckets(max_area: int = CARD_AREA) -> tuple[Bucket, ...]:
    """The card's aspect ratios at `max_area`: each bucket scaled by sqrt(max_area / 1024²) onto
    the 64-pixel grid, its aspect ratio kept as closely as the grid allows (`names.scale_bucket`)."""
    if max_area == CARD_AREA:
        return CARD_BUCKETS
    scale = math.sqrt(max_area / CARD_AREA)
    return tuple(dict.fromkeys(scale_bucket(w, h, scale) for w, h in CARD_BUCKETS))


def bucket_set(name: str, max_area: int | None = None) -> tuple[Bucket, ...]:
    """`"card"` or `"all"` at `max_area` (default 1024²); anything else raises ValueError naming the choices."""
    area = max_area or CARD_AREA
    if not 64 * 64 <= area <= MAX_AREA:
        raise ValueError(f"max_area {area}: between {64 * 64} and {MAX_AREA} (2048x2048)")
    table = {"card": lambda: card_buckets(area),
             "all": lambda: all_buckets(max_area=area)}  # MAX_AREA keeps every side within 2048
    if name not in table:
        raise ValueError(f"buckets: unknown bucket set {name!r} (choose from {sorted(table)})")
    return table[name]()


@functools.lru_cache(maxsize=8)
def largest_buckets(buckets: tuple[Bucket, ...]) -> tuple[Bucket, ...]:
    """The buckets no other bucket contains (neither side can grow within the set).

    For `all_buckets()` this is sd-scripts' bucket list (for each width, the tallest height under
    the area limit); the card set is already all largest. Only these are ever chosen: images are
    resized anyway, and a smaller bucket of a slightly closer aspect would throw away resolution
    (a 3000x4200 photo trained at 640x896).
    """
    return tuple(
        b for b in buckets if not any(c != b and c[0] >= b[0] and c[1] >= b[1] for c in buckets)
    )


def closest_bucket(width: int, height: int, buckets: tuple[Bucket, ...]) -> Bucket:
    """The largest bucket whose aspect ratio is closest in log space to `width/height`.

    Log-ratio distance treats 2:1 and 1:2 symmetrically; ties go to the larger area.
    """
    aspect = math.log(width / height)

    def key(bucket: Bucket) -> tuple[float, int]:
        return round(abs(math.log(bucket[0] / bucket[1]) - aspect), 12), -bucket[0] * bucket[1]

    return min(largest_buckets(tuple(buckets)), key=key)


@dataclass(frozen=True)
class Placement:
    """How an image of `width` x `height` becomes its bucket: resize (cover), then center crop."""

    bucket_width: int
    bucket_height: int
    resize_width: int
    resize_height: int
    crop_left: int
    crop_top: int


def place(width: int, height: int, bucket: Bucket) -> Placement:
    """Aspect-preserving resize so the image covers `bucket`, then a center crop.

    The scale is the larger of the two side ratios; rounding never drops a side below the bucket.
    """
    bucket_width, bucket_height = bucket
    scale = max(bucket_width / width, bucket_height / height)
    resize_width = max(bucket_width, round(width * scale))
    resize_height = max(bucket_height, round(height * scale))
    return Placement(
        bucket_width=bucket_width,
        bucket_height=bucket_height,
        resize_width=resize_width,
        resize_height=resize_height,
        crop_left=(resize_width - bucket_width) // 2,
        crop_top=(resize_height - bucket_height) // 2,
    )
