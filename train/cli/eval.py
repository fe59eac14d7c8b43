"""`animagine-lora eval`: compare a run's checkpoints (and the base model, step 0) and pick one.

    animagine-lora eval runs/herta --dataset prepped/herta --model opt -o eval/herta
    animagine-lora eval a.safetensors b.safetensors --dataset prepped/herta --no-images -o eval/ab

Writes `report.json`, `report.csv`, `index.html`, `plots/`, `grids/`, `comparison.png` in OUT and
prints the table with the recommended checkpoint. See `train.evaluate.compare` for the metrics.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from train.cli.options import (
    add_prediction_arguments,
    add_sampler_arguments,
    zero_terminal_snr_choice,
)
from train.names import CARD_CFG, CARD_NEGATIVE, CARD_STEPS, VALIDATION_TIMESTEPS, parse_size

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="RUN_DIR|LORA", help="run folder(s) or LoRA files")
    parser.add_argument("--dataset", type=Path, help="prepped dataset folder (val rows, training heads)")
    parser.add_argument("--val-folder", type=Path, help="held-out images (+ .txt captions) instead of val rows")
    parser.add_argument("--val-scale", type=float, default=1.0, help="resolution scale of the val images")
    parser.add_argument("--val-timesteps", type=int, nargs="+", default=None, help=f"default {' '.join(map(str, VALIDATION_TIMESTEPS))}")
    parser.add_argument("--val-seed", type=int, default=0)
    parser.add_argument("--prompts", type=Path, help="prompt file, one per line (default: dataset heads)")
    parser.add_argument("--num-prompts", type=int, default=2, help="default prompts taken from the dataset")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--model", default="opt", help="opt | zero | Hub id | diffusers folder | .safetensors")
    parser.add_argument("--val-model", help="model for the validation loss (default: --model); e.g. zero, "
                        "the model the LoRA was trained on, while images render on --model")
    parser.add_argument("--config-dir", help="component configs for a single-file model")
    parser.add_argument("--tokenizer-dir", help="folder with tokenizer/ and tokenizer_2/")
    parser.add_argument("--size", default="square")
    parser.add_argument("--steps", type=int, default=CARD_STEPS)
    parser.add_argument("--cfg", type=float, default=CARD_CFG)
    parser.add_argument("--negative", default=CARD_NEGATIVE)
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=4)
    add_sampler_arguments(parser)
    add_prediction_arguments(parser)
    parser.add_argument("--no-images", action="store_true", help="validation loss only (no grids, tags, CLIP)")
    parser.add_argument("--no-reorder", action="store_true", help="use prompts as given")
    parser.add_argument("--tags-db", help="tag database for prompt re-ordering")
    parser.add_argument("--tagger", help="WD v3 tagger folder or Hub id (default: none, tag fidelity off)")
    parser.add_argument("--clip", help="local transformers CLIP model folder (CLIP scores)")
    parser.add_argument("--margin", type=float, default=0.05, help="tag fidelity margin for the recommendation")
    parser.add_argument("--wandb", metavar="PROJECT", help="also log to this wandb project")
    parser.add_argument("--device", default=None)
    parser.add_argument("-o", "--out", required=True, type=Path)


def _training_heads(dataset: Path | None) -> list[list[str]]:
    if dataset is None:
        return []
    from train.data.rows import load_rows

    return [row["caption_head"] for row in load_rows(dataset, split="train")]


def _prompts(args, heads, problems: list[str]) -> list[str]:
    from collections import Counter

    from train.evaluate.compare import read_prompt_file
    from train.generate.prompts import PromptOrderer, default_prompts, prepare_prompt

    if args.prompts:
        raw, file_problems = read_prompt_file(args.prompts)
        for problem in file_problems:
            logger.error("%s", problem)
        problems += file_problems
    else:
        raw = default_prompts(heads, args.num_prompts)
        if not raw:
            raise ValueError("no prompts: pass --prompts FILE or --dataset with captioned training rows")
        return raw  # dataset heads are already in caption order, with the quality tail
    head_order = Counter(tuple(h) for h in heads).most_common(1)[0][0] if heads else ()
    orderer = None if args.no_reorder else PromptOrderer.load(args.tags_db, head_order=head_order)
    return [prepare_prompt(p, orderer) for p in raw]


def _load(source: str, args, device: str):
    """A loaded SdxlComponents and its pipeline (bf16 on CUDA, fp32 on CPU; VAE always fp32)."""
    import torch

    from train.generate.sampling import build_pipeline, resolve_model_source
    from train.model.loading import load_base_model

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = load_base_model(resolve_model_source(source), config_dir=args.config_dir,
                            tokenizer_dir=args.tokenizer_dir, weight_dtype=dtype, vae_dtype=torch.float32,
                            prediction_type=args.prediction_type,
                            zero_terminal_snr=zero_terminal_snr_choice(args.zero_terminal_snr))
    return model, build_pipeline(model, device=device)


def _validation(args, model):
    """The ValidationLoss over the val rows or folder, or None when there are none."""
    from train.evaluate import validation

    if args.val_folder:
        sources = validation.folder_sources(args.val_folder, args.val_scale)
    elif args.dataset:
        sources = validation.dataset_sources(args.dataset, args.val_scale)
    else:
        return None
    return validation.ValidationLoss(validation.encode_items(sources, model.vae), model.noise_scheduler,
                                     model.prediction_type, args.val_timesteps or VALIDATION_TIMESTEPS,
                                     args.val_seed)


def _build_plan(args, prompts, heads, device, problems) -> tuple:
    """(image pipeline, EvalPlan): models loaded once, validation latents encoded once."""
    from train.evaluate.compare import EvalPlan, character_tags, tag_targets
    from train.generate.hook import share_components
    from train.generate.sampling import SampleSettings

    width, height = parse_size(args.size)
    settings = SampleSettings(width=width, height=height, steps=args.steps, cfg=args.cfg, negative=args.negative,
                              seeds=list(args.seeds), batch_size=args.batch_size, sampler=args.sampler,
                              scheduler=args.scheduler, noise_device=args.noise_device)
    model, pipe = _load(args.val_model if args.no_images and args.val_model else args.model, args, device)
    plan = EvalPlan(prompts=prompts, settings=settings, strength=args.strength)
    val_model = model
    if args.val_model and not args.no_images and args.val_model != args.model:
        val_model, plan.val_pipe = _load(args.val_model, args, device)
        # Only the VAE: LoRA layers go into both pipelines' text encoders, which must be distinct.
        shared = share_components(val_model, model, names=("vae",))
        logger.info("validation model %s shares %s with %s", args.val_model, ", ".join(shared) or "nothing", args.model)
    try:
        plan.validation = _validation(args, val_model)
    except (ValueError, FileNotFoundError) as err:
        logger.error("validation loss off: %s", err)
        problems.append(f"validation loss off: {err}")
    if prompts and args.tagger:
        from captioning.tagger import WDTagger

        plan.tagger = WDTagger.load(args.tagger)
        plan.targets = tag_targets(plan.tagger, prompts, character_tags(heads), args.negative)
    if prompts and args.clip:
        from captioning.images import load_rgb
        from train.data.rows import load_rows
        from train.evaluate.clip_score import ClipScorer

        references = [load_rgb(r["image_path"]) for r in load_rows(args.dataset)[:32]] if args.dataset else []
        plan.clip = ClipScorer(args.clip, references, device=device)
    return pipe, plan


def run(args: argparse.Namespace) -> int:
    import torch

    from train.evaluate.compare import comparison_sheet, discover_checkpoints, evaluate, recommend
    from train.evaluate.report import (
        log_wandb,
        print_table,
        write_csv,
        write_html,
        write_json,
        write_plots,
    )
    from train.generate.sampling import save_png
    from train.lora.export import prediction_mismatch

    checkpoints, problems = discover_checkpoints(args.inputs)
    for problem in problems:
        logger.error("%s", problem)
    if len(checkpoints) == 1:
        logger.error("nothing to evaluate: no LoRA files found in %s", ", ".join(map(str, args.inputs)))
        return 1
    try:
        parse_size(args.size)
        heads = _training_heads(args.dataset)
        prompts = [] if args.no_images else _prompts(args, heads, problems)
    except (ValueError, OSError) as err:
        logger.error("%s", err)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe, plan = _build_plan(args, prompts, heads, device, problems)
    loras = [c.lora for c in checkpoints if c.lora is not None]
    if message := prediction_mismatch(loras, pipe.scheduler.config.prediction_type):
        logger.warning("%s", message)

    rows = evaluate(pipe, checkpoints, plan, args.out)
    recommended, reason = recommend(rows, args.margin)
    sheet = comparison_sheet(rows, plan.thumbnails, prompts)
    comparison = save_png(sheet, args.out / "comparison.png") if sheet is not None else None
    plots = write_plots(rows, args.out / "plots")
    extra = {"prompts": prompts, "seeds": plan.settings.seeds, "model": args.model,
             "val_model": args.val_model or args.model, "problems": problems, "margin": args.margin}
    write_json(rows, recommended, reason, extra, args.out / "report.json")
    write_csv(rows, args.out / "report.csv")
    write_html(rows, recommended, reason, args.out, plots, comparison, problems)
    if args.wandb:
        log_wandb(rows, recommended, reason, args.wandb, comparison)
    print_table(rows, recommended, reason)
    return 1 if any(r.error for r in rows) or problems else 0
