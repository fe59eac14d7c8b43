"""Optional CLIP scores with a tiny local CLIP model (transformers layout, real BPE tokenizer)."""

from __future__ import annotations

import pytest
from PIL import Image
from sample_eval_helpers import build_tiny_clip

from train.evaluate.clip_score import ClipScorer


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, clip_bpe_path):
    return build_tiny_clip(tmp_path_factory.mktemp("clip"), clip_bpe_path)


def test_clip_scores_are_cosines_and_rank_similar_images_higher(clip_dir):
    red, blue = Image.new("RGB", (48, 48), (220, 20, 20)), Image.new("RGB", (48, 48), (20, 20, 220))
    scorer = ClipScorer(clip_dir, [red, red])
    same, text = scorer.scores([[red]], ["1girl, red hair"])
    other, _ = scorer.scores([[blue]], ["1girl, red hair"])
    assert same == pytest.approx(1.0, abs=1e-5)  # the reference itself
    assert other < same and -1.0 <= text <= 1.0
    assert ClipScorer(clip_dir, []).scores([[red]], ["x"])[0] is None


def test_missing_clip_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_clip: CLIP model folder not found"):
        ClipScorer(tmp_path / "no_clip", [])
