"""Dataset prep end to end: sources, bad input, atomic output, reuse, sharding, HF datasets."""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path

import pytest
from PIL import Image

import datasets
from captioning import outputs
from train.prep import pipeline
from train.prep.pipeline import RunOptions, prepare
from train.prep.recipe import RecipeError, load_recipe, parse_recipe, resolve_paths
from train.prep.writer import FEATURES

REPO = Path(__file__).resolve().parents[1]
QUIET = RunOptions(show_summary=False)


def recipe_for(*sources: dict, tag_db: Path | None = None, **dataset):
    data = {"sources": list(sources), "dataset": {"min_side": 64, **dataset}}
    if tag_db is not None:
        data["caption"] = {"tags_db": str(tag_db)}
    return resolve_paths(parse_recipe(data, "test"), Path.cwd())


def image(path: Path, size=(96, 80), colour=(200, 30, 30), **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, **save)
    return path


def post_json(
    path: Path, general: str, rating="g", score=10, created="2023-04-01T10:00:00.000-04:00"
):
    path.write_text(
        json.dumps(
            {
                "id": 1,
                "tag_string_general": general,
                "tag_string_character": "mira_(animagine_sample)",
                "tag_string_copyright": "animagine_sample",
                "rating": rating,
                "score": score,
                "created_at": created,
                "media_asset": {"created_at": created},
            }
        ),
        encoding="utf-8",
    )


def rows(out: Path) -> list[dict]:
    return list(datasets.load_from_disk(str(out / "dataset")))


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    }


def test_sample_dataset_end_to_end(tmp_path, tag_db_path, clip_bpe_path):
    recipe = load_recipe(REPO / "datasets" / "sample.toml")
    recipe = recipe.model_copy(
        update={
            "caption": recipe.caption.model_copy(
                update={"tags_db": str(tag_db_path), "clip_bpe": str(clip_bpe_path)}
            )
        }
    )
    before = snapshot(REPO / "datasets" / "sample")
    result = prepare(recipe, tmp_path / "out", RunOptions(workers=2, show_summary=False))
    assert snapshot(REPO / "datasets" / "sample") == before
    data = datasets.load_from_disk(str(tmp_path / "out" / "dataset"))
    assert data.features == FEATURES
    assert len(data) == result.rows == 14
    row = data[0]
    assert Path(row["image_path"]).is_file() and row["repeats"] == 10
    assert any("mira" in tag for tag in row["caption_head"])
    assert row["year"] in range(2021, 2025) and row["rating"] in "gs"
    assert (row["bucket_width"], row["bucket_height"]) in {
        (1024, 1024),
        (1152, 896),
        (896, 1152),
        (1216, 832),
        (832, 1216),
        (1344, 768),
        (768, 1344),
    }
    assert set(data["split"]) <= {"train", "val"}
    assert len(set(data["id"])) == 14
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["counts"]["kept"] == 14 and report["counts"]["rejected"] == 0
    assert report["top_tags"]["character"] == {"mira_(animagine_sample)": 14}
    html = (tmp_path / "out" / "report.html").read_text()
    plots = sorted(p.name for p in (tmp_path / "out" / "plots").glob("*.png"))
    assert "buckets.png" in plots and "token_lengths.png" in plots
    for name in plots:
        assert f"plots/{name}" in html
    # Nothing was rejected: no empty "Rejected by reason" heading, no rejected or duplicates section.
    assert "Rejected" not in html and "Duplicates" not in html
    assert len(list((tmp_path / "out" / "thumbs").glob("*.webp"))) == 14
    assert load_recipe(tmp_path / "out" / "recipe.toml").sources[0].repeats == 10


def test_layouts_repeats_and_bad_input(tmp_path, tag_db_path):
    root = tmp_path / "input"
    image(root / "10_mira" / "a.png")
    (root / "10_mira" / "a.txt").write_text("1girl, smile, blue hair", encoding="utf-8")
    image(root / "10_mira" / "classonly.png", colour=(1, 2, 3))  # no caption: folder class token
    image(root / "gallery" / "b.jpg", colour=(30, 200, 30))
    post_json(root / "gallery" / "b.jpg.json", "1girl solo")
    image(root / "gallery" / "c.png", colour=(30, 30, 200))
    post_json(root / "gallery" / "c.json", "1girl long_hair")
    image(root / "plain" / "untagged.png", colour=(90, 90, 90))
    (root / "plain" / "zero.png").write_bytes(b"")
    buffer = io.BytesIO()
    Image.effect_noise((96, 96), 50).convert("RGB").save(buffer, "JPEG")
    (root / "plain" / "truncated.jpg").write_bytes(buffer.getvalue()[:-300])
    image(root / "plain" / "small.png", size=(30, 30))
    (root / "plain" / "notes.png").write_text("not an image")
    image(root / "plain" / "badjson.png", colour=(5, 99, 5))
    (root / "plain" / "badjson.json").write_text("{not json", encoding="utf-8")
    (root / "plain" / "orphan.txt").write_text("1girl", encoding="utf-8")
    os.symlink(root, root / "plain" / "loop")  # folder symlink back to the root
    os.symlink(root / "plain" / "l2.png", root / "plain" / "l1.png")
    os.symlink(root / "plain" / "l1.png", root / "plain" / "l2.png")  # file symlink loop
    image(Path(os.fsdecode(bytes(root / "plain") + b"/bad\xffname.png")), colour=(7, 7, 7))
    image(root / "plain" / "dup.png")  # same bytes as 10_mira/a.png
    image(root / "plain" / "emptycap.png", colour=(1, 99, 1))
    (root / "plain" / "emptycap.txt").write_text("\n", encoding="utf-8")  # untagged, as sd-scripts
    (root / "empty").mkdir()
    before = snapshot(root / "gallery")

    out = tmp_path / "out"
    recipe = recipe_for({"name": "s", "path": str(root)}, tag_db=tag_db_path)
    result = prepare(recipe, out, QUIET)
    assert snapshot(root / "gallery") == before
    by_id = {row["id"]: row for row in rows(out)}
    assert set(by_id) == {
        "s/10_mira/a.png",
        "s/10_mira/classonly.png",
        "s/gallery/b.jpg",
        "s/gallery/c.png",
        "s/plain/untagged.png",
        "s/plain/emptycap.png",
    }
    assert by_id["s/10_mira/a.png"]["repeats"] == 10 and by_id["s/gallery/b.jpg"]["repeats"] == 1
    assert "blue hair" in by_id["s/10_mira/a.png"]["caption_body"]
    assert "mira" in by_id["s/10_mira/classonly.png"]["caption_body"]
    assert any("mira" in t for t in by_id["s/gallery/c.png"]["caption_head"])
    assert by_id["s/gallery/b.jpg"]["year"] == 2023
    reasons = {Path(p).name: r for p, r in result.stats.rejected}
    assert "empty file" in reasons["zero.png"]
    assert "corrupt image" in reasons["truncated.jpg"]
    assert "too small" in reasons["small.png"]
    assert "not an image" in reasons["notes.png"]
    assert "unreadable sidecar" in reasons["badjson.png"]
    assert reasons["orphan.txt"] == "sidecar without image"
    assert "symbolic link loop" in reasons["loop"]
    assert "cannot stat" in reasons["l1.png"] and "cannot stat" in reasons["l2.png"]
    assert reasons["bad\\xffname.png"] == "file name is not valid UTF-8"
    assert result.stats.duplicates == [("s/plain/dup.png", "exact duplicate", "s/10_mira/a.png")]
    assert result.stats.untagged == 2
    assert any("emptycap.txt: empty sidecar" in w for w in result.stats.warnings)
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["duplicates"] == 1 and report["rejected_by_reason"]["too small"] == 1


def test_the_captioned_copy_wins_and_hidden_entries_are_skipped(tmp_path):
    """A loose uncaptioned copy at the root is found first but must not take the caption and
    the repeats away; `.thumbnails/`, `.git/` and dot-files are not part of the dataset."""
    root = tmp_path / "img"
    image(root / "a.png")  # loose copy, no caption: listed before 10_mira/
    image(root / "10_mira" / "a.png")
    (root / "10_mira" / "a.txt").write_text("1girl, smile", encoding="utf-8")
    image(root / "5_mira" / "a.png")  # captioned too, fewer repeats
    (root / "5_mira" / "a.txt").write_text("1girl, smile", encoding="utf-8")
    image(root / ".thumbnails" / "t.png", colour=(1, 1, 1))
    image(root / ".hidden.png", colour=(2, 2, 2))
    (root / ".git").mkdir()
    (root / ".git" / "orphan.txt").write_text("1girl", encoding="utf-8")
    result = prepare(recipe_for({"name": "s", "path": str(root)}), tmp_path / "out", QUIET)
    kept = rows(tmp_path / "out")
    assert [(r["id"], r["repeats"]) for r in kept] == [("s/10_mira/a.png", 10)]
    assert "smile" in kept[0]["caption_body"]
    dropped = {d[0]: d[2] for d in result.stats.duplicates}
    assert dropped == {"s/a.png": "s/10_mira/a.png", "s/5_mira/a.png": "s/10_mira/a.png"}
    assert result.stats.rejected == []


def test_folder_without_images(tmp_path, capsys):
    from train.cli import prep as cli

    (tmp_path / "empty").mkdir()
    parser = __import__("argparse").ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(
        [str(tmp_path / "empty"), "-o", str(tmp_path / "out"), "--workers", "1"]
    )
    assert cli.run(args) == 1
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "no images found" in report["rejected"][0]["reason"]


def test_crash_mid_write_leaves_no_half_dataset(tmp_path, monkeypatch):
    image(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    recipe = recipe_for({"name": "s", "path": str(tmp_path / "in")})

    def crash(spool, out_dir, cache_dir):
        (out_dir).mkdir(parents=True)
        (out_dir / "data-00000-of-00001.arrow").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "write_dataset", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare(recipe, out, QUIET)
    assert sorted(os.listdir(tmp_path)) == ["in"]
    monkeypatch.undo()
    prepare(recipe, out, QUIET)
    good = rows(out)
    monkeypatch.setattr(pipeline, "write_dataset", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare(recipe, out, RunOptions(force=True, show_summary=False))
    assert rows(out) == good  # the previous complete result is untouched
    assert sorted(os.listdir(tmp_path)) == ["in", "out"]


def test_rerun_reuses_until_input_changes(tmp_path):
    image(tmp_path / "in" / "a.png")
    recipe = recipe_for({"name": "s", "path": str(tmp_path / "in")})
    assert not prepare(recipe, tmp_path / "out", QUIET).up_to_date
    # Readable as the umask says (not mkdtemp's 0700), and marked as ours for the next run.
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == outputs.normal_mode(folder=True)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["format"] == "animagine-lora prep"
    assert prepare(recipe, tmp_path / "out", QUIET).up_to_date
    assert not prepare(
        recipe_for({"name": "s", "path": str(tmp_path / "in")}, min_side=65),
        tmp_path / "out",
        QUIET,
    ).up_to_date
    cached = tmp_path / "out" / "latents" / "vae" / "x.safetensors"  # the trainer's latent cache
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"latents")
    image(tmp_path / "in" / "b.png", colour=(0, 0, 0))
    result = prepare(recipe, tmp_path / "out", QUIET)
    assert not result.up_to_date and result.rows == 2
    assert cached.read_bytes() == b"latents"


def test_shards_are_disjoint_and_complete(tmp_path):
    for index in range(12):
        image(tmp_path / "in" / f"{index:02d}.png", colour=(index * 20, 0, 0))
    recipe = recipe_for({"name": "s", "path": str(tmp_path / "in")})
    full = {row["id"] for row in rows(prepare(recipe, tmp_path / "all", QUIET).out)}
    parts = []
    for shard in range(3):
        out = tmp_path / f"shard{shard}"
        prepare(recipe, out, RunOptions(shard_index=shard, num_shards=3, show_summary=False))
        parts.append({row["id"] for row in rows(out)})
    assert set().union(*parts) == full and sum(map(len, parts)) == len(full) == 12
    with pytest.raises(RecipeError, match="shard"):
        prepare(recipe, tmp_path / "x", RunOptions(shard_index=3, num_shards=3))


def test_val_split_is_deterministic(tmp_path):
    for index in range(20):
        image(tmp_path / "in" / f"{index:02d}.png", colour=(0, index * 10, 0))
    recipe = recipe_for({"name": "s", "path": str(tmp_path / "in")}, val_fraction=0.3)
    first = {r["id"]: r["split"] for r in rows(prepare(recipe, tmp_path / "a", QUIET).out)}
    second = {r["id"]: r["split"] for r in rows(prepare(recipe, tmp_path / "b", QUIET).out)}
    assert first == second and 0 < list(first.values()).count("val") < 20


def test_hf_imagefolder_and_parquet_sources(tmp_path):
    folder = tmp_path / "hf_folder"
    for index in range(2):
        image(folder / f"{index}.png", colour=(0, 0, 100 + index))
    (folder / "metadata.jsonl").write_text(
        "".join(
            json.dumps({"file_name": f"{i}.png", "tags": "1girl, smile", "rating": "g"}) + "\n"
            for i in range(2)
        )
    )
    buffer = io.BytesIO()
    Image.new("RGB", (90, 90), (9, 9, 9)).save(buffer, "PNG")
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "pq" / "train.parquet"
    parquet.parent.mkdir()
    pq.write_table(
        pa.table(
            {"image": [{"bytes": buffer.getvalue(), "path": "x.png"}], "text": ["1girl, sky"]}
        ),
        parquet,
    )
    before = snapshot(tmp_path / "pq")
    recipe = recipe_for(
        {"name": "folder", "path": str(folder)}, {"name": "pq", "path": str(parquet.parent)}
    )
    out = tmp_path / "out"
    prepare(recipe, out, QUIET)
    assert snapshot(tmp_path / "pq") == before
    by_source = {}
    for row in rows(out):
        by_source.setdefault(row["source"], []).append(row)
    assert len(by_source["folder"]) == 2 and by_source["folder"][0]["rating"] == "g"
    assert "smile" in by_source["folder"][0]["caption_body"]
    embedded = by_source["pq"][0]
    assert Path(embedded["image_path"]).parent == out.resolve() / "image_cache"
    assert Path(embedded["image_path"]).read_bytes() == buffer.getvalue()
    assert "sky" in embedded["caption_body"]


def test_sample_dataset_regenerates_byte_for_byte(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_sample", REPO / "datasets" / "make_sample.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "OUT", tmp_path)
    module.main()
    committed = REPO / "datasets" / "sample"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in committed.iterdir())
    for path in tmp_path.iterdir():
        assert path.read_bytes() == (committed / path.name).read_bytes(), path.name
    total = sum(p.stat().st_size for p in committed.iterdir())
    assert total < 2 * 2**20
