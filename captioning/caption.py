"""The `Caption` value: head, body and tail tags, and its three rendered forms."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from captioning.tags import escape_prompt

# sd-scripts' `keep_tokens_separator`: text before the first `|||` and after the second stays
# fixed while the middle is shuffled (kohya-ss/sd-scripts, library/train_util.py).
KEEP_TOKENS_SEPARATOR = "|||"


@dataclass(frozen=True)
class Caption:
    """Tags in display form: `head` and `tail` in fixed order, `body` free (shuffled in training)."""

    head: tuple[str, ...]
    body: tuple[str, ...]
    tail: tuple[str, ...]

    @property
    def tags(self) -> tuple[str, ...]:
        return self.head + self.body + self.tail

    def training(self) -> str:
        """`", "`-joined, literal parentheses: what the text encoder sees in training."""
        return ", ".join(self.tags)

    def prompt(self) -> str:
        """The same text for WebUI/ComfyUI prompts, parentheses escaped as `\\(` `\\)`."""
        return escape_prompt(self.training())

    def sd_scripts(self) -> str:
        """`head, ||| body, ||| tail` for sd-scripts' `keep_tokens_separator="|||"`.

        sd-scripts splits at the first separator and then at the second, if any, and drops empty
        pieces, so an empty tail needs no second separator (`head, ||| body`, or `head, |||`
        with an empty body too: nothing to shuffle), and an empty body keeps both
        (`head, ||| ||| tail`) so the tail stays fixed.
        """
        head, body, tail = ", ".join(self.head), ", ".join(self.body), ", ".join(self.tail)
        sep = KEEP_TOKENS_SEPARATOR
        text = f"{head}, {sep}" if head else sep
        if body:
            text += f" {body}"
        if tail:
            text += f"{',' if body else ''} {sep} {tail}"
        return text

    def shuffled(self, rng: random.Random) -> Caption:
        """The body in a random order, head and tail fixed (caption shuffling in training)."""
        body = list(self.body)
        rng.shuffle(body)
        return Caption(self.head, tuple(body), self.tail)


@dataclass
class CaptionResult:
    """What the captioner made of one record."""

    caption: Caption
    tokens: int  # CLIP tokens of `caption.training()` without start/end tokens; -1 if not counted
    cut: bool = False  # the token budget dropped body tags
    unknown_tags: list[str] = field(default_factory=list)  # canonical names the database lacks
    warnings: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # tags dropped by the budget (display form)
    rating: str | None = None
    year: int | None = None
    score_tag: str | None = None
    quality_tag: str | None = None
    aesthetic_tag: str | None = None
