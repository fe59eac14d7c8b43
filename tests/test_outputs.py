"""`captioning.outputs` (where every command claims and writes its outputs) and terminal escaping."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys

import pytest

from captioning import outputs
from captioning.outputs import OutputError
from captioning.terminal import terminal_safe

DEAD_PID = 2**22 + 12345  # above Linux's largest pid_max: no such process


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_devices_fifos_folders_and_file_parents_are_refused_by_name(tmp_path):
    with pytest.raises(OutputError, match="/dev/null: is a character device"):
        outputs.claim_file("/dev/null")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="pipe: is a FIFO"):
        outputs.claim_dir(fifo)
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(OutputError, match="notes.txt is a file, not a folder"):
        outputs.claim_file(notes / "sub" / "out.jsonl")
    with pytest.raises(OutputError, match="exists and is a file"):
        outputs.claim_dir(notes)
    with pytest.raises(OutputError, match="is a folder"):
        outputs.write_text(tmp_path, "x")
    assert stat.S_ISFIFO(fifo.stat().st_mode) and notes.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "pipe"]


def test_outputs_get_the_umask_mode_not_mkstemps(tmp_path, umask_022):
    path = outputs.write_text(tmp_path / "a" / "caption.txt", "1girl\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    folder = outputs.temp_dir(tmp_path / "prepped")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    os.umask(0o027)
    assert stat.S_IMODE(outputs.write_bytes(tmp_path / "b.bin", b"x").stat().st_mode) == 0o640


def test_disk_full_is_one_line_and_the_previous_output_survives(tmp_path):
    target = tmp_path / "captions.jsonl"
    target.write_bytes(b"previous\n")
    with pytest.raises(OutputError) as caught, outputs.atomic_open(target) as handle:
        handle.write(b"new")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert str(caught.value) == f"{target}: cannot write: No space left on device"
    assert target.read_bytes() == b"previous\n" and os.listdir(tmp_path) == ["captions.jsonl"]


def test_stale_temps_of_dead_runs_are_removed_live_ones_kept(tmp_path):
    stale = tmp_path / f".out.jsonl.{DEAD_PID}.abc.tmp"
    stale_dir = tmp_path / f".prepped.{DEAD_PID}.xyz.tmp"
    live = tmp_path / f".out.jsonl.{os.getpid()}.def.tmp"
    other = tmp_path / f".notes.{DEAD_PID}.abc.tmp"  # another target's: left for its own claim
    user = tmp_path / ".out.jsonl.tmp"  # not our pattern: never touched
    for path in (stale, live, other, user):
        path.write_text("x")
    stale_dir.mkdir()
    outputs.claim_file(tmp_path / "out.jsonl")
    outputs.claim_dir(tmp_path / "prepped")
    assert not stale.exists() and not stale_dir.exists()
    assert live.exists() and other.exists() and user.exists()
    assert outputs.remove_stale_temps_under(tmp_path) == 1 and not other.exists()


def test_terminal_safe_escapes_controls_and_keeps_text():
    assert terminal_safe("red\x1b[31m tag\r\u202e") == "red\\x1b[31m tag\\r\\u202e"
    assert terminal_safe("1girl, 猫耳\nnext") == "1girl, 猫耳\nnext"


def test_caption_to_a_fifo_exits_2_with_one_line(tmp_path):
    """The command-line path: exit status and stderr of the real console entry point."""
    posts = tmp_path / "posts.jsonl"
    posts.write_text('{"id": 1, "tag_string": "1girl", "rating": "g"}\n')
    before = posts.read_bytes()
    fifo = tmp_path / "out.jsonl"
    os.mkfifo(fifo)
    done = subprocess.run(
        [sys.executable, "-m", "train.cli", "caption", str(posts), "-o", str(fifo), "--max-tokens", "0"],
        check=False, capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 2, done.stderr
    assert f"{fifo}: is a FIFO" in done.stderr and "Traceback" not in done.stderr
    assert stat.S_ISFIFO(fifo.stat().st_mode) and posts.read_bytes() == before
