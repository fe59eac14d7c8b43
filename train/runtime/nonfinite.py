"""Stopping a run cleanly: a NaN/inf loss on any rank, or the GPU out of memory.

`nonfinite_flags` queues every rank's "loss is not finite" flag right after the forward;
`stop_if_not_finite` reads it after the backward is queued (so the host waits for the forward
only), and when any rank's loss is bad, keeps a checkpoint of the weights from before the step and
raises `TrainingStopped` naming the step, the images and what to try.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from train.names import checkpoint_name
from train.runtime import checkpoint

OUT_OF_MEMORY_ADVICE = (
    "lower train.batch_size (raise train.gradient_accumulation_steps to keep the effective batch), "
    "set train.gradient_checkpointing = true, set data.cache_text_outputs = true (no caption "
    "augmentation), use optimizer.name = 'adamw8bit', keep model.weight_dtype = 'bf16', set "
    "model.quantize = 'fp8' (or 'nf4'), lower lora.rank, or set data.resolution_scale below 1; "
    "docs/training.md 'Memory presets' lists settings per card size"
)


class TrainingStopped(RuntimeError):
    """The run cannot go on (non-finite loss, out of memory); the message says what to do."""


def out_of_memory(step: int) -> TrainingStopped:
    return TrainingStopped(f"out of memory at step {step}: {OUT_OF_MEMORY_ADVICE}")


def nonfinite_flags(accelerator, loss: torch.Tensor) -> tuple[torch.Tensor, object]:
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


def stop_if_not_finite(accelerator, flags: tuple[torch.Tensor, object], loss: torch.Tensor, *, step: int,
                       epoch: int, batch: int, images: list[str], run_dir: Path,
                       save_checkpoint: Callable[[], None]) -> None:
    """Stop every rank when any rank's loss is NaN/inf, keeping a checkpoint from before the step.

    `flags` is `nonfinite_flags(...)`; `step` the optimizer steps done (the failing one is step + 1).
    The optimizer has not stepped yet, so the weights are still those after `step`:
    `save_checkpoint()` (called on every rank) keeps them unless that checkpoint already exists.

    Raises:
        TrainingStopped: naming the step, this rank's images and the last checkpoint.
    """
    bad_ranks, event = flags
    if event is not None:
        event.synchronize()
    if not bad_ranks.any():
        return
    if step > 0 and not any(p.name == checkpoint_name(step) for p in checkpoint.list_checkpoints(run_dir)):
        save_checkpoint()
    kept = checkpoint.list_checkpoints(run_dir)
    where = kept[-1] if kept else "none (the failure came before the first step)"
    bad_here = bad_ranks[accelerator.process_index].item() > 0
    raise TrainingStopped(
        f"loss is {loss.item()} at step {step + 1} (epoch {epoch}, batch {batch}); "
        f"images: {', '.join(images) if bad_here else '(on another rank)'}; last checkpoint: {where}. Check "
        "those images and their cached latents, or lower optimizer.lr / use mixed_precision = 'bf16' instead "
        "of 'fp16'"
    )
