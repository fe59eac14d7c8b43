"""`lora merge --into MODEL`: a LoRA merged into the tiny SDXL equals diffusers' `fuse_lora`, and
the merged checkpoint loads back through our single-file loader and diffusers' `from_single_file`."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import save_file

from train.cli import main
from train.lora.bake import bake
from train.lora.export import kohya_module_name, save_webui_lora, webui_metadata
from train.lora.files import LoraFileError
from train.lora.merge import WeightedLora
from train.model.loading import load_base_model, shipped_tokenizers

pytestmark = pytest.mark.heavy  # merges into whole tiny models and loads them back: left out of `make test-fast`

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def lora_and_fused(tiny_model, tmp_path_factory):
    """A rank-4, alpha-2 attn-mlp-conv LoRA on the UNet and both text encoders (random B), and
    the state dicts diffusers gives after `load_lora_weights` + `fuse_lora` of that file."""
    from train.lora.adapters import add_text_encoder_lora, add_unet_lora, lora_modules

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model.diffusers_dir)
    add_unet_lora(pipe.unet, preset="attn-mlp-conv", rank=4, alpha=2.0)
    add_text_encoder_lora(pipe.text_encoder, rank=4, alpha=2.0)
    add_text_encoder_lora(pipe.text_encoder_2, rank=4, alpha=2.0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
            for module in lora_modules(model).values():
                module.lora_B["default"].weight.copy_(torch.randn(module.lora_B["default"].weight.shape,
                                                                  generator=generator) * 0.1)
    path = tmp_path_factory.mktemp("bake") / "lora.safetensors"
    save_webui_lora(path, unet=pipe.unet, text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2,
                    metadata=webui_metadata(rank=4, alpha=2.0, output_name="lora", resolution=64, tag_frequency={},
                                            comment="t", conv=True), dtype=torch.float32)
    reference = StableDiffusionXLPipeline.from_pretrained(tiny_model.diffusers_dir)
    reference.load_lora_weights(str(path))
    reference.fuse_lora(components=list(COMPONENTS), lora_scale=1.0)
    reference.unload_lora_weights()
    fused = {name: {k: v.clone() for k, v in getattr(reference, name).state_dict().items()} for name in COMPONENTS}
    return path, fused


def _assert_equal_weights(model, fused: dict, name: str) -> None:
    state = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
    expected = {k.removeprefix("text_model."): v for k, v in fused.items()}
    assert state.keys() == expected.keys(), name
    for key, value in expected.items():
        torch.testing.assert_close(state[key].float(), value.float(), rtol=1e-5, atol=1e-6, msg=f"{name}.{key}")


def test_merge_into_single_file_equals_fuse_lora_and_loads_back(tiny_model, lora_and_fused, tmp_path, capsys):
    path, fused = lora_and_fused
    out = tmp_path / "merged.safetensors"
    assert main(["lora", "merge", str(path), "--into", str(tiny_model.single_file), "-o", str(out),
                 "--dtype", "fp32"]) == 0
    assert "modules merged" in capsys.readouterr().out
    ours = load_base_model(str(out), config_dir=str(tiny_model.config_dir), weight_dtype=torch.float32)
    base = load_base_model(str(tiny_model.single_file), config_dir=str(tiny_model.config_dir),
                           weight_dtype=torch.float32)
    for name in COMPONENTS:
        _assert_equal_weights(getattr(ours, name), fused[name], name)
        assert any(not torch.equal(a, b) for a, b in zip(getattr(base, name).state_dict().values(),
                                                          getattr(ours, name).state_dict().values())), name
    tokenizers = shipped_tokenizers()
    pipe = StableDiffusionXLPipeline.from_single_file(str(out), config=str(tiny_model.config_dir),
                                                      local_files_only=True, tokenizer=tokenizers[0],
                                                      tokenizer_2=tokenizers[1])
    _assert_equal_weights(pipe.unet, fused["unet"], "unet (from_single_file)")
    with safe_open(str(out), "pt") as handle:
        record = json.loads(handle.metadata()["merged_loras"])
    assert record[0]["file"] == "lora.safetensors" and record[0]["weight"] == 1.0 and len(record[0]["sha256"]) == 64


def test_diffusers_base_gives_the_same_single_file_and_folder(tiny_model, lora_and_fused, tmp_path):
    path, fused = lora_and_fused
    from_sgm, from_diffusers = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    bake([WeightedLora(path, 0.5)], tiny_model.single_file, single_file=from_sgm, dtype=torch.float16)
    result = bake([WeightedLora(path, 0.5)], tiny_model.diffusers_dir, single_file=from_diffusers,
                  diffusers_dir=tmp_path / "folder", dtype=torch.float16)
    assert result.outputs == [from_diffusers, tmp_path / "folder"]
    with safe_open(str(from_sgm), "pt") as a, safe_open(str(from_diffusers), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():  # noqa: SIM118
            x, y = a.get_tensor(key), b.get_tensor(key)
            assert x.dtype == y.dtype and x.shape == y.shape, key
            torch.testing.assert_close(x.float(), y.float(), rtol=2e-3, atol=1e-4, msg=key)
    with safe_open(str(tmp_path / "folder" / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as handle:
        assert handle.get_tensor("conv_in.weight").dtype == torch.float16
    folder = StableDiffusionXLPipeline.from_pretrained(tmp_path / "folder")
    merged = {k: v.float() for k, v in folder.unet.state_dict().items()}
    base = StableDiffusionXLPipeline.from_pretrained(tiny_model.diffusers_dir).unet.state_dict()
    for key, value in fused["unet"].items():  # half the delta: base + (fused - base) / 2
        torch.testing.assert_close(merged[key], (base[key] + (value - base[key]) / 2).half().float(),
                                   rtol=2e-3, atol=1e-3, msg=key)


def test_single_file_base_into_a_diffusers_folder(tiny_model, lora_and_fused, tmp_path):
    path, fused = lora_and_fused
    bake([WeightedLora(path)], tiny_model.single_file, diffusers_dir=tmp_path / "folder", dtype=torch.float32,
         config_dir=tiny_model.config_dir)
    assert not list(tmp_path.glob(".*merged*"))
    record = json.loads((tmp_path / "folder" / "merge_record.json").read_text())
    assert json.loads(record["merged_loras"])[0]["file"] == "lora.safetensors"
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "folder")
    for name in COMPONENTS:
        _assert_equal_weights(getattr(pipe, name), fused[name], name)


def test_modules_missing_from_the_base_and_mismatched_shapes(tiny_model, tmp_path):
    # down_blocks.2's second transformer block exists in SDXL, not in the tiny model
    missing = kohya_module_name("unet", "down_blocks.2.attentions.0.transformer_blocks.1.attn1.to_q")
    to_q = kohya_module_name("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    for name, down, words in ((missing, torch.ones(2, 64), "no such module"),
                              (to_q, torch.ones(2, 7), "mismatched shapes")):
        lora = tmp_path / f"{words.split()[0]}.safetensors"
        save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": torch.ones(64, 2),
                   f"{name}.alpha": torch.tensor(2.0)}, str(lora))
        with pytest.raises(LoraFileError, match=words) as err:
            bake([WeightedLora(lora)], tiny_model.single_file, single_file=tmp_path / "o.safetensors")
        assert str(lora) in str(err.value)
    assert not (tmp_path / "o.safetensors").exists()
    assert main(["lora", "merge", str(lora), "--into", str(lora), "-o", str(tmp_path / "o.safetensors")]) == 2


def test_a_truncated_or_pickled_base_is_named(tiny_model, lora_and_fused, tmp_path, caplog):
    path, _ = lora_and_fused
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(tiny_model.single_file.read_bytes()[:-1000])
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    for base, words in ((truncated, "not a readable .safetensors"), (pickled, "pickle")):
        caplog.clear()
        assert main(["lora", "merge", str(path), "--into", str(base), "-o", str(tmp_path / "o.safetensors")]) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and str(base) in errors[0] and words in errors[0]
    assert not (tmp_path / "o.safetensors").exists()


def test_a_lokr_file_merges_its_delta(tiny_model, tmp_path):
    from lora_tool_helpers import adapted_unet, peft_deltas, write_lora
    from unet_helpers import tiny_lora_unet

    from train.config import LoraConfig
    from train.model.weight_files import ModelWeights

    spec = LoraConfig(type="lokr", rank=2, alpha=3.0, factor=4)
    unet = adapted_unet(tiny_lora_unet(lora=False), spec)
    lokr = write_lora(tmp_path / "lokr.safetensors", spec, unet=unet)
    out = tmp_path / "merged.safetensors"
    bake([WeightedLora(lokr, 2.0)], tiny_model.single_file, single_file=out, dtype=torch.float32)
    base, merged = ModelWeights(tiny_model.single_file), ModelWeights(out)
    for (component, path), delta in peft_deltas("unet", unet).items():
        at = base.locate(component, path)
        merged_at = merged.locate(component, path)
        torch.testing.assert_close(merged.read(merged_at) - base.read(at), 2 * delta, rtol=1e-4, atol=1e-6)
