"""Claiming output paths: the one place every command's results are written through.

Every command writes its outputs (captions, LoRA files, samples, the prep folder) by these rules:

- only to a regular file or folder, or to a path that does not exist yet; a device, FIFO or
  socket (`-o /dev/null`) is refused by name, never replaced (as root, replacing `/dev/null`
  with a regular file breaks the machine);
- never under a parent that is a file (`-o notes.txt/out.jsonl`);
- through a temporary file beside the target, renamed over it only when complete, so a crash or
  a full disk leaves the previous output in place;
- an OSError while writing (ENOSPC, EIO, EACCES) becomes one `OutputError` line naming the file
  and the cause, which the command line prints without a traceback;
- temporary names carry the writer's process id, so leftovers of a SIGKILLed earlier run are
  recognised and removed on the next run, while another live run's temporaries are left alone;
- a final output gets the mode the user's umask gives a normal file (0644 under umask 022), not
  the 0600/0700 that `tempfile.mkstemp`/`mkdtemp` create: a ComfyUI server reading `models/loras`
  as another user must be able to read a LoRA.

No torch here: `captioning/` is imported by `animagine-lora caption` without it, and `train`
imports this module too.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

TEMP_SUFFIX = ".tmp"
# `.{target name}.{pid}.{random}.tmp`: the pid tells our own stale leftovers from a live run's.
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.tmp$")
_UMASK_LOCK = threading.Lock()


class OutputError(Exception):
    """An output that cannot be claimed or written; the message names the path and the cause."""


def umask() -> int:
    """The process umask (read from /proc where possible: setting it to read it is racy)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def normal_mode(*, folder: bool = False) -> int:
    """The mode `open()`/`mkdir()` would give a new file (0o666) or folder (0o777) under the umask."""
    return (0o777 if folder else 0o666) & ~umask()


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file or folder"


def _check_parents(path: Path) -> None:
    """The nearest existing ancestor of `path` must be a folder."""
    for parent in path.parents:
        try:
            mode = os.stat(parent).st_mode
        except (FileNotFoundError, NotADirectoryError):
            continue  # further up: the nearest existing ancestor decides
        except OSError as error:
            raise OutputError(f"{path}: cannot use its folder {parent}: {error.strerror}") from None
        if not stat.S_ISDIR(mode):
            raise OutputError(f"{path}: cannot create it: {parent} is a file, not a folder")
        return


def _claim(path: str | os.PathLike, *, folder: bool, clean: bool = True) -> Path:
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    except NotADirectoryError:
        mode = None  # a parent is a file: reported by _check_parents below
    except OSError as error:
        raise OutputError(f"{path}: cannot use it as output: {error.strerror}") from None
    if mode is not None:
        if folder and stat.S_ISREG(mode):
            raise OutputError(f"{path}: exists and is a file; the output is a folder")
        if not folder and stat.S_ISDIR(mode):
            raise OutputError(f"{path}: is a folder; give a file name")
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise OutputError(f"{path}: is {_kind(mode)}; outputs are written only to regular "
                              "files and folders")
    _check_parents(path)
    with output_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    if clean:
        remove_stale_temps(path.parent, path.name)
    return path


def claim_file(path: str | os.PathLike, *, clean: bool = True) -> Path:
    """Check that `path` may be written as a file and create its parent folders; returns it.

    `clean=False` skips looking for stale temporaries beside it: for a writer of many files in
    one folder that cleaned the whole tree once (`remove_stale_temps_under`).

    Raises:
        OutputError: `path` is a folder, device, FIFO or socket, or lies under a file.
    """
    return _claim(path, folder=False, clean=clean)


def claim_dir(path: str | os.PathLike) -> Path:
    """Check that `path` may be (or hold) an output folder and create its parents; returns it.

    The folder itself is not created: a whole-folder output is built as `temp_dir(path)` and
    renamed into place.

    Raises:
        OutputError: `path` is a file, device, FIFO or socket, or lies under a file.
    """
    return _claim(path, folder=True)


@contextlib.contextmanager
def output_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn an OSError in the block (ENOSPC, EIO, EACCES, ...) into one OutputError line."""
    try:
        yield
    except OutputError:
        raise
    except OSError as error:
        cause = error.strerror or str(error)
        raise OutputError(f"{path}: cannot write: {cause}") from error


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.{os.getpid()}."


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, clean: bool = True) -> Iterator[Path]:
    """A temporary path beside `path` for a writer that takes a file name (safetensors, PIL).

    On success the temporary file gets the normal mode and replaces `path`; on any error it is
    removed and the previous `path` is left as it was. OSErrors become OutputError.
    `clean` as for `claim_file`.
    """
    path = claim_file(path, clean=clean)
    with output_errors(path):
        handle, name = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=TEMP_SUFFIX, dir=path.parent)
        os.close(handle)
    temp = Path(name)
    try:
        with output_errors(path):
            yield temp
            os.chmod(temp, normal_mode())
            os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", *, clean: bool = True) -> Iterator[IO]:
    """`open(path, mode)` on a temporary file that replaces `path` when the block succeeds."""
    with atomic_path(path, clean=clean) as temp, open(temp, mode) as handle:
        yield handle


def write_bytes(path: str | os.PathLike, data: bytes, *, clean: bool = True) -> Path:
    """Write `data` to `path` atomically (see `atomic_path`); returns the path."""
    with atomic_open(path, "wb", clean=clean) as handle:
        handle.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, *, clean: bool = True) -> Path:
    """Write UTF-8 `text` to `path` atomically, newlines as given; returns the path."""
    return write_bytes(path, text.encode("utf-8"), clean=clean)


def temp_dir(path: str | os.PathLike) -> Path:
    """A fresh temporary folder beside `path` (same filesystem, so renaming it is atomic).

    It has the normal folder mode already, so the renamed result is readable as the umask says.
    """
    path = claim_dir(path)
    with output_errors(path):
        temp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=TEMP_SUFFIX, dir=path.parent))
        os.chmod(temp, normal_mode(folder=True))
    return temp


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists but belongs to someone else (EPERM)
    return True


def remove_stale_temps(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove our temporary files and folders in `folder` left by processes that no longer run.

    Only names of the form `.{name}.{pid}.{random}.tmp` whose pid is dead are touched (all targets
    when `name` is None). Returns what was removed.
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if not match or (name is not None and match["name"] != name) or _alive(int(match["pid"])):
            continue
        path = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue  # not ours to fight over; the next run tries again
        removed.append(path)
    return removed


def remove_stale_temps_under(root: str | os.PathLike) -> int:
    """`remove_stale_temps` in `root` and every folder below it; returns how many were removed."""
    count = 0
    for folder, _dirs, _files in os.walk(root):
        count += len(remove_stale_temps(folder))
    return count
