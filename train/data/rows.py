"""From dataset rows to training batches: cached latents, augmented captions, SDXL time ids.

Captions follow the Animagine layout (head, body, tail): the body is shuffled every time a sample
is drawn while the head (count, character, series, artist) and tail (rating, year, quality) stay
in place; tag dropout removes body tags, caption dropout empties the whole caption (what
sd-scripts calls `caption_dropout_rate`, which keeps the unconditional prediction trained).

All randomness comes from the `random.Random` the caller passes in; the loop seeds it from
(seed, step, rank), so a resumed run draws the same captions as the uninterrupted one.

Regularization rows (`data.regularization`, a second prepped dataset) are numbered after the
training rows; their samples carry the loss weight `prior_loss_weight` (sd-scripts' name).
With `masked`, each sample also carries its loss mask on the latent grid (ones when the image has
none), computed from the image's alpha or mask file the first time it is drawn, then kept.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from train.data.latents import LatentCache, load_latent_mask, row_geometry
from train.diffusion import compute_time_ids
from train.names import DATASET_DIR, OPTIONAL_TRAINING_COLUMNS, TRAINING_COLUMNS


@dataclass(frozen=True)
class CaptionAugment:
    shuffle: bool = True
    tag_dropout: float = 0.0
    caption_dropout: float = 0.0

    @property
    def active(self) -> bool:
        """True when the same row can give different captions (text outputs cannot be cached)."""
        return self.shuffle or self.tag_dropout > 0 or self.caption_dropout > 0


def make_caption(head: Sequence[str], body: Sequence[str], tail: Sequence[str],
                 rng: random.Random, augment: CaptionAugment) -> str:
    """The training caption "head, body, tail" with body shuffle and dropouts applied."""
    if augment.caption_dropout and rng.random() < augment.caption_dropout:
        return ""
    body = list(body)
    if augment.tag_dropout:
        body = [tag for tag in body if rng.random() >= augment.tag_dropout]
    if augment.shuffle:
        rng.shuffle(body)
    return ", ".join([*head, *body, *tail])


@dataclass
class TrainBatch:
    latents: Tensor  # (B, 4, H/8, W/8), float32
    captions: list[str]
    time_ids: Tensor  # (B, 6): original (h, w), crop (top, left), target (h, w)
    ids: list[str]
    loss_weights: Tensor | None = None  # (B,): 1 for training rows, prior_loss_weight for regularization
    masks: Tensor | None = None  # (B, 1, H/8, W/8) in [0, 1], when the loss is masked


def load_rows(dataset_dir: str | Path, split: str | None = "train") -> list[dict]:
    """The rows of one split (None: every split) of a prepped dataset (`OUT/dataset`), as plain dicts.

    Raises:
        FileNotFoundError: no dataset at `OUT/dataset`.
        ValueError: a required column is missing, or there are no such rows.
    """
    import datasets

    path = Path(dataset_dir) / DATASET_DIR
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no prepped dataset here (run `animagine-lora prep ... -o {dataset_dir}`)")
    table = datasets.load_from_disk(str(path))
    missing = [c for c in TRAINING_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: dataset lacks columns {missing}")
    present = [c for c in OPTIONAL_TRAINING_COLUMNS if c in table.column_names]
    rows = [{**dict.fromkeys(OPTIONAL_TRAINING_COLUMNS), **row}
            for row in table.select_columns([*TRAINING_COLUMNS, *present]).to_list()
            if split is None or row["split"] == split]
    if not rows:
        raise ValueError(f"{path}: no rows" + (f" with split={split!r}" if split is not None else ""))
    return rows


class TrainingData:
    """Builds `TrainBatch`es from row numbers.

    Args:
        rows: dataset rows (`load_rows`).
        cache: where the latents are (all must be cached, flipped ones too when `flip`).
        augment: caption augmentation.
        flip: use the horizontally flipped latents for a random half of the draws.
        reg_rows, reg_cache: regularization rows (numbers from len(rows) on) and their latents.
        prior_loss_weight: the loss weight of a regularization sample.
        masked: add each sample's loss mask to the batch.
    """

    def __init__(self, rows: Sequence[dict], cache: LatentCache, augment: CaptionAugment, flip: bool = False, *,
                 reg_rows: Sequence[dict] = (), reg_cache: LatentCache | None = None, prior_loss_weight: float = 1.0,
                 masked: bool = False):
        self.rows = rows
        self.cache = cache
        self.augment = augment
        self.flip = flip
        self.reg_rows = reg_rows
        self.reg_cache = reg_cache
        self.prior_loss_weight = prior_loss_weight
        self.masked = masked
        self._masks: dict[tuple[int, bool], Tensor] = {}  # (row number, flipped) -> (1, H/8, W/8)

    def _source(self, number: int) -> tuple[dict, LatentCache, float]:
        """(row, its latent cache, its loss weight) of row `number`."""
        if number < len(self.rows):
            return self.rows[number], self.cache, 1.0
        return self.reg_rows[number - len(self.rows)], self.reg_cache, self.prior_loss_weight

    def mask(self, number: int, flipped: bool, latents: Tensor) -> Tensor:
        """Row `number`'s loss mask, (1, H/8, W/8); ones when it has none."""
        row = self._source(number)[0]
        if not row.get("mask_path"):
            return torch.ones_like(latents[:1])
        key = (number, flipped)
        if key not in self._masks:
            try:
                self._masks[key] = load_latent_mask(row["mask_path"], row_geometry(row, self.cache.scale), flipped)
            except OSError as err:
                raise OSError(f"{row['mask_path']}: cannot read the loss mask of {row['image_path']}: {err}") from err
        return self._masks[key]

    def time_ids(self, row: dict, flipped: bool) -> Tensor:
        g = row_geometry(row, self.cache.scale)
        # A flipped crop starts where the unflipped one ended, counted from the other side.
        left = g.resize_width - g.crop_left - g.width if flipped else g.crop_left
        return compute_time_ids((row["height"], row["width"]), (g.crop_top, left), (g.height, g.width))

    def batch(self, row_numbers: Sequence[int], rng: random.Random) -> TrainBatch:
        latents, captions, time_ids, ids, weights, masks = [], [], [], [], [], []
        for number in row_numbers:
            row, cache, weight = self._source(number)
            flipped = self.flip and rng.random() < 0.5
            latents.append(cache.load(row, flipped))
            captions.append(make_caption(row["caption_head"], row["caption_body"], row["caption_tail"],
                                         rng, self.augment))
            time_ids.append(self.time_ids(row, flipped))
            ids.append(row["id"])
            weights.append(weight)
            if self.masked:
                masks.append(self.mask(number, flipped, latents[-1]))
        return TrainBatch(torch.stack(latents), captions, torch.stack(time_ids), ids,
                          torch.tensor(weights, dtype=torch.float32), torch.stack(masks) if masks else None)


class TextEmbeddingCache:
    """Text-encoder outputs per caption, for runs without caption augmentation.

    `encode(captions) -> (prompt_embeds (B, 77k, D), pooled (B, P))` is `encode_prompts` bound to
    the frozen encoders. Each caption is encoded once, alone, and kept in CPU memory;
    `precompute` does that for every caption of the dataset up front, after which the encoders
    are not needed any more and can leave the GPU. A batch whose captions have different chunk
    counts is padded with the encoding of an empty chunk (`[BOS, EOS, pad...]`): every chunk is
    encoded on its own (train.data.text_encoding), so that is exactly what encoding the batch together
    gives, and the pooled output comes from the first chunk only.
    """

    def __init__(self, encode: Callable[[list[str]], tuple[Tensor, Tensor]], device: torch.device | str = "cpu"):
        self._encode = encode
        self._device = torch.device(device)
        self._memo: dict[str, tuple[Tensor, Tensor]] = {}
        self._empty_chunk: Tensor | None = None  # (77, D)

    def __len__(self) -> int:
        return len(self._memo)

    def precompute(self, captions: Iterable[str]) -> int:
        """Encode every caption not cached yet; returns how many were encoded."""
        new = [c for c in dict.fromkeys(captions) if c not in self._memo]
        for caption in new:
            self._add(caption)
        return len(new)

    def _add(self, caption: str) -> tuple[Tensor, Tensor]:
        embeds, pooled = self._encode([caption])
        stored = (embeds[0].detach().to("cpu"), pooled[0].detach().to("cpu"))
        self._memo[caption] = stored
        return stored

    def _empty(self) -> Tensor:
        if self._empty_chunk is None:
            self._empty_chunk = self._encode([""])[0][0].detach().to("cpu")  # one chunk: [BOS, EOS, pad...]
        return self._empty_chunk

    def __call__(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        pairs = [self._memo.get(c) or self._add(c) for c in captions]
        length = max(embeds.shape[0] for embeds, _ in pairs)
        if any(embeds.shape[0] != length for embeds, _ in pairs):
            empty = self._empty()
            pairs = [(torch.cat([embeds] + [empty] * ((length - embeds.shape[0]) // empty.shape[0])), pooled)
                     for embeds, pooled in pairs]
        embeds = torch.stack([e for e, _ in pairs]).to(self._device, non_blocking=True)  # (B, 77k, D)
        pooled = torch.stack([p for _, p in pairs]).to(self._device, non_blocking=True)  # (B, P)
        return embeds, pooled
