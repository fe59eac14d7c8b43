"""Prompt emphasis: the WebUI syntax, escapes, ComfyUI-readable output, per-character weights."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from train.generate.emphasis import comfy_text, escape, parse_emphasis, plain_text
from train.generate.prompts import split_tags, weighted_tags


@pytest.mark.parametrize(("prompt", "expected"), [
    ("(a:1.3)", [("a", 1.3)]),
    ("(a)", [("a", 1.1)]),
    ("[a]", [("a", 1 / 1.1)]),
    ("((a))", [("a", 1.1 * 1.1)]),
    ("[[a]]", [("a", 1 / 1.1 / 1.1)]),
    ("((a:1.3))", [("a", 1.3 * 1.1)]),
    ("x, (y, [z]:0.5), w", [("x, ", 1.0), ("y, ", 0.5), ("z", 0.5 / 1.1), (", w", 1.0)]),
    (r"(herta \(honkai: star rail\):1.2), smile", [("herta (honkai: star rail)", 1.2), (", smile", 1.0)]),
    (r"(herta \(honkai: star rail\)), 1girl", [("herta (honkai: star rail)", 1.1), (", 1girl", 1.0)]),
    (r"a \[b\] \\", [("a [b] \\", 1.0)]),
    ("(a:0.5", [("a:0.5", 1.1)]),  # an unclosed group runs to the end; its weight never closed it
    ("(open", [("open", 1.1)]),
    ("a) b]", [("a) b]", 1.0)]),  # unmatched closers are literal
    ("(a:1.2.3)", [("a:1.2.3", 1.1)]),  # not a number: text, and the group closes as (...)
    ("", [("", 1.0)]),
    ("honkai: star rail", [("honkai: star rail", 1.0)]),
])
def test_parse_emphasis(prompt, expected):
    got = parse_emphasis(prompt)
    assert [text for text, _ in got] == [text for text, _ in expected]
    assert [weight for _, weight in got] == pytest.approx([weight for _, weight in expected])


def test_tags_keep_their_weights_and_literal_text():
    prompt = r"1girl, (herta \(honkai: star rail\):1.2), [smile], (blue eyes, long hair)"
    tags, weights = zip(*weighted_tags(prompt))
    assert list(tags) == split_tags(prompt) == ["1girl", "herta (honkai: star rail)", "smile", "blue eyes", "long hair"]
    assert list(weights) == pytest.approx([1.0, 1.2, 1 / 1.1, 1.1, 1.1])


def test_comfy_text_is_read_back_alike():
    pieces = parse_emphasis(r"[a], ((b:1.3)), c \(d\) \[e\]")
    assert comfy_text(pieces) == r"(a:0.909091), (b:1.43), c \(d\) \[e\]"
    assert comfy_text(pieces, comfy=True) == r"(a:0.909091), (b:1.43), c \(d\) [e]"  # ComfyUI: [ ] are literal


# Prompts built from a grammar, with the weight every literal character must get.
_TEXT = st.text(alphabet="ab ,:-\\()[]", max_size=6)
_WEIGHTS = st.sampled_from(["0.5", "1.3", "2", ".8", "1"])


@st.composite
def _prompts(draw, depth=0):
    """(prompt, [(literal character, weight)]) for a random nesting of groups and escaped text."""
    parts, chars = [], []
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["text", "text", "round", "square", "weight"] if depth < 3 else ["text"]))
        if kind == "text":
            literal = draw(_TEXT)
            # A text atom ending in ':' right before `1.3)` would read as a weight: keep it unambiguous.
            literal = literal.rstrip(":")
            parts.append(escape(literal))
            chars += [(c, 1.0) for c in literal]
            continue
        inner, inner_chars = draw(_prompts(depth=depth + 1))
        if kind == "round":
            parts.append(f"({inner})")
            factor = 1.1
        elif kind == "square":
            parts.append(f"[{inner}]")
            factor = 1 / 1.1
        else:
            weight = draw(_WEIGHTS)
            parts.append(f"({inner}:{weight})")
            factor = float(weight)
        chars += [(c, w * factor) for c, w in inner_chars]
    return "".join(parts), chars


def _per_character(pieces):
    return [(c, weight) for text, weight in pieces for c in text]


@settings(max_examples=50, deadline=None)
@given(_prompts())
def test_every_character_gets_the_product_of_its_groups(case):
    prompt, expected = case
    got = _per_character(parse_emphasis(prompt))
    assert "".join(c for c, _ in got) == "".join(c for c, _ in expected)
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=30))
def test_escaped_text_is_literal(text):
    assert parse_emphasis(escape(text)) == [(text, 1.0)]
    assert plain_text(escape(text)) == text


@settings(max_examples=50, deadline=None)
@given(_prompts())
def test_comfy_text_round_trips(case):
    prompt, _ = case
    pieces = parse_emphasis(prompt)
    again, before = _per_character(parse_emphasis(comfy_text(pieces))), _per_character(pieces)
    assert "".join(c for c, _ in again) == "".join(c for c, _ in before)
    # Whitespace makes no tokens, so its weight is free; every other character keeps its weight.
    assert [w for c, w in again if not c.isspace()] == pytest.approx([w for c, w in before if not c.isspace()],
                                                                     rel=1e-5)
