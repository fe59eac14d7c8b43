"""WD v3 auto-tagger (SmilingWolf's wd-*-tagger-v3 models) through onnxruntime.

A model folder holds `model.onnx` (input NHWC float32 [N, S, S, 3], output [N, n_tags] sigmoid
probabilities) and `selected_tags.csv` (tag_id,name,category,count; category 9 = rating,
0 = general, 4 = character). Preprocessing reproduces the one the taggers were trained with (see
the reference app in the SmilingWolf/wd-tagger Hugging Face Space): pad to a square on white,
resize to the model's input side with bicubic filtering, RGB -> BGR, float32 in 0..255.

No torch here: onnxruntime alone runs the model (CUDA provider when installed, else CPU).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from captioning import Category, Post, normalize_tag

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "SmilingWolf/wd-eva02-large-tagger-v3"
MODEL_FILE = "model.onnx"
LABEL_FILE = "selected_tags.csv"
RATING_LETTERS = {"general": "g", "sensitive": "s", "questionable": "q", "explicit": "e"}
WD_RATING, WD_GENERAL, WD_CHARACTER = 9, 0, 4
WHITE = (255, 255, 255)


@dataclass(frozen=True)
class Label:
    name: str
    category: int


def read_labels(path: Path) -> list[Label]:
    """`selected_tags.csv` rows in model-output order; ValueError naming the file and line."""
    labels = []
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"name", "category"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected a header with 'name' and 'category' columns")
        for line, row in enumerate(reader, start=2):
            try:
                labels.append(Label(row["name"], int(row["category"])))
            except (TypeError, ValueError):
                raise ValueError(
                    f"{path}:{line}: category {row.get('category')!r} is not an integer"
                ) from None
    return labels


def resolve_model(path_or_repo: str) -> tuple[Path, Path]:
    """(model.onnx, selected_tags.csv) from a local folder, or downloaded from the Hub."""
    local = Path(path_or_repo).expanduser()
    if local.is_dir():
        model, labels = local / MODEL_FILE, local / LABEL_FILE
        for required in (model, labels):
            if not required.is_file():
                raise FileNotFoundError(f"{required}: missing from the tagger folder")
        return model, labels
    if local.exists() or path_or_repo.count("/") != 1:
        raise FileNotFoundError(
            f"{path_or_repo}: not a tagger folder (model.onnx + selected_tags.csv) or Hub repo id"
        )
    from captioning.hub import hf_download

    instead = "--tagger DIR (for `tag`: --model DIR), a folder with model.onnx and selected_tags.csv"
    return tuple(Path(hf_download(path_or_repo, name, f"the tagger {path_or_repo}", instead))
                 for name in (MODEL_FILE, LABEL_FILE))


def pad_to_square(image: Image.Image) -> Image.Image:
    """`image` (RGB) centred on a white square canvas whose side is its longer side."""
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), WHITE)
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


class WDTagger:
    """A loaded tagger; `tag_images`/`tag_files` return one captioning `Post` per image."""

    def __init__(
        self,
        session,
        labels: Sequence[Label],
        *,
        general_threshold: float = 0.35,
        character_threshold: float = 0.85,
        batch_size: int = 8,
        name: str = "",
    ) -> None:
        self.session = session
        self.labels = list(labels)
        self.general_threshold = general_threshold
        self.character_threshold = character_threshold
        self.batch_size = batch_size
        self.name = name
        model_input = session.get_inputs()[0]
        self.input_name = model_input.name
        shape = model_input.shape  # [N, S, S, 3]; N is symbolic for batched exports
        if len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int):
            raise ValueError(f"{name}: expected an NHWC input [N, S, S, 3], got {shape}")
        self.input_size = int(shape[1])
        outputs = session.get_outputs()[0].shape[-1]
        if isinstance(outputs, int) and outputs != len(self.labels):
            raise ValueError(
                f"{name}: model has {outputs} outputs but {LABEL_FILE} has {len(self.labels)} tags"
            )

    @classmethod
    def load(cls, path_or_repo: str = DEFAULT_MODEL, **options) -> WDTagger:
        import onnxruntime

        model, labels = resolve_model(path_or_repo)
        available = onnxruntime.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        session = onnxruntime.InferenceSession(str(model), providers=providers)
        return cls(session, read_labels(labels), name=str(path_or_repo), **options)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """(S, S, 3) float32 BGR 0..255 from an RGB image (alpha already composited on white)."""
        square = pad_to_square(image.convert("RGB"))
        if square.width != self.input_size:
            square = square.resize((self.input_size, self.input_size), Image.Resampling.BICUBIC)
        array = np.asarray(square, dtype=np.float32)  # (S, S, 3) RGB
        return np.ascontiguousarray(array[:, :, ::-1])  # BGR, as the taggers were trained

    def predict(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, n_tags) probabilities, run in batches of `batch_size`."""
        outputs = []
        for start in range(0, len(images), self.batch_size):
            batch = np.stack(
                [self.preprocess(im) for im in images[start : start + self.batch_size]]
            )
            outputs.append(self.session.run(None, {self.input_name: batch})[0])
        return np.concatenate(outputs) if outputs else np.zeros((0, len(self.labels)), np.float32)

    def to_post(self, probabilities: np.ndarray, image_id: str, origin: str) -> Post:
        """Thresholded tags (highest first) and the argmax rating as a Post."""
        general, character, ratings = [], [], {}
        for label, probability in zip(self.labels, probabilities.tolist()):
            if label.category == WD_RATING:
                ratings[label.name] = probability
            elif label.category == WD_CHARACTER and probability >= self.character_threshold:
                character.append((probability, label.name))
            elif label.category == WD_GENERAL and probability >= self.general_threshold:
                general.append((probability, label.name))
        rating_name = max(ratings, key=ratings.get) if ratings else None
        tags: dict[Category, list[str]] = {}
        if character:
            tags[Category.CHARACTER] = [
                normalize_tag(n) for _, n in sorted(character, reverse=True)
            ]
        if general:
            tags[Category.GENERAL] = [normalize_tag(n) for _, n in sorted(general, reverse=True)]
        return Post(
            id=image_id,
            origin=origin,
            tags=tags,
            uncategorised=[],
            rating=RATING_LETTERS.get(rating_name) if rating_name else None,
            score=None,
            created_at=None,
            metadata={
                "tagger": self.name,
                "tagger_probabilities": {
                    n: round(p, 4) for p, n in sorted(character + general, reverse=True)
                },
                "tagger_ratings": {n: round(p, 4) for n, p in ratings.items()},
            },
        )

    def tag_images(self, images: Sequence[Image.Image], ids: Sequence[str]) -> list[Post]:
        probabilities = self.predict(images)
        return [self.to_post(p, image_id, image_id) for p, image_id in zip(probabilities, ids)]

    def tag_files(self, paths: Sequence[str | Path]) -> list[Post]:
        """Tag image files (opened like the trainer opens them: `captioning.images.load_rgb`)."""
        from captioning.images import load_rgb  # the one image decoder shared by every stage

        posts = []
        for start in range(0, len(paths), self.batch_size):
            chunk = paths[start : start + self.batch_size]
            posts += self.tag_images([load_rgb(p) for p in chunk], [str(p) for p in chunk])
        return posts
