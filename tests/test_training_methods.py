"""Training methods, unit by unit: masked loss, loss masks from prep, regularization
balancing in the sampler and per-sample weights, the LoRA EMA, and their config keys."""

from __future__ import annotations

import json
import random
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
import torch
from PIL import Image
from train_helpers import make_dataset

from train import diffusion
from train.config import ConfigError, parse_config
from train.data.bucket_batches import BucketBatchSampler
from train.data.latents import load_latent_mask, row_geometry
from train.data.rows import CaptionAugment, TrainingData, load_rows
from train.runtime.ema import LoraEma, ema_decay_at

# ---------------------------------------------------------------- masked loss


def test_masked_out_pixels_get_no_gradient():
    prediction = torch.randn(2, 4, 4, 4, requires_grad=True)
    target = torch.randn(2, 4, 4, 4)
    mask = torch.ones(2, 1, 4, 4)
    mask[:, :, :, :2] = 0  # left half of every latent ignored
    diffusion.weighted_mse(prediction, target, torch.tensor([1.0, 0.5]), mask).backward()
    assert torch.all(prediction.grad[..., :2] == 0)
    assert torch.all(prediction.grad[..., 2:] != 0)


def test_masked_mse_value_is_weighted_mean_over_all_pixels():
    prediction, target = torch.zeros(2, 1, 1, 2), torch.tensor([[[[1.0, 3.0]]], [[[2.0, 2.0]]]])
    mask = torch.tensor([[[[1.0, 0.0]]], [[[0.5, 0.5]]]])
    weights = torch.tensor([1.0, 0.25])
    # sample 0: (1*1 + 0*9) / 2 = 0.5; sample 1: (0.5*4 + 0.5*4) / 2 = 2, times 0.25 -> 0.5
    assert diffusion.weighted_mse(prediction, target, weights, mask).item() == pytest.approx(0.5)
    assert diffusion.weighted_mse(prediction, target).item() == pytest.approx((5.0 + 4.0) / 2)


@pytest.fixture(scope="module")
def masked_rows(tmp_path_factory) -> list[dict]:
    return load_rows(make_dataset(tmp_path_factory.mktemp("masked") / "out", masks=True))


def test_alpha_mask_follows_the_image_crop_and_flip(masked_rows):
    row = next(r for r in masked_rows if r["id"] == "a.png")  # 80x64, left half transparent, crop_left 8
    geometry = row_geometry(row)
    assert (geometry.crop_left, geometry.width, geometry.height) == (8, 64, 64)
    mask = load_latent_mask(row["mask_path"], geometry)
    assert mask.shape == (1, 8, 8)
    # Transparent image columns 0..39 are crop columns 0..31: latent columns 0..3.
    assert torch.all(mask[..., :4] == 0) and torch.all(mask[..., 4:] == 1)
    assert torch.equal(load_latent_mask(row["mask_path"], geometry, flip=True), mask.flip(-1))


def test_mask_image_beside_the_image_and_rows_without_mask(masked_rows):
    row = next(r for r in masked_rows if r["id"] == "b.png")
    assert row["mask_path"].endswith("b.mask.png")
    mask = load_latent_mask(row["mask_path"], row_geometry(row))
    assert 0 < mask.mean() < 1 and mask.min() >= 0 and mask.max() <= 1
    data = TrainingData(masked_rows, _Cache(), CaptionAugment(), masked=True)
    batch = data.batch([0, 2], random.Random(0))  # a.png (alpha), c.png (no mask)
    assert batch.masks.shape == (2, 1, 8, 8)
    assert batch.masks[0].mean() == 0.5 and torch.all(batch.masks[1] == 1)
    assert TrainingData(masked_rows, _Cache(), CaptionAugment()).batch([0], random.Random(0)).masks is None


def test_prep_records_alpha_and_mask_images(tmp_path):
    from test_prep import QUIET, image, recipe_for

    from train.prep.pipeline import prepare

    folder = tmp_path / "images"
    rgba = Image.new("RGBA", (96, 80), (200, 30, 30, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    folder.mkdir()
    rgba.save(folder / "alpha.png")
    image(folder / "masked.png")
    Image.new("L", (96, 80), 255).save(folder / "masked.mask.png")
    image(folder / "plain.png", colour=(10, 200, 30))
    image(folder / "wrong.png", colour=(10, 30, 200))
    Image.new("L", (10, 10), 255).save(folder / "wrong.mask.png")
    out = tmp_path / "out"
    prepare(recipe_for({"name": "s", "path": str(folder)}), out, QUIET)
    masks = {Path(r["id"]).name: r["mask_path"] for r in load_rows(out, "train") + _val_rows(out)}
    assert set(masks) == {"alpha.png", "masked.png", "plain.png", "wrong.png"}  # masks are not images
    assert masks["alpha.png"] == str(folder / "alpha.png")
    assert masks["masked.png"] == str(folder / "masked.mask.png")
    assert masks["plain.png"] is None and masks["wrong.png"] is None
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["masked"] == 2
    assert any("wrong.mask.png ignored: is 10x10, the image 96x80" in w for w in report["warnings"])


def _val_rows(out) -> list[dict]:
    try:
        return load_rows(out, "val")
    except ValueError:
        return []


# ---------------------------------------------------------------- regularization


TRAIN_BUCKETS = [(64, 64)] * 4 + [(64, 96)] * 2
TRAIN_REPEATS = [2] * 4 + [1] * 2  # 10 training entries
REG_BUCKETS = [(64, 64)] * 3 + [(64, 96)]


def test_regularization_entries_match_training_entries_every_epoch():
    sampler = BucketBatchSampler(TRAIN_BUCKETS, TRAIN_REPEATS, batch_size=1, seed=0,
                                 reg_buckets=REG_BUCKETS, reg_repeats=[1] * 4)
    n = len(TRAIN_BUCKETS)
    for epoch in range(3):
        rows = [r for batch in sampler.epoch_batches(epoch) for r in (sampler.epoch_rows(epoch)[e] for e in batch)]
        counts = Counter(r >= n for r in rows)
        assert counts[False] == counts[True] == 10  # balanced, as sd-scripts does
        assert Counter(r for r in rows if r < n) == Counter({r: TRAIN_REPEATS[r] for r in range(n)})
        reg = Counter(r - n for r in rows if r >= n)
        assert set(reg) == {0, 1, 2, 3} and max(reg.values()) - min(reg.values()) <= 1  # a small set cycles


def test_a_large_regularization_set_is_walked_through_across_epochs():
    sampler = BucketBatchSampler([(64, 64)] * 2, [1, 1], batch_size=1, seed=0,
                                 reg_buckets=[(64, 64)] * 5, reg_repeats=[1] * 5)
    seen = [sorted(r - 2 for r in sampler.epoch_rows(epoch)[2:]) for epoch in range(3)]
    assert seen == [[0, 1], [2, 3], [0, 4]]


def test_regularization_keeps_buckets_and_disjoint_ranks_and_resume():
    def make(rank):
        return BucketBatchSampler(TRAIN_BUCKETS, TRAIN_REPEATS, batch_size=2, num_replicas=2, rank=rank, seed=4,
                                  reg_buckets=REG_BUCKETS, reg_repeats=[2, 1, 1, 1])

    ranks = [make(r) for r in range(2)]
    streams = [list(islice(s.batches(), 12)) for s in ranks]
    buckets = TRAIN_BUCKETS + REG_BUCKETS
    for b0, b1 in zip(*streams):
        assert len({buckets[r] for r in b0.rows + b1.rows}) == 1
        if b0.epoch == b1.epoch:
            assert not set(b0.entries) & set(b1.entries)
    assert any(r >= len(TRAIN_BUCKETS) for b in streams[0] for r in b.rows)
    resumed = make(0)
    resumed.load_state_dict({"epoch": streams[0][7].epoch, "position": streams[0][7].index + 1})
    assert list(islice(resumed.batches(), 4)) == streams[0][8:12]


class _Cache:
    scale = 1.0

    def load(self, row, flip=False):
        return torch.zeros(4, row["bucket_height"] // 8, row["bucket_width"] // 8)


def test_regularization_samples_carry_the_prior_loss_weight(masked_rows):
    data = TrainingData(masked_rows[:2], _Cache(), CaptionAugment(), reg_rows=masked_rows[2:3], reg_cache=_Cache(),
                        prior_loss_weight=0.3)
    batch = data.batch([0, 2, 1], random.Random(0))
    assert batch.ids == ["a.png", "c.png", "b.png"]
    assert batch.loss_weights.tolist() == pytest.approx([1.0, 0.3, 1.0])


# ---------------------------------------------------------------- EMA


def test_ema_update_decay_warmup_apply_and_save(tmp_path):
    weight = torch.nn.Parameter(torch.zeros(3))
    ema = LoraEma([("w", weight)], decay=0.9, device="cpu")
    assert ema_decay_at(1, 0.9) == pytest.approx(0.1) and ema_decay_at(100, 0.9) == 0.9
    expected = torch.zeros(3)
    for step in range(1, 30):
        with torch.no_grad():
            weight.add_(1.0)
        ema.update(step)
        d = min(0.9, step / (9 + step))
        expected = d * expected + (1 - d) * weight.detach()
    torch.testing.assert_close(ema.shadow[0], expected)
    assert weight[0].item() == 29.0 and ema.shadow[0][0] < 29.0
    with ema.applied():
        torch.testing.assert_close(weight.detach(), expected)
    assert torch.all(weight == 29.0)  # raw weights back

    other = LoraEma([("w", torch.nn.Parameter(torch.zeros(3)))], decay=0.9, device="cpu")
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow[0], ema.shadow[0])
    with pytest.raises(ValueError, match="do not match"):
        LoraEma([("v", torch.nn.Parameter(torch.zeros(3)))], 0.9, "cpu").load_state_dict(ema.state_dict())


# ---------------------------------------------------------------- config


def _config(**sections):
    raw = {"data": {"dataset": "/d"}, "train": {"max_steps": 1}, "output": {"dir": "/o"}}
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return parse_config(raw)


def test_config_keys_and_their_checks():
    config = _config(data={"regularization": "/r", "prior_loss_weight": 0.5},
                     train={"masked_loss": True, "ema_decay": 0.999, "ema_device": "cpu"},
                     validation={"every_n_steps": 50}, output={"keep_best": True})
    assert config.validation.timesteps == [100, 300, 500, 700, 900]
    with pytest.raises(ConfigError, match="keep_best needs validation.every_n_steps"):
        _config(output={"keep_best": True})
    with pytest.raises(ConfigError, match=r"train.ema_decay"):
        _config(train={"ema_decay": 1.0})
    with pytest.raises(ConfigError, match=r"validation: .*timesteps must be in"):
        _config(validation={"timesteps": [1000]})
