"""Tag names: the Danbooru categories, the canonical form and the two rendered forms.

Danbooru stores tags lowercase with underscores (`long_hair`, `herta_(honkai:_star_rail)`).
Animagine's captions show them with spaces, except short emoticon-like tags (`^_^`, `o_o`,
`>_<`), which keep their underscores (the publisher's 3.x caption builder: public notebooks
that format Danbooru post JSON). Prompts for WebUI/ComfyUI escape parentheses because
both read `(...)` as emphasis.
"""

from __future__ import annotations

from enum import IntEnum

# Tags this short keep their underscores: they are emoticons, not words (`^_^`, `o_o`, `>_<`).
EMOTICON_MAX_CHARS = 3


class Category(IntEnum):
    """Danbooru's tag categories; 9 is the WD tagger's rating-label category."""

    GENERAL = 0
    ARTIST = 1
    COPYRIGHT = 3
    CHARACTER = 4
    META = 5
    RATING = 9


def normalize_tag(text: str) -> str:
    """The canonical database form: stripped, lowercase, spaces as underscores, `\\(` unescaped.

    >>> normalize_tag("  Herta \\\\(Honkai: Star Rail\\\\) ")
    'herta_(honkai:_star_rail)'
    """
    text = text.strip().lower()
    if "\\" in text:
        text = text.replace("\\(", "(").replace("\\)", ")")
    return "_".join(text.split())


def display_tag(name: str) -> str:
    """The training form of a canonical tag: underscores become spaces unless the tag is short.

    >>> display_tag("long_hair"), display_tag("^_^")
    ('long hair', '^_^')
    """
    if len(name) <= EMOTICON_MAX_CHARS:
        return name
    return name.replace("_", " ")


def escape_prompt(text: str) -> str:
    """Escape parentheses for WebUI/ComfyUI prompts, where `(...)` means emphasis."""
    return text.replace("(", "\\(").replace(")", "\\)")
