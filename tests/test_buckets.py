"""Aspect buckets: the card set, the `all` set, closest-aspect choice and crop math."""

from __future__ import annotations

import math

import pytest

from train.prep.buckets import (
    CARD_BUCKETS,
    all_buckets,
    bucket_set,
    closest_bucket,
    largest_buckets,
    place,
)


def test_card_set_is_the_model_cards():
    assert set(CARD_BUCKETS) == {
        (1024, 1024),
        (1152, 896),
        (896, 1152),
        (1216, 832),
        (832, 1216),
        (1344, 768),
        (768, 1344),
        (1536, 640),
        (640, 1536),
    }


def test_all_set_properties():
    buckets = all_buckets()
    assert len(buckets) == len(set(buckets))
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert 512 <= w <= 2048 and 512 <= h <= 2048
        assert w * h <= 1024 * 1024
    assert (1024, 1024) in buckets and (2048, 512) in buckets and (512, 2048) in buckets
    assert (1088, 1024) not in buckets
    assert set(CARD_BUCKETS) <= set(buckets)


@pytest.mark.parametrize(
    "size, expected",
    [
        ((1000, 1000), (1024, 1024)),
        ((1920, 1080), (1344, 768)),
        ((1080, 1920), (768, 1344)),
        ((3000, 1000), (1536, 640)),
        ((900, 1200), (896, 1152)),
        ((1300, 900), (1216, 832)),
    ],
)
def test_closest_card_bucket(size, expected):
    assert closest_bucket(*size, CARD_BUCKETS) == expected


def test_closest_is_minimal_log_distance():
    for width, height in [(731, 1290), (1600, 1100), (517, 2000)]:
        chosen = closest_bucket(width, height, CARD_BUCKETS)
        best = min(abs(math.log(w / h) - math.log(width / height)) for w, h in CARD_BUCKETS)
        assert abs(math.log(chosen[0] / chosen[1]) - math.log(width / height)) == pytest.approx(
            best
        )


def test_all_set_prefers_largest_area_on_ties():
    assert closest_bucket(600, 600, all_buckets()) == (1024, 1024)


def test_all_set_only_chooses_largest_sizes():
    largest = largest_buckets(all_buckets())
    assert set(CARD_BUCKETS) == set(largest_buckets(CARD_BUCKETS))
    for w, h in largest:  # no side can grow by a step within the area limit
        assert (w + 64) * h > 1024 * 1024 or w == 2048
        assert w * (h + 64) > 1024 * 1024 or h == 2048
    # A 5:7 photo: not the exact-aspect 640x896, but a ~1 megapixel bucket.
    w, h = closest_bucket(3000, 4200, all_buckets())
    assert w * h >= 0.9 * 1024 * 1024
    assert abs(math.log(w / h) - math.log(3000 / 4200)) < 0.05


def test_place_covers_and_centers():
    p = place(1000, 700, (1216, 832))
    assert (p.resize_width, p.resize_height) == (1216, 851)  # scale 1.216: width fits exactly
    assert (p.crop_left, p.crop_top) == (0, 9)  # (851 - 832) // 2
    p = place(2000, 1000, (1024, 1024))
    assert (p.resize_width, p.resize_height) == (2048, 1024)
    assert (p.crop_left, p.crop_top) == (512, 0)


def test_place_never_below_bucket():
    for size in [(513, 517), (1023, 1025), (4000, 3001), (777, 1234)]:
        for bucket in CARD_BUCKETS:
            p = place(*size, bucket)
            assert p.resize_width >= p.bucket_width and p.resize_height >= p.bucket_height
            assert p.crop_left + p.bucket_width <= p.resize_width
            assert p.crop_top + p.bucket_height <= p.resize_height


def test_unknown_bucket_set():
    with pytest.raises(ValueError, match="buckets"):
        bucket_set("square")
