"""Training progress, checkpoints that are never half-written, and `latest` resolution.

A checkpoint is `RUN/checkpoint-000123/` holding, as JSON and safetensors only (nothing in it is
ever unpickled, so a checkpoint folder from elsewhere cannot run code on `--resume`):

- `checkpoint.json`: format version, the state names below, the settings a resume must keep;
- one `NAME.json` (+ `NAME.safetensors`) per piece of resume state (`train.runtime.state_files`):
  `adapter_0` (the UNet's trainable LoRA weights; `adapter_1`/`adapter_2` the text encoders'),
  `optimizer`, `lr_scheduler`, and whatever else the loop registers (see `save_checkpoint`);
- `rng_R.json`/`rng_R.safetensors`: process R's torch CPU/CUDA, numpy and Python `random` states;
- the exported LoRA files, and `train_state.json` (the `TrainState`), written last.

It is written into `RUN/.tmp-checkpoint-000123/` and then renamed into place: a rename is atomic,
so a crash leaves either no checkpoint or a complete one, and `latest` only considers names
matching `checkpoint-NNNNNN` that hold `train_state.json`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from train.config import RESUME_DEFAULTS
from train.names import CHECKPOINT_COMPLETE, CHECKPOINT_DIR_RE, checkpoint_name
from train.runtime.run_dir import RunLock, check_output_dir, refuse_or_move_previous_run
from train.runtime.state_files import StateFileError, read_state, write_state
from train.tensor_files import save_tensors

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Everything about progress that is not a tensor: restored exactly on resume.

    `sampler` is `BucketBatchSampler.state_dict()` at the last optimizer step.
    """

    step: int = 0  # optimizer steps done
    epoch: int = 0
    sampler: dict = field(default_factory=lambda: {"epoch": 0, "position": 0})
    seed: int = 0
    images_seen: int = 0  # global, all processes
    best_val_loss: float | None = None  # lowest validation loss so far (output.keep_best)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `run_dir`, oldest first (by step)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for child in run_dir.iterdir():
        match = CHECKPOINT_DIR_RE.match(child.name)
        if match and child.is_dir() and (child / CHECKPOINT_COMPLETE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def resolve_resume(value: str, run_dir: str | Path) -> Path | None:
    """`--resume` argument to a checkpoint folder.

    "latest": the newest complete checkpoint in `run_dir`, or None when there is none (a fresh
    start). Anything else is a path that must be a complete checkpoint.

    Raises:
        FileNotFoundError: the path is not a complete checkpoint.
    """
    if value == "latest":
        checkpoints = list_checkpoints(run_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(value)
    if not (path / CHECKPOINT_COMPLETE).is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {CHECKPOINT_COMPLETE})")
    return path


def temp_dir(run_dir: Path, step: int) -> Path:
    """The folder a checkpoint is written into before `publish` (same on every process)."""
    return run_dir / f".tmp-{checkpoint_name(step)}"


def publish(temp: Path, run_dir: Path, step: int, state: TrainState) -> Path:
    """Mark `temp` complete and rename it to `checkpoint-NNNNNN` (main process only)."""
    marker = temp / CHECKPOINT_COMPLETE
    marker.with_suffix(".tmp").write_text(json.dumps(state.state_dict(), indent=2), "utf-8")
    os.replace(marker.with_suffix(".tmp"), marker)
    final = run_dir / checkpoint_name(step)
    if final.exists():  # re-saving the same step after a resume: replace it
        shutil.rmtree(final)
    os.replace(temp, final)
    return final


def rotate(run_dir: Path, keep: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond `keep` (None keeps all); returns them."""
    if keep is None:
        return []
    old = list_checkpoints(run_dir)[:-keep] if keep else list_checkpoints(run_dir)
    for path in old:
        shutil.rmtree(path)
    return old


# ---------------------------------------------------------------- resume state

MANIFEST = "checkpoint.json"
STATE_NAME_RE = re.compile(r"^[A-Za-z0-9_]+$")
FORMAT_VERSION = 1


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed from as asked; the message names the file or key."""


class TrainableWeights:
    """A module's trainable (LoRA) weights as a resumable piece of state.

    Only these go into a checkpoint: the whole frozen UNet would be 5 GB for SDXL every time.
    """

    def __init__(self, module: torch.nn.Module, name: str):
        self.module, self.name = module, name

    def state_dict(self) -> dict[str, torch.Tensor]:
        return trainable_state(self.module)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(trainable_state(self.module))
        if set(state) != expected:
            raise ResumeError(f"{self.name}: LoRA weights do not match this config's adapters "
                              f"({len(set(state) ^ expected)} keys differ); same lora.* settings needed to resume")
        self.module.load_state_dict(state, strict=False)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def capture_rng() -> dict:
    """This process's global random states as tensors + JSON (what accelerate pickles)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(rng: dict) -> None:
    random.setstate(rng["python"])
    numpy = rng["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_checkpoint(accelerator, run_dir: Path, state: TrainState, resumable: dict, export, keep: int | None,
                    settings: dict) -> None:
    """Every piece of resume state and the LoRA files (`export(folder, step)`) into a temp
    folder, then an atomic rename.

    `resumable` maps a name to an object with `state_dict()`/`load_state_dict()` (the LoRA
    weights, optimizer, LR scheduler); each becomes `NAME.json` + `NAME.safetensors`. To add a
    piece of state (an EMA copy, say), add it to that mapping: `read_checkpoint` and `restore`
    pick it up by name. Called on every process: each writes its RNG state; the main process
    writes the rest.
    """
    temp = temp_dir(run_dir, state.step)
    if accelerator.is_main_process:
        if temp.exists():
            shutil.rmtree(temp)
        temp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    write_state(temp, f"rng_{accelerator.process_index}", capture_rng())
    if accelerator.is_main_process:
        for name, obj in resumable.items():
            write_state(temp, name, obj.state_dict())
        manifest = {"format": FORMAT_VERSION, "state": list(resumable), "processes": accelerator.num_processes,
                    "settings": settings}
        (temp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        export(temp, state.step)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = publish(temp, run_dir, state.step, state)
        rotate(run_dir, keep)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()


@dataclass
class ResumePoint:
    """A checkpoint read and checked before the model is built (`read_checkpoint`)."""

    folder: Path
    train_state: dict
    state: dict  # name -> state dict, as `save_checkpoint` wrote them
    rng: dict | None  # this process's random states; None: resuming without them (inexact)


def read_checkpoint(folder: Path, *, rank: int, settings: dict, inexact: bool = False) -> ResumePoint:
    """Read every file of checkpoint `folder` that this process needs, and check it fits.

    Raises:
        StateFileError: a file is missing, truncated or not ours (a damaged checkpoint).
        ResumeError: it was trained with other `settings` (names the key), or the random-state
            file is missing and `inexact` is false.
    """
    manifest = _read_manifest(folder / MANIFEST)
    saved = {key: manifest["settings"].get(key, RESUME_DEFAULTS.get(key)) for key in settings}
    changed = [f"{key} = {saved[key]!r} in the checkpoint, {value!r} in the config"
               for key, value in settings.items() if saved[key] != value]
    if changed:
        raise ResumeError(f"{folder}: cannot resume after changing {'; '.join(changed)}. Set them back, or train "
                          "into a new output.dir")
    train_state = _read_json(folder / CHECKPOINT_COMPLETE)
    if not isinstance(train_state, dict) or not set(train_state) <= set(TrainState().state_dict()):
        raise StateFileError(f"{folder / CHECKPOINT_COMPLETE}: not a TrainState")
    state = {name: read_state(folder, name) for name in manifest["state"]}
    try:
        rng = read_state(folder, f"rng_{rank}")
    except StateFileError as err:
        if not inexact:
            raise ResumeError(f"{err}: without this process's random states the resumed run is not bit-exact; "
                              "pass --resume-inexact to resume anyway") from None
        logger.warning("%s: resuming WITHOUT the random states: the run will not repeat bit for bit", err)
        rng = None
    return ResumePoint(folder, train_state, state, rng)


def _read_manifest(path: Path) -> dict:
    manifest = _read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        raise StateFileError(f"{path}: not a checkpoint format {FORMAT_VERSION} manifest "
                             "(checkpoints of older versions held pickles and are not loaded)")
    names, settings = manifest.get("state"), manifest.get("settings")
    # The names become file names: anything but a plain word could read outside the checkpoint.
    if not isinstance(names, list) or not all(isinstance(n, str) and STATE_NAME_RE.match(n) for n in names):
        raise StateFileError(f"{path}: 'state' must list plain names")
    if not isinstance(settings, dict):
        raise StateFileError(f"{path}: 'settings' must be a table")
    return manifest


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StateFileError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StateFileError(f"{path}: unreadable or truncated ({err})") from None


def find_resume_point(value: str, run_dir: Path, *, rank: int, settings: dict, inexact: bool) -> ResumePoint | None:
    """`--resume` to a checked `ResumePoint`, or None for a fresh start (`latest` with no checkpoint).

    With `latest`, a damaged newest checkpoint (a truncated or missing file) is skipped, with a
    warning, for the previous complete one. An explicit PATH must itself be usable.

    Raises:
        StateFileError, ResumeError: see `read_checkpoint`; for `latest`, when no checkpoint is usable.
    """
    if value != "latest":
        return read_checkpoint(resolve_resume(value, run_dir), rank=rank, settings=settings, inexact=inexact)
    candidates = list_checkpoints(run_dir)
    for folder in reversed(candidates):
        try:
            return read_checkpoint(folder, rank=rank, settings=settings, inexact=inexact)
        except StateFileError as err:
            logger.warning("%s; falling back to the previous checkpoint", err)
    if candidates:
        raise StateFileError(f"{run_dir}: none of the {len(candidates)} checkpoints is complete and readable "
                             "(see the warnings above)")
    return None


def open_run(run_dir: Path, resume: str | None, *, overwrite: bool, inexact: bool, settings: dict,
             accelerator) -> tuple[ResumePoint | None, RunLock | None]:
    """Claim `run_dir` and read the checkpoint to resume from (None: a fresh start), before any
    model is built, so bad input fails in seconds.

    Only the main process locks the folder and deals with an earlier run's files; under
    `accelerate launch` a rank that fails here ends the whole launch.

    Raises:
        RunDirError: output.dir is a file, is locked by another run, or holds another run.
        StateFileError, ResumeError: no usable checkpoint (see `find_resume_point`).
    """
    check_output_dir(run_dir)
    lock = RunLock(run_dir) if accelerator.is_main_process else None
    try:
        point = find_resume_point(resume, run_dir, rank=accelerator.process_index, settings=settings,
                                  inexact=inexact) if resume else None
        if resume and point is None:
            logger.info("no complete checkpoint in %s: starting from step 0", run_dir)
        if point is None and accelerator.is_main_process:
            refuse_or_move_previous_run(run_dir, overwrite=overwrite, resuming=resume is not None)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    accelerator.wait_for_everyone()
    return point, lock


def restore(point: ResumePoint, state: TrainState, resumable: dict) -> None:
    """Load a `ResumePoint` into the built model, optimizer, ... (same names as `save_checkpoint`).

    Raises:
        ResumeError: the checkpoint lacks a piece of state this run needs.
    """
    missing = [name for name in resumable if name not in point.state]
    if missing:
        raise ResumeError(f"{point.folder / MANIFEST}: no {', '.join(missing)} state in this checkpoint")
    for name, obj in resumable.items():
        try:
            obj.load_state_dict(point.state[name])
        except ResumeError:
            raise
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
            raise ResumeError(f"{point.folder / name}.json: does not fit this run's {name} ({err})") from None
    state.load_state_dict(point.train_state)
    if point.rng is not None:
        restore_rng(point.rng)


BEST_DIR = "best"
BEST_INFO = "best.json"


def save_best(run_dir: Path, step: int, val_loss: float, export) -> Path:
    """`RUN/best/`: the LoRA files (`export(folder, step)`) and `best.json` with the step and the
    validation loss, written beside it and swapped in by renames (main process only)."""
    temp, final = run_dir / f".tmp-{BEST_DIR}", run_dir / BEST_DIR
    if temp.exists():
        shutil.rmtree(temp)
    temp.mkdir(parents=True)
    export(temp, step)
    (temp / BEST_INFO).write_text(json.dumps({"step": step, "val_loss": val_loss}, indent=2), "utf-8")
    old = run_dir / f".old-{BEST_DIR}"
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(temp, final)
    shutil.rmtree(old, ignore_errors=True)
    logger.info("best validation loss %.6f at step %d: kept in %s", val_loss, step, final)
    return final


def write_rank_weights(run_dir: Path, accelerator, unet) -> None:
    """Each rank's final LoRA weights, so a multi-process run can show they agree."""
    path = run_dir / "ranks" / f"lora_rank{accelerator.process_index}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(path, trainable_state(accelerator.unwrap_model(unet)))
