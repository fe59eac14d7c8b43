"""Tag curation (captioning.curation): fold-into-trigger per character, edit rules through aliases."""

from __future__ import annotations

import pytest

from captioning import Captioner, Category, Post, load_profile, load_tag_database
from captioning.curation import (
    EditCounts,
    EditRules,
    FeatureCounter,
    FoldSettings,
    TagEditor,
    TagResolver,
)


@pytest.fixture(scope="module")
def resolver() -> TagResolver:
    return TagResolver(load_tag_database())


def post(characters, general=(), uncategorised=(), artist=(), id="1") -> Post:
    tags = {Category.CHARACTER: list(characters), Category.GENERAL: ["1girl", *general]}
    if artist:
        tags[Category.ARTIST] = list(artist)
    return Post(id=id, origin=id, tags=tags, uncategorised=list(uncategorised), rating="g", score=None,
                created_at=None, metadata={})


def three_characters() -> list[Post]:
    """alice, bella and cara, 10 solo images each, plus one of alice and bella together.

    blonde_hair: alice 11/11, bella 6/11, cara 7/10; blue_eyes: alice 9/11, cara 8/10 (exactly 0.8);
    school_uniform: alice 7/11, bella 10/11; red_eyes: bella 11/11; twintails: cara 10/10.
    """
    posts = []
    for i in range(10):
        posts.append(post(["alice"], ["blonde_hair"] + ["blue_eyes"] * (i < 9) + ["school_uniform"] * (i < 6),
                          id=f"a{i}"))
        posts.append(post(["bella"], ["red_eyes"] + ["school_uniform"] * (i < 9) + ["blonde_hair"] * (i < 5),
                          id=f"b{i}"))
        posts.append(post(["cara"], ["twintails"] + ["blue_eyes"] * (i < 8) + ["blonde_hair"] * (i < 7), id=f"c{i}"))
    posts.append(post(["alice", "bella"], ["blonde_hair", "school_uniform", "red_eyes"], id="duo"))
    return posts


def folded_posts(resolver, posts, settings: FoldSettings | None = None):
    counter = FeatureCounter(resolver, load_profile().people_tags)
    for p in posts:
        counter.observe(p)
    decisions = counter.decide(settings or FoldSettings())
    return decisions, {p.id: counter.fold(p, decisions) for p in posts}


def generals(p: Post) -> set[str]:
    return set(p.tags.get(Category.GENERAL, ()))


def test_a_shared_feature_is_folded_only_where_it_passes_that_characters_threshold(resolver):
    decisions, folded = folded_posts(resolver, three_characters())
    shares = {name: fold.folded for name, fold in decisions.characters.items()}
    assert shares == {"alice": {"blonde_hair": 1.0, "blue_eyes": 9 / 11},
                      "bella": {"red_eyes": 1.0, "school_uniform": 10 / 11},
                      "cara": {"twintails": 1.0, "blue_eyes": 0.8}}
    assert decisions.characters["bella"].below["blonde_hair"] == 6 / 11
    # blonde hair: gone from alice's captions, kept in bella's and cara's.
    assert generals(folded["a5"][0]) == {"1girl", "school_uniform"}  # school_uniform is not alice's (7/11)
    assert generals(folded["b0"][0]) == {"1girl", "blonde_hair"}
    assert generals(folded["c0"][0]) == {"1girl", "blonde_hair"}
    assert generals(folded["c8"][0]) == {"1girl"}  # no blue_eyes in that image; twintails folded
    # Together, each character takes its own features out.
    post_duo, changes = folded["duo"]
    assert generals(post_duo) == {"1girl"}
    assert {(c.tag, c.detail) for c in changes} == {("blonde_hair", "alice"), ("school_uniform", "bella"),
                                                    ("red_eyes", "bella")}
    assert decisions.trigger_features() == {"alice": ["blonde hair", "blue eyes"], "bella": ["red eyes", "school uniform"],
                                            "cara": ["twintails", "blue eyes"]}


def test_exempt_keep_features_and_too_few_images(resolver):
    posts = three_characters() + [post(["dana"], ["green_hair"], id=f"d{i}") for i in range(3)]
    decisions, folded = folded_posts(resolver, posts, FoldSettings(exempt=("blonde",)))  # an alias of blonde_hair
    assert decisions.characters["alice"].folded == {"blue_eyes": 9 / 11}
    assert decisions.characters["alice"].kept == {"blonde_hair": 1.0}
    assert "blonde_hair" in generals(folded["a0"][0])
    assert decisions.characters["dana"].folded == {} and "fewer than 10" in decisions.characters["dana"].note
    decisions, folded = folded_posts(resolver, posts, FoldSettings(keep_features=True))
    assert all(not fold.folded for fold in decisions.characters.values())
    assert decisions.characters["cara"].kept == {"twintails": 1.0, "blue_eyes": 0.8}
    assert all(changes == [] for _, changes in folded.values())


def test_flat_tags_fold_like_categorised_ones(resolver):
    """sd-scripts captions: tags without categories, found in the database (aliases too)."""
    posts = [Post(id=str(i), origin="t", tags={Category.CHARACTER: ["alice"]}, rating=None, score=None,
                  created_at=None, metadata={}, uncategorised=["1girl", "blonde" if i % 2 else "blonde hair", "smile"]
                  + ["sailor fuku"] * (i < 3)) for i in range(10)]
    decisions, folded = folded_posts(resolver, posts)
    assert decisions.characters["alice"].folded == {"blonde_hair": 1.0, "smile": 1.0}
    assert folded["0"][0].uncategorised == ["1girl", "sailor fuku"]


def test_edit_rules_follow_aliases(resolver):
    rules = EditRules.of(remove_tags=["blonde"], replace_tags={"seifuku": "sailor fuku"},
                         remove_categories=["artist"], add_tags=["my style", "smile"])
    editor = TagEditor(rules, resolver)
    source = post(["alice"], ["blonde_hair", "school_uniform", "smile"], artist=["wlop"],
                  uncategorised=["blond hair", "wang ling", "long hair"])
    edited, changes = editor.apply(source)
    counts = EditCounts()
    counts.count(changes)
    assert counts.to_json() == {
        "removed": {"blonde_hair": 2}, "removed_by_category": {"artist": 2},
        "replaced": {"school_uniform -> serafuku": 1}, "added": {"my_style": 1}, "folded": {}}
    caption = Captioner(load_profile(), load_tag_database(), None).caption(edited).caption
    assert caption.training() == "1girl, alice, safe, serafuku, smile, long hair, my style"
    assert source.tags[Category.GENERAL] == ["1girl", "blonde_hair", "school_uniform", "smile"]  # not modified
    with pytest.raises(ValueError, match="unknown category 'artists'.*general, artist"):
        EditRules.of(remove_categories=["artists"])
