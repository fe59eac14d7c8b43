"""`sample --workflow`: a ComfyUI API graph that reproduces the samples."""

from __future__ import annotations

import json

from train.generate.emphasis import parse_emphasis
from train.generate.workflow import WorkflowSpec, checkpoint_name, comfy_workflow, workflow_json

SPEC = WorkflowSpec(checkpoint="animagine-xl-4.0-opt.safetensors", lora="herta.safetensors", strength=0.8,
                    prompts=[r"1girl, herta \(honkai: star rail\), [smile]"], negative="lowres, (bad hands:1.2)",
                    seeds=[3, 11], sampler="dpmpp_2m", scheduler="karras", steps=28, cfg=5.0, width=832, height=1216)


def _resolve(graph, link):
    """The node an input link `[id, output]` points at (it must exist)."""
    assert isinstance(link, list) and len(link) == 2 and link[0] in graph, link
    return graph[link[0]]


def test_workflow_is_a_complete_comfyui_api_graph():
    graph = json.loads(workflow_json(SPEC))
    kinds = sorted(n["class_type"] for n in graph.values())
    assert kinds == sorted(["CheckpointLoaderSimple", "LoraLoader", "CLIPTextEncode", "CLIPTextEncode",
                            "EmptyLatentImage", *["KSampler", "VAEDecode", "SaveImage"] * 2])
    for node in graph.values():  # every link points at an existing node, with the output ComfyUI has
        for value in node["inputs"].values():
            if isinstance(value, list):
                _resolve(graph, value)
    samplers = [n for n in graph.values() if n["class_type"] == "KSampler"]
    for node, seed in zip(samplers, SPEC.seeds):
        inputs = node["inputs"]
        assert (inputs["seed"], inputs["steps"], inputs["cfg"], inputs["sampler_name"], inputs["scheduler"],
                inputs["denoise"]) == (seed, 28, 5.0, "dpmpp_2m", "karras", 1.0)
        assert _resolve(graph, inputs["model"])["class_type"] == "LoraLoader"
        latent = _resolve(graph, inputs["latent_image"])["inputs"]
        assert (latent["width"], latent["height"], latent["batch_size"]) == (832, 1216, 1)
        positive = _resolve(graph, inputs["positive"])["inputs"]
        negative = _resolve(graph, inputs["negative"])["inputs"]
        # ComfyUI has no [ ]: the weight is written out; the series name stays escaped.
        assert positive["text"] == r"1girl, herta \(honkai: star rail\), (smile:0.909091)"
        assert negative["text"] == "lowres, (bad hands:1.2)"
        assert _resolve(graph, positive["clip"])["class_type"] == "LoraLoader"
    lora = next(n["inputs"] for n in graph.values() if n["class_type"] == "LoraLoader")
    assert (lora["lora_name"], lora["strength_model"], lora["strength_clip"]) == ("herta.safetensors", 0.8, 0.8)
    prefixes = [n["inputs"]["filename_prefix"] for n in graph.values() if n["class_type"] == "SaveImage"]
    assert prefixes == ["p00-s3", "p00-s11"]


def test_without_lora_the_checkpoint_feeds_the_sampler_and_names_are_files():
    graph = comfy_workflow(WorkflowSpec(**{**SPEC.__dict__, "lora": None}))
    assert "LoraLoader" not in {n["class_type"] for n in graph.values()}
    sampler = next(n for n in graph.values() if n["class_type"] == "KSampler")
    assert graph[sampler["inputs"]["model"][0]]["class_type"] == "CheckpointLoaderSimple"
    assert checkpoint_name("opt") == "animagine-xl-4.0-opt.safetensors"
    assert checkpoint_name("/models/my_mix.safetensors") == "my_mix.safetensors"
    assert checkpoint_name("cagliostrolab/animagine-xl-4.0-zero") == "animagine-xl-4.0-zero.safetensors"
    assert parse_emphasis("(smile:0.909091)")[0][1] == 0.909091


def test_a_v_prediction_model_gets_model_sampling_discrete_before_the_lora():
    graph = comfy_workflow(WorkflowSpec(**{**SPEC.__dict__, "prediction_type": "v_prediction",
                                           "zero_terminal_snr": True}))
    lora = next(n for n in graph.values() if n["class_type"] == "LoraLoader")
    sampling = _resolve(graph, lora["inputs"]["model"])
    assert sampling["class_type"] == "ModelSamplingDiscrete"
    assert (sampling["inputs"]["sampling"], sampling["inputs"]["zsnr"]) == ("v_prediction", True)
    assert _resolve(graph, sampling["inputs"]["model"])["class_type"] == "CheckpointLoaderSimple"
    assert "ModelSamplingDiscrete" not in {n["class_type"] for n in comfy_workflow(SPEC).values()}
