"""The training config: a TOML file validated once into a frozen, typed tree.

`load_config(path)` is the only entry point. Every section is a pydantic model with
`extra="forbid"`, so a misspelt key is an error, reported as one line per wrong key with its TOML
path and a "did you mean" (difflib). Relative paths are resolved against the TOML file's folder,
so a config works from any working directory. Builders receive the fields they need, never the
whole tree (see `train.loop`).

A leaf: it imports pydantic and `train.names` only, so validating a config (`train CONFIG --check`)
loads neither torch nor diffusers.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal, get_args

import tomllib
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, model_validator

from train.names import (
    CARD_CFG,
    CARD_NEGATIVE,
    CARD_STEPS,
    DTYPE_NAMES,
    HUBER_SCHEDULES,
    LOSS_TYPES,
    NOISE_DEVICES,
    PREDICTION_TYPES,
    SAMPLER_CHOICES,
    SCHEDULERS,
    UNET_BLOCK_COUNTS,
    VALIDATION_TIMESTEPS,
    ZERO_REPO,
    looks_like_path,
    parse_size,
)


class ConfigError(ValueError):
    """A config that cannot be used; the message has one line per problem."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
    source: str = ZERO_REPO  # Hub id, diffusers folder or .safetensors
    config_dir: str | None = None  # component configs for a single-file source (default: shipped)
    tokenizer_dir: str | None = None  # folder with tokenizer/ and tokenizer_2/
    weight_dtype: Literal[DTYPE_NAMES] = "bf16"
    vae_dtype: Literal["bf16", "fp32"] = "fp32"  # never fp16: the SDXL VAE overflows
    # Frozen UNet weights stored compressed (train.model.quantize): "fp8" (Linear and Conv2d in
    # float8 with per-channel scales, about half of bf16) or "nf4" (bitsandbytes 4-bit Linear,
    # fp8 convolutions, about a third); computed in weight_dtype. For small GPUs.
    quantize: Literal["none", "fp8", "nf4"] = "none"
    # What the UNet predicts. "auto": a diffusers folder's scheduler config says; a single file is
    # v-prediction when it carries the `v_pred` key (NoobAI-XL v-pred), else epsilon. Training a
    # v-prediction model as epsilon "runs" and gives empty images, hence auto (train.model.prediction).
    prediction_type: Literal[("auto", *PREDICTION_TYPES)] = "auto"


class DataConfig(_Section):
    dataset: str  # the OUT folder written by `animagine-lora prep`
    split: str = "train"
    # Training size relative to prep's buckets: <1 trains below them (CPU demo); up to 2 above them
    # (1.25: 1280² for the card's 1024²), the card's aspect ratios on the 64-pixel grid, with
    # activation memory per image growing with the area (docs/training.md, "Memory presets").
    resolution_scale: float = Field(1.0, gt=0, le=2)
    flip: bool = False
    shuffle_captions: bool = True
    tag_dropout: float = Field(0.0, ge=0, lt=1)
    caption_dropout: float = Field(0.0, ge=0, lt=1)
    cache_text_outputs: bool = False
    max_chunks: int = Field(3, ge=1, le=8)  # 75-token chunks per caption (3 = 225 tokens)
    prefetch_batches: int = Field(2, ge=0, le=16)  # micro-batches built ahead in a thread (0: in the loop)
    # Regularization (class) images: another prep OUT folder, its "train" rows balanced 1:1 with
    # the training entries every epoch (train.data.bucket_batches); None trains without.
    regularization: str | None = None
    regularization_repeats: int | None = Field(None, ge=1)  # None: the repeats prep recorded per row
    prior_loss_weight: float = Field(1.0, ge=0)  # loss weight of a regularization sample


class BlockValues(_Section):
    """A value per UNet block for each part (`names.UNET_BLOCK_COUNTS`: 9 down, 3 mid, 9 up, in
    sd-scripts' SGM numbering: input_blocks.0-8, middle_block.0-2, output_blocks.0-8): one number
    for the whole part or a list with one per block. A part left out keeps the base value."""

    down: float | list[float] | None = None
    mid: float | list[float] | None = None
    up: float | list[float] | None = None

    @model_validator(mode="after")
    def _lengths_and_signs(self) -> BlockValues:
        for part, count in UNET_BLOCK_COUNTS.items():
            values = self.per_block(part)
            if values is not None and len(values) != count:
                raise ValueError(f"{part}: {count} values (one per block), got {len(values)}")
            if values is not None and any(v < 0 for v in values):
                raise ValueError(f"{part}: values must be >= 0")
        return self

    def per_block(self, part: str) -> list[float] | None:
        """The part's values, one per block (a single number repeated), or None when left out."""
        value = getattr(self, part)
        return [float(value)] * UNET_BLOCK_COUNTS[part] if isinstance(value, (int, float)) else value


class LoraConfig(_Section):
    type: Literal["lora", "lokr", "loha"] = "lora"  # LyCORIS LoKr / LoHa (train.lora.adapters)
    preset: Literal["attn", "attn-mlp", "attn-mlp-conv"] = "attn-mlp"
    rank: int = Field(16, ge=1)
    alpha: float = Field(16.0, gt=0)
    dora: bool = False  # type "lora" only
    init: Literal["kaiming", "gaussian"] = "kaiming"  # A's init, type "lora" only (B = 0 always)
    factor: int = -1  # LoKr: size of the small Kronecker factor (-1: near the square root)
    decompose_both: bool = False  # LoKr: factorise the small half too (w1 = w1_a @ w1_b)
    tucker: bool = False  # LoHa: Tucker form for 3x3 convolutions (hada_t1/t2)
    train_text_encoder: bool = False
    text_encoder_lr: float | None = Field(None, gt=0)  # default: optimizer.lr
    # ---- learning rates, block-wise settings and dropouts of sd-scripts' recipes (network_args)
    text_encoder_1_lr: float | None = Field(None, gt=0)  # CLIP ViT-L (default: text_encoder_lr)
    text_encoder_2_lr: float | None = Field(None, gt=0)  # OpenCLIP ViT-bigG (default: text_encoder_lr)
    # UNet lr multipliers per block (sd-scripts' down/mid/up_lr_weight); a block at 0 gets no
    # modules at all, as in sd-scripts. train.lora.blocks maps modules to blocks.
    block_lr: BlockValues | None = None
    # Plain LoRA: rank and alpha per block (sd-scripts' block_dims / block_alphas); rank 0 leaves
    # the block's modules out of the file, which every loader accepts.
    block_dims: BlockValues | None = None
    block_alphas: BlockValues | None = None
    # Plain LoRA, train.lora.dropout (sd-scripts' network_dropout, rank_dropout, module_dropout):
    # dropout on the down projection's output; whole rank components zeroed per sample (the rest
    # rescaled by 1/(1-p)); the whole module skipped for a forward with probability module_dropout.
    dropout: float = Field(0.0, ge=0, lt=1)
    rank_dropout: float = Field(0.0, ge=0, lt=1)
    module_dropout: float = Field(0.0, ge=0, lt=1)

    def encoder_lrs(self, lr: float) -> tuple[float, float]:
        """The two text encoders' learning rates: their own, else `text_encoder_lr`, else `lr` (the optimizer's)."""
        return tuple(own or self.text_encoder_lr or lr for own in (self.text_encoder_1_lr, self.text_encoder_2_lr))

    @model_validator(mode="after")
    def _settings_fit_the_type(self) -> LoraConfig:
        """Each setting belongs to one adapter type: `factor` to LoKr, `tucker` to LoHa, ..."""
        if self.type != "lora" and (self.dora or self.init != "kaiming"):
            raise ValueError(f"dora and init apply to type 'lora' only, not {self.type!r}")
        if self.type != "lokr" and (self.factor != -1 or self.decompose_both):
            raise ValueError(f"factor and decompose_both apply to type 'lokr' only, not {self.type!r}")
        if self.type != "loha" and self.tucker:
            raise ValueError(f"tucker applies to type 'loha' only, not {self.type!r}")
        if self.factor != -1 and self.factor < 2:
            raise ValueError(f"LoKr factor {self.factor}: -1 (automatic) or >= 2")
        return self

    @model_validator(mode="after")
    def _block_and_dropout_settings(self) -> LoraConfig:
        """Block ranks, alphas and the dropouts are plain LoRA's; ranks are whole numbers, alphas > 0."""
        plain_only = {"block_dims": self.block_dims, "block_alphas": self.block_alphas, "dropout": self.dropout,
                      "rank_dropout": self.rank_dropout, "module_dropout": self.module_dropout}
        used = [key for key, value in plain_only.items() if value]
        if self.type != "lora" and used:
            raise ValueError(f"{', '.join(used)} apply to type 'lora' only, not {self.type!r}")
        for part in UNET_BLOCK_COUNTS:
            dims = self.block_dims.per_block(part) if self.block_dims else None
            if dims and any(d != int(d) for d in dims):
                raise ValueError(f"block_dims.{part}: ranks are whole numbers")
            alphas = self.block_alphas.per_block(part) if self.block_alphas else None
            if alphas and any(a == 0 for a in alphas):
                raise ValueError(f"block_alphas.{part}: alphas must be > 0")
        return self


class OptimizerConfig(_Section):
    name: Literal["adamw", "adamw8bit", "adafactor", "prodigy", "came", "lion", "adamw_schedulefree"] = "adamw"
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant_with_warmup"
    warmup_steps: int = Field(0, ge=0)
    # LoRA+ (Hayou et al. 2024): the B (up) matrices learn this many times faster; 1 turns it off.
    lora_plus_ratio: float = Field(1.0, ge=1)

    @model_validator(mode="after")
    def _schedule_free_has_no_schedule(self) -> OptimizerConfig:
        if self.name == "adamw_schedulefree" and self.scheduler != "constant":
            raise ValueError("adamw_schedulefree replaces the schedule (it warms up over warmup_steps itself): "
                             "set scheduler = 'constant'")
        return self


class TrainConfig(_Section):
    max_steps: int = Field(ge=1)
    batch_size: int = Field(1, ge=1)  # per process
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_grad_norm: float | None = Field(1.0, gt=0)  # None disables clipping
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    gradient_checkpointing: bool = False
    seed: int = Field(0, ge=0, le=2**32 - 1)  # numpy's seed range (torch's is wider)
    noise_offset: float = Field(0.0, ge=0)
    min_snr_gamma: float | None = Field(None, gt=0)  # None disables the weighting
    timestep_min: int = Field(0, ge=0)
    timestep_max: int = Field(1000, ge=1)  # exclusive
    masked_loss: bool = False  # weight the loss by each image's alpha / name.mask.png (recorded by prep)
    ema_decay: float | None = Field(None, gt=0, lt=1)  # EMA of the LoRA weights (e.g. 0.999); None: off
    ema_device: Literal["gpu", "cpu"] = "gpu"  # where the fp32 EMA copy lives ("gpu": the training device)

    # --- loss and noise: sd-scripts' options of the same names (train.diffusion), so recipes carry over.
    noise_offset_random_strength: bool = False  # offset strength U(0, noise_offset) per micro-batch
    multires_noise_iterations: int = Field(0, ge=0)  # pyramid noise levels (6-10 in recipes); 0: off
    multires_noise_discount: float = Field(0.3, ge=0, le=1)  # weight of level i: discount^i
    ip_noise_gamma: float = Field(0.0, ge=0)  # input perturbation (about 0.1 in recipes); 0: off
    ip_noise_gamma_random_strength: bool = False  # gamma U(0, ip_noise_gamma) per micro-batch
    # "huber" / "smooth_l1": pseudo-Huber with c per timestep (huber_schedule), robust to outlier
    # images at high noise; "l2" is the plain MSE. The validation loss stays MSE whatever this is.
    loss_type: Literal[LOSS_TYPES] = "l2"
    huber_schedule: Literal[HUBER_SCHEDULES] = "snr"  # sd-scripts' default
    huber_c: float = Field(0.1, gt=0, le=1)
    huber_scale: float = Field(1.0, gt=0)  # "constant" and "exponential" only, as in sd-scripts
    debiased_estimation: bool = False  # weight by 1/sqrt(SNR) (v-prediction: 1/(SNR + 1), as sd-scripts)
    adaptive_noise_scale: float = 0.0  # noise offset + this x |latent channel mean| (needs noise_offset); 0: off
    scale_v_pred_loss_like_noise_pred: bool = False  # v-prediction: weight by SNR/(SNR+1), like an ε loss
    v_pred_like_loss: float = Field(0.0, ge=0)  # ε-prediction: add this x a v-like loss; 0: off
    # Rescale the noise schedule to zero terminal SNR (Lin et al. 2023) in training, validation and
    # sampling; needs v-prediction. "auto": when the model says so (`ztsnr` key, scheduler config).
    zero_terminal_snr: StrictBool | Literal["auto"] = "auto"

    @model_validator(mode="after")
    def _timestep_range(self) -> TrainConfig:
        if self.timestep_min >= self.timestep_max:
            raise ValueError("timestep_min must be smaller than timestep_max")
        return self


class SpeedConfig(_Section):
    """Speed switches, applied by `train.runtime.speed.apply_speed_settings` (the defaults change no maths)."""

    sdpa: bool = True  # diffusers' AttnProcessor2_0 (scaled_dot_product_attention) everywhere
    channels_last: bool = False  # NHWC UNet weights: faster convolutions on CUDA tensor cores
    compile: Literal["none", "regional", "full"] = "none"  # torch.compile: per transformer block or whole UNet
    cuda_graphs: bool = False  # replay the compiled step as CUDA graphs (needs compile; batch-1 speed)
    fused_lora: bool = True  # each LoRA branch's up-projection, scale and add in one kernel (addmm)
    fused_optimizer: bool = True  # AdamW's update in one fused kernel

    @model_validator(mode="after")
    def _graphs_need_compile(self) -> SpeedConfig:
        if self.cuda_graphs and self.compile == "none":
            raise ValueError("cuda_graphs needs compile = 'regional' or 'full'")
        return self


class OutputConfig(_Section):
    dir: str
    name: str = "lora"  # file stem of the exported LoRA
    save_every_n_steps: int = Field(500, ge=1)
    checkpoints_total_limit: int | None = Field(3, ge=1)  # None keeps every checkpoint
    log_every_n_steps: int = Field(10, ge=1)
    log_with: list[Literal["tensorboard", "wandb"]] = []
    wandb_project: str = "animagine-lora"
    keep_best: bool = False  # OUT/best/: the LoRA files at the lowest validation loss (needs validation)


class ValidationConfig(_Section):
    """Validation loss during training: the `eval` command's fixed-noise loss on the `val` rows."""

    every_n_steps: int = Field(0, ge=0)  # 0: off
    timesteps: list[int] = Field(list(VALIDATION_TIMESTEPS), min_length=1)  # each val image at each of these
    seed: int = 0  # noise of val image i comes from seed + i

    @model_validator(mode="after")
    def _timesteps_in_range(self) -> ValidationConfig:
        if any(not 0 <= t < 1000 for t in self.timesteps):
            raise ValueError("timesteps must be in [0, 1000)")
        return self


class SampleConfig(_Section):
    """Sample grids during training (`train.generate.hook`), at the model card's settings."""

    every_n_steps: int = Field(0, ge=0)  # 0 turns sampling off
    prompts: list[str] = []  # prompt text ((tag:1.2), escaped \\( \\)); empty: the dataset's most frequent heads
    num_default_prompts: int = Field(2, ge=1)
    seeds: list[int] = [0, 1]
    size: str = "square"  # WIDTHxHEIGHT or portrait | landscape | square
    steps: int = Field(CARD_STEPS, ge=1)
    cfg: float = Field(CARD_CFG, ge=0)
    negative: str = CARD_NEGATIVE
    strength: float = 1.0
    batch_size: int = Field(4, ge=1)
    sampler: Literal[SAMPLER_CHOICES] = "euler_ancestral"
    scheduler: Literal[SCHEDULERS] = "normal"
    noise_device: Literal[NOISE_DEVICES] = "gpu"  # ancestral noise: the sampling device or the CPU
    sample_model: Literal["opt", "train"] = "opt"  # the Opt model with the LoRA loaded, or the training model
    opt_model: str = "opt"  # 'opt', 'zero', a Hub id, a diffusers folder or a .safetensors
    opt_config_dir: str | None = None
    opt_tokenizer_dir: str | None = None

    @model_validator(mode="after")
    def _size_parses(self) -> SampleConfig:
        parse_size(self.size)  # ValueError: not WxH in multiples of 8, nor an alias
        return self


class Config(_Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig
    lora: LoraConfig = LoraConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig
    output: OutputConfig
    sample: SampleConfig = SampleConfig()  # sample grids during training (train.generate.hook)
    speed: SpeedConfig = SpeedConfig()  # UNet speed switches (train.runtime.speed)
    validation: ValidationConfig = ValidationConfig()  # validation loss during training

    @model_validator(mode="after")
    def _keep_best_needs_validation(self) -> Config:
        if self.output.keep_best and not self.validation.every_n_steps:
            raise ValueError("output.keep_best needs validation.every_n_steps > 0")
        return self

    @model_validator(mode="after")
    def _loss_fits_the_prediction_type(self) -> Config:
        if self.model.prediction_type != "auto" and (problems := prediction_problems(self.train,
                                                                                       self.model.prediction_type)):
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _zero_terminal_snr_needs_v_prediction(self) -> Config:
        if self.train.zero_terminal_snr is True and self.model.prediction_type == "epsilon":
            raise ValueError("train.zero_terminal_snr needs model.prediction_type 'v_prediction' (or 'auto' on a "
                             "v-prediction model): at zero terminal SNR the last timestep is pure noise, where "
                             "an epsilon prediction says nothing about the image (Lin et al. 2023)")
        return self

    @model_validator(mode="after")
    def _lycoris_combinations(self) -> Config:
        if self.lora.type != "lora" and self.optimizer.lora_plus_ratio != 1:
            raise ValueError(f"optimizer.lora_plus_ratio needs lora.type = 'lora' (LoRA+ speeds up LoRA's B "
                             f"matrices; {self.lora.type} has none)")
        if self.lora.type != "lora" and self.model.quantize != "none":
            raise ValueError(f"model.quantize = {self.model.quantize!r} supports lora.type = 'lora' only")
        return self


def prediction_problems(train: TrainConfig, prediction_type: str) -> list[str]:
    """The `[train]` settings that do not fit a model predicting `prediction_type`, one line each
    (checked here for an explicit `model.prediction_type`, at load for "auto", and by `--check`)."""
    problems = []
    if train.scale_v_pred_loss_like_noise_pred and prediction_type != "v_prediction":
        problems.append(f"train.scale_v_pred_loss_like_noise_pred needs a v-prediction model, not {prediction_type}")
    if train.v_pred_like_loss and prediction_type == "v_prediction":
        problems.append("train.v_pred_like_loss adds a v-like loss to an epsilon model's; this model predicts v")
    return problems


# What a checkpoint written before a resume setting existed was trained with (its manifest lacks the key).
RESUME_DEFAULTS = {"model.prediction_type": "auto", "train.zero_terminal_snr": "auto"}


def resume_settings(config: Config) -> dict:
    """The settings a checkpoint's state depends on: resuming with other values is refused, by key."""
    lora = config.lora
    return {"model.prediction_type": config.model.prediction_type,
            "train.zero_terminal_snr": config.train.zero_terminal_snr,
            "lora.type": lora.type, "lora.preset": lora.preset, "lora.rank": lora.rank, "lora.alpha": lora.alpha,
            "lora.dora": lora.dora, "lora.factor": lora.factor, "lora.decompose_both": lora.decompose_both,
            "lora.tucker": lora.tucker, "lora.train_text_encoder": lora.train_text_encoder,
            "optimizer.name": config.optimizer.name,
            # the modules that exist, their shapes and the optimizer's parameter groups
            **{f"lora.{key}": getattr(lora, key).model_dump() if getattr(lora, key) else None
               for key in ("block_lr", "block_dims", "block_alphas")}}


# Fields holding filesystem paths, resolved against the config file's folder.
_PATH_FIELDS = {
    "model": ("source", "config_dir", "tokenizer_dir"),
    "data": ("dataset", "regularization"),
    "output": ("dir",),
    "sample": ("opt_model", "opt_config_dir", "opt_tokenizer_dir"),
}
# Fields that may also name a Hub id or an alias ("opt"): resolved only when they look like paths.
_PATH_OR_NAME = {"source", "opt_model"}


def _resolve_paths(raw: dict, base: Path) -> dict:
    """A copy of `raw` with relative path fields made absolute against `base`.

    `model.source` and `sample.opt_model` are left alone when they look like a Hub id ("owner/name")
    or an alias ("opt").
    """
    resolved = {key: dict(value) if isinstance(value, dict) else value for key, value in raw.items()}
    for section, keys in _PATH_FIELDS.items():
        table = resolved.get(section)
        if not isinstance(table, dict):
            continue
        for key in keys:
            value = table.get(key)
            if not isinstance(value, str) or (key in _PATH_OR_NAME and not looks_like_path(value)):
                continue
            table[key] = str((base / Path(value).expanduser()).resolve())
    return resolved


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the field at `loc` (for did-you-mean suggestions)."""
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        # An optional table (`BlockValues | None`) is looked into like a plain one.
        annotation = next((a for a in get_args(annotation) if a is not type(None)), annotation)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return model
        model = annotation
    return model


def _describe(error: dict) -> str:
    loc = tuple(part for part in error["loc"] if not str(part).startswith("function-"))
    path = ".".join(str(part) for part in loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        owner = _model_at(loc[:-1])
        choices = list(owner.model_fields) if owner else []
        close = difflib.get_close_matches(str(loc[-1]), choices, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(choices)})"
        return f"{path}: unknown key{hint}"
    if error["type"] == "missing":
        return f"{path}: required key missing"
    message = error["msg"]
    if "input" in error and error["type"] not in ("value_error",):
        message += f" (got {error['input']!r})"
    return f"{path}: {message}"


def parse_config(raw: dict, origin: str = "config", base: Path | None = None) -> Config:
    """Validate a parsed TOML table into a `Config`.

    Args:
        raw: the TOML document as a dict.
        origin: file name for the error messages.
        base: folder that relative paths are resolved against (default: the current one).

    Raises:
        ConfigError: one line per wrong key, each "origin: toml.path: what is wrong".
    """
    try:
        return Config.model_validate(_resolve_paths(raw, base or Path.cwd()))
    except ValidationError as err:
        lines = [f"{origin}: {_describe(error)}" for error in err.errors()]
        raise ConfigError("\n".join(lines)) from None


def load_config(path: str | Path) -> Config:
    """Read and validate the TOML config at `path`.

    Raises:
        ConfigError: the file is missing, unreadable, not UTF-8, not valid TOML, or has wrong keys/values.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; pass the .toml config file") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); save the config as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file: {err.strerror or err}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from None
    return parse_config(raw, origin=str(path), base=path.resolve().parent)
