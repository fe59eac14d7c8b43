"""Recipe validation: every shipped recipe loads; wrong keys and values get one clear line each."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from train.cli import prep as cli
from train.prep.recipe import RecipeError, load_recipe, parse_recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "datasets").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.sources
    for source in recipe.sources:
        assert Path(source.path).is_absolute()


def test_sample_recipe_points_at_sample():
    recipe = load_recipe(REPO / "datasets" / "sample.toml")
    assert Path(recipe.sources[0].path) == REPO / "datasets" / "sample"
    assert recipe.caption.tags_db is None  # the shipped tag database: nothing beside the repository


def test_unknown_keys_suggest(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[dataset]\nmin_sid = 3\n[[sources]]\nname = "a"\npath = "x"\nrepeat = 2\n')
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    lines = str(error.value).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{path}: dataset.min_sid: unknown key (did you mean 'min_side'?)")
    assert lines[1].startswith(f"{path}: sources.0.repeat: unknown key (did you mean 'repeats'?)")


@pytest.mark.parametrize(
    "data, field",
    [
        ({"sources": []}, "sources"),
        ({}, "sources"),
        ({"sources": [{"name": "a", "path": "x", "repeats": 0}]}, "sources.0.repeats"),
        (
            {"sources": [{"name": "a", "path": "x"}], "dataset": {"buckets": "square"}},
            "dataset.buckets",
        ),
        (
            {"sources": [{"name": "a", "path": "x"}], "dataset": {"val_fraction": 1.5}},
            "dataset.val_fraction",
        ),
        (
            {"sources": [{"name": "a", "path": "x"}], "caption": {"general_threshold": 2}},
            "caption.general_threshold",
        ),
        (
            {"sources": [{"name": "a", "path": "x", "caption": {"extra": 1}}]},
            "sources.0.caption.extra",
        ),
    ],
)
def test_bad_values_name_the_field(data, field):
    with pytest.raises(RecipeError, match=f"recipe.toml: {field}:"):
        parse_recipe(data, "recipe.toml")


def test_bad_toml_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[dataset\n")
    with pytest.raises(RecipeError, match="broken.toml: not valid TOML"):
        load_recipe(path)


def _run(argv):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.run(parser.parse_args(argv))


def test_unusable_config_stops_before_work(tmp_path, caplog):
    out = tmp_path / "out"
    assert _run([str(tmp_path / "missing"), "-o", str(out)]) == 2
    assert "sources.0.path" in caplog.text
    (tmp_path / "in").mkdir()
    assert _run([str(tmp_path / "in"), "-o", str(out), "--tags-db", str(tmp_path / "no.csv")]) == 2
    assert "caption.tags_db" in caplog.text
    assert _run([str(tmp_path / "in"), "-o", str(out), "--min-side", "0"]) == 2
    assert "dataset.min_side" in caplog.text
    (tmp_path / "in" / "keep.png").write_bytes(b"x")
    assert _run([str(tmp_path / "in"), "-o", str(tmp_path / "in" / "prepped")]) == 2
    assert "overlaps source 0" in caplog.text
    assert _run([str(tmp_path / "in"), "-o", str(tmp_path / "in")]) == 2
    assert _run([str(tmp_path / "in"), "-o", str(tmp_path)]) == 2
    assert (tmp_path / "in" / "keep.png").read_bytes() == b"x"
    (tmp_path / "in" / "keep.png").unlink()
    other = tmp_path.parent / f"{tmp_path.name}_user_folder"
    other.mkdir()
    (other / "photo.jpg").write_bytes(b"mine")
    assert _run([str(tmp_path / "in"), "-o", str(other)]) == 2
    assert "not a prep output" in caplog.text and (other / "photo.jpg").read_bytes() == b"mine"
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in"]
    assert list((tmp_path / "in").iterdir()) == []


def test_command_line_overrides_recipe(tmp_path):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(
        [
            str(REPO / "datasets" / "sample.toml"),
            "-o",
            "x",
            "--buckets",
            "all",
            "--max-tokens",
            "150",
            "--near-dup",
        ]
    )
    recipe = cli.recipe_from_args(args)
    assert recipe.dataset.buckets == "all" and recipe.dataset.near_dup
    assert recipe.caption.max_tokens == 150 and recipe.dataset.val_fraction == 0.15
    assert Path(recipe.sources[0].path) == REPO / "datasets" / "sample"
