"""`animagine-lora caption` end to end: JSON lines in and out, folders, workers, bad input, exit codes."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
import time

import pytest

from train.cli import main

POSTS = [
    {"id": 1, "rating": "g", "score": 40, "media_asset": {"created_at": "2024-05-01T00:00:00.000+09:00"},
     "tag_string_general": "smile 1girl long_hair ^_^", "tag_string_character": "firefly_(honkai:_star_rail)",
     "tag_string_copyright": "honkai:_star_rail honkai_(series)", "tag_string_artist": "wlop",
     "tag_string_meta": "commentary_request absurdres highres"},
    {"id": 2, "rating": "e", "score": 3, "created_at": "2015-01-01T00:00:00.000-05:00",
     "tag_string_general": "1boy 2girls multiple_girls nude"},
    {"id": 3, "rating": "q", "tag_string": "1girl blush"},
]


@pytest.fixture
def posts_file(tmp_path):
    lines = [json.dumps(p) for p in POSTS]
    lines.insert(2, "{broken")
    lines.append(json.dumps(POSTS[0]))  # duplicate id
    path = tmp_path / "posts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def common(tag_db_path, clip_bpe_path):
    return ["--tags-db", str(tag_db_path), "--clip-bpe", str(clip_bpe_path)]


def test_jsonl_in_jsonl_out(posts_file, tmp_path, tag_db_path, clip_bpe_path, capsys):
    before = hashlib.sha256(posts_file.read_bytes()).hexdigest()
    out = tmp_path / "out" / "captions.jsonl"
    status = main(["caption", str(posts_file), "-o", str(out), *common(tag_db_path, clip_bpe_path)])
    assert status == 1  # a malformed line and a duplicate were skipped
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["1", "2", "3"]
    first = records[0]
    assert first["caption"] == ("1girl, firefly (honkai: star rail), honkai: star rail, honkai (series), safe, "
                                "smile, long hair, ^_^, wlop, year 2024, masterpiece, high score, absurdres, highres")
    assert first["prompt"] == first["caption"].replace("(", "\\(").replace(")", "\\)")
    assert first["sd_scripts"].count("|||") == 2
    assert first["head"][-1] == "safe" and first["tail"][0] == "year 2024"
    assert 0 < first["tokens"] <= 225 and first["cut"] is False
    assert records[1]["caption"] == "2girls, multiple girls, 1boy, explicit, nude, year 2015, worst quality, low score"
    assert records[2]["caption"] == "1girl, nsfw, blush"
    assert hashlib.sha256(posts_file.read_bytes()).hexdigest() == before
    printed = capsys.readouterr().out
    assert "records read" in printed and "malformed JSON" in printed and "duplicate id" in printed


def test_budget_and_strict(posts_file, tmp_path, tag_db_path, clip_bpe_path):
    out = tmp_path / "cut.jsonl"
    assert main(["caption", str(posts_file), "-o", str(out), "--max-tokens", "45",
                 *common(tag_db_path, clip_bpe_path)]) == 1
    first = json.loads(out.read_text().splitlines()[0])
    assert first["cut"] and first["tokens"] <= 45 and first["dropped"]
    strict_out = tmp_path / "strict.jsonl"
    assert main(["caption", str(posts_file), "-o", str(strict_out), "--strict",
                 *common(tag_db_path, clip_bpe_path)]) == 2
    assert not strict_out.exists() and not list(tmp_path.glob(".strict.jsonl*"))


def test_workers_keep_input_order(tmp_path, tag_db_path, clip_bpe_path, monkeypatch):
    from captioning import chunks

    monkeypatch.setattr(chunks, "CHUNK_BYTES", 700)  # many chunks across the workers
    lines = [json.dumps(dict(POSTS[i % 3], id=i)) for i in range(100)]
    source = tmp_path / "many.jsonl"
    source.write_text("\n".join(lines))
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert main(["caption", str(source), "-o", str(one), *common(tag_db_path, clip_bpe_path)]) == 0
    assert main(["caption", str(source), "-o", str(two), "--workers", "2", *common(tag_db_path, clip_bpe_path)]) == 0
    assert one.read_bytes() == two.read_bytes()
    assert [json.loads(line)["id"] for line in two.read_text().splitlines()] == [str(i) for i in range(100)]


def test_folder_to_txt_sidecars(tmp_path, tag_db_path, clip_bpe_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    (images / "a.png").write_bytes(b"png")
    (images / "a.png.json").write_text(json.dumps(POSTS[0]))
    (images / "sub" / "b.jpg").write_bytes(b"jpg")
    (images / "sub" / "b.txt").write_text("smile, 1girl, hatsune miku, vocaloid")
    (images / "c.webp").write_bytes(b"webp")  # no sidecar: skipped
    out = tmp_path / "captions"
    status = main(["caption", str(images), "-o", str(out), "--txt-style", "sd-scripts",
                   *common(tag_db_path, clip_bpe_path)])
    assert status == 1
    # Empty tail: one separator (sd-scripts keeps the head, shuffles the rest), no dangling `|||`.
    assert (out / "sub" / "b.txt").read_text() == "1girl, hatsune miku, vocaloid, ||| smile\n"
    assert (out / "a.txt").read_text().startswith("1girl, firefly (honkai: star rail)")
    assert not (out / "c.txt").exists()
    assert (images / "sub" / "b.txt").read_text() == "smile, 1girl, hatsune miku, vocaloid"
    jsonl = tmp_path / "folder.jsonl"
    main(["caption", str(images), "-o", str(jsonl), *common(tag_db_path, clip_bpe_path)])
    assert [json.loads(line)["id"] for line in jsonl.read_text().splitlines()] == ["a.png", "sub/b.jpg"]


def test_refuses_to_write_into_the_input_folder(tmp_path, tag_db_path, clip_bpe_path, caplog):
    images = tmp_path / "images"
    images.mkdir()
    assert main(["caption", str(images), "-o", str(images / "captions"), *common(tag_db_path, clip_bpe_path)]) == 2
    assert "refusing to write captions into the input folder" in caplog.text


def test_bad_arguments_are_one_line_errors(posts_file, tmp_path, tag_db_path, clip_bpe_path, caplog):
    out = str(tmp_path / "o.jsonl")
    assert main(["caption", str(tmp_path / "nope.jsonl"), "-o", out]) == 2
    assert main(["caption", str(posts_file), "-o", out, "--profile", "animagine-xl-5",
                 *common(tag_db_path, clip_bpe_path)]) == 2
    assert main(["caption", str(posts_file), "-o", out, "--tags-db", str(tmp_path / "no.csv"),
                 "--clip-bpe", str(clip_bpe_path)]) == 2
    messages = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "input not found" in messages[0] and "did you mean" in messages[1] and "not found" in messages[2]


def test_dataset_percentiles(tmp_path, tag_db_path, clip_bpe_path):
    source = tmp_path / "scores.jsonl"
    source.write_text("\n".join(json.dumps(dict(POSTS[1], id=i, rating="g", score=i)) for i in range(101)))
    out = tmp_path / "o.jsonl"
    assert main(["caption", str(source), "-o", str(out), "--percentiles", "dataset",
                 *common(tag_db_path, clip_bpe_path)]) == 0
    tails = [json.loads(line)["tail"] for line in out.read_text().splitlines()]
    assert tails[91][-1] == "high score" and tails[90][-1] == "great score"


def test_subprocess_console_script(posts_file, tmp_path):
    """Shipped data, no network, no transformers/torch import: what keeps a small run fast."""
    out = tmp_path / "sub.jsonl"
    code = ("import sys; from train.cli import main; status = main(sys.argv[1:]); "
            "heavy = {'torch', 'transformers'} & set(sys.modules); "
            "sys.exit(f'imported {heavy}') if heavy else sys.exit(status)")
    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9")  # any Hub call would fail
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, "caption", str(posts_file), "-o", str(out)],
                          capture_output=True, text=True, timeout=120, check=False, env=env)
    elapsed = time.perf_counter() - started
    assert done.returncode == 1, done.stderr
    assert len(out.read_text().splitlines()) == 3
    assert "records skipped" in done.stdout and "duplicate id" in done.stderr
    assert "danbooru_tags.csv.gz (shipped)" in done.stdout
    assert elapsed < 10, elapsed  # under 1 s on an idle machine; generous for shared CI cores


def test_kohya_folder_is_ordered_without_a_tags_db(tmp_path):
    """Series tags go in the head with the shipped database, whatever file the user has."""
    folder = tmp_path / "img" / "10_herta"
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes(b"png")
    (folder / "a.txt").write_text("honkai: star rail, solo, herta (honkai: star rail), 1girl, long hair, smile")
    out = tmp_path / "captions"
    assert main(["caption", str(tmp_path / "img"), "-o", str(out)]) == 0
    assert (out / "10_herta" / "a.txt").read_text() == (
        "1girl, herta (honkai: star rail), honkai: star rail, solo, long hair, smile\n")


def test_fields_select_what_is_written(tmp_path, capsys):
    source = tmp_path / "posts.jsonl"
    source.write_text("".join(json.dumps(p) + "\n" for p in [*POSTS, POSTS[1]]))  # one duplicate id
    full, slim = tmp_path / "full.jsonl", tmp_path / "slim.jsonl"
    assert main(["caption", str(source), "-o", str(full), "--max-tokens", "0"]) == 1
    full_summary = capsys.readouterr().out
    assert main(["caption", str(source), "-o", str(slim), "--max-tokens", "0", "--fields", "id,caption"]) == 1
    assert capsys.readouterr().out == full_summary  # the summary still counts every field
    records = [json.loads(line) for line in full.read_text().splitlines()]
    assert [json.loads(line) for line in slim.read_text().splitlines()] == [
        {"id": r["id"], "caption": r["caption"]} for r in records]
    with pytest.raises(SystemExit):
        main(["caption", str(source), "-o", str(slim), "--fields", "id,captions"])


def test_line_ranges_cover_the_file_at_line_ends(tmp_path):
    from captioning.chunks import line_ranges

    path = tmp_path / "lines.jsonl"
    lines = [b"x" * n for n in (5, 0, 40, 3, 17, 2, 90, 1)]
    data = b"\n".join(lines)  # no newline after the last line
    path.write_bytes(data)
    ranges = list(line_ranges(path, chunk_bytes=16))
    assert ranges[0].start == 0 and ranges[-1].end == len(data)
    assert all(a.end == b.start for a, b in itertools.pairwise(ranges))
    assert all(data[r.end - 1:r.end] == b"\n" for r in ranges[:-1])  # cut only after a newline
    for r in ranges:  # first_line numbers the range's first line
        assert r.first_line == data[:r.start].count(b"\n") + 1
    assert any(r.end - r.start > 16 for r in ranges)  # the 90-byte line makes a longer range


def test_duplicates_across_chunks_and_workers(tmp_path, tag_db_path, clip_bpe_path, monkeypatch, caplog):
    from captioning import chunks

    monkeypatch.setattr(chunks, "CHUNK_BYTES", 300)  # about one post per chunk
    ids = [1, 2, 3, 2, 4, 1, 5]
    source = tmp_path / "dups.jsonl"
    source.write_text("\n".join(json.dumps(dict(POSTS[1], id=i)) for i in ids) + "\n")
    out = tmp_path / "o.jsonl"
    assert main(["caption", str(source), "-o", str(out), "--workers", "2", *common(tag_db_path, clip_bpe_path)]) == 1
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["1", "2", "3", "4", "5"]
    assert {(r["rating"], r["year"], r["score_tag"], r["quality_tag"]) for r in records} == \
        {("e", 2015, "low score", "worst quality")}
    assert f"{source}:4: duplicate id '2'" in caplog.text and f"{source}:6: duplicate id '1'" in caplog.text


def test_summary_takes_duplicates_back_out(tmp_path, tag_db_path, clip_bpe_path):
    from captioning import Captioner, TagDatabase, TokenCounter, load_profile
    from captioning.batch import _Accepted
    from captioning.chunks import caption_chunks, line_ranges
    from captioning.summary import CaptionSummary

    source = tmp_path / "dups.jsonl"  # ids 0 1 2 0 1 2: posts 0-2 kept, 3-5 are duplicates
    source.write_text("\n".join(json.dumps(dict(POSTS[i % 2], id=i % 3)) for i in range(6)) + "\n")
    summary = CaptionSummary()
    captioner = Captioner(load_profile(), TagDatabase.load(tag_db_path), TokenCounter.from_bpe(clip_bpe_path))
    results = caption_chunks(line_ranges(source), captioner, 1, source)
    kept = b"".join(_Accepted(summary, strict=False, max_messages=0).outputs(results))
    records = [json.loads(line) for line in kept.splitlines()]
    assert [r["id"] for r in records] == ["0", "1", "2"]
    data = summary.as_dict()
    assert data["ratings"] == {"g": 2, "e": 1} and data["read"] == 6
    assert data["skipped"] == {"duplicate id … (first record kept)": 3}
    assert sum(data["scores"].values()) == 3
