"""train.model.random_sdxl: the exact SDXL architecture on the meta device, its seeded init and the
streamed single-file writer (the whole 6.9 GB build runs in `make check-sdxl`)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from captioning.outputs import OutputError
from train.lora.adapters import add_text_encoder_lora, add_unet_lora, lora_modules
from train.lora.export import kohya_module_name
from train.model import random_sdxl
from train.tensor_files import TensorSpec


def test_the_real_architecture_on_meta_has_sdxls_sizes_and_lora_modules():
    """Parameter counts of SDXL 1.0 base, and the modules a LoRA covers on it, without storage."""
    unet = random_sdxl.build_empty("unet")
    te1, te2 = random_sdxl.build_empty("text_encoder"), random_sdxl.build_empty("text_encoder_2")
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    assert sum(p.numel() for m in (te1, te2) for p in m.parameters()) == 817_720_320
    add_unet_lora(unet, preset="attn-mlp", rank=4, alpha=4.0)
    add_text_encoder_lora(te1, rank=4, alpha=4.0)
    add_text_encoder_lora(te2, rank=4, alpha=4.0)
    assert all(p.is_meta for m in (unet, te1, te2) for p in m.parameters())
    names = {"unet": {kohya_module_name("unet", path) for path in lora_modules(unet)},
             "text_encoder": {kohya_module_name("text_encoder", path) for path in lora_modules(te1)},
             "text_encoder_2": {kohya_module_name("text_encoder_2", path) for path in lora_modules(te2)}}
    # 70 transformer blocks x (2 attentions x q/k/v/out + 2 feed-forward) + 11 x proj_in/proj_out
    assert len(names["unet"]) == 70 * 10 + 11 * 2 == 722
    # CLIP-L 12 layers, OpenCLIP bigG 32, each q/k/v/out + fc1/fc2
    assert (len(names["text_encoder"]), len(names["text_encoder_2"])) == (72, 192)


def test_sgm_layout_of_the_meta_components_matches_sdxl_checkpoints():
    keys = {c: random_sdxl.to_sgm(c, random_sdxl.build_empty(c)) for c in random_sdxl.COMPONENTS}
    unet, vae, te1, te2 = (keys[c] for c in random_sdxl.COMPONENTS)
    assert len(unet) == 1680 and len(vae) == 248 and len(te1) == 196 and len(te2) == 389
    assert unet["model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"].shape == (640, 640)
    assert vae["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert te2["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)
    assert te2["conditioner.embedders.1.model.text_projection"].shape == (1280, 1280)
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in te1


def test_init_is_seeded_per_tensor_name_and_dtype_independent():
    def filled(kind, name, seed, shape=(64, 32), dtype=torch.float32):
        tensor = torch.empty(shape, dtype=dtype)
        random_sdxl.init_tensor(tensor, kind, name, seed)
        return tensor

    first = filled("linear", "unet.conv_in.weight", 0)
    assert torch.equal(first, filled("linear", "unet.conv_in.weight", 0))
    assert not torch.equal(first, filled("linear", "unet.conv_in.weight", 1))
    assert not torch.equal(first, filled("linear", "unet.conv_out.weight", 0))
    # bf16 storage holds the fp32 draw rounded, not a different draw
    assert torch.equal(filled("linear", "unet.conv_in.weight", 0, dtype=torch.bfloat16), first.bfloat16())
    assert abs(first.std().item() - 32**-0.5) < 0.02  # N(0, 1/fan_in)
    assert abs(filled("embedding", "te.embed", 0, (4000, 8)).std().item() - 0.02) < 0.002
    assert torch.equal(filled("norm", "n.weight", 0, (8,)), torch.ones(8))
    assert torch.equal(filled("bias", "n.bias", 0, (8,)), torch.zeros(8))


def test_a_materialised_component_is_deterministic_and_initialised_by_role():
    """The VAE (84M parameters, the smallest component) built twice from one seed."""
    first = random_sdxl.materialise("vae", torch.bfloat16, seed=3)
    second = random_sdxl.to_sgm("vae", random_sdxl.materialise("vae", torch.bfloat16, seed=3))
    tensors = random_sdxl.to_sgm("vae", first)
    assert tensors.keys() == second.keys()
    assert all(torch.equal(tensors[k], second[k]) for k in tensors)
    assert all(t.dtype == torch.bfloat16 and not t.is_meta for t in tensors.values())
    assert torch.equal(first.encoder.conv_norm_out.weight, torch.ones(512, dtype=torch.bfloat16))
    assert torch.count_nonzero(first.encoder.conv_in.bias) == 0
    assert first.encoder.conv_in.weight.float().std().item() == pytest.approx(27**-0.5, rel=0.1)


def test_streamed_file_reads_back_with_safetensors(tmp_path):
    tensors = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.ones(3, dtype=torch.bfloat16),
               "c": torch.zeros(1, 5, dtype=torch.float16)}
    layout = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    path = random_sdxl.write_streamed(tmp_path / "x.safetensors", layout, iter(tensors.items()), {"seed": "1"})
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"seed": "1"}


@pytest.mark.parametrize("sent", [[("a", torch.ones(2))], [("a", torch.ones(3)), ("b", torch.ones(2))]])
def test_streamed_file_refuses_tensors_that_do_not_match_the_header(tmp_path, sent):
    layout = [TensorSpec("a", torch.float32, (3,))]
    with pytest.raises((ValueError, OutputError), match="x.safetensors"):
        random_sdxl.write_streamed(tmp_path / "x.safetensors", layout, iter(sent), {})
    assert list(tmp_path.iterdir()) == []  # nothing left behind
