"""Builders for the sampling/eval tests: WebUI LoRA files, a prepped dataset, a tiny WD tagger."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from train.lora.adapters import add_text_encoder_lora, add_unet_lora
from train.lora.export import save_webui_lora, webui_metadata
from train.model.loading import load_base_model

HEAD = ["1girl", "herta (honkai: star rail)", "honkai: star rail", "safe"]


def lora_model(tiny_model, seed: int, *, text_encoder: bool = False, scale: float = 0.5):
    """A fresh fp32 tiny model with a LoRA whose B matrices are random (so the LoRA has an effect)."""
    model = load_base_model(str(tiny_model.diffusers_dir), weight_dtype=torch.float32)
    add_unet_lora(model.unet, preset="attn-mlp", rank=4, alpha=2.0)
    modules = [model.unet]
    if text_encoder:
        add_text_encoder_lora(model.text_encoder, rank=4, alpha=2.0)
        modules.append(model.text_encoder)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for name, param in module.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return model


def write_lora(path: Path, model, *, text_encoder: bool = False, steps: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {"ss_steps": steps} if steps is not None else None
    metadata = webui_metadata(rank=4, alpha=2.0, output_name=path.stem, resolution=64, tag_frequency={},
                              comment="test", extra=extra)
    save_webui_lora(path, unet=model.unet, text_encoder=model.text_encoder if text_encoder else None,
                    metadata=metadata, dtype=torch.float32)
    return path


def make_dataset(root: Path, n_train: int = 3, n_val: int = 2, side: int = 64) -> Path:
    """A prepped dataset (the contract's columns) of small generated images under `root`."""
    import datasets

    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    columns: dict[str, list] = {k: [] for k in (
        "id", "image_path", "sha256", "width", "height", "bucket_width", "bucket_height", "resize_width",
        "resize_height", "crop_left", "crop_top", "caption_head", "caption_body", "caption_tail", "repeats",
        "rating", "score", "year", "source", "split", "metadata")}
    for i in range(n_train + n_val):
        path = images / f"{i}.png"
        array = rng.integers(0, 255, (side + 8, side, 3), dtype=np.uint8)
        Image.fromarray(array).save(path)
        row = {
            "id": f"{i}.png", "image_path": str(path), "sha256": f"{i:064d}", "width": side, "height": side + 8,
            "bucket_width": side, "bucket_height": side, "resize_width": side, "resize_height": side + 8,
            "crop_left": 0, "crop_top": 4, "caption_head": HEAD if i != 1 else HEAD[:1] + HEAD[3:],
            "caption_body": ["smile", "red hair"], "caption_tail": ["masterpiece"], "repeats": 1, "rating": "g",
            "score": None, "year": None, "source": "test", "split": "train" if i < n_train else "val",
            "metadata": json.dumps({}),
        }
        for key, value in row.items():
            columns[key].append(value)
    datasets.Dataset.from_dict(columns).save_to_disk(str(root / "dataset"))
    return root


# name, WD category, weights on (B, G, R) channel means in [0, 1], bias (logits; sigmoid applied)
TAGGER_LABELS = [
    ("general", 9, (0, 0, 0), 1.0),
    ("sensitive", 9, (0, 0, 0), 0.0),
    ("questionable", 9, (0, 0, 0), 0.0),
    ("explicit", 9, (0, 0, 0), 0.0),
    ("1girl", 0, (0, 0, 0), 2.0),
    ("smile", 0, (2, -2, 0), 0.0),
    ("red_hair", 0, (-3, 0, 3), 0.0),
    ("watermark", 0, (0, 3, -3), -1.0),
    ("herta_(honkai:_star_rail)", 4, (0, 0, 6), -1.5),
]


def build_tiny_clip(folder: Path, clip_bpe: Path) -> Path:
    """A tiny transformers CLIPModel + CLIPProcessor folder (32 px images, the real BPE vocabulary)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from captioning import build_clip_tokenizer_files

    tokenizer_dir = build_clip_tokenizer_files(clip_bpe, folder / "tokenizer")
    text = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
            "projection_dim": 16}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
              "image_size": 32, "patch_size": 8, "projection_dim": 16}
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=CLIPTokenizer.from_pretrained(str(tokenizer_dir)))
    processor.save_pretrained(folder)
    return folder
