"""`lora resize`: the deltas read from every LoRA kind, and their truncation (Eckart-Young)."""

from __future__ import annotations

import pytest
import torch
from lora_tool_helpers import adapted_unet, peft_deltas, write_lora
from safetensors import safe_open
from unet_helpers import tiny_lora_unet

from train.config import LoraConfig
from train.lora.deltas import Delta, read_deltas
from train.lora.files import LoraFileError
from train.lora.resize import resize
from train.lora.svd import RankRule, truncate


@pytest.fixture(scope="module")
def base_unet():
    return tiny_lora_unet(lora=False)


@pytest.fixture(scope="module")
def plain(base_unet, tmp_path_factory):
    """A rank-4, alpha-2 LoRA with convolutions, and PEFT's deltas for it."""
    spec = LoraConfig(rank=4, alpha=2.0)
    unet = adapted_unet(base_unet, spec)
    return write_lora(tmp_path_factory.mktemp("plain") / "plain.safetensors", spec, unet=unet), \
        peft_deltas("unet", unet)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _best(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """The rank-k truncation by torch.linalg.svd and the share of energy it keeps."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k], float(s[:k].square().sum() / s.square().sum())


@pytest.mark.parametrize("kind", ["lora", "lokr", "loha", "loha-tucker"])
def test_deltas_match_peft(base_unet, tmp_path, kind):
    """The delta read from the file is what PEFT adds, for every kind the trainer writes."""
    spec = {"lora": LoraConfig(rank=4, alpha=2.0), "lokr": LoraConfig(type="lokr", rank=2, alpha=3.0, factor=4),
            "loha": LoraConfig(type="loha", rank=3, alpha=2.0),
            "loha-tucker": LoraConfig(type="loha", rank=2, alpha=1.0, tucker=True)}[kind]
    unet = adapted_unet(base_unet, spec)
    lora = read_deltas(write_lora(tmp_path / "x.safetensors", spec, unet=unet))
    expected = peft_deltas("unet", unet)
    assert set(lora.deltas) == set(expected) and lora.kind == kind.split("-")[0]
    assert any(len(d.shape) == 4 and d.shape[-1] == 3 for d in lora.deltas.values())  # 3x3 convs included
    for key, delta in lora.deltas.items():
        assert _relative(delta.weight(), expected[key]) < 1e-5, key


def test_full_rank_resize_reproduces_every_delta(plain, tmp_path):
    path, expected = plain
    report = resize(path, tmp_path / "same.safetensors", RankRule(rank=4), dtype=torch.float32)
    out = read_deltas(tmp_path / "same.safetensors")
    assert set(out.deltas) == set(expected)
    for key, delta in out.deltas.items():
        assert _relative(delta.weight(), expected[key]) < 1e-5, key
    assert all(abs(cut.share - 1) < 1e-9 for cut in report.cuts)
    # alpha / r of the input (2 / 4) is kept: a loader at strength 1 reads the delta.
    assert {round(r, 6) for r in out.alpha_ratios.values()} == {0.5}


def test_rank_k_is_the_svd_truncation_and_reports_the_kept_energy(plain, tmp_path):
    path, expected = plain
    report = resize(path, tmp_path / "r2.safetensors", RankRule(rank=2), dtype=torch.float32)
    out = read_deltas(tmp_path / "r2.safetensors")
    cuts = {cut.key: cut for cut in report.cuts}
    for key, delta in out.deltas.items():
        best, share = _best(expected[key].reshape(expected[key].shape[0], -1), 2)
        assert delta.rank == 2
        assert _relative(delta.matrix(), best.float()) < 1e-5, key
        assert cuts[key].share == pytest.approx(share, rel=1e-6)
        assert cuts[key].old_rank == 4 and cuts[key].new_rank == 2
    lines = "\n".join(report.lines())
    assert "unet" in lines and "file size: in" in lines
    with safe_open(str(tmp_path / "r2.safetensors"), "pt") as handle:
        meta = handle.metadata()
    assert meta["ss_network_dim"] == "2" and meta["ss_network_module"] == "networks.lora"
    assert meta["ss_base_model_version"].startswith("sdxl_")


def test_energy_rule_keeps_at_least_the_share(plain, tmp_path):
    path, _ = plain
    report = resize(path, tmp_path / "e.safetensors", RankRule(energy=0.9), dtype=torch.float32)
    for cut in report.cuts:
        assert cut.share >= 0.9 - 1e-9
        assert 1 <= cut.new_rank <= 4


def test_resized_lokr_is_the_truncated_svd_of_its_delta(base_unet, tmp_path):
    spec = LoraConfig(type="lokr", rank=8, alpha=4.0, factor=4)  # full halves: delta of high rank
    unet = adapted_unet(base_unet, spec)
    source = write_lora(tmp_path / "lokr.safetensors", spec, unet=unet)
    report = resize(source, tmp_path / "plain.safetensors", RankRule(rank=3), dtype=torch.float32)
    expected = peft_deltas("unet", unet)
    out = read_deltas(tmp_path / "plain.safetensors")
    assert out.kind == "lora"
    shares = {cut.key: cut.share for cut in report.cuts}
    for key, delta in out.deltas.items():
        best, share = _best(expected[key].reshape(expected[key].shape[0], -1), 3)
        assert _relative(delta.matrix(), best.float()) < 1e-5, key
        assert shares[key] == pytest.approx(share, rel=1e-6)


def test_rank_rules():
    s = torch.tensor([4.0, 2.0, 1.0, 0.5])  # energies 16, 4, 1, 0.25
    assert RankRule(rank=9).choose(s) == 4
    assert RankRule(energy=16 / 21.25).choose(s) == 1
    assert RankRule(energy=0.95).choose(s) == 3  # rank 2 keeps 20 / 21.25 = 0.941 < 0.95 <= 21 / 21.25
    assert RankRule(energy=1.0).choose(s) == 4
    assert RankRule(sv_ratio=4).choose(s) == 3  # keeps sigma >= 1
    for bad in ({}, {"rank": 2, "energy": 0.5}, {"rank": 0}, {"energy": 1.5}, {"sv_ratio": 1}):
        with pytest.raises(ValueError):
            RankRule(**bad)


def test_factored_svd_equals_the_full_one():
    generator = torch.Generator().manual_seed(0)
    up, down = torch.randn(40, 6, generator=generator), torch.randn(6, 30, generator=generator)
    cut = truncate(Delta((40, 30), up=up, down=down), RankRule(rank=4))
    best, share = _best(up @ down, 4)
    assert _relative(cut.up @ cut.down, best.float()) < 1e-5 and cut.share == pytest.approx(share, rel=1e-6)


def test_bad_inputs_name_the_file(tmp_path, plain):
    pickle = tmp_path / "model.safetensors"
    pickle.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(plain[0].read_bytes()[:-100])
    foreign = tmp_path / "sd15.safetensors"
    from safetensors.torch import save_file

    save_file({"lora_unet_input_blocks_1_1_proj_in.lokr_w1": torch.ones(2, 2),
               "lora_unet_input_blocks_1_1_proj_in.lokr_w2": torch.ones(2, 2),
               "lora_unet_nonexistent_block_proj.lokr_w1": torch.ones(2, 2),
               "lora_unet_nonexistent_block_proj.lokr_w2": torch.ones(2, 2)}, str(foreign))
    for path, words in ((pickle, "pickle"), (truncated, "not a readable"), (foreign, "is not an SDXL module")):
        with pytest.raises(LoraFileError, match=words) as err:
            resize(path, tmp_path / "out.safetensors", RankRule(rank=2))
        assert str(path) in str(err.value)
    assert not (tmp_path / "out.safetensors").exists()


def test_a_safetensors_header_length_starting_with_0x80_is_not_taken_for_a_pickle(tmp_path):
    """The 8-byte header length of a safetensors file can begin with the pickle opcode 0x80."""
    from safetensors.torch import save_file

    from train.lora.files import read_header

    path = tmp_path / "x.safetensors"
    for pad in range(300):
        save_file({"a": torch.ones(1)}, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert read_header(path) == (["a"], {"pad": "x" * pad})


def test_a_diffusers_lora_folder_reads_the_same_deltas(plain, tmp_path):
    from train.lora.convert import convert

    path, expected = plain
    folder = convert(path, tmp_path / "diffusers", to="diffusers").parent
    lora = read_deltas(folder)
    assert set(lora.deltas) == set(expected)
    for key, delta in lora.deltas.items():
        assert _relative(delta.weight(), expected[key]) < 1e-5, key


def test_a_diffusers_layout_lokr_is_refused_by_name(base_unet, tmp_path):
    from train.lora.convert import convert

    spec = LoraConfig(type="lokr", rank=2, alpha=3.0, factor=4)
    source = write_lora(tmp_path / "lokr.safetensors", spec, unet=adapted_unet(base_unet, spec, preset="attn"))
    folder = convert(source, tmp_path / "diffusers").parent
    with pytest.raises(LoraFileError, match="diffusers layout"):
        read_deltas(folder)


@pytest.mark.gpu
def test_the_svd_on_the_gpu_gives_the_cpus_cut():
    generator = torch.Generator().manual_seed(1)
    full = torch.randn(48, 32, generator=generator)
    cpu = truncate(Delta((48, 32), full=full), RankRule(rank=5))
    gpu = truncate(Delta((48, 32), full=full), RankRule(rank=5, device="cuda"))
    assert gpu.up.device.type == "cpu" and gpu.rank == cpu.rank
    assert _relative(gpu.up @ gpu.down, cpu.up @ cpu.down) < 1e-6 and gpu.share == pytest.approx(cpu.share)


def test_device_option_cuda_without_a_gpu_is_one_line(tmp_path, plain, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    from train.cli import main

    out = tmp_path / "out.safetensors"
    assert main(["lora", "resize", str(plain[0]), "-o", str(out), "--rank", "2", "--device", "cuda"]) == 2
    assert main(["lora", "resize", str(plain[0]), "-o", str(out), "--rank", "2", "--device", "tpu9"]) == 2
    assert not out.exists()
    assert main(["lora", "resize", str(plain[0]), "-o", str(out), "--rank", "2", "--device", "auto"]) == 0
