"""The training recipe: `train()` claims the run, `setup()` chains the builders, then one loop.

Read top to bottom: `train` (claim `output.dir`, read the checkpoint to resume from), `_train` (the
loop: one optimizer step, then logging, validation, sample grids and checkpoints, each behind a
`should_*` check), `setup` (the builders in the order their dependencies impose), the builders.
Each builder takes the config fields it needs, never the whole config. The loss of a micro-batch is
`train.loss`, its math `train.diffusion`; exports are `train.lora.export.RunExporter`; checkpoints
and resume `train.runtime.checkpoint`; the NaN guard `train.runtime.nonfinite`.

Determinism: every random draw of a micro-batch (flip, caption shuffle and dropout, noise,
timesteps) comes from a generator seeded by (seed, micro-batch number, rank), and the sampler's
order is a pure function of (seed, epoch). Together with the checkpointed LoRA weights, optimizer,
LR scheduler, RNG states and `TrainState`, a run resumed from a checkpoint continues bit for bit
as the uninterrupted run would have.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

from train.config import Config, DataConfig, LoraConfig, resume_settings
from train.data.bucket_batches import BucketBatchSampler
from train.data.latents import LatentCache, cache_latents, row_geometry
from train.data.prefetch import MicroBatch, micro_batch_seed, prefetched, sampler_position
from train.data.prefetch import micro_batches as build_micro_batches
from train.data.rows import CaptionAugment, TrainingData, load_rows, make_caption
from train.data.text_encoding import text_encoder_fn
from train.evaluate.validation import validation_share
from train.generate.hook import should_sample
from train.lora.export import RunExporter
from train.loss import LossSettings, loss_step, training_metadata
from train.model.loading import TORCH_DTYPES, load_model, modules_on
from train.model.quantize import quantize_unet
from train.prep.manifest import trigger_features
from train.runtime import checkpoint
from train.runtime.checkpoint import ResumePoint, TrainState
from train.runtime.ema import LoraEma, build_ema
from train.runtime.nonfinite import nonfinite_flags, out_of_memory, stop_if_not_finite
from train.runtime.optim import build_lr_scheduler, build_optimizer, eval_weights
from train.runtime.speed import apply_speed_settings
from train.runtime.tracking import DrawLog, MetricsLog, flat_config, log_image, progress_bar

logger = logging.getLogger(__name__)
TRAINED_NAMES = ("unet", "text_encoder", "text_encoder_2")  # the modules that can carry adapters


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
    tc = config.train
    # First: it knows which process is the main one (the one that locks), and loads nothing.
    accelerator = build_accelerator(Path(config.output.dir), mixed_precision=tc.mixed_precision,
                                    gradient_accumulation_steps=tc.gradient_accumulation_steps,
                                    log_with=config.output.log_with, train_text_encoder=config.lora.train_text_encoder)
    point, lock = checkpoint.open_run(Path(config.output.dir), resume, overwrite=overwrite, inexact=resume_inexact,
                                      settings=resume_settings(config), accelerator=accelerator)
    try:
        return _train(config, accelerator, point)
    finally:
        if lock is not None:
            lock.release()


def _train(config: Config, accelerator: Accelerator, point: ResumePoint | None) -> Path:
    run_dir, tc, out = Path(config.output.dir), config.train, config.output
    state = TrainState(seed=tc.seed)
    c = setup(config, accelerator)
    if point is not None:
        checkpoint.restore(point, state, c.resumable)  # weights, optimizer, LR scheduler, `state`, RNG
        c.sampler.load_state_dict(state.sampler)
        logger.info("resumed from %s at step %d", point.folder, state.step)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        accelerator.init_trackers(out.wandb_project, config=flat_config(config.model_dump()),
                                  init_kwargs={"wandb": {"name": out.name, "dir": str(run_dir)}})
    resumed = point is not None
    draws = DrawLog(run_dir / "draws" / f"rank{accelerator.process_index}.jsonl", append=resumed)
    log = MetricsLog(run_dir / "log.jsonl", enabled=accelerator.is_main_process, append=resumed)
    progress = progress_bar(tc.max_steps, state.step, accelerator.is_main_process)
    micro_batches = prefetched(
        build_micro_batches(c.sampler.batches(), c.data, seed=tc.seed, rank=accelerator.process_index,
                            start=state.step * tc.gradient_accumulation_steps,
                            pin_memory=accelerator.device.type == "cuda" and config.data.prefetch_batches > 0),
        config.data.prefetch_batches)
    save = functools.partial(checkpoint.save_checkpoint, accelerator, run_dir, state, c.resumable, c.export)
    save_before_step = functools.partial(save, None, c.resume_settings)  # for a non-finite loss: keeps all
    c.base.unet.train()
    postfix: dict[str, str] = {}
    started, images_at_start = time.perf_counter(), state.images_seen
    while state.step < tc.max_steps:
        lr = c.lr_scheduler.get_last_lr()[0]  # the rate this step uses
        try:
            loss, grad_norm = optimizer_step(c, micro_batches, state, seed=tc.seed,
                                             accumulation=tc.gradient_accumulation_steps,
                                             max_grad_norm=tc.max_grad_norm, draws=draws,
                                             save_now=save_before_step)
        except torch.cuda.OutOfMemoryError as err:
            raise out_of_memory(state.step + 1) from err
        c.lr_scheduler.step()
        state.step += 1
        state.images_seen += tc.batch_size * tc.gradient_accumulation_steps * accelerator.num_processes
        if c.ema is not None:
            c.ema.update(state.step)
        progress.update(1)

        # Only here are loss and grad norm read back from the device (a wait for the GPU).
        if should_log(state.step, out.log_every_n_steps, tc.max_steps):
            metrics = {"loss": accelerator.gather(loss[None]).mean().item(), "lr": lr, "grad_norm": grad_norm.item(),
                       "images_per_s": (state.images_seen - images_at_start) / (time.perf_counter() - started),
                       "epoch": state.epoch}
            if torch.cuda.is_available():
                metrics["gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
            postfix.update(loss=f"{metrics['loss']:.4f}", epoch=state.epoch)
            progress.set_postfix(postfix)
            accelerator.log(metrics, step=state.step)
            log.write(state.step, metrics)
        if should_validate(state.step, config.validation.every_n_steps, tc.max_steps):
            with eval_weights(c.optimizer, c.params):  # schedule-free: its average, as exported
                val_loss = validation_loss(c)
            accelerator.log({"val_loss": val_loss}, step=state.step)
            log.write(state.step, {"val_loss": val_loss})
            postfix["val_loss"] = f"{val_loss:.4f}"
            progress.set_postfix(postfix)
            if out.keep_best and (state.best_val_loss is None or val_loss < state.best_val_loss):
                state.best_val_loss = val_loss
                if accelerator.is_main_process:
                    checkpoint.save_best(run_dir, state.step, val_loss, c.export)
        if c.sample_hook is not None and should_sample(state.step, config.sample):
            # The grid shows the weights that get exported: schedule-free's average, the EMA when on.
            with modules_on(accelerator.device, c.base.vae, c.base.text_encoder, c.base.text_encoder_2), \
                    eval_weights(c.optimizer, c.params), (c.ema.applied() if c.ema is not None else nullcontext()):
                grid = c.sample_hook.render_grid(state.step, **unwrapped(accelerator, c.trained))
            log_image(accelerator.trackers, "samples", grid, state.step)
        if should_save(state.step, out.save_every_n_steps, tc.max_steps):
            save(out.checkpoints_total_limit, c.resume_settings)

    progress.close()
    micro_batches.close()  # the prefetch thread, or the plain generator
    if accelerator.is_main_process:
        c.export(run_dir, state.step)
    checkpoint.write_rank_weights(run_dir, accelerator, c.base.unet)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir


def optimizer_step(c: Components, micro_batches: Iterator[MicroBatch], state: TrainState, *, seed: int,
                   accumulation: int, max_grad_norm: float | None, draws: DrawLog,
                   save_now) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over `accumulation` micro-batches; returns (mean loss, grad norm) as
    device tensors: reading them waits for the GPU, so the loop does that only when it logs.
    `save_now()` checkpoints the weights from before the step (when a loss is not finite)."""
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
            generator = torch.Generator().manual_seed(micro_batch_seed(seed, micro.number, accelerator.process_index))
            loss = loss_step(c.base.unet, micro.data, c.text, c.settings, c.base.noise_scheduler.alphas_cumprod,
                             generator, accelerator.device, c.model_dtype)
            flags = nonfinite_flags(accelerator, loss)
            accelerator.backward(loss)
            # Checked with the backward already queued: the host waits for the forward's flag while
            # the GPU stays busy, and the optimizer has not touched the weights yet.
            stop_if_not_finite(accelerator, flags, loss, step=state.step, epoch=micro.batch.epoch,
                               batch=micro.batch.index, images=micro.data.ids, run_dir=Path(c.run_dir),
                               save_checkpoint=save_now)
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(c.params, max_grad_norm or math.inf)
            c.optimizer.step()
            c.optimizer.zero_grad(set_to_none=True)
        total += loss.detach() / accumulation
    state.epoch = micro.batch.epoch
    state.sampler = sampler_position(micro.batch)
    return total, grad_norm


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


def should_log(step: int, every: int, max_steps: int) -> bool:
    return step % every == 0 or step == max_steps


def should_save(step: int, every: int, max_steps: int) -> bool:
    return step % every == 0 or step == max_steps


def should_validate(step: int, every: int, max_steps: int) -> bool:
    return every > 0 and (step % every == 0 or step == max_steps)


# ---------------------------------------------------------------- setup


@dataclass(kw_only=True)
class Components:
    """What `setup` built: everything the loop touches, prepared by accelerate."""

    accelerator: Accelerator
    run_dir: Path
    base: object  # train.model.loading.SdxlComponents, trained modules DDP-wrapped
    trained: list  # the prepared modules carrying adapters (UNet, then text encoders if trained)
    params: list  # trainable parameters, for clipping
    data: TrainingData
    sampler: BucketBatchSampler
    text: object  # captions -> (prompt_embeds, pooled)
    optimizer: object
    lr_scheduler: object
    settings: LossSettings
    model_dtype: torch.dtype
    export: RunExporter  # export(folder, step)
    sample_hook: object | None  # train.generate.hook.SampleGrids (None: off, or not the main process)
    resumable: dict  # name -> object with state_dict()/load_state_dict(), saved in each checkpoint
    resume_settings: dict  # `train.config.resume_settings(config)`, recorded in each checkpoint
    cuda_graphs: bool = False  # speed.cuda_graphs: each micro-batch starts a new graph replay
    ema: LoraEma | None = None  # train.ema_decay
    validation: object | None = None  # this rank's ValidationLoss share (None: off or no share)


def setup(config: Config, accelerator: Accelerator) -> Components:
    """The builder chain, in the order its dependencies impose (each comment says why)."""
    tc, oc, data_config = config.train, config.optimizer, config.data
    model_dtype = TORCH_DTYPES[config.model.weight_dtype]
    # Same seed on every rank before the adapters exist: identical LoRA initialisation.
    torch.manual_seed(tc.seed)
    base = load_model(config.model, accelerator.device, zero_terminal_snr=tc.zero_terminal_snr)
    param_groups = build_lora(base, config.lora, lr=oc.lr, gradient_checkpointing=tc.gradient_checkpointing,
                              lora_plus_ratio=oc.lora_plus_ratio)
    # After the adapters: PEFT gives a new adapter its base layer's dtype, which for fp8 would ruin it.
    quantize_unet(base.unet, config.model.quantize, compute_dtype=model_dtype, device=accelerator.device)
    # After the adapters (a compiled region must contain the LoRA branches), before DDP wraps the UNet.
    apply_speed_settings(base.unet, config.speed)
    # Latents are cached here, before training, so the VAE is used only now (and for sample grids).
    data = build_data(data_config, base, accelerator, masked_loss=tc.masked_loss)
    validation = validation_share(config.validation, data_config.dataset, scale=data_config.resolution_scale,
                                  base=base, rank=accelerator.process_index, world_size=accelerator.num_processes)
    if accelerator.device.type != "cpu":
        base.vae.to("cpu")
    sampler = build_sampler(data.rows, data.reg_rows, batch_size=tc.batch_size, seed=tc.seed, accelerator=accelerator)
    optimizer = build_optimizer(oc.name, param_groups, lr=oc.lr, weight_decay=oc.weight_decay, betas=oc.betas,
                                eps=oc.eps, fused=config.speed.fused_optimizer, warmup_steps=oc.warmup_steps)
    lr_scheduler = build_lr_scheduler(oc.scheduler, optimizer, warmup_steps=oc.warmup_steps, total_steps=tc.max_steps)

    # Only modules with adapters are prepared (DDP-wrapped). The LR scheduler is not: accelerate
    # would step it once per process; we step it once per optimizer step and checkpoint it ourselves.
    trained = [base.unet] + ([base.text_encoder, base.text_encoder_2] if config.lora.train_text_encoder else [])
    *trained, optimizer = accelerator.prepare(*trained, optimizer)
    for name, module in zip(TRAINED_NAMES, trained):
        setattr(base, name, module)
    # After prepare: a trained text encoder must be called through its DDP wrapper to sync grads.
    text = text_encoder_fn(base, max_chunks=data_config.max_chunks,
                                 train_text_encoder=config.lora.train_text_encoder, device=accelerator.device,
                                 cached_captions=_fixed_captions(data, cache=data_config.cache_text_outputs,
                                                                 train_text_encoder=config.lora.train_text_encoder))
    resumable = {f"adapter_{i}": checkpoint.TrainableWeights(accelerator.unwrap_model(module), f"adapter_{i}")
                 for i, module in enumerate(trained)}
    resumable |= {"optimizer": optimizer, "lr_scheduler": lr_scheduler}
    # After prepare, so the EMA starts from the weights as placed on the device.
    ema = build_ema(unwrapped(accelerator, trained), tc.ema_decay,
                    accelerator.device if tc.ema_device == "gpu" else "cpu")
    if ema is not None:
        resumable["ema"] = ema
    params = [p for g in param_groups for p in g["params"]]
    # The recorded training resolution: the largest bucket, at the training scale.
    largest = row_geometry(max(data.rows, key=lambda r: r["bucket_width"] * r["bucket_height"]),
                           data_config.resolution_scale)
    settings = LossSettings.from_config(tc, base.prediction_type)
    export = RunExporter(functools.partial(unwrapped, accelerator, trained), config.lora, name=config.output.name,
                         rows=data.rows, base_model=config.model.source, prediction_type=base.prediction_type,
                         resolution=(largest.width, largest.height), num_reg_images=len(data.reg_rows), ema=ema,
                         weights=functools.partial(eval_weights, optimizer, params),
                         training=training_metadata(settings, base.prediction),
                         trigger_features=trigger_features(data_config.dataset))
    return Components(
        accelerator=accelerator, run_dir=Path(config.output.dir), base=base, trained=trained, params=params,
        data=data, sampler=sampler, text=text, optimizer=optimizer, lr_scheduler=lr_scheduler,
        settings=settings, model_dtype=model_dtype, export=export,
        sample_hook=build_sample_hook(config.sample, base, run_dir=Path(config.output.dir), accelerator=accelerator,
                                      rows=data.rows, weight_dtype=model_dtype),
        resumable=resumable, resume_settings=resume_settings(config), cuda_graphs=config.speed.cuda_graphs,
        ema=ema, validation=validation)


def _fixed_captions(data: TrainingData, *, cache: bool, train_text_encoder: bool) -> list[str] | None:
    """Every row's one caption when `data.cache_text_outputs` can apply (no caption augmentation,
    frozen text encoders), else None."""
    if cache and (data.augment.active or train_text_encoder):
        logger.warning("data.cache_text_outputs ignored: captions change per draw (shuffle/dropout) "
                       "or the text encoders are trained")
    if not cache or data.augment.active or train_text_encoder:
        return None
    return [make_caption(r["caption_head"], r["caption_body"], r["caption_tail"], random.Random(0), data.augment)
            for r in [*data.rows, *data.reg_rows]]


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


def build_lora(base, lora: LoraConfig, *, lr: float, gradient_checkpointing: bool,
               lora_plus_ratio: float = 1.0) -> list[dict]:
    """Add the adapters (`lora.type`; zero delta, so step 0 is the base model); return optimizer
    param groups (`adapter_param_groups`: block-wise UNet rates, a rate per text encoder, LoRA+).

    Trainable parameters are kept in float32 whatever the frozen weights' dtype.
    """
    from train.lora.adapters import add_text_encoder_lora, add_unet_lora, lora_modules
    from train.lora.blocks import lr_multipliers, multiplier_of
    from train.runtime.optim import adapter_param_groups

    add_unet_lora(base.unet, lora)
    encoders = (base.text_encoder, base.text_encoder_2) if lora.train_text_encoder else ()
    for encoder in encoders:
        add_text_encoder_lora(encoder, lora)
    if gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
        for encoder in encoders:
            # Non-reentrant: the frozen embeddings' outputs do not require grad, the LoRA inside does.
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    multipliers = lr_multipliers(list(lora_modules(base.unet)), dict(base.unet.config), lora.block_lr)
    return adapter_param_groups(
        _trainable(base.unet), [_trainable(encoder) for encoder in encoders], lr=lr, lora_plus_ratio=lora_plus_ratio,
        encoder_lrs=list(lora.encoder_lrs(lr)),
        unet_multiplier=functools.partial(multiplier_of, multipliers=multipliers))


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
    """The sample grids rendered during training (main process only), or None when
    `sample.every_n_steps` is 0."""
    if sample.every_n_steps == 0 or not accelerator.is_main_process:
        return None
    from train.generate.hook import SampleGrids

    return SampleGrids(sample, train_model=base, out_dir=run_dir, device=accelerator.device,
                       dataset_heads=[row["caption_head"] for row in rows], weight_dtype=weight_dtype)


def unwrapped(accelerator: Accelerator, trained: list) -> dict:
    """{"unet": ..., "text_encoder": ..., ...}: the trained modules without their DDP wrappers."""
    return {name: accelerator.unwrap_model(module) for name, module in zip(TRAINED_NAMES, trained)}
