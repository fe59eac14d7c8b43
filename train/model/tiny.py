"""A tiny SDXL: the real architecture at toy width, built from config for CPU tests.

Every block type of SDXL is present (DownBlock2D + two CrossAttnDownBlock2D, the mirrored up
path, a cross-attention mid block, `text_time` micro-conditioning, a 4-level VAE, CLIP-L and
OpenCLIP-bigG-shaped text encoders with the real 49,408-token BPE vocabulary), so code that works
here works on Animagine XL; only the widths are small. Weights come from a fixed seed.

The build writes three things under `out_dir`:

- `diffusers/`: a diffusers folder (`StableDiffusionXLPipeline.from_pretrained` loads it,
  tokenizers included),
- `tiny_sdxl.safetensors`: the same weights as one SGM-layout checkpoint (like an A1111 model),
- `configs/`: model_index.json and component configs, for single-file loading offline.

Usage: `python -m train.model.tiny OUT_DIR` (the CLIP vocabulary shipped with `captioning`; `--clip-bpe FILE`
for another copy of the merge list)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from captioning import build_clip_tokenizer_files, outputs
from captioning.tokens import SHIPPED_CLIP_BPE
from train.model import sgm_keys
from train.names import SDXL_CONFIG_DIR
from train.tensor_files import save_tensors

logger = logging.getLogger(__name__)

_COMPLETE_MARKER = "tiny_model.json"
_BUILD_VERSION = 1

# Text encoder widths. They must differ: diffusers' single-file loader tells CLIP-L from OpenCLIP
# bigG by the width of their position embeddings (768 vs 1280 in SDXL).
TEXT_HIDDEN_1 = 32
TEXT_HIDDEN_2 = 48

TINY_UNET = {
    "block_out_channels": [32, 64, 64],
    "attention_head_dim": [2, 4, 4],
    "transformer_layers_per_block": 1,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "cross_attention_dim": TEXT_HIDDEN_1
    + TEXT_HIDDEN_2,  # both encoders' hidden states, concatenated
    "addition_time_embed_dim": 8,
    # pooled text_encoder_2 output + 6 size/crop numbers each embedded to addition_time_embed_dim
    "projection_class_embeddings_input_dim": TEXT_HIDDEN_2 + 6 * 8,
    "sample_size": 8,
}
TINY_VAE = {
    "block_out_channels": [32, 32, 64, 64],
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "sample_size": 64,
}
TINY_TEXT = {
    "text_encoder": {
        "hidden_size": TEXT_HIDDEN_1,
        "projection_dim": TEXT_HIDDEN_1,
        "intermediate_size": 64,
    },
    "text_encoder_2": {
        "hidden_size": TEXT_HIDDEN_2,
        "projection_dim": TEXT_HIDDEN_2,
        "intermediate_size": 96,
    },
}
TINY_TEXT_COMMON = {"num_attention_heads": 4, "num_hidden_layers": 2}


@dataclass(frozen=True)
class TinyModel:
    """Paths of one tiny-model build."""

    diffusers_dir: Path  # StableDiffusionXLPipeline folder, tokenizers included
    single_file: Path  # SGM-layout .safetensors with the same weights
    config_dir: Path  # configs for `load_base_model(single_file, config_dir=...)`
    tokenizer_dir: Path  # folder with tokenizer/ and tokenizer_2/


def _paths(root: Path) -> TinyModel:
    return TinyModel(
        diffusers_dir=root / "diffusers",
        single_file=root / "tiny_sdxl.safetensors",
        config_dir=root / "configs",
        tokenizer_dir=root / "diffusers",
    )


def _write_tokenizer(bpe_gz: Path, out_dir: Path, pad_token: str) -> None:
    """A CLIPTokenizer folder; SDXL's tokenizer_2 pads with "!" (id 0), tokenizer with EOS."""
    build_clip_tokenizer_files(bpe_gz, out_dir, pad_token=pad_token)


def _sdxl_config(component: str, filename: str = "config.json") -> dict:
    return json.loads((SDXL_CONFIG_DIR / component / filename).read_text("utf-8"))


def _tiny_text_config(component: str) -> CLIPTextConfig:
    config = {**_sdxl_config(component), **TINY_TEXT_COMMON, **TINY_TEXT[component]}
    # SDXL's configs say float16; the tiny model stays float32 so CPU tests run in full precision.
    config.pop("torch_dtype", None)
    return CLIPTextConfig(**config, dtype="float32")


def _build_components(seed: int):
    """The five model components at tiny size, initialised from `seed`."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config({**_sdxl_config("unet"), **TINY_UNET})
    vae = AutoencoderKL.from_config({**_sdxl_config("vae"), **TINY_VAE})
    te1 = CLIPTextModel(_tiny_text_config("text_encoder"))
    te2 = CLIPTextModelWithProjection(_tiny_text_config("text_encoder_2"))
    # Random init leaves zero-initialised output layers (diffusers zeroes conv_out / proj_out of
    # some blocks): give every parameter a small random value so LoRA and layout tests see signal.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (unet, vae, te1, te2):
            for name, param in model.named_parameters():
                if param.ndim > 1 and param.abs().sum() == 0:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    scheduler = EulerDiscreteScheduler.from_config(
        _sdxl_config("scheduler", "scheduler_config.json")
    )
    return unet, vae, te1, te2, scheduler


def _write_build(root: Path, bpe_gz: Path, seed: int) -> None:
    unet, vae, te1, te2, scheduler = _build_components(seed)
    paths = _paths(root)
    d = paths.diffusers_dir
    unet.save_pretrained(d / "unet")
    vae.save_pretrained(d / "vae")
    te1.save_pretrained(d / "text_encoder")
    te2.save_pretrained(d / "text_encoder_2")
    scheduler.save_pretrained(d / "scheduler")
    _write_tokenizer(bpe_gz, d / "tokenizer", pad_token="<|endoftext|>")
    _write_tokenizer(bpe_gz, d / "tokenizer_2", pad_token="!")
    shutil.copy(SDXL_CONFIG_DIR / "model_index.json", d / "model_index.json")

    # Config folder for single-file loading: every component's config, no weights.
    c = paths.config_dir
    c.mkdir()
    shutil.copy(SDXL_CONFIG_DIR / "model_index.json", c / "model_index.json")
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        (c / component).mkdir()
        shutil.copy(d / component / "config.json", c / component / "config.json")
    (c / "scheduler").mkdir()
    shutil.copy(
        d / "scheduler" / "scheduler_config.json", c / "scheduler" / "scheduler_config.json"
    )

    checkpoint = {
        **sgm_keys.unet_to_sgm(unet.state_dict(), dict(unet.config)),
        **sgm_keys.vae_to_sgm(vae.state_dict(), dict(vae.config)),
        **sgm_keys.clip_l_to_sgm(te1.state_dict()),
        **sgm_keys.open_clip_to_sgm(te2.state_dict()),
    }
    checkpoint = {k: v.contiguous() for k, v in checkpoint.items()}
    save_tensors(paths.single_file, checkpoint, metadata={"format": "pt"})  # the umask's mode, not 0600
    (root / _COMPLETE_MARKER).write_text(
        json.dumps({"version": _BUILD_VERSION, "seed": seed}), "utf-8"
    )


def build_tiny_model(out_dir: Path, clip_bpe: Path = SHIPPED_CLIP_BPE, seed: int = 0) -> TinyModel:
    """Build (or reuse) the tiny SDXL under `out_dir`; see the module docstring for the layout.

    Idempotent: a complete build with the same seed is reused. The build happens in a temporary
    sibling folder that is renamed into place, so an interrupted build never looks complete.

    Raises:
        FileNotFoundError: `clip_bpe` does not exist.
        FileExistsError: `out_dir` exists but is not a complete tiny-model build of this seed.
    """
    out_dir = Path(out_dir)
    clip_bpe = Path(clip_bpe)
    marker = out_dir / _COMPLETE_MARKER
    if marker.exists():
        info = json.loads(marker.read_text("utf-8"))
        if info == {"version": _BUILD_VERSION, "seed": seed}:
            return _paths(out_dir)
        raise FileExistsError(f"{out_dir}: holds a tiny model build {info}, wanted seed {seed}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir}: exists, not empty and not a tiny model build")
    if not clip_bpe.is_file():
        raise FileNotFoundError(f"{clip_bpe}: CLIP BPE merges file not found")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    os.chmod(tmp, outputs.normal_mode(folder=True))  # mkdtemp's 0700 would outlive the rename
    try:
        _write_build(tmp, clip_bpe, seed)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    logger.info("built tiny SDXL in %s", out_dir)
    return _paths(out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the tiny SDXL test model.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--clip-bpe", type=Path, default=SHIPPED_CLIP_BPE,
                        help="bpe_simple_vocab_16e6.txt.gz (default: the copy shipped with captioning)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        built = build_tiny_model(args.out_dir, args.clip_bpe, args.seed)
    except (FileNotFoundError, FileExistsError) as err:
        logger.error("%s", err)
        return 1
    logger.info("diffusers folder: %s; single file: %s", built.diffusers_dir, built.single_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
