"""The diffusion training math, pure: no I/O, no model, no global RNG.

Everything a training step needs between "clean latents" and "loss": noise (with offset, pyramid
noise, input perturbation), timesteps (within a range), the forward process, the zero-terminal-SNR
schedule, the ε / v targets, SDXL's `add_time_ids`, min-SNR-γ and debiased loss weights, and the
masked L2 / L1 / (scheduled) pseudo-Huber loss. All randomness comes from an explicit
`torch.Generator`, which is what makes a resumed run draw the same noise as the uninterrupted one.

Each option does what sd-scripts' option of the same name does (`library/train_util.py`
`get_noise_noisy_latents_and_timesteps`, `get_huber_threshold_if_needed`, `conditional_loss`;
`library/custom_train_functions.py`), so a recipe carries over; read there, written here.

References:
- DDPM forward process: Ho et al. 2020, eq. 4: x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε.
- v-prediction: Salimans & Ho 2022, "Progressive Distillation", sec. 4: v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x_0.
- Noise offset: Guttenberg 2023, "Diffusion with Offset Noise" (crosslabs.org).
- Min-SNR-γ: Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy",
  eq. 8/9: w_t = min(SNR_t, γ) / SNR_t for ε-prediction, min(SNR_t, γ) / (SNR_t + 1) for v.
- SDXL micro-conditioning: Podell et al. 2023, "SDXL", sec. 2.2.
- Zero terminal SNR: Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps Are
  Flawed", algorithm 1 (shift and scale sqrt(ᾱ) so that ᾱ_T = 0; v-prediction needed).
- Debiased estimation: Yu et al. 2024, "Unmasking Bias in Diffusion Model Training": ε loss × 1/sqrt(SNR).
- Scheduled pseudo-Huber loss: Khrapov et al. 2024, "Improving Diffusion Models's Data-Corruption
  Resistance using Scheduled Pseudo-Huber Loss" (arXiv 2403.16728; sd-scripts PR #1228).
- Input perturbation: Ning et al. 2023, "Input Perturbation Reduces Exposure Bias in Diffusion Models".
- Multi-resolution (pyramid) noise: Whitaker 2023, "Multi-Resolution Noise for Diffusion Model
  Training" (wandb report).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from train.names import HUBER_SCHEDULES, LOSS_TYPES, PREDICTION_TYPES

# sd-scripts caps the SNR at 1000 before the debiased weight (SDXL's SNR at t = 0 is about 1175).
DEBIASED_SNR_CAP = 1000.0


def sample_noise(latents: Tensor, generator: torch.Generator, noise_offset: float = 0.0, *,
                 offset_random_strength: bool = False, adaptive_noise_scale: float = 0.0,
                 multires_iterations: int = 0, multires_discount: float = 0.3) -> Tensor:
    """Gaussian noise shaped like `latents`, plus a per-sample, per-channel constant offset,
    then pyramid noise: sd-scripts' order (offset first, the pyramid's renormalisation last).

    The offset term `strength * N(0, 1)` of shape (B, C, 1, 1) lets the model learn to change an
    image's mean brightness (Guttenberg 2023). Its strength is `noise_offset`, scaled by one
    U(0, 1) draw per micro-batch with `offset_random_strength`, plus `adaptive_noise_scale` times
    each latent channel's |mean|, clamped at 0 (sd-scripts' `noise_offset_random_strength` and
    `adaptive_noise_scale`, which act only with a noise offset). All 0 gives plain N(0, I).
    """
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    if noise_offset:
        strength = noise_offset * torch.rand(1, generator=generator) if offset_random_strength else noise_offset
        if adaptive_noise_scale:
            channel_mean = latents.float().mean(dim=(2, 3), keepdim=True).abs().cpu()  # (B, C, 1, 1)
            strength = torch.clamp(strength + adaptive_noise_scale * channel_mean, min=0.0)
        offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator)
        noise = noise + strength * offset  # (B, C, 1, 1) broadcast over H, W
    if multires_iterations:
        noise = pyramid_noise(noise, generator, multires_iterations, multires_discount)
    return noise.to(device=latents.device, dtype=latents.dtype)


def pyramid_noise(noise: Tensor, generator: torch.Generator, iterations: int, discount: float) -> Tensor:
    """Multi-resolution noise (Whitaker 2023, sd-scripts' `pyramid_noise_like`), float32 (B, C, h, w).

    Level i adds N(0, I) drawn at (h, w) / r^i, upsampled bilinearly, times discount^i, with r drawn
    from U(2, 4) per level; it stops after `iterations` levels or at a 1-pixel side. The sum is
    divided by its standard deviation (over the whole tensor), back to about unit variance.
    """
    batch, channels, height, width = noise.shape
    noise = noise.float().clone()
    for level in range(iterations):
        ratio = 2 + 2 * torch.rand(1, generator=generator).item()  # sd-scripts: not always 2x
        low_h, low_w = max(1, int(height / ratio**level)), max(1, int(width / ratio**level))
        coarse = torch.randn((batch, channels, low_h, low_w), generator=generator)
        noise += F.interpolate(coarse, size=(height, width), mode="bilinear") * discount**level
        if low_h == 1 or low_w == 1:
            break
    return noise / noise.std()


def perturbed_noise(noise: Tensor, generator: torch.Generator, gamma: float, random_strength: bool = False) -> Tensor:
    """The noise the latents are noised with under input perturbation (Ning et al. 2023):
    `noise + gamma * N(0, I)`, gamma scaled by one U(0, 1) draw per micro-batch when
    `random_strength`. The target stays the unperturbed `noise` (sd-scripts' `ip_noise_gamma`)."""
    strength = gamma * torch.rand(1, generator=generator).item() if random_strength else gamma
    extra = torch.randn(noise.shape, generator=generator, dtype=torch.float32)
    return (noise.float() + strength * extra.to(noise.device)).to(noise.dtype)


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


def debiased_weight(snr_t: Tensor, prediction_type: str) -> Tensor:
    """Debiased estimation loss weights, shape (B,), as sd-scripts' `apply_debiased_estimation`.

    ε-prediction: 1 / sqrt(SNR) (Yu et al. 2024). v-prediction: 1 / (SNR + 1), sd-scripts' form
    (it turns the v loss into the x_0 loss, since the v loss is (SNR + 1) times the x_0 loss). The
    SNR is capped at `DEBIASED_SNR_CAP` first, as sd-scripts does.
    """
    capped = torch.clamp(snr_t, max=DEBIASED_SNR_CAP)
    if prediction_type == "epsilon":
        return 1 / capped.sqrt()
    if prediction_type == "v_prediction":
        return 1 / (capped + 1)
    raise ValueError(f"prediction_type {prediction_type!r}: expected one of {PREDICTION_TYPES}")


def v_like_scale(snr_t: Tensor) -> Tensor:
    """SNR / (SNR + 1), the SNR capped at 1000 (sd-scripts' `get_snr_scale`), shape (B,): the ε loss
    is this times the v loss. `scale_v_pred_loss_like_noise_pred` multiplies a v loss by it;
    `v_pred_like_loss` k adds k times the v-like loss to an ε loss, a weight of 1 + k / scale."""
    capped = torch.clamp(snr_t, max=DEBIASED_SNR_CAP)
    return capped / (capped + 1)


def huber_threshold(schedule: str, huber_c: float, timesteps: Tensor, alphas_cumprod: Tensor,
                    huber_scale: float = 1.0) -> Tensor:
    """The pseudo-Huber parameter c per sample, shape (B,) float32 (sd-scripts PR #1228).

    - "constant": c * scale.
    - "exponential": scale * exp(-a t) with a = -ln(c) / T: scale at t = 0, c * scale at t = T.
    - "snr": (1 - c) / (1 + σ_t)^2 + c with σ_t = sqrt((1 - ᾱ_t) / ᾱ_t): near 1 (about L2) at low
      noise, c (about L1, robust to outliers) at high noise; `huber_scale` does not apply (as in
      sd-scripts). σ_T = inf under a zero-terminal-SNR schedule gives c.
    """
    timesteps = timesteps.cpu()
    if schedule == "constant":
        return torch.full(timesteps.shape, huber_c * huber_scale, dtype=torch.float32)
    if schedule == "exponential":
        rate = -math.log(huber_c) / len(alphas_cumprod)
        return torch.exp(-rate * timesteps.float()) * huber_scale
    if schedule == "snr":
        abar = alphas_cumprod.to(torch.float32)[timesteps]
        sigmas = ((1 - abar) / abar).sqrt()
        return (1 - huber_c) / (1 + sigmas) ** 2 + huber_c
    raise ValueError(f"huber_schedule {schedule!r}: expected one of {HUBER_SCHEDULES}")


def elementwise_loss(prediction: Tensor, target: Tensor, loss_type: str = "l2",
                     huber_c: Tensor | None = None) -> Tensor:
    """The loss of each element, float32, shaped like `prediction` (sd-scripts' `conditional_loss`).

    "l2": d^2; "l1": |d|; "huber": 2c (sqrt(d^2 + c^2) - c); "smooth_l1": 2 (sqrt(d^2 + c^2) - c),
    with d = prediction - target and `huber_c` (B,) per sample (`huber_threshold`).
    """
    difference = prediction.float() - target.float()
    if loss_type == "l2":
        return difference.pow(2)
    if loss_type == "l1":
        return difference.abs()
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r}: expected one of {LOSS_TYPES}")
    if huber_c is None:
        raise ValueError(f"loss_type {loss_type!r} needs huber_c per sample")
    c = huber_c.to(difference.device, torch.float32).reshape(-1, *([1] * (difference.ndim - 1)))
    pseudo_huber = (difference.pow(2) + c.pow(2)).sqrt() - c
    return 2 * c * pseudo_huber if loss_type == "huber" else 2 * pseudo_huber


def weighted_loss(elementwise: Tensor, weights: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
    """Mean over the batch of (per-sample mean loss × weight), float32; weights None = all ones.

    `mask` (B, 1, h, w) in [0, 1] on the latent grid weights each latent pixel's loss before the
    mean over all pixels, as sd-scripts' `apply_masked_loss` does (a pixel of weight 0 gets no
    gradient; the loss is not renormalised by the mask's area).
    """
    if mask is not None:
        elementwise = elementwise * mask.to(elementwise.device, torch.float32)  # broadcast over C
    per_sample = elementwise.flatten(1).mean(dim=1)  # (B,)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device)
    return per_sample.mean()


def weighted_mse(prediction: Tensor, target: Tensor, weights: Tensor | None = None,
                 mask: Tensor | None = None) -> Tensor:
    """`weighted_loss` of the squared error: what the validation loss measures, whatever the training loss."""
    return weighted_loss(elementwise_loss(prediction, target, "l2"), weights, mask)


def zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """ᾱ rescaled to zero terminal SNR (Lin et al. 2023, algorithm 1), float64, same shape.

    sqrt(ᾱ) is shifted so its last value is 0, then scaled so its first value is unchanged; the
    betas this implies are diffusers' `rescale_zero_terminal_snr(betas)`. ᾱ_T = 0: the last
    timestep is pure noise, where ε-prediction is undefined (the model must predict v).
    """
    root = alphas_cumprod.to(torch.float64).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    return ((root - last) * first / (first - last)) ** 2


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
