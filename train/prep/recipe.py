"""Dataset recipes: TOML describing the sources of one dataset and the shared prep settings.

The role sd-scripts' dataset TOML plays, with one typed schema. Validated once at the edge
(`load_recipe`): a wrong key or value stops prep before any work with one line per problem,
naming the file and the field, with a "did you mean" for misspelt keys.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError

# The most times one image may be repeated per epoch. sd-scripts folders `N_name` give N; past
# this it is a typo (`3000000000_x` overflows the dataset's int32 column after all the work,
# `2000000000_x` exhausts memory in training), never a dataset.
MAX_REPEATS = 10_000

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9]")


class RecipeError(ValueError):
    """An unusable recipe or option; the message names the file and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CaptionOptions(_Strict):
    """How tags become captions (see captioning.Captioner)."""

    profile: str = "animagine-xl-4.0"
    tags_db: str | None = None  # tag database; default the shipped one (a WD selected_tags.csv adds to it)
    clip_bpe: str | None = None  # CLIP BPE merges .txt.gz for the token budget; default the shipped one
    tokenizer: str | None = None  # or a tokenizer folder / Hub id
    max_tokens: int = Field(225, ge=1)  # 3 CLIP chunks of 75, as sd-scripts' max_token_length
    tagger: str | None = None  # WD v3 tagger folder or Hub repo, for untagged images
    general_threshold: float = Field(0.35, gt=0, lt=1)
    character_threshold: float = Field(0.85, gt=0, lt=1)
    # Image classifier for the profile's aesthetic tags (animagine-xl-3.1: shadowlilac/aesthetic-shadow-v2);
    # None: no aesthetic tag is written.
    aesthetic_model: str | None = None


class EditOptions(_Strict):
    """Tag edit rules (captioning.curation.EditRules); tags in any spelling, aliases followed."""

    remove_tags: list[str] = []
    replace_tags: dict[str, str] = {}  # old tag -> new tag
    remove_categories: list[Literal["general", "artist", "copyright", "character", "meta"]] = []
    add_tags: list[str] = []


class CurationOptions(_Strict):
    """Folding each character's constant features into its tag (captioning.curation)."""

    fold_threshold: float = Field(0.8, gt=0, le=1)  # share of a character's images a tag must reach
    keep_features: bool = False  # decide and report, but leave the captions as they are
    fold_exempt: list[str] = []  # tags never folded (e.g. "solo", "looking at viewer")
    fold_min_images: int = Field(10, ge=1)  # characters with fewer images fold nothing


class SourceCaption(_Strict):
    """Per-source caption overrides."""

    profile: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    extra_tags: list[str] = []  # tags added to every image of this source (as `edit.add_tags`)
    # A trigger tag for this source's images: placed in the head as a character tag, and the
    # tag that frequent features are folded into (captioning.curation).
    trigger: str | None = None


class Source(_Strict):
    name: str
    path: str  # relative paths are relative to the recipe file
    type: Literal["auto", "folder", "hf"] = "auto"
    split: str = "train"  # split to read from a Hugging Face dataset
    repeats: int = Field(1, ge=1, le=MAX_REPEATS)  # times any `N_name` folder count (capped too)
    caption: SourceCaption = SourceCaption()
    edit: EditOptions = EditOptions()  # applied after the recipe's own [edit] rules


class PrepOptions(_Strict):
    """Settings shared by all sources."""

    min_side: int = Field(512, ge=1)
    buckets: Literal["card", "all"] = "card"
    # Bucket area in pixels (default 1024x1024, the card's): larger trains detail at 1152-1536
    # at 1.3-2.3x the activation memory per image (docs/prep.md, "Higher resolutions").
    max_area: int | None = Field(None, ge=512 * 512, le=2048 * 2048)
    near_dup: bool = False
    near_dup_distance: int = Field(4, ge=0, le=64)  # phash Hamming distance counted as duplicate
    max_image_pixels: int | None = Field(None, ge=1)  # None: Pillow's default bomb limit
    val_fraction: float = Field(0.0, ge=0, lt=1)


class Recipe(_Strict):
    dataset: PrepOptions = PrepOptions()
    caption: CaptionOptions = CaptionOptions()
    edit: EditOptions = EditOptions()  # for every source
    curation: CurationOptions = CurationOptions()
    sources: list[Source] = Field(min_length=1)


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the field at `loc` (None if it cannot be followed)."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        candidates = [annotation, *args]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return model


def format_errors(error: ValidationError, origin: str) -> str:
    """One line per problem: `origin: field.path: message (did you mean 'x'?)`."""
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        where = ".".join(str(part) for part in loc) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            owner = _model_at(Recipe, loc[:-1])
            known = list(owner.model_fields) if owner else []
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            message = "unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")
            if known:
                message += f"; known keys: {', '.join(known)}"
        lines.append(f"{origin}: {where}: {message}")
    return "\n".join(lines)


def parse_recipe(data: dict[str, Any], origin: str) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise RecipeError(format_errors(error, origin)) from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe; source paths are made absolute relative to the file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"{path}: cannot read recipe: {error}") from None
    except tomllib.TOMLDecodeError as error:
        raise RecipeError(f"{path}: not valid TOML: {error}") from None
    recipe = parse_recipe(data, str(path))
    return resolve_paths(recipe, path.resolve().parent)


def resolve_paths(recipe: Recipe, base: Path) -> Recipe:
    """Relative source/database paths made absolute against `base` (the recipe's folder)."""

    def absolute(value: str | None) -> str | None:
        if value is None:
            return None
        candidate = Path(value).expanduser()
        resolved = candidate if candidate.is_absolute() else base / candidate
        # Hub ids (`owner/name`) pass through when no such local path exists.
        if not resolved.exists() and HUB_ID.fullmatch(value):
            return value
        return str(resolved.resolve())

    sources = [s.model_copy(update={"path": absolute(s.path)}) for s in recipe.sources]
    caption = recipe.caption.model_copy(
        update={
            k: absolute(getattr(recipe.caption, k))
            for k in ("tags_db", "clip_bpe", "tokenizer", "tagger", "aesthetic_model")
        }
    )
    return recipe.model_copy(update={"sources": sources, "caption": caption})


def recipe_to_toml(recipe: Recipe) -> str:
    """The recipe as TOML (written beside the dataset so a run can be reproduced)."""
    lines: list[str] = []

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{value(k)} = {value(x)}" for k, x in v.items()) + " }" if v else "{}"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    def table(header: str, data: dict[str, Any], sub_tables: tuple[str, ...] = ()) -> None:
        lines.append(header)
        for key, v in data.items():
            if v is not None and key not in sub_tables:
                lines.append(f"{key} = {value(v)}")
        lines.append("")

    dumped = recipe.model_dump()
    for name in ("dataset", "caption", "edit", "curation"):
        table(f"[{name}]", dumped[name])
    for source in dumped["sources"]:
        table("[[sources]]", source, sub_tables=("caption", "edit"))
        table("[sources.caption]", source["caption"])
        table("[sources.edit]", source["edit"])
    return "\n".join(lines)
