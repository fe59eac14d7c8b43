"""The loss and noise options of sd-scripts' recipes, each against its formula on small tensors:
pyramid noise, random-strength offset, input perturbation, the scheduled pseudo-Huber loss,
debiased estimation, zero terminal SNR, and how `loss_step` composes them."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors import safe_open
from train_helpers import train_in_process, write_config

from train import diffusion
from train.data.rows import TrainBatch
from train.loss import LossSettings, loss_step, sample_weights, training_metadata
from train.model.prediction import Prediction

ABAR = torch.tensor([0.25, 0.9, 0.5, 0.0])  # ᾱ at t = 0..3; t = 3 is a zero-terminal-SNR end


def _sdxl_alphas_cumprod() -> torch.Tensor:
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod


# ---------------------------------------------------------------- noise


def test_noise_offset_random_strength_scales_the_offset_by_one_uniform_draw():
    latents = torch.zeros(2, 4, 8, 8)
    got = diffusion.sample_noise(latents, torch.Generator().manual_seed(5), 0.1, offset_random_strength=True)
    g = torch.Generator().manual_seed(5)  # the same draws, in the documented order
    base = torch.randn(latents.shape, generator=g)
    strength = 0.1 * torch.rand(1, generator=g)
    offset = torch.randn((2, 4, 1, 1), generator=g)
    assert torch.allclose(got, base + strength * offset)
    assert 0 < strength.item() < 0.1


def test_adaptive_noise_scale_adds_each_channels_absolute_mean_to_the_offset():
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(8)) + 0.5
    got = diffusion.sample_noise(latents, torch.Generator().manual_seed(5), 0.1, offset_random_strength=True,
                                 adaptive_noise_scale=-0.3)
    g = torch.Generator().manual_seed(5)
    base = torch.randn(latents.shape, generator=g)
    strength = 0.1 * torch.rand(1, generator=g) - 0.3 * latents.mean(dim=(2, 3), keepdim=True).abs()
    offset = torch.randn((2, 4, 1, 1), generator=g)
    assert torch.allclose(got, base + strength.clamp(min=0) * offset)
    assert (strength < 0).any()  # a negative scale can reach 0: clamped, as sd-scripts
    # without a noise offset it does nothing (sd-scripts applies it inside the offset)
    plain = diffusion.sample_noise(latents, torch.Generator().manual_seed(5), 0.0, adaptive_noise_scale=1.0)
    assert torch.equal(plain, torch.randn(latents.shape, generator=torch.Generator().manual_seed(5)))


def test_pyramid_noise_adds_discounted_upsampled_levels_and_renormalises():
    noise = torch.randn(2, 4, 16, 12, generator=torch.Generator().manual_seed(0))
    got = diffusion.pyramid_noise(noise, torch.Generator().manual_seed(1), iterations=3, discount=0.4)
    g = torch.Generator().manual_seed(1)
    expected = noise.clone()
    upsample = torch.nn.Upsample(size=(16, 12), mode="bilinear")  # sd-scripts' pyramid_noise_like
    for level in range(3):
        r = 2 + 2 * torch.rand(1, generator=g).item()
        size = (max(1, int(16 / r**level)), max(1, int(12 / r**level)))
        expected += upsample(torch.randn((2, 4, *size), generator=g)) * 0.4**level
    expected /= expected.std()
    assert torch.allclose(got, expected, atol=1e-6)
    assert got.std().item() == pytest.approx(1.0, abs=1e-5)
    # the input is left alone, and the low-frequency levels correlate neighbouring pixels
    assert not torch.equal(got, noise)


def test_pyramid_noise_stops_at_one_pixel():
    """50 levels asked of a 4x4 latent: it stops at the first 1-pixel level (r >= 2: by level 2)."""
    used = torch.Generator().manual_seed(0)
    diffusion.pyramid_noise(torch.zeros(1, 1, 4, 4), used, iterations=50, discount=0.5)
    reference = torch.Generator().manual_seed(0)
    levels = 0
    for level in range(50):  # the same draws, counting levels
        r = 2 + 2 * torch.rand(1, generator=reference).item()
        h, w = max(1, int(4 / r**level)), max(1, int(4 / r**level))
        torch.randn((1, 1, h, w), generator=reference)
        levels += 1
        if h == 1 or w == 1:
            break
    assert levels <= 3
    assert torch.equal(torch.rand(4, generator=used), torch.rand(4, generator=reference))


def test_input_perturbation_perturbs_the_input_not_the_target():
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    got = diffusion.perturbed_noise(noise, torch.Generator().manual_seed(2), 0.1)
    extra = torch.randn(noise.shape, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(got, noise + 0.1 * extra)
    random = diffusion.perturbed_noise(noise, torch.Generator().manual_seed(2), 0.1, random_strength=True)
    g = torch.Generator().manual_seed(2)
    strength = 0.1 * torch.rand(1, generator=g).item()
    assert torch.allclose(random, noise + strength * torch.randn(noise.shape, generator=g))


# ---------------------------------------------------------------- the loss function


def test_huber_thresholds_follow_the_three_schedules():
    t = torch.tensor([0, 1, 2, 3])
    assert diffusion.huber_threshold("constant", 0.1, t, ABAR, huber_scale=2.0).tolist() == pytest.approx([0.2] * 4)
    # exponential: scale * exp(-a t), a = -ln(c) / T (T = 4 timesteps here)
    rate = -math.log(0.1) / 4
    assert diffusion.huber_threshold("exponential", 0.1, t, ABAR, huber_scale=2.0).tolist() == pytest.approx(
        [2 * math.exp(-rate * k) for k in range(4)])
    # snr: (1 - c) / (1 + σ)^2 + c, σ = sqrt((1 - ᾱ) / ᾱ); ᾱ = 0 (σ = inf) gives c; no scale
    sigmas = [math.sqrt(3), math.sqrt(1 / 9), 1.0]
    expected = [0.9 / (1 + s) ** 2 + 0.1 for s in sigmas] + [0.1]
    assert diffusion.huber_threshold("snr", 0.1, t, ABAR, huber_scale=2.0).tolist() == pytest.approx(expected)
    with pytest.raises(ValueError, match="huber_schedule"):
        diffusion.huber_threshold("linear", 0.1, t, ABAR)


def test_elementwise_losses_against_their_formulas():
    prediction = torch.tensor([[0.0, 0.5, 3.0], [1.0, -2.0, 0.0]]).reshape(2, 1, 1, 3)
    target = torch.zeros_like(prediction)
    d = prediction.flatten(1)
    c = torch.tensor([0.1, 1.0])
    assert torch.equal(diffusion.elementwise_loss(prediction, target, "l2").flatten(1), d**2)
    assert torch.equal(diffusion.elementwise_loss(prediction, target, "l1").flatten(1), d.abs())
    huber = diffusion.elementwise_loss(prediction, target, "huber", c).flatten(1)
    smooth = diffusion.elementwise_loss(prediction, target, "smooth_l1", c).flatten(1)
    for row, c_row in enumerate(c.tolist()):
        for col, value in enumerate(d[row].tolist()):
            pseudo = math.sqrt(value**2 + c_row**2) - c_row
            assert huber[row, col].item() == pytest.approx(2 * c_row * pseudo)
            assert smooth[row, col].item() == pytest.approx(2 * pseudo)
    # pseudo-Huber: about d^2 for |d| << c, about 2c|d| for |d| >> c
    one = torch.ones(1, 1, 1, 1)
    small = diffusion.elementwise_loss(0.05 * one, 0 * one, "huber", torch.tensor([1.0]))
    large = diffusion.elementwise_loss(100 * one, 0 * one, "huber", torch.tensor([0.1]))
    assert small.item() == pytest.approx(0.05**2, rel=1e-2)
    assert large.item() == pytest.approx(2 * 0.1 * 100, rel=1e-2)
    with pytest.raises(ValueError, match="huber_c"):
        diffusion.elementwise_loss(prediction, target, "huber")
    with pytest.raises(ValueError, match="loss_type"):
        diffusion.elementwise_loss(prediction, target, "l3")


def test_weighted_loss_masks_pixels_then_weights_samples():
    elementwise = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 2.0)])
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).expand(2, 1, 2, 2)
    got = diffusion.weighted_loss(elementwise, torch.tensor([1.0, 0.5]), mask)
    assert got.item() == pytest.approx((0.5 * 1 + 0.5 * 2 * 0.5) / 2)


# ---------------------------------------------------------------- weights by SNR


def test_debiased_weights_for_epsilon_and_v_prediction():
    snr = torch.tensor([1 / 3, 9.0, 2000.0])
    # ε: 1/sqrt(SNR); v: 1/(SNR + 1) (sd-scripts); SNR capped at 1000 first
    assert diffusion.debiased_weight(snr, "epsilon").tolist() == pytest.approx(
        [math.sqrt(3), 1 / 3, 1 / math.sqrt(1000)])
    assert diffusion.debiased_weight(snr, "v_prediction").tolist() == pytest.approx([0.75, 0.1, 1 / 1001])
    with pytest.raises(ValueError, match="prediction_type"):
        diffusion.debiased_weight(snr, "sample")


def test_sample_weights_multiply_prior_min_snr_and_debiased():
    t = torch.tensor([0, 1])
    settings = LossSettings("v_prediction", 0.0, 5.0, 0, 4, debiased_estimation=True)
    got = sample_weights(settings, torch.tensor([1.0, 0.5]), t, ABAR)
    snr = [1 / 3, 9.0]
    min_snr = [min(s, 5.0) / (s + 1) for s in snr]
    debiased = [1 / (s + 1) for s in snr]
    assert got.tolist() == pytest.approx([1.0 * min_snr[0] * debiased[0], 0.5 * min_snr[1] * debiased[1]])
    assert sample_weights(LossSettings("epsilon", 0.0, None, 0, 4), None, t, ABAR) is None


def test_v_like_scale_and_added_v_like_loss():
    t = torch.tensor([0, 1])
    snr = torch.tensor([1 / 3, 9.0])
    scale = snr / (snr + 1)  # sd-scripts' get_snr_scale (SNR capped at 1000)
    assert diffusion.v_like_scale(torch.tensor([1 / 3, 9.0, 5000.0])).tolist() == pytest.approx(
        [0.25, 0.9, 1000 / 1001])
    scaled = sample_weights(LossSettings("v_prediction", 0.0, None, 0, 4, scale_v_pred_loss_like_noise_pred=True),
                            None, t, ABAR)
    assert scaled.tolist() == pytest.approx(scale.tolist())
    added = sample_weights(LossSettings("epsilon", 0.0, 5.0, 0, 4, v_pred_like_loss=0.2), None, t, ABAR)
    min_snr = torch.clamp(snr, max=5.0) / snr
    assert added.tolist() == pytest.approx((min_snr * (1 + 0.2 / scale)).tolist())


def test_loss_settings_refuse_a_v_like_option_of_the_other_prediction_type():
    from train.config import parse_config

    minimal = {"data": {"dataset": "prep"}, "output": {"dir": "run"}}
    train = parse_config({**minimal, "train": {"max_steps": 1, "scale_v_pred_loss_like_noise_pred": True}}).train
    assert LossSettings.from_config(train, "v_prediction").scale_v_pred_loss_like_noise_pred
    with pytest.raises(ValueError, match="scale_v_pred_loss_like_noise_pred needs a v-prediction model"):
        LossSettings.from_config(train, "epsilon")
    train = parse_config({**minimal, "train": {"max_steps": 1, "v_pred_like_loss": 0.1}}).train
    with pytest.raises(ValueError, match="v_pred_like_loss"):
        LossSettings.from_config(train, "v_prediction")


def test_min_snr_and_debiased_stay_finite_at_zero_terminal_snr_for_v():
    t = torch.tensor([3])  # ᾱ = 0: SNR 0
    settings = LossSettings("v_prediction", 0.0, 5.0, 0, 4, debiased_estimation=True)
    weights = sample_weights(settings, None, t, ABAR)
    assert torch.isfinite(weights).all() and weights.item() == 0.0  # min(0, γ) / (0 + 1)


# ---------------------------------------------------------------- zero terminal SNR


def test_zero_terminal_snr_matches_diffusers_rescaled_betas():
    abar = _sdxl_alphas_cumprod()
    ours = diffusion.zero_terminal_snr(abar)
    theirs = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                           rescale_betas_zero_snr=True).alphas_cumprod
    assert ours[-1].item() == 0.0
    assert ours[0].item() == pytest.approx(abar[0].item(), rel=1e-6)
    assert torch.allclose(ours.float(), theirs, atol=1e-6)
    assert bool((ours[1:] < ours[:-1]).all())  # still a noise schedule: ᾱ decreasing


# ---------------------------------------------------------------- the loss step


class _HalfUNet:
    """A stand-in UNet: predicts half its input (no weights), recording what it was given."""

    def __call__(self, noisy, timesteps, **kwargs):
        self.noisy, self.timesteps = noisy, timesteps
        return SimpleNamespace(sample=noisy * 0.5)


def test_loss_step_composes_noise_perturbation_huber_and_weights_in_order():
    abar = _sdxl_alphas_cumprod()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    batch = TrainBatch(latents=latents, captions=["a", "b"], time_ids=torch.zeros(2, 6), ids=["a", "b"],
                       loss_weights=torch.tensor([1.0, 0.5]))
    settings = LossSettings("v_prediction", 0.05, 5.0, 0, 1000, noise_offset_random_strength=True,
                            multires_noise_iterations=2, multires_noise_discount=0.3, ip_noise_gamma=0.1,
                            loss_type="huber", huber_schedule="snr", huber_c=0.2, debiased_estimation=True)
    unet = _HalfUNet()
    text = lambda captions: (torch.zeros(2, 77, 80), torch.zeros(2, 48))
    got = loss_step(unet, batch, text, settings, abar, torch.Generator().manual_seed(4), torch.device("cpu"),
                    torch.float32)

    g = torch.Generator().manual_seed(4)  # the documented order of draws
    noise = diffusion.sample_noise(latents, g, 0.05, offset_random_strength=True, multires_iterations=2,
                                   multires_discount=0.3)
    t = diffusion.sample_timesteps(2, g, 0, 1000)
    extra = torch.randn(latents.shape, generator=g)
    abar_t = abar[t].reshape(2, 1, 1, 1)
    noisy = abar_t.sqrt() * latents + (1 - abar_t).sqrt() * (noise + 0.1 * extra)
    assert torch.allclose(unet.noisy, noisy, atol=1e-6) and torch.equal(unet.timesteps, t)
    target = abar_t.sqrt() * noise - (1 - abar_t).sqrt() * latents  # v of the unperturbed noise
    sigma = ((1 - abar_t) / abar_t).sqrt()
    c = (1 - 0.2) / (1 + sigma) ** 2 + 0.2
    d = noisy * 0.5 - target
    per_sample = (2 * c * ((d**2 + c**2).sqrt() - c)).flatten(1).mean(1)
    snr = abar[t] / (1 - abar[t])
    weights = torch.tensor([1.0, 0.5]) * torch.clamp(snr, max=5.0) / (snr + 1) / (torch.clamp(snr, max=1000) + 1)
    assert got.item() == pytest.approx((per_sample * weights).mean().item(), rel=1e-5)


def test_default_settings_keep_the_plain_mse_and_its_draws():
    """Options off: the same draws and the same number as before they existed (noise, offset, t)."""
    abar = _sdxl_alphas_cumprod()
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    batch = TrainBatch(latents=latents, captions=["a"], time_ids=torch.zeros(1, 6), ids=["a"])
    unet = _HalfUNet()
    text = lambda captions: (torch.zeros(1, 77, 80), torch.zeros(1, 48))
    got = loss_step(unet, batch, text, LossSettings("epsilon", 0.05, None, 0, 1000), abar,
                    torch.Generator().manual_seed(2), torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(latents.shape, generator=g) + 0.05 * torch.randn((1, 4, 1, 1), generator=g)
    t = torch.randint(0, 1000, (1,), generator=g)
    noisy = diffusion.add_noise(latents, noise, t, abar)
    assert got.item() == pytest.approx(((noisy * 0.5 - noise) ** 2).mean().item(), rel=1e-6)


def test_training_metadata_records_loss_noise_and_prediction_reason():
    settings = LossSettings("v_prediction", 0.03, None, 0, 1000, loss_type="smooth_l1", ip_noise_gamma=0.1)
    metadata = training_metadata(settings, Prediction("v_prediction", True, "the checkpoint carries the 'v_pred' key"))
    assert metadata["ss_loss_type"] == "smooth_l1" and metadata["ss_ip_noise_gamma"] == 0.1
    assert metadata["ss_v_parameterization"] is True and metadata["ss_zero_terminal_snr"] is True
    assert "v_pred" in metadata["ss_prediction_type_reason"]


# ---------------------------------------------------------------- through the real loop


RECIPE = {"loss_type": "huber", "huber_schedule": "snr", "huber_c": 0.1, "debiased_estimation": True,
          "min_snr_gamma": 5.0, "multires_noise_iterations": 6, "multires_noise_discount": 0.3,
          "ip_noise_gamma": 0.1, "ip_noise_gamma_random_strength": True, "noise_offset": 0.05,
          "noise_offset_random_strength": True}


def test_tiny_run_with_a_recipes_loss_and_noise_options(tiny_model, train_dataset, tmp_path):
    config = write_config(tmp_path / "c.toml", model_dir=tiny_model.diffusers_dir, dataset=train_dataset,
                          run_dir=tmp_path / "run", train={"max_steps": 2, "gradient_accumulation_steps": 1, **RECIPE},
                          output={"save_every_n_steps": 2, "log_with": []})
    result = train_in_process(config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "prediction_type=epsilon, zero_terminal_snr=false" in result.stderr
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
              if "loss" in line]
    assert len(losses) == 2 and all(math.isfinite(loss) and loss > 0 for loss in losses)
    with safe_open(str(tmp_path / "run" / "test_lora.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_loss_type"] == "huber" and metadata["ss_huber_schedule"] == "snr"
    assert metadata["ss_multires_noise_iterations"] == "6" and metadata["ss_ip_noise_gamma"] == "0.1"
    assert metadata["ss_debiased_estimation"] == "True" and metadata["ss_v_parameterization"] == "False"
