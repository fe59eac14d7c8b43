"""Chunked SDXL caption encoding (train.data.text_encoding) against diffusers and a by-hand computation."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from train.data.text_encoding import chunk_token_ids, encode_prompts

SHORT = "1girl, hatsune miku, vocaloid, solo, smile, looking at viewer, masterpiece, best quality"
# About 200 tokens: needs three chunks.
LONG = ", ".join(f"tag number {i} with words" for i in range(32))


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return StableDiffusionXLPipeline.from_pretrained(tiny_model.diffusers_dir)


def _encoders(pipe):
    return (pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2)


@torch.no_grad()
def test_short_caption_matches_diffusers_encode_prompt(pipe):
    tokenizers, encoders = _encoders(pipe)
    embeds, pooled = encode_prompts([SHORT], tokenizers, encoders)
    ref_embeds, _, ref_pooled, _ = pipe.encode_prompt(
        SHORT, device="cpu", do_classifier_free_guidance=False
    )
    assert embeds.shape == (1, 77, 32 + 48)
    torch.testing.assert_close(embeds, ref_embeds, rtol=0, atol=0)
    torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=0)


def test_chunk_ids_layout(pipe):
    tok1, tok2 = pipe.tokenizer, pipe.tokenizer_2
    ids = chunk_token_ids([LONG, SHORT], tok2)
    n_long = len(tok2(LONG, add_special_tokens=False).input_ids)
    assert 150 < n_long <= 225
    assert ids.shape == (2, 3, 77)
    body = tok2(LONG, add_special_tokens=False).input_ids
    # chunk 1 of the long caption: BOS, tokens 75..149, EOS
    assert ids[0, 1].tolist() == [49406, *body[75:150], 49407]
    last = body[150:]
    assert ids[0, 2, : len(last) + 2].tolist() == [49406, *last, 49407]
    assert set(ids[0, 2, len(last) + 2 :].tolist()) == {0}  # tokenizer_2 pads with "!" (id 0)
    # a shorter caption's missing chunks are BOS, EOS, padding
    assert ids[1, 1, :2].tolist() == [49406, 49407] and set(ids[1, 1, 2:].tolist()) == {0}
    ids1 = chunk_token_ids([SHORT], tok1)
    n_short = len(tok1(SHORT, add_special_tokens=False).input_ids)
    assert set(ids1[0, 0, n_short + 1 :].tolist()) == {49407}  # tokenizer pads with EOS


@torch.no_grad()
def test_long_caption_is_chunks_encoded_separately(pipe):
    tokenizers, encoders = _encoders(pipe)
    embeds, pooled = encode_prompts([LONG, SHORT], tokenizers, encoders)
    assert embeds.shape == (2, 3 * 77, 80)
    assert pooled.shape == (2, 48)
    # by hand: each chunk through each encoder, penultimate layer, concatenated
    for b, caption in enumerate([LONG, SHORT]):
        parts = []
        for k in range(3):
            per_encoder = []
            for tokenizer, encoder in zip(tokenizers, encoders):
                ids = chunk_token_ids([caption], tokenizer, num_chunks=3)[0, k : k + 1]
                per_encoder.append(encoder(ids, output_hidden_states=True).hidden_states[-2])
            parts.append(torch.cat(per_encoder, dim=-1))
        torch.testing.assert_close(embeds[b : b + 1], torch.cat(parts, dim=1))
        first = chunk_token_ids([caption], tokenizers[1], num_chunks=3)[0, :1]
        torch.testing.assert_close(pooled[b], encoders[1](first).text_embeds[0])
    # the chunks differ: the second chunk is not a copy of the first
    assert not torch.allclose(embeds[0, :77], embeds[0, 77:154])


@torch.no_grad()
def test_max_chunks_truncates_with_warning(pipe, caplog):
    tokenizers, encoders = _encoders(pipe)
    with caplog.at_level(logging.WARNING, logger="train.data.text_encoding"):
        embeds, _ = encode_prompts([LONG], tokenizers, encoders, max_chunks=2)
    assert embeds.shape == (1, 154, 80)
    assert "truncated" in caplog.text
    full, _ = encode_prompts([LONG], tokenizers, encoders, max_chunks=3)
    torch.testing.assert_close(embeds, full[:, :154])


@torch.no_grad()
def test_empty_caption_is_one_chunk(pipe):
    tokenizers, encoders = _encoders(pipe)
    embeds, pooled = encode_prompts([""], tokenizers, encoders)
    ref_embeds, _, ref_pooled, _ = pipe.encode_prompt(
        "", device="cpu", do_classifier_free_guidance=False
    )
    assert embeds.shape == (1, 77, 80)
    torch.testing.assert_close(embeds, ref_embeds, rtol=0, atol=0)
    torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=0)
