"""train.config: shipped configs validate; wrong keys give one clear line each."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from train.config import ConfigError, load_config, parse_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))
MINIMAL = {"data": {"dataset": "prep"}, "train": {"max_steps": 10}, "output": {"dir": "run"}}


def _training_configs():
    # configs/ may also hold sampling/eval configs (other tools); those have no [train] table.
    return [p for p in CONFIGS if "[train]" in p.read_text(encoding="utf-8")]


@pytest.mark.parametrize("path", _training_configs(), ids=lambda p: p.name)
def test_every_shipped_training_config_validates(path):
    config = load_config(path)
    assert Path(config.output.dir).is_absolute()
    assert Path(config.data.dataset).is_absolute()


def test_shipped_training_configs_exist():
    names = {p.name for p in _training_configs()}
    assert {"tiny.toml", "zero_lora.toml"} <= names


def test_unknown_key_suggests_the_right_one(tmp_path):
    raw = {**MINIMAL, "train": {"max_steps": 10, "lerning_rate": 1e-4, "batch_sise": 2}}
    with pytest.raises(ConfigError) as err:
        parse_config(raw, "my.toml", tmp_path)
    lines = str(err.value).splitlines()
    assert "my.toml: train.batch_sise: unknown key (did you mean 'batch_size'?)" in lines
    assert any(line.startswith("my.toml: train.lerning_rate: unknown key") for line in lines)
    assert len(lines) == 2


def test_unknown_section_and_wrong_type_name_the_key(tmp_path):
    raw = {**MINIMAL, "optimiser": {}, "train": {"max_steps": "many"}, "lora": {"rank": 0}}
    with pytest.raises(ConfigError) as err:
        parse_config(raw, "my.toml", tmp_path)
    text = str(err.value)
    assert "my.toml: optimiser: unknown key (did you mean 'optimizer'?)" in text
    assert "my.toml: train.max_steps: Input should be a valid integer" in text and "'many'" in text
    assert "my.toml: lora.rank: Input should be greater than or equal to 1" in text


def test_missing_required_and_bad_choice(tmp_path):
    raw = {"data": {"dataset": "x"}, "train": {"max_steps": 1}, "optimizer": {"name": "sgd"}}
    with pytest.raises(ConfigError) as err:
        parse_config(raw, "c.toml", tmp_path)
    text = str(err.value)
    assert "c.toml: output: required key missing" in text
    assert "c.toml: optimizer.name:" in text and "'adamw'" in text


def test_timestep_range_checked(tmp_path):
    raw = {**MINIMAL, "train": {"max_steps": 1, "timestep_min": 500, "timestep_max": 400}}
    with pytest.raises(ConfigError, match="timestep_min must be smaller"):
        parse_config(raw, "c.toml", tmp_path)


# ---------------------------------------------------------------- loss, noise and prediction type


def test_loss_and_noise_keys_default_to_plain_mse_and_validate():
    train = parse_config(MINIMAL).train
    assert (train.loss_type, train.huber_schedule, train.huber_c, train.huber_scale) == ("l2", "snr", 0.1, 1.0)
    assert not train.debiased_estimation and not train.noise_offset_random_strength
    assert (train.multires_noise_iterations, train.multires_noise_discount, train.ip_noise_gamma) == (0, 0.3, 0.0)
    assert not train.ip_noise_gamma_random_strength and train.zero_terminal_snr == "auto"
    assert (train.adaptive_noise_scale, train.scale_v_pred_loss_like_noise_pred, train.v_pred_like_loss) == (0, False, 0)
    recipe = {"loss_type": "huber", "huber_schedule": "exponential", "huber_c": 0.2, "huber_scale": 2.0,
              "debiased_estimation": True, "multires_noise_iterations": 6, "multires_noise_discount": 0.1,
              "ip_noise_gamma": 0.1, "ip_noise_gamma_random_strength": True, "noise_offset": 0.05,
              "noise_offset_random_strength": True, "zero_terminal_snr": False, "adaptive_noise_scale": -0.01,
              "v_pred_like_loss": 0.1}
    train = parse_config({**MINIMAL, "train": {"max_steps": 10, **recipe}}).train
    assert {key: getattr(train, key) for key in recipe} == recipe
    for key, bad in (("loss_type", "mse"), ("huber_schedule", "linear"), ("huber_c", 0), ("huber_c", 1.5),
                     ("multires_noise_iterations", -1), ("multires_noise_discount", 2), ("ip_noise_gamma", -0.1),
                     ("zero_terminal_snr", "yes"), ("v_pred_like_loss", -1)):
        with pytest.raises(ConfigError, match=f"train.{key}"):
            parse_config({**MINIMAL, "train": {"max_steps": 10, key: bad}})


def test_prediction_type_and_zero_terminal_snr():
    assert parse_config(MINIMAL).model.prediction_type == "auto"
    config = parse_config({**MINIMAL, "model": {"prediction_type": "v_prediction"},
                           "train": {"max_steps": 10, "zero_terminal_snr": True}})
    assert config.model.prediction_type == "v_prediction" and config.train.zero_terminal_snr is True
    with pytest.raises(ConfigError, match="model.prediction_type"):
        parse_config({**MINIMAL, "model": {"prediction_type": "sample"}})
    with pytest.raises(ConfigError, match="zero_terminal_snr needs"):
        parse_config({**MINIMAL, "model": {"prediction_type": "epsilon"},
                      "train": {"max_steps": 10, "zero_terminal_snr": True}})
    config = parse_config({**MINIMAL, "model": {"prediction_type": "v_prediction"},
                           "train": {"max_steps": 10, "scale_v_pred_loss_like_noise_pred": True}})
    assert config.train.scale_v_pred_loss_like_noise_pred
    with pytest.raises(ConfigError, match="scale_v_pred_loss_like_noise_pred needs a v-prediction model"):
        parse_config({**MINIMAL, "model": {"prediction_type": "epsilon"},
                      "train": {"max_steps": 10, "scale_v_pred_loss_like_noise_pred": True}})
    with pytest.raises(ConfigError, match="v_pred_like_loss adds a v-like loss"):
        parse_config({**MINIMAL, "model": {"prediction_type": "v_prediction"},
                      "train": {"max_steps": 10, "v_pred_like_loss": 0.1}})


def test_paths_resolve_against_the_config_file_and_hub_ids_stay(tmp_path):
    path = tmp_path / "sub" / "c.toml"
    path.parent.mkdir()
    path.write_text('[model]\nsource = "owner/model"\n[data]\ndataset = "../prep"\n'
                    '[train]\nmax_steps = 1\n[output]\ndir = "run"\n', encoding="utf-8")
    config = load_config(path)
    assert config.model.source == "owner/model"
    assert config.data.dataset == str(tmp_path / "prep")
    assert config.output.dir == str(tmp_path / "sub" / "run")


def test_config_is_frozen(tmp_path):
    config = parse_config(MINIMAL, "c.toml", tmp_path)
    with pytest.raises(ValidationError, match="frozen"):
        config.train.max_steps = 5


def test_bad_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="bad.toml: invalid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_train_command_reports_config_errors_and_exits_2(tmp_path, caplog):
    from train.cli import main

    bad = tmp_path / "bad.toml"
    bad.write_text('[data]\ndataset = "x"\n[train]\nmax_steps = 1\nseeed = 3\n[output]\ndir = "r"\n', encoding="utf-8")
    assert main(["train", str(bad)]) == 2
    assert f"{bad}: train.seeed: unknown key (did you mean 'seed'?)" in caplog.text


# ---- [lora] learning rates, block-wise settings and dropouts (sd-scripts' network_args)


def test_block_values_text_encoder_rates_and_dropouts_validate(tmp_path):
    raw = {**MINIMAL, "lora": {"text_encoder_lr": 1e-5, "text_encoder_1_lr": 2e-5, "text_encoder_2_lr": 3e-5,
                               "block_lr": {"down": 0.5, "up": [1, 1, 1, 2, 2, 2, 0, 0, 0]},
                               "block_dims": {"mid": [8, 16, 8]}, "block_alphas": {"down": 4},
                               "dropout": 0.1, "rank_dropout": 0.2, "module_dropout": 0.05}}
    lora = parse_config(raw, "c.toml", tmp_path).lora
    assert (lora.text_encoder_1_lr, lora.text_encoder_2_lr) == (2e-5, 3e-5)
    assert lora.block_lr.per_block("down") == [0.5] * 9 and lora.block_lr.per_block("mid") is None
    assert lora.block_dims.per_block("mid") == [8, 16, 8]
    assert (lora.dropout, lora.rank_dropout, lora.module_dropout) == (0.1, 0.2, 0.05)


@pytest.mark.parametrize("lora, message", [
    ({"block_lr": {"down": [1, 1]}}, "lora.block_lr: Value error, down: 9 values (one per block), got 2"),
    ({"block_lr": {"mid": -1}}, "mid: values must be >= 0"),
    ({"block_lr": {"middle": 1}}, "lora.block_lr.middle: unknown key (did you mean 'mid'?)"),
    ({"block_dims": {"up": 2.5}}, "block_dims.up: ranks are whole numbers"),
    ({"block_alphas": {"up": 0}}, "block_alphas.up: alphas must be > 0"),
    ({"type": "lokr", "rank_dropout": 0.1}, "rank_dropout apply to type 'lora' only"),
    ({"type": "loha", "block_dims": {"up": 4}}, "block_dims apply to type 'lora' only"),
    ({"module_dropout": 1.0}, "lora.module_dropout: Input should be less than 1"),
    ({"text_encoder_2_lr": 0}, "lora.text_encoder_2_lr: Input should be greater than 0"),
])
def test_bad_block_values_and_dropouts_name_the_key(tmp_path, lora, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config({**MINIMAL, "lora": lora}, "c.toml", tmp_path)
