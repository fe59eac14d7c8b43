"""`train CONFIG --check` and `cache --check`: what the run would do, read without loading a model."""

from __future__ import annotations

import pytest
from train_helpers import write_config

from train.cli import main
from train.runtime.run_dir import RunLock


@pytest.fixture
def config(tiny_model, train_dataset, tmp_path):
    def make(run_dir=None, **sections):
        return write_config(tmp_path / "c.toml", model_dir=tiny_model.diffusers_dir, dataset=train_dataset,
                            run_dir=run_dir or tmp_path / "run", **sections)

    return make


def test_check_says_what_a_fresh_run_would_do(config, capsys, tiny_model, train_dataset, tmp_path):
    path = config(validation={"every_n_steps": 3})
    assert main(["train", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert f"{path}: valid" in out
    assert f"{tiny_model.diffusers_dir}: diffusers folder; weights fp32, VAE fp32" in out
    # train_helpers.ROWS: 5 train rows (repeats 2 each), 2 buckets, 1 val row.
    assert f"{train_dataset}: 5 train rows (10 draws per epoch with repeats, 2 buckets), 1 val rows" in out
    assert "6 x effective batch 2 (batch 1 x accumulation 2 x 1 process) = 12 images, about 1.2 epochs" in out
    assert "lora rank 2 alpha 2 on the UNet's attn-mlp modules" in out
    assert f"{tmp_path / 'run'}: new folder; a fresh run, LoRA as test_lora.safetensors" in out
    assert "validation    every 3 steps" in out and "problem" not in out
    assert f"prediction    epsilon on the model's noise schedule (the scheduler config of {tiny_model.diffusers_dir} " \
           "says epsilon)" in out
    assert "loss          l2 (MSE), min-SNR gamma 5, noise offset 0.05; validation loss: MSE" in out
    assert not (tmp_path / "run").exists()  # nothing written


def test_check_names_the_prediction_type_its_reason_and_the_loss(config, capsys, tiny_model, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    marked = tmp_path / "vpred.safetensors"
    save_file({**load_file(tiny_model.single_file), "v_pred": torch.zeros(0), "ztsnr": torch.zeros(0)}, marked)
    path = config(model={"source": str(marked), "config_dir": str(tiny_model.config_dir)},
                  train={"loss_type": "huber", "debiased_estimation": True, "multires_noise_iterations": 6,
                         "ip_noise_gamma": 0.1, "noise_offset_random_strength": True})
    assert main(["train", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "v_prediction on zero terminal SNR (the checkpoint carries the 'v_pred' and 'ztsnr' keys)" in out
    assert ("huber (c 0.1, snr schedule), min-SNR gamma 5, debiased estimation, noise offset 0.05 (random strength), "
            "pyramid noise 6 levels, discount 0.3, input perturbation 0.1; validation loss: MSE") in out
    path = config(model={"prediction_type": "epsilon"}, train={"zero_terminal_snr": False})
    assert main(["train", str(path), "--check"]) == 0
    path = config(train={"zero_terminal_snr": True})  # the tiny model is epsilon
    assert main(["train", str(path), "--check"]) == 2
    assert "problem: model: zero terminal SNR needs a v-prediction model" in capsys.readouterr().out
    path = config(train={"scale_v_pred_loss_like_noise_pred": True, "adaptive_noise_scale": 0.01})
    assert main(["train", str(path), "--check"]) == 2
    out = capsys.readouterr().out
    assert "noise offset 0.05 + 0.01 x |latent mean|" in out and "v loss scaled like an epsilon loss" in out
    assert "problem: train.scale_v_pred_loss_like_noise_pred needs a v-prediction model, not epsilon" in out


def test_check_reports_what_would_stop_the_run(config, capsys, trained_run, tmp_path):
    assert main(["train", str(config(run_dir=trained_run)), "--check"]) == 2
    out = capsys.readouterr().out
    assert "checkpoints at steps 4, 6" in out and "holds another run; continue it with --resume latest" in out
    assert main(["train", str(config(run_dir=trained_run)), "--check", "--resume", "latest"]) == 0
    assert "resumes from step 6" in capsys.readouterr().out

    empty = tmp_path / "empty"
    (empty / "dataset").mkdir(parents=True)
    path = write_config(tmp_path / "bad.toml", model_dir=tmp_path / "missing", dataset=empty, run_dir=tmp_path / "r",
                        validation={"every_n_steps": 2})
    assert main(["train", str(path), "--check"]) == 2
    out = capsys.readouterr().out
    assert f"model.source {tmp_path / 'missing'}: model file or folder not found" in out
    assert f"data.dataset: {empty / 'dataset'}: no prepped dataset here" in out


def test_check_sees_a_run_in_progress(config, capsys, tmp_path):
    run_dir = tmp_path / "busy"
    run_dir.mkdir()
    (run_dir / "log.jsonl").write_text("{}\n")
    lock = RunLock(run_dir)
    try:
        assert main(["train", str(config(run_dir=run_dir)), "--check", "--overwrite"]) == 2
    finally:
        lock.release()
    assert "another training run (pid" in capsys.readouterr().out


def test_cache_check_counts_latents(config, capsys):
    assert main(["cache", str(config(data={"flip": True})), "--check"]) == 0
    out = capsys.readouterr().out
    assert "6 rows (5 train, 1 val)" in out and "12 at resolution scale 1 (and flipped)" in out


def test_check_lists_recipe_rates_blocks_and_dropouts(config, capsys):
    path = config(lora={"rank": 2, "alpha": 2, "train_text_encoder": True, "text_encoder_lr": 1e-5,
                        "text_encoder_2_lr": 5e-6, "block_lr.down": 0.5, "block_dims.up": [2, 2, 2, 0, 0, 0, 4, 4, 4],
                        "rank_dropout": 0.1, "module_dropout": 0.05}, data={"resolution_scale": 1.5})
    assert main(["train", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "lr 1e-05 (CLIP ViT-L), 5e-06 (OpenCLIP bigG)" in out
    assert "lr x down 0.5; rank up [2, 2, 2, 0, 0, 0, 4, 4, 4] (blocks at rank or lr 0 have no modules)" in out
    assert "rank 0.1, module 0.05 (these layers keep PEFT's unfused forward)" in out
    # train_helpers.ROWS' largest bucket 64x96 at 1.5: 64x128 on the 64 grid (aspect kept as near as it goes).
    assert "training size" in out and "buckets up to 64x128" in out and "GiB of activations per image" in out
