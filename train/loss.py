"""The training loss of one micro-batch: noise it, run the UNet, compare with the target.

`loss_step` is the step the training loop, the speed benchmark (`bench/train_step.py`) and the
tests share; the formulas it composes (noise, timesteps, the ε/v target, the loss function and
its weights) are `train.diffusion`. The order is sd-scripts' (`train_network.py`): the element-wise
loss (L2, L1 or scheduled pseudo-Huber), the mask, the mean per sample, then the per-sample
weights (prior loss weight, min-SNR-γ, the v-like scale or added v-like loss, debiased estimation),
then the mean over the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from train import diffusion
from train.config import TrainConfig, prediction_problems
from train.data.rows import TrainBatch
from train.model.prediction import Prediction


@dataclass(frozen=True)
class LossSettings:
    """The `[train]` keys that shape the loss, and the model's prediction type."""

    prediction_type: str  # "epsilon" | "v_prediction"
    noise_offset: float
    min_snr_gamma: float | None
    timestep_min: int
    timestep_max: int  # exclusive
    noise_offset_random_strength: bool = False
    multires_noise_iterations: int = 0  # 0: no pyramid noise
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float = 0.0  # 0: no input perturbation
    ip_noise_gamma_random_strength: bool = False
    loss_type: str = "l2"  # train.names.LOSS_TYPES
    huber_schedule: str = "snr"  # train.names.HUBER_SCHEDULES
    huber_c: float = 0.1
    huber_scale: float = 1.0
    debiased_estimation: bool = False
    adaptive_noise_scale: float = 0.0  # offset strength + this x |latent channel mean| (with noise_offset)
    scale_v_pred_loss_like_noise_pred: bool = False  # v-prediction only
    v_pred_like_loss: float = 0.0  # epsilon only; 0: off

    @classmethod
    def from_config(cls, train: TrainConfig, prediction_type: str) -> LossSettings:
        """The loss of a `[train]` table for a model that predicts `prediction_type`.

        Raises:
            ValueError: a setting for the other prediction type (`train.config.prediction_problems`).
        """
        if problems := prediction_problems(train, prediction_type):
            raise ValueError("; ".join(problems))
        return cls(prediction_type, train.noise_offset, train.min_snr_gamma, train.timestep_min, train.timestep_max,
                   noise_offset_random_strength=train.noise_offset_random_strength,
                   multires_noise_iterations=train.multires_noise_iterations,
                   multires_noise_discount=train.multires_noise_discount, ip_noise_gamma=train.ip_noise_gamma,
                   ip_noise_gamma_random_strength=train.ip_noise_gamma_random_strength, loss_type=train.loss_type,
                   huber_schedule=train.huber_schedule, huber_c=train.huber_c, huber_scale=train.huber_scale,
                   debiased_estimation=train.debiased_estimation, adaptive_noise_scale=train.adaptive_noise_scale,
                   scale_v_pred_loss_like_noise_pred=train.scale_v_pred_loss_like_noise_pred,
                   v_pred_like_loss=train.v_pred_like_loss)


def loss_step(unet, batch: TrainBatch, text, settings: LossSettings, alphas_cumprod: torch.Tensor,
              generator: torch.Generator, device: torch.device, model_dtype: torch.dtype) -> torch.Tensor:
    """The diffusion loss of one micro-batch (scalar, float32); `unet` may be DDP-wrapped.

    `text(captions) -> (prompt_embeds, pooled)`; every random draw (noise, timesteps) comes from
    `generator`, so a resumed run draws what the uninterrupted one would have.
    """
    latents = batch.latents.to(device, non_blocking=True)  # (B, 4, H/8, W/8); pinned when prefetched
    noise = diffusion.sample_noise(latents, generator, settings.noise_offset,
                                   offset_random_strength=settings.noise_offset_random_strength,
                                   adaptive_noise_scale=settings.adaptive_noise_scale,
                                   multires_iterations=settings.multires_noise_iterations,
                                   multires_discount=settings.multires_noise_discount)
    timesteps = diffusion.sample_timesteps(len(latents), generator, settings.timestep_min, settings.timestep_max)
    noised_with = noise
    if settings.ip_noise_gamma:  # the input is perturbed, the target is not
        noised_with = diffusion.perturbed_noise(noise, generator, settings.ip_noise_gamma,
                                                settings.ip_noise_gamma_random_strength)
    noisy = diffusion.add_noise(latents, noised_with, timesteps, alphas_cumprod)
    prompt_embeds, pooled = text(batch.captions)  # (B, 77k, D), (B, P)
    prediction = unet(
        noisy.to(model_dtype), timesteps.to(device), encoder_hidden_states=prompt_embeds,
        added_cond_kwargs={"text_embeds": pooled, "time_ids": batch.time_ids.to(device, non_blocking=True)},
    ).sample
    target = diffusion.training_target(settings.prediction_type, latents, noise, timesteps, alphas_cumprod)
    huber_c = None
    if settings.loss_type in ("huber", "smooth_l1"):
        huber_c = diffusion.huber_threshold(settings.huber_schedule, settings.huber_c, timesteps, alphas_cumprod,
                                            settings.huber_scale)
    elementwise = diffusion.elementwise_loss(prediction, target, settings.loss_type, huber_c)
    return diffusion.weighted_loss(elementwise, sample_weights(settings, batch.loss_weights, timesteps,
                                                               alphas_cumprod), batch.masks)


def sample_weights(settings: LossSettings, loss_weights: torch.Tensor | None, timesteps: torch.Tensor,
                   alphas_cumprod: torch.Tensor) -> torch.Tensor | None:
    """Per-sample loss weights (B,): the batch's own (`prior_loss_weight` on regularization
    samples) times, when on and in sd-scripts' order, min-SNR-γ, the v-like scale, the added
    v-like loss and debiased estimation; None when all are off."""
    weights = loss_weights
    factors = []
    if (settings.min_snr_gamma or settings.debiased_estimation or settings.scale_v_pred_loss_like_noise_pred
            or settings.v_pred_like_loss):
        snr_t = diffusion.snr(timesteps, alphas_cumprod)
        if settings.min_snr_gamma:
            factors.append(diffusion.min_snr_weight(snr_t, settings.min_snr_gamma, settings.prediction_type))
        if settings.scale_v_pred_loss_like_noise_pred:
            factors.append(diffusion.v_like_scale(snr_t))
        if settings.v_pred_like_loss:
            factors.append(1 + settings.v_pred_like_loss / diffusion.v_like_scale(snr_t))
        if settings.debiased_estimation:
            factors.append(diffusion.debiased_weight(snr_t, settings.prediction_type))
    for factor in factors:
        weights = factor if weights is None else weights * factor
    return weights


def training_metadata(settings: LossSettings, prediction: Prediction) -> dict[str, object]:
    """The LoRA file's record of the loss and noise (sd-scripts' `ss_*` names where it has them),
    and of the prediction type with the reason it was chosen."""
    metadata: dict[str, object] = {
        "ss_noise_offset": settings.noise_offset, "ss_noise_offset_random_strength": settings.noise_offset_random_strength,
        "ss_multires_noise_iterations": settings.multires_noise_iterations,
        "ss_multires_noise_discount": settings.multires_noise_discount, "ss_ip_noise_gamma": settings.ip_noise_gamma,
        "ss_ip_noise_gamma_random_strength": settings.ip_noise_gamma_random_strength,
        "ss_min_snr_gamma": settings.min_snr_gamma, "ss_debiased_estimation": settings.debiased_estimation,
        "ss_loss_type": settings.loss_type, "ss_huber_schedule": settings.huber_schedule,
        "ss_huber_c": settings.huber_c, "ss_huber_scale": settings.huber_scale,
        "ss_adaptive_noise_scale": settings.adaptive_noise_scale,
        "ss_scale_v_pred_loss_like_noise_pred": settings.scale_v_pred_loss_like_noise_pred,
        "ss_v_pred_like_loss": settings.v_pred_like_loss,
        "ss_v_parameterization": settings.prediction_type == "v_prediction",
        "ss_zero_terminal_snr": prediction.zero_terminal_snr, "ss_prediction_type_reason": prediction.reason,
    }
    return metadata
