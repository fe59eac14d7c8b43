"""Golden tests: every caption rule of the `animagine-xl-4.0` profile (captioning/profiles/) on hand-written posts."""

from __future__ import annotations

import random
from datetime import datetime

import pytest

from captioning import Captioner, Category, Post, TagDatabase, TokenCounter, load_profile


def make_post(general=(), character=(), copyright=(), artist=(), meta=(), uncategorised=(), rating="g",
              score=None, created_at=None, id="1") -> Post:
    tags = {}
    for category, names in ((Category.GENERAL, general), (Category.CHARACTER, character),
                            (Category.COPYRIGHT, copyright), (Category.ARTIST, artist), (Category.META, meta)):
        if names:
            tags[category] = list(names)
    if isinstance(created_at, int):
        created_at = datetime(created_at, 6, 1)
    return Post(id=id, origin=f"test:{id}", tags=tags, uncategorised=list(uncategorised), rating=rating,
                score=score, created_at=created_at, metadata={})


@pytest.fixture(scope="module")
def db(tag_db_path) -> TagDatabase:
    return TagDatabase.load(tag_db_path)


@pytest.fixture(scope="module")
def counter(clip_bpe_path, tmp_path_factory) -> TokenCounter:
    return TokenCounter.from_bpe(clip_bpe_path, cache_dir=tmp_path_factory.getbasetemp() / "clip")


@pytest.fixture(scope="module")
def captioner(db) -> Captioner:
    return Captioner(load_profile(), db, None)


def test_people_count_tags_follow_the_list_order(captioner):
    post = make_post(general=["smile", "1boy", "male_focus", "multiple_girls", "2girls", "1other"])
    assert captioner.caption(post).caption.head == ("2girls", "multiple girls", "1boy", "male focus", "1other", "safe")


def test_head_is_people_characters_copyrights_rating_in_input_order(captioner):
    post = make_post(general=["solo", "1girl"], character=["hatsune_miku", "kagamine_rin"],
                     copyright=["vocaloid", "project_diva_(series)"], artist=["wlop"], rating="s")
    caption = captioner.caption(post).caption
    assert caption.head == ("1girl", "hatsune miku", "kagamine rin", "vocaloid", "project diva (series)", "sensitive")
    assert set(caption.body) == {"solo", "wlop"}


@pytest.mark.parametrize(("rating", "word"), [("g", "safe"), ("s", "sensitive"), ("q", "nsfw"), ("e", "explicit")])
def test_one_rating_word_per_rating(captioner, rating, word):
    caption = captioner.caption(make_post(general=["1girl"], rating=rating)).caption
    assert caption.head == ("1girl", word)
    assert [t for t in caption.tags if t in {"safe", "sensitive", "nsfw", "explicit"}] == [word]


def test_no_rating_no_rating_word(captioner):
    assert captioner.caption(make_post(general=["1girl"], rating=None)).caption.head == ("1girl",)


# (score, expected score tag, expected quality tag or None) at and around every cut point of g:
# p10=1 p25=3 p50=7 p75=14 p85=19 p90=24 p95=33 ("above" is strict; "at or below p10" is low).
G_BANDS = [
    (-5, "low score", "worst quality"), (1, "low score", "worst quality"),
    (2, "bad score", "low quality"), (3, "bad score", "low quality"),
    (4, "average score", None), (7, "average score", None),
    (8, "good score", None), (14, "good score", None),
    (15, "great score", None), (19, "great score", None),
    (20, "great score", "best quality"), (24, "great score", "best quality"),
    (25, "high score", "best quality"), (33, "high score", "best quality"),
    (34, "high score", "masterpiece"), (5000, "high score", "masterpiece"),
]


@pytest.mark.parametrize(("score", "score_tag", "quality_tag"), G_BANDS)
def test_score_and_quality_bands_at_the_table_boundaries(captioner, score, score_tag, quality_tag):
    result = captioner.caption(make_post(general=["1girl"], score=score))
    expected = ([quality_tag] if quality_tag else []) + [score_tag]
    assert list(result.caption.tail) == expected
    assert result.score_tag == score_tag and result.quality_tag == quality_tag


@pytest.mark.parametrize("rating", ["g", "s", "q", "e"])
def test_every_rating_uses_its_own_cut_points(captioner, rating):
    cuts = load_profile().percentile_table[rating]
    bands = [(90, "high score"), (75, "great score"), (50, "good score"), (25, "average score"), (10, "bad score")]
    lower = ["great score", "good score", "average score", "bad score", "low score"]
    for (level, tag), below in zip(bands, lower):
        cut = int(cuts[level])
        assert captioner.caption(make_post(general=["x"], rating=rating, score=cut + 1)).score_tag == tag
        assert captioner.caption(make_post(general=["x"], rating=rating, score=cut)).score_tag == below


def test_explicit_scores_are_judged_against_the_explicit_table(captioner):
    # 40 is far above p95 of general posts (33) but only good for explicit ones (p50 = 35).
    assert captioner.caption(make_post(general=["x"], rating="g", score=40)).score_tag == "high score"
    assert captioner.caption(make_post(general=["x"], rating="e", score=40)).score_tag == "good score"


def test_no_score_no_score_or_quality_tag(captioner):
    result = captioner.caption(make_post(general=["1girl"], score=None, created_at=2020))
    assert result.caption.tail == ("year 2020",)


def test_tail_order_is_year_quality_score_resolution(captioner):
    post = make_post(general=["1girl"], meta=["lowres", "absurdres", "highres"], score=100, created_at=2024)
    assert captioner.caption(post).caption.tail == (
        "year 2024", "masterpiece", "high score", "absurdres", "highres", "lowres")


@pytest.mark.parametrize(("year", "tag"), [(2005, "year 2005"), (2025, "year 2025"), (2004, None), (2026, None)])
def test_years_outside_2005_2025_get_no_year_tag(captioner, year, tag):
    result = captioner.caption(make_post(general=["1girl"], created_at=year))
    assert result.caption.tail == ((tag,) if tag else ())
    if tag is None:
        assert any("outside 2005-2025" in w for w in result.warnings)


def test_meta_tags_filtered_by_the_doc_words_resolution_to_tail(captioner):
    meta = ["commentary_request", "translated", "translation_request", "bad_id", "bad_pixiv_id",
            "photoshop_(medium)", "md5_mismatch", "revision", "english_audio", "video", "animated",
            "absurdres", "highres", "tagme"]
    caption = captioner.caption(make_post(general=["1girl"], meta=meta)).caption
    assert caption.body == ("animated", "tagme")
    assert caption.tail == ("absurdres", "highres")


def test_emoticons_keep_underscores_longer_tags_get_spaces(captioner):
    caption = captioner.caption(make_post(general=["^_^", "o_o", ">_<", "^^^", "one_eye_closed", "long_hair"]))
    assert caption.caption.body == ("^_^", "o_o", ">_<", "^^^", "one eye closed", "long hair")


def test_training_caption_keeps_parentheses_prompt_escapes_them(captioner):
    post = make_post(general=["1girl"], character=["firefly_(honkai:_star_rail)"], copyright=["honkai_(series)"])
    caption = captioner.caption(post).caption
    assert caption.training() == "1girl, firefly (honkai: star rail), honkai (series), safe"
    assert caption.prompt() == "1girl, firefly \\(honkai: star rail\\), honkai \\(series\\), safe"
    assert "\\" not in caption.training()


def test_sd_scripts_form_separates_head_body_tail(captioner):
    post = make_post(general=["1girl", "smile", "solo"], score=100, created_at=2024)
    caption = captioner.caption(post).caption
    assert caption.sd_scripts() == "1girl, safe, ||| smile, solo, ||| year 2024, masterpiece, high score"


def test_shuffled_keeps_head_and_tail(captioner):
    post = make_post(general=["1girl"] + [f"tag{i}" for i in range(20)], created_at=2021, score=3)
    caption = captioner.caption(post).caption
    shuffled = caption.shuffled(random.Random(0))
    assert shuffled.head == caption.head and shuffled.tail == caption.tail
    assert sorted(shuffled.body) == sorted(caption.body) and shuffled.body != caption.body


def test_special_tags_already_in_the_input_take_their_slot_once(captioner):
    result = captioner.caption_tags("masterpiece, safe, 1girl, year 2020, smile, high score, absurdres")
    caption = result.caption
    assert caption.head == ("1girl", "safe")
    assert caption.body == ("smile",)
    assert caption.tail == ("year 2020", "masterpiece", "high score", "absurdres")
    assert result.rating == "g"


def test_rating_words_in_the_tags_give_the_rating_most_explicit_wins(captioner):
    result = captioner.caption_tags("1girl, nsfw, explicit, smile")
    assert result.rating == "e" and result.caption.head == ("1girl", "explicit")


def test_post_metadata_overrides_conflicting_special_tags_with_a_warning(captioner):
    post = make_post(general=["1girl", "masterpiece"], uncategorised=["safe", "year 2001"], rating="e",
                     score=1, created_at=2022)
    result = captioner.caption(post)
    assert result.caption.head == ("1girl", "explicit")
    assert result.caption.tail == ("year 2022", "worst quality", "low score")
    assert len(result.warnings) == 3


def test_aliases_resolve_and_duplicates_collapse(captioner):
    result = captioner.caption_tags("1girl, 1girls, longhair, long hair, long_hair, Long_Hair")
    assert result.caption.tags == ("1girl", "long hair")


def test_unknown_tags_stay_in_the_body_and_are_reported(captioner):
    result = captioner.caption_tags("1girl, zzz_not_a_tag, smile")
    assert result.caption.body == ("smile", "zzz not a tag")  # body slots: general, artist, unknown, meta
    assert result.unknown_tags == ["zzz_not_a_tag"]


def test_flat_tags_are_categorised_by_the_database(captioner):
    result = captioner.caption_tags("smile, hatsune miku, vocaloid, 1girl, wlop, absurdres, chinese commentary")
    assert result.caption.head == ("1girl", "hatsune miku", "vocaloid")
    assert result.caption.body == ("smile", "wlop")
    assert result.caption.tail == ("absurdres",)


def test_backslash_tags_are_dropped_and_logged_once(db, caplog):
    captioner = Captioner(load_profile(), db, None)
    caplog.set_level("INFO", logger="captioning.captioner")
    for _ in range(3):
        result = captioner.caption_tags(["1girl", "\\m/", "smile"])
        assert "\\" not in result.caption.training() and result.caption.tags == ("1girl", "smile")
        assert not result.warnings
    assert len([r for r in caplog.records if "backslash" in r.getMessage()]) == 1


def test_budget_drops_most_common_body_tags_first_never_head_or_tail(db, counter):
    post = make_post(general=["1girl", "solo", "long_hair", "smile", "blue_eyes", "sky", "holding_umbrella",
                              "cumulonimbus_cloud"], character=["hatsune_miku"], copyright=["vocaloid"],
                     meta=["absurdres"], score=50, created_at=2024)
    full = Captioner(load_profile(), db, counter).caption(post)
    assert not full.cut
    budget = full.tokens - 6
    result = Captioner(load_profile(), db, counter, max_tokens=budget).caption(post)
    assert result.cut and budget - 3 <= result.tokens <= budget
    assert 1 <= len(result.dropped) < len(full.caption.body)
    assert result.tokens == counter.count(result.caption.training())
    assert result.caption.head == full.caption.head and result.caption.tail == full.caption.tail
    kept, dropped = result.caption.body, result.dropped
    assert set(kept) | set(dropped) == set(full.caption.body)
    assert min(db.post_count(t.replace(" ", "_")) for t in dropped) >= max(
        db.post_count(t.replace(" ", "_")) for t in kept)


def test_budget_never_cuts_head_or_tail_even_when_over(db, counter):
    captioner = Captioner(load_profile(), db, counter, max_tokens=5)
    result = captioner.caption(make_post(general=["1girl", "smile"], character=["hatsune_miku"], created_at=2024))
    assert result.caption.body == () and result.caption.head == ("1girl", "hatsune miku", "safe")
    assert result.cut and any("over the budget" in w for w in result.warnings)


def test_fit_percentiles_from_the_dataset(db):
    captioner = Captioner(load_profile(), db, None)
    posts = [make_post(general=["x"], rating="g", score=s) for s in range(101)]
    cuts = captioner.fit_percentiles(posts)
    assert cuts["g"][90] == 90 and cuts["g"][10] == 10
    assert cuts["e"] == load_profile().percentile_table["e"]  # too few explicit posts: the table
    assert captioner.caption(make_post(general=["x"], score=91)).score_tag == "high score"
    assert captioner.caption(make_post(general=["x"], score=90)).score_tag == "great score"


def test_without_a_database_categorised_posts_still_caption(db):
    captioner = Captioner(load_profile(), None, None)
    post = make_post(general=["smile", "1girl"], character=["hatsune_miku"], meta=["highres"])
    caption = captioner.caption(post).caption
    assert caption.training() == "1girl, hatsune miku, safe, smile, highres"


def _sd_scripts_parts(text: str) -> tuple[list[str], list[str], list[str]]:
    """(fixed, shuffled, fixed suffix) as sd-scripts' keep_tokens_separator reads a caption:
    split at the first `|||`, then at the second if any; empty pieces dropped."""
    def tags(part: str) -> list[str]:
        return [t.strip() for t in part.split(",") if t.strip()]

    fixed, _, flex = text.partition("|||")
    flex, _, suffix = flex.partition("|||")
    return tags(fixed), tags(flex), tags(suffix)


@pytest.mark.parametrize(("head", "body", "tail", "text"), [
    (("1girl",), ("smile",), ("masterpiece",), "1girl, ||| smile, ||| masterpiece"),
    (("1girl",), ("smile", "solo"), (), "1girl, ||| smile, solo"),
    (("1girl",), (), (), "1girl, |||"),
    (("1girl",), (), ("masterpiece",), "1girl, ||| ||| masterpiece"),
    ((), ("smile",), ("masterpiece",), "||| smile, ||| masterpiece"),
])
def test_sd_scripts_form_is_tidy_when_parts_are_empty(head, body, tail, text):
    from captioning.caption import Caption

    caption = Caption(head, body, tail)
    assert caption.sd_scripts() == text
    assert _sd_scripts_parts(text) == (list(head), list(body), list(tail))
