"""Base-model loading (train.model.loading), the tiny SDXL (train.model.tiny) and the shipped SDXL configs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors import safe_open

from train.model.loading import load_base_model, vae_fingerprint
from train.model.tiny import build_tiny_model
from train.names import SDXL_CONFIG_DIR


def test_shipped_unet_config_is_sdxl_base():
    """The UNet config instantiates to SDXL 1.0 base's exact parameter count."""
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(SDXL_CONFIG_DIR / "unet")
        )
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684


def test_tiny_model_is_sdxl_shaped(tiny_model):
    index = json.loads((tiny_model.diffusers_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    unet_config = json.loads((tiny_model.diffusers_dir / "unet" / "config.json").read_text())
    assert unet_config["down_block_types"] == [
        "DownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
    ]
    assert unet_config["addition_embed_type"] == "text_time"
    with safe_open(tiny_model.single_file, "pt") as f:
        keys = set(f.keys())
    for key in (
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
        "model.diffusion_model.output_blocks.2.2.conv.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
        "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight",
        "conditioner.embedders.1.model.text_projection",
    ):
        assert key in keys, key


def test_tiny_build_is_idempotent_and_refuses_foreign_folder(tiny_model, tmp_path, clip_bpe_path):
    root = tiny_model.diffusers_dir.parent
    assert build_tiny_model(root, clip_bpe_path) == tiny_model
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not a tiny model build"):
        build_tiny_model(tmp_path / "other", clip_bpe_path)
    assert (tmp_path / "other" / "x.txt").read_text() == "user data"


def _outputs(model, generator_seed: int = 0):
    """UNet, VAE and both text encoders run on fixed inputs, for comparing two loads."""
    g = torch.Generator().manual_seed(generator_seed)
    ids = model.tokenizer(
        ["1girl, solo, smile"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    ids2 = model.tokenizer_2(
        ["1girl, solo, smile"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    te1 = model.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    te2 = model.text_encoder_2(ids2, output_hidden_states=True)
    context = torch.cat([te1, te2.hidden_states[-2]], dim=-1)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    unet = model.unet(
        latents,
        500,
        encoder_hidden_states=context,
        added_cond_kwargs={"text_embeds": te2.text_embeds, "time_ids": time_ids},
    ).sample
    image = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    vae = model.vae.encode(image).latent_dist.mean
    return {"te1": te1, "te2": te2.text_embeds, "unet": unet, "vae": vae}


@torch.no_grad()
def test_diffusers_folder_and_single_file_load_identically(tiny_model):
    from_folder = load_base_model(str(tiny_model.diffusers_dir), weight_dtype=torch.float32)
    from_file = load_base_model(
        str(tiny_model.single_file),
        config_dir=str(tiny_model.config_dir),
        tokenizer_dir=str(tiny_model.tokenizer_dir),
        weight_dtype=torch.float32,
    )
    a, b = _outputs(from_folder), _outputs(from_file)
    for name in a:
        assert a[name].abs().sum() > 0, name
        # Same weights; kernels may pick another summation order for differently strided tensors.
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        folder_sd = getattr(from_folder, component).state_dict()
        file_sd = getattr(from_file, component).state_dict()
        assert folder_sd.keys() == file_sd.keys(), component
        for key in folder_sd:
            assert torch.equal(folder_sd[key], file_sd[key]), f"{component}.{key}"
    assert from_folder.vae_fingerprint == from_file.vae_fingerprint
    # The pipeline the users sample with agrees on the same folder.
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model.diffusers_dir)
    torch.testing.assert_close(pipe.unet.conv_in.weight, from_folder.unet.conv_in.weight)


def test_default_dtypes_frozen_and_scheduler(tiny_model):
    model = load_base_model(str(tiny_model.diffusers_dir))
    assert (
        model.unet.dtype == model.text_encoder.dtype == model.text_encoder_2.dtype == torch.bfloat16
    )
    assert model.vae.dtype == torch.float32
    for module in (model.unet, model.vae, model.text_encoder, model.text_encoder_2):
        assert not any(p.requires_grad for p in module.parameters())
        assert not module.training
    assert isinstance(model.noise_scheduler, DDPMScheduler)
    assert model.prediction_type == "epsilon"
    assert model.noise_scheduler.config.beta_schedule == "scaled_linear"
    assert model.noise_scheduler.config.num_train_timesteps == 1000
    assert model.tokenizer.pad_token_id == 49407 and model.tokenizer_2.pad_token_id == 0


def test_v_prediction_read_from_scheduler_config(tiny_model, tmp_path):
    copy = tmp_path / "vpred"
    shutil.copytree(tiny_model.diffusers_dir, copy)
    config_path = copy / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "prediction_type": "v_prediction"}))
    model = load_base_model(str(copy), weight_dtype=torch.float32)
    assert model.prediction_type == "v_prediction"
    assert model.noise_scheduler.config.prediction_type == "v_prediction"


def test_vae_fingerprint_tracks_weights(tiny_model):
    model = load_base_model(str(tiny_model.diffusers_dir), weight_dtype=torch.float32)
    before = vae_fingerprint(model.vae)
    assert before == model.vae_fingerprint
    with torch.no_grad():
        model.vae.decoder.conv_out.bias[0] += 1e-3
    assert vae_fingerprint(model.vae) != before
    assert vae_fingerprint(model.vae.to(torch.bfloat16)) != before


def test_bad_inputs_fail_clearly(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="fp16"):
        load_base_model(str(tiny_model.diffusers_dir), vae_dtype=torch.float16)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_base_model(str(tmp_path / "missing.safetensors"))
    with pytest.raises(FileNotFoundError, match="no unet/"):
        load_base_model(str(tmp_path))
    with pytest.raises(OSError, match="tried: .*nowhere"):
        load_base_model(str(tiny_model.single_file), tokenizer_dir=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="component config missing"):
        load_base_model(
            str(tiny_model.single_file),
            config_dir=str(tmp_path),
            tokenizer_dir=str(tiny_model.tokenizer_dir),
        )


def test_tiny_model_build_follows_the_umask(tiny_model):
    """The build folder comes from mkdtemp (0700) and safetensors writes 0600: both must end as the
    umask says, like every other output (docs/files-and-safety.md)."""
    import os
    import stat

    from captioning.outputs import normal_mode

    root = tiny_model.single_file.parent
    assert stat.S_IMODE(os.stat(root).st_mode) == normal_mode(folder=True)
    assert stat.S_IMODE(os.stat(tiny_model.single_file).st_mode) == normal_mode()
