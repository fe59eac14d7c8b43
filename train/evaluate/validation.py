"""Deterministic validation loss: held-out images at fixed timesteps with fixed noise.

The loss of a checkpoint is the training loss (train.diffusion: forward process, ε/v target,
MSE) averaged over every held-out image x every timestep in `timesteps`, where the noise for
image i comes from a CPU generator seeded with `seed + i`. Latents are encoded once; only the
UNet and text encoders (which carry the LoRA) run per checkpoint. Same images, timesteps and
seed -> numbers comparable across checkpoints and runs, and identical on a re-run.

Held-out images come from the prepped dataset (rows with split == "val", at the recorded
resize/crop/bucket, as the trainer sees them) or from a folder of images with optional `.txt`
caption sidecars (each image resized to cover the card resolution nearest its aspect ratio and
centre-cropped).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from train.config import ValidationConfig
from train.data.latents import Geometry, encode, load_pixels, row_geometry
from train.data.rows import load_rows
from train.data.text_encoding import encode_prompts
from train.diffusion import add_noise, compute_time_ids, sample_noise, training_target, weighted_mse
from train.names import CARD_RESOLUTIONS, VALIDATION_TIMESTEPS

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".avif")


@dataclass
class ValItem:
    """One held-out image, ready for the UNet."""

    id: str
    latents: torch.Tensor  # (1, 4, H/8, W/8) float32, scaled by the VAE scaling factor
    caption: str  # head, body, tail in order: no shuffle, no dropout
    time_ids: torch.Tensor  # (6,): original (h, w), crop (top, left), target (h, w)


def dataset_sources(dataset_dir: str | Path, scale: float = 1.0) -> list[tuple[str, str, Geometry, torch.Tensor, str]]:
    """(id, image path, geometry, time_ids, caption) of the prepped dataset's `val` rows."""
    rows = load_rows(dataset_dir, split="val")
    sources = []
    for row in rows:
        geometry = row_geometry(row, scale)
        time_ids = compute_time_ids((row["height"], row["width"]), (geometry.crop_top, geometry.crop_left),
                                    (geometry.height, geometry.width))
        caption = ", ".join([*row["caption_head"], *row["caption_body"], *row["caption_tail"]])
        sources.append((row["id"], row["image_path"], geometry, time_ids, caption))
    return sources


def _cover_geometry(width: int, height: int, scale: float) -> Geometry:
    """Resize to cover the card resolution nearest the image's aspect ratio, centre crop."""
    bucket_w, bucket_h = min(CARD_RESOLUTIONS, key=lambda wh: abs(wh[0] / wh[1] - width / height))
    bucket_w, bucket_h = (max(8, round(v * scale / 8) * 8) for v in (bucket_w, bucket_h))
    factor = max(bucket_w / width, bucket_h / height)
    resize_w, resize_h = max(bucket_w, round(width * factor)), max(bucket_h, round(height * factor))
    return Geometry(resize_w, resize_h, (resize_w - bucket_w) // 2, (resize_h - bucket_h) // 2, bucket_w, bucket_h)


def folder_sources(folder: str | Path, scale: float = 1.0) -> list[tuple[str, str, Geometry, torch.Tensor, str]]:
    """Held-out images from a folder; captions from `name.txt` beside each image.

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: it holds no images.
    """
    from captioning.images import load_rgb

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: validation image folder not found")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in the validation folder")
    sources = []
    for path in paths:
        width, height = load_rgb(path).size
        geometry = _cover_geometry(width, height, scale)
        sidecar = path.with_suffix(".txt")
        caption = sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else ""
        if not caption:
            logger.warning("%s: no caption sidecar (%s); validating with an empty caption", path, sidecar.name)
        time_ids = compute_time_ids((height, width), (geometry.crop_top, geometry.crop_left),
                                    (geometry.height, geometry.width))
        sources.append((str(path.relative_to(folder)), str(path), geometry, time_ids, caption))
    return sources


def encode_items(sources: Sequence[tuple], vae) -> list[ValItem]:
    """Latents of every source image, encoded once (they do not depend on the LoRA)."""
    items = []
    for item_id, path, geometry, time_ids, caption in sources:
        pixels = load_pixels(path, geometry).unsqueeze(0)  # (1, 3, H, W)
        items.append(ValItem(item_id, encode(vae, pixels, vae.config.scaling_factor).cpu(), caption, time_ids))
    return items


class ValidationLoss:
    """Callable giving the mean validation loss of the model in its current LoRA state."""

    def __init__(self, items: Sequence[ValItem], noise_scheduler, prediction_type: str,
                 timesteps: Sequence[int] = VALIDATION_TIMESTEPS, seed: int = 0) -> None:
        if not items:
            raise ValueError("validation loss needs at least one held-out image")
        self.items = list(items)
        self.alphas_cumprod = noise_scheduler.alphas_cumprod
        self.prediction_type = prediction_type
        self.timesteps = torch.tensor(list(timesteps), dtype=torch.long)
        self.seed = seed

    def __call__(self, unet, tokenizers, text_encoders) -> float:
        losses = self.item_losses(unet, tokenizers, text_encoders)
        return float(sum(losses) / len(losses))

    @torch.no_grad()
    def item_losses(self, unet, tokenizers, text_encoders) -> list[float]:
        """The loss of each held-out image, averaged over the timesteps (in `items` order)."""
        losses = []
        steps = len(self.timesteps)
        for index, item in enumerate(self.items):
            generator = torch.Generator("cpu").manual_seed(self.seed + index)
            latents = item.latents.expand(steps, -1, -1, -1)  # (T, 4, h, w): one row per timestep
            noise = sample_noise(latents, generator)
            noisy = add_noise(latents, noise, self.timesteps, self.alphas_cumprod)
            target = training_target(self.prediction_type, latents, noise, self.timesteps, self.alphas_cumprod)
            embeds, pooled = encode_prompts([item.caption], tokenizers, text_encoders)
            device, dtype = unet.device, unet.dtype
            prediction = unet(
                noisy.to(device, dtype), self.timesteps.to(device),
                encoder_hidden_states=embeds.to(device, dtype).expand(steps, -1, -1),
                added_cond_kwargs={"text_embeds": pooled.to(device, dtype).expand(steps, -1),
                                   "time_ids": item.time_ids.to(device, dtype).expand(steps, -1)},
            ).sample  # (T, 4, h, w)
            losses.append(weighted_mse(prediction.float().cpu(), target.float()).item())
        return losses


def validation_share(validation: ValidationConfig, dataset: str, *, scale: float, base, rank: int, world_size: int):
    """The `[validation]` loss during training: this rank's share of it (every `world_size`-th `val`
    row), its latents encoded now with `base.vae`; None when validation is off or the share is empty.

    Raises:
        ValueError: validation is on but the dataset has no `val` rows.
    """
    if not validation.every_n_steps:
        return None
    try:
        sources = dataset_sources(dataset, scale)
    except ValueError as err:
        raise ValueError(f"validation.every_n_steps is set but {err}: give the prep recipe a val_fraction, "
                         "or set validation.every_n_steps = 0") from None
    share = sources[rank::world_size]
    if not share:
        return None
    return ValidationLoss(encode_items(share, base.vae), base.noise_scheduler, base.prediction_type,
                          validation.timesteps, validation.seed)
