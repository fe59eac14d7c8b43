"""Prompts in the Animagine XL 4.0 model card's form: its tag order and quality tail.

The card's numbers (steps, CFG, negative prompt, resolution table) are `train.names`. Prompts
given as tags are put in the card's order by the captioning step (`Captioner.caption_tags`), the same order the LoRA's training
captions had, with the quality tail appended.

Prompt text convention: prompts are WebUI/ComfyUI text. `( )` and `[ ]` are emphasis
(train.generate.emphasis), so literal parentheses are escaped (`herta \\(honkai: star rail\\)`);
the text encoder saw the literal text in training. Prompts made here from training captions
(`default_prompts`) are escaped, and re-ordered prompts keep each tag's weight.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence

from train.generate.emphasis import comfy_text, escape, parse_emphasis

logger = logging.getLogger(__name__)

QUALITY_TAIL = ("masterpiece", "high score", "great score", "absurdres")


def weighted_tags(prompt: str) -> list[tuple[str, float]]:
    """The prompt's comma-separated literal tags, stripped, each with its emphasis weight.

    A tag takes the weight of its first non-blank piece (`(smile:1.2)` -> ("smile", 1.2)); empty
    tags are dropped.
    """
    tags: list[tuple[str, float]] = []
    current, weight = "", None
    for piece, piece_weight in parse_emphasis(prompt):
        for i, part in enumerate(piece.split(",")):
            if i:
                tags.append((current.strip(), weight or 1.0))
                current, weight = "", None
            current += part
            if weight is None and part.strip():
                weight = piece_weight
    tags.append((current.strip(), weight or 1.0))
    return [(tag, w) for tag, w in tags if tag]


def split_tags(prompt: str) -> list[str]:
    """The prompt's literal tags (escapes undone, weights dropped), stripped, empty pieces dropped."""
    return [tag for tag, _ in weighted_tags(prompt)]


def join_tags(tags: Sequence[tuple[str, float]]) -> str:
    """Weighted literal tags as prompt text: `(tag:w)` or the escaped tag, comma-separated."""
    return ", ".join(comfy_text([(tag, weight)]) for tag, weight in tags)


def with_quality_tail(tags: Sequence[str], tail: Sequence[str] = QUALITY_TAIL) -> list[str]:
    """`tags` followed by the tail tags they do not already contain."""
    present = {t.lower() for t in tags}
    return list(tags) + [t for t in tail if t.lower() not in present]


class PromptOrderer:
    """Puts a tag prompt in the card's order with the captioning step, then the quality tail.

    `captioner` is a `captioning.Captioner`; its `caption_tags` decides the head (people count,
    character, copyright, rating), body and tail, exactly as for training captions.
    """

    def __init__(self, captioner, tail: Sequence[str] = QUALITY_TAIL, head_order: Sequence[str] = ()) -> None:
        self.captioner = captioner
        self.tail = tuple(tail)
        self.head_order = tuple(head_order)

    @classmethod
    def load(cls, tag_db: str | None = None, profile: str = "animagine-xl-4.0",
             head_order: Sequence[str] = ()) -> PromptOrderer:
        """A captioner with the given tag database (default: the one shipped with `captioning`;
        a WD selected_tags.csv adds to it).

        `head_order`: the training captions' head (e.g. the dataset's most frequent one). A new
        character's tag is unknown to any tag database and would land in the body; prompt tags
        listed here go first, in this order, as they did in training.
        """
        from captioning import Captioner, load_profile
        from captioning.tag_db import load_tag_database

        return cls(Captioner(load_profile(profile), load_tag_database(tag_db), None), head_order=head_order)

    def order(self, prompt: str) -> str:
        """The prompt re-ordered as a training caption, quality tail appended, weights kept (prompt text)."""
        tags = weighted_tags(prompt)
        weights = {_tag_key(tag): weight for tag, weight in tags}
        result = self.captioner.caption_tags([tag for tag, _ in tags])
        for warning in getattr(result, "warnings", []):
            logger.warning("prompt %r: %s", prompt, warning)
        ordered = list(result.caption.tags)
        head = [t for t in self.head_order if t in ordered]
        ordered = with_quality_tail(head + [t for t in ordered if t not in head], self.tail)
        return join_tags([(t, weights.get(_tag_key(t), 1.0)) for t in ordered])


def _tag_key(tag: str) -> str:
    """A tag as the captioner may rewrite it (`Long_Hair` -> `long hair`), to find its weight again."""
    return tag.lower().replace("_", " ")


def prepare_prompt(prompt: str, orderer: PromptOrderer | None) -> str:
    """The prompt text to encode: ordered by `orderer`, or as given (stripped) when it is None."""
    if orderer is not None:
        return orderer.order(prompt)
    return prompt.strip()


def default_prompts(heads: Iterable[Sequence[str]], count: int = 2,
                    tail: Sequence[str] = QUALITY_TAIL) -> list[str]:
    """The `count` most frequent caption heads of a dataset, each with the quality tail.

    `heads` are the rows' `caption_head` lists (display form): for a character LoRA the most
    frequent head is "1girl, <character>, <series>, <rating>", the prompt a user tries first.
    Returned as prompt text: the tags' literal parentheses are escaped.
    """
    counts = Counter(tuple(h) for h in heads if h)
    return [", ".join(escape(t) for t in with_quality_tail(head, tail)) for head, _ in counts.most_common(count)]
