"""Import a training recipe from sd-scripts (TOML) or the kohya_ss GUI (JSON) into our config.

`read_recipe(paths)` reads the files into one flat table of sd-scripts option names, the way
sd-scripts reads them: a `--config_file` TOML has its sections merged into one level
(library/train_util.py `read_config_from_file`); a `--dataset_config` TOML (`[general]`,
`[[datasets]]`, `[[datasets.subsets]]`) contributes its general, dataset and subset options; a
kohya_ss GUI JSON is renamed to the option names the GUI passes on (`optimizer` is
`optimizer_type`, `max_resolution` is `resolution`, `LoRA_type` picks `network_module` and
LyCORIS' `algo`, ...). `network_args` / `optimizer_args` (`"key=value"` strings) are split.

`convert_recipe(options)` maps each option onto our config (a `Conversion`: the TOML tables and a
`Note` for every option left out, with why), with sd-scripts' defaults where ours differ (alpha 1,
a constant schedule, the optimizer's own weight decay and betas) so the recipe trains the same.
`render_toml` writes the result, the notes as comments; `import_recipe` does all of it and
validates the text with `train.config` before writing it atomically.

Torch-free: it imports the config schema and the dataset summary reader only.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from captioning import outputs
from train.config import Config, ConfigError, parse_config
from train.names import UNET_BLOCK_COUNTS

# ---------------------------------------------------------------- reading


class RecipeError(ValueError):
    """A recipe that cannot be read or converted; the message names the file and the option."""


def _flatten_sd_scripts(document: dict) -> dict:
    """sd-scripts' `--config_file`: top-level options and every section's, merged into one level."""
    flat: dict = {}
    for key, value in document.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def _flatten_dataset_config(document: dict, conflicts: list[str]) -> dict:
    """A `--dataset_config`: `[general]`, then each `[[datasets]]` and its `[[datasets.subsets]]`.

    An option with different values in two places keeps the first; `conflicts` names it.
    """
    flat = dict(document.get("general", {}))
    for dataset in document.get("datasets", []):
        for scope in (dataset, *dataset.get("subsets", [])):
            for key, value in scope.items():
                if key == "subsets":
                    continue
                if scope.get("is_reg") and key in ("image_dir", "num_repeats", "class_tokens"):
                    key = f"reg_{key}"
                if key in flat and flat[key] != value and key not in conflicts:
                    conflicts.append(key)
                flat.setdefault(key, value)
    return flat


# kohya_ss GUI field -> the sd-scripts option it sets.
GUI_NAMES = {
    "optimizer": "optimizer_type",
    "max_resolution": "resolution",
    "sdxl_cache_text_encoder_outputs": "cache_text_encoder_outputs",
    "sdxl_no_half_vae": "no_half_vae",
    "lora_network_weights": "network_weights",
}
GUI_LORA_TYPES = {
    "Standard": ("networks.lora", None),
    "Kohya LoCon": ("networks.lora", "locon"),
    "LyCORIS/LoCon": ("lycoris.kohya", "locon"),
    "LyCORIS/LoHa": ("lycoris.kohya", "loha"),
    "LyCORIS/LoKr": ("lycoris.kohya", "lokr"),
}
# GUI fields that set nothing in sd-scripts a LoRA recipe depends on (its own display and launch options).
GUI_ONLY = {"sdxl", "v2", "unit", "num_cpu_threads_per_process", "use_wandb", "noise_offset_type", "LoRA_type",
            "additional_parameters", "lr_warmup", "LyCORIS_preset", "train_on_input", "use_cp",
            "stop_text_encoder_training_pct", "save_last_n_steps_state", "model_list", "save_as_bool",
            "sample_prompts_file"}


def _gui_options(document: dict, origin: str) -> dict:
    """A kohya_ss GUI JSON as sd-scripts options (empty fields dropped)."""
    if document.get("sdxl") is False:
        raise RecipeError(f"{origin}: sdxl: false: not an SDXL recipe (this trainer is SDXL-only)")
    gui = {key: value for key, value in document.items() if value not in ("", None)}
    options = {GUI_NAMES.get(key, key): value for key, value in gui.items() if key not in GUI_ONLY}
    lora_type = gui.get("LoRA_type", "Standard")
    module, algo = GUI_LORA_TYPES.get(lora_type, (None, None))
    if module is None:
        options["network_module"] = f"kohya_ss LoRA_type {lora_type!r}"
    else:
        options["network_module"] = module
        if algo:
            options["algo"] = algo
    if algo is None:  # the GUI keeps conv fields for LoCon even when another type is chosen
        options.pop("conv_dim", None)
        options.pop("conv_alpha", None)
    if gui.get("noise_offset_type", "Original") == "Original":
        options.pop("multires_noise_iterations", None)
        options.pop("multires_noise_discount", None)
    else:
        options.pop("noise_offset", None)
    if "epoch" in gui and not any(gui.get(key) not in (None, "", 0, "0") for key in ("max_train_steps",
                                                                                        "max_train_epochs")):
        options["max_train_epochs"] = gui["epoch"]  # the GUI trains `epoch` epochs when no step count is set
    options.pop("epoch", None)
    if "lr_warmup" in gui and "lr_warmup_steps" not in gui:
        options["lr_warmup_steps"] = float(gui["lr_warmup"]) / 100  # a percentage of the steps
    if gui.get("use_wandb"):
        options["log_with"] = "wandb"
    if isinstance(options.get("optimizer_args"), str):
        options["optimizer_args"] = options["optimizer_args"].split()
    if isinstance(options.get("xformers"), str):  # "xformers" | "sdpa" | "none"
        attention = options.pop("xformers")
        if attention != "none":
            options[attention] = True
    # The GUI's text-encoder and UNet rates use 0 for "not set"; a UNet rate without one for the
    # text encoders trains the UNet only.
    te_lr, unet_lr = options.get("text_encoder_lr"), options.get("unet_lr")
    if te_lr in (0, "0") and unet_lr not in (0, "0", None):
        options["network_train_unet_only"] = True
    for key in ("text_encoder_lr", "unet_lr"):
        if options.get(key) in (0, "0"):
            options.pop(key)
    options.update(_flags(gui.get("additional_parameters", ""), origin))
    return options


def _flags(text: str, origin: str) -> dict:
    """`--flag value --switch` (the GUI's additional_parameters) as options."""
    try:
        words = shlex.split(text)
    except ValueError as err:
        raise RecipeError(f"{origin}: additional_parameters: {err}") from None
    options: dict = {}
    i = 0
    while i < len(words):
        if not words[i].startswith("--"):
            i += 1
            continue
        key = words[i][2:].replace("-", "_")
        values = []
        while i + 1 < len(words) and not words[i + 1].startswith("--"):
            values.append(words[i + 1])
            i += 1
        options[key] = True if not values else values[0] if len(values) == 1 else values
        i += 1
    return options


def _key_values(items, origin: str, name: str) -> dict:
    """`["conv_dim=8", "algo=lokr"]` (or a space-separated string) -> {"conv_dim": "8", "algo": "lokr"}."""
    if isinstance(items, str):
        items = items.split()
    result = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        if not sep:
            raise RecipeError(f"{origin}: {name}: {item!r} is not key=value")
        result[key.strip()] = value.strip()
    return result


def read_recipe(paths: list[Path]) -> tuple[dict, list[str]]:
    """The options of one or more recipe files (later files override earlier ones) and the
    dataset-config options that differ between subsets.

    Raises:
        RecipeError: a file is missing, unreadable, or not a TOML / JSON recipe.
    """
    options: dict = {}
    conflicts: list[str] = []
    for path in paths:
        origin = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RecipeError(f"{origin}: recipe not found") from None
        except (OSError, UnicodeDecodeError) as err:
            raise RecipeError(f"{origin}: cannot read: {err}") from None
        if Path(path).suffix.lower() == ".json":
            try:
                document = json.loads(text)
            except ValueError as err:
                raise RecipeError(f"{origin}: invalid JSON: {err}") from None
            if not isinstance(document, dict):
                raise RecipeError(f"{origin}: not a kohya_ss GUI config (a JSON object)")
            options.update(_gui_options(document, origin))
            continue
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise RecipeError(f"{origin}: invalid TOML: {err}") from None
        if "datasets" in document or "general" in document:
            options.update(_flatten_dataset_config(document, conflicts))
        else:
            options.update(_flatten_sd_scripts(document))
    for name in ("network_args", "optimizer_args"):
        if name in options:
            options[name] = _key_values(options[name], ", ".join(map(str, paths)), name)
    # network_args' options are sd-scripts network options like any other (the GUI has them flat).
    options.update(options.pop("network_args", {}))
    return options, conflicts


# ---------------------------------------------------------------- converting


@dataclass(frozen=True)
class Note:
    """A recipe option that is not (or not wholly) in the written config, and why."""

    option: str
    value: object
    why: str
    kind: str = "unmapped"  # "unmapped" | "prep" (a prep option) | "default"


@dataclass
class Conversion:
    tables: dict[str, dict] = field(default_factory=dict)  # our TOML: section -> key -> value
    mapped: list[tuple[str, str]] = field(default_factory=list)  # (recipe option, our key)
    notes: list[Note] = field(default_factory=list)

    def set(self, key: str, value, option: str) -> None:
        section, _, name = key.partition(".")
        self.tables.setdefault(section, {})[name] = value
        self.mapped.append((option, key))

    def note(self, option: str, value, why: str, kind: str = "unmapped") -> None:
        self.notes.append(Note(option, value, why, kind))

    def unset(self, key: str, why: str) -> None:
        """Take `key` back out of the tables, noting the recipe options that set it."""
        section, _, name = key.partition(".")
        value = self.tables.get(section, {}).pop(name, None)
        if value is None:
            return
        options = [option for option, mapped in self.mapped if mapped == key]
        self.mapped = [(option, mapped) for option, mapped in self.mapped if mapped != key]
        self.note(" / ".join(options) or key, value, why)


def _bool(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def _number(value, option: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise RecipeError(f"{option}: {value!r} is not a number") from None


def _int(value, option: str) -> int:
    number = _number(value, option)
    if number != int(number):
        raise RecipeError(f"{option}: {value!r} is not a whole number")
    return int(number)


def _is_set(value) -> bool:
    """An option worth mentioning when we cannot map it: not empty, off or zero."""
    return value not in (None, "", False, 0, 0.0, "0", [], {}, "none", "None", "false", "False")


# sd-scripts option -> (our key, converter). The value is converted and written as is.
DIRECT = {
    "pretrained_model_name_or_path": ("model.source", str),
    "train_batch_size": ("train.batch_size", int),
    "batch_size": ("train.batch_size", int),  # dataset config
    "gradient_accumulation_steps": ("train.gradient_accumulation_steps", int),
    "gradient_checkpointing": ("train.gradient_checkpointing", _bool),
    "seed": ("train.seed", int),
    "max_train_steps": ("train.max_steps", int),
    "noise_offset": ("train.noise_offset", float),
    "min_timestep": ("train.timestep_min", int),
    "max_timestep": ("train.timestep_max", int),
    "masked_loss": ("train.masked_loss", _bool),
    "alpha_mask": ("train.masked_loss", _bool),
    "cache_text_encoder_outputs": ("data.cache_text_outputs", _bool),
    "shuffle_caption": ("data.shuffle_captions", _bool),
    "caption_dropout_rate": ("data.caption_dropout", float),
    "caption_tag_dropout_rate": ("data.tag_dropout", float),
    "flip_aug": ("data.flip", _bool),
    "prior_loss_weight": ("data.prior_loss_weight", float),
    "network_dim": ("lora.rank", int),
    "network_alpha": ("lora.alpha", float),
    "network_dropout": ("lora.dropout", float),
    "rank_dropout": ("lora.rank_dropout", float),
    "module_dropout": ("lora.module_dropout", float),
    "loraplus_lr_ratio": ("optimizer.lora_plus_ratio", float),
    "output_dir": ("output.dir", str),
    "output_name": ("output.name", str),
    "save_every_n_steps": ("output.save_every_n_steps", int),
    "sample_every_n_steps": ("sample.every_n_steps", int),
}

# DIRECT options whose 0 means "not set" in sd-scripts (our key keeps its default).
ZERO_IS_UNSET = {"save_every_n_steps", "max_train_steps", "seed", "network_dropout", "rank_dropout",
                 "module_dropout"}

# The loss, noise and prediction-type options: sd-scripts option -> our key (each key is in the
# schema: tests/test_recipe_import.py checks it with `schema_has`).
LOSS_AND_NOISE = {
    "loss_type": "train.loss_type",
    "huber_c": "train.huber_c",
    "huber_schedule": "train.huber_schedule",
    "debiased_estimation_loss": "train.debiased_estimation",
    "ip_noise_gamma": "train.ip_noise_gamma",
    "ip_noise_gamma_random_strength": "train.ip_noise_gamma_random_strength",
    "multires_noise_iterations": "train.multires_noise_iterations",
    "multires_noise_discount": "train.multires_noise_discount",
    "noise_offset_random_strength": "train.noise_offset_random_strength",
    "v_parameterization": "model.prediction_type",
    "zero_terminal_snr": "train.zero_terminal_snr",
    "huber_scale": "train.huber_scale",
    "adaptive_noise_scale": "train.adaptive_noise_scale",
    "scale_v_pred_loss_like_noise_pred": "train.scale_v_pred_loss_like_noise_pred",
    "v_pred_like_loss": "train.v_pred_like_loss",
}
# Of those, the switches (sd-scripts' store_true flags) and the names; the rest are numbers.
LOSS_AND_NOISE_SWITCHES = {"debiased_estimation_loss", "zero_terminal_snr", "ip_noise_gamma_random_strength",
                           "noise_offset_random_strength", "scale_v_pred_loss_like_noise_pred"}
LOSS_AND_NOISE_NAMES = {"loss_type", "huber_schedule"}

# Options prep decides (the dataset is prepped once, then trained): what to do there instead.
PREP = {
    "train_data_dir": "prep's input: `animagine-lora prep DIR -o OUT`, then data.dataset = OUT",
    "image_dir": "prep's input: `animagine-lora prep DIR -o OUT`, then data.dataset = OUT",
    "reg_data_dir": "prep the class images too, then data.regularization = that prep's OUT",
    "reg_image_dir": "prep the class images too, then data.regularization = that prep's OUT",
    "enable_bucket": "prep always buckets, to the model card's aspect ratios",
    "min_bucket_reso": "prep's buckets are the model card's aspect ratios",
    "max_bucket_reso": "prep's buckets are the model card's aspect ratios",
    "bucket_reso_steps": "prep's buckets are multiples of 64",
    "bucket_no_upscale": "prep fits every image to a bucket (upscaling small ones); --min-side rejects the smallest",
    "caption_extension": "prep reads .txt captions and booru JSON beside each image",
    "keep_tokens": "our captions keep their head (count, character, series) in place and shuffle the body",
    "keep_tokens_separator": "prep splits captions into head | body | tail by tag category; only the body shuffles",
    "secondary_separator": "prep splits captions by tag category",
    "num_repeats": "a prep recipe's repeats (per source folder)",
    "reg_num_repeats": "data.regularization_repeats, or the class images' prep recipe",
    "class_tokens": "prep writes the trigger into each caption's head",
    "reg_class_tokens": "prep writes the trigger into each caption's head",
    "caption_prefix": "prep's caption rules",
    "caption_suffix": "prep's caption rules",
    "dataset_repeats": "a prep recipe's repeats",
}

# sd-scripts options we do not have, and why (only listed when the recipe sets them).
UNSUPPORTED = {
    "vae": "the model's own VAE is used (fp32)",
    "full_bf16": "adapter weights always train in fp32 (bf16 updates of small LoRA weights round to nothing)",
    "full_fp16": "adapter weights always train in fp32",
    "save_precision": "the WebUI file is fp16, the diffusers file fp32",
    "save_model_as": "always safetensors",
    "clip_skip": "SDXL always uses fixed layers of both text encoders",
    "network_weights": "training cannot start from an existing LoRA file",
    "dim_from_weights": "training cannot start from an existing LoRA file",
    "scale_weight_norms": "no max-norm regularization",
    "color_aug": "no colour augmentation (it would disagree with the cached latents)",
    "random_crop": "crops are fixed at prep (size/crop conditioning stays exact)",
    "weighted_captions": "captions are plain tags; (tag:1.2) weighting is for prompts",
    "no_token_padding": "captions are always padded to 75-token chunks, as at generation",
    "caption_dropout_every_n_epochs": "caption dropout is per draw (data.caption_dropout)",
    "lr_scheduler_num_cycles": "cosine_with_restarts uses one cycle",
    "lr_scheduler_power": "polynomial uses power 1",
    "lr_scheduler_args": "schedules take no arguments",
    "lr_scheduler_type": "schedules come from diffusers by name (optimizer.scheduler)",
    "max_train_epochs": "sd-scripts counts epochs (they override max_train_steps): set train.max_steps, or "
                        "pass --dataset to convert",
    "save_every_n_epochs": "checkpoints are every output.save_every_n_steps (pass --dataset to convert epochs)",
    "save_last_n_steps": "output.checkpoints_total_limit keeps the last N checkpoints",
    "save_last_n_epochs": "output.checkpoints_total_limit keeps the last N checkpoints",
    "save_n_epoch_ratio": "checkpoints are every output.save_every_n_steps",
    "sample_prompts": "sd-scripts' prompt file has per-line options; copy the prompts into sample.prompts",
    "network_train_text_encoder_only": "the UNet is always trained",
    "conv_block_dims": "block ranks apply to every adapted layer alike (lora.block_dims)",
    "conv_block_alphas": "block alphas apply to every adapted layer alike (lora.block_alphas)",
    "loraplus_unet_lr_ratio": "one LoRA+ ratio for UNet and text encoders (optimizer.lora_plus_ratio)",
    "loraplus_text_encoder_lr_ratio": "one LoRA+ ratio for UNet and text encoders (optimizer.lora_plus_ratio)",
    "train_norm": "norm layers are never adapted",
    "preset": "LyCORIS presets: lora.preset picks attn / attn-mlp / attn-mlp-conv",
    "huggingface_token": "a secret: not copied",
    "wandb_api_key": "a secret: not copied (wandb reads WANDB_API_KEY)",
}
SECRET_ENDINGS = ("_token", "_key", "password", "secret")  # never copied, never printed


def _secret(option: str) -> bool:
    return option.lower().endswith(SECRET_ENDINGS)

# Values of UNSUPPORTED options that are what we do anyway (not listed).
SAME_AS_OURS = {"clip_skip": {"1", "0"}, "save_precision": {"fp16"}, "save_model_as": {"safetensors"},
                "lr_scheduler_num_cycles": {"1"}, "lr_scheduler_power": {"1", "1.0"}}

# Options that change nothing here ("": nothing worth saying): speed, memory and logging settings
# with an automatic or fixed equivalent.
NO_EFFECT = {
    "cache_latents": "latents are always cached (on disk, beside the dataset)",
    "cache_latents_to_disk": "latents are always cached on disk",
    "cache_text_encoder_outputs_to_disk": "text outputs are cached in memory (data.cache_text_outputs)",
    "save_state": "checkpoints always hold the resume state",
    "save_state_on_train_end": "checkpoints always hold the resume state",
    "lowram": "", "highvram": "", "persistent_data_loader_workers": "", "max_data_loader_n_workers": "",
    "vae_batch_size": "", "log_prefix": "", "log_tracker_name": "", "wandb_run_name": "", "training_comment": "",
    "ddp_timeout": "", "ddp_gradient_as_bucket_view": "", "ddp_static_graph": "", "metadata_title": "",
    "metadata_author": "", "metadata_description": "", "metadata_license": "", "metadata_tags": "", "is_reg": "",
    "sdxl": "", "console_log_simple": "", "console_log_level": "",
}

OPTIMIZER_NAMES = {
    "adamw": "adamw", "adamw8bit": "adamw8bit", "bitsandbytes.optim.adamw8bit": "adamw8bit",
    "adafactor": "adafactor", "transformers.optimization.adafactor": "adafactor",
    "prodigy": "prodigy", "prodigyopt.prodigy": "prodigy", "lion": "lion", "lion_pytorch.lion": "lion",
    "pytorch_optimizer.lion": "lion", "came": "came", "pytorch_optimizer.came": "came",
    "came_pytorch.came": "came", "adamwschedulefree": "adamw_schedulefree",
    "schedulefree.adamwschedulefree": "adamw_schedulefree", "pytorch_optimizer.schedulefreeadamw": "adamw_schedulefree",
}
# Each library's own weight decay and betas, which the recipe trains with when it does not set them.
OPTIMIZER_DEFAULTS = {
    "adamw": (0.01, (0.9, 0.999)), "adamw8bit": (0.01, (0.9, 0.999)), "adafactor": (0.0, None),
    "prodigy": (0.0, (0.9, 0.999)), "lion": (0.0, (0.9, 0.99)), "came": (0.0, (0.9, 0.999)),
    "adamw_schedulefree": (0.0, (0.9, 0.999)),
}
# optimizer_args our builders always set this way: (optimizer, arg) -> the value they use.
OPTIMIZER_FIXED = {
    ("prodigy", "decouple"): "true", ("prodigy", "safeguard_warmup"): "true",
    ("adafactor", "scale_parameter"): "false", ("adafactor", "relative_step"): "false",
    ("adafactor", "warmup_init"): "false",
}
# Our settings that need lora.type = "lora" (train.config's validators).
PLAIN_LORA_ONLY = ("lora.dropout", "lora.rank_dropout", "lora.module_dropout", "lora.block_dims",
                   "lora.block_alphas", "lora.dora", "optimizer.lora_plus_ratio", "model.quantize")
SCHEDULERS = {"constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"}
SAMPLERS = {"euler_a": "euler_ancestral", "k_euler_a": "euler_ancestral", "euler": "euler", "k_euler": "euler",
            "dpmsolver++": "dpmpp_2m"}
BLOCK_PRESETS = {"cosine", "sine", "linear", "reverse_linear", "zeros"}


def schema_has(key: str) -> bool:
    section, _, name = key.partition(".")
    table = Config.model_fields.get(section)
    return table is not None and name in table.annotation.model_fields


def _block_weights(value, part: str, threshold: float) -> list[float]:
    """sd-scripts' `down/mid/up_lr_weight`: comma-separated numbers (missing ones 1, empty ones 0)
    or a preset name (`cosine`, `sine`, `linear`, `reverse_linear`, `zeros`, each `+base`), as
    networks/lora.py `get_block_lr_weight`, with weights at or below `block_lr_zero_threshold` 0."""
    count = UNET_BLOCK_COUNTS[part]
    text = str(value)
    name, _, base = text.partition("+")
    if part != "mid" and name in BLOCK_PRESETS:
        add = float(base) if base else 0.0
        steps = [i / (count - 1) for i in range(count)]
        weights = {"cosine": [math.sin(math.pi * s / 2) for s in reversed(steps)],
                   "sine": [math.sin(math.pi * s / 2) for s in steps],
                   "linear": steps, "reverse_linear": list(reversed(steps)), "zeros": [0.0] * count}[name]
        weights = [w + add for w in weights]
    else:
        items = text.split(",") if isinstance(value, str) else list(value) if isinstance(value, list) else [value]
        weights = [float(s) if str(s).strip() else 0.0 for s in items][:count]
        weights += [1.0] * (count - len(weights))
    return [w if w > threshold else 0.0 for w in weights]


def _block_list(value, option: str, cast) -> dict:
    """sd-scripts' 23 `block_dims` / `block_alphas` (embeddings, 9 down, 3 mid, 9 up, out) as our
    down / mid / up lists; the first and last entries name layers no preset adapts."""
    items = [s for s in str(value).split(",")] if isinstance(value, str) else list(value)
    if len(items) != 23:
        raise RecipeError(f"{option}: 23 values for SDXL (as sd-scripts), got {len(items)}")
    values = [cast(_number(s, option)) for s in items]
    down, mid, up = values[1:10], values[10:13], values[13:22]
    return {"down": down, "mid": mid, "up": up}


def _steps_per_epoch(dataset: Path | None, batch: int) -> int | None:
    """About the optimizer steps per epoch of a prepped dataset (draws with repeats / effective
    batch; bucket remainders not counted), or None when it cannot be read."""
    if dataset is None:
        return None
    from train.preflight import read_dataset_summary

    try:
        summary = read_dataset_summary(dataset)
    except (OSError, ValueError):
        return None
    return max(1, math.ceil(summary.entries["train"] / batch))


def convert_recipe(options: dict, *, dataset: Path | None = None) -> Conversion:
    """Our config tables for sd-scripts `options` (from `read_recipe`), and a note per option that
    is not carried over.

    `dataset` (a prep OUT folder) turns epoch counts into steps when it can be read.

    Raises:
        RecipeError: an option whose value cannot be read (names the option).
    """
    out = Conversion()
    handled: set[str] = set()

    def take(option: str, default=None):
        handled.add(option)
        return options.get(option, default)

    for option, (key, cast) in DIRECT.items():
        value = take(option)
        if value in (None, "") or (option in ZERO_IS_UNSET and value in (0, "0")):
            continue
        out.set(key, _int(value, option) if cast is int else _number(value, option) if cast is float
                else cast(value), option)

    _model(options, out, take)
    _learning_rates(options, out, take)
    _optimizer(options, out, take)
    _network(options, out, take)
    _training(options, out, take, dataset)
    _loss_and_noise(out, take)
    lora_type = out.tables.get("lora", {}).get("type", "lora")
    if lora_type != "lora":
        for key in PLAIN_LORA_ONLY:
            out.unset(key, f"applies to plain LoRA only here, not {lora_type}")

    for option, value in options.items():
        if option in handled:
            continue
        if option in PREP:
            if _is_set(value):
                out.note(option, value, PREP[option], "prep")
        elif _secret(option):
            if _is_set(value):
                out.note(option, "(hidden)", UNSUPPORTED.get(option, "a secret: not copied"))
        elif option in UNSUPPORTED:
            if _is_set(value) and str(value) not in SAME_AS_OURS.get(option, ()):
                out.note(option, value, UNSUPPORTED[option])
        elif option in NO_EFFECT:
            if NO_EFFECT[option] and _is_set(value):
                out.note(option, value, NO_EFFECT[option], "default")
        elif _is_set(value):
            out.note(option, value, "not an option this importer knows")
    return out


def _model(options: dict, out: Conversion, take) -> None:
    if _bool(take("no_half_vae", False)):
        out.set("model.vae_dtype", "fp32", "no_half_vae")
    if _bool(take("fp8_base", False)):
        out.set("model.quantize", "fp8", "fp8_base")
    precision = take("mixed_precision")
    if precision is not None:
        if precision not in ("no", "fp16", "bf16"):
            raise RecipeError(f"mixed_precision: {precision!r} is not no, fp16 or bf16")
        out.set("train.mixed_precision", precision, "mixed_precision")
    resolution = take("resolution")
    if resolution not in (None, ""):
        items = resolution if isinstance(resolution, list) else str(resolution).strip("()[] ").split(",")
        sides = [_number(side, "resolution") for side in items if str(side).strip()]
        width, height = sides[0], sides[-1]  # "1024" is square, as in sd-scripts
        scale = math.sqrt(width * height) / 1024
        if abs(scale - 1) > 1e-6:
            # Prep buckets at the card's 1024x1024 area; the trainer scales them (size conditioning follows).
            out.set("data.resolution_scale", round(scale, 4), "resolution")
            if scale > 1:
                out.note("resolution", resolution, f"or prep with --max-area {int(width * height)} and keep "
                         "data.resolution_scale = 1 (buckets cut at that area directly)", "prep")


def _learning_rates(options: dict, out: Conversion, take) -> None:
    """sd-scripts: `learning_rate` is the default, `unet_lr` / `text_encoder_lr` override it; a
    text-encoder rate of 0 (or network_train_unet_only) leaves the text encoders untrained."""
    default = take("learning_rate")
    if default is None:
        default = 2e-6  # sd-scripts' --learning_rate default
        out.note("learning_rate", "(unset)", "sd-scripts' default 2e-6 written as optimizer.lr", "default")
    default = _number(default, "learning_rate")
    unet = take("unet_lr")
    unet = default if unet in (None, "") else _number(unet, "unet_lr")
    out.set("optimizer.lr", unet, "unet_lr" if "unet_lr" in options else "learning_rate")
    te = take("text_encoder_lr")
    rates = [] if te in (None, "") else [_number(v, "text_encoder_lr") for v in
                                         (te if isinstance(te, list) else str(te).split(",") if isinstance(te, str)
                                          else [te])]
    train_te = not _bool(take("network_train_unet_only", False)) and not (rates and all(r == 0 for r in rates))
    out.set("lora.train_text_encoder", train_te,
            "network_train_unet_only" if "network_train_unet_only" in options else "text_encoder_lr")
    if not train_te:
        return
    if len(rates) >= 2:
        out.set("lora.text_encoder_1_lr", rates[0], "text_encoder_lr")
        out.set("lora.text_encoder_2_lr", rates[1], "text_encoder_lr")
    elif rates:
        out.set("lora.text_encoder_lr", rates[0], "text_encoder_lr")
    elif unet != default:
        out.set("lora.text_encoder_lr", default, "learning_rate")


def _optimizer(options: dict, out: Conversion, take) -> None:
    raw = take("optimizer_type")
    if raw in (None, ""):
        raw = "AdamW8bit" if _bool(take("use_8bit_adam", False)) else "Lion" if _bool(
            take("use_lion_optimizer", False)) else "AdamW"
    name = OPTIMIZER_NAMES.get(str(raw).lower())
    if name is None:
        out.note("optimizer_type", raw, "not available: choose one of adamw, adamw8bit, adafactor, prodigy, came, "
                 "lion, adamw_schedulefree (optimizer.name); AdamW written")
        name = "adamw"
    out.set("optimizer.name", name, "optimizer_type")
    args = dict(take("optimizer_args", {}) or {})
    decay, betas = OPTIMIZER_DEFAULTS[name]
    if "weight_decay" in args:
        decay = _number(args.pop("weight_decay"), "optimizer_args weight_decay")
    out.set("optimizer.weight_decay", decay, "optimizer_args" if decay else "optimizer_type")
    if "betas" in args:
        betas = tuple(_number(b, "optimizer_args betas") for b in args.pop("betas").split(","))
        if len(betas) != 2:
            raise RecipeError("optimizer_args betas: two values for our optimizers (CAME's third is fixed)")
    if betas is not None:
        out.set("optimizer.betas", list(betas), "optimizer_args")
    if "eps" in args:
        out.set("optimizer.eps", _number(args.pop("eps"), "optimizer_args eps"), "optimizer_args")
    for arg, value in args.items():
        fixed = OPTIMIZER_FIXED.get((name, arg))
        if fixed is not None and str(value).lower() == fixed:
            continue
        why = (f"{name} always runs with {arg}={fixed}" if fixed is not None
               else f"{name}'s {arg} is not configurable here")
        out.note(f"optimizer_args {arg}", value, why)

    scheduler = str(take("lr_scheduler") or "constant")
    if scheduler == "adafactor":
        scheduler = "constant"  # sd-scripts' "adafactor" schedule is Adafactor's own: constant for a fixed lr
    if scheduler == "cosine_with_min_lr":
        out.note("lr_scheduler", scheduler, "cosine written: our cosine decays to 0, not to a minimum rate")
        scheduler = "cosine"
    if scheduler not in SCHEDULERS:
        out.note("lr_scheduler", scheduler, f"not available ({', '.join(sorted(SCHEDULERS))}); constant written")
        scheduler = "constant"
    if name == "adamw_schedulefree" and scheduler != "constant":
        out.note("lr_scheduler", scheduler, "schedule-free AdamW replaces the schedule: constant written")
        scheduler = "constant"
    out.set("optimizer.scheduler", scheduler, "lr_scheduler")


def _network(options: dict, out: Conversion, take) -> None:
    module = str(take("network_module") or "networks.lora")
    algo = str(take("algo") or ("lora" if module == "lycoris.kohya" else "")).lower()
    if module not in ("networks.lora", "lycoris.kohya"):
        out.note("network_module", module, "only LoRA, LoCon, LoHa and LoKr: trained as plain LoRA")
    elif algo in ("lokr", "loha"):
        out.set("lora.type", algo, "algo")
    elif algo not in ("", "lora", "locon"):
        out.note("algo", algo, "LyCORIS algorithm not available: trained as plain LoRA")
    if "network_dim" not in options:
        out.set("lora.rank", 4, "network_dim")
        out.note("network_dim", "(unset)", "sd-scripts' default 4 written as lora.rank", "default")
    if "network_alpha" not in options:
        out.set("lora.alpha", 1.0, "network_alpha")
        out.note("network_alpha", "(unset)", "sd-scripts' default 1 written as lora.alpha (scale 1/rank)", "default")
    if _bool(take("dora_wd", False)):
        out.set("lora.dora", True, "dora_wd")
    lycoris = {"lokr": (("factor", "lora.factor", int), ("decompose_both", "lora.decompose_both", _bool)),
               "loha": (("use_tucker", "lora.tucker", _bool),)}
    for option, key, cast in lycoris.get(algo, ()):
        value = take(option)
        if value not in (None, ""):
            out.set(key, _int(value, option) if cast is int else cast(value), option)
    conv_dim, conv_alpha = take("conv_dim"), take("conv_alpha")
    if algo == "locon" or conv_dim not in (None, "", 0, "0"):
        out.set("lora.preset", "attn-mlp-conv", "conv_dim")
    if conv_dim not in (None, "", 0, "0") and (
            _number(conv_dim, "conv_dim") != _number(options.get("network_dim", 4), "network_dim")
            or _number(conv_alpha or 1, "conv_alpha") != _number(options.get("network_alpha", 1), "network_alpha")):
        out.note("conv_dim", f"{conv_dim} (alpha {conv_alpha})",
                 "convolutions train at lora.rank / lora.alpha like the other layers")

    threshold = _number(take("block_lr_zero_threshold") or 0, "block_lr_zero_threshold")
    block_lr = {part: _block_weights(options[f"{part}_lr_weight"], part, threshold)
                for part in UNET_BLOCK_COUNTS if options.get(f"{part}_lr_weight") not in (None, "")}
    for part in UNET_BLOCK_COUNTS:
        take(f"{part}_lr_weight")
    if block_lr:
        out.set("lora.block_lr", block_lr, "down_lr_weight / mid_lr_weight / up_lr_weight")
    for option, cast in (("block_dims", int), ("block_alphas", float)):
        value = take(option)
        if value not in (None, ""):
            out.set(f"lora.{option}", _block_list(value, option, cast), option)


def _training(options: dict, out: Conversion, take, dataset: Path | None) -> None:
    train = out.tables.get("train", {})  # the batch as written (a dataset config's batch_size wins, as in sd-scripts)
    batch = train.get("batch_size", 1) * train.get("gradient_accumulation_steps", 1)
    per_epoch = _steps_per_epoch(dataset, batch)
    epochs = options.get("max_train_epochs")
    if epochs not in (None, "", 0, "0") and per_epoch:
        # sd-scripts: max_train_epochs overrides max_train_steps.
        take("max_train_epochs")
        out.set("train.max_steps", _int(epochs, "max_train_epochs") * per_epoch, "max_train_epochs")
    elif "max_steps" not in out.tables.get("train", {}):
        out.set("train.max_steps", 1600, "max_train_steps")
        out.note("max_train_steps", "(unset)", "sd-scripts' default 1600 written as train.max_steps", "default")
    save_epochs = options.get("save_every_n_epochs")
    if save_epochs not in (None, "", 0, "0") and per_epoch and not options.get("save_every_n_steps"):
        take("save_every_n_epochs")
        out.set("output.save_every_n_steps", int(_number(save_epochs, "save_every_n_epochs")) * per_epoch,
                "save_every_n_epochs")
    warmup = take("lr_warmup_steps")
    if warmup not in (None, ""):
        warmup = _number(warmup, "lr_warmup_steps")
        steps = out.tables["train"]["max_steps"]
        # sd-scripts: a value below 1 is a fraction of the training steps.
        out.set("optimizer.warmup_steps", int(warmup * steps) if 0 < warmup < 1 else int(warmup), "lr_warmup_steps")
    grad_norm = take("max_grad_norm")
    if grad_norm not in (None, ""):
        if _number(grad_norm, "max_grad_norm") > 0:
            out.set("train.max_grad_norm", _number(grad_norm, "max_grad_norm"), "max_grad_norm")
        else:
            out.note("max_grad_norm", grad_norm, "0 turns clipping off, which a TOML config cannot say: "
                     "train.max_grad_norm stays 1.0 (set a large value to clip almost never)")
    gamma = take("min_snr_gamma")
    if gamma not in (None, "", 0, "0"):
        out.set("train.min_snr_gamma", _number(gamma, "min_snr_gamma"), "min_snr_gamma")
    tokens = take("max_token_length")
    if tokens not in (None, ""):
        out.set("data.max_chunks", max(1, int(_number(tokens, "max_token_length")) // 75), "max_token_length")
    if any(_bool(take(name, False)) for name in ("sdpa", "xformers", "mem_eff_attn")):
        out.set("speed.sdpa", True, "sdpa / xformers")
    log_with = take("log_with")
    if log_with in (None, "") and take("logging_dir") not in (None, ""):
        log_with = "tensorboard"  # sd-scripts logs to TensorBoard when given a logging_dir
    if log_with not in (None, ""):
        trackers = ["tensorboard", "wandb"] if log_with == "all" else [log_with]
        out.set("output.log_with", [t for t in trackers if t in ("tensorboard", "wandb")], "log_with")
    sampler = take("sample_sampler")
    if sampler not in (None, ""):
        if sampler in SAMPLERS:
            out.set("sample.sampler", SAMPLERS[sampler], "sample_sampler")
        else:
            out.note("sample_sampler", sampler, f"sample grids use {', '.join(sorted(set(SAMPLERS.values())))}")


def _loss_and_noise(out: Conversion, take) -> None:
    for option, key in LOSS_AND_NOISE.items():
        value = take(option)
        if not _is_set(value) or (option in LOSS_AND_NOISE_SWITCHES | {"v_parameterization"} and not _bool(value)):
            continue  # off, as our default
        if option == "v_parameterization":
            out.set(key, "v_prediction", option)
        elif option in LOSS_AND_NOISE_SWITCHES:
            out.set(key, True, option)
        elif option in LOSS_AND_NOISE_NAMES:
            out.set(key, str(value), option)
        elif option == "multires_noise_iterations":
            out.set(key, _int(value, option), option)
        else:
            out.set(key, _number(value, option), option)


# ---------------------------------------------------------------- writing


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} to TOML")


SECTION_ORDER = ("model", "data", "lora", "optimizer", "train", "output", "sample", "speed", "validation")


NOTE_ORDER = ("unmapped", "prep", "default")


def sorted_notes(conversion: Conversion) -> list[Note]:
    """The notes, what changes training first: unmapped, prep, defaults."""
    return sorted(conversion.notes, key=lambda note: NOTE_ORDER.index(note.kind))


def render_toml(conversion: Conversion, *, sources: list[str]) -> str:
    """The config text: a header naming the recipe, the tables, then every note as a comment."""
    lines = [f"# Imported from {', '.join(sources)} by `animagine-lora config from-sd-scripts`.",
             "# Check data.dataset (a prep OUT folder) and the notes at the end, then:",
             "#   animagine-lora train THIS.toml --check", ""]
    for section in SECTION_ORDER:
        table = conversion.tables.get(section)
        if not table:
            continue
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in table.items()]
        lines.append("")
    if conversion.notes:
        lines.append("# Recipe options not carried over (option = value: why):")
        for note in sorted_notes(conversion):
            text = f"{note.option} = {note.value!r}: {note.why}"
            lines.append(f"#   [{note.kind}] {text}".replace("\n", " "))
    return "\n".join(lines) + "\n"


def import_recipe(paths: list[Path], out: Path, *, dataset: str | None = None,
                  output_dir: str | None = None) -> Conversion:
    """Read `paths`, convert, validate with `train.config` and write `out` atomically.

    `dataset` / `output_dir` set data.dataset and output.dir (relative to `out`'s folder, as the
    config reads them); without them the recipe's `output_dir` is kept and data.dataset is `prep`.

    Raises:
        RecipeError: the recipe cannot be read or converted.
        ConfigError: the converted config does not validate (a bug or an out-of-range recipe value).
        OutputError: `out` cannot be written.
    """
    options, conflicts = read_recipe(paths)
    conversion = convert_recipe(options, dataset=(out.parent / dataset) if dataset else None)
    for key in conflicts:
        conversion.note(key, "(several values)", "differs between the dataset config's subsets: the first is used")
    if not dataset:
        conversion.note("data.dataset", "prep", "prep the recipe's images and set data.dataset to prep's OUT folder",
                        "prep")
    output = conversion.tables.get("output", {})
    # The two required keys first in their tables.
    conversion.tables["data"] = {"dataset": dataset or "prep", **conversion.tables.get("data", {})}
    conversion.tables["output"] = {"dir": output_dir or output.pop("dir", f"runs/{output.get('name', 'lora')}"),
                                   **{k: v for k, v in output.items() if k != "dir"}}
    text = render_toml(conversion, sources=[str(p) for p in paths])
    try:
        parse_config(tomllib.loads(text), origin=str(out), base=out.parent)
    except (ConfigError, tomllib.TOMLDecodeError) as err:
        raise RecipeError(f"the converted recipe does not validate:\n{err}") from None
    outputs.write_text(out, text)
    return conversion
