"""train.data.rows: caption augmentation, batches with SDXL time ids, the text-output cache."""

from __future__ import annotations

import random

import torch

from train.data.rows import CaptionAugment, TextEmbeddingCache, TrainingData, make_caption

HEAD, BODY, TAIL = ["1girl", "mira"], ["blue hair", "smile", "long hair", "shirt"], ["safe", "masterpiece"]


def test_body_shuffles_and_head_tail_stay():
    captions = {make_caption(HEAD, BODY, TAIL, random.Random(i), CaptionAugment()) for i in range(20)}
    assert len(captions) > 1
    for caption in captions:
        tags = caption.split(", ")
        assert tags[:2] == HEAD and tags[-2:] == TAIL and sorted(tags[2:-2]) == sorted(BODY)
    same = make_caption(HEAD, BODY, TAIL, random.Random(3), CaptionAugment())
    assert same == make_caption(HEAD, BODY, TAIL, random.Random(3), CaptionAugment())


def test_no_augmentation_keeps_the_caption():
    augment = CaptionAugment(shuffle=False)
    assert not augment.active
    assert make_caption(HEAD, BODY, TAIL, random.Random(0), augment) == ", ".join(HEAD + BODY + TAIL)


def test_tag_and_caption_dropout():
    augment = CaptionAugment(shuffle=False, tag_dropout=0.5)
    kept = [make_caption(HEAD, BODY, TAIL, random.Random(i), augment).split(", ") for i in range(50)]
    assert all(tags[:2] == HEAD and tags[-2:] == TAIL for tags in kept)
    lengths = {len(tags) for tags in kept}
    assert min(lengths) < len(HEAD + BODY + TAIL) and max(lengths) > len(HEAD + TAIL)
    empty = CaptionAugment(caption_dropout=0.5)
    results = [make_caption(HEAD, BODY, TAIL, random.Random(i), empty) for i in range(50)]
    assert "" in results and any(results)


class _Cache:
    scale = 1.0

    def load(self, row, flip=False):
        return torch.full((4, row["bucket_height"] // 8, row["bucket_width"] // 8), -1.0 if flip else 1.0)


def test_batch_time_ids_and_flip():
    row = {"id": "a", "width": 1000, "height": 800, "bucket_width": 1152, "bucket_height": 896,
           "resize_width": 1160, "resize_height": 928, "crop_left": 4, "crop_top": 16,
           "caption_head": HEAD, "caption_body": BODY, "caption_tail": TAIL}
    data = TrainingData([row], _Cache(), CaptionAugment(), flip=True)
    batches = [data.batch([0, 0], random.Random(i)) for i in range(10)]
    assert batches[0].latents.shape == (2, 4, 112, 144)
    assert batches[0].ids == ["a", "a"]
    for batch in batches:
        for latents, ids in zip(batch.latents, batch.time_ids):
            flipped = latents[0, 0, 0].item() < 0
            left = 1160 - 4 - 1152 if flipped else 4
            assert ids.tolist() == [800, 1000, 16, left, 896, 1152]
    assert {b.latents[0, 0, 0, 0].item() for b in batches} == {-1.0, 1.0}


def test_text_cache_equals_direct_encoding_and_encodes_each_caption_once():
    calls = []

    def encode(captions):
        calls.append(list(captions))
        k = 2 if any("long" in c for c in captions) else 1
        embeds = torch.stack([torch.full((77 * k, 3), float(len(c))) for c in captions])
        return embeds, torch.stack([torch.full((5,), float(len(c))) for c in captions])

    cache = TextEmbeddingCache(encode)
    embeds, pooled = cache(["a", "bb", "a"])
    direct = encode(["a", "bb", "a"])
    assert torch.equal(embeds, direct[0]) and torch.equal(pooled, direct[1])
    calls.clear()
    cache(["bb", "a"])
    assert calls == []
    mixed, _ = cache(["a", "long caption"])  # different chunk counts: encoded together
    assert mixed.shape == (2, 154, 3)


def test_text_cache_pads_with_the_empty_chunk_exactly_as_joint_encoding():
    """Captions of different chunk counts in one batch: the cache pads with the empty chunk's
    encoding, which equals encoding the batch together (each chunk is encoded on its own)."""

    def chunk_values(caption: str, k: int) -> torch.Tensor:  # (77, 3): a chunk's own encoding
        if k >= len(caption.split()):  # past the caption's end: the empty chunk [BOS, EOS, pad...]
            return torch.full((77, 3), -1.0)
        return torch.full((77, 3), float(len(caption) * 10 + k))

    def encode(captions):
        k = max(1, max(len(c.split()) for c in captions))  # one "word" = one chunk here
        embeds = torch.stack([torch.cat([chunk_values(c, i) for i in range(k)]) for c in captions])
        return embeds, torch.stack([chunk_values(c, 0)[0] for c in captions])

    cache = TextEmbeddingCache(encode)
    assert cache.precompute(["one", "two words", "three word caption", "one"]) == 3
    batch = ["one", "three word caption", "two words"]
    embeds, pooled = cache(batch)
    joint = encode(batch)
    assert embeds.shape == (3, 231, 3)
    assert torch.equal(embeds, joint[0]) and torch.equal(pooled, joint[1])
