"""Aesthetic tags (the animagine-xl-3.1 profile): bands, the classifier pipeline, the `tag` command."""

from __future__ import annotations

import argparse

import pytest
from PIL import Image
from tagger_helpers import build_tiny_aesthetic, build_tiny_tagger

from captioning import Captioner, Category, Post, load_profile
from captioning.aesthetic import AestheticModelError, AestheticScorer, scorer_for_profile


def post(aesthetic=None, general=("1girl", "smile")) -> Post:
    return Post(id="1", origin="t", tags={Category.GENERAL: list(general)}, uncategorised=[], rating="g",
                score=None, created_at=None, metadata={}, aesthetic=aesthetic)


@pytest.mark.parametrize(("score", "tag"), [
    (0.99, "very aesthetic"), (0.7101, "very aesthetic"), (0.71, "aesthetic"), (0.4501, "aesthetic"),
    (0.45, "displeasing"), (0.2701, "displeasing"), (0.27, "very displeasing"), (0.0, "very displeasing"),
])
def test_3_1_aesthetic_bands(score, tag):
    result = Captioner(load_profile("animagine-xl-3.1"), None, None).caption(post(score))
    assert result.aesthetic_tag == tag and result.caption.body[-1] == tag


def test_no_score_no_aesthetic_tag_and_4_0_has_none():
    assert Captioner(load_profile("animagine-xl-3.1"), None, None).caption(post(None)).aesthetic_tag is None
    result = Captioner(load_profile(), None, None).caption(post(0.9))
    assert result.aesthetic_tag is None and "very aesthetic" not in result.caption.tags
    # A word the user wrote is kept as it is, never replaced by a guess.
    kept = Captioner(load_profile("animagine-xl-3.1"), None, None).caption(post(None, ("1girl", "displeasing")))
    assert kept.caption.body[-1] == "displeasing"


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    return build_tiny_aesthetic(tmp_path_factory.mktemp("aesthetic") / "random")


def test_pipeline_scores_are_the_models_hq_probability(tiny_classifier):
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    images = [Image.new("RGB", (40 + 8 * i, 32), (30 * i, 200 - 20 * i, 90)) for i in range(5)]
    scorer = AestheticScorer.load(str(tiny_classifier), batch_size=2)
    scores = scorer.score(images)
    model = AutoModelForImageClassification.from_pretrained(tiny_classifier).eval()
    inputs = AutoImageProcessor.from_pretrained(tiny_classifier)(images, return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits.softmax(-1)[:, model.config.label2id["hq"]]
    assert scores == pytest.approx(expected.tolist(), abs=1e-5)
    assert len(set(scores)) > 1  # the images really went through the network


def test_a_model_without_the_label_or_a_profile_without_bands_is_refused(tiny_classifier, tmp_path):
    other = build_tiny_aesthetic(tmp_path / "other", labels=("good", "bad"))
    with pytest.raises(AestheticModelError, match=r"scores the label 'hq'.*'good', 'bad'"):
        AestheticScorer.load(str(other))
    with pytest.raises(AestheticModelError, match="animagine-xl-4.0 has no aesthetic tags"):
        scorer_for_profile(str(tiny_classifier), load_profile())
    with pytest.raises(AestheticModelError, match="no config.json"):
        AestheticScorer.load(str(tmp_path))
    assert scorer_for_profile(None, load_profile("animagine-xl-3.1")) is None


def test_tag_command_writes_aesthetic_tags_only_when_asked(tmp_path):
    from train.cli import tag as tagger_cli

    tagger = build_tiny_tagger(tmp_path / "wd", [("general", 9, [0, 0, 0], 5.0), ("red_tag", 0, [0, 0, 1], 0.0)])
    classifier = build_tiny_aesthetic(tmp_path / "pretty", hq_probability=0.8)
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 64), (255, 0, 0)).save(images / "a.png")
    parser = argparse.ArgumentParser()
    tagger_cli.add_arguments(parser)
    base = [str(images), "--model", str(tagger), "--profile", "animagine-xl-3.1"]
    assert tagger_cli.run(parser.parse_args([*base, "-o", str(tmp_path / "with"), "--aesthetic-model",
                                             str(classifier)])) == 0
    assert (tmp_path / "with" / "a.txt").read_text().strip().endswith("very aesthetic")
    assert tagger_cli.run(parser.parse_args([*base, "-o", str(tmp_path / "without")])) == 0
    assert "aesthetic" not in (tmp_path / "without" / "a.txt").read_text()
    four = [str(images), "--model", str(tagger), "-o", str(tmp_path / "x"), "--aesthetic-model", str(classifier)]
    assert tagger_cli.run(parser.parse_args(four)) == 2


@pytest.mark.gpu
def test_the_scorer_runs_on_the_gpu_in_fp16(tiny_classifier):
    images = [Image.new("RGB", (40 + 8 * i, 32), (30 * i, 200 - 20 * i, 90)) for i in range(5)]
    import torch

    on_gpu = AestheticScorer.load(str(tiny_classifier), batch_size=4)
    assert on_gpu.pipe.device.type == "cuda" and next(on_gpu.pipe.model.parameters()).dtype == torch.float16
    on_cpu = AestheticScorer.load(str(tiny_classifier), batch_size=4, device="cpu")
    assert on_gpu.score(images) == pytest.approx(on_cpu.score(images), abs=5e-3)
