"""`animagine-lora lora resize|merge|extract`: reshape LoRAs after training.

    animagine-lora lora resize my_lora.safetensors -o my_lora_r8.safetensors --rank 8
    animagine-lora lora resize my_lokr.safetensors -o plain.safetensors --energy 0.95
    animagine-lora lora merge a.safetensors:0.7 b.safetensors:0.5 -o ab.safetensors
    animagine-lora lora merge a.safetensors:0.7 --into model.safetensors -o merged_model.safetensors
    animagine-lora lora extract --base zero.safetensors --tuned tuned.safetensors -o diff.safetensors --rank 32

Each prints the energy table: per component, the modules, old and new rank, and the share of each
module's Frobenius energy kept (min, median, total over modules). See docs/lora-tools.md.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from train.cli.options import bounded_float, bounded_int
from train.names import DTYPE_NAMES

logger = logging.getLogger(__name__)

MAX_RANK = 4096


def _rank_options(parser: argparse.ArgumentParser, *, required: bool) -> None:
    rule = parser.add_mutually_exclusive_group(required=required)
    rule.add_argument("--rank", type=bounded_int(1, MAX_RANK), help="new rank of every module (at most)")
    rule.add_argument("--energy", type=bounded_float(1e-6, 1.0),
                      help="per module, the smallest rank keeping this share of its Frobenius energy (e.g. 0.95)")
    rule.add_argument("--sv-ratio", type=bounded_float(1.0001, 1e9),
                      help="per module, keep singular values >= the largest / N (sd-scripts' sv_ratio)")
    parser.add_argument("--device", default="auto",
                        help="where the SVDs run: auto (a CUDA GPU when there is one), cpu, cuda, cuda:N")


def _dtype_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="fp16", help="tensor dtype of the output (default fp16)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    tools = parser.add_subparsers(dest="tool", metavar="TOOL", required=True)
    resize = tools.add_parser("resize", help="a LoRA (plain, LoKr or LoHa) as a plain LoRA of lower rank")
    resize.add_argument("input", type=Path, help="LoRA .safetensors (kohya, diffusers, LyCORIS) or diffusers folder")
    resize.add_argument("-o", "--out", required=True, type=Path, help="output .safetensors (kohya/WebUI format)")
    _rank_options(resize, required=True)
    _dtype_option(resize)
    resize.set_defaults(run_tool=_resize)

    merge = tools.add_parser("merge", help="LoRAs at weights into one LoRA, or into a base model (--into)")
    merge.add_argument("inputs", nargs="+", metavar="LORA[:WEIGHT]", help="LoRA files, each with its weight (default 1)")
    merge.add_argument("-o", "--out", type=Path, help="output .safetensors: the LoRA, or with --into the "
                       "single-file (SGM) checkpoint")
    merge.add_argument("--into", metavar="MODEL", help="base model: an SGM .safetensors, a diffusers folder, "
                       "opt | zero | opt-file or a Hub id (as `train` and `sample` take)")
    merge.add_argument("--diffusers", type=Path, metavar="DIR",
                       help="with --into: also (or only) write a diffusers folder (new or empty)")
    merge.add_argument("--config-dir", help="with --into a single file and --diffusers: component configs "
                       "(default: SDXL's)")
    _rank_options(merge, required=False)
    _dtype_option(merge)
    merge.set_defaults(run_tool=_merge)

    extract = tools.add_parser("extract", help="a LoRA of the difference between a fine-tuned model and its base")
    extract.add_argument("--base", required=True, help="base model: an SGM .safetensors, a diffusers folder, "
                         "opt | zero | opt-file or a Hub id")
    extract.add_argument("--tuned", required=True, help="fine-tuned model: the same kinds as --base")
    extract.add_argument("-o", "--out", required=True, type=Path, help="output LoRA .safetensors (kohya/WebUI format)")
    _rank_options(extract, required=True)
    extract.add_argument("--preset", default="attn-mlp", choices=("attn", "attn-mlp", "attn-mlp-conv"),
                         help="UNet modules to extract (default attn-mlp; attn-mlp-conv adds the ResNet convs)")
    extract.add_argument("--te-threshold", type=bounded_float(0.0, 1.0), default=1e-4,
                         help="extract a text encoder only when its relative change exceeds this (default 1e-4)")
    _dtype_option(extract)
    extract.set_defaults(run_tool=_extract)


def run(args: argparse.Namespace) -> int:
    try:
        lines = args.run_tool(args)
    except (OSError, ValueError) as err:  # LoraFileError, ModelFileError, not found, Hub unreachable: one line
        logger.error("%s", err)
        return 2
    for line in lines:
        print(line)
    return 0


def _rule(args: argparse.Namespace):
    from train.lora.svd import RankRule

    if args.rank is None and args.energy is None and args.sv_ratio is None:
        return None
    return RankRule(rank=args.rank, energy=args.energy, sv_ratio=args.sv_ratio, device=_device(args.device))


def _device(name: str) -> str:
    """`--device`: auto picks CUDA when there is one; a CUDA device on a machine without one is bad input."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a torch device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU here (use cpu or auto)")
    return name


# What a diffusers folder needs from a Hub repository (configs, tokenizers, weights in safetensors).
_HUB_PATTERNS = ["model_index.json", "*/*.json", "*/*.txt", "unet/*.safetensors", "vae/*.safetensors",
                 "text_encoder/*.safetensors", "text_encoder_2/*.safetensors"]


def _model_source(text: str) -> str:
    """A model argument as a local path: `opt`/`zero` and Hub ids become the cached diffusers
    folder (downloaded on first use when the Hub is reachable), `opt-file` the Opt single file;
    local files and folders stay as given.

    Raises:
        captioning.hub.HubUnreachableError (an OSError): not cached and the Hub out of reach.
    """
    from captioning.hub import hub_offline, offline_error
    from train.generate.sampling import resolve_model_source
    from train.names import looks_like_path

    source = resolve_model_source(text)
    if Path(source).expanduser().exists() or looks_like_path(source):
        return str(Path(source).expanduser())
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(source, allow_patterns=_HUB_PATTERNS, local_files_only=True)
    except Exception:  # noqa: BLE001, S110 - not cached (the type varies by version): download below
        pass
    if hub_offline():
        raise offline_error(f"the model {source}", "a local .safetensors file or diffusers folder")
    return snapshot_download(source, allow_patterns=_HUB_PATTERNS)


def _dtype(name: str):
    from train.model.loading import TORCH_DTYPES

    return TORCH_DTYPES[name]


def _resize(args: argparse.Namespace) -> list[str]:
    from train.lora.resize import resize

    report = resize(args.input, args.out, _rule(args), dtype=_dtype(args.dtype))
    return [*report.lines(), f"wrote {args.out}"]


def _merge(args: argparse.Namespace) -> list[str]:
    from train.lora.merge import merge_loras, parse_weighted

    inputs = [parse_weighted(text) for text in args.inputs]
    if args.into is None:
        if args.diffusers is not None:
            raise ValueError("--diffusers DIR: only with --into MODEL (a merged LoRA is one file: -o)")
        if args.out is None:
            raise ValueError("merge: give -o OUT.safetensors")
        return [*merge_loras(inputs, args.out, rule=_rule(args), dtype=_dtype(args.dtype)),
                f"wrote {args.out}"]
    if args.rank is not None or args.energy is not None or args.sv_ratio is not None:
        raise ValueError("--into merges the LoRAs exactly; --rank/--energy/--sv-ratio are for LoRA outputs")
    from train.lora.bake import bake

    result = bake(inputs, _model_source(args.into), single_file=args.out, diffusers_dir=args.diffusers, dtype=_dtype(args.dtype),
                  config_dir=args.config_dir)
    return result.lines()


def _extract(args: argparse.Namespace) -> list[str]:
    from train.lora.extract import extract

    report = extract(_model_source(args.base), _model_source(args.tuned), args.out, _rule(args), preset=args.preset,
                     text_encoder_threshold=args.te_threshold, dtype=_dtype(args.dtype))
    return [*report.lines(), f"wrote {args.out}"]
