"""SDXL text conditioning for captions longer than CLIP's 77 tokens.

CLIP sees at most 77 positions (BOS + 75 tokens + EOS). Animagine captions often run past that,
so, as sd-scripts (`train_util.get_input_ids` / `get_hidden_states_sdxl`) and the A1111 WebUI do,
the caption's tokens are cut into chunks of 75, each chunk is wrapped in BOS ... EOS and padded to
77, every chunk is encoded separately, and the hidden states are concatenated along the sequence:

    prompt_embeds = concat_k [ penultimate(TE1(chunk_k)) ++ penultimate(TE2(chunk_k)) ]   # (B, 77k, d1+d2)
    pooled        = TE2 projection of the EOS state of chunk 0                            # (B, d_pooled)

A caption of at most 75 tokens gives exactly what diffusers' `StableDiffusionXLPipeline.encode_prompt`
gives (penultimate layer, i.e. clip_skip None; pooled from `text_encoder_2` output[0]). Chunks are
cut every 75 tokens (sd-scripts); the WebUI's back-off to the last comma is not reproduced.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

CHUNK_TOKENS = 75  # CLIP's 77 positions minus BOS and EOS


def chunk_token_ids(
    captions: list[str], tokenizer, *, num_chunks: int | None = None, max_chunks: int = 3
) -> Tensor:
    """Token ids of each caption cut into `k` chunks of `[BOS] + 75 tokens + [EOS] + padding`.

    Args:
        captions: the batch.
        tokenizer: a CLIP tokenizer; its `pad_token_id` fills short chunks (EOS for SDXL's first
            tokenizer, "!" = 0 for the second).
        num_chunks: `k`; default: enough chunks for the longest caption, at least 1.
        max_chunks: tokens beyond `75 * max_chunks` are dropped.

    Returns:
        (B, k, 77) int64 ids. A chunk past the end of a shorter caption is `[BOS, EOS, pad...]`.
    """
    tokens = tokenizer(
        captions, add_special_tokens=False, truncation=False, verbose=False
    ).input_ids
    return chunk_tokens(tokens, tokenizer, num_chunks=num_chunks, max_chunks=max_chunks)


def chunk_tokens(
    tokens: list[list[int]], tokenizer, *, num_chunks: int | None = None, max_chunks: int = 3
) -> Tensor:
    """Token lists (no BOS/EOS) cut into `k` chunks of 77 ids; see `chunk_token_ids`. (B, k, 77)"""
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    tokens = [t[: CHUNK_TOKENS * max_chunks] for t in tokens]
    if num_chunks is None:
        num_chunks = max(1, max(math.ceil(len(t) / CHUNK_TOKENS) for t in tokens))
    ids = torch.full((len(tokens), num_chunks, CHUNK_TOKENS + 2), pad, dtype=torch.long)
    for b, caption_tokens in enumerate(tokens):
        for k in range(num_chunks):
            body = caption_tokens[k * CHUNK_TOKENS : (k + 1) * CHUNK_TOKENS]
            ids[b, k, : len(body) + 2] = torch.tensor([bos, *body, eos], dtype=torch.long)
    return ids


def encode_chunks(ids: Tensor, encoder) -> tuple[Tensor, Tensor]:
    """One text encoder over (B, k, 77) chunk ids.

    Returns the penultimate hidden states (B*k, 77, d), chunk by chunk, and the encoder's first
    output (B*k, d_pooled for CLIPTextModelWithProjection).
    """
    out = encoder(ids.reshape(-1, CHUNK_TOKENS + 2).to(encoder.device), output_hidden_states=True)
    return out.hidden_states[-2], out[0]


def encode_prompts(
    captions: list[str], tokenizers, text_encoders, *, max_chunks: int = 3
) -> tuple[Tensor, Tensor]:
    """SDXL prompt embeddings with 75-token chunking (see the module docstring).

    Args:
        captions: B captions.
        tokenizers: (tokenizer, tokenizer_2).
        text_encoders: (CLIPTextModel, CLIPTextModelWithProjection). Gradients flow if enabled
            (text-encoder LoRA); wrap the call in `torch.no_grad()` otherwise.
        max_chunks: at most this many chunks (77 positions each) per caption.

    Returns:
        prompt_embeds (B, 77*k, d1+d2) in text_encoder_2's dtype, pooled (B, d_pooled), where k is
        the number of chunks of the longest caption (capped at max_chunks).
    """
    lengths = [
        len(t) for t in tokenizers[0](captions, add_special_tokens=False, verbose=False).input_ids
    ]
    num_chunks = max(1, min(max_chunks, max(math.ceil(n / CHUNK_TOKENS) for n in lengths)))
    too_long = [n for n in lengths if n > CHUNK_TOKENS * max_chunks]
    if too_long:
        logger.warning(
            "%d caption(s) longer than %d tokens (up to %d) were truncated; raise max_chunks to keep them",
            len(too_long),
            CHUNK_TOKENS * max_chunks,
            max(too_long),
        )
    batch = len(captions)
    hidden_states = []
    pooled = None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        ids = chunk_token_ids(captions, tokenizer, num_chunks=num_chunks, max_chunks=max_chunks)
        penultimate, first = encode_chunks(ids, encoder)  # (B*k, 77, d)
        hidden_states.append(penultimate.reshape(batch, num_chunks * (CHUNK_TOKENS + 2), -1))
        if encoder is text_encoders[-1]:
            pooled = first.reshape(batch, num_chunks, -1)[:, 0]  # (B, d_pooled), first chunk
    dtype = hidden_states[-1].dtype
    prompt_embeds = torch.cat([h.to(dtype) for h in hidden_states], dim=-1)  # (B, 77k, d1+d2)
    return prompt_embeds, pooled


def text_encoder_fn(base, *, max_chunks: int, train_text_encoder: bool, cached_captions: list[str] | None,
                          device: torch.device):
    """captions -> (prompt_embeds, pooled): `encode_prompts` bound to the model.

    With `cached_captions` (no caption augmentation, frozen encoders), every caption is encoded
    now and kept in CPU memory, and the text encoders leave the GPU (1.6 GiB in bf16 on SDXL):
    training never runs them again.
    """
    tokenizers = (base.tokenizer, base.tokenizer_2)
    encoders = (base.text_encoder, base.text_encoder_2)

    def encode(captions: list[str]):
        with torch.set_grad_enabled(train_text_encoder and torch.is_grad_enabled()):
            return encode_prompts(captions, tokenizers, encoders, max_chunks=max_chunks)

    if cached_captions is None:
        return encode
    from train.data.rows import TextEmbeddingCache

    cache = TextEmbeddingCache(encode, device)
    with torch.no_grad():
        cache.precompute(cached_captions)
    if device.type != "cpu":
        for encoder in encoders:
            encoder.to("cpu")
        torch.cuda.empty_cache()
    logger.info("data.cache_text_outputs: %d captions encoded; text encoders moved off the %s", len(cache),
                device.type)
    return cache
