"""CLIP token counting for the caption budget, fast enough for whole booru dumps.

Both SDXL text encoders use CLIP's BPE vocabulary (49,408 tokens). The counter uses the real
tokenizer: the model's own tokenizer folder, the Hub's, or one built offline from the BPE merge
list, by default the copy shipped in `captioning/data/` (OpenAI CLIP's
`bpe_simple_vocab_16e6.txt.gz`: a version line, then merge rules `a b`; CLIP uses the first
48,894). Built with `tokenizers` directly: `transformers` is not imported.

Speed: CLIP pre-tokenizes on whitespace and on runs of punctuation, then applies BPE within each
piece, so in a `", "`-joined caption every tag is tokenized on its own, *except* that a tag ending
in punctuation fuses with the comma that follows (`rail)` + `,` is the single piece `),`). The
counter therefore caches, per tag, the count of `tag,` and of `tag` alone: a caption costs
sum(count(tag + ",") for all but the last tag) + count(last tag), exactly the tokenizer's count
of the joined string (checked on many captions by tests/test_tokens.py).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

from captioning import outputs

logger = logging.getLogger(__name__)

# CLIP uses the first 49152 - 256 - 2 merge rules of the BPE file (OpenAI CLIP, clip/simple_tokenizer.py).
CLIP_MERGES = 49152 - 256 - 2
CLIP_VOCAB_SIZE = 49408
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 77
SHIPPED_CLIP_BPE = Path(__file__).resolve().parent / "data" / "clip_bpe_simple_vocab_16e6.txt.gz"


class TokenizerError(ValueError):
    """No usable tokenizer: the message says what was tried."""


class TokenizerOfflineError(TokenizerError):
    """A Hub tokenizer that is neither cached nor reachable: the message says what to pass."""


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable character table, in byte-symbol order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def read_clip_merges(bpe_gz: Path) -> list[str]:
    """The merge rules CLIP uses from a `bpe_simple_vocab_16e6.txt.gz`-style file."""
    try:
        with gzip.open(bpe_gz, "rt", encoding="utf-8") as f:
            merges = f.read().split("\n")[1: CLIP_MERGES + 1]
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise TokenizerError(f"{bpe_gz}: cannot read the CLIP BPE merges ({error})") from None
    if len(merges) != CLIP_MERGES or any(len(m.split()) != 2 for m in merges):
        raise TokenizerError(f"{bpe_gz}: expected {CLIP_MERGES} merge rules 'a b' after a header line")
    return merges


def clip_vocab(merges: Sequence[str]) -> list[str]:
    """The 256 byte symbols, the same with `</w>`, one token per merge rule, then the start and
    end tokens (ids 49406, 49407), as in OpenAI CLIP's simple_tokenizer."""
    symbols = _bytes_to_unicode()
    return symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]


def clip_tokenizer(vocab: dict[str, int], merges: Sequence[str | tuple[str, str]]):
    """A `tokenizers.Tokenizer` that behaves as CLIP's (the pipeline `transformers`'
    CLIPTokenizerFast builds: NFC, whitespace runs to one space, lowercase; CLIP's split regex
    and byte-level pieces; BPE with `</w>` word ends; `<|startoftext|> ... <|endoftext|>` around
    the ids). Built directly because importing transformers alone takes longer than `caption`'s
    whole start-up on a small file."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    pairs = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in merges]
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                              end_of_word_suffix="</w>", fuse_unk=False, unk_token=EOS))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.RobertaProcessing(
        (EOS, vocab[EOS]), (BOS, vocab[BOS]), trim_offsets=False, add_prefix_space=False)
    tokenizer.add_special_tokens([BOS, EOS])
    return tokenizer


def build_clip_tokenizer_files(bpe_gz: Path, out_dir: Path,
                               pad_token: str = EOS) -> Path:
    """Write vocab.json, merges.txt, tokenizer.json and configs for CLIPTokenizer(Fast) into out_dir.

    `pad_token` is `<|endoftext|>` for SDXL's first tokenizer and `!` for the second.
    The folder is written atomically; returns out_dir.
    """
    bpe_gz, out_dir = Path(bpe_gz), Path(out_dir)
    merges = read_clip_merges(bpe_gz)
    vocab = {t: i for i, t in enumerate(clip_vocab(merges))}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = outputs.temp_dir(out_dir)  # the folder's mode follows the umask, not mkdtemp's 0700
    try:
        (tmp / "vocab.json").write_text(json.dumps(vocab), "utf-8")
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MODEL_MAX_LENGTH,
                  "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token,
                  "do_lower_case": True, "clean_up_tokenization_spaces": True}
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2), "utf-8")
        special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
        (tmp / "special_tokens_map.json").write_text(json.dumps(special, indent=2), "utf-8")
        # The fast tokenizer's own file, so later loads need no slow->fast conversion.
        clip_tokenizer(vocab, merges).save(str(tmp / "tokenizer.json"))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def cache_root() -> Path:
    """Where built tokenizers are kept (`$XDG_CACHE_HOME/animagine-lora`)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "animagine-lora"


def _tokenizer_from_folder(folder: Path):
    """tokenizer.json when present (fast), else vocab.json + merges.txt."""
    from tokenizers import Tokenizer

    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(folder / "tokenizer.json"))
    vocab = json.loads((folder / "vocab.json").read_text("utf-8"))
    lines = (folder / "merges.txt").read_text("utf-8").split("\n")
    merges = [m for m in lines[1:] if m.strip()] if lines[0].startswith("#version") else \
        [m for m in lines if m.strip()]
    return clip_tokenizer(vocab, merges)


def _hub_tokenizer_folder(repo_id: str) -> Path:
    """The `tokenizer/` files of a Hub model, from the cache or (reachable Hub only) downloaded."""
    from captioning.hub import hf_download

    files = [hf_download(repo_id, f"tokenizer/{name}", f"the CLIP tokenizer of {repo_id}",
                         "--tokenizer DIR, or leave --tokenizer out (the shipped CLIP vocabulary "
                         "gives the same tokens)")
             for name in ("vocab.json", "merges.txt")]
    return Path(files[0]).parent


class TokenCounter:
    """Counts CLIP tokens (without start/end tokens) of captions and tags, with a per-tag cache."""

    def __init__(self, tokenizer) -> None:
        """`tokenizer`: a `tokenizers.Tokenizer` with CLIP's pipeline (`clip_tokenizer`)."""
        self._backend = tokenizer
        self._with_comma: dict[str, int] = {}
        self._alone: dict[str, int] = {}

    @classmethod
    def from_pretrained(cls, path_or_repo: str) -> TokenCounter:
        """From a tokenizer folder, a model folder with `tokenizer/`, or a Hub repo id."""
        from captioning.hub import HubUnreachableError
        path = Path(path_or_repo)
        try:
            if path.is_dir():
                folder = path / "tokenizer" if (path / "tokenizer").is_dir() else path
                if not (folder / "tokenizer.json").is_file() and not (
                        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
                    raise TokenizerError(f"{folder}: no tokenizer.json, or vocab.json with merges.txt")
            else:
                folder = _hub_tokenizer_folder(str(path_or_repo))
            tokenizer = _tokenizer_from_folder(folder)
        except TokenizerError as error:
            raise TokenizerError(f"cannot load a CLIP tokenizer: {error}") from None
        except HubUnreachableError as error:
            raise TokenizerOfflineError(str(error)) from None
        except Exception as error:  # noqa: BLE001 - OSError, JSON and tokenizers' own errors
            raise TokenizerError(f"{path_or_repo}: cannot load a CLIP tokenizer ({error})") from None
        if tokenizer.get_vocab_size() != CLIP_VOCAB_SIZE:
            raise TokenizerError(f"{path_or_repo}: not a CLIP tokenizer ({tokenizer.get_vocab_size()} "
                                 f"tokens, expected {CLIP_VOCAB_SIZE})")
        return cls(tokenizer)

    @classmethod
    def from_bpe(cls, bpe_gz: str | Path = SHIPPED_CLIP_BPE, cache_dir: str | Path | None = None) -> TokenCounter:
        """Build the tokenizer from the CLIP BPE merge list (cached by file hash) and load it.

        The default is the vocabulary shipped with the package."""
        bpe_gz = Path(bpe_gz)
        try:
            digest = hashlib.sha256(bpe_gz.read_bytes()).hexdigest()[:16]
        except OSError as error:
            raise TokenizerError(f"{bpe_gz}: cannot read the CLIP BPE file ({error.strerror})") from None
        folder = Path(cache_dir or cache_root()) / f"clip-tokenizer-{digest}"
        if not (folder / "tokenizer.json").exists():
            logger.info("building the CLIP tokenizer from %s into %s", bpe_gz, folder)
            build_clip_tokenizer_files(bpe_gz, folder)
        return cls.from_pretrained(str(folder))

    def count(self, text: str) -> int:
        """Tokens of `text` without the start/end tokens."""
        return len(self._backend.encode(text, add_special_tokens=False).ids)

    def count_many(self, texts: Sequence[str]) -> list[int]:
        """Token counts of many texts in one batch call (parallel inside `tokenizers`)."""
        encodings = self._backend.encode_batch(list(texts), add_special_tokens=False)
        return [len(e.ids) for e in encodings]

    def learn(self, tags: Iterable[str]) -> None:
        """Cache the counts of tags not seen yet (display form), in one batch."""
        new = [t for t in dict.fromkeys(tags) if t not in self._alone]
        if not new:
            return
        # After a letter or digit the comma is a piece of its own (one token), so only tags
        # ending in punctuation or space need a second encoding.
        fused = [t for t in new if not t[-1:].isalnum()]
        counts = self.count_many([t + "," for t in new] + fused)
        for tag, count in zip(new, counts):
            self._with_comma[tag] = count
            self._alone[tag] = count - 1
        for tag, count in zip(fused, counts[len(new):]):
            self._alone[tag] = count

    def costs(self, tags: Sequence[str]) -> list[tuple[int, int]]:
        """Per tag, (tokens when followed by `", "` (comma included), tokens when last)."""
        self.learn(tags)
        return [(self._with_comma[t], self._alone[t]) for t in tags]

    def tag_costs(self, tags: Sequence[str]) -> list[int]:
        """Per tag, its cost when followed by `", "` (the comma included)."""
        self.learn(tags)
        return [self._with_comma[t] for t in tags]

    def count_tags(self, tags: Sequence[str]) -> int:
        """Tokens of `", ".join(tags)`, from the per-tag cache (exact, see the module docstring)."""
        if not tags:
            return 0
        self.learn(tags)
        return sum(self._with_comma[t] for t in tags) - self._with_comma[tags[-1]] + self._alone[tags[-1]]

    def ids(self, text: str) -> list[int]:
        """Token ids with start/end tokens, as the text encoder receives them (unpadded)."""
        return self._backend.encode(text).ids
