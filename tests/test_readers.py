"""Readers: every input format, and every kind of bad input as a one-line `file:line: reason`."""

from __future__ import annotations

import json
from datetime import datetime

from captioning import Category, Post, Problem
from captioning.readers import (
    read_danbooru_json,
    read_danbooru_jsonl,
    read_tag_file,
    read_wd_tags,
    split_tag_text,
)

POST = {
    "id": 7, "rating": "s", "score": 42, "created_at": "2024-03-01T10:00:00.000-05:00",
    "media_asset": {"created_at": "2023-12-31T23:00:00.000-05:00"},
    "tag_string_general": "1girl long_hair smile", "tag_string_character": "hatsune_miku",
    "tag_string_copyright": "vocaloid", "tag_string_artist": "wlop", "tag_string_meta": "highres",
    "tag_string": "1girl long_hair smile hatsune_miku vocaloid wlop highres",
}


def write_jsonl(path, lines):
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else json.dumps(line).encode() for line in lines))
    return path


def test_danbooru_jsonl_post_fields(tmp_path):
    [post] = list(read_danbooru_jsonl(write_jsonl(tmp_path / "p.jsonl", [POST])))
    assert isinstance(post, Post)
    assert post.id == "7" and post.origin == f"{tmp_path / 'p.jsonl'}:1"
    assert post.tags[Category.GENERAL] == ["1girl", "long_hair", "smile"]
    assert post.tags[Category.CHARACTER] == ["hatsune_miku"] and post.tags[Category.ARTIST] == ["wlop"]
    assert post.uncategorised == []  # categorised fields win over the flat tag_string
    assert (post.rating, post.score) == ("s", 42)
    assert post.created_at.year == 2023  # media_asset.created_at first
    assert post.metadata["media_asset.created_at"].startswith("2023")


def test_created_at_is_the_fallback_date(tmp_path):
    record = dict(POST, media_asset={})
    [post] = list(read_danbooru_jsonl(write_jsonl(tmp_path / "p.jsonl", [record])))
    assert post.created_at == datetime.fromisoformat("2024-03-01T10:00:00.000-05:00")


def test_unparseable_media_date_warns_and_falls_back(tmp_path):
    record = dict(POST, media_asset={"created_at": "yesterday"})
    warning, post = list(read_danbooru_jsonl(write_jsonl(tmp_path / "p.jsonl", [record])))
    assert not warning.skipped and "unparseable date media_asset.created_at" in warning.reason
    assert post.created_at.year == 2024


def test_flat_tag_string_only(tmp_path):
    record = {"id": 1, "rating": "g", "tag_string": "1girl smile"}
    [post] = list(read_danbooru_jsonl(write_jsonl(tmp_path / "p.jsonl", [record])))
    assert post.tags == {} and post.uncategorised == ["1girl", "smile"]


def test_bad_lines_are_reported_and_skipped_processing_continues(tmp_path):
    lines = [POST, b"{not json", b"[1, 2]", b"\xff\xfe bad bytes", {"id": 8, "rating": "g"},
             {"id": 9, "rating": "g", "tag_string_general": "  "}, b"", dict(POST), dict(POST, id=10)]
    path = write_jsonl(tmp_path / "p.jsonl", lines)
    items = list(read_danbooru_jsonl(path))
    posts = [i for i in items if isinstance(i, Post)]
    problems = [i for i in items if isinstance(i, Problem)]
    assert [p.id for p in posts] == ["7", "10"]
    reasons = {p.origin.rsplit(":", 1)[1]: p.reason for p in problems}
    assert reasons["2"].startswith("malformed JSON")
    assert reasons["3"] == "expected a JSON object, got list"
    assert reasons["4"].startswith("not UTF-8")
    assert reasons["5"].startswith("no tags") and reasons["6"].startswith("no tags")
    assert reasons["8"] == "duplicate id '7' (first record kept)"
    assert all(p.skipped for p in problems)
    assert all(str(p).startswith(f"{path}:") and "\n" not in str(p) for p in problems)


def test_missing_or_bad_fields_caption_without_that_part(tmp_path):
    lines = [{"id": 1, "tag_string_general": "1girl"},
             {"id": 2, "tag_string_general": "1girl", "rating": "x", "score": "high", "created_at": "13/13/2020"},
             {"tag_string_general": "1girl", "rating": "general"}]
    items = list(read_danbooru_jsonl(write_jsonl(tmp_path / "p.jsonl", lines)))
    posts = [i for i in items if isinstance(i, Post)]
    warnings = [i.reason for i in items if isinstance(i, Problem)]
    assert len(posts) == 3 and all(p.rating is None for p in posts[:2]) and posts[2].rating == "g"
    assert posts[1].score is None and posts[1].created_at is None
    assert posts[2].id == "p.jsonl:3"
    assert any("missing field 'rating'" in w for w in warnings)
    assert any("unknown rating 'x'" in w for w in warnings)
    assert any("score 'high' is not an integer" in w for w in warnings)
    assert any("unparseable date created_at" in w for w in warnings)
    assert any("missing field 'id'" in w for w in warnings)


def test_gallery_dl_sidecar_and_list_tags(tmp_path):
    sidecar = tmp_path / "image.jpg.json"
    record = {"id": 3, "rating": "e", "tags_general": ["1girl", "smile"], "tags_character": ["hatsune_miku"]}
    sidecar.write_text(json.dumps(record))
    [post] = list(read_danbooru_json(sidecar, image_id="sub/image.jpg"))
    assert post.id == "sub/image.jpg" and post.rating == "e"
    assert post.tags[Category.CHARACTER] == ["hatsune_miku"]
    bad = tmp_path / "bad.json"
    bad.write_text("{\n  oops")
    [problem] = list(read_danbooru_json(bad))
    assert problem.origin == f"{bad}:2" and problem.reason.startswith("malformed JSON")


def test_tag_files_comma_and_space_separated(tmp_path):
    comma = tmp_path / "a.txt"
    comma.write_text("1girl, herta \\(honkai: star rail\\), ^_^ ,  long hair\n")
    [post] = list(read_tag_file(comma, "a.png"))
    assert post.uncategorised == ["1girl", "herta \\(honkai: star rail\\)", "^_^", "long hair"]
    space = tmp_path / "b.caption"
    space.write_text("1girl long_hair blue_eyes")
    assert next(read_tag_file(space, "b.png")).uncategorised == ["1girl", "long_hair", "blue_eyes"]
    assert split_tag_text("1girl, ||| smile, ||| masterpiece") == ["1girl", "smile", "masterpiece"]


def test_bad_tag_files(tmp_path):
    empty = tmp_path / "e.txt"
    empty.write_text(" \n ")
    latin = tmp_path / "l.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    assert [p.reason for p in read_tag_file(empty, "e.png")] == ["empty tag file"]
    [problem] = list(read_tag_file(latin, "l.png"))
    assert problem.reason.startswith("not UTF-8") and problem.origin == str(latin)


def test_wd_tagger_output():
    probabilities = {"general": 0.1, "sensitive": 0.7, "questionable": 0.15, "explicit": 0.05,
                     "1girl": 0.99, "long_hair": 0.5, "smile": 0.2, "hatsune_miku": 0.9, "kagamine_rin": 0.6}
    categories = {"1girl": Category.GENERAL, "long_hair": Category.GENERAL, "smile": Category.GENERAL,
                  "hatsune_miku": Category.CHARACTER, "kagamine_rin": Category.CHARACTER}
    [post] = list(read_wd_tags(probabilities, image_id="x.png", categories=categories))
    assert post.rating == "s"
    assert post.tags == {Category.GENERAL: ["1girl", "long_hair"], Category.CHARACTER: ["hatsune_miku"]}
    [warning, post] = list(read_wd_tags({"1girl": 0.9}, image_id="y.png"))
    assert not warning.skipped and post.rating is None and post.uncategorised == ["1girl"]
    assert [p.reason for p in read_wd_tags({}, image_id="z.png")] == ["no tagger output"]
