"""The training recipe: a chain of named builders, then one loop.

`train(config, resume)` reads top to bottom: accelerator, `open_run`, base model, LoRA, data
(latents cached on first use), sampler, optimizer and schedule, `accelerator.prepare`, optional
resume, loop.
Each builder takes the config fields it needs, never the whole config. Logging, validation,
checkpointing and export are each one call behind a `should_*` check. The diffusion math is
`train.diffusion`. Optional methods (issue 13): regularization images (`data.regularization`, in the
sampler and the per-sample loss weights), masked loss (`train.masked_loss`, masks in the batch),
validation loss during training (`validation.every_n_steps`, `output.keep_best`), and an EMA of the
LoRA weights (`train.ema_decay`, exported as the run's LoRA with the raw weights beside it).

Determinism: every random draw of a micro-batch (flip, caption shuffle and dropout, noise,
timesteps) comes from a generator seeded by (seed, micro-batch number, rank), and the sampler's
order is a pure function of (seed, epoch). Together with the checkpointed LoRA weights,
optimizer, LR scheduler, RNG states and `TrainState` (`train.runtime.checkpoint`, JSON and
safetensors only), a run resumed from a checkpoint continues bit for bit as the uninterrupted run
would have.

Before the model is built, `open_run` claims `output.dir` (`train.runtime.run_dir`: a lock, and
no fresh run over another run's files) and reads and checks the checkpoint to resume from, so bad
input fails in seconds, not after the model is loaded.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

from train import diffusion
from train.config import Config, DataConfig, LoraConfig, ModelConfig, OutputConfig, ValidationConfig
from train.data.bucket_batches import BucketBatchSampler
from train.data.latents import LatentCache, cache_latents, row_geometry
from train.data.prefetch import MicroBatch, micro_batch_seed, prefetched, sampler_position
from train.data.prefetch import micro_batches as build_micro_batches
from train.data.rows import (
    CaptionAugment,
    TextEmbeddingCache,
    TrainBatch,
    TrainingData,
    load_rows,
    make_caption,
)
from train.generate.hook import should_sample
from train.prep.manifest import trigger_features as prep_trigger_features
from train.runtime import checkpoint
from train.runtime.checkpoint import ResumePoint, TrainState
from train.runtime.ema import LoraEma
from train.runtime.optim import build_lr_scheduler, build_optimizer, eval_weights, lora_plus_groups
from train.runtime.run_dir import RunLock, check_output_dir, refuse_or_move_previous_run
from train.runtime.speed import apply_speed_settings
from train.runtime.tracking import DrawLog, MetricsLog, flat_config, log_image, progress_bar

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MEMORY_ADVICE = (
    "lower train.batch_size (raise train.gradient_accumulation_steps to keep the effective batch), "
    "set train.gradient_checkpointing = true, set data.cache_text_outputs = true (no caption "
    "augmentation), use optimizer.name = 'adamw8bit', keep model.weight_dtype = 'bf16', set "
    "model.quantize = 'fp8' (or 'nf4'), lower lora.rank, or set data.resolution_scale below 1; "
    "README 'Memory presets' lists settings per card size"
)


class TrainingStopped(RuntimeError):
    """The run cannot go on (non-finite loss, out of memory); the message says what to do."""


@dataclass(frozen=True)
class LossSettings:
    prediction_type: str
    noise_offset: float
    min_snr_gamma: float | None
    timestep_min: int
    timestep_max: int


# ---------------------------------------------------------------- builders


def build_accelerator(run_dir: Path, *, mixed_precision: str, gradient_accumulation_steps: int,
                      log_with: list[str], train_text_encoder: bool) -> Accelerator:
    # text_encoder's last layer feeds nothing (SDXL uses its penultimate hidden states), so its
    # LoRA gets no gradient and DDP must be told to expect unused parameters.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=train_text_encoder)
    return Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        log_with=log_with or None,
        kwargs_handlers=[ddp],
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
    )


def build_model(model: ModelConfig, device: torch.device):
    """The frozen base model on `device` (the VAE too: it encodes uncached latents).

    A UNet to be quantized stays on the CPU: `quantize_unet` moves it once compressed, so a small
    GPU never holds its full-precision weights.
    """
    from train.model.loading import load_base_model

    base = load_base_model(model.source, config_dir=model.config_dir, tokenizer_dir=model.tokenizer_dir,
                           weight_dtype=TORCH_DTYPES[model.weight_dtype], vae_dtype=TORCH_DTYPES[model.vae_dtype])
    modules = [base.vae, base.text_encoder, base.text_encoder_2]
    if model.quantize == "none":
        modules.append(base.unet)
    for module in modules:
        module.to(device)
    return base


def quantize_unet(unet, mode: str, *, compute_dtype: torch.dtype, device: torch.device) -> None:
    """Compress the frozen UNet weights (`model.quantize`), then move the UNet to `device`."""
    if mode == "none":
        return
    from train.model.quantize import frozen_weight_bytes, quantize_frozen_unet

    before = frozen_weight_bytes(unet)
    quantize_frozen_unet(unet, mode, compute_dtype)
    unet.to(device)
    logger.info("model.quantize = %s: frozen UNet weights %.2f GiB -> %.2f GiB", mode, before / 2**30,
                frozen_weight_bytes(unet) / 2**30)


def build_lora(base, lora: LoraConfig, *, lr: float, gradient_checkpointing: bool,
               lora_plus_ratio: float = 1.0) -> list[dict]:
    """Add the adapters (`lora.type`; zero delta, so step 0 is the base model); return optimizer
    param groups (with LoRA+, the B matrices in groups of their own at `lr * lora_plus_ratio`).

    Trainable parameters are kept in float32 whatever the frozen weights' dtype.
    """
    from train.lora.adapters import add_text_encoder_lora, add_unet_lora

    spec = lora.adapter_spec()
    add_unet_lora(base.unet, preset=lora.preset, rank=lora.rank, alpha=lora.alpha, spec=spec)
    encoders = (base.text_encoder, base.text_encoder_2) if lora.train_text_encoder else ()
    for encoder in encoders:
        add_text_encoder_lora(encoder, rank=lora.rank, alpha=lora.alpha, spec=spec)
    if gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
        for encoder in encoders:
            # Non-reentrant: the frozen embeddings' outputs do not require grad, the LoRA inside does.
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    groups = lora_plus_groups(_trainable(base.unet), lr, lora_plus_ratio)
    te_params = [named for encoder in encoders for named in _trainable(encoder)]
    if te_params:
        groups += lora_plus_groups(te_params, lora.text_encoder_lr or lr, lora_plus_ratio)
    return groups


def _trainable(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    for _, p in named:
        p.data = p.data.float()
    return named


def build_data(data: DataConfig, base, accelerator: Accelerator, *, masked_loss: bool) -> TrainingData:
    """Rows of the prepped dataset (and of the regularization set) with every latent cached
    (encoded here when missing)."""

    def cached(dataset: str, split: str) -> tuple[list[dict], LatentCache]:
        rows = load_rows(dataset, split)
        cache = LatentCache(dataset, base.vae_fingerprint, base.vae.config.scaling_factor, data.resolution_scale)
        cache_latents(rows, base.vae, cache, flip=data.flip, rank=accelerator.process_index,
                      world_size=accelerator.num_processes, progress=accelerator.is_local_main_process)
        return rows, cache

    rows, cache = cached(data.dataset, data.split)
    reg_rows, reg_cache = [], None
    if data.regularization:
        reg_rows, reg_cache = cached(data.regularization, "train")
        if data.regularization_repeats:
            reg_rows = [{**row, "repeats": data.regularization_repeats} for row in reg_rows]
        logger.info("data.regularization: %d class images, prior_loss_weight %g", len(reg_rows),
                    data.prior_loss_weight)
    accelerator.wait_for_everyone()
    if masked_loss:
        masked = sum(bool(row["mask_path"]) for row in [*rows, *reg_rows])
        logger.info("train.masked_loss: %d of %d images have a mask (alpha or name.mask.png); the others "
                    "train on every pixel", masked, len(rows) + len(reg_rows))
    augment = CaptionAugment(data.shuffle_captions, data.tag_dropout, data.caption_dropout)
    return TrainingData(rows, cache, augment, flip=data.flip, reg_rows=reg_rows, reg_cache=reg_cache,
                        prior_loss_weight=data.prior_loss_weight, masked=masked_loss)


def build_text_encoder_fn(base, *, max_chunks: int, train_text_encoder: bool, cached_captions: list[str] | None,
                          device: torch.device):
    """captions -> (prompt_embeds, pooled): `encode_prompts` bound to the model.

    With `cached_captions` (no caption augmentation, frozen encoders), every caption is encoded
    now and kept in CPU memory, and the text encoders leave the GPU (1.6 GiB in bf16 on SDXL):
    training never runs them again.
    """
    from train.data.text_encoding import encode_prompts

    tokenizers = (base.tokenizer, base.tokenizer_2)
    encoders = (base.text_encoder, base.text_encoder_2)

    def encode(captions: list[str]):
        with torch.set_grad_enabled(train_text_encoder and torch.is_grad_enabled()):
            return encode_prompts(captions, tokenizers, encoders, max_chunks=max_chunks)

    if cached_captions is None:
        return encode
    cache = TextEmbeddingCache(encode, device)
    with torch.no_grad():
        cache.precompute(cached_captions)
    if device.type != "cpu":
        for encoder in encoders:
            encoder.to("cpu")
        torch.cuda.empty_cache()
    logger.info("data.cache_text_outputs: %d captions encoded; text encoders moved off the %s", len(cache),
                device.type)
    return cache


def build_sampler(rows: list[dict], reg_rows: list[dict], *, batch_size: int, seed: int,
                  accelerator: Accelerator) -> BucketBatchSampler:
    sampler = BucketBatchSampler(
        [(r["bucket_width"], r["bucket_height"]) for r in rows], [r["repeats"] for r in rows],
        batch_size=batch_size, num_replicas=accelerator.num_processes, rank=accelerator.process_index, seed=seed,
        reg_buckets=[(r["bucket_width"], r["bucket_height"]) for r in reg_rows],
        reg_repeats=[r["repeats"] for r in reg_rows])
    for line in sampler.report():
        logger.warning("%s", line)
    return sampler


def build_sample_hook(sample, base, *, run_dir: Path, accelerator: Accelerator, rows: list[dict],
                      weight_dtype: torch.dtype):
    """The training-time sampler (main process only), or None when `sample.every_n_steps` is 0."""
    if sample.every_n_steps == 0 or not accelerator.is_main_process:
        return None
    from train.generate.hook import TrainingSampler

    return TrainingSampler(sample, train_model=base, out_dir=run_dir, device=accelerator.device,
                           dataset_heads=[row["caption_head"] for row in rows], weight_dtype=weight_dtype)


def build_validation(validation: ValidationConfig, dataset: str, *, scale: float, base, accelerator: Accelerator):
    """This rank's share of the validation loss (every num_processes-th `val` row), its latents
    encoded now; None when validation is off or the share is empty.

    Raises:
        ValueError: validation is on but the dataset has no `val` rows.
    """
    if not validation.every_n_steps:
        return None
    from train.evaluate.validation import ValidationLoss, dataset_sources, encode_items

    try:
        sources = dataset_sources(dataset, scale)
    except ValueError as err:
        raise ValueError(f"validation.every_n_steps is set but {err}: give the prep recipe a val_fraction, "
                         "or set validation.every_n_steps = 0") from None
    share = sources[accelerator.process_index::accelerator.num_processes]
    if not share:
        return None
    return ValidationLoss(encode_items(share, base.vae), base.noise_scheduler, base.prediction_type,
                          validation.timesteps, validation.seed)


def build_ema(trained: list, decay: float | None, where: str, accelerator: Accelerator) -> LoraEma | None:
    """The EMA of every trainable weight (train.ema_decay), named by module, or None when off."""
    if decay is None:
        return None
    names = ("unet", "text_encoder", "text_encoder_2")
    named = [(f"{names[i]}.{name}", p) for i, module in enumerate(trained)
             for name, p in accelerator.unwrap_model(module).named_parameters() if p.requires_grad]
    return LoraEma(named, decay, accelerator.device if where == "gpu" else "cpu")


# ---------------------------------------------------------------- one step


def loss_step(unet, batch: TrainBatch, text, settings: LossSettings, alphas_cumprod: torch.Tensor,
              generator: torch.Generator, device: torch.device, model_dtype: torch.dtype) -> torch.Tensor:
    """The diffusion loss of one micro-batch (scalar, float32); `unet` may be DDP-wrapped."""
    latents = batch.latents.to(device, non_blocking=True)  # (B, 4, H/8, W/8); pinned when prefetched
    noise = diffusion.sample_noise(latents, generator, settings.noise_offset)
    timesteps = diffusion.sample_timesteps(len(latents), generator, settings.timestep_min, settings.timestep_max)
    noisy = diffusion.add_noise(latents, noise, timesteps, alphas_cumprod)
    prompt_embeds, pooled = text(batch.captions)  # (B, 77k, D), (B, P)
    prediction = unet(
        noisy.to(model_dtype), timesteps.to(device), encoder_hidden_states=prompt_embeds,
        added_cond_kwargs={"text_embeds": pooled, "time_ids": batch.time_ids.to(device, non_blocking=True)},
    ).sample
    target = diffusion.training_target(settings.prediction_type, latents, noise, timesteps, alphas_cumprod)
    weights = batch.loss_weights  # (B,): prior_loss_weight on regularization samples
    if settings.min_snr_gamma:
        snr_weights = diffusion.min_snr_weight(diffusion.snr(timesteps, alphas_cumprod), settings.min_snr_gamma,
                                               settings.prediction_type)
        weights = snr_weights if weights is None else weights * snr_weights
    return diffusion.weighted_mse(prediction, target, weights, batch.masks)


# ---------------------------------------------------------------- checkpoints and export


def build_exporter(accelerator: Accelerator, base, lora: LoraConfig, output: OutputConfig, rows: list[dict],
                  *, source: str, resolution: tuple[int, int], num_reg_images: int, ema: LoraEma | None,
                  trigger_features: dict[str, list[str]] | None = None):
    """`export(folder, step)`: the WebUI file (LyCORIS format for LoKr / LoHa) and the diffusers folder
    of the current adapter. `trigger_features` (the prep output's folded tags) go into the WebUI
    file's metadata (train.lora.trigger).

    With an EMA the averaged weights are the run's LoRA (`NAME.safetensors`, `diffusers/`) and the
    raw weights go beside them (`NAME-raw.safetensors`, `diffusers-raw/`).
    """
    from train.lora.export import (
        lycoris_network_args,
        save_diffusers_lora,
        save_webui_lora,
        webui_metadata,
    )
    from train.lora.trigger import trigger_metadata

    tag_frequency: dict[str, Counter] = {}
    for row in rows:
        tags = [*row["caption_head"], *row["caption_body"], *row["caption_tail"]]
        tag_frequency.setdefault(row["source"] or "dataset", Counter()).update(tags)
    network_args = None if lora.type == "lora" else lycoris_network_args(
        algo=lora.type, rank=lora.rank, alpha=lora.alpha, conv=lora.preset == "attn-mlp-conv", factor=lora.factor,
        decompose_both=lora.decompose_both, tucker=lora.tucker)

    def write(folder: Path, step: int, suffix: str) -> None:
        encoders = {}
        if lora.train_text_encoder:
            encoders = {"text_encoder": accelerator.unwrap_model(base.text_encoder),
                        "text_encoder_2": accelerator.unwrap_model(base.text_encoder_2)}
        unet = accelerator.unwrap_model(base.unet)
        metadata = webui_metadata(
            rank=lora.rank, alpha=lora.alpha, output_name=output.name, resolution=resolution,
            tag_frequency={k: dict(v) for k, v in tag_frequency.items()},
            comment=f"animagine-lora, preset {lora.preset}", base_model=source,
            prediction_type=base.prediction_type, conv=lora.preset == "attn-mlp-conv",
            extra={"ss_steps": step, "ss_num_train_images": len(rows), "ss_num_reg_images": num_reg_images,
                   **({"ss_ema_decay": ema.decay} if ema is not None and not suffix else {}),
                   **trigger_metadata(trigger_features or {})},
            network_args=network_args)
        # The WebUI loaders disagree on DoRA's magnitude axis and diffusers drops it on load, so
        # a DoRA run gets the diffusers folder only (train.lora.export refuses a WebUI DoRA file).
        if not lora.dora:
            save_webui_lora(Path(folder) / f"{output.name}{suffix}.safetensors", unet=unet, metadata=metadata,
                            **encoders)
        save_diffusers_lora(Path(folder) / f"diffusers{suffix}", unet=unet, **encoders)

    def export(folder: Path, step: int) -> None:
        if ema is None:
            write(folder, step, "")
            return
        write(folder, step, "-raw")
        with ema.applied():
            write(folder, step, "")

    if lora.dora:
        logger.warning("lora.dora = true: only the diffusers-format LoRA is exported (no WebUI/ComfyUI file)")
    return export


# ---------------------------------------------------------------- the loop


@dataclass
class Components:
    """What `setup` built: everything the loop touches, prepared by accelerate."""

    accelerator: Accelerator
    base: object  # train.model.loading.BaseModel, trained modules DDP-wrapped
    trained: list  # the prepared modules carrying adapters (UNet, then text encoders if trained)
    params: list  # trainable parameters, for clipping
    data: TrainingData
    sampler: BucketBatchSampler
    text: object  # captions -> (prompt_embeds, pooled)
    optimizer: object
    lr_scheduler: object
    settings: LossSettings
    model_dtype: torch.dtype
    export: object  # export(folder, step)
    sample_hook: object | None
    resumable: dict  # name -> object with state_dict()/load_state_dict(), saved in each checkpoint
    resume_settings: dict  # `resume_settings(config)`, recorded in each checkpoint
    cuda_graphs: bool = False  # speed.cuda_graphs: each micro-batch starts a new graph replay
    ema: LoraEma | None = None  # train.ema_decay
    validation: object | None = None  # this rank's ValidationLoss share (None: off or no share)


def setup(config: Config, accelerator: Accelerator) -> Components:
    """The builder chain, in the order its dependencies impose (each comment says why)."""
    tc, oc = config.train, config.optimizer
    # Same seed on every rank before the adapters exist: identical LoRA initialisation.
    torch.manual_seed(tc.seed)
    base = build_model(config.model, accelerator.device)
    param_groups = build_lora(base, config.lora, lr=oc.lr, gradient_checkpointing=tc.gradient_checkpointing,
                              lora_plus_ratio=oc.lora_plus_ratio)
    # After the adapters: PEFT gives a new adapter its base layer's dtype, which for fp8 would ruin it.
    quantize_unet(base.unet, config.model.quantize, compute_dtype=TORCH_DTYPES[config.model.weight_dtype],
                  device=accelerator.device)
    # After the adapters (a compiled region must contain the LoRA branches), before DDP wraps the UNet.
    apply_speed_settings(base.unet, config.speed)
    # Latents are cached here, before training, so the VAE is used only now (and for sample grids).
    data = build_data(config.data, base, accelerator, masked_loss=tc.masked_loss)
    validation = build_validation(config.validation, config.data.dataset, scale=config.data.resolution_scale,
                                  base=base, accelerator=accelerator)
    if accelerator.device.type != "cpu":
        base.vae.to("cpu")
    sampler = build_sampler(data.rows, data.reg_rows, batch_size=tc.batch_size, seed=tc.seed, accelerator=accelerator)
    optimizer = build_optimizer(oc.name, param_groups, lr=oc.lr, weight_decay=oc.weight_decay, betas=oc.betas, eps=oc.eps,
                                fused=config.speed.fused_optimizer, warmup_steps=oc.warmup_steps)
    lr_scheduler = build_lr_scheduler(oc.scheduler, optimizer, warmup_steps=oc.warmup_steps, total_steps=tc.max_steps)

    # Only modules with adapters are prepared (DDP-wrapped). The LR scheduler is not: accelerate
    # would step it once per process; we step it once per optimizer step and checkpoint it ourselves.
    trained = [base.unet] + ([base.text_encoder, base.text_encoder_2] if config.lora.train_text_encoder else [])
    *trained, optimizer = accelerator.prepare(*trained, optimizer)
    base.unet = trained[0]
    if config.lora.train_text_encoder:
        base.text_encoder, base.text_encoder_2 = trained[1], trained[2]
    # After prepare: a trained text encoder must be called through its DDP wrapper to sync grads.
    cache_text = config.data.cache_text_outputs and not data.augment.active and not config.lora.train_text_encoder
    if config.data.cache_text_outputs and not cache_text:
        logger.warning("data.cache_text_outputs ignored: captions change per draw (shuffle/dropout) "
                       "or the text encoders are trained")
    captions = [make_caption(r["caption_head"], r["caption_body"], r["caption_tail"], random.Random(0), data.augment)
                for r in [*data.rows, *data.reg_rows]] if cache_text else None  # augmentation off: one per row
    text = build_text_encoder_fn(base, max_chunks=config.data.max_chunks,
                                 train_text_encoder=config.lora.train_text_encoder, cached_captions=captions,
                                 device=accelerator.device)
    resumable = {f"adapter_{i}": checkpoint.TrainableWeights(accelerator.unwrap_model(module), f"adapter_{i}")
                 for i, module in enumerate(trained)}
    resumable |= {"optimizer": optimizer, "lr_scheduler": lr_scheduler}

    # The recorded training resolution: the largest bucket, at the training scale.
    largest = max(data.rows, key=lambda r: r["bucket_width"] * r["bucket_height"])
    geometry = row_geometry(largest, config.data.resolution_scale)
    # After prepare, so the EMA starts from the weights as placed on the device.
    ema = build_ema(trained, tc.ema_decay, tc.ema_device, accelerator)
    if ema is not None:
        resumable["ema"] = ema
    export = build_exporter(accelerator, base, config.lora, config.output, data.rows, source=config.model.source,
                            resolution=(geometry.width, geometry.height), num_reg_images=len(data.reg_rows), ema=ema,
                            trigger_features=prep_trigger_features(config.data.dataset))
    params = [p for g in param_groups for p in g["params"]]
    export = _exporting_eval_weights(export, optimizer, params)
    model_dtype = TORCH_DTYPES[config.model.weight_dtype]
    sample_hook = build_sample_hook(config.sample, base, run_dir=Path(config.output.dir), accelerator=accelerator,
                                    rows=data.rows, weight_dtype=model_dtype)
    return Components(
        accelerator, base, trained, params, data, sampler, text, optimizer,
        lr_scheduler, LossSettings(base.prediction_type, tc.noise_offset, tc.min_snr_gamma, tc.timestep_min,
                                   tc.timestep_max), model_dtype, export, sample_hook, resumable,
        resume_settings(config), config.speed.cuda_graphs, ema, validation)


def optimizer_step(c: Components, micro_batches: Iterator[MicroBatch], state: TrainState, *, seed: int,
                   accumulation: int, max_grad_norm: float | None, run_dir: Path,
                   draws: DrawLog) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over `accumulation` micro-batches; returns (mean loss, grad norm) as
    device tensors: reading them waits for the GPU, so the loop does that only when it logs."""
    accelerator = c.accelerator
    total = torch.zeros((), device=accelerator.device)
    for _ in range(accumulation):
        micro = next(micro_batches)
        draws.write(state.step + 1, micro.batch, micro.data.ids)
        if c.cuda_graphs:
            # Tells inductor's CUDA-graph trees that the previous iteration's outputs are dead, so
            # the graphs' memory can be reused (PyTorch's documented pattern for training loops).
            torch.compiler.cudagraph_mark_step_begin()
        with accelerator.accumulate(*c.trained):
            loss = loss_step(c.base.unet, micro.data, c.text, c.settings, c.base.noise_scheduler.alphas_cumprod,
                             torch.Generator().manual_seed(micro_batch_seed(seed, micro.number,
                                                                            accelerator.process_index)),
                             accelerator.device, c.model_dtype)
            flags = nonfinite_flags(accelerator, loss)
            accelerator.backward(loss)
            # Checked with the backward already queued: the host waits for the forward's flag while
            # the GPU stays busy, and the optimizer has not touched the weights yet.
            stop_if_not_finite(accelerator, flags, loss, state, micro, run_dir, c)
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(c.params, max_grad_norm or math.inf)
            c.optimizer.step()
            c.optimizer.zero_grad(set_to_none=True)
        total += loss.detach() / accumulation
    state.epoch = micro.batch.epoch
    state.sampler = sampler_position(micro.batch)
    return total, grad_norm


def resume_settings(config: Config) -> dict:
    """The settings a checkpoint's state depends on: resuming with other values is refused, by key."""
    lora = config.lora
    return {"lora.type": lora.type, "lora.preset": lora.preset, "lora.rank": lora.rank, "lora.alpha": lora.alpha,
            "lora.dora": lora.dora, "lora.factor": lora.factor, "lora.decompose_both": lora.decompose_both,
            "lora.tucker": lora.tucker, "lora.train_text_encoder": lora.train_text_encoder,
            "optimizer.name": config.optimizer.name}


def open_run(run_dir: Path, resume: str | None, *, overwrite: bool, inexact: bool, settings: dict,
             accelerator: Accelerator) -> tuple[ResumePoint | None, RunLock | None]:
    """Claim `run_dir` and read the checkpoint to resume from (None: a fresh start).

    Only the main process locks the folder and deals with an earlier run's files; under
    `accelerate launch` a rank that fails here ends the whole launch.

    Raises:
        RunDirError: output.dir is a file, is locked by another run, or holds another run.
        StateFileError, ResumeError: no usable checkpoint (see `checkpoint.find_resume_point`).
    """
    check_output_dir(run_dir)
    lock = RunLock(run_dir) if accelerator.is_main_process else None
    try:
        point = checkpoint.find_resume_point(resume, run_dir, rank=accelerator.process_index, settings=settings,
                                             inexact=inexact) if resume else None
        if resume and point is None:
            logger.info("no complete checkpoint in %s: starting from step 0", run_dir)
        if point is None and accelerator.is_main_process:
            refuse_or_move_previous_run(run_dir, overwrite=overwrite, resuming=resume is not None)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    accelerator.wait_for_everyone()
    return point, lock


def train(config: Config, resume: str | None = None, *, overwrite: bool = False, resume_inexact: bool = False) -> Path:
    """Train a LoRA as configured; returns the run folder (LoRA files at its top level).

    Args:
        resume: "latest" (the newest usable checkpoint in output.dir, or a fresh start when there
            is none) or a checkpoint folder.
        overwrite: a fresh run may move an earlier run's files in output.dir aside (`train.runtime.run_dir`).
        resume_inexact: resume even from a checkpoint missing this process's random states.

    Raises:
        TrainingStopped: non-finite loss or out of memory, with what to do next.
        RunDirError, StateFileError, ResumeError: output.dir or the checkpoint cannot be used.
    """
    run_dir, tc = Path(config.output.dir), config.train
    # First: it knows which process is the main one (the one that locks), and loads nothing.
    accelerator = build_accelerator(run_dir, mixed_precision=tc.mixed_precision,
                                    gradient_accumulation_steps=tc.gradient_accumulation_steps,
                                    log_with=config.output.log_with, train_text_encoder=config.lora.train_text_encoder)
    point, lock = open_run(run_dir, resume, overwrite=overwrite, inexact=resume_inexact,
                           settings=resume_settings(config), accelerator=accelerator)
    try:
        return _train(config, accelerator, point)
    finally:
        if lock is not None:
            lock.release()


def _train(config: Config, accelerator: Accelerator, point: ResumePoint | None) -> Path:
    run_dir, tc = Path(config.output.dir), config.train
    state = TrainState(seed=tc.seed)
    c = setup(config, accelerator)
    resume_from = point.folder if point is not None else None
    if point is not None:
        checkpoint.restore(point, state, c.resumable)  # weights, optimizer, LR scheduler, `state`, RNG
        c.sampler.load_state_dict(state.sampler)
        logger.info("resumed from %s at step %d", point.folder, state.step)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        accelerator.init_trackers(config.output.wandb_project, config=flat_config(config.model_dump()),
                                  init_kwargs={"wandb": {"name": config.output.name, "dir": str(run_dir)}})
    draws = DrawLog(run_dir / "draws" / f"rank{accelerator.process_index}.jsonl", append=resume_from is not None)
    log = MetricsLog(run_dir / "log.jsonl", enabled=accelerator.is_main_process, append=resume_from is not None)
    progress = progress_bar(tc.max_steps, state.step, accelerator.is_main_process)

    micro_batches = prefetched(
        build_micro_batches(c.sampler.batches(), c.data, seed=tc.seed, rank=accelerator.process_index,
                            start=state.step * tc.gradient_accumulation_steps,
                            pin_memory=accelerator.device.type == "cuda" and config.data.prefetch_batches > 0),
        config.data.prefetch_batches)
    c.base.unet.train()
    postfix: dict[str, str] = {}
    started, images_at_start = time.perf_counter(), state.images_seen
    while state.step < tc.max_steps:
        lr = c.lr_scheduler.get_last_lr()[0]  # the rate this step uses
        try:
            loss, grad_norm = optimizer_step(c, micro_batches, state, seed=tc.seed,
                                             accumulation=tc.gradient_accumulation_steps,
                                             max_grad_norm=tc.max_grad_norm, run_dir=run_dir, draws=draws)
        except torch.cuda.OutOfMemoryError as err:
            raise TrainingStopped(f"out of memory at step {state.step + 1}: {MEMORY_ADVICE}") from err
        c.lr_scheduler.step()
        state.step += 1
        state.images_seen += tc.batch_size * tc.gradient_accumulation_steps * accelerator.num_processes
        if c.ema is not None:
            c.ema.update(state.step)
        progress.update(1)

        # Only here are loss and grad norm read back from the device (a wait for the GPU).
        if should_log(state.step, config.output.log_every_n_steps, tc.max_steps):
            metrics = {"loss": accelerator.gather(loss[None]).mean().item(), "lr": lr, "grad_norm": grad_norm.item(),
                       "images_per_s": (state.images_seen - images_at_start) / (time.perf_counter() - started),
                       "epoch": state.epoch}
            postfix.update(loss=f"{metrics['loss']:.4f}", epoch=state.epoch)
            progress.set_postfix(postfix)
            if torch.cuda.is_available():
                metrics["gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
            accelerator.log(metrics, step=state.step)
            log.write(state.step, metrics)
        if should_validate(state.step, config.validation.every_n_steps, tc.max_steps):
            with eval_weights(c.optimizer, c.params):  # schedule-free: its average, as exported
                val_loss = validation_loss(c)
            accelerator.log({"val_loss": val_loss}, step=state.step)
            log.write(state.step, {"val_loss": val_loss})
            postfix["val_loss"] = f"{val_loss:.4f}"
            progress.set_postfix(postfix)
            if config.output.keep_best and (state.best_val_loss is None or val_loss < state.best_val_loss):
                state.best_val_loss = val_loss
                if accelerator.is_main_process:
                    checkpoint.save_best(run_dir, state.step, val_loss, c.export)
        if c.sample_hook is not None and should_sample(state.step, config.sample):
            # The grid shows the weights that get exported: schedule-free's average, the EMA when on.
            with modules_on(accelerator.device, c.base.vae, c.base.text_encoder, c.base.text_encoder_2), \
                    eval_weights(c.optimizer, c.params), (c.ema.applied() if c.ema is not None else nullcontext()):
                grid = c.sample_hook.render_grid(state.step, **_unwrapped(accelerator, c.trained))
            log_image(accelerator.trackers, "samples", grid, state.step)
        if should_save(state.step, config.output.save_every_n_steps, tc.max_steps):
            checkpoint.save_checkpoint(accelerator, run_dir, state, c.resumable, c.export,
                                       config.output.checkpoints_total_limit, c.resume_settings)

    progress.close()
    micro_batches.close()  # the prefetch thread, or the plain generator
    if accelerator.is_main_process:
        c.export(run_dir, state.step)
    checkpoint.write_rank_weights(run_dir, accelerator, c.base.unet)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir


def _exporting_eval_weights(export, optimizer, params: list):
    """`export` run on the weights to evaluate (schedule-free AdamW's average; see `eval_weights`)."""

    def export_eval(folder: Path, step: int) -> None:
        with eval_weights(optimizer, params):
            export(folder, step)

    return export_eval


@contextmanager
def modules_on(device: torch.device, *modules: torch.nn.Module):
    """Modules moved to `device` for the block and back where they were (text encoders that
    cached text outputs sent to the CPU come back for sample grids)."""
    moved = [(m, home) for m in modules if (home := next(m.parameters()).device).type != device.type]
    for module, _ in moved:
        module.to(device)
    try:
        yield
    finally:
        for module, home in moved:
            module.to(home)


def _unwrapped(accelerator: Accelerator, trained: list) -> dict:
    names = ("unet", "text_encoder", "text_encoder_2")
    return {name: accelerator.unwrap_model(module) for name, module in zip(names, trained)}


def should_log(step: int, every: int, max_steps: int) -> bool:
    return step % every == 0 or step == max_steps


def should_save(step: int, every: int, max_steps: int) -> bool:
    return step % every == 0 or step == max_steps


def should_validate(step: int, every: int, max_steps: int) -> bool:
    return every > 0 and (step % every == 0 or step == max_steps)


def validation_loss(c: Components) -> float:
    """The fixed-noise validation loss of the weights being exported (the EMA when on): each rank
    computes its share of the `val` images, the sums and counts are added over the ranks."""
    accelerator, base = c.accelerator, c.base
    unet = accelerator.unwrap_model(base.unet)
    encoders = (accelerator.unwrap_model(base.text_encoder), accelerator.unwrap_model(base.text_encoder_2))
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # (sum of losses, images)
    if c.validation is not None:
        unet.eval()
        with modules_on(accelerator.device, *encoders), accelerator.autocast(), \
                (c.ema.applied() if c.ema is not None else nullcontext()):
            losses = c.validation.item_losses(unet, (base.tokenizer, base.tokenizer_2), encoders)
        unet.train()
        total += torch.tensor([sum(losses), len(losses)], dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(total, "sum")
    return (total[0] / total[1]).item()


def nonfinite_flags(accelerator: Accelerator, loss: torch.Tensor) -> tuple[torch.Tensor, object]:
    """Every rank's "loss is not finite" flag, on its way to the host: (flags, CUDA event or None).

    The copy is queued right after the forward, so `stop_if_not_finite` waits for the forward
    only, not for the backward queued after it.
    """
    flags = accelerator.gather((~torch.isfinite(loss.detach())).float().reshape(1))  # (num_processes,)
    if flags.device.type != "cuda":
        return flags, None
    event = torch.cuda.Event()
    flags = flags.to("cpu", non_blocking=True)
    event.record()
    return flags, event


def stop_if_not_finite(accelerator: Accelerator, flags: tuple[torch.Tensor, object], loss: torch.Tensor,
                       state: TrainState, micro: MicroBatch, run_dir: Path, c: Components) -> None:
    """Stop every rank when any rank's loss is NaN/inf, keeping a checkpoint from before the step.

    `flags` is `nonfinite_flags(...)`. The optimizer has not stepped yet, so the weights and
    `state` are still those after step `state.step`; they are checkpointed unless that checkpoint
    already exists.
    """
    bad_ranks, event = flags
    if event is not None:
        event.synchronize()
    if not bad_ranks.any():
        return
    kept = checkpoint.list_checkpoints(run_dir)
    if state.step > 0 and not any(p.name == checkpoint.checkpoint_name(state.step) for p in kept):
        checkpoint.save_checkpoint(accelerator, run_dir, state, c.resumable, c.export, None,
                                   c.resume_settings)
    kept = checkpoint.list_checkpoints(run_dir)
    where = kept[-1] if kept else "none (the failure came before the first step)"
    bad_here = bad_ranks[accelerator.process_index].item() > 0
    images = ", ".join(micro.data.ids) if bad_here else "(on another rank)"
    raise TrainingStopped(
        f"loss is {loss.item()} at step {state.step + 1} (epoch {micro.batch.epoch}, batch {micro.batch.index}); "
        f"images: {images}; last checkpoint: {where}. Check those images and their cached latents, "
        "or lower optimizer.lr / use mixed_precision = 'bf16' instead of 'fp16'"
    )
