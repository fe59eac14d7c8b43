"""The sampling loop of ComfyUI's KSampler over an SDXL UNet: same seed, prompt and settings, same latent.

Read from ComfyUI's `comfy/sample.py` (`prepare_noise`), `comfy/samplers.py` (`KSampler`,
`cfg_function`, `encode_model_conds`), `comfy/model_sampling.py` (`EPS`, `V_PREDICTION`) and
`comfy/k_diffusion/sampling.py` (`default_noise_sampler`); the math is in
`train.generate.k_samplers`. What this loop does, in ComfyUI's order:

- initial noise: a CPU generator seeded with the image's seed, one `randn` of (1, 4, H/8, W/8)
  (ComfyUI at batch size 1); x = noise * sqrt(1 + sigma_0^2) (epsilon model, full denoise);
- model call: the UNet sees x / sqrt(sigma^2 + 1) at the integer timestep nearest sigma, uncond
  and cond in one batch (in that order); denoised = x - eps * sigma (v-prediction:
  x / (sigma^2 + 1) - v * sigma / sqrt(sigma^2 + 1), `ModelSampling.denoised`); CFG on the denoised values,
  uncond + (cond - uncond) * cfg (skipped at cfg 1, as ComfyUI does);
- ancestral noise: a new generator per image, seeded with the same seed, on `noise_device`
  (`gpu`: the latent's device, which is ComfyUI's choice; `cpu`: reproducible on any machine), one
  `randn` per step. On the CPU its first draw repeats the initial noise, as in ComfyUI;
- size conditioning: (H, W, 0, 0, H, W) from the latent size x 8.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from train.diffusion import compute_time_ids
from train.generate.k_samplers import SAMPLERS, SCHEDULERS, ModelSampling
from train.names import NOISE_DEVICES

LATENT_CHANNELS = 4
VAE_FACTOR = 8


@dataclass
class Conditioning:
    """Text conditioning of B images: `embeds` (B, 77k, 2048) and `pooled` (B, 1280)."""

    embeds: Tensor
    pooled: Tensor


def initial_noise(seeds: list[int], shape: tuple[int, int, int]) -> Tensor:
    """(B, C, h, w) float32 on the CPU: one CPU generator per seed, as ComfyUI's `prepare_noise`."""
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(s)) for s in seeds])


class AncestralNoise:
    """One generator per image on `device`, seeded with the image's seed; each call draws one step."""

    def __init__(self, seeds: list[int], shape: tuple[int, int, int], device: torch.device, out_device: torch.device):
        self.generators = [torch.Generator(device).manual_seed(s) for s in seeds]
        self.shape = (1, *shape)
        self.device = device
        self.out_device = out_device

    def __call__(self) -> Tensor:
        draws = [torch.randn(self.shape, generator=g, device=self.device) for g in self.generators]
        return torch.cat(draws).to(self.out_device)  # (B, C, h, w) float32


class CFGDenoiser:
    """denoise(x, sigma) of an SDXL ε or v UNet with classifier-free guidance, as ComfyUI computes it."""

    def __init__(self, unet, sampling: ModelSampling, cond: Conditioning, uncond: Conditioning, cfg: float,
                 size: tuple[int, int]):
        self.unet = unet
        self.sampling = sampling
        self.cfg = cfg
        # cfg 1 needs no uncond pass: ComfyUI skips it too, and the result is cond either way.
        parts = [cond] if cfg == 1.0 else [uncond, cond]
        self.embeds = torch.cat([p.embeds for p in parts])  # (nB, 77k, d)
        self.pooled = torch.cat([p.pooled for p in parts])  # (nB, d_pooled)
        time_ids = compute_time_ids(size, (0, 0), size)
        self.time_ids = time_ids.expand(len(self.embeds), -1)  # (nB, 6)

    def __call__(self, x: Tensor, sigma: float) -> Tensor:
        parts = 1 if self.cfg == 1.0 else 2
        x_batch = torch.cat([x] * parts)  # (nB, C, h, w)
        x_in = x_batch / (sigma**2 + 1) ** 0.5
        timestep = self.sampling.timestep(torch.tensor([sigma])).float().to(x.device)
        device, dtype = x.device, self.unet.dtype
        output = self.unet(
            x_in.to(dtype), timestep, encoder_hidden_states=self.embeds.to(device, dtype),
            added_cond_kwargs={"text_embeds": self.pooled.to(device, dtype), "time_ids": self.time_ids.to(device, dtype)},
            return_dict=False,
        )[0].float()  # ComfyUI computes denoised and CFG in float32
        denoised = self.sampling.denoised(x_batch, output, sigma)
        if parts == 1:
            return denoised
        uncond, cond = denoised.chunk(2)
        return uncond + (cond - uncond) * self.cfg


def sigma_schedule(sampling: ModelSampling, scheduler: str, steps: int) -> Tensor:
    """The (steps + 1,) noise levels of `scheduler`, ending in 0.

    Raises:
        ValueError: an unknown scheduler name.
    """
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler {scheduler!r}: expected one of {sorted(SCHEDULERS)}")
    return SCHEDULERS[scheduler](sampling, steps)


@torch.no_grad()
def sample_latents(denoiser: CFGDenoiser, *, seeds: list[int], size: tuple[int, int], sampler: str,
                   scheduler: str, steps: int, device: torch.device, noise_device: str = "gpu") -> Tensor:
    """Final latents (B, 4, H/8, W/8) float32 on `device`, one image per seed.

    Raises:
        ValueError: an unknown sampler, scheduler or noise device.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r}: expected one of {sorted(SAMPLERS)}")
    if noise_device not in NOISE_DEVICES:
        raise ValueError(f"noise device {noise_device!r}: expected one of {NOISE_DEVICES}")
    height, width = size
    shape = (LATENT_CHANNELS, height // VAE_FACTOR, width // VAE_FACTOR)
    sigmas = sigma_schedule(denoiser.sampling, scheduler, steps)
    x = initial_noise(seeds, shape).to(device) * (1 + float(sigmas[0]) ** 2) ** 0.5
    noise = AncestralNoise(seeds, shape, torch.device("cpu") if noise_device == "cpu" else torch.device(device),
                           out_device=torch.device(device))
    return SAMPLERS[sampler](denoiser, x, sigmas, noise)
