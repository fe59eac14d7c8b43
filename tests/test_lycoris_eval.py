"""`eval` measures a LoKr file (diffusers cannot load it; PEFT does, as in `sample`)."""

from __future__ import annotations

import json

import pytest
import torch
from lora_tool_helpers import randomise_adapters
from sample_eval_helpers import make_dataset

from train.cli import main
from train.config import LoraConfig
from train.lora.adapters import add_unet_lora
from train.lora.export import save_webui_lora, webui_metadata
from train.model.loading import load_base_model

pytestmark = pytest.mark.heavy  # evaluates a tiny model end to end: left out of `make test-fast`


def test_eval_measures_a_lokr_file(tiny_model, tmp_path):
    prepped = make_dataset(tmp_path / "prepped")
    folder = tmp_path / "val"
    folder.mkdir()
    for source in (prepped / "images").glob("[34].png"):
        (folder / source.name).write_bytes(source.read_bytes())
    spec = LoraConfig(type="lokr", rank=4, alpha=2.0, factor=4)
    model = load_base_model(str(tiny_model.diffusers_dir), weight_dtype=torch.float32)
    add_unet_lora(model.unet, spec, preset="attn-mlp")
    randomise_adapters(model.unet, seed=4, scale=0.3)
    path = tmp_path / "lokr.safetensors"
    save_webui_lora(path, unet=model.unet, metadata=webui_metadata(rank=4, alpha=2.0, output_name="lokr",
                                                                   resolution=64, tag_frequency={}, comment="t"))
    assert main(["eval", str(path), "--val-folder", str(folder), "--val-scale", "0.0625", "--no-images",
                 "--model", str(tiny_model.diffusers_dir), "--device", "cpu", "-o", str(tmp_path / "out")]) == 0
    rows = json.loads((tmp_path / "out" / "report.json").read_text())["rows"]
    assert [r["error"] for r in rows] == [None, None]
    assert rows[0]["val_loss"] != rows[1]["val_loss"]
