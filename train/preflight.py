"""What a run would do, worked out in a fraction of a second: `train CONFIG --check`, `cache --check`.

Nothing heavy is loaded: the config is validated (`train.config`, pydantic only), the prepped
dataset's columns are read straight from its Arrow files with pyarrow (memory-mapped; no torch, no
`datasets`), and `output.dir` is looked at the way `train.runtime.run_dir` and
`train.runtime.checkpoint` will (its files, its checkpoints, its lock). The result is a list of
(label, text) lines and a list of problems; a problem is what would stop the real run.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from train.config import Config, ModelConfig, TrainConfig, prediction_problems
from train.model import prediction as predictions
from train.names import (
    CARD_AREA,
    CHECKPOINT_COMPLETE,
    CHECKPOINT_DIR_RE,
    DATASET_DIR,
    SDXL_CONFIG_DIR,
    TRAINING_COLUMNS,
    looks_like_path,
    scale_bucket,
)
from train.runtime.memory_presets import activation_gib
from train.runtime.run_dir import LOCK_NAME, previous_run_files


@dataclass
class Plan:
    """Lines to print (label, text) and the problems that would stop the run."""

    lines: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def add(self, label: str, text: str) -> None:
        self.lines.append((label, text))

    def render(self) -> str:
        width = max((len(label) for label, _ in self.lines), default=0)
        out = [f"{label:<{width}}  {text}" for label, text in self.lines]
        out += [f"problem: {problem}" for problem in self.problems]
        return "\n".join(out)


@dataclass(frozen=True)
class DatasetSummary:
    """A prepped dataset's shape, per split."""

    rows: Counter  # split -> rows
    entries: Counter  # split -> rows x repeats (draws per epoch)
    buckets: Counter  # (width, height) -> train rows


def read_dataset_summary(dataset_dir: str | Path) -> DatasetSummary:
    """Rows, repeats and buckets of a prep output (`OUT/dataset`), from its Arrow files.

    Raises:
        FileNotFoundError: no prepped dataset there.
        ValueError: a column the trainer needs is missing, or the files are not a `datasets` folder.
    """
    import pyarrow as pa

    folder = Path(dataset_dir) / DATASET_DIR
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        files = [folder / entry["filename"] for entry in state["_data_files"]]
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder}: no prepped dataset here (run `animagine-lora prep ... -o "
                                f"{dataset_dir}`)") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{folder}/state.json: not a `datasets` folder ({err})") from None
    rows, entries, buckets = Counter(), Counter(), Counter()
    for path in files:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_stream(source).read_all()
        missing = [c for c in TRAINING_COLUMNS if c not in table.column_names]
        if missing:
            raise ValueError(f"{folder}: dataset lacks columns {missing}")
        columns = table.select(["split", "repeats", "bucket_width", "bucket_height"]).to_pydict()
        for split, repeats, width, height in zip(*columns.values()):
            rows[split] += 1
            entries[split] += repeats
            if split == "train":
                buckets[(width, height)] += 1
    return DatasetSummary(rows, entries, buckets)


def describe_model(model: ModelConfig) -> tuple[str, str | None]:
    """(what the source is, a problem or None): a Hub id, a diffusers folder or a single file."""
    source = model.source
    path = Path(source).expanduser()
    if path.is_file():
        kind = "single file" if path.suffix == ".safetensors" else None
        problem = None if kind else f"model.source {source}: single-file checkpoints must be .safetensors"
    elif path.is_dir():
        kind = "diffusers folder" if (path / "unet").is_dir() else None
        problem = None if kind else f"model.source {source}: not a diffusers folder (no unet/ subfolder)"
    elif looks_like_path(source):
        kind, problem = None, f"model.source {source}: model file or folder not found"
    else:
        kind, problem = "Hub id, downloaded on first use", None
    precision = f"weights {model.weight_dtype}, VAE {model.vae_dtype}"
    if model.quantize != "none":
        precision += f", frozen UNet stored {model.quantize}"
    return f"{source}: {kind or 'unusable'}; {precision}", problem


def describe_prediction(model: ModelConfig, train: TrainConfig) -> tuple[str, list[str]]:
    """(the prediction type and schedule the run would use and why, the problems), read as
    `train.model.loading` will: a single file's marker keys, a folder's scheduler config."""
    path = Path(model.source).expanduser()
    config_dir = Path(model.config_dir) if model.config_dir else SDXL_CONFIG_DIR
    try:
        if path.is_file():
            scheduler = _json_or_empty(config_dir / "scheduler" / "scheduler_config.json")
            detected = predictions.detect(scheduler, origin=f"{config_dir / 'scheduler'} (the component configs)",
                                          markers=predictions.single_file_markers(path))
        elif path.is_dir():
            detected = predictions.detect(_json_or_empty(path / "scheduler" / "scheduler_config.json"),
                                          origin=f"the scheduler config of {path}")
        elif model.prediction_type == "auto":
            return "read from the model's scheduler config when it is loaded", []
        else:
            detected = predictions.Prediction(model.prediction_type, False, "")
        chosen = predictions.resolve(detected, model.prediction_type, train.zero_terminal_snr)
    except (OSError, ValueError) as err:
        return "unknown", [f"model: {err}"]
    schedule = "zero terminal SNR" if chosen.zero_terminal_snr else "the model's noise schedule"
    return (f"{chosen.prediction_type} on {schedule} ({chosen.reason})",
            prediction_problems(train, chosen.prediction_type))


def _json_or_empty(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def describe_loss(train: TrainConfig) -> str:
    """The loss function, its per-sample weights and the noise, as one line."""
    loss = {"l2": "l2 (MSE)", "l1": "l1"}.get(train.loss_type, f"{train.loss_type} (c {train.huber_c:g}, "
                                                                f"{train.huber_schedule} schedule)")
    parts = [loss]
    if train.min_snr_gamma:
        parts.append(f"min-SNR gamma {train.min_snr_gamma:g}")
    if train.scale_v_pred_loss_like_noise_pred:
        parts.append("v loss scaled like an epsilon loss")
    if train.v_pred_like_loss:
        parts.append(f"v-like loss x {train.v_pred_like_loss:g} added")
    if train.debiased_estimation:
        parts.append("debiased estimation")
    if train.noise_offset:
        parts.append(f"noise offset {train.noise_offset:g}" + (" (random strength)"
                                                             if train.noise_offset_random_strength else "")
                     + (f" + {train.adaptive_noise_scale:g} x |latent mean|" if train.adaptive_noise_scale else ""))
    if train.multires_noise_iterations:
        parts.append(f"pyramid noise {train.multires_noise_iterations} levels, discount "
                     f"{train.multires_noise_discount:g}")
    if train.ip_noise_gamma:
        parts.append(f"input perturbation {train.ip_noise_gamma:g}" + (" (random strength)"
                                                                     if train.ip_noise_gamma_random_strength else ""))
    return ", ".join(parts) + "; validation loss: MSE"


@dataclass(frozen=True)
class OutputState:
    """`output.dir` as a fresh run, `--resume` and `--overwrite` will find it."""

    is_file: bool = False  # exists and is not a folder
    exists: bool = False
    files: int = 0  # an earlier run's files and folders at its top (train.runtime.run_dir.RUN_FILES)
    checkpoints: tuple[int, ...] = ()  # steps of its complete checkpoints
    locked_by: str | None = None  # pid of a training process writing into it now

    def describe(self) -> str:
        if self.is_file:
            return "exists and is not a folder"
        if not self.files:
            return "empty" if self.exists else "new folder"
        steps = f"checkpoints at steps {', '.join(map(str, self.checkpoints))}" if self.checkpoints else \
            "no complete checkpoint"
        locked = f"; LOCKED by a running training process (pid {self.locked_by})" if self.locked_by else ""
        return f"holds a run ({self.files} files and folders; {steps}){locked}"


def output_state(run_dir: Path) -> OutputState:
    if run_dir.exists() and not run_dir.is_dir():
        return OutputState(is_file=True, exists=True)
    found = previous_run_files(run_dir)
    steps = tuple(sorted(int(m.group(1)) for p in found if (m := CHECKPOINT_DIR_RE.match(p.name))
                         and (p / CHECKPOINT_COMPLETE).is_file()))
    return OutputState(exists=run_dir.is_dir(), files=len(found), checkpoints=steps,
                       locked_by=_lock_holder(run_dir) if found else None)


def _lock_holder(run_dir: Path) -> str | None:
    """The pid written in `output.dir/.train.lock` when another process holds its flock."""
    path = run_dir / LOCK_NAME
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
    finally:
        os.close(fd)
    return None


def train_plan(config: Config, *, resume: str | None, overwrite: bool) -> Plan:
    """What `animagine-lora train` would do with `config` and these options."""
    plan = Plan()
    tc, oc, lc = config.train, config.optimizer, config.lora
    model, problem = describe_model(config.model)
    plan.add("model", model)
    if problem:
        plan.problems.append(problem)
    prediction, problems = describe_prediction(config.model, tc)
    plan.add("prediction", prediction)
    plan.problems += problems

    summary = _dataset_lines(plan, "dataset", config.data.dataset, config.validation.every_n_steps > 0)
    entries = summary.entries["train"] if summary else 0
    if config.data.regularization:
        _dataset_lines(plan, "regularization", config.data.regularization, False)

    processes = int(os.environ.get("WORLD_SIZE", "1"))
    effective = tc.batch_size * tc.gradient_accumulation_steps * processes
    images = tc.max_steps * effective
    epochs = f", about {images / entries:.1f} epochs" if entries else ""
    plan.add("steps", f"{tc.max_steps} x effective batch {effective} (batch {tc.batch_size} x accumulation "
                      f"{tc.gradient_accumulation_steps} x {processes} process{'es' * (processes > 1)}) = "
                      f"{images} images{epochs}")
    if summary:
        _size_line(plan, summary.buckets, config.data.resolution_scale)
    adapter = f"{lc.type} rank {lc.rank} alpha {lc.alpha:g} on the UNet's {lc.preset} modules"
    adapter += " and both text encoders" if lc.train_text_encoder else ""
    adapter += ", DoRA" if lc.dora else ""
    plan.add("adapter", adapter)
    _recipe_lines(plan, lc, oc.lr)
    schedule = f"{oc.scheduler}" + (f", {oc.warmup_steps} warm-up steps" if oc.warmup_steps else "")
    plan.add("optimizer", f"{oc.name}, lr {oc.lr:g}, {schedule}")
    plan.add("loss", describe_loss(tc))
    plan.add("precision", f"mixed precision {tc.mixed_precision}, weights {config.model.weight_dtype}"
                          + (", gradient checkpointing" if tc.gradient_checkpointing else ""))
    plan.add("output", _output_line(plan, Path(config.output.dir), config.output.name, resume=resume,
                                    overwrite=overwrite))
    plan.add("checkpoints", f"every {config.output.save_every_n_steps} steps, "
                            + (f"the last {config.output.checkpoints_total_limit} kept"
                               if config.output.checkpoints_total_limit else "all kept"))
    sample = config.sample
    plan.add("sample grids", f"every {sample.every_n_steps} steps on {sample.sample_model if sample.sample_model == 'train' else sample.opt_model}"
             if sample.every_n_steps else "off")
    plan.add("validation", f"every {config.validation.every_n_steps} steps" if config.validation.every_n_steps
             else "off")
    return plan


def _size_line(plan: Plan, buckets, scale: float) -> None:
    """Above the card's 1024² area (prep --max-area, data.resolution_scale > 1): the largest
    training bucket and its estimated activation memory (`train.runtime.memory_presets`)."""
    if not buckets or (scale <= 1 and max(w * h for w, h in buckets) <= CARD_AREA * 1.01):
        return
    width, height = max(buckets, key=lambda b: b[0] * b[1])
    if scale > 1:
        width, height = scale_bucket(width, height, scale)
    area = width * height
    plan.add("training size", f"buckets up to {width}x{height}, {area / CARD_AREA:.2f}x the card's 1024² area: "
                              f"about {activation_gib(area):.1f} GiB of activations per image with gradient "
                              "checkpointing (estimate; memory presets: docs/training.md)")


def _block_text(values, unit: str) -> str:
    """`down 0.5, up [1, 1, 0, ...]`: the parts a `BlockValues` sets."""
    def number(value) -> str:
        return f"[{', '.join(f'{v:g}' for v in value)}]" if isinstance(value, list) else f"{value:g}"

    parts = [(part, getattr(values, part)) for part in ("down", "mid", "up") if getattr(values, part) is not None]
    return f"{unit} " + ", ".join(f"{part} {number(value)}" for part, value in parts)


def _recipe_lines(plan: Plan, lc, lr: float) -> None:
    """Lines for the `[lora]` rates, block-wise settings and dropouts that a recipe sets (none when unset)."""
    own = (lc.text_encoder_1_lr, lc.text_encoder_2_lr)
    if lc.train_text_encoder and (lc.text_encoder_lr or any(own)):
        te1, te2 = lc.encoder_lrs(lr)
        plan.add("text encoders", f"lr {te1:g} (CLIP ViT-L), {te2:g} (OpenCLIP bigG)")
    elif lc.text_encoder_lr or any(own):
        plan.add("text encoders", "not trained (lora.train_text_encoder = false): their lr keys are unused")
    blocks = [_block_text(values, unit) for values, unit in
              ((lc.block_lr, "lr x"), (lc.block_dims, "rank"), (lc.block_alphas, "alpha")) if values is not None]
    if blocks:
        plan.add("UNet blocks", "; ".join(blocks) + " (blocks at rank or lr 0 have no modules)")
    dropouts = [f"{name} {rate:g}" for name, rate in
                (("dropout", lc.dropout), ("rank", lc.rank_dropout), ("module", lc.module_dropout)) if rate]
    if dropouts:
        plan.add("LoRA dropout", ", ".join(dropouts) + " (these layers keep PEFT's unfused forward)")


def _dataset_lines(plan: Plan, label: str, dataset: str, needs_val: bool) -> DatasetSummary | None:
    """Add the dataset's line; returns its summary (None when unreadable)."""
    try:
        summary = read_dataset_summary(dataset)
    except (OSError, ValueError) as err:
        plan.add(label, f"{dataset} (unreadable)")
        plan.problems.append(f"data.{label if label == 'regularization' else 'dataset'}: {err}")
        return None
    train, val = summary.rows["train"], summary.rows["val"]
    plan.add(label, f"{dataset}: {train} train rows ({summary.entries['train']} draws per epoch with repeats, "
                    f"{len(summary.buckets)} buckets), {val} val rows")
    if not train:
        plan.problems.append(f"{dataset}: no rows with split 'train'")
    if needs_val and not val:
        plan.problems.append(f"validation.every_n_steps is set but {dataset} has no val rows: give the prep "
                             "recipe a val_fraction, or set validation.every_n_steps = 0")
    return summary


def _output_line(plan: Plan, run_dir: Path, name: str, *, resume: str | None, overwrite: bool) -> str:
    state = output_state(run_dir)
    line = f"{run_dir}: {state.describe()}"
    if state.is_file:
        plan.problems.append(f"output.dir {run_dir}: exists and is not a folder")
    elif state.locked_by:
        plan.problems.append(f"output.dir {run_dir}: another training run (pid {state.locked_by}) is writing "
                             "into it")
    elif resume not in (None, "latest"):
        if not (Path(resume) / CHECKPOINT_COMPLETE).is_file():
            plan.problems.append(f"--resume {resume}: not a complete checkpoint (no {CHECKPOINT_COMPLETE})")
        return f"{line}; resumes from {resume}, LoRA as {name}.safetensors"
    elif resume == "latest" and state.checkpoints:
        return f"{line}; resumes from step {state.checkpoints[-1]}, LoRA as {name}.safetensors"
    elif state.files and not overwrite:
        plan.problems.append(f"output.dir {run_dir}: holds another run; continue it with --resume latest, "
                             "set a new output.dir, or pass --overwrite")
    elif state.files:
        return f"{line}; --overwrite moves its files into a replaced-* subfolder"
    return f"{line}; a fresh run, LoRA as {name}.safetensors"


def cache_plan(model: ModelConfig, dataset: str, *, scale: float, flip: bool) -> Plan:
    """What `animagine-lora cache` would encode."""
    plan = Plan()
    described, problem = describe_model(model)
    plan.add("model", described)
    if problem:
        plan.problems.append(problem)
    try:
        summary = read_dataset_summary(dataset)
    except (OSError, ValueError) as err:
        plan.problems.append(str(err))
        return plan
    rows = sum(summary.rows.values())
    splits = ", ".join(f"{count} {split}" for split, count in sorted(summary.rows.items()))
    plan.add("dataset", f"{dataset}: {rows} rows ({splits})")
    plan.add("latents", f"{rows * (2 if flip else 1)} at resolution scale {scale:g}" + (" (and flipped)" if flip else ""))
    cached = sorted(p for p in (Path(dataset) / "latents").glob("*") if p.is_dir())
    plan.add("cache", ", ".join(f"{p.name}: {sum(1 for _ in p.glob('*.safetensors'))} files" for p in cached)
             or "empty (nothing encoded yet)")
    return plan
