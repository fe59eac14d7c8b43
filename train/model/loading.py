"""Load the frozen SDXL base model for training: UNet, VAE, both text encoders, tokenizers.

Three kinds of source are accepted:

- a Hub id (default `cagliostrolab/animagine-xl-4.0-zero`), loaded per component from its subfolder;
- a local diffusers folder (`unet/`, `vae/`, `text_encoder/`, ... as `save_pretrained` writes);
- one `.safetensors` checkpoint in the original SGM layout (what A1111/ComfyUI load), converted by
  diffusers' `from_single_file` against local component configs, so it works offline.

The weights are frozen (`requires_grad=False`, eval mode). The UNet and text encoders take
`weight_dtype` (bf16 by default); the VAE takes `vae_dtype`, bf16 or fp32 only: the SDXL VAE
overflows in fp16 (why `madebyollin/sdxl-vae-fp16-fix` exists).
"""

from __future__ import annotations

import hashlib
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from train.config import ModelConfig
from train.model import prediction as predictions
from train.model import sgm_keys
from train.names import SDXL_CONFIG_DIR, ZERO_REPO, looks_like_path

logger = logging.getLogger(__name__)

# `model.weight_dtype` / `vae_dtype` names (train.names.DTYPE_NAMES) -> torch dtypes.
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class SdxlComponents:
    """The frozen components a LoRA is trained on, plus what the training loop needs to know."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    noise_scheduler: DDPMScheduler  # training scheduler: the model's config, prediction and schedule resolved
    vae_fingerprint: str  # hash of the VAE weights: the latent cache key
    prediction: predictions.Prediction  # prediction type, zero terminal SNR, and why

    @property
    def prediction_type(self) -> str:
        """"epsilon" | "v_prediction"."""
        return self.prediction.prediction_type


def vae_fingerprint(vae: AutoencoderKL) -> str:
    """Stable hex digest of the VAE's weights (names, dtypes, shapes and bytes, in name order).

    Latents are a function of exactly these, so a cache keyed on the digest is invalidated when
    the VAE or its dtype changes. Hashing ~84M parameters takes about a second.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:32]


def _check_dtypes(weight_dtype: torch.dtype, vae_dtype: torch.dtype) -> None:
    if weight_dtype not in TORCH_DTYPES.values():
        raise ValueError(
            f"weight_dtype {weight_dtype}: use torch.bfloat16, torch.float16 or torch.float32"
        )
    if vae_dtype == torch.float16:
        raise ValueError(
            "vae_dtype torch.float16: the SDXL VAE overflows (NaN latents) in fp16; "
            "use torch.float32 (exact) or torch.bfloat16"
        )
    if vae_dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"vae_dtype {vae_dtype}: use torch.float32 or torch.bfloat16")


# What to pass when a Hub model is neither cached nor reachable.
MODEL_INSTEAD = "--model PATH (a diffusers folder or a .safetensors file; config: model.source)"


def _is_hub_id(source: str) -> bool:
    return not Path(source).expanduser().exists() and not looks_like_path(source)


def _local_only(source: str) -> bool:
    """Hub downloads are off: a local source, or the Hub is out of reach (checked once, fast)."""
    from captioning.hub import hub_offline

    return not _is_hub_id(source) or hub_offline()


def _offline_error(source: str, error: Exception) -> OSError:
    from captioning.hub import offline_error

    first = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
    return offline_error(f"the model {source} ({first})", MODEL_INSTEAD)


def shipped_tokenizers() -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """SDXL's two tokenizers from the CLIP vocabulary shipped with `captioning`: both use the
    same 49,408 tokens and differ only in padding (`<|endoftext|>`, then `!`). Built once into
    the user cache; no network."""
    from captioning.tokens import EOS, SHIPPED_CLIP_BPE, build_clip_tokenizer_files, cache_root

    folder = cache_root() / "sdxl-tokenizers"
    pads = {"tokenizer": EOS, "tokenizer_2": "!"}
    for name, pad in pads.items():
        if not (folder / name / "tokenizer.json").is_file():
            build_clip_tokenizer_files(SHIPPED_CLIP_BPE, folder / name, pad_token=pad)
    return tuple(CLIPTokenizer.from_pretrained(folder / name) for name in pads)


def _load_tokenizers(candidates: list[str]) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """The two CLIP tokenizers from the first candidate holding `tokenizer/` and `tokenizer_2/`.

    Raises:
        OSError: no candidate could be loaded; the message lists each one tried and why.
    """
    tried = []
    for candidate in candidates:
        local_only = _local_only(candidate)
        try:
            return (
                CLIPTokenizer.from_pretrained(candidate, subfolder="tokenizer", local_files_only=local_only),
                CLIPTokenizer.from_pretrained(candidate, subfolder="tokenizer_2", local_files_only=local_only),
            )
        except (OSError, ValueError) as err:
            if local_only and _is_hub_id(candidate):
                raise _offline_error(candidate, err) from None
            tried.append(f"{candidate} ({type(err).__name__}: {str(err).splitlines()[0][:160]})")
    raise OSError(
        "could not load the SDXL tokenizers (tokenizer/ and tokenizer_2/); tried: "
        + "; ".join(tried)
        + ". Pass tokenizer_dir= a folder holding both, or make the Hub reachable."
    )


def _scheduler_config(source: str, local_only: bool = True) -> dict:
    return dict(DDPMScheduler.load_config(source, subfolder="scheduler", local_files_only=local_only))


def _load_diffusers(source: str, weight_dtype: torch.dtype, vae_dtype: torch.dtype, choose):
    """The four models of a diffusers folder or Hub model, their scheduler config and
    `choose(scheduler_config)` (the prediction), which runs first: a refusal costs no weights."""
    local_only = _local_only(source)
    try:
        scheduler_config = _scheduler_config(source, local_only)
        prediction = choose(scheduler_config)
        unet = UNet2DConditionModel.from_pretrained(
            source, subfolder="unet", torch_dtype=weight_dtype, local_files_only=local_only)
        vae = AutoencoderKL.from_pretrained(
            source, subfolder="vae", torch_dtype=vae_dtype, local_files_only=local_only)
        te1 = CLIPTextModel.from_pretrained(
            source, subfolder="text_encoder", dtype=weight_dtype, local_files_only=local_only)
        te2 = CLIPTextModelWithProjection.from_pretrained(
            source, subfolder="text_encoder_2", dtype=weight_dtype, local_files_only=local_only)
        return unet, vae, te1, te2, scheduler_config, prediction
    except OSError as err:
        if local_only and _is_hub_id(source):
            raise _offline_error(source, err) from None
        raise


def _read_component(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under `prefix`, read alone: the other models' bytes stay on disk."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        keys = handle.keys()  # a safe_open handle is not iterable
        return {key: handle.get_tensor(key) for key in keys if key.startswith(prefix)}


def _load_single_file(path: Path, config_dir: Path, weight_dtype, vae_dtype, choose):
    """All four models from one SGM checkpoint, converted by diffusers against `config_dir`, the
    scheduler config and `choose(scheduler_config)` (the prediction, decided before any weight is read).

    One model at a time: its tensors are read from the file, converted and loaded straight into
    its dtype (`weight_dtype`, the VAE `vae_dtype`), so memory peaks at about twice the UNet in
    its own dtype rather than the whole checkpoint plus an fp32 copy of every model, and the VAE
    never passes through a lossy dtype on its way to fp32.
    """
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if not (config_dir / component / "config.json").is_file():
            raise FileNotFoundError(
                f"{config_dir / component / 'config.json'}: component config missing"
            )
    scheduler_config = _scheduler_config(str(config_dir))
    prediction = choose(scheduler_config)
    loaded = {}
    for component, cls, dtype in (("unet", UNet2DConditionModel, weight_dtype), ("vae", AutoencoderKL, vae_dtype),
                                  ("text_encoder", CLIPTextModel, weight_dtype),
                                  ("text_encoder_2", CLIPTextModelWithProjection, weight_dtype)):
        tensors = _read_component(path, sgm_keys.PREFIXES[component])
        if not tensors:
            raise ValueError(f"{path}: no {component} tensors (keys {sgm_keys.PREFIXES[component]}*): "
                             "not an SDXL checkpoint in the SGM layout")
        if component in ("unet", "vae"):
            loaded[component] = cls.from_single_file(tensors, config=str(config_dir), subfolder=component,
                                                     torch_dtype=dtype, local_files_only=True)
        else:
            loaded[component] = create_diffusers_clip_model_from_ldm(
                cls, tensors, subfolder=component, config=str(config_dir), torch_dtype=dtype,
                local_files_only=True)
        del tensors
    return (
        loaded["unet"].to(weight_dtype),
        loaded["vae"].to(vae_dtype),
        loaded["text_encoder"].to(weight_dtype),
        loaded["text_encoder_2"].to(weight_dtype),
        scheduler_config,
        prediction,
    )


def _freeze(*models: torch.nn.Module) -> None:
    for model in models:
        model.requires_grad_(False)
        model.eval()


def load_base_model(
    source: str = ZERO_REPO,
    *,
    config_dir: str | None = None,
    tokenizer_dir: str | None = None,
    weight_dtype: torch.dtype = torch.bfloat16,
    vae_dtype: torch.dtype = torch.float32,
    prediction_type: str = "auto",
    zero_terminal_snr: bool | str = "auto",
) -> SdxlComponents:
    """Load a frozen SDXL base model from a Hub id, a diffusers folder or an SGM `.safetensors`.

    Args:
        source: Hub id, local diffusers folder, or single-file checkpoint.
        config_dir: component configs for single-file loading (default: SDXL 1.0 base configs
            shipped in `train/model/sdxl_configs`). Ignored for the other sources.
        tokenizer_dir: folder with `tokenizer/` and `tokenizer_2/`. Default: the source itself
            (folder or Hub id), or for a single file the ones built from the shipped CLIP
            vocabulary (`shipped_tokenizers`), so a local file never touches the network.
        weight_dtype: dtype of UNet and text encoders.
        vae_dtype: torch.float32 or torch.bfloat16.
        prediction_type, zero_terminal_snr: "auto" (what the model says: `train.model.prediction`)
            or the config's override.

    Raises:
        ValueError: a dtype that cannot work; zero terminal SNR on an epsilon model.
        FileNotFoundError: a local path that does not exist or a missing component config.
        OSError: tokenizers or Hub files that could not be loaded (message lists what was tried);
            `captioning.hub.HubUnreachableError` at once when the Hub is out of reach and the
            model is not cached (one line naming what to pass).
    """
    _check_dtypes(weight_dtype, vae_dtype)
    source = str(source)
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: single-file checkpoints must be .safetensors")
        # A local file never needs the network: without tokenizer_dir, SDXL's tokenizers come
        # from the shipped CLIP vocabulary (the same tokens as the Hub model's).
        tokenizers = _load_tokenizers([tokenizer_dir]) if tokenizer_dir else shipped_tokenizers()
        config = Path(config_dir) if config_dir else SDXL_CONFIG_DIR
        markers = predictions.single_file_markers(path)

        def choose(scheduler_config: dict) -> predictions.Prediction:
            detected = predictions.detect(scheduler_config, origin=f"{config / 'scheduler'} (the component configs)",
                                          markers=markers)
            return predictions.resolve(detected, prediction_type, zero_terminal_snr)

        unet, vae, te1, te2, scheduler_config, prediction = _load_single_file(
            path, config, weight_dtype, vae_dtype, choose
        )
    elif path.is_dir() or not looks_like_path(source):
        if path.is_dir() and not (path / "unet").is_dir():
            raise FileNotFoundError(f"{path}: not a diffusers folder (no unet/ subfolder)")
        tokenizers = _load_tokenizers([tokenizer_dir] if tokenizer_dir else [source])

        def choose(scheduler_config: dict) -> predictions.Prediction:
            detected = predictions.detect(scheduler_config, origin=f"the scheduler config of {source}")
            return predictions.resolve(detected, prediction_type, zero_terminal_snr)

        unet, vae, te1, te2, scheduler_config, prediction = _load_diffusers(source, weight_dtype, vae_dtype, choose)
    else:
        raise FileNotFoundError(f"{source}: model file or folder not found")
    _freeze(unet, vae, te1, te2)
    noise_scheduler = DDPMScheduler.from_config(prediction.scheduler_config(scheduler_config))
    logger.info("loaded %s: prediction_type=%s, zero_terminal_snr=%s (%s)", source, prediction.prediction_type,
                str(prediction.zero_terminal_snr).lower(), prediction.reason)
    return SdxlComponents(
        unet=unet,
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        noise_scheduler=noise_scheduler,
        vae_fingerprint=vae_fingerprint(vae),
        prediction=prediction,
    )


def load_model(model: ModelConfig, device: torch.device | str, zero_terminal_snr: bool | str = "auto") -> SdxlComponents:
    """The frozen base model of a `[model]` table, on `device` (the VAE too: it encodes uncached latents);
    `zero_terminal_snr` is `train.zero_terminal_snr`.

    A UNet to be quantized (`model.quantize`) stays on the CPU: `train.model.quantize.quantize_unet`
    moves it once compressed, so a small GPU never holds its full-precision weights.
    """
    base = load_base_model(model.source, config_dir=model.config_dir, tokenizer_dir=model.tokenizer_dir,
                           weight_dtype=TORCH_DTYPES[model.weight_dtype], vae_dtype=TORCH_DTYPES[model.vae_dtype],
                           prediction_type=model.prediction_type, zero_terminal_snr=zero_terminal_snr)
    modules = [base.vae, base.text_encoder, base.text_encoder_2]
    if model.quantize == "none":
        modules.append(base.unet)
    for module in modules:
        module.to(device)
    return base


@contextmanager
def modules_on(device: torch.device, *modules: torch.nn.Module):
    """Modules moved to `device` for the block and back where they were (text encoders that
    cached text outputs sent to the CPU come back for sample grids)."""
    moved = [(m, home) for m in modules if (home := next(m.parameters()).device).type != device.type]
    for module, _ in moved:
        module.to(device)
    try:
        yield
    finally:
        for module, home in moved:
            module.to(home)
