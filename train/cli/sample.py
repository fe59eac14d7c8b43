"""`animagine-lora sample`: generate with a LoRA on Animagine XL 4.0 Opt (or Zero) at the card's settings.

    animagine-lora sample --lora my_lora.safetensors --model opt --size portrait --seed 1 2 \\
        "1girl, safe, herta (honkai: star rail), smile" -o samples/

Prompts are WebUI/ComfyUI text: `(tag:1.2)`, `(tag)`, `[tag]` weight tags, literal parentheses are
escaped (`herta \\(honkai: star rail\\)`). Each prompt is re-ordered as a training caption (people
count, character, series, rating, the rest, then the quality tail) unless `--no-reorder`, weights
kept. Writes one PNG per prompt and seed (`p00-s1.png`, ...), a grid of them, `prompts.txt` with the
exact prompt texts, and with `--workflow FILE` the ComfyUI (API format) graph that reproduces them.
The sampler is ComfyUI's KSampler loop (`--sampler`, `--scheduler`, `--noise-device`).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from train.cli.options import (
    MAX_BATCH_SIZE,
    MAX_CFG,
    MAX_SEED,
    MAX_STEPS,
    MAX_STRENGTH,
    add_prediction_arguments,
    add_sampler_arguments,
    bounded_float,
    bounded_int,
    zero_terminal_snr_choice,
)
from train.names import (
    CARD_CFG,
    CARD_NEGATIVE,
    CARD_STEPS,
    DIFFUSERS_SAMPLER,
    DTYPE_NAMES,
    parse_size,
)

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompts", nargs="+", metavar="PROMPT", help="tag prompts (quote each one)")
    parser.add_argument("--lora", help="WebUI/kohya (or diffusers) LoRA .safetensors; omit for the bare model")
    parser.add_argument("--strength", type=bounded_float(-MAX_STRENGTH, MAX_STRENGTH), default=1.0,
                        help="LoRA strength (default 1.0)")
    parser.add_argument("--model", default="opt",
                        help="opt | zero | opt-file (the Opt single file from the Hub) | Hub id | "
                             "diffusers folder | .safetensors (default opt)")
    parser.add_argument("--config-dir", help="component configs for a single-file model (default: SDXL's)")
    parser.add_argument("--tokenizer-dir", help="folder with tokenizer/ and tokenizer_2/ (single-file models)")
    parser.add_argument("--size", default="square", help="WIDTHxHEIGHT or portrait|landscape|square")
    parser.add_argument("--seed", dest="seeds", type=bounded_int(0, MAX_SEED), nargs="+", default=[0],
                        help="one image per seed")
    parser.add_argument("--steps", type=bounded_int(1, MAX_STEPS), default=CARD_STEPS)
    parser.add_argument("--cfg", type=bounded_float(0.0, MAX_CFG), default=CARD_CFG)
    parser.add_argument("--negative", default=CARD_NEGATIVE, help="negative prompt (default: the card's)")
    parser.add_argument("--no-reorder", action="store_true", help="encode prompts exactly as given")
    parser.add_argument("--tags-db", help="tag database for re-ordering (default: the shipped one, as caption uses)")
    parser.add_argument("--dataset", type=Path, help="prepped dataset: its most frequent caption head gives the "
                        "order of the trained character's tags (unknown to the tag database)")
    parser.add_argument("--batch-size", type=bounded_int(1, MAX_BATCH_SIZE), default=4)
    parser.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                        help="UNet and text encoder precision (default bf16 on CUDA, fp32 on CPU; the VAE stays fp32)")
    add_sampler_arguments(parser)
    add_prediction_arguments(parser)
    parser.add_argument("--workflow", type=Path, metavar="FILE.json",
                        help="also write the ComfyUI workflow (API format) that reproduces these images")
    parser.add_argument("-o", "--out", required=True, type=Path, help="output folder")


def _head_order(dataset: Path | None) -> tuple[str, ...]:
    """The most frequent caption head of the dataset's training rows (empty without a dataset)."""
    if dataset is None:
        return ()
    from collections import Counter

    from train.data.rows import load_rows

    heads = Counter(tuple(row["caption_head"]) for row in load_rows(dataset, split="train"))
    return heads.most_common(1)[0][0] if heads else ()


def _trigger_lines(lora: str | None) -> list[str]:
    """What the LoRA's trigger tags already mean (the tags prep folded into them), from its header;
    nothing for a file without that record (an unreadable file is reported when it is loaded)."""
    if not lora or not Path(lora).is_file():
        return []
    from train.lora.files import LoraFileError, read_header
    from train.lora.trigger import folded_tags, trigger_lines

    try:
        _, metadata = read_header(lora)
    except LoraFileError:
        return []
    return trigger_lines(folded_tags(metadata))


def run(args: argparse.Namespace) -> int:
    import torch

    from captioning.outputs import claim_dir
    from train.generate.sampling import (
        LoraFileError,
        SampleSettings,
        build_pipeline,
        generate,
        load_lora,
        make_grid,
        resolve_model_source,
        save_png,
        save_text,
    )
    from train.lora.export import prediction_mismatch
    from train.model.loading import TORCH_DTYPES, load_base_model

    try:
        width, height = parse_size(args.size)
    except ValueError as err:
        logger.error("--size: %s", err)
        return 2
    from train.generate.prompts import PromptOrderer, prepare_prompt

    try:
        orderer = None if args.no_reorder else PromptOrderer.load(args.tags_db, head_order=_head_order(args.dataset))
    except (ValueError, OSError) as err:  # tag database or dataset missing, unreadable or not downloadable
        logger.error("%s; or --no-reorder to encode the prompts as given", err)
        return 2
    texts = [prepare_prompt(p, orderer) for p in args.prompts]
    for line in _trigger_lines(args.lora):
        print(line)
    claim_dir(args.out)  # before the minutes of loading: a FIFO, device or file is refused now
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = TORCH_DTYPES[args.dtype or ("bf16" if device.startswith("cuda") else "fp32")]
    try:
        model = load_base_model(resolve_model_source(args.model), config_dir=args.config_dir,
                                tokenizer_dir=args.tokenizer_dir, weight_dtype=dtype, vae_dtype=torch.float32,
                                prediction_type=args.prediction_type,
                                zero_terminal_snr=zero_terminal_snr_choice(args.zero_terminal_snr))
    except (OSError, ValueError) as err:  # a missing folder or file, an unusable checkpoint
        logger.error("--model %s: %s", args.model, err)
        return 2
    settings = SampleSettings(width=width, height=height, steps=args.steps, cfg=args.cfg,
                              negative=args.negative, seeds=list(args.seeds), batch_size=args.batch_size,
                              sampler=args.sampler, scheduler=args.scheduler, noise_device=args.noise_device)
    pipe = build_pipeline(model, device=device, timestep_spacing=settings.timestep_spacing)
    if args.lora:
        try:
            load_lora(pipe, args.lora, "lora", args.strength)
        except LoraFileError as err:
            logger.error("%s", err)
            return 1
        if message := prediction_mismatch([args.lora], model.prediction_type, model.prediction.reason):
            logger.warning("--lora %s", message)
    images = generate(pipe, texts, settings)
    for p, row in enumerate(images):
        for seed, image in zip(settings.seeds, row):
            save_png(image, args.out / f"p{p:02d}-s{seed}.png")
    save_png(make_grid(images, col_labels=[f"seed {s}" for s in settings.seeds]), args.out / "grid.png")
    save_text(args.out / "prompts.txt", "\n".join(texts) + "\n")
    if args.workflow:
        _write_workflow(args, texts, settings, model.prediction)
    for p, text in enumerate(texts):
        print(f"p{p:02d}: {text}")
    print(f"{len(texts) * len(settings.seeds)} image(s) in {args.out}")
    return 0


def _write_workflow(args: argparse.Namespace, texts: list[str], settings, prediction) -> None:
    """The ComfyUI graph of this run at `args.workflow` (atomic write)."""
    from train.generate.sampling import save_text
    from train.generate.workflow import WorkflowSpec, checkpoint_name, workflow_json

    sampler = settings.sampler
    if sampler == DIFFUSERS_SAMPLER:
        logger.warning("--workflow: ComfyUI has no diffusers-euler-a; the workflow uses euler_ancestral + normal, "
                       "whose images are close to, not equal to, these")
        sampler = "euler_ancestral"
    spec = WorkflowSpec(checkpoint=checkpoint_name(args.model), lora=Path(args.lora).name if args.lora else None,
                        strength=args.strength, prompts=texts, negative=settings.negative, seeds=settings.seeds,
                        sampler=sampler, scheduler=settings.scheduler if sampler == settings.sampler else "normal",
                        steps=settings.steps, cfg=settings.cfg, width=settings.width, height=settings.height,
                        prediction_type=prediction.prediction_type, zero_terminal_snr=prediction.zero_terminal_snr)
    save_text(args.workflow, workflow_json(spec))
    print(f"ComfyUI workflow (API format): {args.workflow}")
