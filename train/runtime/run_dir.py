"""One run per output folder: claiming `output.dir` before anything is written into it.

A fresh run (no `--resume`, or `--resume latest` finding no checkpoint) into a folder holding
another run's checkpoints, LoRA files or log would truncate that log, replace its LoRA and rotate
its checkpoints away, and `--resume latest` would later mix the two runs. So it is refused unless
`--overwrite`, which moves the earlier run's files (only the names a run writes, listed in
`RUN_FILES`) into `output.dir/replaced-YYYYmmdd-HHMMSS/`: nothing is deleted, and files we did not
write stay where they are.

Two runs into one folder at the same time are refused by an exclusive `fcntl.flock` on
`output.dir/.train.lock`, held by the main process for the run's lifetime. The kernel releases a
flock when its process dies, SIGKILL included, so a killed run never leaves the folder locked (the
lock file itself may stay; it is not the lock).
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_NAME = ".train.lock"
# What a training run writes at the top of output.dir (train.loop, train.runtime.checkpoint).
RUN_FILES = ("checkpoint-*", ".tmp-checkpoint-*", "log.jsonl", "*.safetensors", "diffusers", "ranks", "draws",
             "samples", "logs", "wandb")


class RunDirError(ValueError):
    """`output.dir` cannot be used as asked; the message says what to do."""


def check_output_dir(run_dir: Path) -> None:
    """Raises RunDirError when `output.dir` exists but is not a folder."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"output.dir {run_dir}: exists and is not a folder; set output.dir to a folder")


def previous_run_files(run_dir: Path) -> list[Path]:
    """The files and folders of an earlier run at the top of `run_dir` (sorted)."""
    if not run_dir.is_dir():
        return []
    return sorted({path for pattern in RUN_FILES for path in run_dir.glob(pattern)})


def refuse_or_move_previous_run(run_dir: Path, *, overwrite: bool, resuming: bool = False) -> Path | None:
    """Make `run_dir` free of an earlier run's files before a fresh run (main process only).

    Returns the folder they were moved to (`--overwrite`), or None when there were none.
    `resuming`: `--resume latest` found no checkpoint, so the hint cannot be to resume.

    Raises:
        RunDirError: there are some and `overwrite` is false.
    """
    found = previous_run_files(run_dir)
    if not found:
        return None
    names = ", ".join(path.name for path in found[:5]) + (", ..." if len(found) > 5 else "")
    if not overwrite:
        resume_hint = "it has no complete checkpoint to resume from" if resuming else \
            "continue it with --resume latest"
        raise RunDirError(
            f"output.dir {run_dir}: holds another run ({names}); starting afresh would replace it. "
            f"Either {resume_hint}, set a new output.dir, or pass --overwrite (without --resume) to move its "
            "files into a replaced-* subfolder first")
    aside = run_dir / time.strftime("replaced-%Y%m%d-%H%M%S", time.gmtime())
    aside.mkdir()
    for path in found:
        os.replace(path, aside / path.name)  # same file system: a rename, nothing copied or deleted
    logger.warning("--overwrite: moved the earlier run's %d files and folders into %s", len(found), aside)
    return aside


class RunLock:
    """An exclusive lock on `run_dir` for this process's lifetime (or until `release`)."""

    def __init__(self, run_dir: Path):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / LOCK_NAME
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self._fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(self._fd)
            raise RunDirError(f"output.dir {run_dir}: another training run (pid {holder}) is writing into it; "
                              "wait for it to finish or set a new output.dir") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = -1
