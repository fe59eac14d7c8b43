"""Generate images with a LoRA at the Animagine XL 4.0 card's settings: CLI, training hook, eval.

One code path for all three users: `build_pipeline` wraps loaded components in diffusers'
`StableDiffusionXLPipeline` (it holds the modules, the LoRA adapters and the image processor),
`load_lora` puts a WebUI (kohya) LoRA file on it exactly as users will (`pipe.load_lora_weights`),
or a LyCORIS (LoKr/LoHa) file through PEFT as the training hook puts its adapter, `generate` encodes the prompts (emphasis, 75-token chunks) and samples, `make_grid` lays the
images out.

Samplers (`SampleSettings.sampler`):

- `euler_ancestral` (default, the card's "Euler a"), `euler`, `dpmpp_2m`, with the `normal`
  (default) or `karras` scheduler: ComfyUI's KSampler loop (train.generate.comfy_sampling). The
  same seed, prompt and settings give ComfyUI's latent: initial noise from a CPU generator per
  image seed (ComfyUI at batch size 1), ancestral noise from a second generator with the same
  seed on `noise_device` (`gpu`: the sampling device, as ComfyUI; `cpu`: the same on any machine).
- `diffusers-euler-a`: diffusers' `EulerAncestralDiscreteScheduler` (`timestep_spacing`
  "linspace") in the pipeline, one CPU generator per image drawing the initial and the ancestral
  noise. Close to, not equal to, ComfyUI and the WebUIs (fractional timesteps, sigma
  interpolation, noise * sigma_max start).

Prompts are WebUI/ComfyUI text with emphasis (train.generate.emphasis), encoded in 75-token chunks
as in training; the negative prompt is encoded in the same batch so both have the same number of
chunks (classifier-free guidance concatenates them).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from captioning import outputs
from train.generate.comfy_sampling import CFGDenoiser, Conditioning, sample_latents
from train.generate.k_samplers import ModelSampling
from train.generate.prompt_encoding import encode_weighted_prompts
from train.lora.files import LoraFileError, lora_modules, read_header
from train.lora.lycoris_convert import is_lycoris, loha_adapters, lokr_adapters
from train.names import (
    CARD_CFG,
    CARD_NEGATIVE,
    CARD_STEPS,
    DIFFUSERS_SAMPLER,
    MODEL_ALIASES,
    OPT_FILE,
    OPT_FILE_ALIAS,
    OPT_REPO,
    SAMPLER_CHOICES,
)

logger = logging.getLogger(__name__)


@dataclass
class SampleSettings:
    """How to generate: the card's defaults (28 steps, CFG 5, its negative prompt, Euler a)."""

    width: int = 1024
    height: int = 1024
    steps: int = CARD_STEPS
    cfg: float = CARD_CFG
    negative: str = CARD_NEGATIVE
    seeds: list[int] = field(default_factory=lambda: [0])
    batch_size: int = 4
    sampler: str = "euler_ancestral"  # train.names.SAMPLER_CHOICES: ComfyUI's names, or "diffusers-euler-a"
    scheduler: str = "normal"  # train.names.SCHEDULERS (ComfyUI loop only)
    noise_device: str = "gpu"  # ancestral noise on the sampling device (ComfyUI) or "cpu"
    timestep_spacing: str = "linspace"  # diffusers-euler-a only


def resolve_model_source(model: str) -> str:
    """`opt`/`zero` -> their Hub ids; `opt-file` -> the downloaded Opt single file; else as given."""
    if model == OPT_FILE_ALIAS:
        from captioning.hub import hf_download

        return hf_download(OPT_REPO, OPT_FILE, f"the Opt single file {OPT_REPO}/{OPT_FILE}",
                           "--model PATH (a .safetensors file or a diffusers folder)")
    return MODEL_ALIASES.get(model, model)


def build_pipeline(model, *, device: str | torch.device = "cpu",
                   timestep_spacing: str = "linspace") -> StableDiffusionXLPipeline:
    """A `StableDiffusionXLPipeline` over a loaded `train.model.loading.SdxlComponents`'s components.

    The components are used as they are (no copy): LoRA weights loaded into the pipeline land in
    these modules. The scheduler is Euler Ancestral from the model's own scheduler config.
    """
    scheduler = EulerAncestralDiscreteScheduler.from_config(
        model.noise_scheduler.config, timestep_spacing=timestep_spacing
    )
    pipe = StableDiffusionXLPipeline(
        vae=model.vae, text_encoder=model.text_encoder, text_encoder_2=model.text_encoder_2,
        tokenizer=model.tokenizer, tokenizer_2=model.tokenizer_2, unet=model.unet, scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _adapter_layer_count(pipe: StableDiffusionXLPipeline, adapter_name: str) -> int:
    count = 0
    for component in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        for module in component.modules():
            lora_a = getattr(module, "lora_A", None)
            if isinstance(lora_a, torch.nn.ModuleDict) and adapter_name in lora_a:
                count += 1
    return count


def load_lora(pipe: StableDiffusionXLPipeline, path: str | Path, adapter_name: str,
              strength: float = 1.0) -> None:
    """Load a WebUI/kohya (or diffusers) LoRA file as users do, check every module was used.

    `pipe.load_lora_weights` converts kohya names and applies `alpha / r`; afterwards the number
    of LoRA layers injected must equal the number of modules in the file, otherwise some keys
    matched nothing (a LoRA for another architecture, or renamed modules) and the adapter is
    removed again. The adapter is then the only active one, at `strength`.

    A LyCORIS file (LoKr, LoHa), which diffusers cannot load on SDXL, is attached through PEFT
    instead, as the training hook does with a LyCORIS adapter (`_load_lycoris`).

    Raises:
        LoraFileError: naming `path`, for every reason the LoRA cannot be used.
    """
    if is_lycoris(read_header(path)[0]):
        _load_lycoris(pipe, Path(path), adapter_name)
        pipe.set_adapters([adapter_name], adapter_weights=[strength])
        logger.info("loaded LyCORIS file %s at strength %g", path, strength)
        return
    expected = len(lora_modules(path))
    try:
        with _quiet_lora_loaders():
            pipe.load_lora_weights(str(path), adapter_name=adapter_name)
    except Exception as err:  # noqa: BLE001 - diffusers/peft raise many types on a foreign file
        _delete_adapter(pipe, adapter_name)
        raise LoraFileError(f"{path}: {_short_reason(err, expected)}") from None
    loaded = _adapter_layer_count(pipe, adapter_name)
    if loaded != expected:
        _delete_adapter(pipe, adapter_name)
        raise LoraFileError(
            f"{path}: {expected - loaded} of {expected} LoRA modules match no layer of this SDXL model "
            "(unknown keys: a LoRA for another architecture?)"
        )
    pipe.set_adapters([adapter_name], adapter_weights=[strength])
    logger.info("loaded LoRA %s (%d modules) at strength %g", path, expected, strength)


def _load_lycoris(pipe: StableDiffusionXLPipeline, path: Path, adapter_name: str) -> None:
    """A LoKr / LoHa file's adapters put on the pipeline's models with PEFT (`add_adapter` with the
    config the file's shapes imply, then its tensors), every tensor checked to land in a layer."""
    from peft import set_peft_model_state_dict
    from peft.config import PeftConfig
    from safetensors.torch import load_file

    tensors = load_file(path)
    read = loha_adapters if any(".hada_" in key for key in tensors) else lokr_adapters
    try:
        adapters = read(path, tensors)
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise LoraFileError(f"{path}: {str(err).removeprefix(f'{path}: ')}") from None
    try:
        for component, (config, state) in adapters.items():
            model = getattr(pipe, component)
            model.add_adapter(PeftConfig.from_peft_type(**config), adapter_name=adapter_name)
            result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
            unexpected = list(getattr(result, "unexpected_keys", []) or [])
            if unexpected:
                raise LoraFileError(f"{path}: {len(unexpected)} tensors match no layer of this SDXL model "
                                    f"(e.g. {unexpected[0]}): a LoRA for another architecture?")
    except LoraFileError:
        _delete_adapter(pipe, adapter_name)
        raise
    except Exception as err:  # noqa: BLE001 - peft raises many types on a foreign file
        _delete_adapter(pipe, adapter_name)
        raise LoraFileError(f"{path}: {_short_reason(err, sum(len(s) for _, s in adapters.values()))}") from None


@contextmanager
def _quiet_lora_loaders():
    """Silence diffusers' loader logs for one load: `load_lora` checks and reports more precisely.

    peft.py logs the whole set of unmatched modules on failure, and lora_base.py warns "No LoRA keys
    associated to CLIPTextModel" for every UNet-only LoRA, which is normal.
    """
    loggers = [logging.getLogger(f"diffusers.loaders.{name}") for name in ("peft", "lora_base")]
    levels = [one.level for one in loggers]
    for one in loggers:
        one.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for one, level in zip(loggers, levels):
            one.setLevel(level)


def _short_reason(err: Exception, expected: int) -> str:
    """One readable line for a load failure (peft's messages can list hundreds of modules)."""
    text = str(err).strip()
    unknown = re.search(r"Target modules \{'([^']+)'", text)
    if unknown:
        return (f"LoRA modules match no layer of this SDXL model (unknown keys, e.g. {unknown.group(1)}; "
                f"{expected} modules in the file): a LoRA for another architecture?")
    if "size mismatch" in text:
        shape = re.search(r"size mismatch for ([^:]+): copying a param with shape (\S+ \S+)", text)
        detail = f" ({shape.group(1)}: {shape.group(2)})" if shape else ""
        return f"layer shapes do not fit this SDXL model{detail}: a LoRA for another architecture?"
    first = text.splitlines()[0] if text else type(err).__name__
    return f"cannot be loaded on this SDXL model: {first[:200]}"


def _delete_adapter(pipe: StableDiffusionXLPipeline, adapter_name: str) -> None:
    adapters = {a for names in pipe.get_list_adapters().values() for a in names}
    if adapter_name in adapters:
        pipe.delete_adapters(adapter_name)


def unload_lora(pipe: StableDiffusionXLPipeline, adapter_name: str) -> None:
    """Remove one adapter; the base weights are untouched (LoRA layers are never fused here)."""
    _delete_adapter(pipe, adapter_name)


@torch.no_grad()
def encode(pipe: StableDiffusionXLPipeline, prompts: Sequence[str], negative: str) -> dict[str, torch.Tensor]:
    """Chunked embeddings of `prompts` and of `negative` (emphasis applied), same number of chunks.

    Returns the pipeline's keyword arguments: `prompt_embeds` (P, 77k, d), `pooled_prompt_embeds`
    (P, d_pooled), and the negative ones repeated to P rows.
    """
    embeds, pooled = encode_weighted_prompts(
        [*prompts, negative], [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2]
    )
    count = len(prompts)
    return {
        "prompt_embeds": embeds[:count],
        "pooled_prompt_embeds": pooled[:count],
        "negative_prompt_embeds": embeds[count:].expand(count, -1, -1),
        "negative_pooled_prompt_embeds": pooled[count:].expand(count, -1),
    }


@torch.no_grad()
def decode_latents(pipe: StableDiffusionXLPipeline, latents: torch.Tensor) -> list[Image.Image]:
    """Latents -> PIL images in the VAE's own dtype (bf16/fp32; fp16 overflows in the SDXL VAE)."""
    vae = pipe.vae
    latents = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor
    images = vae.decode(latents, return_dict=False)[0]  # (B, 3, H, W) in [-1, 1]
    return pipe.image_processor.postprocess(images, output_type="pil")


def generate(pipe: StableDiffusionXLPipeline, prompts: Sequence[str], settings: SampleSettings,
             *, progress: bool = True, description: str = "sampling") -> list[list[Image.Image]]:
    """Images for every prompt x seed: `result[p][s]` is prompt `p` with `settings.seeds[s]`.

    `prompts` are final prompt texts (already ordered; emphasis syntax, escaped parentheses). Work
    is batched over (prompt, seed) pairs, `settings.batch_size` at a time; each image has its own
    generators, so an image does not depend on its batch.

    Raises:
        ValueError: an unknown sampler, scheduler or noise device.
    """
    if settings.sampler not in SAMPLER_CHOICES:
        raise ValueError(f"sampler {settings.sampler!r}: expected one of {list(SAMPLER_CHOICES)}")
    embeds = encode(pipe, prompts, settings.negative)
    pairs = [(p, s) for p in range(len(prompts)) for s in range(len(settings.seeds))]
    images: dict[tuple[int, int], Image.Image] = {}
    batches = [pairs[i:i + settings.batch_size] for i in range(0, len(pairs), settings.batch_size)]
    for batch in tqdm(batches, desc=description, disable=not progress, leave=False):
        rows = torch.tensor([p for p, _ in batch])
        seeds = [settings.seeds[s] for _, s in batch]
        latents = sample_latents_batch(pipe, {name: value[rows] for name, value in embeds.items()}, seeds, settings)
        for key, image in zip(batch, decode_latents(pipe, latents)):
            images[key] = image
    return [[images[(p, s)] for s in range(len(settings.seeds))] for p in range(len(prompts))]


def sample_latents_batch(pipe, embeds: dict[str, torch.Tensor], seeds: list[int],
                         settings: SampleSettings) -> torch.Tensor:
    """Final latents (b, 4, H/8, W/8) of one batch: `embeds` as from `encode`, one row per seed."""
    if settings.sampler == DIFFUSERS_SAMPLER:
        return _diffusers_latents(pipe, embeds, seeds, settings)
    return _comfy_latents(pipe, embeds, seeds, settings)


def _diffusers_latents(pipe, embeds: dict[str, torch.Tensor], seeds: list[int], settings: SampleSettings):
    """(b, 4, H/8, W/8) from the pipeline's Euler Ancestral scheduler, a CPU generator per image."""
    if not isinstance(pipe.scheduler, EulerAncestralDiscreteScheduler) or (
            pipe.scheduler.config.timestep_spacing != settings.timestep_spacing):
        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(
            pipe.scheduler.config, timestep_spacing=settings.timestep_spacing)
    return pipe(
        **embeds, width=settings.width, height=settings.height, num_inference_steps=settings.steps,
        guidance_scale=settings.cfg, generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        output_type="latent",
    ).images


def _comfy_latents(pipe, embeds: dict[str, torch.Tensor], seeds: list[int], settings: SampleSettings):
    """(b, 4, H/8, W/8) from ComfyUI's KSampler loop over the pipeline's UNet."""
    sampling = ModelSampling.from_scheduler_config(pipe.scheduler.config)
    cond = Conditioning(embeds["prompt_embeds"], embeds["pooled_prompt_embeds"])
    uncond = Conditioning(embeds["negative_prompt_embeds"], embeds["negative_pooled_prompt_embeds"])
    device = pipe._execution_device  # the UNet's device, also under model CPU offload
    size = (settings.height, settings.width)
    denoiser = CFGDenoiser(pipe.unet, sampling, cond, uncond, settings.cfg, size)
    latents = sample_latents(denoiser, seeds=seeds, size=size, sampler=settings.sampler,
                             scheduler=settings.scheduler, steps=settings.steps, device=device,
                             noise_device=settings.noise_device)
    pipe.maybe_free_model_hooks()  # under model CPU offload, the UNet leaves the GPU as after a pipeline call
    return latents


def make_grid(rows: Sequence[Sequence[Image.Image]], *, row_labels: Sequence[str] = (),
              col_labels: Sequence[str] = (), label_width: int = 0) -> Image.Image:
    """Images in a grid (rows x columns, all cells the size of the first image), labelled.

    Row labels go in a left margin of `label_width` pixels (0 = none), column labels in a top band.
    """
    cell_w, cell_h = rows[0][0].size
    columns = max(len(r) for r in rows)
    top = 16 if col_labels else 0
    grid = Image.new("RGB", (label_width + columns * cell_w, top + len(rows) * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(col_labels):
        draw.text((label_width + c * cell_w + 2, 2), _fit(label, cell_w), fill="black")
    for r, row in enumerate(rows):
        if r < len(row_labels) and label_width:
            draw.text((2, top + r * cell_h + 2), _fit(row_labels[r], label_width), fill="black")
        for c, image in enumerate(row):
            grid.paste(image.resize((cell_w, cell_h)), (label_width + c * cell_w, top + r * cell_h))
    return grid


def _fit(text: str, width: int) -> str:
    characters = max(4, width // 6)  # PIL's default bitmap font is about 6 px per character
    return text if len(text) <= characters else text[: characters - 1] + "…"


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write `image` as PNG atomically (`captioning.outputs`: temp file, then rename).

    Raises:
        OutputError: `path` cannot be an output, or the write failed (disk full).
    """
    with outputs.atomic_path(path) as temp:
        image.save(temp, format="PNG")
    return Path(path)


def save_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically (`captioning.outputs`)."""
    return outputs.write_text(path, text)


def render_grid(pipe: StableDiffusionXLPipeline, prompts: Sequence[str], settings: SampleSettings,
                path: str | Path, *, progress: bool = True) -> Image.Image:
    """Prompts (rows) x seeds (columns) generated on `pipe`, written to `path` as PNG; returns it."""
    images = generate(pipe, prompts, settings, progress=progress)
    grid = make_grid(images, col_labels=[f"seed {s}" for s in settings.seeds])
    save_png(grid, path)
    return grid
