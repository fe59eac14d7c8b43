"""The WD v3 tagger on a tiny ONNX model with the real input/output contract.

The model outputs linear functions of the image's per-channel means (channel order as fed,
i.e. BGR), so the expected probabilities of a known image are computed by hand: they check the
white padding, the BGR order, the 0..255 scale and the thresholds through the real code path.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnx")
from tagger_helpers import TAGGER_SIDE as SIDE
from tagger_helpers import build_tiny_tagger

from captioning import Category
from captioning.tagger import WDTagger, read_labels

# name, WD category, weights on (B, G, R) channel means in [0, 1], bias
LABELS = [
    ("general", 9, (0, 0, 0), 0.3),
    ("sensitive", 9, (0, 0, 0.5), 0.0),
    ("questionable", 9, (0, 0, 0), 0.1),
    ("explicit", 9, (0, 0, 0), 0.0),
    ("blue_tag", 0, (1, 0, 0), 0.0),
    ("green_tag", 0, (0, 1, 0), 0.0),
    ("red_tag", 0, (0, 0, 1), 0.0),
    ("red_girl_(sample)", 4, (0, 0, 0.9), 0.0),
    (":d", 0, (0, 0, 0), 0.2),
]


@pytest.fixture(scope="module")
def tagger_dir(tmp_path_factory):
    # Raw linear outputs (no sigmoid): the expected values below are the linear functions themselves.
    return build_tiny_tagger(tmp_path_factory.mktemp("wd_tagger"), LABELS, sigmoid=False)


def test_input_size_read_from_model(tagger_dir):
    tagger = WDTagger.load(str(tagger_dir))
    assert tagger.input_size == SIDE
    assert [label.name for label in read_labels(tagger_dir / "selected_tags.csv")][:2] == [
        "general",
        "sensitive",
    ]


def test_preprocessing_pads_white_and_feeds_bgr(tagger_dir):
    tagger = WDTagger.load(str(tagger_dir))
    red_wide = Image.new("RGB", (64, 32), (255, 0, 0))  # padded to 64x64: top/bottom quarters white
    array = tagger.preprocess(red_wide)
    assert array.shape == (SIDE, SIDE, 3) and array.dtype == np.float32
    assert tuple(array[SIDE // 2, SIDE // 2]) == (0.0, 0.0, 255.0)  # BGR: red is the last channel
    assert tuple(array[0, 0]) == (255.0, 255.0, 255.0)  # white padding
    probabilities = tagger.predict([red_wide])[0]
    means = {"blue_tag": 0.5, "green_tag": 0.5, "red_tag": 1.0}
    for name, expected in means.items():
        index = [label[0] for label in LABELS].index(name)
        assert probabilities[index] == pytest.approx(expected, abs=0.02)


def test_thresholds_rating_and_categories(tagger_dir):
    post = WDTagger.load(str(tagger_dir)).tag_images(
        [Image.new("RGB", (64, 32), (255, 0, 0))], ["x"]
    )[0]
    # blue/green at 0.5 >= 0.35, red at 1.0; character 0.9 >= 0.85; ":d" at 0.2 is below.
    assert post.tags[Category.GENERAL] == ["red_tag", "blue_tag", "green_tag"] or post.tags[
        Category.GENERAL
    ] == ["red_tag", "green_tag", "blue_tag"]
    assert post.tags[Category.CHARACTER] == ["red_girl_(sample)"]
    assert post.rating == "s"  # sensitive 0.5 beats general 0.3
    strict = WDTagger.load(str(tagger_dir), general_threshold=0.6, character_threshold=0.95)
    post = strict.tag_images([Image.new("RGB", (64, 32), (255, 0, 0))], ["x"])[0]
    assert post.tags == {Category.GENERAL: ["red_tag"]}
    blue = strict.tag_images([Image.new("RGB", (32, 32), (0, 0, 255))], ["y"])[0]
    assert blue.rating == "g" and blue.tags == {Category.GENERAL: ["blue_tag"]}


def test_batches_match_single_images(tagger_dir):
    images = [Image.new("RGB", (40 + 9 * i, 48), (40 * i, 200 - 30 * i, 90)) for i in range(5)]
    batched = WDTagger.load(str(tagger_dir), batch_size=2).predict(images)
    single = np.concatenate(
        [WDTagger.load(str(tagger_dir), batch_size=1).predict([im]) for im in images]
    )
    np.testing.assert_allclose(batched, single, rtol=1e-6)


def test_transparent_image_is_white(tagger_dir, tmp_path):
    path = tmp_path / "clear.png"
    Image.new("RGBA", (32, 32), (255, 0, 0, 0)).save(path)
    probabilities = WDTagger.load(str(tagger_dir)).predict([Image.open(path).convert("RGBA")])
    post = WDTagger.load(str(tagger_dir)).tag_files([path])[0]
    assert post.metadata["tagger_probabilities"]["blue_tag"] == pytest.approx(1.0, abs=1e-3)
    assert probabilities.shape == (1, len(LABELS))


def test_bad_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.onnx"):
        WDTagger.load(str(tmp_path))


def test_tag_cli_writes_sidecars_outside_input(tagger_dir, tmp_path):
    from train.cli import tag as tagger_cli

    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    Image.new("RGB", (64, 32), (255, 0, 0)).save(images / "a.png")
    Image.new("RGB", (32, 32), (0, 0, 255)).save(images / "sub" / "b.jpg")
    (images / "broken.png").write_bytes(b"")
    before = sorted(p.name for p in images.rglob("*"))
    parser = argparse.ArgumentParser()
    tagger_cli.add_arguments(parser)
    args = parser.parse_args(
        [str(images), "-o", str(tmp_path / "tags"), "--model", str(tagger_dir)]
    )
    assert tagger_cli.run(args) == 1  # one file skipped
    assert sorted(p.name for p in images.rglob("*")) == before
    text_a = (tmp_path / "tags" / "a.txt").read_text(encoding="utf-8")
    assert "red tag" in text_a and "red girl (sample)" in text_a
    assert "blue tag" in (tmp_path / "tags" / "sub" / "b.txt").read_text(encoding="utf-8")
    inside = parser.parse_args(
        [str(images), "-o", str(images / "tags"), "--model", str(tagger_dir)]
    )
    assert tagger_cli.run(inside) == 2


def test_prep_auto_tags_untagged_images(tagger_dir, tmp_path):
    from train.prep.pipeline import RunOptions, prepare
    from train.prep.recipe import parse_recipe

    Image.new("RGB", (128, 64), (255, 0, 0)).save(tmp_path / "red.png")
    Image.new("RGB", (96, 96), (0, 0, 255)).save(tmp_path / "blue.png")
    recipe = parse_recipe(
        {
            "sources": [{"name": "s", "path": str(tmp_path)}],
            "dataset": {"min_side": 64},
            "caption": {"tagger": str(tagger_dir)},
        },
        "test",
    )
    result = prepare(
        recipe, tmp_path.parent / f"{tmp_path.name}_out", RunOptions(show_summary=False)
    )
    assert result.stats.auto_tagged == 2 and result.stats.untagged == 0
    import datasets

    rows = {r["id"]: r for r in datasets.load_from_disk(str(result.out / "dataset"))}
    assert "red tag" in rows["s/red.png"]["caption_body"] and rows["s/red.png"]["rating"] == "s"
    assert "red girl (sample)" in rows["s/red.png"]["caption_head"]
    assert "blue tag" in rows["s/blue.png"]["caption_body"] and rows["s/blue.png"]["rating"] == "g"
