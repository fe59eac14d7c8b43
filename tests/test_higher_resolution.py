"""Training above the card's 1024² area: buckets scaled on the 64 grid (prep --max-area,
data.resolution_scale > 1), exact size/crop conditioning, and what each size costs in memory."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from PIL import Image

from train.cli import build_parser
from train.cli.prep import recipe_from_args
from train.config import ConfigError, parse_config
from train.data.latents import load_pixels, row_geometry
from train.names import CARD_AREA, CARD_RESOLUTIONS, scale_bucket
from train.prep.buckets import CARD_BUCKETS, bucket_set, card_buckets
from train.prep.pipeline import RunOptions, prepare
from train.prep.recipe import parse_recipe, resolve_paths
from train.runtime.memory_presets import MEMORY_PRESETS, TRAINING_SIDES, activation_gib, at_area


@pytest.mark.parametrize("scale", [1.0, 1.125, 1.25, 1.5, 2.0])
def test_scaled_card_buckets_keep_grid_area_and_aspect(scale):
    buckets = [scale_bucket(w, h, scale) for w, h in CARD_RESOLUTIONS]
    for (w, h), (bw, bh) in zip(CARD_RESOLUTIONS, buckets):
        assert bw % 64 == 0 and bh % 64 == 0
        assert bw * bh <= w * h * scale * scale + 1e-6  # never above the asked area
        assert bw * bh >= 0.85 * w * h * scale * scale  # and not far below it
        assert abs(math.log(bw / bh) - math.log(w / h)) < 0.05  # the card's aspect, within the grid
        assert scale_bucket(h, w, scale) == (bh, bw)  # portrait mirrors landscape
    if scale == 1.0:
        assert buckets == list(CARD_RESOLUTIONS)
    assert scale_bucket(1152, 896, 1.25) == (1408, 1088)


def test_bucket_sets_at_a_larger_area():
    area = 1536 * 1536
    assert bucket_set("card") == CARD_BUCKETS and bucket_set("card", CARD_AREA) == CARD_BUCKETS
    assert bucket_set("card", area) == card_buckets(area) == tuple(scale_bucket(w, h, 1.5) for w, h in CARD_BUCKETS)
    assert (1536, 1536) in bucket_set("card", area)
    everything = bucket_set("all", area)
    assert max(w * h for w, h in everything) <= area and (1536, 1536) in everything
    with pytest.raises(ValueError, match="max_area 99999999: between"):
        bucket_set("card", 99999999)


def test_prep_max_area_option_and_run(tmp_path):
    args = build_parser(["prep", "x"]).parse_args(["prep", str(tmp_path / "img"), "-o", str(tmp_path / "out"),
                                                    "--max-area", "1280x1280", "--min-side", "64"])
    assert recipe_from_args(args).dataset.max_area == 1280 * 1280
    for name, size in (("wide.png", (1800, 1400)), ("tall.png", (700, 1600))):
        (tmp_path / "img").mkdir(exist_ok=True)
        Image.new("RGB", size, (90, 40, 200)).save(tmp_path / "img" / name)
        (tmp_path / "img" / name).with_suffix(".txt").write_text("1girl, smile", encoding="utf-8")
    recipe = resolve_paths(parse_recipe({"sources": [{"name": "s", "path": str(tmp_path / "img")}],
                                         "dataset": {"min_side": 64, "max_area": 1280 * 1280}}, "t"), Path.cwd())
    result = prepare(recipe, tmp_path / "out", RunOptions(show_summary=False))
    import datasets

    found = {r["id"]: (r["bucket_width"], r["bucket_height"]) for r in datasets.load_from_disk(
        str(result.out / "dataset"))}
    # 1800x1400 (1.29) -> the card's 1152x896 at 1.25: 1408x1088; 700x1600 (0.44) -> 640x1536 scaled: 768x1856
    assert found == {"s/wide.png": (1408, 1088), "s/tall.png": (768, 1856)}
    with pytest.raises(Exception, match="max_area"):
        parse_recipe({"sources": [{"name": "s", "path": "."}], "dataset": {"max_area": 4096 * 4096}}, "t")


def _row(**values) -> dict:
    row = {"width": 1800, "height": 1400, "bucket_width": 1152, "bucket_height": 896,
           "resize_width": 1152, "resize_height": 896, "crop_left": 0, "crop_top": 0}
    row.update(values)
    return row


def test_upscaled_geometry_covers_the_bucket_and_keeps_the_crop_centre():
    # 1800x1400 into 1152x896: resized to 1152x896 exactly (same aspect), nothing cropped.
    g = row_geometry(_row(), 1.25)
    assert (g.width, g.height) == (1408, 1088)
    assert (g.resize_width, g.resize_height) == (1408, 1095) and (g.crop_left, g.crop_top) == (0, 4)
    # A wide image cropped left/right at prep: the crop keeps its centre at the larger size.
    row = _row(width=2400, height=1200, resize_width=1792, resize_height=896, crop_left=320)
    g = row_geometry(row, 1.25)
    factor = max(1408 / 1152, 1088 / 896)
    assert g.resize_width == round(1792 * factor) and g.resize_height >= g.height
    assert g.crop_left == round((320 + 576) * factor - 704)
    assert 0 <= g.crop_left <= g.resize_width - g.width and 0 <= g.crop_top <= g.resize_height - g.height


def test_size_and_crop_conditioning_match_the_pixels(tmp_path):
    """The time ids a scaled row gets are the geometry its latents were cut with: original size,
    crop inside the resized image, target = the training bucket (SDXL sec. 2.2)."""
    from train.data.rows import CaptionAugment, TrainingData

    path = tmp_path / "i.png"
    Image.new("RGB", (2400, 1200), (10, 200, 30)).save(path)
    row = _row(width=2400, height=1200, resize_width=1792, resize_height=896, crop_left=320, image_path=str(path))
    g = row_geometry(row, 1.25)
    assert tuple(load_pixels(str(path), g).shape) == (3, g.height, g.width)

    class Cache:
        scale = 1.25

    data = TrainingData([row], Cache(), CaptionAugment(False, 0.0, 0.0))
    assert data.time_ids(row, False).tolist() == [1200, 2400, g.crop_top, g.crop_left, g.height, g.width]
    assert data.time_ids(row, True).tolist()[3] == g.resize_width - g.crop_left - g.width


def test_resolution_scale_bounds(tmp_path):
    base = {"data": {"dataset": "p", "resolution_scale": 2.0}, "train": {"max_steps": 1}, "output": {"dir": "r"}}
    assert parse_config(base, "c.toml", tmp_path).data.resolution_scale == 2.0
    with pytest.raises(ConfigError, match="data.resolution_scale: Input should be less than or equal to 2"):
        parse_config({**base, "data": {"dataset": "p", "resolution_scale": 2.5}}, "c.toml", tmp_path)


def test_memory_presets_at_larger_sizes():
    assert activation_gib(CARD_AREA) == 1.0 and activation_gib(1536 * 1536, 2) == pytest.approx(4.5)
    for side in TRAINING_SIDES:
        for preset in MEMORY_PRESETS.values():
            sized = at_area(preset, side * side)
            train = sized.preset.section("train")
            assert train["batch_size"] * train["gradient_accumulation_steps"] == 8  # same effective batch
            spent = activation_gib(CARD_AREA, preset.section("train")["batch_size"])
            needed = activation_gib(side * side, train["batch_size"])
            assert sized.extra_gib == pytest.approx(max(0.0, needed - spent))
            assert train["batch_size"] == 1 or needed <= spent + 1e-9
    assert at_area(MEMORY_PRESETS["24gb"], 1536 * 1536).preset.section("train")["batch_size"] == 2
    assert at_area(MEMORY_PRESETS["8gb"], 1280 * 1280).extra_gib == pytest.approx(0.5625)


def _doc_table(page: str, first_cell: str) -> list[list[str]]:
    text = (Path(__file__).resolve().parents[1] / "docs" / page).read_text(encoding="utf-8")
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {first_cell}")]


def test_the_docs_tables_are_what_the_code_gives():
    for side in TRAINING_SIDES:  # training.md, "Higher resolutions"
        (row,) = _doc_table("training.md", f"{side}²")
        area = side * side
        assert row[1] == f"{area / CARD_AREA:.2f}" and row[2] == f"{activation_gib(area):.2f} GiB"
        for cell, preset in zip(row[3:], MEMORY_PRESETS.values(), strict=True):
            sized = at_area(preset, area)
            train = sized.preset.section("train")
            expected = f"{train['batch_size']} x {train['gradient_accumulation_steps']}"
            expected += f", +{sized.extra_gib:.2f} GiB" if sized.extra_gib else ""
            assert cell == expected, (side, preset.name)
    for side in (1024, 1152, 1280, 1536):  # prep.md, "Higher resolutions"
        (row,) = _doc_table("prep.md", f"{side}x{side} |")
        landscape = [b for b in card_buckets(side * side) if b[0] >= b[1]]
        assert row[1:] == [f"{w}x{h}" for w, h in landscape]
