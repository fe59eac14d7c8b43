"""Training with bad input, faults and untrusted checkpoints.

Each case asserts a non-zero exit from the `python -m train` entry point, a message naming the
file or key, no traceback, and that the inputs (config, earlier run, checkpoints) are byte for
byte what they were. All of them fail before the model is built, so they cost seconds; one short
tiny run (2 steps) provides real checkpoints for them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from train_helpers import REPO, make_dataset, write_config

from train.cli import main as cli_main
from train.runtime import checkpoint
from train.runtime.run_dir import LOCK_NAME, RunDirError, RunLock, refuse_or_move_previous_run
from train.runtime.state_files import StateFileError, read_state, write_state

pytestmark = pytest.mark.heavy  # trains tiny models: left out of `make test-fast`


@pytest.fixture
def dataset(train_dataset) -> Path:
    return train_dataset


@pytest.fixture
def run_copy(trained_run, tiny_model, dataset, tmp_path) -> tuple[Path, Path]:
    """(config, run folder): a private copy of the session's 6-step run (checkpoints at steps 4
    and 6) and a config pointing at it."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    (run_dir / LOCK_NAME).unlink(missing_ok=True)
    return _config(tmp_path, tiny_model, dataset, run_dir), run_dir


def _config(tmp_path: Path, tiny_model, dataset: Path, run_dir: Path, **sections) -> Path:
    sections = {"train": {"max_steps": 2, "gradient_accumulation_steps": 1},
                "output": {"save_every_n_steps": 1, "checkpoints_total_limit": 10}, **sections}
    return write_config(tmp_path / "c.toml", model_dir=tiny_model.diffusers_dir, dataset=dataset, run_dir=run_dir,
                        **sections)


def snapshot(*paths: Path) -> dict[str, str]:
    """sha256 of every file under `paths` (the lock file is ours, not an input)."""
    files = [p for path in paths for p in ([path] if path.is_file() else sorted(path.rglob("*"))) if p.is_file()]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.name != LOCK_NAME}


def refused(caplog, argv: list[str], *inputs: Path) -> str:
    """Run `python -m train ARGV` in-process; assert exit 2, no traceback, inputs untouched; return the log."""
    before = snapshot(*inputs)
    caplog.clear()
    try:
        with caplog.at_level(logging.INFO):
            code = cli_main(["train", *argv])
    finally:  # the in-process Accelerator's singleton state must not leak into other tests
        AcceleratorState._reset_state(reset_partial_state=True)
    assert code == 2, caplog.text
    assert "Traceback" not in caplog.text
    assert snapshot(*inputs) == before
    return caplog.text


# ---------------------------------------------------------------- data loss


def test_fresh_run_into_another_runs_folder_is_refused(run_copy, caplog):
    config, run_dir = run_copy
    text = refused(caplog, [str(config)], config, run_dir)
    assert f"output.dir {run_dir}: holds another run" in text
    assert "--resume latest" in text and "--overwrite" in text and "new output.dir" in text
    text = refused(caplog, [str(config), "--resume", "latest", "--overwrite"], config, run_dir)
    assert "--overwrite starts a fresh run; it cannot be combined with --resume" in text


def test_overwrite_moves_only_our_files_aside(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoint-000002").mkdir(parents=True)
    (run_dir / "log.jsonl").write_text("{}\n")
    (run_dir / "my_lora.safetensors").write_bytes(b"x")
    (run_dir / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="--resume latest"):
        refuse_or_move_previous_run(run_dir, overwrite=False)
    with pytest.raises(RunDirError, match="it has no complete checkpoint to resume from"):
        refuse_or_move_previous_run(run_dir, overwrite=False, resuming=True)  # --resume latest found none
    aside = refuse_or_move_previous_run(run_dir, overwrite=True)
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoint-000002", "log.jsonl", "my_lora.safetensors"]
    assert sorted(p.name for p in run_dir.iterdir()) == sorted([aside.name, "notes.txt"])
    assert refuse_or_move_previous_run(run_dir, overwrite=False) is None  # a replaced-* folder is not a run


def test_lock_refuses_a_second_run_and_dies_with_a_killed_one(run_copy, caplog, tmp_path):
    config, run_dir = run_copy
    holder = RunLock(run_dir)
    try:
        text = refused(caplog, [str(config), "--resume", "latest"], config, run_dir)
        assert f"output.dir {run_dir}: another training run (pid {os.getpid()})" in text
    finally:
        holder.release()
    script = f"from pathlib import Path; from train.runtime.run_dir import RunLock; RunLock(Path({str(run_dir)!r})); " \
             "print('locked', flush=True); import time; time.sleep(120)"
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    assert process.stdout.readline().strip() == "locked"
    with pytest.raises(RunDirError, match=f"pid {process.pid}"):
        RunLock(run_dir)
    process.send_signal(signal.SIGKILL)
    process.wait()
    RunLock(run_dir).release()  # the kernel dropped the killed process's lock


# ---------------------------------------------------------------- untrusted checkpoints


class _Payload:
    """Unpickling this creates `marker`: proof that code from a checkpoint ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


# The pickles accelerate's save_state wrote, which older checkpoints held.
ACCELERATE_FILES = ("optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl",
                    "custom_checkpoint_1.pkl", "pytorch_model.bin")


def _plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(_Payload(marker), path)


def test_planted_pickles_are_never_unpickled(run_copy, caplog, tmp_path):
    config, run_dir = run_copy
    marker = tmp_path / "code-ran"
    probe = tmp_path / "probe.pkl"
    _plant(probe, marker)
    torch.load(probe, weights_only=False)  # the payload works when something unpickles it
    assert marker.exists()
    marker.unlink()

    # Old accelerate pickles beside intact state: ignored, the checkpoint still resumes.
    newest = checkpoint.list_checkpoints(run_dir)[-1]
    for name in ACCELERATE_FILES:
        _plant(newest / name, marker)
    point = checkpoint.find_resume_point("latest", run_dir, rank=0, settings=_settings(), inexact=False)
    assert point.folder == newest and not marker.exists()

    # Every file of every checkpoint replaced by a pickle: refused, nothing run.
    for folder in checkpoint.list_checkpoints(run_dir):
        for path in [p for p in folder.rglob("*") if p.is_file()]:
            _plant(path, marker)
    text = refused(caplog, [str(config), "--resume", "latest"], config, run_dir)
    assert "none of the 2 checkpoints is complete and readable" in text
    assert "checkpoint-000006/checkpoint.json" in text and "falling back" in text
    assert not marker.exists()


def test_manifest_names_cannot_reach_outside_the_checkpoint(run_copy):
    _, run_dir = run_copy
    newest = checkpoint.list_checkpoints(run_dir)[-1]
    manifest = json.loads((newest / checkpoint.MANIFEST).read_text())
    (newest / checkpoint.MANIFEST).write_text(json.dumps({**manifest, "state": ["../checkpoint-000004/optimizer"]}))
    with pytest.raises(StateFileError, match="'state' must list plain names"):
        checkpoint.find_resume_point(str(newest), run_dir, rank=0, settings=_settings(), inexact=False)


def _settings(**changes) -> dict:
    settings = {"lora.preset": "attn-mlp", "lora.rank": 2, "lora.alpha": 2, "lora.dora": False,
                "lora.train_text_encoder": False, "optimizer.name": "adamw"}
    return {**settings, **changes}


@pytest.mark.parametrize("damaged", ["adapter_0.safetensors", "optimizer.safetensors", "lr_scheduler.json"])
def test_truncated_newest_checkpoint_falls_back_to_the_previous(run_copy, caplog, damaged):
    _, run_dir = run_copy
    first, newest = checkpoint.list_checkpoints(run_dir)
    path = newest / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        point = checkpoint.find_resume_point("latest", run_dir, rank=0, settings=_settings(), inexact=False)
    assert point.folder == first
    assert f"{path}" in caplog.text and "falling back to the previous checkpoint" in caplog.text
    with pytest.raises(StateFileError, match=str(path)):  # an explicit PATH is not swapped for another
        checkpoint.find_resume_point(str(newest), run_dir, rank=0, settings=_settings(), inexact=False)


def test_truncated_checkpoints_without_fallback_are_refused(run_copy, caplog):
    config, run_dir = run_copy
    for folder in checkpoint.list_checkpoints(run_dir):
        path = folder / "optimizer.safetensors"
        path.write_bytes(path.read_bytes()[:100])
    text = refused(caplog, [str(config), "--resume", "latest"], config, run_dir)
    assert "checkpoint-000004/optimizer.safetensors: not a complete safetensors file" in text


@pytest.mark.parametrize(("section", "key", "value"), [("lora", "rank", 4), ("optimizer", "name", "adafactor")])
def test_resume_after_changing_a_setting_names_the_key(run_copy, caplog, tiny_model, dataset, tmp_path, section,
                                                       key, value):
    _, run_dir = run_copy
    config = _config(tmp_path, tiny_model, dataset, run_dir, **{section: {key: value}})
    text = refused(caplog, [str(config), "--resume", "latest"], config, run_dir)
    assert f"cannot resume after changing {section}.{key} = " in text and f"{value!r} in the config" in text


def test_a_checkpoint_from_before_a_resume_setting_existed_resumes_on_its_default(run_copy):
    """Checkpoints written before `model.prediction_type` was recorded were trained as "auto": they
    resume under "auto" and are refused under an explicit type, naming the key."""
    _, run_dir = run_copy
    newest = checkpoint.list_checkpoints(run_dir)[-1]
    manifest_path = newest / checkpoint.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    for key in ("model.prediction_type", "train.zero_terminal_snr"):
        del manifest["settings"][key]
    manifest_path.write_text(json.dumps(manifest))
    settings = {**manifest["settings"], "model.prediction_type": "auto", "train.zero_terminal_snr": "auto"}
    assert checkpoint.read_checkpoint(newest, rank=0, settings=settings).folder == newest
    with pytest.raises(checkpoint.ResumeError, match="model.prediction_type = 'auto' in the checkpoint, "
                                                     "'v_prediction' in the config"):
        checkpoint.read_checkpoint(newest, rank=0, settings={**settings, "model.prediction_type": "v_prediction"})


def test_missing_random_states_refused_unless_inexact(run_copy, caplog):
    config, run_dir = run_copy
    for folder in checkpoint.list_checkpoints(run_dir):
        for path in folder.glob("rng_0.*"):
            path.unlink()
    text = refused(caplog, [str(config), "--resume", "latest"], config, run_dir)
    assert "rng_0.json: missing" in text and "--resume-inexact" in text
    with caplog.at_level(logging.WARNING):
        point = checkpoint.find_resume_point("latest", run_dir, rank=0, settings=_settings(), inexact=True)
    assert point.rng is None and "WITHOUT the random states" in caplog.text


def test_state_files_round_trip_exactly(tmp_path):
    tree = {"state": {0: {"step": torch.tensor(3.0), "m": torch.arange(6.0).view(2, 3)[:, 1]}},
            "groups": [{"betas": (0.9, 0.999), "lr": 1e-4 / 3, "fused": None, "params": [0]}], "inf": float("inf")}
    write_state(tmp_path, "opt", tree)
    back = read_state(tmp_path, "opt")
    assert back["groups"] == tree["groups"] and back["inf"] == tree["inf"] and list(back["state"]) == [0]
    assert torch.equal(back["state"][0]["m"], tree["state"][0]["m"])
    with pytest.raises(TypeError, match=r"state\.bad: a object cannot be stored"):
        write_state(tmp_path, "bad", {"bad": object()})


# ---------------------------------------------------------------- clear errors


def test_config_not_utf8_or_a_folder(caplog, tmp_path):
    bad = tmp_path / "latin1.toml"
    bad.write_bytes("[output]\ndir = 'caf\u00e9'\n".encode("latin-1"))
    assert f"{bad}: not UTF-8 text" in refused(caplog, [str(bad)], bad)
    assert f"{tmp_path}: is a folder" in refused(caplog, [str(tmp_path)], tmp_path)


def test_output_dir_that_is_a_file(caplog, tiny_model, dataset, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    config = _config(tmp_path, tiny_model, dataset, taken)
    assert f"output.dir {taken}: exists and is not a folder" in refused(caplog, [str(config)], config, taken)


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_seed_outside_numpys_range(caplog, tiny_model, dataset, tmp_path, seed):
    config = _config(tmp_path, tiny_model, dataset, tmp_path / "run", train={"max_steps": 2, "seed": seed})
    assert f"{config}: train.seed: " in refused(caplog, [str(config)], config)


def test_cache_after_an_image_was_deleted(tiny_model, caplog, tmp_path):
    prep = make_dataset(tmp_path / "prep", seed=2)
    (prep / "images" / "b.png").unlink()
    config = _config(tmp_path, tiny_model, prep, tmp_path / "run")
    before = snapshot(config, prep / "dataset", prep / "images")
    try:
        with caplog.at_level(logging.INFO):
            assert cli_main(["cache", str(config)]) == 2
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert f"{prep / 'images' / 'b.png'} (dataset row 'b.png'): cannot read image" in caplog.text
    assert "Traceback" not in caplog.text
    assert snapshot(config, prep / "dataset", prep / "images") == before
