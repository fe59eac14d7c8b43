"""sd-scripts' recipe options on our adapters: block numbering, block ranks / alphas / lrs, a rate
per text encoder, and the rank / module / neuron dropouts, each against its definition on the real
SDXL architecture (meta tensors) or on small tensors."""

from __future__ import annotations

import copy
import json
import warnings
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from torch import nn

from train.config import LoraConfig
from train.lora.adapters import TARGET_PRESETS, add_unet_lora, lora_modules, targeted_modules
from train.lora.blocks import (
    BlockLayout,
    lr_multipliers,
    multiplier_of,
    unet_block,
    unet_block_layout,
)
from train.lora.dropout import add_lora_dropouts, down_dropout
from train.lora.fused import fuse_lora_layers
from train.model import sgm_keys
from train.names import SDXL_CONFIG_DIR
from train.runtime.optim import adapter_param_groups


@pytest.fixture(scope="module")
def sdxl_meta():
    with init_empty_weights():
        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SDXL_CONFIG_DIR / "unet"))


@pytest.fixture
def sdxl_unet(sdxl_meta):
    """A fresh SDXL UNet on the meta device (a copy: adapters change it)."""
    return copy.deepcopy(sdxl_meta)


@pytest.mark.parametrize("path, block", [
    # sd-scripts' get_block_index on the SGM name: input_blocks.N -> 1 + N, middle_block.N -> 10 + N,
    # output_blocks.N -> 13 + N; ours is (part, N).
    ("down_blocks.0.resnets.0.conv1", ("down", 1)),
    ("down_blocks.0.downsamplers.0.conv", ("down", 3)),
    ("down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k", ("down", 4)),
    ("down_blocks.2.attentions.1.proj_out", ("down", 8)),
    ("mid_block.resnets.0.conv2", ("mid", 0)),
    ("mid_block.attentions.0.transformer_blocks.9.ff.net.2", ("mid", 1)),
    ("mid_block.resnets.1.conv1", ("mid", 2)),
    ("up_blocks.0.attentions.0.proj_in", ("up", 0)),
    ("up_blocks.0.attentions.2.transformer_blocks.0.attn1.to_q", ("up", 2)),
    ("up_blocks.1.upsamplers.0.conv", ("up", 5)),
    ("up_blocks.2.resnets.2.conv2", ("up", 8)),
    ("time_embedding.linear_1", None),
    ("conv_out", None),
])
def test_unet_blocks_follow_sd_scripts_numbering(sdxl_meta, path, block):
    assert unet_block(path, sgm_keys.unet_module_map(dict(sdxl_meta.config))) == block


def test_block_dims_alphas_and_zero_lr_shape_the_adapter(sdxl_unet):
    """attn-mlp on SDXL: 22 modules in each of input_blocks 4-5 and output_blocks 3-5, 102 in
    input_blocks 7-8, middle_block 1 and output_blocks 0-2 (722 in all)."""
    unet = sdxl_unet
    spec = LoraConfig(rank=4, alpha=2, block_dims={"down": 4, "up": [8, 8, 8, 0, 0, 0, 0, 0, 0]},
                      block_alphas={"up": 1}, block_lr={"mid": [1, 0, 1], "down": 0.5})
    with init_empty_weights():
        config = add_unet_lora(unet, spec)
    block_map = sgm_keys.unet_module_map(dict(unet.config))
    found = Counter((unet_block(path, block_map), module.r["default"], module.lora_alpha["default"],
                     module.lora_A["default"].weight.shape[0])
                    for path, module in lora_modules(unet).items())
    assert found == {(("down", 4), 4, 2, 4): 22, (("down", 5), 4, 2, 4): 22, (("down", 7), 4, 2, 4): 102,
                     (("down", 8), 4, 2, 4): 102, (("up", 0), 8, 1, 8): 102, (("up", 1), 8, 1, 8): 102,
                     (("up", 2), 8, 1, 8): 102}
    # mid (lr 0) and output_blocks 3-5 (rank 0) are left out; patterns only where values differ.
    assert len(config.exclude_modules) == 102 + 3 * 22
    assert set(config.rank_pattern.values()) == {8} and len(config.rank_pattern) == 306
    assert set(config.alpha_pattern.values()) == {1} and len(config.alpha_pattern) == 306


def test_without_block_settings_the_peft_config_is_unchanged(sdxl_meta):
    """A run without block settings gets exactly the PEFT config it got before they existed."""
    spec = LoraConfig(rank=4, alpha=2)
    layout = unet_block_layout(targeted_modules(sdxl_meta, TARGET_PRESETS["attn-mlp"]), dict(sdxl_meta.config), spec)
    assert layout == BlockLayout()  # no patterns, no exclusions: PEFT's LoraConfig defaults
    assert len(targeted_modules(sdxl_meta, TARGET_PRESETS["attn-mlp"])) == 722


def test_param_groups_block_lrs_and_text_encoder_rates(sdxl_unet):
    unet = sdxl_unet
    spec = LoraConfig(rank=4, alpha=4, block_lr={"down": [1, 1, 1, 1, 0.5, 0.5, 1, 2, 2]})
    with init_empty_weights():
        add_unet_lora(unet, spec)
    multipliers = lr_multipliers(list(lora_modules(unet)), dict(unet.config), spec.block_lr)
    named = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
    te1 = [("te1.a", nn.Parameter(torch.zeros(1))), ("te1.lora_B.b", nn.Parameter(torch.zeros(1)))]
    te2 = [("te2.a", nn.Parameter(torch.zeros(1)))]
    groups = adapter_param_groups(named, [te1, te2], lr=1e-4, encoder_lrs=[1e-5, 2e-5], lora_plus_ratio=4.0,
                                  unet_multiplier=lambda name: multiplier_of(name, multipliers))
    by_id = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert len(by_id) == sum(len(g["params"]) for g in groups) == len(named) + 3  # each parameter once
    for name, p in named:
        block = name.split(".transformer_blocks.")[0].split(".proj_")[0]
        scale = {"down_blocks.1.attentions.0": 0.5, "down_blocks.1.attentions.1": 0.5,
                 "down_blocks.2.attentions.0": 2, "down_blocks.2.attentions.1": 2}.get(block, 1)
        assert by_id[id(p)] == pytest.approx(1e-4 * scale * (4 if ".lora_B." in name else 1)), name
    assert [by_id[id(p)] for _, p in te1 + te2] == pytest.approx([1e-5, 4e-5, 2e-5])
    # One rate for both encoders: one group set, as a single text_encoder_lr gave before.
    same = adapter_param_groups([], [te1, te2], lr=1e-4, encoder_lrs=[1e-5, 1e-5])
    assert [(len(g["params"]), g["lr"]) for g in same] == [(3, 1e-5)]


# ---------------------------------------------------------------- dropouts


def test_rank_dropout_masks_components_per_sample_and_rescales():
    lx = torch.randn(3, 5, 8)  # (B, T, r): a Linear layer on tokens
    torch.manual_seed(7)
    out = down_dropout(lx, dropout=0.0, rank_dropout=0.25, module_dropout=0.0)
    torch.manual_seed(7)
    mask = torch.rand(3, 8) > 0.25  # sd-scripts: torch.rand((B, r)) > p, scale / (1 - p)
    torch.testing.assert_close(out, lx * mask[:, None, :] / 0.75)
    conv = torch.randn(2, 8, 4, 4)  # (B, r, H, W)
    torch.manual_seed(1)
    out = down_dropout(conv, dropout=0.0, rank_dropout=0.5, module_dropout=0.0)
    torch.manual_seed(1)
    mask = torch.rand(2, 8) > 0.5
    torch.testing.assert_close(out, conv * mask[:, :, None, None] / 0.5)


def test_module_and_neuron_dropout():
    lx = torch.randn(2, 4, requires_grad=True)
    torch.manual_seed(3)
    dropped = torch.rand(1).item() < 0.6
    torch.manual_seed(3)
    out = down_dropout(lx, dropout=0.0, rank_dropout=0.0, module_dropout=0.6)
    torch.testing.assert_close(out, torch.zeros_like(lx) if dropped else lx)
    out.sum().backward()
    assert lx.grad is not None  # still in the graph: DDP sees a gradient for every parameter
    torch.manual_seed(5)
    out = down_dropout(lx.detach(), dropout=0.3, rank_dropout=0.0, module_dropout=0.0)
    torch.manual_seed(5)
    torch.testing.assert_close(out, F.dropout(lx.detach(), p=0.3))


def test_dropout_hook_on_a_peft_layer_trains_only_and_stays_unfused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6))
    model = inject_adapter_in_model(PeftLoraConfig(r=4, lora_alpha=2, target_modules=["0"]), model)
    layer = model[0]
    nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(2, 3, 6)
    plain = model(x)
    assert add_lora_dropouts(model, rank_dropout=0.5) == 1
    assert fuse_lora_layers(model) == 0  # the fused forward would bypass the hook
    torch.manual_seed(9)
    out = model(x)
    torch.manual_seed(9)
    mask = (torch.rand(2, 4) > 0.5)[:, None, :]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = layer.base_layer(x) + 0.5 * ((x @ a.T) * mask / 0.5) @ b.T  # scale alpha / r = 0.5
    torch.testing.assert_close(out, expected)
    model.eval()
    torch.testing.assert_close(model(x), plain)


def test_no_rates_no_hooks():
    model = inject_adapter_in_model(PeftLoraConfig(r=2, target_modules=["0"]), nn.Sequential(nn.Linear(4, 4)))
    assert add_lora_dropouts(model) == 0
    assert not model[0].lora_A["default"]._forward_hooks


# ---------------------------------------------------------------- one tiny run through the real loop


def test_recipe_run_exports_block_ranks_alphas_and_loads(tiny_model, train_dataset, tmp_path):
    """Text-encoder rates, block lrs, block ranks and alphas, the three dropouts and a resolution
    scale above 1 in one tiny run:
    the optimizer groups carry the rates, the files leave rank-0 / lr-0 blocks out and carry each
    module's alpha, and diffusers and our converter load both files the same way."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open
    from safetensors.torch import load_file
    from train_helpers import train_in_process, write_config

    from train.lora.convert import read_lora
    from train.names import checkpoint_name
    from train.runtime.state_files import read_state

    run_dir = tmp_path / "run"
    config = write_config(
        tmp_path / "c.toml", model_dir=tiny_model.diffusers_dir, dataset=train_dataset, run_dir=run_dir,
        data={"resolution_scale": 2.0},  # above the prepped buckets: 64x96 trains at 128x192
        optimizer={"lr": 1e-2, "warmup_steps": 0, "scheduler": "constant"},
        train={"max_steps": 2, "gradient_accumulation_steps": 1},
        output={"save_every_n_steps": 2, "log_with": []},
        lora={"rank": 2, "alpha": 2, "train_text_encoder": True, "text_encoder_1_lr": 1e-3,
              "text_encoder_2_lr": 2e-3, "block_lr.down": [1, 1, 1, 1, 0.5, 0.5, 1, 1, 1], "block_lr.mid": 0,
              "block_dims.up": [4, 4, 4, 0, 0, 0, 2, 2, 2], "block_alphas.up": 1,
              "dropout": 0.1, "rank_dropout": 0.25, "module_dropout": 0.1})
    result = train_in_process(config)
    assert result.returncode == 0, result.stderr[-3000:]

    groups = read_state(run_dir / checkpoint_name(2), "optimizer")["param_groups"]
    assert [round(g["lr"], 8) for g in groups] == [1e-2, 5e-3, 1e-3, 2e-3]  # plain rate first, as logged

    tensors = load_file(run_dir / "test_lora.safetensors")
    with safe_open(run_dir / "test_lora.safetensors", "pt") as handle:
        metadata = handle.metadata()
    assert metadata["modelspec.resolution"] == "128x192" and metadata["ss_network_dropout"] == "0.1"
    # sd-scripts' network_args: 23 block entries (embeddings and output at the base rank / alpha)
    assert json.loads(metadata["ss_network_args"]) == {
        "block_dims": "2,2,2,2,2,2,2,2,2,2,2,2,2,4,4,4,0,0,0,2,2,2,2",
        "block_alphas": "2,2,2,2,2,2,2,2,2,2,2,2,2,1,1,1,1,1,1,1,1,1,2",
        "down_lr_weight": "1,1,1,1,0.5,0.5,1,1,1", "mid_lr_weight": "0,0,0",
        "rank_dropout": "0.25", "module_dropout": "0.1"}
    modules = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in tensors}
    assert not [m for m in modules if m.startswith(("lora_unet_mid_block", "lora_unet_up_blocks_1_"))]
    up0 = [m for m in modules if m.startswith("lora_unet_up_blocks_0_")]
    down = [m for m in modules if m.startswith("lora_unet_down_blocks_")]
    assert up0 and down and any(m.startswith("lora_te1_") for m in modules) and any(m.startswith("lora_te2_") for m in modules)
    # Every module's `.alpha` is the adapter's 2; up_blocks.0's alpha 1 is folded into its up weights.
    for m in up0:
        assert tensors[f"{m}.lora_down.weight"].shape[0] == 4 and tensors[f"{m}.alpha"].item() == 2.0
    for m in down:
        assert tensors[f"{m}.lora_down.weight"].shape[0] == 2 and tensors[f"{m}.alpha"].item() == 2.0

    def by_module(path):  # text-encoder paths with or without the `text_model.` level, as the formats have them
        return {component: {name.removeprefix("text_model."): module for name, module in entries.items()}
                for component, entries in read_lora(path).weights.items()}

    webui, diffusers = by_module(run_dir / "test_lora.safetensors"), by_module(run_dir / "diffusers")
    assert webui.keys() == diffusers.keys()
    for component, entries in webui.items():
        assert entries.keys() == diffusers[component].keys()
        for name, module in entries.items():
            other = diffusers[component][name]
            assert module.rank == other.rank == (4 if name.startswith("up_blocks.0.") else 2), name
            assert other.alpha == (1.0 if name.startswith("up_blocks.0.") else 2.0), name

            def delta(m):  # what a loader adds to the weight: alpha / r * up @ down
                return m.alpha / m.rank * m.up.float().flatten(1) @ m.down.float().flatten(1)

            torch.testing.assert_close(delta(module), delta(other), rtol=1e-2, atol=1e-5)  # fp16 file

    # Both files load into diffusers with the same modules, ranks and weight changes.
    loaded = []
    for source in (run_dir / "test_lora.safetensors", run_dir / "diffusers"):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model.diffusers_dir)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # PEFT warns when targets and weights disagree
            pipe.load_lora_weights(str(source))
        loaded.append({path: (m.r[name], m.scaling[name] * m.lora_B[name].weight @ m.lora_A[name].weight)
                       for path, m in lora_modules(pipe.unet).items() for name in m.r})
    assert loaded[0].keys() == loaded[1].keys() == webui["unet"].keys()
    for path, (rank, delta) in loaded[0].items():
        assert rank == loaded[1][path][0]
        torch.testing.assert_close(delta.detach(), loaded[1][path][1].detach(), rtol=1e-2, atol=1e-5)
