"""WebUI/ComfyUI prompt emphasis: `(tag:1.3)`, `(tag)`, `[tag]`, nesting, escaped `\\(` `\\)`.

Parsing follows the A1111 WebUI's `prompt_parser.parse_prompt_attention` (written here from its
description, not copied; no maintained PyPI package implements this syntax, `compel` uses another):

- `(text)` multiplies the weight of `text` by 1.1, `[text]` divides it by 1.1, `(text:w)` multiplies
  it by `w`; groups nest and multiply; a group left open runs to the end of the prompt;
- `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are the literal characters (Animagine's series names:
  `herta \\(honkai: star rail\\)`); an unmatched `)` or `]` is literal;
- adjacent pieces of equal weight are merged; an empty prompt is `[("", 1.0)]`.

ComfyUI's parser (`comfy/sd1_clip.py`, `token_weights`) agrees on `(text)`, `(text:w)` at the top
level and on the escapes; it has no `[text]`, and a nested `(text:w)` sets the weight to `w`
instead of multiplying. `comfy_text` writes parsed pieces in a form both read the same way, which
is what `sample --workflow` puts in the ComfyUI graph.

Plain Python, no torch: `train.generate.prompt_encoding` applies the weights to the embeddings.
Training captions never pass through here: training text is literal (`train.data.text_encoding`).
"""

from __future__ import annotations

import math
import re

ROUND_FACTOR = 1.1
_TOKEN = re.compile(
    r"\\[()\[\]\\]"  # an escaped bracket or backslash
    r"|:\s*([+-]?[.\d]+)\s*\)"  # an explicit weight closing a round group
    r"|[()\[\]]"  # brackets
    r"|[^\\()\[\]:]+|[\\:]"  # plain text; a lone backslash or colon
)
_SPECIAL = re.compile(r"([\\()\[\]])")
_ROUND = re.compile(r"([()])")

Piece = tuple[str, float]


def parse_emphasis(text: str) -> list[Piece]:
    """`text` as (literal text, weight) pieces; see the module docstring for the syntax."""
    pieces: list[list] = []  # [text, weight], mutable while groups close
    open_round: list[int] = []  # index into pieces where each open group starts
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\") and len(token) == 2:
            pieces.append([token[1], 1.0])
        elif token == "(":
            open_round.append(len(pieces))
        elif token == "[":
            open_square.append(len(pieces))
        elif weight is not None and open_round:
            if _is_number(weight):
                scale(open_round.pop(), float(weight))
            else:  # `(a:1.2.3)`: not a weight, the text stays and the group closes as `(...)`
                pieces.append([token[:-1], 1.0])
                scale(open_round.pop(), ROUND_FACTOR)
        elif token == ")" and open_round:
            scale(open_round.pop(), ROUND_FACTOR)
        elif token == "]" and open_square:
            scale(open_square.pop(), 1 / ROUND_FACTOR)
        else:
            pieces.append([token, 1.0])
    for start in open_round:
        scale(start, ROUND_FACTOR)
    for start in open_square:
        scale(start, 1 / ROUND_FACTOR)
    return _merge(pieces)


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _merge(pieces: list[list]) -> list[Piece]:
    merged: list[Piece] = []
    for piece_text, weight in pieces:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + piece_text, weight)
        else:
            merged.append((piece_text, weight))
    return merged or [("", 1.0)]


def escape(text: str) -> str:
    """Literal text (a training caption, a tag) in prompt syntax: brackets and backslashes escaped."""
    return _SPECIAL.sub(r"\\\1", text)


def plain_text(text: str) -> str:
    """The literal text a prompt encodes, weights dropped (`(smile:1.2), a \\(b\\)` -> `smile, a (b)`)."""
    return "".join(piece for piece, _ in parse_emphasis(text))


def comfy_text(pieces: list[Piece], *, comfy: bool = False) -> str:
    """Pieces written as `(text:w)` and escaped plain text, which ComfyUI and the WebUI parse alike.

    `comfy=True` escapes only `(` `)`: ComfyUI reads `[`, `]` and backslashes literally.
    """
    escaped = (lambda text: _ROUND.sub(r"\\\1", text)) if comfy else escape
    out = []
    for piece, weight in pieces:
        if weight == 1.0 or not piece.strip():
            out.append(escaped(piece))
            continue
        lead, body, trail = re.match(r"(\s*)(.*?)(\s*)$", piece, re.DOTALL).groups()
        out.append(f"{lead}({escaped(body)}:{weight:.6g}){trail}")
    return "".join(out)
