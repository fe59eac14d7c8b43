"""Tag names and tag databases (tagcomplete CSV and WD selected_tags.csv)."""

from __future__ import annotations

import time

import pytest

from captioning import (
    Category,
    TagDatabase,
    TagDatabaseError,
    display_tag,
    escape_prompt,
    normalize_tag,
)
from captioning import tag_db as tag_db_module


@pytest.mark.parametrize(("text", "name"), [
    ("Long Hair", "long_hair"), ("  long_hair ", "long_hair"), ("herta \\(honkai: star rail\\)", "herta_(honkai:_star_rail)"),
    ("^_^", "^_^"), ("year  2024", "year_2024"), ("", ""),
])
def test_normalize_tag(text, name):
    assert normalize_tag(text) == name


@pytest.mark.parametrize(("name", "shown"), [
    ("long_hair", "long hair"), ("^_^", "^_^"), ("o_o", "o_o"), (">_<", ">_<"), ("0_0", "0_0"),
    ("^^^", "^^^"), ("a_b_c", "a b c"), ("herta_(honkai:_star_rail)", "herta (honkai: star rail)"),
])
def test_display_tag(name, shown):
    assert display_tag(name) == shown


def test_escape_prompt():
    assert escape_prompt("herta (honkai: star rail)") == "herta \\(honkai: star rail\\)"


def test_shipped_database_loads_fast_with_aliases():
    tag_db_module.shipped_tag_database.cache_clear()
    started = time.perf_counter()
    db = tag_db_module.load_tag_database()
    assert time.perf_counter() - started < 3
    assert len(db) == 140782 and db.problems == []
    assert db.sources == [("danbooru_tags.csv.gz (shipped)", 140782)]
    assert db.category("1girl") == Category.GENERAL and db.post_count("1girl") == 6008644
    assert db.category("hatsune_miku") == Category.CHARACTER
    assert db.category("highres") == Category.META
    assert db.resolve("longhair") == "long_hair" and db.resolve("1girls") == "1girl"
    assert db.resolve("Long Hair") == "long_hair"
    assert db.resolve("/lh") == "/lh"  # tagcomplete shortcuts are not aliases
    assert db.category("/lh") is None and db.post_count("no_such_tag") == 0
    assert db.lookup("hires") == ("highres", Category.META, 5256195)


def test_packed_database_holds_the_csv(tag_db_path, tmp_path):
    """The packed file is the shipped CSV's content: same rows, categories, counts, aliases."""
    from collections import Counter

    csv_db, packed = TagDatabase.load(tag_db_path), TagDatabase.load(tag_db_module.SHIPPED_DB)
    assert sorted(packed.entries()) == sorted(csv_db.entries())
    assert packed._alias_map() == csv_db._alias_map() and len(packed._alias_map()) == 29636
    assert Counter(c for _, (c, _n) in packed.entries()) == {
        Category.GENERAL: 30782, Category.ARTIST: 59201, Category.COPYRIGHT: 9478,
        Category.CHARACTER: 40931, Category.META: 390}


def test_pack_round_trip_keeps_rows_and_alias_order(tmp_path):
    path = tmp_path / "tags.csv"
    path.write_text('smile,0,50,"grin,/sm"\nwlop,1,9,\ngrinning,0,3,"grin"\nhonkai,3,7,"hsr"\n')
    db = TagDatabase.load(path)
    packed = TagDatabase.load(db.pack(tmp_path / "tags.tags.gz"))
    assert sorted(packed.entries()) == sorted(db.entries())
    assert packed.resolve("grin") == "smile" and packed.resolve("hsr") == "honkai"  # first row keeps it
    with pytest.raises(TagDatabaseError, match="not a packed tag database"):
        TagDatabase.load(path.with_name("bad.tags.gz").write_bytes(b"junk") and path.with_name("bad.tags.gz"))


def test_wd_tag_list_is_merged_over_the_shipped_database(tmp_path):
    """A WD selected_tags.csv lacks artist and copyright tags: it adds tags, removes nothing."""
    path = tmp_path / "selected_tags.csv"
    path.write_text("tag_id,name,category,count\n9999999,general,9,807309\n470575,1girl,0,4225150\n"
                    "1,honkai:_star_rail,0,10\n2,my_new_character,4,3\n")
    db = tag_db_module.load_tag_database(path)
    assert db.category("honkai:_star_rail") == Category.COPYRIGHT  # the shipped category stays
    assert db.category("my new character") == Category.CHARACTER and db.category("general") == Category.RATING
    assert db.post_count("1girl") == 6008644 and db.resolve("1girls") == "1girl"
    assert db.sources == [("danbooru_tags.csv.gz (shipped)", 140782), (str(path), 2)]
    assert len(tag_db_module.load_tag_database()) == 140782  # the shipped one is untouched


def test_wd_selected_tags_format(tmp_path):
    path = tmp_path / "selected_tags.csv"
    path.write_text("tag_id,name,category,count\n9999999,general,9,807309\n470575,1girl,0,4225150\n"
                    "1,hatsune_miku,4,100\n2,^_^,0,5\n")
    db = TagDatabase.load(path)
    assert db.category("general") == Category.RATING and db.category("hatsune miku") == Category.CHARACTER
    assert db.post_count("1girl") == 4225150 and db.category("^_^") == Category.GENERAL


def test_bad_rows_are_reported_and_skipped(tmp_path, caplog):
    path = tmp_path / "tags.csv"
    path.write_text('1girl,0,100,"1girls"\nbroken\nsmile,x,5,\nsky,0,many,\n,0,1,\nclouds,7,1,\n'
                    '1girl,0,5,\nsun,0,-1,\nsmile,0,50,"grin,/sm"\n')
    db = TagDatabase.load(path)
    assert len(db) == 2 and db.resolve("grin") == "smile" and db.resolve("/sm") == "/sm"
    lines = [p.split(":")[1] for p in db.problems]
    assert lines == ["2", "3", "4", "5", "6", "7", "8"]
    assert all(p.startswith(f"{path}:") for p in db.problems)
    assert "unknown category 'x'" in db.problems[1] and "duplicate tag '1girl'" in db.problems[5]


def test_unreadable_databases_are_errors(tmp_path):
    with pytest.raises(TagDatabaseError, match="not found"):
        TagDatabase.load(tmp_path / "missing.csv")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("caf\xe9,0,1,\n".encode("latin-1"))
    with pytest.raises(TagDatabaseError, match="not UTF-8"):
        TagDatabase.load(latin)
    junk = tmp_path / "junk.csv"
    junk.write_text("a;b;c\n")
    with pytest.raises(TagDatabaseError, match="no valid tag rows"):
        TagDatabase.load(junk)


def test_fetch_uses_the_hub_cache_and_fails_clearly_offline(monkeypatch, tmp_path):
    import huggingface_hub

    from captioning import hub

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # closed port: the Hub is unreachable
    hub._reachable.cache_clear()
    real_probe = hub.hub_offline
    calls = []

    def fake_download(repo_id, filename, repo_type="model", local_files_only=False):  # reachable Hub
        calls.append((repo_id, filename, local_files_only))
        if local_files_only:
            raise FileNotFoundError("not cached")
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr("captioning.hub.hub_offline", lambda: False)
    assert tag_db_module.fetch_tag_database("me/tags", "db.csv") == tmp_path / "db.csv"
    assert calls == [("me/tags", "db.csv", True), ("me/tags", "db.csv", False)]

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setattr("captioning.hub.hub_offline", real_probe)
    with pytest.raises(TagDatabaseError, match="cannot be reached; pass --tags-db PATH"):
        tag_db_module.fetch_tag_database()
