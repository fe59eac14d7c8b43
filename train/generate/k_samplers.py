"""Noise levels, schedulers and samplers as ComfyUI runs them for an SDXL ε- or v-prediction model.

Pure functions over tensors, no model and no I/O; `train.generate.comfy_sampling` drives them with
the UNet. Read from ComfyUI's `comfy/model_sampling.py` (`ModelSamplingDiscrete`, `EPS`,
`V_PREDICTION`, `rescale_zero_terminal_snr_sigmas`),
`comfy/samplers.py` (`normal_scheduler`) and k-diffusion's `sampling.py` (Karras et al. 2022,
"Elucidating the Design Space of Diffusion-Based Generative Models", for the Karras sigmas and
the Euler steps; Lu et al. 2022, "DPM-Solver++", for 2M). Written here, not copied.

Conventions (the EDM "sigma" parameterisation of a DDPM ε model):

- `sigmas[t] = sqrt((1 - alphabar_t) / alphabar_t)` for the 1000 training timesteps, from the
  scaled-linear betas `linspace(sqrt(beta_start), sqrt(beta_end), 1000)**2` in float64, stored as
  float32 `sigmas` and `log_sigmas` (ComfyUI's `set_sigmas`).
- zero terminal SNR (Lin et al. 2023): alphabar rescaled (`train.diffusion.zero_terminal_snr`), its
  last value, 0, replaced by ComfyUI's 4.8973451890853435e-08 so the last sigma is finite (about 4519).
- `sigma(t)`: linear interpolation in log-sigma; `timestep(sigma)`: the integer argmin of
  |log sigma - log_sigmas| (the UNet sees this integer, not a fractional timestep).
- `denoised(x, output, sigma)`: ε: x - ε sigma; v: x / (sigma^2 + 1) - v sigma / sqrt(sigma^2 + 1).
- A sampler takes `denoise(x, sigma) -> x0 estimate` and returns the final latent.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import Tensor

from train.diffusion import zero_terminal_snr
from train.names import PREDICTION_TYPES

Denoiser = Callable[[Tensor, float], Tensor]  # (x (B, C, h, w), sigma) -> denoised (B, C, h, w)
NoiseSampler = Callable[[], Tensor]  # the next ancestral noise draw, shaped like x
# ComfyUI's last alphabar under zero terminal SNR: finite sigma, so the log-sigma tables stay usable.
ZTSNR_LAST_ALPHABAR = 4.8973451890853435e-08


@dataclass(frozen=True)
class ModelSampling:
    """The discrete noise levels of the model and what it predicts (ComfyUI's `ModelSamplingDiscrete`)."""

    sigmas: Tensor  # (T,) float32, ascending
    log_sigmas: Tensor  # (T,) float32
    prediction_type: str = "epsilon"  # train.names.PREDICTION_TYPES

    @classmethod
    def scaled_linear(cls, beta_start: float = 0.00085, beta_end: float = 0.012, num_timesteps: int = 1000, *,
                      prediction_type: str = "epsilon", zero_snr: bool = False) -> ModelSampling:
        """Tables for SD/SDXL's "scaled_linear" betas, computed in float64 then stored as float32;
        `zero_snr` rescales them to zero terminal SNR first."""
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r}: expected one of {PREDICTION_TYPES}")
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        if zero_snr:
            alphas_cumprod = zero_terminal_snr(alphas_cumprod)
            alphas_cumprod[-1] = ZTSNR_LAST_ALPHABAR
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        return cls(sigmas.float(), sigmas.log().float(), prediction_type)

    @classmethod
    def from_scheduler_config(cls, config) -> ModelSampling:
        """From a diffusers noise-scheduler config (Animagine's: scaled_linear, epsilon; a v-prediction
        model's says v_prediction, and `rescale_betas_zero_snr` under zero terminal SNR).

        Raises:
            ValueError: a beta schedule or prediction type this loop does not implement.
        """
        schedule = config.get("beta_schedule", "scaled_linear")
        prediction = config.get("prediction_type", "epsilon")
        if schedule != "scaled_linear" or prediction not in PREDICTION_TYPES:
            raise ValueError(f"the ComfyUI sampling loop needs an epsilon or v-prediction model with scaled_linear "
                             f"betas, got {prediction} / {schedule}; use --sampler diffusers-euler-a")
        return cls.scaled_linear(config.get("beta_start", 0.00085), config.get("beta_end", 0.012),
                                 config.get("num_train_timesteps", 1000), prediction_type=prediction,
                                 zero_snr=bool(config.get("rescale_betas_zero_snr", False)))

    def denoised(self, x: Tensor, output: Tensor, sigma: float) -> Tensor:
        """The x0 estimate from the UNet's `output` at noise level `sigma` (ComfyUI's
        `calculate_denoised`, sigma_data 1): ε or v, as the model predicts."""
        if self.prediction_type == "v_prediction":
            return x / (sigma**2 + 1) - output * sigma / (sigma**2 + 1) ** 0.5
        return x - output * sigma

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma(self, timestep: Tensor) -> Tensor:
        """sigma at (fractional) timesteps: linear interpolation of log-sigma between neighbours."""
        t = timestep.float().clamp(0, len(self.sigmas) - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def timestep(self, sigma: Tensor) -> Tensor:
        """The integer training timestep whose log-sigma is nearest, same shape as `sigma`."""
        distances = sigma.float().log().reshape(1, -1) - self.log_sigmas.reshape(-1, 1)  # (T, N)
        return distances.abs().argmin(dim=0).reshape(sigma.shape)


def normal_sigmas(sampling: ModelSampling, steps: int) -> Tensor:
    """ComfyUI's `normal`: `steps` timesteps evenly from 999 to 0, their sigmas, then 0. (steps+1,)"""
    start = float(sampling.timestep(torch.tensor(sampling.sigma_max)))
    end = float(sampling.timestep(torch.tensor(sampling.sigma_min)))
    timesteps = torch.linspace(start, end, steps)
    return torch.cat([sampling.sigma(timesteps), torch.zeros(1)])


def karras_sigmas(sampling: ModelSampling, steps: int, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022) eq. 5 between the model's sigma_min and sigma_max, then 0. (steps+1,)"""
    ramp = torch.linspace(0, 1, steps)
    low, high = sampling.sigma_min ** (1 / rho), sampling.sigma_max ** (1 / rho)
    return torch.cat([(high + ramp * (low - high)) ** rho, torch.zeros(1)])


SCHEDULERS: dict[str, Callable[[ModelSampling, int], Tensor]] = {
    "normal": normal_sigmas,
    "karras": karras_sigmas,
}


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step from `sigma` to `sigma_next` (k-diffusion's)."""
    if sigma_next == 0:
        return 0.0, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def sample_euler_ancestral(denoise: Denoiser, x: Tensor, sigmas: Tensor, noise: NoiseSampler) -> Tensor:
    """Euler steps down to sigma_down, then fresh noise of sigma_up; the last step returns x0."""
    levels = sigmas.tolist()
    for sigma, sigma_next in pairwise(levels):
        denoised = denoise(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next)
        if sigma_down == 0:
            x = denoised  # the final step draws no noise
            continue
        x = x + (x - denoised) / sigma * (sigma_down - sigma) + noise() * sigma_up
    return x


def sample_euler(denoise: Denoiser, x: Tensor, sigmas: Tensor, noise: NoiseSampler | None = None) -> Tensor:
    """Deterministic Euler on the probability-flow ODE dx/dsigma = (x - x0) / sigma (no churn)."""
    levels = sigmas.tolist()
    for sigma, sigma_next in pairwise(levels):
        denoised = denoise(x, sigma)
        x = x + (x - denoised) / sigma * (sigma_next - sigma)
    return x


def sample_dpmpp_2m(denoise: Denoiser, x: Tensor, sigmas: Tensor, noise: NoiseSampler | None = None) -> Tensor:
    """DPM-Solver++(2M): second order multistep in t = -log sigma, first order on the first and last step."""
    levels = sigmas.tolist()
    previous: Tensor | None = None
    for i, (sigma, sigma_next) in enumerate(pairwise(levels)):
        denoised = denoise(x, sigma)
        if sigma_next == 0:
            x = denoised  # exp(-h) = 0: the first-order update is x0 itself
        else:
            h = math.log(sigma / sigma_next)
            estimate = denoised
            if previous is not None:
                half_ratio = 0.5 * h / math.log(levels[i - 1] / sigma)  # 1 / (2 r), r = h_last / h
                estimate = (1 + half_ratio) * denoised - half_ratio * previous
            x = (sigma_next / sigma) * x - math.expm1(-h) * estimate
        previous = denoised
    return x


SAMPLERS: dict[str, Callable[[Denoiser, Tensor, Tensor, NoiseSampler], Tensor]] = {
    "euler_ancestral": sample_euler_ancestral,
    "euler": sample_euler,
    "dpmpp_2m": sample_dpmpp_2m,
}
