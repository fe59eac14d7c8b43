"""Generate images with a LoRA at the Animagine XL 4.0 card's settings: CLI, training hook, eval.

One code path for all three users: `build_pipeline` wraps loaded components in diffusers'
`StableDiffusionXLPipeline`, `load_lora` puts a WebUI (kohya) LoRA file on it exactly as users
will (`pipe.load_lora_weights`), `generate` encodes the prompts with the training-time chunked
encoder and runs the pipeline, `make_grid` lays the images out.

Sampler and noise conventions (what "the same seed" means here):

- Sampler: Euler Ancestral (`EulerAncestralDiscreteScheduler` from the model's scheduler config),
  with `timestep_spacing="linspace"` by default: timesteps evenly spaced from 999 to 0, which is
  what A1111's "Euler a" with the Automatic schedule and ComfyUI's `euler_ancestral` + `normal`
  use (k-diffusion `get_sigmas`), and which makes the first latent `noise * sigma_max` as in
  k-diffusion. Pass `timestep_spacing="leading"` to get the SDXL scheduler config's own spacing.
  Remaining difference: diffusers interpolates sigma, k-diffusion log-sigma, between training
  timesteps; images are close, not bit-identical, to the WebUIs'.
- Noise: one `torch.Generator("cpu")` per image seeded with that image's seed, drawing the initial
  latent and then every ancestral step's noise in order, on the CPU. That is A1111's RNG source
  "CPU" (a generator per seed, the sampler's noise drawn from it) and ComfyUI's CPU noise, so the
  same seed gives the same starting noise on any GPU. Seeds are per image, not per batch.
- Prompts longer than 75 tokens are encoded in 75-token chunks (train.data.text_encoding), as in
  training and in the WebUIs; the negative prompt is encoded in the same batch so both have the
  same number of chunks (classifier-free guidance concatenates them).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline
from PIL import Image, ImageDraw
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from train.data.text_encoding import encode_prompts
from train.generate.prompts import CARD_CFG, CARD_NEGATIVE, CARD_STEPS

logger = logging.getLogger(__name__)

OPT_REPO = "cagliostrolab/animagine-xl-4.0"
OPT_FILE = "animagine-xl-4.0-opt.safetensors"
ZERO_REPO = "cagliostrolab/animagine-xl-4.0-zero"
# Hub repos whose diffusers folders hold the named model (the 4.0 repo's folders are Opt).
MODEL_ALIASES = {"opt": OPT_REPO, "zero": ZERO_REPO}
_LORA_DOWN_SUFFIXES = (".lora_down.weight", ".lora_A.weight", ".lora.down.weight")
_LORA_UP_SUFFIXES = (".lora_up.weight", ".lora_B.weight", ".lora.up.weight")


class LoraFileError(ValueError):
    """A LoRA file that cannot be applied to the pipeline; the message names the file."""


@dataclass
class SampleSettings:
    """How to generate: the card's defaults (28 steps, CFG 5, its negative prompt)."""

    width: int = 1024
    height: int = 1024
    steps: int = CARD_STEPS
    cfg: float = CARD_CFG
    negative: str = CARD_NEGATIVE
    seeds: list[int] = field(default_factory=lambda: [0])
    batch_size: int = 4
    timestep_spacing: str = "linspace"


def resolve_model_source(model: str) -> str:
    """`opt`/`zero` -> their Hub ids; `opt-file` -> the downloaded Opt single file; else as given."""
    if model == "opt-file":
        from captioning.hub import hf_download

        return hf_download(OPT_REPO, OPT_FILE, f"the Opt single file {OPT_REPO}/{OPT_FILE}",
                           "--model PATH (a .safetensors file or a diffusers folder)")
    return MODEL_ALIASES.get(model, model)


def build_pipeline(model, *, device: str | torch.device = "cpu",
                   timestep_spacing: str = "linspace") -> StableDiffusionXLPipeline:
    """A `StableDiffusionXLPipeline` over a loaded `train.model.loading.BaseModel`'s components.

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


def lora_modules(path: str | Path) -> set[str]:
    """Module names of a LoRA file (the part before `.lora_down.weight`/`.lora_A.weight`).

    Raises:
        LoraFileError: unreadable, not a LoRA (e.g. a full model checkpoint), or a module with a
            down/A matrix but no up/B matrix (or the reverse).
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except (OSError, SafetensorError) as err:
        raise LoraFileError(f"{path}: not a readable .safetensors file ({err})") from None
    down = {k[: -len(s)] for k in keys for s in _LORA_DOWN_SUFFIXES if k.endswith(s)}
    up = {k[: -len(s)] for k in keys for s in _LORA_UP_SUFFIXES if k.endswith(s)}
    if not down and not up:
        hint = " (it looks like a full model checkpoint)" if any(
            k.startswith(("model.diffusion_model.", "first_stage_model.", "conditioner.")) for k in keys
        ) else ""
        raise LoraFileError(f"{path}: not a LoRA file, no lora_down/lora_A tensors{hint}")
    if down != up:
        missing = sorted(down ^ up)
        raise LoraFileError(f"{path}: {len(missing)} module(s) lack their up or down matrix, e.g. {missing[0]}")
    return down


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

    Raises:
        LoraFileError: naming `path`, for every reason the LoRA cannot be used.
    """
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
    """Chunked embeddings of `prompts` and of `negative`, all with the same number of chunks.

    Returns the pipeline's keyword arguments: `prompt_embeds` (P, 77k, d), `pooled_prompt_embeds`
    (P, d_pooled), and the negative ones repeated to P rows.
    """
    embeds, pooled = encode_prompts(
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

    `prompts` are final texts (already ordered, literal parentheses). Work is batched over
    (prompt, seed) pairs, `settings.batch_size` at a time; each image has its own CPU generator.
    """
    embeds = encode(pipe, prompts, settings.negative)
    pairs = [(p, s) for p in range(len(prompts)) for s in range(len(settings.seeds))]
    images: dict[tuple[int, int], Image.Image] = {}
    batches = [pairs[i:i + settings.batch_size] for i in range(0, len(pairs), settings.batch_size)]
    for batch in tqdm(batches, desc=description, disable=not progress, leave=False):
        rows = torch.tensor([p for p, _ in batch])
        generators = [torch.Generator("cpu").manual_seed(settings.seeds[s]) for _, s in batch]
        latents = pipe(
            **{name: value[rows] for name, value in embeds.items()},
            width=settings.width, height=settings.height, num_inference_steps=settings.steps,
            guidance_scale=settings.cfg, generator=generators, output_type="latent",
        ).images  # (b, 4, H/8, W/8)
        for key, image in zip(batch, decode_latents(pipe, latents)):
            images[key] = image
    return [[images[(p, s)] for s in range(len(settings.seeds))] for p in range(len(prompts))]


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
    """Write `image` as PNG atomically (temp file in the same folder, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".png", dir=path.parent)
    os.close(handle)
    try:
        image.save(temp, format="PNG")
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def save_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically (temp file in the same folder, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as out:
            out.write(text)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def render_grid(pipe: StableDiffusionXLPipeline, prompts: Sequence[str], settings: SampleSettings,
                path: str | Path, *, progress: bool = True) -> Image.Image:
    """Prompts (rows) x seeds (columns) generated on `pipe`, written to `path` as PNG; returns it."""
    images = generate(pipe, prompts, settings, progress=progress)
    grid = make_grid(images, col_labels=[f"seed {s}" for s in settings.seeds])
    save_png(grid, path)
    return grid
