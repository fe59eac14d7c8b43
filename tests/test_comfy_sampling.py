"""The ComfyUI-compatible loop: sigmas from the formulas, latents equal to k-diffusion's samplers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from kdiff_reference import load_k_diffusion

from train.generate.comfy_sampling import CFGDenoiser, Conditioning, initial_noise, sample_latents
from train.generate.k_samplers import ModelSampling, karras_sigmas, normal_sigmas

PAIRS = [(s, k) for s in ("euler_ancestral", "euler", "dpmpp_2m") for k in ("normal", "karras")]


def _formula_tables():
    """float64 sigmas of SDXL's scaled-linear betas, rounded to float32 as ComfyUI stores them."""
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1 - betas)
    sigmas = np.sqrt((1 - alphas_cumprod) / alphas_cumprod)
    return sigmas.astype(np.float32).astype(np.float64), np.log(sigmas).astype(np.float32).astype(np.float64)


def test_normal_and_karras_sigmas_and_integer_timesteps_for_28_steps():
    sampling = ModelSampling.scaled_linear()
    sigmas, log_sigmas = _formula_tables()
    assert sampling.sigma_min == pytest.approx(0.0292, abs=1e-4)
    assert sampling.sigma_max == pytest.approx(14.6146, abs=1e-4)

    t = np.linspace(999, 0, 28)
    low, high = np.floor(t).astype(int), np.ceil(t).astype(int)
    w = t - low
    normal = np.exp((1 - w) * log_sigmas[low] + w * log_sigmas[high])
    got = normal_sigmas(sampling, 28)
    assert got.shape == (29,) and got[-1] == 0
    np.testing.assert_allclose(got[:-1].double().numpy(), normal, rtol=1e-5)

    rho = 7.0
    ramp = np.linspace(0, 1, 28)
    karras = (sigmas[-1] ** (1 / rho) + ramp * (sigmas[0] ** (1 / rho) - sigmas[-1] ** (1 / rho))) ** rho
    got = karras_sigmas(sampling, 28)
    assert got.shape == (29,) and got[-1] == 0
    np.testing.assert_allclose(got[:-1].double().numpy(), karras, rtol=1e-5)

    for table in (normal, karras):
        expected = np.abs(np.log(table)[None, :] - log_sigmas[:, None]).argmin(axis=0)
        timesteps = sampling.timestep(torch.tensor(table, dtype=torch.float32))
        assert timesteps.dtype == torch.int64
        np.testing.assert_array_equal(timesteps.numpy(), expected)
    # The normal schedule's timesteps are the rounded linspace: 999, 962, ..., 0.
    assert sampling.timestep(normal_sigmas(sampling, 28)[:-1]).tolist() == np.rint(t).astype(int).tolist()


@pytest.fixture(scope="module")
def kdiff():
    return load_k_diffusion()


class TinyEps(torch.nn.Module):
    """An ε 'UNet' with the SDXL call signature: depends on x, the timestep, the text and time ids."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.mix = torch.nn.Parameter(torch.randn(4, 4, generator=generator) * 0.3)
        self.text = torch.nn.Parameter(torch.randn(8, 4, generator=generator) * 0.2)

    @property
    def dtype(self):
        return self.mix.dtype

    def forward(self, x, timestep, *, encoder_hidden_states, added_cond_kwargs, return_dict=False):
        t = timestep.reshape(-1, 1, 1, 1).float() / 1000
        text = (encoder_hidden_states.mean(1) @ self.text)[:, :, None, None]  # (B, 4, 1, 1)
        pooled = added_cond_kwargs["text_embeds"].mean(1).reshape(-1, 1, 1, 1)
        size = added_cond_kwargs["time_ids"][:, :1].reshape(-1, 1, 1, 1) / 1000
        mixed = torch.einsum("oc,bchw->bohw", self.mix, x)
        return (torch.tanh(mixed + text) * (1 + t) + 0.1 * pooled + size * x,)


def _conditioning(generator, batch):
    return Conditioning(torch.randn(batch, 154, 8, generator=generator), torch.randn(batch, 6, generator=generator))


@pytest.mark.parametrize(("sampler", "scheduler"), PAIRS)
def test_loop_matches_k_diffusion(kdiff, sampler, scheduler):
    generator = torch.Generator().manual_seed(1)
    cond, uncond = _conditioning(generator, 2), _conditioning(generator, 2)
    unet, sampling, seeds, size, steps, cfg = TinyEps(), ModelSampling.scaled_linear(), [7, 123], (32, 24), 6, 5.0
    ours = sample_latents(CFGDenoiser(unet, sampling, cond, uncond, cfg, size), seeds=seeds, size=size,
                          sampler=sampler, scheduler=scheduler, steps=steps, device=torch.device("cpu"),
                          noise_device="cpu")

    # The reference: k-diffusion's ε-DDPM wrapper (integer timesteps), CFG on the denoised values.
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0).float()
    time_ids = torch.tensor([[*size, 0, 0, *size]], dtype=torch.float32).expand(2, -1)

    def eps(x, t, conditioning):
        added = {"text_embeds": conditioning.pooled, "time_ids": time_ids}
        return unet(x, t, encoder_hidden_states=conditioning.embeds, added_cond_kwargs=added)[0]

    wrapped = kdiff.external.DiscreteEpsDDPMDenoiser(eps, alphas_cumprod, quantize=True)

    def model(x, sigma):
        negative, positive = wrapped(x, sigma, conditioning=uncond), wrapped(x, sigma, conditioning=cond)
        return negative + (positive - negative) * cfg

    if scheduler == "normal":
        sigmas = wrapped.get_sigmas(steps)
    else:
        sigmas = kdiff.sampling.get_sigmas_karras(steps, float(wrapped.sigma_min), float(wrapped.sigma_max))
    shape = (4, size[0] // 8, size[1] // 8)
    x = initial_noise(seeds, shape) * torch.sqrt(1 + sigmas[0] ** 2)
    generators = [torch.Generator().manual_seed(s) for s in seeds]

    def noise_sampler(sigma, sigma_next):
        return torch.cat([torch.randn((1, *shape), generator=g) for g in generators])

    reference = getattr(kdiff.sampling, f"sample_{sampler}")
    extra = {"noise_sampler": noise_sampler} if sampler == "euler_ancestral" else {}
    expected = reference(model, x, sigmas, disable=True, **extra)
    assert ours.shape == (2, *shape)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_ancestral_noise_follows_the_seed_and_not_the_batch():
    unet, sampling = TinyEps(), ModelSampling.scaled_linear()
    generator = torch.Generator().manual_seed(2)
    cond, uncond = _conditioning(generator, 2), _conditioning(generator, 2)
    settings = {"size": (16, 16), "sampler": "euler_ancestral", "scheduler": "normal", "steps": 4,
                "device": torch.device("cpu"), "noise_device": "cpu"}
    both = sample_latents(CFGDenoiser(unet, sampling, cond, uncond, 5.0, (16, 16)), seeds=[3, 4], **settings)
    alone = sample_latents(CFGDenoiser(unet, sampling, Conditioning(cond.embeds[1:], cond.pooled[1:]),
                                       Conditioning(uncond.embeds[1:], uncond.pooled[1:]), 5.0, (16, 16)),
                           seeds=[4], **settings)
    torch.testing.assert_close(both[1:], alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="sampler 'lms'"):
        sample_latents(CFGDenoiser(unet, sampling, cond, uncond, 5.0, (16, 16)), seeds=[3, 4],
                       **{**settings, "sampler": "lms"})


def _ztsnr_alphas_cumprod() -> torch.Tensor:
    """SDXL's ᾱ rescaled to zero terminal SNR (Lin et al. 2023, algorithm 1, in float64), the last
    value 0 replaced by ComfyUI's 4.8973451890853435e-08 (a finite last sigma)."""
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=np.float64) ** 2
    root = np.sqrt(np.cumprod(1 - betas))
    root = (root - root[-1]) * root[0] / (root[0] - root[-1])
    alphas_cumprod = root**2
    alphas_cumprod[-1] = 4.8973451890853435e-08
    return torch.from_numpy(alphas_cumprod)


def test_v_prediction_with_zero_terminal_snr_matches_k_diffusion(kdiff):
    """The same TinyEps network read as a v-prediction model, on the zero-terminal-SNR sigmas."""
    generator = torch.Generator().manual_seed(1)
    cond, uncond = _conditioning(generator, 2), _conditioning(generator, 2)
    sampling = ModelSampling.from_scheduler_config({"prediction_type": "v_prediction", "rescale_betas_zero_snr": True})
    alphas_cumprod = _ztsnr_alphas_cumprod()
    reference_sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    torch.testing.assert_close(sampling.sigmas, reference_sigmas.float())
    assert sampling.sigma_max == pytest.approx(4518.8, rel=1e-4)
    unet, seeds, size, steps, cfg = TinyEps(), [7, 123], (32, 24), 6, 5.0
    ours = sample_latents(CFGDenoiser(unet, sampling, cond, uncond, cfg, size), seeds=seeds, size=size,
                          sampler="euler_ancestral", scheduler="normal", steps=steps, device=torch.device("cpu"),
                          noise_device="cpu")

    time_ids = torch.tensor([[*size, 0, 0, *size]], dtype=torch.float32).expand(2, -1)

    def v(x, t, conditioning):
        added = {"text_embeds": conditioning.pooled, "time_ids": time_ids}
        return unet(x, t, encoder_hidden_states=conditioning.embeds, added_cond_kwargs=added)[0]

    wrapped = kdiff.external.DiscreteVDDPMDenoiser(v, alphas_cumprod.float(), quantize=True)

    def model(x, sigma):
        negative, positive = wrapped(x, sigma, conditioning=uncond), wrapped(x, sigma, conditioning=cond)
        return negative + (positive - negative) * cfg

    sigmas = wrapped.get_sigmas(steps)
    shape = (4, size[0] // 8, size[1] // 8)
    x = initial_noise(seeds, shape) * torch.sqrt(1 + sigmas[0] ** 2)
    generators = [torch.Generator().manual_seed(s) for s in seeds]

    def noise_sampler(sigma, sigma_next):
        return torch.cat([torch.randn((1, *shape), generator=g) for g in generators])

    expected = kdiff.sampling.sample_euler_ancestral(model, x, sigmas, disable=True, noise_sampler=noise_sampler)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
