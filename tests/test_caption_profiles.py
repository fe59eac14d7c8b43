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


def test_default_profile_is_4_0_with_interpolated_p90():
    profile = load_profile()
    assert profile.name == "animagine-xl-4.0"
    assert {r: profile.percentile_table[r][90] for r in "gsqe"} == {"g": 26, "s": 46, "q": 103, "e": 163}
    for rating, cuts in profile.percentile_table.items():
        assert cuts[85] < cuts[90] < cuts[95], rating


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
