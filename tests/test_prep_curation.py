"""Prep with tag curation end to end: edit rules, fold into characters and triggers, the dry run, the
report (gallery, thumbnails, struck tags, no remote resource), the LoRA metadata and `sample`."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

import datasets
from train.prep.pipeline import RunOptions, prepare
from train.prep.recipe import parse_recipe, resolve_paths

ALICE = "alice_(curation_test)"


def write_image(path: Path, colour, size=(96, 80), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def make_sources(root: Path) -> Path:
    """`booru/`: 10 Danbooru posts of one character; `kohya/3_zeta/`: 3 sd-scripts images for a trigger;
    plus a duplicate, an image too small, a corrupt file and an image with transparency."""
    booru = root / "booru"
    for i in range(10):
        write_image(booru / f"a{i}.png", (20 * i, 100, 150))
        general = "1girl blonde_hair blue_eyes smile" + (" school_uniform" if i < 5 else "")
        (booru / f"a{i}.png.json").write_text(json.dumps({
            "id": 100 + i, "rating": "g", "score": 30, "tag_string_general": general,
            "tag_string_character": ALICE, "tag_string_artist": "wlop", "tag_string_meta": "highres",
            "created_at": "2024-01-02T03:04:05.000Z"}))
    shutil.copy(booru / "a0.png", booru / "copy_of_a0.png")  # exact duplicate without a sidecar
    write_image(booru / "tiny.png", (1, 2, 3), size=(20, 20))
    (booru / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    zeta = root / "kohya" / "3_zeta"
    for i, extra in enumerate(["smile", "blonde", "open mouth"]):
        write_image(zeta / f"z{i}.png", (200, 30 * i, 40), mode="RGBA" if i == 2 else "RGB")
        (zeta / f"z{i}.txt").write_text(f"1girl, red hair, twintails, {extra}")
    return root


def recipe_data(root: Path, **caption) -> dict:
    return {
        "dataset": {"min_side": 64},
        "caption": caption,
        "edit": {"remove_tags": ["blonde"], "replace_tags": {"seifuku": "sailor fuku"}, "remove_categories": ["artist"]},
        "curation": {"fold_min_images": 3, "fold_exempt": ["smile"]},
        "sources": [
            {"name": "booru", "path": str(root / "booru")},
            {"name": "kohya", "path": str(root / "kohya"), "caption": {"trigger": "zeta"},
             "edit": {"add_tags": ["my style"]}},
        ],
    }


@pytest.fixture(scope="module")
def prepped(tmp_path_factory):
    root = make_sources(tmp_path_factory.mktemp("curation") / "in")
    recipe = resolve_paths(parse_recipe(recipe_data(root), "test"), Path.cwd())
    out = root.parent / "out"
    result = prepare(recipe, out, RunOptions(workers=2, show_summary=False))
    return root, out, result


def rows_by_id(out: Path) -> dict[str, dict]:
    return {row["id"]: row for row in datasets.load_from_disk(str(out / "dataset"))}


def test_curation_reaches_the_captions_and_the_manifest(prepped):
    _, out, result = prepped
    rows = rows_by_id(out)
    assert len(rows) == 13 and result.stats.duplicates[0][2] == "booru/a0.png"  # the captioned copy is kept
    alice = rows["booru/a0.png"]
    assert alice["caption_head"] == ["1girl", "alice (curation test)", "safe"]
    # blonde hair (removed by an alias rule, and folded), blue eyes (folded), wlop (artists removed) are out;
    # school uniform became serafuku (through the alias seifuku -> sailor fuku); smile is exempt from folding.
    assert alice["caption_body"] == ["smile", "serafuku"]
    assert rows["booru/a7.png"]["caption_body"] == ["smile"]
    zeta = rows["kohya/3_zeta/z1.png"]
    assert zeta["caption_head"] == ["1girl", "zeta"] and zeta["repeats"] == 3
    assert zeta["caption_body"] == ["my style"]  # red hair and twintails folded into the trigger; blonde removed
    assert rows["kohya/3_zeta/z2.png"]["caption_body"] == ["open mouth", "my style"]
    report = json.loads((out / "report.json").read_text())
    fold = report["curation"]["fold"]["characters"]
    assert fold["alice (curation test)"]["folded"] == {"blue eyes": 1.0}
    assert fold["alice (curation test)"]["kept"] == {"smile": 1.0}
    assert fold["zeta"]["folded"] == {"red hair": 1.0, "twintails": 1.0}
    assert report["curation"]["edits"]["removed"] == {"blonde_hair": 11}
    assert report["curation"]["edits"]["removed_by_category"] == {"artist": 10}
    assert report["curation"]["edits"]["replaced"] == {"school_uniform -> serafuku": 5}
    from train.prep.manifest import trigger_features

    assert trigger_features(out) == {"alice (curation test)": ["blue eyes"], "zeta": ["red hair", "twintails"]}


def test_the_lora_metadata_carries_the_fold_and_sample_says_it(prepped, tmp_path):
    import torch
    from safetensors.torch import save_file

    from train.cli.sample import _trigger_lines
    from train.lora.trigger import FOLDED_TAGS_KEY, TRIGGER_PHRASE_KEY, trigger_metadata
    from train.prep.manifest import trigger_features

    _, out, _ = prepped
    metadata = trigger_metadata(trigger_features(out))
    # The exporter passes these as `webui_metadata(extra=...)`, which takes only ss_* / modelspec.* keys.
    assert all(key.startswith(("ss_", "modelspec.")) for key in metadata)
    assert metadata[TRIGGER_PHRASE_KEY] == "alice \\(curation test\\), zeta"
    path = tmp_path / "t.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 8)}, str(path), metadata=metadata)
    assert _trigger_lines(str(path)) == [
        "alice (curation test): this trigger already means: blue eyes",
        "zeta: this trigger already means: red hair, twintails"]
    save_file({"x": torch.zeros(1)}, str(path), metadata={FOLDED_TAGS_KEY: "[not an object"})
    assert _trigger_lines(str(path)) == []


class PageParser(HTMLParser):
    """Every src/href of the page, its headings, and the JSON of its script data blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.headings: list[str] = []
        self.data: dict[str, object] = {}
        self._heading: list[str] | None = None
        self._script: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links += [attrs[k] for k in ("src", "href") if k in attrs]
        if tag in ("h2", "h3"):
            self._heading = []
        elif tag == "script" and attrs.get("type") == "application/json":
            self._script = attrs["id"]
            self.data[self._script] = ""

    def handle_endtag(self, tag):
        if tag in ("h2", "h3") and self._heading is not None:
            self.headings.append("".join(self._heading))
            self._heading = None
        elif tag == "script" and self._script is not None:
            self.data[self._script] = json.loads(self.data[self._script])
            self._script = None

    def handle_data(self, data):
        if self._heading is not None:
            self._heading.append(data)
        if self._script is not None:
            self.data[self._script] += data


def parse_page(out: Path) -> tuple[PageParser, str]:
    text = (out / "report.html").read_text(encoding="utf-8")
    parser = PageParser()
    parser.feed(text)
    return parser, text


def test_report_gallery_has_a_thumbnail_and_the_caption_of_every_kept_row(prepped):
    _, out, _ = prepped
    parser, text = parse_page(out)
    gallery = parser.data["gallery-data"]
    vocabulary = gallery["tags"]
    items = {item["id"]: item for item in gallery["items"]}
    rows = rows_by_id(out)
    assert set(items) == set(rows)
    for row_id, row in rows.items():
        item = items[row_id]
        caption = [vocabulary[i] for i in item["h"] + item["b"] + item["t"]]
        assert caption == row["caption_head"] + row["caption_body"] + row["caption_tail"], row_id
        with Image.open(out / item["thumb"]) as image:
            assert image.format == "WEBP" and max(image.size) <= 256
    struck = sorted((vocabulary[i], kind) for i, kind, _ in items["booru/a0.png"]["s"])
    assert struck == [("blonde hair", "removed"), ("blue eyes", "folded"), ("school uniform", "replaced"),
                      ("wlop", "removed")]
    assert items["kohya/3_zeta/z2.png"]["mask"].endswith("z2.png")  # transparency: the image is its own mask
    assert "Rejected by reason" in parser.headings
    assert "too small: 20x20" in text and "corrupt image" in text
    assert "booru/copy_of_a0.png" in text and "exact duplicate" in text
    tag_rows = {r[0]: r for r in parser.data["tag-data"]}
    assert tag_rows["blue eyes"][3:] == [0, 0, 10, "folded into alice (curation test)"]
    assert tag_rows["blonde hair"][5:] == [11, "removed from 11"]  # zeta's `blonde` is the same tag
    assert tag_rows["serafuku"][1] == "added by an edit rule" and "wlop" in tag_rows


def test_report_loads_no_remote_resource(prepped):
    _, out, _ = prepped
    parser, text = parse_page(out)
    thumbs = [item["thumb"] for item in parser.data["gallery-data"]["items"]]
    for link in parser.links + thumbs:
        assert "://" not in link and not link.startswith("//"), link
        if not link.startswith("#"):
            assert (out / link).is_file(), link
    lowered = text.lower()
    assert "@import" not in lowered and "url(" not in lowered and "<link" not in lowered
    assert "http://" not in lowered and "https://" not in lowered


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium")
def test_report_filters_in_a_real_browser(prepped):
    """The page's JavaScript, run by headless Chromium from the output folder (file://, offline)."""
    _, out, _ = prepped

    # One browser start costs ~2 s: one query. blue eyes is struck through (folded) in alice's 10
    # captions; zeta's 3 have no such tag.
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
         f"file://{out / 'report.html'}?tag=blue_eyes&problem=curated"],
        check=False, capture_output=True, text=True, timeout=120).stdout
    assert dom.split('id="f-shown"', 1)[1].split(">", 1)[1].split("<", 1)[0] == "10 of 13 shown"
    cards = dom.split('<article class="card">')[1:]
    assert len(cards) == 10 and all('<img src="thumbs/' in card and '<s class="t folded"' in card for card in cards)
    assert dom.count("<tr><td>") >= 20  # the tag table, drawn from its JSON


def test_dry_run_writes_nothing_and_previews_what_prep_writes(prepped, tmp_path, capsys):
    from train.cli import main

    root, out, _ = prepped
    recipe = tmp_path / "recipe.toml"
    from train.prep.recipe import recipe_to_toml

    recipe.write_text(recipe_to_toml(parse_recipe(recipe_data(root), "test")))
    before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in tmp_path.parent.rglob("*") if p.is_file()}
    assert main(["prep", str(recipe), "--dry-run", "2", "-o", str(tmp_path / "never")]) == 0
    after = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in tmp_path.parent.rglob("*") if p.is_file()}
    assert after == before and not (tmp_path / "never").exists()
    printed = capsys.readouterr().out
    assert "removed: blonde hair x11" in printed and "replaced: school_uniform -> serafuku x5" in printed
    assert "alice (curation test) (10 images): folds blue eyes 100%" in printed
    row = rows_by_id(out)["booru/a0.png"]
    expected = ", ".join(row["caption_head"] + row["caption_body"] + row["caption_tail"])
    assert f"after:  {expected}\n" in printed
    assert "before: 1girl, alice (curation test), safe, blonde hair, blue eyes, smile, school uniform, wlop" in printed


def test_command_line_curation_options(tmp_path):
    import argparse

    from train.cli.prep import add_arguments, recipe_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(tmp_path), "-o", "x", "--trigger", "my_char", "--fold-threshold", "0.9",
                              "--keep-features", "--fold-exempt", "solo, smile", "--remove-tags", "a, b",
                              "--remove-tags", "c", "--replace-tags", "=_==smile", "--replace-tags", "x=y",
                              "--remove-categories", "artist", "--add-tags", "t"])
    recipe = recipe_from_args(args)
    assert recipe.sources[0].caption.trigger == "my_char"
    assert (recipe.curation.fold_threshold, recipe.curation.keep_features) == (0.9, True)
    assert recipe.curation.fold_exempt == ["solo", "smile"]
    assert recipe.edit.remove_tags == ["a", "b", "c"] and recipe.edit.replace_tags == {"=_=": "smile", "x": "y"}
    assert recipe.edit.remove_categories == ["artist"] and recipe.edit.add_tags == ["t"]
    with pytest.raises(SystemExit):
        parser.parse_args([str(tmp_path), "--replace-tags", "no-equals-sign"])


def test_aesthetic_tags_in_prep(tmp_path):
    from tagger_helpers import build_tiny_aesthetic

    model = build_tiny_aesthetic(tmp_path / "model", hq_probability=0.3)
    images = tmp_path / "images"
    for i in range(2):
        write_image(images / f"{i}.png", (90 * i, 50, 50))
        (images / f"{i}.txt").write_text("1girl, smile")
    data = {"dataset": {"min_side": 64}, "sources": [{"name": "s", "path": str(images)}],
            "caption": {"profile": "animagine-xl-3.1", "aesthetic_model": str(model)}}
    result = prepare(resolve_paths(parse_recipe(data, "test"), Path.cwd()), tmp_path / "out",
                     RunOptions(show_summary=False))
    rows = rows_by_id(result.out)
    assert all(row["caption_body"][-1] == "displeasing" for row in rows.values())  # 0.27 < 0.3 <= 0.45
    assert json.loads(rows["s/0.png"]["metadata"])["aesthetic_score"] == pytest.approx(0.3, abs=1e-4)


def test_tags_cannot_break_out_of_the_pages_script_data():
    from train.prep.report_html import script_json

    hostile = ["<3", "</script><script>alert(1)</script>", "<!--"]
    text = script_json({"tags": hostile})
    assert "<" not in text and json.loads(text) == {"tags": hostile}
