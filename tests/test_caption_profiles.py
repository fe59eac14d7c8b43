"""Profiles: the shipped TOML files validate, 3.1 reproduces its vocabulary, user files are checked."""

from __future__ import annotations

from datetime import datetime

import pytest

from captioning import (
    Captioner,
    Category,
    Post,
    ProfileError,
    TagDatabase,
    available_profiles,
    load_profile,
)


@pytest.fixture(scope="module")
def db(tag_db_path):
    return TagDatabase.load(tag_db_path)


def post(rating="g", score=None, year=None):
    return Post(id="1", origin="t", tags={Category.GENERAL: ["1girl", "smile"], Category.ARTIST: ["wlop"],
                                          Category.CHARACTER: ["hatsune_miku"], Category.META: ["highres"]},
                uncategorised=[], rating=rating, score=score,
                created_at=datetime(year, 1, 1) if year else None, metadata={})


@pytest.mark.parametrize("name", available_profiles())
def test_every_shipped_profile_validates(name):
    profile = load_profile(name)
    assert profile.name == name
    assert set(profile.rating_words) == {"g", "s", "q", "e"}


# The 3.1 downloader notebook's `score_percentile_full`, every fifth percentile p5..p95 per rating
# (docs: animagine_captions.md), copied here so the test does not read the profile it checks.
PUBLISHED_PERCENTILES = {
    "g": (0, 1, 2, 3, 3, 4, 5, 5, 6, 7, 8, 9, 11, 12, 14, 16, 19, 24, 33),
    "s": (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 15, 17, 20, 25, 31, 41, 62),
    "q": (2, 4, 5, 7, 9, 11, 14, 16, 19, 23, 26, 31, 36, 42, 49, 59, 73, 93, 134),
    "e": (2, 4, 7, 10, 13, 17, 20, 25, 29, 35, 41, 48, 56, 66, 78, 94, 115, 148, 211),
}


def test_default_profile_is_4_0_with_the_published_percentiles():
    profile = load_profile()
    assert profile.name == "animagine-xl-4.0"
    assert {r: profile.percentile_table[r][90] for r in "gsqe"} == {"g": 24, "s": 41, "q": 93, "e": 148}
    for rating, values in PUBLISHED_PERCENTILES.items():
        assert profile.percentile_table[rating] == dict(zip(range(5, 100, 5), values)), rating


def test_a_user_profile_cuts_at_any_published_percentile(tmp_path, db):
    path = tmp_path / "p80.toml"
    path.write_text('extends = "animagine-xl-4.0"\n[score]\nbands = [{ above = 80, tag = "top fifth" }, { tag = "" }]\n')
    captioner = Captioner(load_profile(str(path)), db, None)
    assert captioner.caption(post(rating="q", score=60)).score_tag == "top fifth"  # q p80 = 59
    assert captioner.caption(post(rating="q", score=59)).score_tag is None
    path.write_text('extends = "animagine-xl-4.0"\n[score]\nbands = [{ above = 88, tag = "x" }]\n')
    with pytest.raises(ProfileError, match=r"missing cut point\(s\) p88 .*the table has p5, p10, .*p95"):
        load_profile(str(path))


def test_3_1_profile_vocabulary(db):
    captioner = Captioner(load_profile("animagine-xl-3.1"), db, None)
    caption = captioner.caption(post(rating="e", score=300, year=2012)).caption
    assert caption.head == ("1girl", "hatsune miku", "wlop")
    assert caption.body == ("nsfw", "explicit", "smile", "early", "highres", "masterpiece")
    assert caption.tail == ()
    expected = {4: "worst quality", 5: "low quality", 14: "normal quality", 36: "good quality",
                79: "great quality", 116: "best quality", 212: "masterpiece"}
    for score, word in expected.items():
        assert captioner.caption(post(rating="e", score=score)).quality_tag == word
    assert captioner.caption(post(year=2025)).year is None  # 3.1's buckets end in 2024
    assert captioner.caption(post(year=2021)).caption.body == ("safe", "smile", "newest", "highres")


def test_user_profile_extends_and_overrides(tmp_path, db):
    path = tmp_path / "mine.toml"
    path.write_text('extends = "animagine-xl-4.0"\nname = "mine"\n[order]\ntail = ["year"]\n'
                    'body = ["general"]\n[rating]\ng = ["general"]\n[year]\nformat = "{year}"\n'
                    '[percentiles.table]\ng = { p90 = 30 }\n')
    profile = load_profile(str(path))
    assert profile.name == "mine" and profile.percentile_table["g"][95] == 33
    assert profile.percentile_table["g"][90] == 30
    caption = Captioner(profile, db, None).caption(post(score=500, year=2020)).caption
    assert caption.training() == "1girl, hatsune miku, general, smile, 2020"


def test_user_profile_extends_a_relative_file(tmp_path):
    (tmp_path / "base.toml").write_text('extends = "animagine-xl-4.0"\n[rating]\ne = ["nsfw", "explicit"]\n')
    (tmp_path / "child.toml").write_text('extends = "base.toml"\nname = "child"\n')
    assert load_profile(str(tmp_path / "child.toml")).rating_words["e"] == ("nsfw", "explicit")


@pytest.mark.parametrize(("text", "message"), [
    ('extends = "animagine-xl-4.0"\n[order]\nhaed = []\n', r"order\.haed: unknown key \(did you mean 'head'\?\)"),
    ('extends = "animagine-xl-4.0"\n[ratting]\n', r"ratting: unknown key \(did you mean 'rating'\?\)"),
    ('extends = "animagine-xl-4.0"\n[order]\nhead = ["people", "charcter"]\n', r"unknown slot 'charcter' \(did you mean 'character'\?\)"),
    ('extends = "animagine-xl-4.0"\n[order]\nbody = ["general", "people"]\n', "slot 'people' placed twice"),
    ('extends = "animagine-xl-4.0"\n[year]\nfirst = "2005"\n', r"year\.first: expected an integer, got str"),
    ('extends = "animagine-xl-4.0"\n[year]\nformat = "y"\n', r"year\.format: must contain \{year\}"),
    ('extends = "animagine-xl-4.0"\n[score]\nbands = [{ tag = "a" }, { above = 50, tag = "b" }]\n', "highest percentile down"),
    ('extends = "animagine-xl-4.0"\n[score]\nbands = [{ above = 99, tag = "x" }]\n', r"table\.g: missing cut point\(s\) p99"),
    ('extends = "animagine-xl-4.0"\n[percentiles]\nsource = "magic"\n', "expected 'table' or 'dataset'"),
    ('extends = "animagine-xl-4.0"\n[percentiles.table]\ng = { p50 = 1 }\n', "must not decrease"),
    ('extends = "animagine-xl-4.0"\n[filter]\ndrop_backslash_tags = "yes"\n', "expected true/false"),
    ("not toml [", "not valid TOML"),
])
def test_bad_profiles_name_the_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ProfileError, match=message) as error:
        load_profile(str(path))
    assert str(path) in str(error.value)


def test_unknown_profile_name_suggests():
    with pytest.raises(ProfileError, match=r"did you mean 'animagine-xl-3.1'"):
        load_profile("animagine-xl-3")


# Danbooru API posts (the fields `read_danbooru_jsonl` reads, as the API and gallery-dl write them)
# whose scores lie between the published p90 and the p90 the profile used to interpolate
# (g 26, s 46, q 103, e 163): they are `high score` now, and the published p90 itself is not.
REAL_POSTS = [
    ({"id": 7, "rating": "s", "score": 42, "tag_string_general": "1girl long_hair smile",
      "tag_string_character": "hatsune_miku", "tag_string_copyright": "vocaloid", "tag_string_artist": "wlop",
      "tag_string_meta": "highres", "media_asset": {"created_at": "2023-12-31T23:00:00.000-05:00"}},
     "high score", "best quality"),
    ({"id": 8, "rating": "g", "score": 25, "tag_string_general": "1girl solo", "tag_string_meta": "absurdres",
      "created_at": "2021-02-03T04:05:06.000-05:00"}, "high score", "best quality"),
    ({"id": 9, "rating": "g", "score": 24, "tag_string_general": "1girl solo",
      "created_at": "2021-02-03T04:05:06.000-05:00"}, "great score", "best quality"),
    ({"id": 10, "rating": "q", "score": 94, "tag_string_general": "1girl", "created_at": "2019-01-01T00:00:00.000Z"},
     "high score", "best quality"),
    ({"id": 11, "rating": "e", "score": 149, "tag_string_general": "1girl", "created_at": "2024-07-01T00:00:00.000Z"},
     "high score", "best quality"),
    ({"id": 12, "rating": "e", "score": 148, "tag_string_general": "1girl", "created_at": "2024-07-01T00:00:00.000Z"},
     "great score", "best quality"),
    ({"id": 13, "rating": "e", "score": 212, "tag_string_general": "1girl", "created_at": "2024-07-01T00:00:00.000Z"},
     "high score", "masterpiece"),
]


def test_published_cut_points_on_danbooru_posts(tmp_path, db):
    import json

    from captioning.readers import read_danbooru_jsonl

    source = tmp_path / "posts.jsonl"
    source.write_text("".join(json.dumps(record) + "\n" for record, _, _ in REAL_POSTS))
    posts = [p for p in read_danbooru_jsonl(source) if isinstance(p, Post)]
    captioner = Captioner(load_profile(), db, None)
    results = [captioner.caption(p) for p in posts]
    assert [(r.score_tag, r.quality_tag) for r in results] == [(s, q) for _, s, q in REAL_POSTS]
    assert results[0].caption.training() == (
        "1girl, hatsune miku, vocaloid, sensitive, long hair, smile, wlop, year 2023, best quality, high score, highres")


@pytest.mark.parametrize("module", ["train.cli.caption", "train.cli.tag", "train.cli.prep"])
def test_help_says_what_is_published_and_what_is_inferred(module):
    import argparse
    import importlib

    parser = argparse.ArgumentParser()
    importlib.import_module(module).add_arguments(parser)
    text = parser.format_help()
    assert "published (Animagine XL 4.0 model card): the prompt order" in text
    assert "our inference (not published for 4.0): the score and quality thresholds" in text
    assert "p90: g 24, s 41, q 93, e 148" in text
