"""The CLIP token counter: real tokenizer ids, and the per-tag cache equal to whole-caption counts."""

from __future__ import annotations

import json
import random

import pytest

from captioning import TagDatabase, TokenCounter, TokenizerError, build_clip_tokenizer_files
from captioning.tags import display_tag


@pytest.fixture(scope="module")
def tokenizer_dir(clip_bpe_path, tmp_path_factory):
    return build_clip_tokenizer_files(clip_bpe_path, tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="module")
def counter(tokenizer_dir) -> TokenCounter:
    return TokenCounter.from_pretrained(str(tokenizer_dir))


def test_built_files_give_the_real_sdxl_ids(tokenizer_dir):
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    assert CLIPTokenizer.from_pretrained(tokenizer_dir)("hello world").input_ids == [49406, 3306, 1002, 49407]
    fast = CLIPTokenizerFast.from_pretrained(tokenizer_dir)
    assert fast("hello world").input_ids == [49406, 3306, 1002, 49407]
    assert len(fast) == 49408
    assert json.loads((tokenizer_dir / "tokenizer_config.json").read_text())["model_max_length"] == 77


def test_slow_and_fast_tokenizers_agree_on_captions(tokenizer_dir):
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    slow, fast = CLIPTokenizer.from_pretrained(tokenizer_dir), CLIPTokenizerFast.from_pretrained(tokenizer_dir)
    text = "1girl, herta (honkai: star rail), ^_^, year 2024, masterpiece, \u00e9t\u00e9, :d, >_<"
    assert slow(text).input_ids == fast(text).input_ids


def test_direct_tokenizer_matches_transformers_conversion(tokenizer_dir, counter, tmp_path):
    """The tokenizer built with `tokenizers` alone gives the ids transformers' own CLIP
    conversion gives from vocab.json + merges.txt (no tokenizer.json to copy from)."""
    from transformers import CLIPTokenizer

    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (plain / name).write_bytes((tokenizer_dir / name).read_bytes())
    reference = CLIPTokenizer.from_pretrained(plain)
    texts = ["1girl, herta (honkai: star rail), ^_^, year 2024, masterpiece, \u00e9t\u00e9, :d, >_<",
             "  Long   HAIR,\tsmile!!  ", "<|endoftext|> 1girl", "o_o, (o)_(o), 123 456, \u3042\u3044"]
    for text in texts:
        assert counter.ids(text) == reference(text).input_ids, text


def test_documented_token_costs(counter):
    assert counter.count("1girl") == 2
    assert counter.count("year 2024") == 5
    assert counter.ids("1girl")[0] == 49406 and counter.ids("1girl")[-1] == 49407


def test_per_tag_cache_equals_the_tokenizer_on_many_captions(counter, tag_db_path):
    """Tags ending in punctuation fuse with the comma (`rail),`): the cache must still be exact."""
    db = TagDatabase.load(tag_db_path)
    rng = random.Random(0)
    names = [n for n, _ in db.tags_of(db.category("1girl"))[:3000]]
    names += [n for n, _ in db.tags_of(db.category("hatsune_miku"))[:2000]]
    names += ["^_^", ">_<", ":)", ";d", "^^^", "...", "!?", "\u00e9t\u00e9", "year 2024", "(o)_(o)"]
    tags = [display_tag(n) for n in names]
    for _ in range(400):
        caption = rng.sample(tags, rng.randint(1, 60))
        assert counter.count_tags(caption) == counter.count(", ".join(caption)), caption


def test_count_many_matches_count(counter):
    texts = ["1girl", "long hair, smile", "", "herta (honkai: star rail)"]
    assert counter.count_many(texts) == [counter.count(t) for t in texts]
    assert counter.count_tags([]) == 0


def test_from_pretrained_accepts_a_model_folder(tokenizer_dir, tmp_path):
    model = tmp_path / "model"
    (model / "tokenizer").mkdir(parents=True)
    for file in tokenizer_dir.iterdir():
        (model / "tokenizer" / file.name).write_bytes(file.read_bytes())
    assert TokenCounter.from_pretrained(str(model)).count("1girl") == 2


def test_from_bpe_builds_once_into_the_cache(clip_bpe_path, tmp_path):
    first = TokenCounter.from_bpe(clip_bpe_path, cache_dir=tmp_path)
    built = list(tmp_path.iterdir())
    assert len(built) == 1 and (built[0] / "tokenizer.json").exists()
    assert TokenCounter.from_bpe(clip_bpe_path, cache_dir=tmp_path).count("1girl") == first.count("1girl")


def test_bad_tokenizer_inputs_are_clear_errors(tmp_path):
    with pytest.raises(TokenizerError, match="cannot load a CLIP tokenizer"):
        TokenCounter.from_pretrained(str(tmp_path))
    bad = tmp_path / "bad.txt.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(TokenizerError, match="bad.txt.gz"):
        build_clip_tokenizer_files(bad, tmp_path / "out")
    with pytest.raises(TokenizerError, match="missing.gz"):
        TokenCounter.from_bpe(tmp_path / "missing.gz")
