"""Aesthetic scores from an image classifier, for Animagine XL 3.1's aesthetic tags.

3.1 tagged its images with `shadowlilac/aesthetic-shadow-v2` (per the 3.1 model card), a ViT image
classifier with two labels, `hq` and `lq`; the probability of `hq` is the aesthetic score, which
the `animagine-xl-3.1` profile's `[aesthetic]` bands turn into `very aesthetic` (> 0.71),
`aesthetic` (> 0.45), `displeasing` (> 0.27) or `very displeasing`. Any image-classification
model in the transformers format works the same (`--aesthetic-model ID_OR_DIR`, the profile's
`[aesthetic] label` naming the label scored).

The model runs through transformers' `image-classification` pipeline, in batches, on the GPU
(fp16) when there is one. Weights are loaded from safetensors only (a pickle `.bin` is never
unpickled). torch and transformers are imported when a scorer is loaded, never at module level.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

logger = logging.getLogger(__name__)

DEFAULT_LABEL = "hq"
# Files a transformers image classifier needs; everything else in a Hub repo is left undownloaded.
MODEL_FILES = ["*.json", "*.safetensors"]


class AestheticModelError(ValueError):
    """The classifier cannot be loaded, lacks the scored label, or the profile has no aesthetic
    tags; the message names the model."""


def resolve_model(model: str) -> str:
    """A local folder holding `model` (a folder path, or a Hub id fetched into the HF cache).

    Cached Hub files are used without any network call; when the Hub cannot be reached and the
    model is not cached, fails at once with one line naming what to pass instead.
    """
    local = Path(model).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise AestheticModelError(f"{model}: no config.json in the folder "
                                      "(expected a transformers image-classification model)")
        return str(local)
    if local.exists() or model.count("/") != 1:
        raise AestheticModelError(f"{model}: not a model folder or a Hub id (owner/name)")
    from huggingface_hub import snapshot_download

    from captioning.hub import HubUnreachableError, hub_offline, offline_error

    try:
        return snapshot_download(model, allow_patterns=MODEL_FILES, local_files_only=True)
    except Exception:  # noqa: BLE001, S110 - not cached (the exception type varies by version): download below
        pass
    if hub_offline():
        error: HubUnreachableError = offline_error(f"the aesthetic model {model}", "--aesthetic-model DIR")
        raise AestheticModelError(str(error))
    logger.info("downloading the aesthetic model %s into the Hugging Face cache (first use)", model)
    return snapshot_download(model, allow_patterns=MODEL_FILES)


class AestheticScorer:
    """A loaded classifier: `score(images)` gives each image's probability of `label`."""

    def __init__(self, pipe, label: str = DEFAULT_LABEL, batch_size: int = 8, name: str = "") -> None:
        self.pipe = pipe
        self.label = label
        self.batch_size = batch_size
        self.name = name
        labels = list(pipe.model.config.id2label.values())
        if label not in labels:
            raise AestheticModelError(f"{name}: the profile scores the label {label!r}, "
                                      f"but the model's labels are {', '.join(map(repr, labels))}")

    @classmethod
    def load(cls, model: str, label: str = DEFAULT_LABEL, batch_size: int = 8,
             device: str | None = None) -> AestheticScorer:
        """The classifier at `model` (folder or Hub id) on `device` (default: cuda when available)."""
        import torch
        from transformers import pipeline

        path = resolve_model(model)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        try:
            pipe = pipeline("image-classification", model=path, device=device, dtype=dtype,
                            model_kwargs={"use_safetensors": True})
        except (OSError, ValueError, KeyError) as error:
            raise AestheticModelError(f"{model}: cannot load an image classifier: "
                                      f"{str(error).splitlines()[0]}") from None
        return cls(pipe, label, batch_size, model)

    def score(self, images: Sequence[Image.Image]) -> list[float]:
        """The probability of `label` for each image (RGB), in input order."""
        if not images:
            return []
        results = self.pipe(list(images), batch_size=self.batch_size, top_k=None)
        return [next(float(p["score"]) for p in result if p["label"] == self.label) for result in results]

    def score_files(self, paths: Sequence[str | Path]) -> list[float]:
        """Score image files, opened as every stage opens them (`captioning.images.load_rgb`)."""
        from captioning.images import load_rgb

        scores: list[float] = []
        for start in range(0, len(paths), self.batch_size):
            scores += self.score([load_rgb(p) for p in paths[start: start + self.batch_size]])
        return scores


def scorer_for_profile(model: str | None, profile, batch_size: int = 8) -> AestheticScorer | None:
    """The classifier for `profile`'s aesthetic tags, or None when no model is given.

    Raises AestheticModelError when the model cannot be loaded or the profile has no aesthetic
    tags to give (Animagine XL 4.0 has none: asking for scores it would not use is a mistake).
    """
    if not model:
        return None
    if not profile.aesthetic_bands:
        raise AestheticModelError(f"{model}: the profile {profile.name} has no aesthetic tags ([aesthetic] "
                                  "bands); use the animagine-xl-3.1 profile or a profile with bands")
    return AestheticScorer.load(model, profile.aesthetic_label, batch_size)
