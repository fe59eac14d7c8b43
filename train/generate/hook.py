"""Sample grids during training, on the Opt model or on the model being trained.

The training loop builds one `SampleGrids` and, on the main process, calls
`grids.render_grid(step, unet=..., text_encoder=..., text_encoder_2=...)` when
`should_sample(step)`; the returned PIL grid also goes to the trackers.

- `sample_model = "train"`: the pipeline wraps the training components themselves (the LoRA is
  active in them, nothing is copied or loaded).
- `sample_model = "opt"`: the current LoRA is exported to a WebUI file (train.lora.export) and loaded on
  the Opt pipeline with `load_lora_weights`, the path users take, then removed again. diffusers
  cannot read LyCORIS files for SDXL, so a LoKr / LoHa adapter is copied onto the Opt modules
  through PEFT instead (same config, same tensors: `copy_adapter`). The Opt
  model is loaded once, when the sampler is built (a bad source fails before training). Its VAE
  and text encoders are replaced by the training model's when their weight hashes are identical
  (Zero and Opt may share them), so they are not held twice; what remains is CPU-offloaded on
  CUDA (`enable_model_cpu_offload`: one Opt component on the GPU at a time), and the memory cost
  is logged.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path

import torch

from train.config import SampleConfig
from train.generate.prompts import default_prompts
from train.generate.sampling import (
    SampleSettings,
    build_pipeline,
    load_lora,
    render_grid,
    resolve_model_source,
    unload_lora,
)
from train.model.loading import vae_fingerprint
from train.names import parse_size

logger = logging.getLogger(__name__)

_SHAREABLE = ("vae", "text_encoder", "text_encoder_2")


def sample_settings(config: SampleConfig) -> SampleSettings:
    """The `[sample]` table as the sampler's settings."""
    width, height = parse_size(config.size)
    return SampleSettings(width=width, height=height, steps=config.steps, cfg=config.cfg,
                          negative=config.negative, seeds=list(config.seeds), batch_size=config.batch_size,
                          sampler=config.sampler, scheduler=config.scheduler, noise_device=config.noise_device)


def should_sample(step: int, config: SampleConfig) -> bool:
    return config.every_n_steps > 0 and step % config.every_n_steps == 0


def module_fingerprint(module: torch.nn.Module) -> str:
    """Hash of a module's weights (names, dtypes, shapes, bytes): equal hash = same weights."""
    return vae_fingerprint(module)  # the hash is generic over any module's state dict


def share_components(sample_model, train_model, names: tuple[str, ...] = _SHAREABLE) -> list[str]:
    """Replace `sample_model`'s components `names` by `train_model`'s where the weights are equal.

    Returns the names shared. Both are `train.model.loading.SdxlComponents`s; a training text encoder that
    carries LoRA layers hashes differently and is therefore never shared.
    """
    shared = []
    for name in names:
        ours, theirs = getattr(sample_model, name), getattr(train_model, name)
        if ours is theirs or module_fingerprint(ours) == module_fingerprint(theirs):
            setattr(sample_model, name, theirs)
            shared.append(name)
    return shared


def _kind(prediction) -> str:
    """"v_prediction with zero terminal SNR", "epsilon", ... of a `train.model.prediction.Prediction`."""
    return prediction.prediction_type + (" with zero terminal SNR" if prediction.zero_terminal_snr else "")


def _gib(module: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in module.parameters()) / 2**30


class SampleGrids:
    """Renders the sample grid of a training step and writes it under `out_dir/samples/`."""

    def __init__(self, config: SampleConfig, *, train_model, out_dir: str | Path,
                 device: str | torch.device = "cpu", dataset_heads=(), weight_dtype: torch.dtype | None = None) -> None:
        self.config = config
        self.train_model = train_model
        self.out_dir = Path(out_dir) / "samples"
        self.device = torch.device(device)
        self.weight_dtype = weight_dtype or train_model.unet.dtype
        self.settings = sample_settings(config)
        self.prompts = list(config.prompts) or default_prompts(dataset_heads, config.num_default_prompts)
        if not self.prompts:
            raise ValueError("sample: no prompts configured and the dataset has no caption heads")
        self._opt_pipe = None
        if config.every_n_steps and config.sample_model == "opt":
            # Load now: a missing or unreachable Opt model stops the run before training, not at step N.
            self._opt_pipeline()

    def _opt_pipeline(self):
        if self._opt_pipe is not None:
            return self._opt_pipe
        from train.model.loading import load_base_model

        source = resolve_model_source(self.config.opt_model)
        model = load_base_model(source, config_dir=self.config.opt_config_dir,
                                tokenizer_dir=self.config.opt_tokenizer_dir,
                                weight_dtype=self.weight_dtype, vae_dtype=self.train_model.vae.dtype)
        trained = self.train_model.prediction
        if _kind(model.prediction) != _kind(trained):
            logger.warning("sample.opt_model %s is %s, the model being trained %s: the grids show the LoRA on a "
                           "model it is not trained for; set sample.opt_model to the training model, or "
                           "sample_model = 'train'", source, _kind(model.prediction), _kind(trained))
        shared = share_components(model, self.train_model)
        own = [n for n in ("unet", *_SHAREABLE) if n not in shared]
        logger.info(
            "sample model %s: shares %s with the training model; holds %.2f GiB of its own (%s)",
            source, ", ".join(shared) or "nothing", sum(_gib(getattr(model, n)) for n in own), ", ".join(own),
        )
        if self.device.type == "cuda":
            pipe = build_pipeline(model, device="cpu", timestep_spacing=self.settings.timestep_spacing)
            # Shared modules stay where training keeps them; the rest visit the GPU one at a time.
            pipe._exclude_from_cpu_offload = list(shared)
            pipe.enable_model_cpu_offload(device=self.device)
        else:
            pipe = build_pipeline(model, device=self.device, timestep_spacing=self.settings.timestep_spacing)
        self._opt_pipe = pipe
        return pipe

    @torch.no_grad()
    def render_grid(self, step: int, *, unet, text_encoder=None, text_encoder_2=None):
        """The grid (prompts x seeds) of `step`, written to `samples/step-NNNNNN.png`; returns it.

        `unet` and the text encoders are the unwrapped training modules with their LoRA layers.
        """
        path = self.out_dir / f"step-{step:06d}.png"
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        if self.config.sample_model == "train":
            model = self.train_model
            components = {"unet": unet}
            if text_encoder is not None:
                components["text_encoder"] = text_encoder
            if text_encoder_2 is not None:
                components["text_encoder_2"] = text_encoder_2
            pipe = build_pipeline(_Components(model, **components), device=self.device,
                                  timestep_spacing=self.settings.timestep_spacing)
            was_training = unet.training
            unet.eval()
            try:
                grid = render_grid(pipe, self.prompts, self.settings, path, progress=False)
            finally:
                unet.train(was_training)
        else:
            grid = self._render_on_opt(step, path, unet, text_encoder, text_encoder_2)
        if torch.cuda.is_available():
            logger.info("sampling at step %d: peak GPU memory %.2f GiB above the %.2f GiB in use",
                        step, (torch.cuda.max_memory_allocated() - before) / 2**30, before / 2**30)
        logger.info("step %d: sample grid %s", step, path)
        return grid

    def _render_on_opt(self, step, path, unet, text_encoder, text_encoder_2):
        from train.lora.adapters import adapter_type, lora_config
        from train.lora.export import save_webui_lora, webui_metadata

        pipe = self._opt_pipeline()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        adapter = f"step_{step}"
        if adapter_type(lora_config(unet)) != "lora":
            trained = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
            copy_adapter(pipe, adapter, {name: model for name, model in trained.items() if model is not None},
                         self.config.strength)
            try:
                return render_grid(pipe, self.prompts, self.settings, path, progress=False)
            finally:
                unload_lora(pipe, adapter)
        with tempfile.TemporaryDirectory(dir=self.out_dir) as temp:
            lora_file = Path(temp) / f"{adapter}.safetensors"
            peft_config = lora_config(unet)
            metadata = webui_metadata(rank=peft_config.r, alpha=peft_config.lora_alpha, output_name=adapter,
                                      resolution=(self.settings.width, self.settings.height), tag_frequency={},
                                      comment=f"training-time sample at step {step}")
            # fp32 in the file: the sample shows exactly the weights being trained.
            save_webui_lora(lora_file, unet=unet, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                            metadata=metadata, dtype=torch.float32)
            load_lora(pipe, lora_file, adapter, self.config.strength)
        try:
            return render_grid(pipe, self.prompts, self.settings, path, progress=False)
        finally:
            unload_lora(pipe, adapter)


def copy_adapter(pipe, adapter_name: str, trained: dict, strength: float) -> None:
    """Put each trained module's adapter ("default") on the pipeline's module of the same name
    (`unet`, `text_encoder`, `text_encoder_2`) as `adapter_name`, with the same PEFT config and
    tensors, and make it the only active adapter at `strength`."""
    from peft import set_peft_model_state_dict

    from train.lora.adapters import lora_config, lora_state_dict

    for name, model in trained.items():
        target = getattr(pipe, name)
        target.add_adapter(copy.deepcopy(lora_config(model)), adapter_name=adapter_name)
        set_peft_model_state_dict(target, lora_state_dict(model), adapter_name=adapter_name)
    pipe.set_adapters([adapter_name], adapter_weights=[strength])


class _Components:
    """An `SdxlComponents`-shaped view with some modules replaced (for `build_pipeline`)."""

    def __init__(self, model, **replacements) -> None:
        for name in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "noise_scheduler"):
            setattr(self, name, replacements.get(name, getattr(model, name)))
