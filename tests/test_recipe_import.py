"""`animagine-lora config from-sd-scripts`: sd-scripts and kohya_ss recipes become our configs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import tomllib

from train.cli import main
from train.config import load_config
from train.recipe_import import LOSS_AND_NOISE, convert_recipe, read_recipe, schema_has

RECIPES = Path(__file__).resolve().parent / "data" / "recipes"


def _convert(tmp_path, *recipes, extra=()):
    out = tmp_path / "cfg" / "mine.toml"
    assert main(["config", "from-sd-scripts", *map(str, recipes), "-o", str(out), *extra]) == 0
    text = out.read_text(encoding="utf-8")
    return out, tomllib.loads(text), text


def test_realistic_sd_scripts_recipe(tmp_path, train_dataset, capsys):
    """A shared SDXL character recipe: dim/alpha, AdamW8bit with args, a restarting cosine,
    min-SNR, noise offset, caption shuffling with keep_tokens_separator, bucket settings, block
    rates/ranks, Huber and debiased; epochs become steps through the prepped dataset."""
    out, raw, text = _convert(tmp_path, RECIPES / "sdxl_lora.toml", extra=["--dataset", str(train_dataset)])
    config = load_config(out)  # what was written validates
    lora, opt, tc, data = raw["lora"], raw["optimizer"], raw["train"], raw["data"]
    assert config.model.source == "/models/animagine-xl-4.0-zero.safetensors" and raw["model"]["vae_dtype"] == "fp32"
    assert (lora["rank"], lora["alpha"], lora["dropout"], lora["rank_dropout"], lora["module_dropout"]) == (
        32, 16.0, 0.1, 0.1, 0.05)
    assert lora["train_text_encoder"] and (lora["text_encoder_1_lr"], lora["text_encoder_2_lr"]) == (5e-5, 2.5e-5)
    assert lora["block_lr"]["down"] == [1, 1, 1, 1, 0.5, 0.5, 1, 1, 1] and "mid" not in lora["block_lr"]
    # "sine+0.5": sin(pi/2 * i/8) + 0.5 (networks/lora.py get_block_lr_weight)
    assert lora["block_lr"]["up"] == pytest.approx([math.sin(math.pi * i / 16) + 0.5 for i in range(9)])
    assert lora["block_dims"] == {"down": [4, 4, 4, 8, 8, 4, 32, 32, 32], "mid": [32, 32, 32],
                                  "up": [32, 32, 16, 8, 8, 8, 4, 4, 4]}
    assert lora["block_alphas"]["up"] == [16, 16, 8, 4, 4, 4, 2, 2, 2]
    assert opt == {"lr": 1e-4, "name": "adamw8bit", "weight_decay": 0.1, "betas": [0.9, 0.99],
                   "scheduler": "cosine_with_restarts", "warmup_steps": 1}
    # train_helpers.ROWS: 10 draws per epoch, batch 4 -> 3 steps an epoch: 10 epochs, saved every 2.
    assert (tc["max_steps"], raw["output"]["save_every_n_steps"]) == (30, 6)
    assert (tc["batch_size"], tc["seed"], tc["noise_offset"], tc["min_snr_gamma"], tc["mixed_precision"]) == (
        4, 42, 0.0357, 5.0, "bf16")
    assert data == {"dataset": str(train_dataset), "shuffle_captions": True, "caption_dropout": 0.02,
                    "tag_dropout": 0.05, "flip": False, "max_chunks": 3}
    assert raw["output"]["dir"] == "/output/mira" and raw["output"]["name"] == "mira_v1"
    assert raw["output"]["log_with"] == ["tensorboard"] and raw["speed"]["sdpa"] is True
    listed = capsys.readouterr().out
    for line in ("[prep] keep_tokens_separator = '|||'", "[prep] min_bucket_reso = 256",
                 "[unmapped] clip_skip = 2", "[unmapped] lr_scheduler_num_cycles = 3",
                 "[unmapped] optimizer_args foreach = 'True'", "[unmapped] wandb_api_key = '(hidden)'"):
        assert line in listed and line in text
    assert "not-a-real-key" not in text + listed  # secrets are never copied
    notes = {n.option: n.value for n in convert_recipe({"hf_token": "hf_abc", "keep_tokens": 2}).notes}
    assert notes["hf_token"] == "(hidden)" and notes["keep_tokens"] == 2
    assert "save_precision" not in listed  # fp16 is what we write anyway


def test_minimal_recipe_gets_sd_scripts_defaults(tmp_path):
    recipe = tmp_path / "min.toml"
    recipe.write_text('network_module = "networks.lora"\nlearning_rate = 1e-4\n', encoding="utf-8")
    out, raw, _ = _convert(tmp_path, recipe)
    load_config(out)
    # sd-scripts' defaults where ours differ: dim 4, alpha 1, constant lr, AdamW's decay, 1600 steps,
    # and the text encoders trained at the same rate.
    assert (raw["lora"]["rank"], raw["lora"]["alpha"], raw["lora"]["train_text_encoder"]) == (4, 1.0, True)
    assert raw["optimizer"] == {"lr": 1e-4, "name": "adamw", "weight_decay": 0.01, "betas": [0.9, 0.999],
                                "scheduler": "constant"}
    assert raw["train"] == {"max_steps": 1600}
    assert raw["data"] == {"dataset": "prep"} and raw["output"] == {"dir": "runs/lora"}


def test_resolution_and_lycoris_details():
    tables = convert_recipe({"resolution": "1280,1280", "network_module": "lycoris.kohya", "algo": "loha",
                             "use_tucker": "True", "dora_wd": True, "conv_dim": 8, "network_dim": 8}).tables
    assert tables["data"]["resolution_scale"] == 1.25  # 1280² over the card's 1024²
    assert (tables["lora"]["type"], tables["lora"]["tucker"], tables["lora"]["preset"]) == ("loha", True,
                                                                                          "attn-mlp-conv")
    assert "dora" not in tables["lora"]
    # LoKr / LoHa take none of the plain-LoRA settings: they are listed instead of failing validation.
    conversion = convert_recipe({"network_module": "lycoris.kohya", "algo": "lokr", "rank_dropout": 0.1,
                                 "loraplus_lr_ratio": 4, "fp8_base": True, "lr_scheduler": "cosine_with_min_lr"})
    assert "rank_dropout" not in conversion.tables["lora"] and "quantize" not in conversion.tables.get("model", {})
    assert {n.option for n in conversion.notes} >= {"rank_dropout", "loraplus_lr_ratio", "fp8_base", "lr_scheduler"}
    assert conversion.tables["optimizer"]["scheduler"] == "cosine"
    assert convert_recipe({"resolution": 1024}).tables.get("data", {}).get("resolution_scale") is None


def test_kohya_ss_gui_json(tmp_path, capsys):
    out, raw, _ = _convert(tmp_path, RECIPES / "kohya_gui.json")
    load_config(out)
    lora, opt, tc = raw["lora"], raw["optimizer"], raw["train"]
    assert (lora["type"], lora["factor"], lora["decompose_both"], lora["preset"]) == ("lokr", 8, False, "attn-mlp-conv")
    assert (lora["rank"], lora["alpha"], lora["train_text_encoder"]) == (100000, 1.0, False)  # unet_lr only
    assert "dropout" not in lora and "rank_dropout" not in lora  # 0 = off, not written
    assert opt == {"lr": 1.0, "name": "prodigy", "weight_decay": 0.01, "betas": [0.9, 0.999], "scheduler": "cosine",
                   "warmup_steps": 120}  # lr_warmup 10 % of 1200 steps
    assert (tc["max_steps"], tc["batch_size"], tc["gradient_accumulation_steps"], tc["seed"]) == (1200, 2, 2, 1234)
    assert tc["max_grad_norm"] == 0.5  # from additional_parameters
    assert "noise_offset" not in tc  # noise_offset_type "Multires": the offset is not used
    assert raw["data"]["cache_text_outputs"] and raw["data"]["max_chunks"] == 2 and raw["data"]["flip"]
    listed = capsys.readouterr().out
    assert "[unmapped] optimizer_args d_coef = '2'" in listed and "decouple" not in listed  # ours is on
    assert "[prep] keep_tokens = '1'" in listed and "[unmapped] save_precision = 'bf16'" in listed
    assert "clip_skip" not in listed  # "1" is no skip


# To update when the loss/noise options are merged: then every option here must be mapped.
@pytest.mark.parametrize("option, value", [
    ("loss_type", "huber"), ("huber_c", 0.2), ("huber_schedule", "exponential"), ("debiased_estimation_loss", True),
    ("ip_noise_gamma", 0.1), ("ip_noise_gamma_random_strength", True), ("multires_noise_iterations", 6),
    ("multires_noise_discount", 0.3), ("noise_offset_random_strength", True), ("v_parameterization", True),
    ("zero_terminal_snr", True), ("huber_scale", 1.5), ("adaptive_noise_scale", 0.01),
    ("scale_v_pred_loss_like_noise_pred", True), ("v_pred_like_loss", 0.1),
])
def test_loss_and_noise_options_map_to_their_keys(tmp_path, option, value):
    key = LOSS_AND_NOISE[option]
    assert schema_has(key), key
    # What some of them need beside them, as a recipe has it.
    needs = {"adaptive_noise_scale": {"noise_offset": 0.05}, "huber_scale": {"huber_schedule": "constant"},
             "scale_v_pred_loss_like_noise_pred": {"v_parameterization": True},
             "zero_terminal_snr": {"v_parameterization": True}}.get(option, {})
    recipe, out = tmp_path / "r.toml", tmp_path / "out.toml"
    recipe.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in {option: value, **needs}.items()))
    assert main(["config", "from-sd-scripts", str(recipe), "-o", str(out)]) == 0  # written and valid
    conversion = convert_recipe({option: value, **needs})
    section, _, name = key.partition(".")
    assert (option, key) in conversion.mapped
    assert tomllib.loads(out.read_text())[section][name] == ("v_prediction" if option == "v_parameterization"
                                                             else value)


def test_dataset_config_subsets_and_conflicts(tmp_path):
    dataset_config = tmp_path / "dataset.toml"
    dataset_config.write_text("""
[general]
shuffle_caption = true
keep_tokens = 1
[[datasets]]
resolution = 1024
batch_size = 2
  [[datasets.subsets]]
  image_dir = "/data/a"
  num_repeats = 10
  flip_aug = true
  [[datasets.subsets]]
  image_dir = "/data/b"
  num_repeats = 3
  [[datasets.subsets]]
  image_dir = "/data/reg"
  is_reg = true
""", encoding="utf-8")
    options, conflicts = read_recipe([dataset_config])
    assert options["batch_size"] == 2
    assert (options["image_dir"], options["reg_image_dir"], options["flip_aug"]) == ("/data/a", "/data/reg", True)
    assert conflicts == ["image_dir", "num_repeats"]


@pytest.mark.parametrize("write, args, message", [
    (lambda d: (d / "r.toml").write_text("[x\n"), ["r.toml"], "r.toml: invalid TOML"),
    (lambda d: (d / "r.json").write_text('{"sdxl": false}'), ["r.json"], "sdxl: false: not an SDXL recipe"),
    (lambda d: (d / "r.toml").write_text('network_args = ["block_dims=4,4"]'), ["r.toml"],
     "block_dims: 23 values for SDXL (as sd-scripts), got 2"),
    (lambda d: (d / "r.toml").write_text('network_dim = "big"'), ["r.toml"], "network_dim: 'big' is not a number"),
    (lambda d: None, ["nope.toml"], "nope.toml: recipe not found"),
])
def test_bad_recipes_exit_2_with_one_line(tmp_path, caplog, write, args, message):
    write(tmp_path)
    out = tmp_path / "out.toml"
    assert main(["config", "from-sd-scripts", *[str(tmp_path / a) for a in args], "-o", str(out)]) == 2
    assert message in caplog.text and not out.exists()


def test_never_overwrites_a_recipe_or_an_existing_config(tmp_path, caplog):
    recipe = tmp_path / "r.toml"
    shutil.copy(RECIPES / "sdxl_lora.toml", recipe)
    before = recipe.read_bytes()
    assert main(["config", "from-sd-scripts", str(recipe), "-o", str(tmp_path / "r.toml")]) == 2
    assert "is one of the recipes" in caplog.text and recipe.read_bytes() == before
    existing = tmp_path / "mine.toml"
    existing.write_text("# mine\n")
    assert main(["config", "from-sd-scripts", str(recipe), "-o", str(existing)]) == 2
    assert "exists; pass --force" in caplog.text and existing.read_text() == "# mine\n"
    assert main(["config", "from-sd-scripts", str(recipe), "-o", str(existing), "--force"]) == 0
    load_config(existing)
