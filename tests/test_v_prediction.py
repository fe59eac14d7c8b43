"""v-prediction models: detection (scheduler config, a single file's `v_pred` / `ztsnr` keys), the
config's overrides, sampling on a v-prediction tiny SDXL, and one tiny training run on it."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from train_helpers import train_in_process, write_config

from train import diffusion
from train.generate.sampling import SampleSettings, build_pipeline, generate
from train.lora.export import trained_prediction_type
from train.model.loading import load_base_model
from train.model.prediction import Prediction, detect, resolve, single_file_markers


@pytest.fixture(scope="module")
def vpred_folder(tiny_model, tmp_path_factory):
    """The tiny SDXL as a diffusers folder whose scheduler says v-prediction on a zero-terminal-SNR schedule."""
    folder = tmp_path_factory.mktemp("vpred") / "model"
    shutil.copytree(tiny_model.diffusers_dir, folder)
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True}))
    return folder


# ---------------------------------------------------------------- detection


def test_detect_reads_marker_keys_before_the_scheduler_config():
    eps_config = {"prediction_type": "epsilon"}
    both = detect(eps_config, origin="configs/scheduler", markers={"v_pred", "ztsnr"})
    assert (both.prediction_type, both.zero_terminal_snr) == ("v_prediction", True)
    assert "'v_pred' and 'ztsnr' keys" in both.reason
    only_v = detect(eps_config, origin="configs/scheduler", markers={"v_pred"})
    assert (only_v.prediction_type, only_v.zero_terminal_snr) == ("v_prediction", False)
    # ComfyUI reads `ztsnr` only together with `v_pred`
    ztsnr_alone = detect(eps_config, origin="configs/scheduler", markers={"ztsnr"})
    assert (ztsnr_alone.prediction_type, ztsnr_alone.zero_terminal_snr) == ("epsilon", False)
    assert "no 'v_pred' key" in ztsnr_alone.reason
    folder = detect({"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}, origin="the scheduler config of M")
    assert (folder.prediction_type, folder.zero_terminal_snr) == ("v_prediction", True)
    assert detect({}, origin="x").prediction_type == "epsilon"
    with pytest.raises(ValueError, match="'sample' is not supported"):
        detect({"prediction_type": "sample"}, origin="x")


def test_resolve_applies_the_config_and_refuses_zero_snr_on_epsilon(caplog):
    detected = Prediction("epsilon", False, "the scheduler config of M says epsilon")
    assert resolve(detected) == detected
    with caplog.at_level(logging.WARNING):
        forced = resolve(detected, "v_prediction", True)
    assert (forced.prediction_type, forced.zero_terminal_snr) == ("v_prediction", True)
    assert forced.reason == "model.prediction_type = 'v_prediction'; train.zero_terminal_snr = true"
    assert "overrides what the model says" in caplog.text
    off = resolve(Prediction("v_prediction", True, "keys"), zero_terminal_snr=False)
    assert (off.zero_terminal_snr, off.reason) == (False, "keys; train.zero_terminal_snr = false")
    with pytest.raises(ValueError, match="zero terminal SNR needs a v-prediction model"):
        resolve(detected, zero_terminal_snr=True)


def test_single_file_marker_keys_choose_v_prediction_and_the_rescaled_schedule(tiny_model, tmp_path):
    weights = load_file(tiny_model.single_file)
    marked = tmp_path / "vpred.safetensors"
    save_file({**weights, "v_pred": torch.zeros(0), "ztsnr": torch.zeros(0)}, marked)
    assert single_file_markers(marked) == {"v_pred", "ztsnr"}
    assert single_file_markers(tiny_model.single_file) == set()
    model = load_base_model(str(marked), config_dir=str(tiny_model.config_dir), weight_dtype=torch.float32)
    assert model.prediction_type == "v_prediction" and model.prediction.zero_terminal_snr
    assert model.noise_scheduler.config.prediction_type == "v_prediction"
    abar = model.noise_scheduler.alphas_cumprod
    assert abar[-1].item() == 0.0
    plain = DDPMScheduler.from_pretrained(tiny_model.diffusers_dir, subfolder="scheduler").alphas_cumprod
    torch.testing.assert_close(abar, diffusion.zero_terminal_snr(plain).float(), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- sampling


def test_sampling_a_v_prediction_model_uses_its_type_and_sigmas(vpred_folder):
    model = load_base_model(str(vpred_folder), weight_dtype=torch.float32)
    assert model.prediction_type == "v_prediction" and model.prediction.zero_terminal_snr
    pipe = build_pipeline(model)
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.scheduler.config.rescale_betas_zero_snr
    images = {}
    for sampler in ("euler_ancestral", "diffusers-euler-a"):
        settings = SampleSettings(width=64, height=64, steps=2, seeds=[0], batch_size=1, sampler=sampler)
        image = generate(pipe, ["1girl, smile"], settings, progress=False)[0][0]
        images[sampler] = np.asarray(image, dtype=np.float32)
        assert image.size == (64, 64) and np.isfinite(images[sampler]).all()
    # Read as epsilon, the same weights give another image: the prediction type reached the sampler.
    eps_pipe = build_pipeline(load_base_model(str(vpred_folder), weight_dtype=torch.float32,
                                              prediction_type="epsilon", zero_terminal_snr=False))
    settings = SampleSettings(width=64, height=64, steps=2, seeds=[0], batch_size=1)
    eps_image = np.asarray(generate(eps_pipe, ["1girl, smile"], settings, progress=False)[0][0], dtype=np.float32)
    assert np.abs(eps_image - images["euler_ancestral"]).mean() > 1.0


# ---------------------------------------------------------------- training


@pytest.mark.heavy
def test_tiny_run_on_a_v_prediction_model_trains_validates_samples_and_records_why(vpred_folder, train_dataset,
                                                                                    tiny_model, tmp_path, caplog):
    config = write_config(tmp_path / "c.toml", model_dir=vpred_folder, dataset=train_dataset, run_dir=tmp_path / "run",
                          train={"max_steps": 2, "gradient_accumulation_steps": 1, "debiased_estimation": True,
                                 "loss_type": "smooth_l1"},
                          validation={"every_n_steps": 2},
                          sample={"every_n_steps": 2, "sample_model": "train", "size": "64x64", "steps": 2,
                                  "seeds": [0]},
                          output={"save_every_n_steps": 2, "log_with": []})
    result = train_in_process(config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "prediction_type=v_prediction, zero_terminal_snr=true (the scheduler config of" in result.stderr
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(line[key]) for line in lines for key in ("loss", "val_loss") if key in line)
    assert any("val_loss" in line for line in lines)
    assert (tmp_path / "run" / "samples" / "step-000002.png").is_file()
    with safe_open(str(tmp_path / "run" / "test_lora.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["modelspec.prediction_type"] == "v"  # the SAI model spec's name
    assert metadata["ss_v_parameterization"] == "True" and metadata["ss_zero_terminal_snr"] == "True"
    assert metadata["ss_prediction_type_reason"].startswith("the scheduler config of")
    assert metadata["ss_loss_type"] == "smooth_l1" and metadata["ss_debiased_estimation"] == "True"

    # Sampled on an epsilon model, the LoRA's header gives the mismatch away.
    from train.cli import main

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="train.cli.sample"):
        assert main(["sample", "--lora", str(tmp_path / "run" / "test_lora.safetensors"), "--model",
                     str(tiny_model.diffusers_dir), "--size", "64x64", "--steps", "1", "--no-reorder", "--device",
                     "cpu", "1girl", "-o", str(tmp_path / "samples")]) == 0
    assert "was trained on a v_prediction model, the model loaded predicts epsilon" in caplog.text


def test_trained_prediction_type_reads_modelspec_or_sd_scripts_flag():
    assert trained_prediction_type({"modelspec.prediction_type": "v"}) == "v_prediction"
    assert trained_prediction_type({"modelspec.prediction_type": "epsilon"}) == "epsilon"
    assert trained_prediction_type({"ss_v_parameterization": "True"}) == "v_prediction"
    assert trained_prediction_type({"ss_v_parameterization": "False"}) == "epsilon"
    assert trained_prediction_type({}) is None


def test_sample_command_reads_the_prediction_type_from_the_model_or_the_options(vpred_folder, tmp_path, caplog):
    from train.cli import main

    common = ["sample", "--model", str(vpred_folder), "--size", "64x64", "--steps", "1", "--no-reorder",
              "--device", "cpu", "1girl"]
    with caplog.at_level(logging.INFO, logger="train.model.loading"):
        assert main([*common, "-o", str(tmp_path / "auto")]) == 0
    assert "prediction_type=v_prediction, zero_terminal_snr=true (the scheduler config of" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="train.model.loading"):
        assert main([*common, "--prediction-type", "epsilon", "--zero-terminal-snr", "false",
                     "-o", str(tmp_path / "eps")]) == 0
    assert ("prediction_type=epsilon, zero_terminal_snr=false (model.prediction_type = 'epsilon'; "
            "train.zero_terminal_snr = false)") in caplog.text
    assert main([*common, "--prediction-type", "epsilon", "-o", str(tmp_path / "bad")]) == 2
    assert "zero terminal SNR needs a v-prediction model" in caplog.text


def test_sample_grids_on_an_opt_model_of_another_prediction_type_warn(tiny_model, vpred_folder, tmp_path, caplog):
    from train.config import SampleConfig
    from train.generate.hook import SampleGrids

    train_model = load_base_model(str(tiny_model.diffusers_dir), weight_dtype=torch.float32)
    config = SampleConfig(every_n_steps=1, sample_model="opt", opt_model=str(vpred_folder), prompts=["1girl"])
    with caplog.at_level(logging.WARNING, logger="train.generate.hook"):
        SampleGrids(config, train_model=train_model, out_dir=tmp_path)
    assert (f"sample.opt_model {vpred_folder} is v_prediction with zero terminal SNR, the model being trained "
            "epsilon") in caplog.text


def test_eval_warns_when_a_lora_was_trained_for_the_other_prediction_type(tmp_path):
    from safetensors.torch import save_file

    from train.lora.export import mismatched_prediction, prediction_mismatch

    v_lora, plain = tmp_path / "v.safetensors", tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(v_lora), metadata={"modelspec.prediction_type": "v"})
    save_file({"x": torch.zeros(1)}, str(plain))
    assert mismatched_prediction(v_lora, "epsilon") == "v_prediction"
    assert mismatched_prediction(v_lora, "v_prediction") is None and mismatched_prediction(plain, "epsilon") is None
    loras = [v_lora, v_lora, plain]  # eval's checkpoints
    assert (f"{v_lora} (and 1 more) was trained on a v_prediction model, the model loaded predicts epsilon"
            in prediction_mismatch(loras, "epsilon"))
    assert prediction_mismatch(loras, "v_prediction") is None
