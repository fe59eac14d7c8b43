"""Optional CLIP scores of generated images, from a local `transformers` CLIP model folder.

- image-image: cosine similarity of each generated image's CLIP embedding to the mean embedding
  of (up to `max_references`) training images: does it look like the training set?
- image-text: cosine similarity of each image to its prompt (CLIPScore, Hessel et al. 2021,
  without the 2.5 rescale; prompts longer than CLIP's 77 tokens are truncated here).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image


class ClipScorer:
    def __init__(self, path: str | Path, reference_images: Sequence[Image.Image], device: str = "cpu") -> None:
        from transformers import CLIPModel, CLIPProcessor

        if not Path(path).is_dir():
            raise FileNotFoundError(f"{path}: CLIP model folder not found (a local transformers CLIPModel)")
        self.model = CLIPModel.from_pretrained(str(path)).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(str(path))
        self.device = device
        self.reference = None
        if reference_images:
            self.reference = torch.nn.functional.normalize(self._images(reference_images).mean(0), dim=-1)

    @torch.no_grad()
    def _images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        inputs = self.processor(images=list(images), return_tensors="pt").to(self.device)
        features = self.model.get_image_features(**inputs)
        features = getattr(features, "pooler_output", features)  # tensor in older transformers
        return torch.nn.functional.normalize(features.float(), dim=-1)  # (N, d)

    @torch.no_grad()
    def _texts(self, texts: Sequence[str]) -> torch.Tensor:
        inputs = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True).to(self.device)
        features = self.model.get_text_features(**inputs)
        features = getattr(features, "pooler_output", features)
        return torch.nn.functional.normalize(features.float(), dim=-1)

    def scores(self, images: Sequence[Sequence[Image.Image]], prompts: Sequence[str]) -> tuple[float | None, float]:
        """(mean image-image similarity or None without references, mean image-text similarity)."""
        flat = [image for row in images for image in row]
        prompt_of = [p for p, row in enumerate(images) for _ in row]
        embeds = self._images(flat)
        texts = self._texts(prompts)[prompt_of]
        image_text = float((embeds * texts).sum(-1).mean())
        image_image = float((embeds @ self.reference).mean()) if self.reference is not None else None
        return image_image, image_text
