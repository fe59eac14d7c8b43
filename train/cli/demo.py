"""`animagine-lora demo`: the whole path on a fresh machine, on CPU: tiny model, prep, training, export.

    animagine-lora demo           (what `make demo` runs; needs no network and nothing beside the repo)
    animagine-lora demo --config configs/tiny_features.toml   (regularization, masks, validation, EMA on)

1. builds the tiny SDXL (`train.model.tiny`) into OUT/tiny_model (reused when already built);
2. preps `datasets/sample.toml` into OUT/sample_prep (`animagine-lora prep` with the tag database
   and CLIP vocabulary shipped in `captioning/data/`; "up to date" on reruns);
3. trains `configs/tiny.toml` (paths pointed at OUT), which caches latents on first use,
   checkpoints, and exports the WebUI and diffusers LoRA files;
4. prints where the files are.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the repository: datasets/ and configs/ are beside train/
logger = logging.getLogger(__name__)


def demo_config(out: Path, model_dir: Path, prep_dir: Path, path: Path = REPO / "configs" / "tiny.toml"):
    """The demo config (configs/tiny.toml) with its model, dataset (and class set) and run folders under `out`."""
    from train.config import load_config

    config = load_config(path)
    data = {"dataset": str(prep_dir)} | ({"regularization": str(prep_dir)} if config.data.regularization else {})
    run_dir = "tiny_run" if path.stem == "tiny" else f"{path.stem}_run"
    return config.model_copy(update={
        "model": config.model.model_copy(update={"source": str(model_dir)}),
        "data": config.data.model_copy(update=data),
        "output": config.output.model_copy(update={"dir": str(out / run_dir)}),
    })


def prep_sample(prep_dir: Path) -> int:
    """`animagine-lora prep datasets/sample.toml` into `prep_dir`: the shipped data, no network."""
    from train.cli import main as cli

    return cli(["prep", str(REPO / "datasets" / "sample.toml"), "-o", str(prep_dir), "--workers", "1"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=str(REPO / "out"), help="where everything is written (default out/)")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "tiny.toml",
                        help="the training config (default configs/tiny.toml; configs/tiny_features.toml "
                             "turns on regularization, masked loss, validation and EMA)")


def run(args: argparse.Namespace) -> int:
    from train.loop import train
    from train.model.tiny import build_tiny_model
    from train.runtime.nonfinite import TrainingStopped

    out = Path(args.out).resolve()

    tiny = build_tiny_model(out / "tiny_model")
    prep_dir = out / "sample_prep"
    status = prep_sample(prep_dir)
    if status:
        logger.error("prep failed (exit %d)", status)
        return status
    config = demo_config(out, tiny.diffusers_dir, prep_dir, args.config.resolve())
    try:
        # A rerun of the demo replaces its own earlier run: moved into a replaced-* folder, not deleted.
        run_dir = train(config, overwrite=True)
    except TrainingStopped as err:
        logger.error("%s", err)
        return 1
    except (OSError, ValueError) as err:  # output folder locked by another demo, unreadable data
        logger.error("%s", err)
        return 2

    name = config.output.name
    print("\nDemo finished. Files:")
    print(f"  tiny model (diffusers)   {tiny.diffusers_dir}")
    print(f"  prepped dataset + report {prep_dir}  ({prep_dir / 'report.html'})")
    print(f"  WebUI / ComfyUI LoRA     {run_dir / f'{name}.safetensors'}")
    print(f"  diffusers LoRA           {run_dir / 'diffusers'}")
    print(f"  checkpoints              {', '.join(p.name for p in sorted(run_dir.glob('checkpoint-*')))}")
    print(f"  metrics                  {run_dir / 'log.jsonl'}  (TensorBoard: {run_dir / 'logs'})")
    return 0
