"""SDXL prompt embeddings with emphasis weights, as ComfyUI computes them by default.

The prompt's pieces (train.generate.emphasis) are tokenized one by one, so each token carries its
piece's weight; the tokens are cut into 75-token chunks exactly as training text is
(train.data.text_encoding), and each text encoder's penultimate hidden states z are weighted per
token, chunk by chunk: z = (z - z_empty) * w + z_empty, where z_empty encodes the empty prompt
(ComfyUI `comfy/sd1_clip.py`, `ClipTokenWeightEncoder.encode_token_weights`). The pooled vector is
the first chunk's, unweighted. The A1111 WebUI instead scales z by w and restores the chunk's
mean, so its images with weights differ slightly; ComfyUI's word-boundary chunking of long
prompts is not reproduced (chunks are cut every 75 tokens, as in training).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from train.data.text_encoding import CHUNK_TOKENS, chunk_tokens, encode_chunks
from train.generate.emphasis import parse_emphasis

logger = logging.getLogger(__name__)

def weighted_tokens(prompt: str, tokenizer) -> tuple[list[int], list[float]]:
    """Token ids (no BOS/EOS) of the prompt's literal text and each token's weight."""
    tokens: list[int] = []
    weights: list[float] = []
    for piece, weight in parse_emphasis(prompt):
        ids = tokenizer(piece, add_special_tokens=False, truncation=False, verbose=False).input_ids if piece else []
        tokens += ids
        weights += [weight] * len(ids)
    return tokens, weights


def _chunk_weights(weights: list[list[float]], num_chunks: int, max_chunks: int) -> Tensor:
    """(B, k, 77) weights aligned with `chunk_tokens`' ids: 1.0 on BOS, EOS and padding."""
    out = torch.ones(len(weights), num_chunks, CHUNK_TOKENS + 2)
    for b, row in enumerate(weights):
        row = row[: CHUNK_TOKENS * max_chunks]
        for k in range(num_chunks):
            body = row[k * CHUNK_TOKENS : (k + 1) * CHUNK_TOKENS]
            out[b, k, 1 : len(body) + 1] = torch.tensor(body)
    return out


@torch.no_grad()
def encode_weighted_prompts(prompts: list[str], tokenizers, text_encoders, *, max_chunks: int = 3
                            ) -> tuple[Tensor, Tensor]:
    """SDXL embeddings of prompts with emphasis; `train.data.text_encoding.encode_prompts`'s layout.

    Returns prompt_embeds (B, 77k, d1+d2) and pooled (B, d_pooled) of the first chunk, k the chunk
    count of the longest prompt (at most `max_chunks`). Without weights other than 1 the result is
    exactly `encode_prompts` of the prompts' literal text.
    """
    batch = len(prompts)
    hidden_states, pooled = [], None
    num_chunks = None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        tokens, weights = zip(*(weighted_tokens(p, tokenizer) for p in prompts))
        if num_chunks is None:
            longest = max(len(t) for t in tokens)
            num_chunks = max(1, min(max_chunks, math.ceil(longest / CHUNK_TOKENS)))
            if longest > CHUNK_TOKENS * max_chunks:
                logger.warning("a prompt of %d tokens was cut to %d (%d chunks)", longest,
                               CHUNK_TOKENS * max_chunks, max_chunks)
        ids = chunk_tokens(list(tokens), tokenizer, num_chunks=num_chunks, max_chunks=max_chunks)
        z, first = encode_chunks(ids, encoder)  # (B*k, 77, d)
        w = _chunk_weights(list(weights), num_chunks, max_chunks).reshape(-1, CHUNK_TOKENS + 2, 1).to(z.device)
        if (w != 1.0).any():
            empty = chunk_tokens([[]], tokenizer, num_chunks=1)
            z_empty, _ = encode_chunks(empty, encoder)  # (1, 77, d)
            z = torch.where(w != 1.0, (z - z_empty) * w.to(z.dtype) + z_empty, z)
        hidden_states.append(z.reshape(batch, num_chunks * (CHUNK_TOKENS + 2), -1))
        if encoder is text_encoders[-1]:
            pooled = first.reshape(batch, num_chunks, -1)[:, 0]  # (B, d_pooled)
    dtype = hidden_states[-1].dtype
    return torch.cat([h.to(dtype) for h in hidden_states], dim=-1), pooled
