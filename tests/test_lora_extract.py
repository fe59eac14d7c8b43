"""`lora extract`: from a base and the base plus a known rank-r delta, the delta comes back."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from train.cli import main
from train.lora.deltas import read_deltas
from train.lora.extract import extract
from train.lora.svd import RankRule
from train.model.weight_files import ModelFileError, ModelWeights

RANK = 3
# (component, module path): an attention Linear, a 3x3 ResNet conv, and OpenCLIP's fused q (rows 0..C).
MODULES = [("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"),
           ("unet", "up_blocks.1.resnets.0.conv1"),
           ("text_encoder_2", "encoder.layers.0.self_attn.q_proj")]


@pytest.fixture(scope="module")
def tuned(tiny_model, tmp_path_factory):
    """The tiny single file with a random rank-3 delta added to MODULES; the deltas."""
    weights = ModelWeights(tiny_model.single_file)
    state = load_file(str(tiny_model.single_file))
    generator = torch.Generator().manual_seed(0)
    deltas = {}
    for component, path in MODULES:
        at = weights.locate(component, path)
        shape = weights.location_shape(at)
        flat = (shape[0], int(torch.tensor(shape[1:]).prod()))
        delta = (torch.randn(flat[0], RANK, generator=generator) @ torch.randn(RANK, flat[1], generator=generator)
                 * 0.01).reshape(shape)
        rows = slice(None) if at.part is None else slice(at.part * shape[0], (at.part + 1) * shape[0])
        state[at.key] = state[at.key].clone()
        state[at.key][rows] += delta
        deltas[(component, path)] = delta
    path = tmp_path_factory.mktemp("tuned") / "tuned.safetensors"
    save_file(state, str(path))
    return path, deltas


@pytest.mark.parametrize("base_kind", ["single_file", "diffusers_dir"])
def test_extract_recovers_a_known_rank_r_delta(tiny_model, tuned, tmp_path, base_kind):
    tuned_path, deltas = tuned
    report = extract(getattr(tiny_model, base_kind), tuned_path, tmp_path / "x.safetensors", RankRule(rank=RANK + 1),
                     preset="attn-mlp-conv", dtype=torch.float32)
    lora = read_deltas(tmp_path / "x.safetensors")
    for key, expected in deltas.items():
        got = lora.deltas[key].weight()
        assert float((got - expected).norm() / expected.norm()) < 1e-5, key
    unchanged = [d for key, d in lora.deltas.items() if key not in deltas]
    assert unchanged and all(float(d.matrix().abs().max()) < 1e-6 for d in unchanged)
    assert not any(key[0] == "text_encoder" for key in lora.deltas)  # TE1 unchanged: left out
    assert any(key[0] == "text_encoder_2" for key in lora.deltas)
    notes = "\n".join(report.notes)
    assert "text_encoder: relative change 0 <= 0.0001: left out" in notes
    assert "text_encoder_2: relative change" in notes and "extracted" in notes
    assert all(cut.share == pytest.approx(1.0, abs=1e-9) for cut in report.cuts if cut.key in deltas)


def test_extract_cli_with_energy_and_errors(tiny_model, tuned, tmp_path, capsys, caplog):
    tuned_path, _ = tuned
    out = tmp_path / "e.safetensors"
    assert main(["lora", "extract", "--base", str(tiny_model.single_file), "--tuned", str(tuned_path), "-o", str(out),
                 "--energy", "0.99", "--te-threshold", "1"]) == 0
    printed = capsys.readouterr().out
    assert "text_encoder_2: relative change" in printed and "left out" in printed and "kept min" in printed
    assert not any(key[0] != "unet" for key in read_deltas(out).deltas)
    # another architecture: a file with no UNet under SGM names
    foreign = tmp_path / "foreign.safetensors"
    save_file({"transformer.blocks.0.weight": torch.ones(2, 2)}, str(foreign))
    with pytest.raises(ModelFileError, match="not an SDXL single-file checkpoint"):
        extract(foreign, tuned_path, tmp_path / "f.safetensors", RankRule(rank=2))
    assert main(["lora", "extract", "--base", str(foreign), "--tuned", str(tuned_path), "-o",
                 str(tmp_path / "f.safetensors"), "--rank", "2"]) == 2
    assert str(foreign) in caplog.text
