"""`sample` and `eval` read LoKr and LoHa files: the image `sample` makes from the exported file is
the image the training hook makes from the adapter itself, at the same seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lora_tool_helpers import randomise_adapters
from PIL import Image
from safetensors.torch import load_file, save_file

from train.cli import main
from train.config import LoraConfig, SampleConfig
from train.generate.hook import SampleGrids
from train.generate.sampling import LoraFileError, build_pipeline, load_lora
from train.lora.adapters import add_text_encoder_lora, add_unet_lora
from train.lora.export import save_webui_lora, webui_metadata
from train.model.loading import load_base_model

pytestmark = pytest.mark.heavy  # samples a tiny model end to end: left out of `make test-fast`

PROMPT = "1girl, solo, smile"


def _trained(tiny_model, spec: LoraConfig):
    """A tiny model with a random `spec` adapter on the UNet (attn-mlp-conv) and both text encoders."""
    model = load_base_model(str(tiny_model.diffusers_dir), weight_dtype=torch.float32)
    add_unet_lora(model.unet, spec, preset="attn-mlp-conv")
    add_text_encoder_lora(model.text_encoder, spec)
    add_text_encoder_lora(model.text_encoder_2, spec)
    randomise_adapters(model.unet, model.text_encoder, model.text_encoder_2, seed=4, scale=0.3)
    return model


@pytest.mark.parametrize("spec", [LoraConfig(type="lokr", rank=4, alpha=2.0, factor=4),
                                  LoraConfig(type="loha", rank=2, alpha=1.0)], ids=["lokr", "loha"])
def test_sample_with_a_lycoris_file_equals_the_training_hook(tiny_model, tmp_path, spec):
    model = _trained(tiny_model, spec)
    path = tmp_path / f"{spec.type}.safetensors"
    save_webui_lora(path, unet=model.unet, text_encoder=model.text_encoder, text_encoder_2=model.text_encoder_2,
                    metadata=webui_metadata(rank=spec.rank, alpha=spec.alpha, output_name=spec.type, resolution=64,
                                            tag_frequency={}, comment="t"), dtype=torch.float32)
    config = SampleConfig(every_n_steps=1, prompts=[PROMPT], seeds=[5], size="64x64", steps=2, noise_device="cpu",
                          sample_model="opt", opt_model=str(tiny_model.diffusers_dir))
    hook = SampleGrids(config, train_model=model, out_dir=tmp_path / "hook", weight_dtype=torch.float32)
    grid = hook.render_grid(1, unet=model.unet, text_encoder=model.text_encoder, text_encoder_2=model.text_encoder_2)
    assert main(["sample", "--lora", str(path), "--model", str(tiny_model.diffusers_dir), "--size", "64x64",
                 "--steps", "2", "--seed", "5", "--no-reorder", "--device", "cpu", "--noise-device", "cpu", PROMPT,
                 "-o", str(tmp_path / "out")]) == 0
    ours = np.asarray(Image.open(tmp_path / "out" / "p00-s5.png"), np.int16)
    hooks = np.asarray(grid, np.int16)[16:]  # below the grid's label band
    assert ours.shape == hooks.shape
    assert np.abs(ours - hooks).max() <= 1
    # the file is not ignored: without it the image differs
    assert main(["sample", "--model", str(tiny_model.diffusers_dir), "--size", "64x64", "--steps", "2", "--seed", "5",
                 "--no-reorder", "--device", "cpu", "--noise-device", "cpu", PROMPT, "-o", str(tmp_path / "bare")]) == 0
    bare = np.asarray(Image.open(tmp_path / "bare" / "p00-s5.png"), np.int16)
    assert np.abs(ours - bare).max() > 10


def test_a_broken_lycoris_file_is_named_and_leaves_no_adapter(tiny_model, tmp_path):
    model = _trained(tiny_model, LoraConfig(type="loha", rank=2, alpha=1.0))
    path = tmp_path / "loha.safetensors"
    save_webui_lora(path, unet=model.unet, metadata=webui_metadata(rank=2, alpha=1.0, output_name="l",
                                                                   resolution=64, tag_frequency={}, comment="t"))
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith(".hada_w1_a"))
    tensors[key] = torch.ones(3, 3)  # a shape this layer cannot take
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken))
    pipe = build_pipeline(load_base_model(str(tiny_model.diffusers_dir), weight_dtype=torch.float32))
    with pytest.raises(LoraFileError, match="broken.safetensors"):
        load_lora(pipe, broken, "x")
    assert not any(pipe.get_list_adapters().values())
    load_lora(pipe, path, "y", 0.5)  # the intact file loads on the same pipeline afterwards
    assert pipe.get_list_adapters()["unet"] == ["y"]

