"""Property tests: whatever the post, every kept tag appears once and head/tail keep their order."""

from __future__ import annotations

from datetime import datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from captioning import (
    Captioner,
    Category,
    Post,
    TagDatabase,
    TokenCounter,
    display_tag,
    load_profile,
)

PROFILE = load_profile()
SPECIAL = {w for words in PROFILE.rating_words.values() for w in words} | {
    b.tag for b in PROFILE.score_bands + PROFILE.quality_bands}


@pytest.fixture(scope="module")
def db(tag_db_path):
    return TagDatabase.load(tag_db_path)


@pytest.fixture(scope="module")
def pools(db):
    """Real tag names per category (a slice of each, most common first), without filtered meta."""
    pools = {c: [n for n, _ in db.tags_of(c)[:400]] for c in
             (Category.GENERAL, Category.CHARACTER, Category.COPYRIGHT, Category.ARTIST)}
    pools[Category.META] = [n for n, _ in db.tags_of(Category.META)
                            if not any(s in n for s in PROFILE.meta_drop_substrings)][:100]
    return pools


@pytest.fixture(scope="module")
def counter(clip_bpe_path, tmp_path_factory):
    return TokenCounter.from_bpe(clip_bpe_path, cache_dir=tmp_path_factory.getbasetemp() / "clip")


def post_strategy(pools):
    def tags_of(category, most):
        return st.lists(st.sampled_from(pools[category]), max_size=most, unique=True)

    made_up = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_()^:0123456789", min_size=1, max_size=12).filter(
        lambda t: t.strip("_") and not t.isdigit())
    return st.builds(
        lambda general, character, copyright, artist, meta, extra, rating, score, year: Post(
            id="p", origin="p", tags={Category.GENERAL: general, Category.CHARACTER: character,
                                      Category.COPYRIGHT: copyright, Category.ARTIST: artist, Category.META: meta},
            uncategorised=extra, rating=rating, score=score,
            created_at=datetime(year, 5, 5) if year else None, metadata={}),
        tags_of(Category.GENERAL, 40), tags_of(Category.CHARACTER, 3), tags_of(Category.COPYRIGHT, 3),
        tags_of(Category.ARTIST, 2), tags_of(Category.META, 3), st.lists(made_up, max_size=5),
        st.sampled_from([None, "g", "s", "q", "e"]), st.none() | st.integers(-50, 3000),
        st.none() | st.integers(1990, 2035),
    )


def expected_tags(post: Post, db: TagDatabase) -> set[str]:
    """Display forms of every input tag the rules keep (not filtered, no backslash, not special)."""
    kept = set()
    for names in post.tags.values():
        kept |= {display_tag(db.resolve(n)) for n in names}
    for raw in post.uncategorised:
        name = db.resolve(raw)
        category = db.category(name)
        if category == Category.META and any(s in name for s in PROFILE.meta_drop_substrings):
            continue
        kept.add(display_tag(name))
    return {t for t in kept if "\\" not in t and t not in SPECIAL and not t.startswith("year ")}


def check_order(caption, post: Post, captioner: Captioner):
    people = [t for t in caption.head if t.replace(" ", "_") in PROFILE.people_tags]
    assert caption.head[: len(people)] == tuple(people)
    assert people == sorted(people, key=lambda t: PROFILE.people_tags.index(t.replace(" ", "_")))
    rating_words = set(PROFILE.rating_words.get(post.rating or "", ()))
    if post.rating:
        assert caption.head[-1] in rating_words
    tail_kinds = []
    for tag in caption.tail:
        if tag.startswith("year "):
            tail_kinds.append(0)
        elif tag in {b.tag for b in PROFILE.quality_bands}:
            tail_kinds.append(1)
        elif tag in {b.tag for b in PROFILE.score_bands}:
            tail_kinds.append(2)
        else:
            tail_kinds.append(3 + PROFILE.resolution_tags.index(tag))
    assert tail_kinds == sorted(tail_kinds) and len(set(tail_kinds)) == len(tail_kinds)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_kept_tag_appears_exactly_once_in_order(db, pools, data):
    captioner = Captioner(PROFILE, db, None)
    post = data.draw(post_strategy(pools))
    caption = captioner.caption(post).caption
    tags = caption.tags
    assert len(tags) == len(set(tags))
    assert expected_tags(post, db) <= set(tags)
    assert "\\" not in caption.training()
    check_order(caption, post, captioner)
    assert caption.training().count("(") == caption.prompt().count("\\(")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), budget=st.integers(10, 120))
def test_budget_only_drops_body_tags_and_counts_exactly(db, pools, counter, data, budget):
    post = data.draw(post_strategy(pools))
    full = Captioner(PROFILE, db, counter, max_tokens=0).caption(post)
    result = Captioner(PROFILE, db, counter, max_tokens=budget).caption(post)
    assert result.tokens == counter.count(result.caption.training())
    assert result.caption.head == full.caption.head and result.caption.tail == full.caption.tail
    assert set(result.caption.body) | set(result.dropped) == set(full.caption.body)
    assert result.cut == bool(result.dropped) or (result.cut and not full.caption.body)
    if result.caption.body:
        assert result.tokens <= budget
