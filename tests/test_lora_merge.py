"""`lora merge`: LoRAs into one LoRA (exactly, or cut to a rank), through the command line."""

from __future__ import annotations

import pytest
import torch
from lora_tool_helpers import adapted_unet, peft_deltas, write_lora
from unet_helpers import tiny_lora_unet

from train.cli import main
from train.config import LoraConfig
from train.lora.deltas import read_deltas
from train.lora.merge import WeightedLora, parse_weighted


@pytest.fixture(scope="module")
def two_loras(tmp_path_factory):
    """An attn-mlp-conv LoRA (rank 4, alpha 2) and an attn LoRA (rank 3, alpha 3), and their PEFT deltas."""
    base = tiny_lora_unet(lora=False)
    root = tmp_path_factory.mktemp("two")
    a_spec, b_spec = LoraConfig(rank=4, alpha=2.0), LoraConfig(rank=3, alpha=3.0)
    a = adapted_unet(base, a_spec, seed=1)
    b = adapted_unet(base, b_spec, preset="attn", seed=2)
    return (write_lora(root / "a.safetensors", a_spec, unet=a), peft_deltas("unet", a),
            write_lora(root / "b.safetensors", b_spec, unet=b), peft_deltas("unet", b))


def _relative(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _expected(two_loras, wa: float, wb: float) -> dict:
    _, a, _, b = two_loras
    return {key: wa * a.get(key, 0) + wb * b.get(key, 0) for key in a.keys() | b.keys()}


def test_exact_merge_of_two_is_the_weighted_sum_of_their_deltas(two_loras, tmp_path, capsys):
    a_path, _, b_path, _ = two_loras
    out = tmp_path / "ab.safetensors"
    assert main(["lora", "merge", f"{a_path}:0.7", f"{b_path}:-0.5", "-o", str(out), "--dtype", "fp32"]) == 0
    merged = read_deltas(out)
    expected = _expected(two_loras, 0.7, -0.5)
    assert set(merged.deltas) == set(expected)
    for key, delta in merged.deltas.items():
        assert _relative(delta.weight(), expected[key]) < 1e-5, key
    # ranks concatenated where both files adapt the module (attention: 4 + 3), alone elsewhere
    assert {merged.ranks[k] for k in merged.deltas} == {7, 4}
    assert "exact merge" in capsys.readouterr().out


def test_merge_to_a_rank_is_the_svd_of_the_summed_delta(two_loras, tmp_path, capsys):
    a_path, _, b_path, _ = two_loras
    out = tmp_path / "ab2.safetensors"
    assert main(["lora", "merge", str(a_path), f"{b_path}:0.5", "-o", str(out), "--rank", "2",
                 "--dtype", "fp32"]) == 0
    merged = read_deltas(out)
    for key, expected in _expected(two_loras, 1.0, 0.5).items():
        matrix = expected.reshape(expected.shape[0], -1).double()
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        assert _relative(merged.deltas[key].matrix(), ((u[:, :2] * s[:2]) @ vh[:2]).float()) < 1e-5, key
    table = capsys.readouterr().out
    assert "kept min" in table and "unet" in table


def test_parse_weighted():
    assert parse_weighted("a.safetensors:0.7") == WeightedLora(__import__("pathlib").Path("a.safetensors"), 0.7)
    assert parse_weighted("dir/a.safetensors").weight == 1.0
    assert parse_weighted("c:/x/a.safetensors").path.name == "a.safetensors"
    with pytest.raises(ValueError):
        parse_weighted("a.safetensors:nan")


def test_bad_inputs_exit_2_with_one_line(two_loras, tmp_path, caplog):
    a_path, _, _, _ = two_loras
    pickle = tmp_path / "x.ckpt"
    pickle.write_bytes(b"\x80\x04" + b"\0" * 32)
    cases = [
        (["merge", str(a_path), str(pickle), "-o", str(tmp_path / "o.safetensors")], str(pickle)),
        (["merge", str(a_path), "-o", str(a_path)], "overwrite the input"),
        (["resize", str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "o.safetensors"), "--rank", "2"],
         "not found"),
    ]
    for argv, words in cases:
        caplog.clear()
        assert main(["lora", *argv]) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and words in errors[0] and "\n" not in errors[0]
    assert not (tmp_path / "o.safetensors").exists()


def test_a_hub_model_not_in_the_cache_is_one_line_offline(two_loras, tmp_path, monkeypatch, caplog):
    a_path, _, _, _ = two_loras
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert main(["lora", "merge", str(a_path), "--into", "zero", "-o", str(tmp_path / "m.safetensors")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "animagine-xl-4.0-zero" in errors[0] and "cache" in errors[0]
