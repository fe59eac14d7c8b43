"""Sampling: the hook equals a plain diffusers call, long prompts, tag order, LoRA file checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline
from kdiff_reference import load_k_diffusion
from safetensors.torch import load_file, save_file
from sample_eval_helpers import HEAD, lora_model, write_lora

from train.config import SampleConfig
from train.data.text_encoding import chunk_tokens, encode_prompts, text_encoder_fn
from train.generate.emphasis import escape
from train.generate.hook import SampleGrids, sample_settings, share_components
from train.generate.prompt_encoding import encode_weighted_prompts
from train.generate.prompts import (
    QUALITY_TAIL,
    PromptOrderer,
    default_prompts,
    prepare_prompt,
    split_tags,
)
from train.generate.sampling import (
    LoraFileError,
    SampleSettings,
    build_pipeline,
    encode,
    generate,
    load_lora,
    sample_latents_batch,
    unload_lora,
)
from train.model.loading import load_base_model
from train.names import CARD_NEGATIVE, parse_size

pytestmark = pytest.mark.heavy  # samples a tiny model end to end: left out of `make test-fast`

PROMPT = "1girl, herta \\(honkai: star rail\\), honkai: star rail, safe, smile"  # prompt text: escaped
LITERAL = "1girl, herta (honkai: star rail), honkai: star rail, safe, smile"  # what the encoder reads
SETTINGS = SampleSettings(width=64, height=64, steps=3, seeds=[3, 11], batch_size=2)
DIFFUSERS = SampleSettings(width=64, height=64, steps=3, seeds=[3, 11], batch_size=2, sampler="diffusers-euler-a")


@pytest.fixture(scope="module")
def lora_file(tiny_model, tmp_path_factory):
    model = lora_model(tiny_model, seed=1, text_encoder=True)
    return write_lora(tmp_path_factory.mktemp("lora") / "herta.safetensors", model, text_encoder=True)


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return build_pipeline(load_base_model(str(tiny_model.diffusers_dir), weight_dtype=torch.float32))


def _arrays(images):
    return [np.asarray(im, dtype=np.int16) for im in images]


def test_diffusers_sampler_equals_plain_diffusers_call_with_webui_lora(tiny_model, pipe, lora_file):
    load_lora(pipe, lora_file, "herta", strength=0.8)
    try:
        ours = generate(pipe, [PROMPT], DIFFUSERS, progress=False)[0]
    finally:
        unload_lora(pipe, "herta")
    bare = generate(pipe, [PROMPT], DIFFUSERS, progress=False)[0]

    reference = StableDiffusionXLPipeline.from_pretrained(tiny_model.diffusers_dir, dtype=torch.float32)
    reference.scheduler = EulerAncestralDiscreteScheduler.from_config(
        reference.scheduler.config, timestep_spacing="linspace")
    reference.set_progress_bar_config(disable=True)
    reference.load_lora_weights(str(lora_file), adapter_name="x")
    reference.set_adapters(["x"], adapter_weights=[0.8])
    expected = reference(
        prompt=[LITERAL] * 2, negative_prompt=[CARD_NEGATIVE] * 2, width=64, height=64, num_inference_steps=3,
        guidance_scale=5.0, generator=[torch.Generator("cpu").manual_seed(s) for s in SETTINGS.seeds],
    ).images
    for got, want, without in zip(_arrays(ours), _arrays(expected), _arrays(bare)):
        assert np.abs(got - want).max() <= 1
        assert np.abs(got - without).max() > 5  # the LoRA changes the image: the comparison means something


def test_same_seed_same_image_and_seeds_are_per_image(pipe):
    first = generate(pipe, [PROMPT], SampleSettings(width=64, height=64, steps=2, seeds=[5, 6], batch_size=2),
                     progress=False)[0]
    alone = generate(pipe, [PROMPT], SampleSettings(width=64, height=64, steps=2, seeds=[6], batch_size=1),
                     progress=False)[0]
    assert np.abs(_arrays(first)[1] - _arrays(alone)[0]).max() <= 1  # seed 6 alone == seed 6 in a batch
    assert np.abs(_arrays(first)[0] - _arrays(first)[1]).max() > 5


def test_long_prompt_is_chunked_not_cut(pipe):
    tags = [f"tag{i} word{i}" for i in range(20)]  # about 120 tokens: two chunks
    long = ", ".join(tags)
    changed_end = ", ".join(tags[:-1] + ["blue sky"])
    embeds = encode(pipe, [long, changed_end, "1girl"], CARD_NEGATIVE)
    assert embeds["prompt_embeds"].shape[1] == 154
    assert embeds["negative_prompt_embeds"].shape == embeds["prompt_embeds"].shape
    # The last tag sits past the first 77 positions: changing it must change the embeddings.
    assert not torch.allclose(embeds["prompt_embeds"][0], embeds["prompt_embeds"][1])
    assert torch.equal(embeds["prompt_embeds"][0, :77], embeds["prompt_embeds"][1, :77])


def test_emphasis_weights_token_embeddings_as_comfyui_and_training_text_stays_literal(tiny_model, pipe):
    tokenizers, encoders = [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2]
    caption = "1girl, herta (honkai: star rail), (smile:1.5)"  # a training caption: literal characters
    plain, plain_pooled = encode_prompts([caption], tokenizers, encoders)
    same, same_pooled = encode_weighted_prompts([escape(caption)], tokenizers, encoders)
    assert torch.equal(plain, same) and torch.equal(plain_pooled, same_pooled)  # weights 1: nothing changes

    weighted, pooled = encode_weighted_prompts(["1girl, (smile:1.5)"], tokenizers, encoders)
    unweighted, unweighted_pooled = encode_prompts(["1girl, smile"], tokenizers, encoders)
    assert torch.equal(pooled, unweighted_pooled)  # ComfyUI weights the sequence, not the pooled vector
    smile = 1 + len(pipe.tokenizer("1girl, ", add_special_tokens=False).input_ids)  # after BOS
    empty = torch.cat([encoders[k](chunk_tokens([[]], tokenizers[k], num_chunks=1), output_hidden_states=True)
                       .hidden_states[-2] for k in range(2)], dim=-1)[0]  # (77, d1+d2)
    expected = unweighted.clone()
    expected[0, smile] = (unweighted[0, smile] - empty[smile]) * 1.5 + empty[smile]
    torch.testing.assert_close(weighted, expected)

    # The training loop's encoder reads emphasis syntax as literal characters.
    encode = text_encoder_fn(tiny_model_base(pipe), max_chunks=3, train_text_encoder=False,
                                   cached_captions=None, device=torch.device("cpu"))
    training, _ = encode(["1girl, (smile:1.5)"])
    literal, _ = encode_weighted_prompts([escape("1girl, (smile:1.5)")], tokenizers, encoders)
    assert torch.equal(training, literal) and not torch.allclose(training, weighted)


def tiny_model_base(pipe):
    """The attributes `text_encoder_fn` reads, from the pipeline's components."""
    from types import SimpleNamespace

    return SimpleNamespace(tokenizer=pipe.tokenizer, tokenizer_2=pipe.tokenizer_2, text_encoder=pipe.text_encoder,
                           text_encoder_2=pipe.text_encoder_2)


def test_default_sampler_is_comfyui_euler_a_on_the_unet(pipe):
    kdiff = load_k_diffusion()
    embeds = encode(pipe, [PROMPT], CARD_NEGATIVE)
    settings = SampleSettings(width=64, height=64, steps=2)  # the default sampler: euler_ancestral, normal
    ours = sample_latents_batch(pipe, embeds, [3], settings)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]])

    def eps(x, t, embeds, pooled):
        return pipe.unet(x, t, encoder_hidden_states=embeds, return_dict=False,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})[0]

    wrapped = kdiff.external.DiscreteEpsDDPMDenoiser(eps, torch.cumprod(1 - betas, 0).float(), quantize=True)

    def model(x, sigma):
        negative = wrapped(x, sigma, embeds=embeds["negative_prompt_embeds"], pooled=embeds["negative_pooled_prompt_embeds"])
        positive = wrapped(x, sigma, embeds=embeds["prompt_embeds"], pooled=embeds["pooled_prompt_embeds"])
        return negative + (positive - negative) * settings.cfg

    sigmas = wrapped.get_sigmas(settings.steps)
    generator = torch.Generator().manual_seed(3)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    expected = kdiff.sampling.sample_euler_ancestral(
        model, noise * torch.sqrt(1 + sigmas[0] ** 2), sigmas, disable=True,
        noise_sampler=lambda *_: torch.randn(1, 4, 8, 8, generator=generator))
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_prompt_tags_are_put_in_card_order_with_quality_tail(tag_db_path):
    orderer = PromptOrderer.load(str(tag_db_path))
    text = prepare_prompt("smile, safe, herta \\(honkai: star rail\\), 1girl, honkai: star rail", orderer)
    tags = split_tags(text)
    assert tags[:4] == HEAD
    assert "smile" in tags[4:]
    assert tuple(tags[-len(QUALITY_TAIL):]) == QUALITY_TAIL
    assert "herta \\(honkai: star rail\\)" in text  # prompt text: literal parentheses escaped
    weighted = prepare_prompt("(smile:1.2), [safe], 1girl, herta \\(honkai: star rail\\), honkai: star rail", orderer)
    assert weighted.startswith("1girl, herta \\(honkai: star rail\\), honkai: star rail, (safe:0.909091), (smile:1.2)")
    assert prepare_prompt("smile, 1girl", None) == "smile, 1girl"  # --no-reorder keeps the order
    assert prepare_prompt("1girl, masterpiece", orderer).count("masterpiece") == 1
    # A new character is unknown to the tag database; the training head puts it back in front.
    trained = PromptOrderer.load(str(tag_db_path), head_order=["1girl", "mira (oc)", "original", "safe"])
    assert split_tags(trained.order("smile, safe, mira \\(oc\\), 1girl"))[:4] == ["1girl", "mira (oc)", "safe", "smile"]


def test_sizes_and_default_prompts():
    assert parse_size("portrait") == (832, 1216)
    assert parse_size("1216x832") == (1216, 832)
    with pytest.raises(ValueError, match="multiples of 8"):
        parse_size("100x100")
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_size("big")
    heads = [HEAD, HEAD, ["1girl", "safe"]]
    # Prompt text: the series' parentheses are escaped so emphasis leaves them literal.
    assert default_prompts(heads, 1) == [", ".join(escape(t) for t in HEAD + list(QUALITY_TAIL))]
    assert split_tags(default_prompts(heads, 1)[0]) == HEAD + list(QUALITY_TAIL)


def test_sample_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="every_n_step"):
        SampleConfig(every_n_step=10)
    assert sample_settings(SampleConfig(size="64x64")).width == 64


def test_lora_file_problems_are_named(pipe, tiny_model, lora_file, tmp_path):
    with pytest.raises(LoraFileError, match="full model checkpoint"):
        load_lora(pipe, tiny_model.single_file, "full")
    tensors = load_file(lora_file)
    up = next(k for k in tensors if k.endswith(".lora_up.weight"))
    missing = {k: v for k, v in tensors.items() if k != up}
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(LoraFileError, match="missing.safetensors: 1 module"):
        load_lora(pipe, tmp_path / "missing.safetensors", "missing")
    prefix = up[: -len(".lora_up.weight")]
    unknown = {k.replace(prefix, "lora_unet_no_such_block_to_q"): v for k, v in tensors.items()}
    save_file(unknown, tmp_path / "unknown.safetensors")
    with pytest.raises(LoraFileError, match="unknown.safetensors"):
        load_lora(pipe, tmp_path / "unknown.safetensors", "unknown")
    wide = {k: (torch.zeros(v.shape[0], v.shape[1] * 2) if k.endswith("lora_down.weight") and v.ndim == 2 else v)
            for k, v in tensors.items()}  # another architecture: layer widths that do not fit
    save_file(wide, tmp_path / "other_arch.safetensors")
    with pytest.raises(LoraFileError, match="other_arch.safetensors"):
        load_lora(pipe, tmp_path / "other_arch.safetensors", "other")
    assert not any(pipe.get_list_adapters().values())  # failed loads leave no adapter behind


def test_training_hook_on_opt_model_matches_training_model(tiny_model, tmp_path):
    train_model = lora_model(tiny_model, seed=2)  # UNet LoRA only: VAE and text encoders shareable
    config = SampleConfig(every_n_steps=5, prompts=[PROMPT], seeds=[1], size="64x64", steps=2,
                          sample_model="opt", opt_model=str(tiny_model.diffusers_dir))
    sampler = SampleGrids(config, train_model=train_model, out_dir=tmp_path, weight_dtype=torch.float32)
    on_opt = sampler.render_grid(5, unet=train_model.unet)
    assert (tmp_path / "samples" / "step-000005.png").is_file()
    opt_pipe = sampler._opt_pipe
    assert opt_pipe.vae is train_model.vae and opt_pipe.text_encoder_2 is train_model.text_encoder_2
    assert opt_pipe.unet is not train_model.unet
    assert not any(opt_pipe.get_list_adapters().values())  # the step's LoRA was removed again

    on_train = SampleGrids(config.model_copy(update={"sample_model": "train"}), train_model=train_model,
                               out_dir=tmp_path / "t").render_grid(5, unet=train_model.unet)
    # Same base weights here, so "opt" (exported file) and "train" (PEFT in place) agree.
    assert np.abs(np.asarray(on_opt, np.int16) - np.asarray(on_train, np.int16)).max() <= 2


def test_share_components_keeps_different_weights(tiny_model):
    a = load_base_model(str(tiny_model.diffusers_dir), weight_dtype=torch.float32)
    b = load_base_model(str(tiny_model.diffusers_dir), weight_dtype=torch.float32)
    with torch.no_grad():
        next(b.text_encoder.parameters()).add_(1.0)
    assert share_components(a, b) == ["vae", "text_encoder_2"]
    assert a.text_encoder is not b.text_encoder


def test_sample_cli_writes_images_grid_and_prompts(tiny_model, lora_file, tag_db_path, tmp_path):
    from train.cli import main

    out = tmp_path / "out"
    status = main(["sample", "--lora", str(lora_file), "--model", str(tiny_model.diffusers_dir), "--size", "64x64",
                   "--steps", "2", "--seed", "1", "2", "--tags-db", str(tag_db_path), "--device", "cpu",
                   "--scheduler", "karras", "--noise-device", "cpu", "--workflow", str(tmp_path / "wf.json"),
                   "smile, herta \\(honkai: star rail\\), 1girl", "-o", str(out)])
    assert status == 0
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "p00-s1.png", "p00-s2.png", "prompts.txt"]
    graph = json.loads((tmp_path / "wf.json").read_text())
    samplers = [n["inputs"] for n in graph.values() if n["class_type"] == "KSampler"]
    assert [(k["seed"], k["sampler_name"], k["scheduler"], k["steps"]) for k in samplers] == [
        (1, "euler_ancestral", "karras", 2), (2, "euler_ancestral", "karras", 2)]
    lora = next(n["inputs"] for n in graph.values() if n["class_type"] == "LoraLoader")
    assert lora["lora_name"] == lora_file.name and lora["strength_model"] == lora["strength_clip"] == 1.0
    assert (out / "prompts.txt").read_text().startswith("1girl, herta \\(honkai: star rail\\), smile")
    bad = main(["sample", "--lora", str(tiny_model.single_file), "--model", str(tiny_model.diffusers_dir),
                "--size", "64x64", "--steps", "1", "--no-reorder", "--device", "cpu", "1girl", "-o", str(tmp_path / "b")])
    assert bad == 1 and not (tmp_path / "b").exists()


@pytest.mark.gpu
def test_training_hook_offloads_the_opt_model_on_cuda(tiny_model, tmp_path):
    train_model = lora_model(tiny_model, seed=2)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        getattr(train_model, name).to("cuda")
    config = SampleConfig(every_n_steps=1, prompts=[PROMPT], seeds=[1], size="64x64", steps=2,
                          opt_model=str(tiny_model.diffusers_dir))
    sampler = SampleGrids(config, train_model=train_model, out_dir=tmp_path, device="cuda",
                              weight_dtype=torch.float32)
    grid = sampler.render_grid(1, unet=train_model.unet)
    assert grid.size == (64, 80)
    assert train_model.vae.device.type == "cuda"  # shared modules stay where training keeps them
    assert next(sampler._opt_pipe.unet.parameters()).device.type == "cpu"  # offloaded after use
