"""LoKr / LoHa adapters and their LyCORIS single-file export, checked against the lycoris-lora
package as an independent oracle: each module is rebuilt from the exported tensors with LyCORIS'
own `make_module_from_state_dict`, and its delta (`get_weight`, which applies alpha / r once;
4.1's `get_diff_weight` applies it twice) must equal PEFT's `get_delta_weight`."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule
from peft import LoKrConfig
from safetensors import safe_open
from unet_helpers import tiny_lora_unet

from train.config import LoraConfig
from train.lora.adapters import ADAPTER_NAME, add_unet_lora, lora_modules
from train.lora.convert import convert
from train.lora.export import (
    kohya_module_name,
    kohya_state_dict,
    lycoris_network_args,
    save_webui_lora,
    webui_metadata,
)
from train.lora.fused import fuse_lora_layers

# One attention Linear, one cross-attention Linear (in != out), one 3x3 ResNet conv.
MODULES = (
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
    "down_blocks.1.resnets.0.conv1",
)


@pytest.fixture(scope="module")
def base_unet():
    return tiny_lora_unet(lora=False)


def _randomised(base_unet, spec: LoraConfig):
    """A copy of the tiny UNet with a `spec` adapter on attn-mlp-conv, every adapter tensor random
    (the zero-initialised half would make every delta zero and every comparison trivial)."""
    unet = copy.deepcopy(base_unet)
    add_unet_lora(unet, preset="attn-mlp-conv", rank=spec.rank, alpha=spec.alpha, spec=spec)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return unet


@torch.no_grad()
def _lycoris_module(module, tensors: dict[str, torch.Tensor], prefix: str):
    get = tensors.get
    base = module.get_base_layer()
    if f"{prefix}.lokr_w1" in tensors or f"{prefix}.lokr_w1_a" in tensors:
        return LokrModule.make_module_from_state_dict(
            prefix, base, get(f"{prefix}.lokr_w1"), get(f"{prefix}.lokr_w1_a"), get(f"{prefix}.lokr_w1_b"),
            get(f"{prefix}.lokr_w2"), get(f"{prefix}.lokr_w2_a"), get(f"{prefix}.lokr_w2_b"), None,
            get(f"{prefix}.lokr_t2"), tensors[f"{prefix}.alpha"], None)
    return LohaModule.make_module_from_state_dict(
        prefix, base, tensors[f"{prefix}.hada_w1_a"], tensors[f"{prefix}.hada_w1_b"], tensors[f"{prefix}.hada_w2_a"],
        tensors[f"{prefix}.hada_w2_b"], get(f"{prefix}.hada_t1"), get(f"{prefix}.hada_t2"),
        tensors[f"{prefix}.alpha"], None)


@pytest.mark.parametrize(
    "spec, full_w2",
    [
        # rank 6 >= half of every w2 side of MODULES: both halves full matrices, alpha != r.
        (LoraConfig(type="lokr", rank=6, alpha=2.0), True),
        (LoraConfig(type="lokr", rank=1, alpha=3.0, factor=4), False),
        (LoraConfig(type="lokr", rank=1, alpha=0.5, decompose_both=True), False),
        (LoraConfig(type="loha", rank=4, alpha=2.0), None),
        (LoraConfig(type="loha", rank=2, alpha=1.0, tucker=True), None),
    ],
    ids=["lokr-full", "lokr-factor4", "lokr-decompose-both", "loha", "loha-tucker"],
)
def test_exported_deltas_match_the_lycoris_oracle(base_unet, spec, full_w2):
    unet = _randomised(base_unet, spec)
    tensors = kohya_state_dict("unet", unet, dtype=torch.float32)
    layers = lora_modules(unet)
    for path in MODULES:
        prefix = kohya_module_name("unet", path)
        assert tensors[f"{prefix}.alpha"].ndim == 0
        if full_w2 is not None:
            assert (f"{prefix}.lokr_w2" in tensors) is full_w2
        oracle = _lycoris_module(layers[path], tensors, prefix)
        shape = layers[path].get_base_layer().weight.shape
        expected = layers[path].get_delta_weight(ADAPTER_NAME)
        assert expected.abs().max() > 0
        torch.testing.assert_close(oracle.get_weight(shape), expected, rtol=1e-5, atol=1e-6)
    if spec.type == "loha" and spec.tucker:
        assert any(key.endswith(".hada_t1") for key in tensors)
    assert not any(key.endswith(".lokr_t2") for key in tensors)


def test_file_names_shapes_and_metadata(base_unet, tmp_path):
    spec = LoraConfig(type="lokr", rank=4, alpha=2.0, factor=4)
    unet = _randomised(base_unet, spec)
    args = lycoris_network_args(algo="lokr", rank=4, alpha=2.0, conv=True, factor=4)
    metadata = webui_metadata(rank=4, alpha=2.0, output_name="t", resolution=128, tag_frequency={}, comment="c",
                              conv=True, network_args=args)
    path = tmp_path / "lokr.safetensors"
    save_webui_lora(path, unet=unet, metadata=metadata)
    with safe_open(path, "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
        state = {key: f.get_tensor(key) for key in keys}
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"]) == {
        "algo": "lokr", "conv_dim": "4", "conv_alpha": "2.0", "factor": "4", "decompose_both": "False",
        "use_tucker": "False"}
    modules = {key.rsplit(".", 1)[0] for key in keys}
    assert len(modules) == len(lora_modules(unet))
    assert all(name.startswith("lora_unet_") for name in modules)
    for name in modules:
        suffixes = {key[len(name) + 1:] for key in keys if key.rsplit(".", 1)[0] == name}
        assert "alpha" in suffixes and suffixes <= {"alpha", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2",
                                                    "lokr_w2_a", "lokr_w2_b"}
        assert state[f"{name}.lokr_w1"].dtype == torch.float16  # the default file dtype


def test_full_matrix_lokr_alpha_is_folded_into_w1(base_unet):
    """Loaders ignore alpha when both halves are full: the file must carry alpha / r in w1."""
    unet = _randomised(base_unet, LoraConfig(type="lokr", rank=4, alpha=2.0))
    tensors = kohya_state_dict("unet", unet, dtype=torch.float32)
    layer = lora_modules(unet)[MODULES[0]]
    prefix = kohya_module_name("unet", MODULES[0])
    torch.testing.assert_close(tensors[f"{prefix}.lokr_w1"], layer.lokr_w1[ADAPTER_NAME].detach() * 0.5)
    assert tensors[f"{prefix}.alpha"].item() == 4.0  # = r: scale 1 for any loader


def test_refuses_tucker_lokr_and_incomplete_loha(base_unet):
    unet = copy.deepcopy(base_unet)
    unet.add_adapter(LoKrConfig(r=2, alpha=2, target_modules=["conv1"], use_effective_conv2d=True))
    with pytest.raises(ValueError, match="conv1: Tucker LoKr"):
        kohya_state_dict("unet", unet)
    unet = _randomised(base_unet, LoraConfig(type="loha", rank=2, alpha=2.0))
    del lora_modules(unet)[MODULES[0]].hada_w2_b[ADAPTER_NAME]
    with pytest.raises(ValueError, match="to_q: LoHa module lacks hada_w2_b"):
        kohya_state_dict("unet", unet)


def test_step_zero_is_the_base_model(base_unet):
    """Both methods start at a zero delta (LoKr: w2 = 0, LyCORIS' init; LoHa: w2_b = 0)."""
    for spec in (LoraConfig(type="lokr", rank=4, alpha=4.0), LoraConfig(type="loha", rank=4, alpha=4.0)):
        unet = copy.deepcopy(base_unet)
        add_unet_lora(unet, preset="attn-mlp-conv", rank=4, alpha=4.0, spec=spec)
        layers = lora_modules(unet)
        assert len(layers) == 170  # attn-mlp-conv on the tiny UNet, as for LoRA
        assert all(not layers[path].get_delta_weight(ADAPTER_NAME).any() for path in MODULES)
        assert all(p.dtype == torch.float32 for p in unet.parameters() if p.requires_grad)
        assert fuse_lora_layers(unet) == 0  # the fused forward is plain LoRA's; these keep PEFT's


def test_convert_lokr_file_to_diffusers_reloads_the_same_deltas(base_unet, tmp_path):
    """Rank 6 on the tiny UNet mixes full-matrix modules (alpha folded) with factorised ones (the
    up-block convs, 128 channels in; alpha baked on conversion), Linear and conv."""
    spec = LoraConfig(type="lokr", rank=6, alpha=2.0)
    unet = _randomised(base_unet, spec)
    metadata = webui_metadata(rank=spec.rank, alpha=spec.alpha, output_name="t", resolution=128, tag_frequency={},
                              comment="c", network_args=lycoris_network_args(algo="lokr", rank=spec.rank,
                                                                             alpha=spec.alpha, conv=True))
    save_webui_lora(tmp_path / "lokr.safetensors", unet=unet, metadata=metadata, dtype=torch.float32)
    convert(tmp_path / "lokr.safetensors", tmp_path / "diffusers")
    fresh = copy.deepcopy(base_unet)
    fresh.load_lora_adapter(str(tmp_path / "diffusers"), weight_name="pytorch_lora_weights.safetensors",
                            prefix="unet", adapter_name="x")
    loaded, trained = lora_modules(fresh), lora_modules(unet)
    assert len(loaded) == len(trained)
    assert any("lokr_w2_a" in name for name in dict(fresh.named_parameters()))  # a factorised module too
    for path in (*MODULES, "up_blocks.1.resnets.0.conv1"):
        torch.testing.assert_close(loaded[path].get_delta_weight("x"), trained[path].get_delta_weight(ADAPTER_NAME))


def test_convert_refuses_loha_with_the_reason(base_unet, tmp_path):
    unet = _randomised(base_unet, LoraConfig(type="loha", rank=2, alpha=2.0))
    metadata = webui_metadata(rank=2, alpha=2.0, output_name="t", resolution=128, tag_frequency={}, comment="c",
                              network_args=lycoris_network_args(algo="loha", rank=2, alpha=2.0, conv=True))
    save_webui_lora(tmp_path / "loha.safetensors", unet=unet, metadata=metadata)
    with pytest.raises(ValueError, match="loha.safetensors: LoHa files cannot be converted to diffusers"):
        convert(tmp_path / "loha.safetensors", tmp_path / "out")
    with pytest.raises(ValueError, match="converts only from the WebUI file to diffusers"):
        convert(tmp_path / "loha.safetensors", tmp_path / "o.safetensors", to="webui")


def test_sampling_names_a_lycoris_file_it_cannot_load(tmp_path):
    from safetensors.torch import save_file

    from train.generate.sampling import LoraFileError
    from train.generate.sampling import lora_modules as file_modules

    name = "lora_unet_down_blocks_1_attentions_0_proj_in"
    save_file({f"{name}.{k}": torch.zeros(2, 2) for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")},
              str(tmp_path / "loha.safetensors"))
    with pytest.raises(LoraFileError, match="loha.safetensors: a LyCORIS .* diffusers cannot load"):
        file_modules(tmp_path / "loha.safetensors")
