"""`animagine-lora convert` (train.lora.convert): both directions, alpha handling, sd-scripts names, errors."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from train.cli import main as cli_main
from train.lora.convert import convert, read_lora
from train.lora.export import save_diffusers_lora, save_webui_lora, webui_metadata

RANK, ALPHA = 4, 2.0


def _metadata():
    return webui_metadata(
        rank=RANK,
        alpha=ALPHA,
        output_name="miku",
        resolution=(896, 1152),
        tag_frequency={"hatsune miku": 3},
        comment="original",
    )


def _webui_file(pipe, path, **kwargs):
    encoders = {}
    if getattr(pipe.text_encoder, "peft_config", None):
        encoders = {"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    save_webui_lora(
        path, unet=pipe.unet, **encoders, metadata=_metadata(), dtype=torch.float32, **kwargs
    )
    return path


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _reloaded(tiny_model, sdxl_output, lora_path):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model.diffusers_dir)
    pipe.load_lora_weights(str(lora_path))
    return sdxl_output(pipe)


def test_webui_to_diffusers_and_back(lora_pipeline, tiny_model, sdxl_output, tmp_path):
    pipe = lora_pipeline(preset="attn-mlp-conv", rank=RANK, alpha=ALPHA)
    source = _webui_file(pipe, tmp_path / "miku.safetensors")
    before = _sha(source)
    assert cli_main(["convert", str(source), str(tmp_path / "miku_diffusers")]) == 0
    diffusers_file = tmp_path / "miku_diffusers" / "pytorch_lora_weights.safetensors"
    with safe_open(diffusers_file, "pt") as f:
        adapter = json.loads(f.metadata()["lora_adapter_metadata"])
    assert adapter["unet.lora_alpha"] == ALPHA and adapter["unet.r"] == RANK
    assert adapter["text_encoder_2.lora_alpha"] == ALPHA
    torch.testing.assert_close(
        _reloaded(tiny_model, sdxl_output, diffusers_file.parent), sdxl_output(pipe)
    )

    back = tmp_path / "miku_back.safetensors"
    assert cli_main(["convert", str(diffusers_file.parent), str(back)]) == 0
    original, converted = load_file(source), load_file(back)
    assert original.keys() == converted.keys()
    for key in original:
        assert torch.equal(original[key], converted[key]), key
    assert _sha(source) == before  # the input is never modified


def test_sd_scripts_file_to_diffusers_names(lora_pipeline, tiny_model, sdxl_output, tmp_path):
    pipe = lora_pipeline(rank=RANK, alpha=ALPHA)
    source = _webui_file(pipe, tmp_path / "sd_scripts.safetensors", block_names="sgm")
    out = convert(source, tmp_path / "renamed.safetensors", to="webui")
    keys = load_file(out).keys()
    assert (
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
        in keys
    )
    assert not any("input_blocks" in k for k in keys)
    with safe_open(out, "pt") as f:
        metadata = f.metadata()
    # the input's own metadata is kept (tag frequency, resolution), the class stays SDXL
    assert json.loads(metadata["ss_tag_frequency"]) == {"miku": {"hatsune miku": 3}}
    assert metadata["modelspec.resolution"] == "896x1152"
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    torch.testing.assert_close(_reloaded(tiny_model, sdxl_output, out), sdxl_output(pipe))


def test_diffusers_to_webui_loads_with_same_outputs(
    lora_pipeline, tiny_model, sdxl_output, tmp_path
):
    pipe = lora_pipeline(rank=RANK, alpha=ALPHA)
    save_diffusers_lora(
        tmp_path / "d",
        unet=pipe.unet,
        text_encoder=pipe.text_encoder,
        text_encoder_2=pipe.text_encoder_2,
    )
    out = convert(tmp_path / "d", tmp_path / "w.safetensors", dtype=torch.float16)
    tensors = load_file(out)
    assert {v.item() for k, v in tensors.items() if k.endswith(".alpha")} == {ALPHA}
    assert (
        tensors["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"].dtype
        == torch.float16
    )
    with safe_open(out, "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_alpha"] == "2.0" and metadata["ss_network_dim"] == "4"
    assert metadata["ss_output_name"] == "w"
    torch.testing.assert_close(
        _reloaded(tiny_model, sdxl_output, out), sdxl_output(pipe), rtol=1e-2, atol=1e-2
    )


def test_missing_alpha_means_r_unless_given(lora_pipeline, tmp_path):
    pipe = lora_pipeline(rank=RANK, alpha=ALPHA, text_encoders=False)
    source = _webui_file(pipe, tmp_path / "full.safetensors")
    no_alpha = tmp_path / "no_alpha.safetensors"
    save_file({k: v for k, v in load_file(source).items() if not k.endswith(".alpha")}, no_alpha)
    assert {m.alpha for m in read_lora(no_alpha).weights["unet"].values()} == {float(RANK)}
    assert {m.alpha for m in read_lora(no_alpha, alpha=8.0).weights["unet"].values()} == {8.0}
    assert {m.alpha for m in read_lora(source, alpha=8.0).weights["unet"].values()} == {
        ALPHA
    }  # file wins


def test_bad_inputs(lora_pipeline, tmp_path, caplog):
    pipe = lora_pipeline(rank=RANK, alpha=ALPHA, text_encoders=False)
    source = _webui_file(pipe, tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        convert(tmp_path / "nothing.safetensors", tmp_path / "out")
    not_lora = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(1)}, not_lora)
    with pytest.raises(ValueError, match="model.safetensors: not an SDXL LoRA"):
        convert(not_lora, tmp_path / "out")
    with pytest.raises(ValueError, match="overwrite the input"):
        convert(source, source, to="webui")
    with pytest.raises(ValueError, match="one .safetensors file"):
        convert(source, tmp_path / "out_dir", to="webui")
    assert cli_main(["convert", str(tmp_path / "nothing.safetensors"), str(tmp_path / "o")]) == 1
    assert "LoRA file not found" in caplog.text
