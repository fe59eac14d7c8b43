"""The training loss of one micro-batch: noise it, run the UNet, compare with the target.

`loss_step` is the step the training loop, the speed benchmark (`bench/train_step.py`) and the
tests share; the formulas it composes (noise, timesteps, the ε/v target, min-SNR weights, the
weighted MSE) are `train.diffusion`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from train import diffusion
from train.data.rows import TrainBatch


@dataclass(frozen=True)
class LossSettings:
    """The `[train]` keys that shape the loss, and the model's prediction type."""

    prediction_type: str  # "epsilon" | "v_prediction"
    noise_offset: float
    min_snr_gamma: float | None
    timestep_min: int
    timestep_max: int  # exclusive


def loss_step(unet, batch: TrainBatch, text, settings: LossSettings, alphas_cumprod: torch.Tensor,
              generator: torch.Generator, device: torch.device, model_dtype: torch.dtype) -> torch.Tensor:
    """The diffusion loss of one micro-batch (scalar, float32); `unet` may be DDP-wrapped.

    `text(captions) -> (prompt_embeds, pooled)`; every random draw (noise, timesteps) comes from
    `generator`, so a resumed run draws what the uninterrupted one would have.
    """
    latents = batch.latents.to(device, non_blocking=True)  # (B, 4, H/8, W/8); pinned when prefetched
    noise = diffusion.sample_noise(latents, generator, settings.noise_offset)
    timesteps = diffusion.sample_timesteps(len(latents), generator, settings.timestep_min, settings.timestep_max)
    noisy = diffusion.add_noise(latents, noise, timesteps, alphas_cumprod)
    prompt_embeds, pooled = text(batch.captions)  # (B, 77k, D), (B, P)
    prediction = unet(
        noisy.to(model_dtype), timesteps.to(device), encoder_hidden_states=prompt_embeds,
        added_cond_kwargs={"text_embeds": pooled, "time_ids": batch.time_ids.to(device, non_blocking=True)},
    ).sample
    target = diffusion.training_target(settings.prediction_type, latents, noise, timesteps, alphas_cumprod)
    weights = batch.loss_weights  # (B,): prior_loss_weight on regularization samples
    if settings.min_snr_gamma:
        snr_weights = diffusion.min_snr_weight(diffusion.snr(timesteps, alphas_cumprod), settings.min_snr_gamma,
                                               settings.prediction_type)
        weights = snr_weights if weights is None else weights * snr_weights
    return diffusion.weighted_mse(prediction, target, weights, batch.masks)
