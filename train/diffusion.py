"""The diffusion training math, pure: no I/O, no model, no global RNG.

Everything a training step needs between "clean latents" and "loss": noise (with offset),
timesteps (within a range), the forward process, the ε / v targets, SDXL's `add_time_ids`,
min-SNR-γ loss weights and the masked MSE. All randomness comes from an explicit `torch.Generator`,
which is what makes a resumed run draw the same noise as the uninterrupted one.

References:
- DDPM forward process: Ho et al. 2020, eq. 4: x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε.
- v-prediction: Salimans & Ho 2022, "Progressive Distillation", sec. 4: v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x_0.
- Noise offset: Guttenberg 2023, "Diffusion with Offset Noise" (crosslabs.org).
- Min-SNR-γ: Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy",
  eq. 8/9: w_t = min(SNR_t, γ) / SNR_t for ε-prediction, min(SNR_t, γ) / (SNR_t + 1) for v.
- SDXL micro-conditioning: Podell et al. 2023, "SDXL", sec. 2.2.
"""

from __future__ import annotations

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction")


def sample_noise(latents: Tensor, generator: torch.Generator, noise_offset: float = 0.0) -> Tensor:
    """Gaussian noise shaped like `latents`, plus a per-sample, per-channel constant offset.

    The offset term `noise_offset * N(0, 1)` of shape (B, C, 1, 1) lets the model learn to change
    an image's mean brightness (Guttenberg 2023). 0 gives plain N(0, I).
    """
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    if noise_offset:
        offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator)
        noise = noise + noise_offset * offset  # (B, C, 1, 1) broadcast over H, W
    return noise.to(device=latents.device, dtype=latents.dtype)


def sample_timesteps(batch_size: int, generator: torch.Generator, t_min: int = 0, t_max: int = 1000) -> Tensor:
    """`batch_size` integer timesteps uniform in [t_min, t_max) (int64, on CPU)."""
    if not 0 <= t_min < t_max:
        raise ValueError(f"timestep range [{t_min}, {t_max}) is empty or negative")
    return torch.randint(t_min, t_max, (batch_size,), generator=generator)


def add_noise(latents: Tensor, noise: Tensor, timesteps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε (DDPM eq. 4), computed in float32."""
    abar = _per_sample(alphas_cumprod, timesteps, latents)
    noisy = abar.sqrt() * latents.float() + (1 - abar).sqrt() * noise.float()
    return noisy.to(latents.dtype)


def training_target(
    prediction_type: str, latents: Tensor, noise: Tensor, timesteps: Tensor, alphas_cumprod: Tensor
) -> Tensor:
    """What the UNet should predict: ε, or v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x_0 (Salimans & Ho 2022)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        abar = _per_sample(alphas_cumprod, timesteps, latents)
        return (abar.sqrt() * noise.float() - (1 - abar).sqrt() * latents.float()).to(noise.dtype)
    raise ValueError(f"prediction_type {prediction_type!r}: expected one of {PREDICTION_TYPES}")


def snr(timesteps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Signal-to-noise ratio ᾱ_t / (1 - ᾱ_t) per timestep, float32, shape (B,)."""
    abar = alphas_cumprod.to(torch.float32)[timesteps.cpu()]
    return abar / (1 - abar)


def min_snr_weight(snr_t: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023, eq. 8/9), shape (B,).

    ε-prediction: min(SNR, γ) / SNR. v-prediction: min(SNR, γ) / (SNR + 1), since the v loss
    already equals (SNR + 1) times the x_0 loss.
    """
    clipped = torch.clamp(snr_t, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr_t
    if prediction_type == "v_prediction":
        return clipped / (snr_t + 1)
    raise ValueError(f"prediction_type {prediction_type!r}: expected one of {PREDICTION_TYPES}")


def weighted_mse(prediction: Tensor, target: Tensor, weights: Tensor | None = None,
                 mask: Tensor | None = None) -> Tensor:
    """Mean over the batch of (per-sample MSE × weight), in float32; weights None = all ones.

    `mask` (B, 1, h, w) in [0, 1] on the latent grid weights each latent pixel's squared error
    before the mean over all pixels, as sd-scripts' `apply_masked_loss` does (a pixel of weight 0
    gets no gradient; the loss is not renormalised by the mask's area).
    """
    squared = (prediction.float() - target.float()).pow(2)  # (B, C, h, w)
    if mask is not None:
        squared = squared * mask.to(squared.device, torch.float32)  # broadcast over C
    per_sample = squared.flatten(1).mean(dim=1)  # (B,)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device)
    return per_sample.mean()


def compute_time_ids(
    original_size: tuple[int, int], crops_coords_top_left: tuple[int, int], target_size: tuple[int, int]
) -> Tensor:
    """SDXL `add_time_ids` for one image: (orig_h, orig_w, crop_top, crop_left, target_h, target_w).

    All three pairs are (height, width)-ordered as in diffusers' `StableDiffusionXLPipeline`.
    Returns a float32 tensor of shape (6,).
    """
    return torch.tensor([*original_size, *crops_coords_top_left, *target_size], dtype=torch.float32)


def _per_sample(values: Tensor, timesteps: Tensor, like: Tensor) -> Tensor:
    """values[t] per sample, float32, shaped (B, 1, 1, 1) to broadcast against `like`."""
    picked = values.to(torch.float32)[timesteps.cpu()].to(like.device)
    return picked.reshape(-1, *([1] * (like.ndim - 1)))
