"""Shared fixtures: the reference data beside the repository, and GPU skipping."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data`: the Danbooru tag database and the CLIP BPE merges."""
    if not (SHARED_DATA / "danbooru_tags.csv").exists():
        pytest.fail(f"reference data not found at {SHARED_DATA}: clone the project beside shared/")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tag_db_path(shared_data: Path) -> Path:
    return shared_data / "danbooru_tags.csv"


@pytest.fixture(scope="session")
def clip_bpe_path(shared_data: Path) -> Path:
    return shared_data / "clip_bpe_simple_vocab_16e6.txt.gz"


def pytest_collection_modifyitems(config, items):
    """Skip `gpu`-marked tests cleanly on machines without CUDA."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, clip_bpe_path: Path):
    """The tiny SDXL (train.tiny), built once per session: diffusers folder + SGM single file."""
    from train.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", clip_bpe_path)
