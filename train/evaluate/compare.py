"""Evaluate a run's checkpoints side by side, the base model as step 0.

For each checkpoint's WebUI LoRA file, swapped into one loaded pipeline (never reloaded):
validation loss (train.evaluate.validation), a prompts x seeds grid at the card's settings, tag fidelity
with a WD v3 tagger (recall of the prompt's tags, recall of the trained character's head tags,
share of images showing a negative-prompt tag), optional CLIP scores. `recommend` picks the
checkpoint with the best validation loss among those whose tag fidelity is within a margin of
the best. A file that cannot be used (another architecture, unknown or missing keys) becomes a row
with its error; the others are still evaluated.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from train.generate.prompts import split_tags
from train.generate.sampling import (
    LoraFileError,
    SampleSettings,
    generate,
    load_lora,
    make_grid,
    save_png,
    unload_lora,
)
from train.names import CHECKPOINT_DIR_RE

logger = logging.getLogger(__name__)

_STEP_IN_NAME = re.compile(r"(\d+)(?!.*\d)")
METRICS = ("val_loss", "prompt_recall", "character_recall", "negative_rate", "tag_fidelity",
           "clip_image", "clip_text")


@dataclass
class Checkpoint:
    name: str
    step: int
    lora: Path | None  # None: the base model


@dataclass
class EvalRow:
    name: str
    step: int
    lora: str | None
    val_loss: float | None = None
    prompt_recall: float | None = None
    character_recall: float | None = None
    negative_rate: float | None = None
    tag_fidelity: float | None = None
    clip_image: float | None = None
    clip_text: float | None = None
    grid: str | None = None
    error: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def is_webui_lora(path: Path) -> bool:
    """A .safetensors with kohya-named LoRA weights (`lora_unet_*`, `lora_te*`), or unreadable.

    Unreadable files count, so that a damaged checkpoint file is reported by `load_lora` rather
    than silently skipped.
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            return any(k.startswith(("lora_unet_", "lora_te")) for k in handle.keys())  # noqa: SIM118
    except (OSError, SafetensorError):
        return True


def _step_of(path: Path, fallback: int) -> int:
    try:
        with safe_open(str(path), framework="pt") as handle:
            steps = (handle.metadata() or {}).get("ss_steps")
        if steps and steps.isdigit():
            return int(steps)
    except (OSError, SafetensorError):
        logger.debug("%s: unreadable header; step taken from the file name", path)
    match = _STEP_IN_NAME.search(path.stem)
    return int(match.group(1)) if match else fallback


def discover_checkpoints(inputs: Sequence[str | Path]) -> tuple[list[Checkpoint], list[str]]:
    """Checkpoints from run folders (`checkpoint-*/` with a WebUI LoRA) and LoRA files, by step.

    A run folder's top-level WebUI LoRA files (the final export) are included too. Returns the
    checkpoints (base first) and problems ("path: reason") for inputs that yield nothing.
    """
    found: list[Checkpoint] = []
    problems: list[str] = []
    for item in map(Path, inputs):
        if item.is_dir():
            dirs = sorted((int(m.group(1)), p) for p in item.iterdir()
                          if (m := CHECKPOINT_DIR_RE.match(p.name)) and p.is_dir())
            for step, folder in dirs:
                # With train.ema_decay a checkpoint holds NAME (the EMA, the run's LoRA) and NAME-raw.
                files = sorted((p for p in folder.rglob("*.safetensors") if is_webui_lora(p)),
                               key=lambda p: (p.stem.endswith("-raw"), p))
                if not files:
                    problems.append(f"{folder}: no WebUI LoRA .safetensors in this checkpoint")
                for file in files[:1]:
                    found.append(Checkpoint(folder.name, step, file))
            finals = sorted(p for p in item.glob("*.safetensors") if is_webui_lora(p))
            steps = {step for step, _ in dirs}
            for file in finals:
                step = _step_of(file, dirs[-1][0] + 1 if dirs else 1)
                if step in steps:  # the final export of a run that ended on a checkpoint: same weights
                    logger.info("%s: same step (%d) as a checkpoint; evaluated once", file, step)
                    continue
                found.append(Checkpoint(f"{file.stem} (final)", step, file))
            if not dirs and not finals:
                problems.append(f"{item}: no checkpoint-*/ folders and no WebUI LoRA files in this run folder")
        elif item.is_file():
            match = CHECKPOINT_DIR_RE.match(item.parent.name)  # a file picked out of a run folder
            if match:
                found.append(Checkpoint(item.parent.name, int(match.group(1)), item))
            else:
                found.append(Checkpoint(item.stem, _step_of(item, len(found) + 1), item))
        else:
            problems.append(f"{item}: no such run folder or LoRA file")
    found.sort(key=lambda c: c.step)
    names = Counter(c.name for c in found)
    for checkpoint in found:  # names key the report and the comparison sheet: keep them unique
        if names[checkpoint.name] > 1:
            checkpoint.name = f"{checkpoint.name} ({checkpoint.lora.parent.name}, step {checkpoint.step})"
    return [Checkpoint("base", 0, None), *found], problems


def read_prompt_file(path: str | Path) -> tuple[list[str], list[str]]:
    """Prompts, one per line (`#` comments allowed), and problems ("file:line: reason").

    An empty line is reported and skipped, so one stray blank line does not stop an evaluation.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds no prompt at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prompt file not found")
    prompts, problems = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.lstrip().startswith("#"):
            continue
        if not line.strip():
            problems.append(f"{path}:{number}: empty line skipped (one prompt per line)")
            continue
        prompts.append(line.strip())
    if not prompts:
        raise ValueError(f"{path}: no prompts in the file")
    return prompts, problems


def character_tags(heads: Sequence[Sequence[str]], min_share: float = 0.5) -> list[str]:
    """Head tags present in at least `min_share` of the training captions: the character's own."""
    counts = Counter(tag for head in heads for tag in set(head))
    return [tag for tag, n in counts.most_common() if heads and n / len(heads) >= min_share]


@dataclass
class TagTargets:
    """What the tagger should (and should not) find, as normalized tag names."""

    prompt_tags: list[set[str]]  # per prompt
    character: set[str]
    negative: set[str]


def tag_targets(tagger, prompts: Sequence[str], character: Sequence[str], negative: str) -> TagTargets:
    """Targets restricted to the tagger's vocabulary: a tag it cannot predict cannot be recalled."""
    from captioning import normalize_tag
    from captioning.tagger import WD_CHARACTER, WD_GENERAL

    vocabulary = {normalize_tag(label.name) for label in tagger.labels
                  if label.category in (WD_GENERAL, WD_CHARACTER)}

    def known(tags) -> set[str]:
        return {normalize_tag(t) for t in tags} & vocabulary

    return TagTargets([known(split_tags(p)) for p in prompts], known(character), known(split_tags(negative)))


def tag_fidelity(tagger, images: Sequence[Sequence[Image.Image]], targets: TagTargets) -> dict[str, float | None]:
    """Recall of prompt and character tags, rate of images with a negative tag; images[p][s]."""
    flat = [(p, image) for p, row in enumerate(images) for image in row]
    posts = tagger.tag_images([image for _, image in flat], [str(i) for i in range(len(flat))])
    prompt_recalls, character_recalls, negatives = [], [], []
    for (p, _), post in zip(flat, posts):
        found = {tag for tags in post.tags.values() for tag in tags}
        if targets.prompt_tags[p]:
            prompt_recalls.append(len(found & targets.prompt_tags[p]) / len(targets.prompt_tags[p]))
        if targets.character:
            character_recalls.append(len(found & targets.character) / len(targets.character))
        negatives.append(1.0 if found & targets.negative else 0.0)
    result = {
        "prompt_recall": _mean(prompt_recalls),
        "character_recall": _mean(character_recalls),
        "negative_rate": _mean(negatives) if targets.negative else None,
    }
    recalls = [v for v in (result["prompt_recall"], result["character_recall"]) if v is not None]
    result["tag_fidelity"] = _mean(recalls)
    return result


def _mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def recommend(rows: Sequence[EvalRow], margin: float = 0.05) -> tuple[EvalRow | None, str]:
    """Best validation loss among checkpoints whose tag fidelity is within `margin` of the best.

    The base model is a reference, never recommended. Without tag fidelity every checkpoint is a
    candidate; without validation loss the best tag fidelity wins. Ties go to the earlier step.
    """
    candidates = [r for r in rows if r.lora is not None and r.error is None]
    if not candidates:
        return None, "no checkpoint could be evaluated"
    scored = [r for r in candidates if r.tag_fidelity is not None]
    pool, fidelity_note = candidates, ""
    if scored:
        best = max(r.tag_fidelity for r in scored)
        pool = [r for r in scored if r.tag_fidelity >= best - margin - 1e-12]
        fidelity_note = f" among the {len(pool)} whose tag fidelity is within {margin:g} of the best ({best:.3f})"
    with_loss = [r for r in pool if r.val_loss is not None]
    if with_loss:
        pick = min(with_loss, key=lambda r: (r.val_loss, r.step))
        return pick, f"lowest validation loss ({pick.val_loss:.5f}){fidelity_note}"
    if scored:
        pick = min(pool, key=lambda r: (-r.tag_fidelity, r.step))
        return pick, f"highest tag fidelity ({pick.tag_fidelity:.3f}); no validation loss was measured"
    pick = max(candidates, key=lambda r: r.step)
    return pick, "no metric was measured; the latest checkpoint"


@dataclass
class EvalPlan:
    """What to measure; `None`/empty members switch a measurement off."""

    prompts: list[str]  # final texts (already ordered)
    settings: SampleSettings
    strength: float = 1.0
    validation: object | None = None  # train.evaluate.validation.ValidationLoss
    val_pipe: object | None = None  # a second pipeline for the validation loss; None: the image one
    tagger: object | None = None  # captioning.tagger.WDTagger
    targets: TagTargets | None = None
    clip: object | None = None  # train.evaluate.clip_score.ClipScorer
    thumbnails: dict[str, list[Image.Image]] = field(default_factory=dict)


def evaluate_checkpoint(pipe, checkpoint: Checkpoint, plan: EvalPlan, out_dir: Path) -> EvalRow:
    """One row: load the LoRA (if any), measure, unload. LoraFileError becomes the row's error."""
    row = EvalRow(checkpoint.name, checkpoint.step, str(checkpoint.lora) if checkpoint.lora else None)
    adapter = f"ckpt_{checkpoint.step}_{abs(hash(checkpoint.name)) % 10**6}"
    pipes = [pipe] if plan.val_pipe is None else [pipe, plan.val_pipe]
    val_pipe = pipes[-1]
    loaded = []
    try:
        for target in pipes if checkpoint.lora is not None else []:
            load_lora(target, checkpoint.lora, adapter, plan.strength)
            loaded.append(target)
    except LoraFileError as err:
        for target in loaded:
            unload_lora(target, adapter)
        row.error = str(err)
        logger.error("%s", err)
        return row
    try:
        if plan.validation is not None:
            row.val_loss = plan.validation(val_pipe.unet, [val_pipe.tokenizer, val_pipe.tokenizer_2],
                                           [val_pipe.text_encoder, val_pipe.text_encoder_2])
        if plan.prompts:
            images = generate(pipe, plan.prompts, plan.settings, description=checkpoint.name)
            grid = make_grid(images, col_labels=[f"seed {s}" for s in plan.settings.seeds])
            row.grid = str(save_png(grid, out_dir / "grids" / f"{checkpoint.step:06d}-{checkpoint.name}.png"))
            plan.thumbnails[checkpoint.name] = [r[0] for r in images]
            if plan.tagger is not None and plan.targets is not None:
                for key, value in tag_fidelity(plan.tagger, images, plan.targets).items():
                    setattr(row, key, value)
            if plan.clip is not None:
                row.clip_image, row.clip_text = plan.clip.scores(images, plan.prompts)
    finally:
        for target in loaded:
            unload_lora(target, adapter)
    return row


def evaluate(pipe, checkpoints: Sequence[Checkpoint], plan: EvalPlan, out_dir: str | Path) -> list[EvalRow]:
    """Rows for every checkpoint, in order, all on the same loaded pipeline."""
    out_dir = Path(out_dir)
    rows = []
    for checkpoint in tqdm(checkpoints, desc="checkpoints", unit="ckpt"):
        rows.append(evaluate_checkpoint(pipe, checkpoint, plan, out_dir))
    return rows


def comparison_sheet(rows: Sequence[EvalRow], thumbnails: dict[str, list[Image.Image]],
                     prompts: Sequence[str], cell: int = 256) -> Image.Image | None:
    """Checkpoints (rows) x prompts (columns), first seed of each, thumbnails `cell` px wide."""
    names = [r.name for r in rows if r.name in thumbnails]
    if not names:
        return None
    first = thumbnails[names[0]][0]
    size = (cell, max(8, round(cell * first.height / first.width)))
    grid_rows = [[im.resize(size) for im in thumbnails[n]] for n in names]
    labels = [f"{r.name}\nstep {r.step}" for r in rows if r.name in thumbnails]
    return make_grid(grid_rows, row_labels=labels, col_labels=list(prompts), label_width=160)
