"""Offline is detected once, fast: an unreachable Hub fails in seconds with one clear line.

The Hub is made unreachable with HF_ENDPOINT on a closed local port (no real network call).
"""

from __future__ import annotations

import logging
import time

import pytest

from captioning import hub

CLOSED = "http://127.0.0.1:9"


@pytest.fixture
def unreachable(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", CLOSED)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    hub._reachable.cache_clear()
    yield
    hub._reachable.cache_clear()


def test_probe_is_made_once_and_says_so_once(unreachable, monkeypatch, caplog):
    calls = []
    real = hub._answers
    monkeypatch.setattr(hub, "_answers", lambda url, timeout: calls.append(url) or real(url, timeout))
    with caplog.at_level(logging.WARNING):
        assert hub.hub_offline() and hub.hub_offline()
    assert calls == [CLOSED]
    assert caplog.text.count("cannot be reached") == 1


def test_offline_setting_skips_the_probe(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "_answers", lambda *a: pytest.fail("probed although HF_HUB_OFFLINE=1"))
    assert hub.hub_offline()
    assert "HF_HUB_OFFLINE is set" in str(hub.offline_error("x", "--model PATH"))


def test_caption_with_a_hub_tokenizer_fails_fast(unreachable, tmp_path, caplog):
    from train.cli import main

    posts = tmp_path / "posts.jsonl"
    posts.write_text('{"id": 1, "rating": "g", "tag_string": "1girl smile"}\n')
    started = time.perf_counter()
    status = main(["caption", str(posts), "-o", str(tmp_path / "o.jsonl"), "--tokenizer", "nobody/no-model"])
    assert time.perf_counter() - started < 5
    assert status == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "cannot be reached" in errors[0] and "--tokenizer DIR" in errors[0]


def test_tagger_download_fails_fast(unreachable):
    from captioning.tagger import resolve_model

    started = time.perf_counter()
    with pytest.raises(hub.HubUnreachableError, match="pass --tagger DIR"):
        resolve_model("nobody/no-tagger")
    assert time.perf_counter() - started < 5


def test_model_loading_fails_fast_with_what_to_pass(unreachable):
    from train.model.loading import load_base_model

    started = time.perf_counter()
    with pytest.raises(hub.HubUnreachableError) as error:
        load_base_model("nobody/no-model")
    assert time.perf_counter() - started < 5
    message = str(error.value)
    assert "\n" not in message and "--model PATH" in message and "HF_HUB_OFFLINE=1" in message


def test_a_local_single_file_never_touches_the_network(unreachable, tiny_model, monkeypatch):
    """Tokenizers for an SGM file come from the shipped vocabulary, not the Hub."""
    import torch

    from train.model.loading import load_base_model

    monkeypatch.setattr(hub, "_answers", lambda *a: pytest.fail("the Hub was probed for a local file"))
    model = load_base_model(str(tiny_model.single_file), config_dir=str(tiny_model.config_dir),
                            weight_dtype=torch.float32)
    assert model.tokenizer("hello world").input_ids == [49406, 3306, 1002, 49407]
    assert model.tokenizer_2.pad_token == "!" and model.tokenizer.pad_token == "<|endoftext|>"
