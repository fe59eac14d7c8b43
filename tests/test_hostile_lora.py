"""`convert` and `sample` on hostile input: untrusted LoRA files and absurd numbers, as one-line errors."""

from __future__ import annotations

import json
import signal
import stat

import pytest
import torch
from safetensors.torch import save_file

from train.cli import main
from train.lora.convert import read_lora

MODULE = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
KOHYA = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"


def diffusers_file(path, down, up, metadata=None):
    tensors = {f"unet.{MODULE}.lora_A.weight": down, f"unet.{MODULE}.lora_B.weight": up}
    packed = {"lora_adapter_metadata": json.dumps(metadata)} if metadata else None
    save_file(tensors, str(path), metadata=packed)
    return path


def webui_file(path, alpha=4.0, up=True):
    tensors = {f"{KOHYA}.lora_down.weight": torch.randn(4, 640), f"{KOHYA}.alpha": torch.tensor(alpha)}
    if up:
        tensors[f"{KOHYA}.lora_up.weight"] = torch.randn(640, 4)
    save_file(tensors, str(path))
    return path


def convert_fails(tmp_path, source, caplog, *expected):
    """`convert` exits 1 with one message naming the file (and what is wrong); nothing written."""
    before = source.read_bytes()
    out = tmp_path / "out.safetensors" if "diffusers" in source.name else tmp_path / "out_dir"
    caplog.clear()
    assert main(["convert", str(source), str(out)]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and str(source) in errors[0], errors
    for text in expected:
        assert text in errors[0], errors
    assert not out.exists() and source.read_bytes() == before


def test_convert_refuses_unsafe_and_broken_files_before_writing(tmp_path, caplog):
    good = webui_file(tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    convert_fails(tmp_path, truncated, caplog, "not a readable .safetensors file")
    pickled = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, pickled)
    convert_fails(tmp_path, pickled, caplog, "pickle checkpoint", "not loaded")
    convert_fails(tmp_path, webui_file(tmp_path / "no_up.safetensors", up=False), caplog,
                  "lack their up or down matrix", KOHYA)
    convert_fails(tmp_path, webui_file(tmp_path / "nan.safetensors", alpha=float("nan")), caplog, "alpha nan")
    a, b = torch.randn(4, 320), torch.randn(320, 4)
    convert_fails(tmp_path, diffusers_file(tmp_path / "shape_diffusers.safetensors", a, torch.randn(320, 3)),
                  caplog, "mismatched shapes", MODULE)
    convert_fails(tmp_path, diffusers_file(tmp_path / "int_diffusers.safetensors", a.to(torch.int32), b),
                  caplog, "dtype torch.int32")
    convert_fails(tmp_path, diffusers_file(tmp_path / "inf_diffusers.safetensors", a, b,
                                           {"unet.r": 4, "unet.lora_alpha": float("inf")}), caplog, "alpha inf")


def test_adapter_metadata_patterns_are_data_not_regex(tmp_path):
    """A catastrophic-backtracking pattern used to hang `convert`; now keys match as module paths."""
    crafted = {"unet.r": 4, "unet.lora_alpha": 4, "unet.alpha_pattern": {"(a|aa)+$": 1, "attn1.to_q": 8}}
    path = diffusers_file(tmp_path / "crafted.safetensors", torch.randn(4, 320), torch.randn(320, 4), crafted)

    def hung(*_):
        raise TimeoutError("adapter metadata matching hung")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        lora = read_lora(path)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert lora.weights["unet"][MODULE].alpha == 8.0  # the exact dotted-suffix key applies


def test_lora_files_get_the_umask_mode(tmp_path):
    import os

    previous = os.umask(0o022)
    try:
        assert main(["convert", str(webui_file(tmp_path / "in.safetensors")), str(tmp_path / "out")]) == 0
    finally:
        os.umask(previous)
    written = tmp_path / "out" / "pytorch_lora_weights.safetensors"
    assert stat.S_IMODE(written.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--steps", "-3", "argument --steps: -3 is outside 1..1000"),
    ("--batch-size", "0", "argument --batch-size: 0 is outside 1..64"),
    ("--seed", "-1", "argument --seed: -1 is outside"),
    ("--seed", str(2**64), "argument --seed: 18446744073709551616 is outside"),
    ("--cfg", "nan", "argument --cfg: nan must be a finite number in 0..100"),
    ("--strength", "inf", "argument --strength: inf must be a finite number in -10..10"),
])
def test_sample_refuses_absurd_numbers(tmp_path, capsys, option, value, message):
    with pytest.raises(SystemExit) as exit_:
        main(["sample", "1girl", option, value, "-o", str(tmp_path / "o")])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_sample_size_model_and_output_errors_are_one_line(tmp_path, caplog):
    base = ["sample", "1girl", "--no-reorder", "--device", "cpu"]
    assert main([*base, "--size", "99992x1024", "-o", str(tmp_path / "o")]) == 2
    assert "at most 4096 pixels a side" in caplog.text
    assert main([*base, "--model", str(tmp_path / "missing"), "-o", str(tmp_path / "o")]) == 2
    assert f"--model {tmp_path / 'missing'}" in caplog.text and "not found" in caplog.text
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    assert main([*base, "--model", str(tmp_path / "missing"), "-o", str(blocker / "o")]) == 2
    assert f"{blocker} is a file, not a folder" in caplog.text and blocker.read_text() == "mine"
