"""LoRA export (train.lora.export): every rule of docs/lora-formats.md, checked statically and by reloading."""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from datetime import datetime, timezone

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils import logging as diffusers_logging
from safetensors import safe_open
from safetensors.torch import load_file

from train.lora.adapters import lora_modules
from train.lora.export import (
    REQUIRED_METADATA,
    kohya_module_name,
    save_diffusers_lora,
    save_webui_lora,
    webui_metadata,
)

RANK, ALPHA = 4, 2.0  # alpha != r on purpose: a loader that assumes alpha = r gets the scale wrong


def _metadata(**overrides):
    args = {
        "rank": RANK,
        "alpha": ALPHA,
        "output_name": "miku_v1",
        "resolution": 1024,
        "tag_frequency": {"hatsune miku": 12, "1girl": 12, "smile": 5},
        "comment": "test run",
        "date": datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
    }
    return webui_metadata(**{**args, **overrides})


def _save_all(pipe, path, **kwargs):
    save_webui_lora(
        path,
        unet=pipe.unet,
        text_encoder=pipe.text_encoder,
        text_encoder_2=pipe.text_encoder_2,
        metadata=_metadata(),
        **kwargs,
    )


@contextmanager
def _no_load_complaints(caplog):
    """Fail on any diffusers/PEFT warning about keys that were not loaded or were unexpected."""
    diffusers_logging.enable_propagation()
    try:
        with warnings.catch_warnings(record=True) as caught, caplog.at_level("WARNING"):
            warnings.simplefilter("always")
            yield
        messages = [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]
        complaints = [m for m in messages if "key" in m.lower() or "not loaded" in m.lower()]
        assert not complaints, complaints
    finally:
        diffusers_logging.disable_propagation()


def _fresh(tiny_model):
    return StableDiffusionXLPipeline.from_pretrained(tiny_model.diffusers_dir)


@pytest.mark.parametrize("preset", ["attn-mlp", "attn-mlp-conv"])
def test_webui_file_static_rules(lora_pipeline, tmp_path, preset):
    pipe = lora_pipeline(preset=preset, rank=RANK, alpha=ALPHA)
    path = tmp_path / "miku.safetensors"
    _save_all(pipe, path)
    tensors = load_file(path)
    expected_modules = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component)
        for module_path, module in lora_modules(model).items():
            expected_modules[kohya_module_name(component, module_path)] = module.base_layer
    names = {key.split(".", 1)[0] for key in tensors}
    assert names == set(expected_modules)
    for key, value in tensors.items():
        name, suffix = key.split(".", 1)
        assert name.startswith(("lora_unet_", "lora_te1_", "lora_te2_")), key
        assert suffix in ("lora_down.weight", "lora_up.weight", "alpha"), key
        base = expected_modules[name]
        if suffix == "alpha":
            assert value.ndim == 0 and value.item() == ALPHA, key
        elif isinstance(base, torch.nn.Conv2d):
            kh, kw = base.kernel_size
            expect = (
                (RANK, base.in_channels, kh, kw)
                if suffix == "lora_down.weight"
                else (base.out_channels, RANK, 1, 1)
            )
            assert tuple(value.shape) == expect, key
        else:
            expect = (
                (RANK, base.in_features)
                if suffix == "lora_down.weight"
                else (base.out_features, RANK)
            )
            assert tuple(value.shape) == expect, key
    assert all(
        f"{n}.{s}" in tensors
        for n in names
        for s in ("lora_down.weight", "lora_up.weight", "alpha")
    )
    # text encoder names keep the checkpoint's `text_model_` level; 2 layers x 6 projections each
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in tensors
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc2.alpha" in tensors
    assert (
        sum(n.startswith("lora_te1_") for n in names)
        == sum(n.startswith("lora_te2_") for n in names)
        == 12
    )
    if preset.endswith("conv"):
        down = tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"]
        up = tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"]
        assert down.shape == (RANK, 32, 3, 3) and up.shape == (32, RANK, 1, 1)
    # weights in the default file dtype; alpha stays fp32 so non-integer alphas are exact
    assert {v.dtype for k, v in tensors.items() if k.endswith("weight")} == {torch.float16}
    assert {v.dtype for k, v in tensors.items() if k.endswith("alpha")} == {torch.float32}

    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    assert set(REQUIRED_METADATA) <= set(metadata)
    assert metadata["ss_base_model_version"].startswith("sdxl_")
    assert metadata["ss_network_module"] == "networks.lora"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "2.0")
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["modelspec.sai_model_spec"] == "1.0.0"
    assert metadata["modelspec.resolution"] == "1024x1024"
    assert metadata["modelspec.prediction_type"] == "epsilon"
    assert metadata["modelspec.date"] == "2025-01-02T03:04:05+00:00"
    assert json.loads(metadata["ss_tag_frequency"]) == {
        "miku_v1": {"hatsune miku": 12, "1girl": 12, "smile": 5}
    }


@pytest.mark.parametrize("preset", ["attn-mlp", "attn-mlp-conv"])
def test_webui_file_reloads_into_fresh_pipeline(
    lora_pipeline, tiny_model, sdxl_output, tmp_path, caplog, preset
):
    pipe = lora_pipeline(preset=preset, rank=RANK, alpha=ALPHA)
    trained = sdxl_output(pipe)
    path = tmp_path / "miku.safetensors"
    _save_all(pipe, path, dtype=torch.float32)
    # diffusers' kohya conversion silently drops names it cannot map: check every tensor survives it
    converted, alphas = StableDiffusionXLPipeline.lora_state_dict(str(path))
    n_modules = len(load_file(path)) // 3
    assert len(converted) == 2 * n_modules and len(alphas) == n_modules
    assert set(alphas.values()) == {ALPHA}
    fresh = _fresh(tiny_model)
    base = sdxl_output(fresh)
    assert (trained - base).abs().max() > 1e-2  # the LoRA matters, so the comparison can fail
    with _no_load_complaints(caplog):
        fresh.load_lora_weights(str(path))
    torch.testing.assert_close(sdxl_output(fresh), trained, rtol=1e-5, atol=1e-5)


def test_fp16_file_matches_to_half_precision(lora_pipeline, tiny_model, sdxl_output, tmp_path):
    pipe = lora_pipeline(rank=RANK, alpha=ALPHA)
    path = tmp_path / "miku.safetensors"
    _save_all(pipe, path)  # default fp16
    fresh = _fresh(tiny_model)
    fresh.load_lora_weights(str(path))
    torch.testing.assert_close(sdxl_output(fresh), sdxl_output(pipe), rtol=1e-2, atol=1e-2)


def test_sd_scripts_sgm_block_names_import(
    lora_pipeline, tiny_model, sdxl_output, tmp_path, caplog
):
    """A kohya file with original SGM UNet names (what sd-scripts writes) loads to the same model."""
    pipe = lora_pipeline(rank=RANK, alpha=ALPHA)
    sgm_path = tmp_path / "sgm_names.safetensors"
    _save_all(pipe, sgm_path, dtype=torch.float32, block_names="sgm")
    renamed = load_file(sgm_path)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in renamed
    assert "lora_unet_output_blocks_3_1_proj_out.alpha" in renamed
    assert not any(
        k.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_unet_mid_block"))
        for k in renamed
    )
    fresh = _fresh(tiny_model)
    with _no_load_complaints(caplog):
        fresh.load_lora_weights(str(sgm_path))
    torch.testing.assert_close(sdxl_output(fresh), sdxl_output(pipe), rtol=1e-5, atol=1e-5)


def test_diffusers_format_round_trip_keeps_alpha(
    lora_pipeline, tiny_model, sdxl_output, tmp_path, caplog
):
    pipe = lora_pipeline(preset="attn-mlp-conv", rank=RANK, alpha=ALPHA)
    out_dir = tmp_path / "diffusers_lora"
    out_dir.mkdir()
    (out_dir / "README.md").write_text("user notes")
    save_diffusers_lora(
        out_dir, unet=pipe.unet, text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2
    )
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "README.md",
        "pytorch_lora_weights.safetensors",
    ]
    with safe_open(out_dir / "pytorch_lora_weights.safetensors", "pt") as f:
        adapter = json.loads(f.metadata()["lora_adapter_metadata"])
        keys = list(f.keys())
    assert adapter["unet.lora_alpha"] == ALPHA and adapter["unet.r"] == RANK
    assert any(k.startswith("unet.") and k.endswith("lora_A.weight") for k in keys)
    fresh = _fresh(tiny_model)
    with _no_load_complaints(caplog):
        fresh.load_lora_weights(str(out_dir))
    torch.testing.assert_close(sdxl_output(fresh), sdxl_output(pipe), rtol=1e-5, atol=1e-5)


def test_dora_diffusers_round_trip_and_webui_refusal(
    lora_pipeline, tiny_model, sdxl_output, tmp_path
):
    pipe = lora_pipeline(preset="attn", rank=RANK, alpha=ALPHA, dora=True, text_encoders=False)
    with torch.no_grad():  # move the magnitudes off their init so a dropped DoRA vector shows
        for module in lora_modules(pipe.unet).values():
            module.lora_magnitude_vector["default"].weight.mul_(1.5)
    with pytest.raises(ValueError, match="DoRA export to the WebUI"):
        save_webui_lora(tmp_path / "dora.safetensors", unet=pipe.unet, metadata=_metadata())
    assert not (tmp_path / "dora.safetensors").exists()
    save_diffusers_lora(tmp_path / "dora", unet=pipe.unet)
    fresh = _fresh(tiny_model)
    fresh.load_lora_weights(str(tmp_path / "dora"))
    torch.testing.assert_close(sdxl_output(fresh), sdxl_output(pipe), rtol=1e-5, atol=1e-5)


def test_bad_metadata_and_atomic_write(lora_pipeline, tmp_path):
    pipe = lora_pipeline(text_encoders=False)
    path = tmp_path / "keep.safetensors"
    path.write_bytes(b"previous file")
    bad = {k: v for k, v in _metadata().items() if k != "ss_tag_frequency"}
    with pytest.raises(ValueError, match="ss_tag_frequency"):
        save_webui_lora(path, unet=pipe.unet, metadata=bad)
    with pytest.raises(ValueError, match="sdxl_"):
        save_webui_lora(
            path, unet=pipe.unet, metadata={**_metadata(), "ss_base_model_version": "sd_v1"}
        )
    with pytest.raises(ValueError, match="extra keys"):
        _metadata(extra={"steps": 3})
    assert path.read_bytes() == b"previous file"
    save_webui_lora(
        path, unet=pipe.unet, metadata=_metadata(extra={"ss_steps": 100, "ss_num_train_images": 7})
    )
    with safe_open(path, "pt") as f:
        assert f.metadata()["ss_steps"] == "100"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.safetensors"]  # no temp files left
