"""The ComfyUI workflow (API format) that reproduces `animagine-lora sample`'s images.

The API format is what ComfyUI's "Export (API)" writes and its `/prompt` endpoint runs: a JSON
object of nodes, `{"id": {"class_type": ..., "inputs": {...}, "_meta": {"title": ...}}}`, where an
input `["id", k]` is output `k` of another node. One graph holds every prompt x seed:

    CheckpointLoaderSimple -> LoraLoader (model and CLIP at the LoRA strength)
      -> CLIPTextEncode (each prompt; the negative) -> KSampler (per seed) <- EmptyLatentImage
      -> VAEDecode -> SaveImage ("p00-s1", ...)

A v-prediction model gets a ModelSamplingDiscrete node (`v_prediction`, `zsnr` for zero terminal
SNR) after the loader: ComfyUI finds this itself only in checkpoints carrying the `v_pred` key.

Node and input names are those of ComfyUI's `nodes.py`. Prompts are written with
`emphasis.comfy_text`, which ComfyUI parses to the same pieces and weights as we do. The checkpoint
and LoRA are named by file name: ComfyUI looks them up in its models/checkpoints and models/loras.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from train.generate.emphasis import comfy_text, parse_emphasis
from train.names import OPT_FILE, OPT_FILE_ALIAS, ZERO_FILE

# The single-file names of our `--model` aliases, as users keep them in ComfyUI's models/checkpoints.
KNOWN_CHECKPOINTS = {"opt": OPT_FILE, OPT_FILE_ALIAS: OPT_FILE, "zero": ZERO_FILE}


@dataclass(frozen=True)
class WorkflowSpec:
    """What one `sample` run used; names are file names as ComfyUI's loaders list them."""

    checkpoint: str
    lora: str | None
    strength: float
    prompts: Sequence[str]
    negative: str
    seeds: Sequence[int]
    sampler: str
    scheduler: str
    steps: int
    cfg: float
    width: int
    height: int
    prediction_type: str = "epsilon"  # the model's, as `sample` loaded it (train.model.prediction)
    zero_terminal_snr: bool = False


def checkpoint_name(model: str) -> str:
    """The checkpoint file name ComfyUI needs for our `--model` value (a path's or repo's last part)."""
    if model in KNOWN_CHECKPOINTS:
        return KNOWN_CHECKPOINTS[model]
    name = Path(model.rstrip("/")).name
    return name if name.endswith((".safetensors", ".ckpt")) else f"{name}.safetensors"


def _node(class_type: str, title: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}


def comfy_workflow(spec: WorkflowSpec) -> dict[str, dict]:
    """The API-format graph for every prompt x seed of `spec`, image prefixes `pNN-s<seed>`."""
    graph: dict[str, dict] = {}

    def add(node: dict) -> str:
        key = str(len(graph) + 1)
        graph[key] = node
        return key

    checkpoint = add(_node("CheckpointLoaderSimple", "Load Checkpoint", ckpt_name=spec.checkpoint))
    model, clip = [checkpoint, 0], [checkpoint, 1]
    if spec.prediction_type == "v_prediction":
        model = [add(_node("ModelSamplingDiscrete", "v-prediction", model=model, sampling="v_prediction",
                           zsnr=spec.zero_terminal_snr)), 0]
    if spec.lora is not None:
        lora = add(_node("LoraLoader", "Load LoRA", model=model, clip=clip, lora_name=spec.lora,
                         strength_model=spec.strength, strength_clip=spec.strength))
        model, clip = [lora, 0], [lora, 1]
    negative = add(_node("CLIPTextEncode", "Negative", text=comfy_text(parse_emphasis(spec.negative), comfy=True),
                         clip=clip))
    latent = add(_node("EmptyLatentImage", "Empty Latent Image", width=spec.width, height=spec.height, batch_size=1))
    for p, prompt in enumerate(spec.prompts):
        positive = add(_node("CLIPTextEncode", f"Prompt p{p:02d}", text=comfy_text(parse_emphasis(prompt), comfy=True),
                             clip=clip))
        for seed in spec.seeds:
            sampled = add(_node("KSampler", f"KSampler p{p:02d}-s{seed}", model=model, positive=[positive, 0],
                                negative=[negative, 0], latent_image=[latent, 0], seed=seed, steps=spec.steps,
                                cfg=spec.cfg, sampler_name=spec.sampler, scheduler=spec.scheduler, denoise=1.0))
            image = add(_node("VAEDecode", "VAE Decode", samples=[sampled, 0], vae=[checkpoint, 2]))
            add(_node("SaveImage", "Save Image", images=[image, 0], filename_prefix=f"p{p:02d}-s{seed}"))
    return graph


def workflow_json(spec: WorkflowSpec) -> str:
    """`comfy_workflow(spec)` as indented JSON text."""
    return json.dumps(comfy_workflow(spec), indent=2, ensure_ascii=False) + "\n"
