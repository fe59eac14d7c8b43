"""Checkpoint evaluation on a tiny run: rows, determinism, recommendation, bad inputs, report files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from sample_eval_helpers import (
    TAGGER_LABELS,
    build_tiny_clip,
    lora_model,
    make_dataset,
    write_lora,
)
from tagger_helpers import build_tiny_tagger

from train.cli import main
from train.evaluate.compare import (
    EvalRow,
    character_tags,
    discover_checkpoints,
    read_prompt_file,
    recommend,
)
from train.evaluate.validation import ValidationLoss, dataset_sources, encode_items, folder_sources
from train.model.loading import load_base_model

pytestmark = pytest.mark.heavy  # evaluates tiny runs end to end: left out of `make test-fast`

pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def run_dir(tiny_model, tmp_path_factory):
    """checkpoint-000010 and -000020 with WebUI LoRAs, -000030 with a LoRA whose keys match nothing."""
    root = tmp_path_factory.mktemp("run")
    for step, seed in ((10, 1), (20, 2)):
        folder = root / f"checkpoint-{step:06d}"
        folder.mkdir()
        write_lora(folder / "herta.safetensors", lora_model(tiny_model, seed=seed, scale=0.2 * seed))
    bad = {k.replace("lora_unet_", "lora_unet_other_arch_"): v
           for k, v in load_file(root / "checkpoint-000010" / "herta.safetensors").items()}
    (root / "checkpoint-000030").mkdir()
    save_file(bad, root / "checkpoint-000030" / "herta.safetensors")
    return root


@pytest.fixture(scope="module")
def prepped(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("prepped"))


@pytest.fixture(scope="module")
def tagger_dir(tmp_path_factory):
    return build_tiny_tagger(tmp_path_factory.mktemp("tagger"), TAGGER_LABELS)


def _eval(tiny_model, run_dir, prepped, tagger_dir, out, *extra):
    return main(["eval", str(run_dir), "--dataset", str(prepped), "--model", str(tiny_model.diffusers_dir),
                 "--size", "64x64", "--steps", "2", "--seeds", "0", "--tagger", str(tagger_dir),
                 "--device", "cpu", "-o", str(out), *extra])


def test_eval_run_dir_rows_report_and_determinism(tiny_model, run_dir, prepped, tagger_dir, tmp_path, clip_bpe_path):
    clip = build_tiny_clip(tmp_path / "clip", clip_bpe_path)
    status = _eval(tiny_model, run_dir, prepped, tagger_dir, tmp_path / "a", "--clip", str(clip))
    assert status == 1  # the foreign checkpoint is reported ...
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == ["base", "checkpoint-000010", "checkpoint-000020", "checkpoint-000030"]
    assert "checkpoint-000030" in rows and "match no layer" in rows["checkpoint-000030"]["error"]
    for name in ("base", "checkpoint-000010", "checkpoint-000020"):  # ... and the others still evaluated
        row = rows[name]
        assert row["error"] is None and row["val_loss"] > 0 and row["grid"]
        assert row["prompt_recall"] is not None and row["character_recall"] is not None
        assert row["negative_rate"] is not None
        assert row["clip_image"] is not None and row["clip_text"] is not None
    losses = [rows[n]["val_loss"] for n in ("base", "checkpoint-000010", "checkpoint-000020")]
    assert len(set(losses)) == 3
    assert report["recommended"] in ("checkpoint-000010", "checkpoint-000020") and report["reason"]
    for name in ("report.csv", "index.html", "comparison.png", "plots/val_loss.png", "plots/tag_fidelity.png"):
        assert (tmp_path / "a" / name).is_file(), name
    assert "checkpoint-000020" in (tmp_path / "a" / "report.csv").read_text()

    _eval(tiny_model, run_dir, prepped, tagger_dir, tmp_path / "b", "--no-images")
    again = {r["name"]: r for r in json.loads((tmp_path / "b" / "report.json").read_text())["rows"]}
    assert [again[n]["val_loss"] for n in ("base", "checkpoint-000010", "checkpoint-000020")] == losses


def test_validation_loss_is_deterministic_and_sees_the_val_split(tiny_model, prepped):
    model = load_base_model(str(tiny_model.diffusers_dir), weight_dtype=torch.float32)
    sources = dataset_sources(prepped)
    assert [s[0] for s in sources] == ["3.png", "4.png"]  # the split == "val" rows only
    assert sources[0][3].tolist() == [72.0, 64.0, 4.0, 0.0, 64.0, 64.0]  # original, crop, target
    items = encode_items(sources, model.vae)
    first = ValidationLoss(items, model.noise_scheduler, model.prediction_type, seed=3)
    second = ValidationLoss(encode_items(sources, model.vae), model.noise_scheduler, model.prediction_type, seed=3)
    encoders = ([model.tokenizer, model.tokenizer_2], [model.text_encoder, model.text_encoder_2])
    assert first(model.unet, *encoders) == second(model.unet, *encoders)
    other_seed = ValidationLoss(items, model.noise_scheduler, model.prediction_type, seed=4)
    assert other_seed(model.unet, *encoders) != first(model.unet, *encoders)


def test_recommendation_prefers_val_loss_within_fidelity_margin():
    rows = [
        EvalRow("base", 0, None, val_loss=0.10, tag_fidelity=0.2),
        EvalRow("a", 100, "a", val_loss=0.09, tag_fidelity=0.60),  # best loss but poor fidelity
        EvalRow("b", 200, "b", val_loss=0.12, tag_fidelity=0.90),
        EvalRow("c", 300, "c", val_loss=0.11, tag_fidelity=0.88),  # within 0.05 of the best, lower loss
        EvalRow("d", 400, "d", error="bad file"),
    ]
    pick, reason = recommend(rows, margin=0.05)
    assert pick.name == "c" and "validation loss" in reason and "0.900" in reason
    assert recommend(rows, margin=0.5)[0].name == "a"
    assert recommend(rows, margin=0.0)[0].name == "b"
    no_loss = [EvalRow("x", 1, "x", tag_fidelity=0.5), EvalRow("y", 2, "y", tag_fidelity=0.7)]
    assert recommend(no_loss)[0].name == "y"
    no_fidelity = [EvalRow("x", 1, "x", val_loss=0.2), EvalRow("y", 2, "y", val_loss=0.1)]
    assert recommend(no_fidelity)[0].name == "y"
    tie = [EvalRow("x", 1, "x", val_loss=0.1), EvalRow("y", 2, "y", val_loss=0.1)]
    assert recommend(tie)[0].name == "x"
    assert recommend([EvalRow("base", 0, None, val_loss=0.1)])[0] is None


def test_bad_inputs_are_named(tmp_path, run_dir, tiny_model):
    checkpoints, problems = discover_checkpoints([tmp_path / "no_run", run_dir / "checkpoint-000010" / "herta.safetensors"])
    assert [(c.name, c.step) for c in checkpoints] == [("base", 0), ("checkpoint-000010", 10)]
    assert problems == [f"{tmp_path / 'no_run'}: no such run folder or LoRA file"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\n1girl, smile\n\nsolo\n", encoding="utf-8")
    assert read_prompt_file(prompts) == (["1girl, smile", "solo"], [f"{prompts}:3: empty line skipped (one prompt per line)"])
    (tmp_path / "blank.txt").write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"blank.txt: no prompts"):
        read_prompt_file(tmp_path / "blank.txt")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"empty: no images"):
        folder_sources(tmp_path / "empty")
    status = main(["eval", str(tmp_path / "no_run"), "--model", str(tiny_model.diffusers_dir), "-o", str(tmp_path / "o")])
    assert status == 1

    # A blank prompt line and an empty validation folder are reported; the checkpoints still run.
    lora = run_dir / "checkpoint-000010" / "herta.safetensors"
    status = main(["eval", str(lora), "--prompts", str(prompts), "--no-reorder", "--val-folder", str(tmp_path / "empty"),
                   "--model", str(tiny_model.diffusers_dir), "--size", "64x64", "--steps", "1", "--seeds", "0",
                   "--device", "cpu", "-o", str(tmp_path / "o")])
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert status == 1 and report["prompts"] == ["1girl, smile", "solo"]
    assert any("prompts.txt:3: empty line" in p for p in report["problems"])
    assert any("empty: no images" in p for p in report["problems"])
    assert all(row["grid"] and row["error"] is None for row in report["rows"])


def test_lora_files_list_and_val_folder(tiny_model, run_dir, tmp_path, prepped):
    folder = tmp_path / "val"
    folder.mkdir()
    for source in (prepped / "images").glob("[34].png"):
        (folder / source.name).write_bytes(source.read_bytes())
    (folder / "3.txt").write_text("1girl, smile", encoding="utf-8")
    files = [run_dir / f"checkpoint-0000{s}0" / "herta.safetensors" for s in (2, 1)]
    status = main(["eval", *map(str, files), "--val-folder", str(folder), "--val-scale", "0.0625", "--no-images",
                   "--model", str(tiny_model.diffusers_dir), "--device", "cpu", "-o", str(tmp_path / "out")])
    assert status == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["val_loss"] is not None for r in report["rows"]] == [True, True, True]
    assert [r["name"] for r in report["rows"]] == ["base", "checkpoint-000010", "checkpoint-000020"]
    assert report["recommended"] in ("checkpoint-000010", "checkpoint-000020")


def test_character_tags_are_the_common_head_tags():
    heads = [["1girl", "herta", "safe"], ["1girl", "herta", "safe"], ["1girl", "safe"]]
    assert set(character_tags(heads)) == {"1girl", "herta", "safe"}
    assert set(character_tags(heads, min_share=0.9)) == {"1girl", "safe"}


def test_val_model_measures_loss_on_a_second_model(tiny_model, tmp_path, prepped):
    """Images on one model, validation loss on another (here the same weights as a single file)."""
    lora = write_lora(tmp_path / "te.safetensors", lora_model(tiny_model, seed=3, text_encoder=True),
                      text_encoder=True)
    common = [str(lora), "--dataset", str(prepped), "--device", "cpu", "--tokenizer-dir", str(tiny_model.tokenizer_dir),
              "--config-dir", str(tiny_model.config_dir), "--val-timesteps", "300", "700"]
    assert main(["eval", *common, "--no-images", "--model", str(tiny_model.diffusers_dir), "-o", str(tmp_path / "one")]) == 0
    assert main(["eval", *common, "--model", str(tiny_model.diffusers_dir), "--val-model", str(tiny_model.single_file),
                 "--size", "64x64", "--steps", "1", "--seeds", "0", "-o", str(tmp_path / "two")]) == 0
    one, two = (json.loads((tmp_path / d / "report.json").read_text())["rows"] for d in ("one", "two"))
    assert two[1]["grid"] and two[0]["val_loss"] == pytest.approx(one[0]["val_loss"], rel=1e-5)
    assert two[1]["val_loss"] == pytest.approx(one[1]["val_loss"], rel=1e-5)
    assert two[1]["val_loss"] != two[0]["val_loss"]


def test_discovery_follows_the_trainer_layout(tiny_model, tmp_path):
    """RUN/checkpoint-N/NAME.safetensors (+ diffusers/ and accelerate files) and the final RUN/NAME.safetensors."""
    model = lora_model(tiny_model, seed=5)
    run = tmp_path / "run"
    for step in (10, 20):
        folder = run / f"checkpoint-{step:06d}"
        (folder / "diffusers").mkdir(parents=True)
        write_lora(folder / "herta.safetensors", model, steps=step)
        write_lora(folder / "herta-raw.safetensors", model, steps=step)  # train.ema_decay: the raw weights
        save_file({"unet.down_blocks.1.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 64)},
                  folder / "diffusers" / "pytorch_lora_weights.safetensors")
        save_file({"x": torch.zeros(1)}, folder / "model.safetensors")
    (run / "checkpoint-000030").mkdir()  # a checkpoint without a LoRA file
    write_lora(run / "herta.safetensors", model, steps=20)  # final export at the last checkpoint's step
    checkpoints, problems = discover_checkpoints([run])
    assert [(c.name, c.step) for c in checkpoints] == [("base", 0), ("checkpoint-000010", 10), ("checkpoint-000020", 20)]
    assert checkpoints[1].lora == run / "checkpoint-000010" / "herta.safetensors"
    assert problems == [f"{run / 'checkpoint-000030'}: no WebUI LoRA .safetensors in this checkpoint"]
    write_lora(run / "herta.safetensors", model, steps=25)
    assert discover_checkpoints([run])[0][-1].name == "herta (final)"
    write_lora(tmp_path / "a" / "herta.safetensors", model, steps=7)
    write_lora(tmp_path / "b" / "herta.safetensors", model, steps=7)
    names = [c.name for c in discover_checkpoints([tmp_path / "a" / "herta.safetensors",
                                                   tmp_path / "b" / "herta.safetensors"])[0]]
    assert names == ["base", "herta (a, step 7)", "herta (b, step 7)"]
