"""train.diffusion against hand-computed values (DDPM, v-prediction, min-SNR-γ, SDXL time ids)."""

from __future__ import annotations

import math

import pytest
import torch

from train import diffusion

ABAR = torch.tensor([0.25, 0.9, 0.5])  # ᾱ at t = 0, 1, 2


def test_add_noise_is_ddpm_forward_process():
    x0, eps = torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1), 1.0)
    noisy = diffusion.add_noise(x0, eps, torch.tensor([0]), ABAR)
    # sqrt(0.25) * 2 + sqrt(0.75) * 1
    assert noisy.item() == pytest.approx(1.0 + math.sqrt(0.75))


def test_targets_epsilon_and_v():
    x0, eps, t = torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1), 1.0), torch.tensor([0])
    assert torch.equal(diffusion.training_target("epsilon", x0, eps, t, ABAR), eps)
    v = diffusion.training_target("v_prediction", x0, eps, t, ABAR)
    assert v.item() == pytest.approx(0.5 * 1.0 - math.sqrt(0.75) * 2.0)
    with pytest.raises(ValueError, match="prediction_type"):
        diffusion.training_target("sample", x0, eps, t, ABAR)


def test_snr_and_min_snr_weights():
    t = torch.tensor([0, 1])
    snr = diffusion.snr(t, ABAR)
    assert snr.tolist() == pytest.approx([1 / 3, 9.0])
    # Hang et al. 2023: eps weight min(snr, γ)/snr, v weight min(snr, γ)/(snr + 1)
    assert diffusion.min_snr_weight(snr, 5.0, "epsilon").tolist() == pytest.approx([1.0, 5 / 9])
    assert diffusion.min_snr_weight(snr, 5.0, "v_prediction").tolist() == pytest.approx([(1 / 3) / (4 / 3), 0.5])


def test_weighted_mse_weights_each_sample():
    prediction = torch.zeros(2, 1, 2, 2)
    target = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 2.0)])
    assert diffusion.weighted_mse(prediction, target).item() == pytest.approx((1 + 4) / 2)
    assert diffusion.weighted_mse(prediction, target, torch.tensor([1.0, 0.5])).item() == pytest.approx((1 + 2) / 2)


def test_noise_offset_adds_a_per_channel_constant():
    latents = torch.zeros(2, 4, 8, 8)
    plain = diffusion.sample_noise(latents, torch.Generator().manual_seed(3), 0.0)
    offset = diffusion.sample_noise(latents, torch.Generator().manual_seed(3), 0.1)
    difference = offset - plain  # (B, C, H, W), constant over H, W
    assert torch.allclose(difference, difference[:, :, :1, :1].expand_as(difference))
    assert difference.abs().max() > 0


def test_timesteps_stay_in_range_and_are_reproducible():
    t = diffusion.sample_timesteps(1000, torch.Generator().manual_seed(0), 200, 300)
    assert int(t.min()) >= 200 and int(t.max()) < 300
    again = diffusion.sample_timesteps(1000, torch.Generator().manual_seed(0), 200, 300)
    assert torch.equal(t, again)
    with pytest.raises(ValueError):
        diffusion.sample_timesteps(1, torch.Generator(), 5, 5)


def test_time_ids_follow_diffusers_order():
    ids = diffusion.compute_time_ids((1200, 900), (16, 32), (1152, 896))
    assert ids.tolist() == [1200, 900, 16, 32, 1152, 896]
    assert ids.dtype == torch.float32
