"""`caption` and `prep` on hostile input: bad names, unreadable files, pipes, crafted tags and rows."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import threading
from pathlib import Path

import pytest
from PIL import Image

from train.cli import main

DEAD_PID = 2**22 + 12345


def common(tag_db_path):
    return ["--tags-db", str(tag_db_path), "--max-tokens", "0"]


def test_one_bad_name_or_unreadable_sidecar_skips_a_record_not_the_run(tmp_path, tag_db_path, caplog,
                                                                       monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    (images / "good.png").write_bytes(b"png")
    (images / "good.txt").write_text("1girl, smile")
    for suffix in (b".png", b".txt"):  # a name that is not UTF-8, as copied from an old archive
        with open(os.fsencode(images) + b"/bad\xff" + suffix, "wb") as handle:
            handle.write(b"1girl")
    (images / "eio.png").write_bytes(b"png")
    (images / "eio.txt").write_text("1girl")
    before = {p: p.read_bytes() for p in images.iterdir()}
    read_bytes = Path.read_bytes

    def failing(path):
        if path.name == "eio.txt":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", failing)
    out = tmp_path / "captions.jsonl"
    stale = tmp_path / f".captions.jsonl.{DEAD_PID}.x.tmp"  # a SIGKILLed earlier run's
    stale.write_text("half")
    with caplog.at_level(logging.WARNING):
        assert main(["caption", str(images), "-o", str(out), *common(tag_db_path)]) == 1
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["good.png"]
    assert "eio.txt: cannot read: Input/output error" in caplog.text
    assert "bad\\udcff.png" in caplog.text and "file name is not valid UTF-8" in caplog.text
    assert not stale.exists()
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in images.iterdir()} == before


def test_piped_input_is_read_as_a_stream(tmp_path, tag_db_path):
    fifo = tmp_path / "stdin"
    os.mkfifo(fifo)
    lines = "".join(json.dumps({"id": i, "tag_string": "1girl smile", "rating": "g"}) + "\n" for i in range(3))

    def feed():
        with open(fifo, "w") as pipe:
            pipe.write(lines)

    writer = threading.Thread(target=feed)
    writer.start()
    out = tmp_path / "out.jsonl"
    assert main(["caption", str(fifo), "-o", str(out), "--workers", "2", *common(tag_db_path)]) == 0
    writer.join(timeout=10)
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["0", "1", "2"]


def test_output_under_a_file_is_one_line(tmp_path, caplog):
    posts = tmp_path / "posts.jsonl"
    posts.write_text('{"id": 1, "tag_string": "1girl"}\n')
    assert main(["caption", str(posts), "-o", str(posts / "out.jsonl"), "--max-tokens", "0"]) == 2
    assert f"{posts} is a file, not a folder" in caplog.text
    assert posts.read_text() == '{"id": 1, "tag_string": "1girl"}\n'


def test_separator_and_control_characters_in_tags(tmp_path, tag_db_path, capsys):
    posts = tmp_path / "posts.jsonl"
    post = {"id": 1, "rating": "g", "tag_string_general": ["1girl", "a,b", "x|||y", "\x1b[2Jred_eyes", "smile"],
            "tag_string_meta": "\x1b]0;title\x07"}
    posts.write_text(json.dumps(post) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["caption", str(posts), "-o", str(out), *common(tag_db_path)]) == 0
    record = json.loads(out.read_text())
    # No tail here, so the tidy sd-scripts form has one separator; the dropped tags added none.
    assert record["sd_scripts"] == "1girl, safe, ||| smile" and "a,b" not in record["caption"]
    assert all("," not in tag and "|||" not in tag for tag in record["head"] + record["body"] + record["tail"])
    printed = capsys.readouterr().out
    assert "\x1b" not in out.read_text(encoding="utf-8") and "\x1b" not in printed
    assert "warning: tag … dropped: it contains a comma or the keep-tokens separator |||" in printed
    assert re.search(r"separator \|\|\| │ +2 │", printed)  # counted: two tags
    assert re.search(r"warning: tag … dropped: it contains control characters +│ +2 │", printed)


def test_prep_refuses_a_folder_that_only_looks_like_its_output(tmp_path, caplog):
    from train.cli import prep as cli

    source = tmp_path / "in"
    source.mkdir()
    Image.new("RGB", (64, 64)).save(source / "a.png")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.json").write_text('{"mine": true}')
    (mine / "notes.txt").write_text("keep")
    parser = __import__("argparse").ArgumentParser()
    cli.add_arguments(parser)
    assert cli.run(parser.parse_args([str(source), "-o", str(mine), "--workers", "1"])) == 2
    assert "not a prep output (no manifest.json" in caplog.text
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt", "report.json"]
    assert (mine / "notes.txt").read_text() == "keep"


def test_dataset_rows_naming_files_outside_are_rejected(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from train.prep.sources import Record, Rejected, read_hf

    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(secret)
    root = tmp_path / "ds"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "inside.png")
    (root / "link.png").symlink_to(secret)
    paths = ["inside.png", str(secret), "../secret.png", "link.png", "secret.png"]
    pq.write_table(pa.table({"image": [{"bytes": None, "path": p} for p in paths]}), root / "train.parquet")
    cwd = os.getcwd()
    os.chdir(tmp_path)  # `secret.png` relative to the current folder must not be found either
    try:
        items = list(read_hf(str(root), "train", "ds", 1, tmp_path / "cache"))
    finally:
        os.chdir(cwd)
    kept = [i for i in items if isinstance(i, Record)]
    rejected = [i for i in items if isinstance(i, Rejected)]
    assert [Path(r.image_path) for r in kept] == [(root / "inside.png").resolve(), (root / "secret.png").resolve()]
    assert len(rejected) == 3 and all("outside the dataset folder" in r.reason for r in rejected)
    assert [r.path for r in rejected] == [f"{root}:1", f"{root}:2", f"{root}:3"]


def test_absurd_repeat_folders_are_capped(tmp_path, caplog):
    from train.prep.recipe import MAX_REPEATS
    from train.prep.sources import Record, walk_folder

    (tmp_path / "3000000000_mira").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "3000000000_mira" / "a.png")
    records = [r for r in walk_folder(tmp_path, "s") if isinstance(r, Record)]
    assert [r.repeats for r in records] == [MAX_REPEATS]
    assert "3000000000 repeats capped at 10000" in caplog.text


def test_images_are_sniffed_before_reading_and_never_reach_other_decoders(tmp_path):
    from PIL import UnidentifiedImageError

    from captioning.images import MAX_IMAGE_BYTES, open_image
    from train.prep.validate import ValidateOptions, validate_image

    eps = tmp_path / "drawing.png"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    assert validate_image(str(eps), ValidateOptions(min_side=1)) == "not an image (unrecognised format)"
    with pytest.raises(UnidentifiedImageError):
        open_image(eps)  # even past the sniffing, Pillow may not pick its EPS (Ghostscript) plugin
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as handle:  # sparse: costs no disk and no time
        handle.write(b"\x89PNG\r\n\x1a\n" + bytes(8))
        handle.truncate(MAX_IMAGE_BYTES + 1)
    assert validate_image(str(huge), ValidateOptions(min_side=1)).startswith("too large: ")


def test_disk_full_while_captioning_is_one_line(tmp_path, tag_db_path, caplog, monkeypatch):
    from captioning import outputs

    posts = tmp_path / "posts.jsonl"
    posts.write_text('{"id": 1, "tag_string": "1girl smile", "rating": "g"}\n')
    out = tmp_path / "out.jsonl"
    out.write_text("previous\n")
    real_open = open

    class FullDisk:
        def __init__(self, path, mode):
            self.handle = real_open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(outputs, "open", FullDisk, raising=False)
    assert main(["caption", str(posts), "-o", str(out), *common(tag_db_path)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [f"{out}: cannot write: No space left on device"]
    assert out.read_text() == "previous\n" and sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "posts.jsonl"]
