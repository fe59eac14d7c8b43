"""Rewrite booru tags into Animagine XL tag order (no torch import anywhere in this package).

Public API:
- tags: `Category`, `normalize_tag`, `display_tag`, `escape_prompt`
- `TagDatabase` (tagcomplete CSV, WD selected_tags.csv or packed), `load_tag_database` (the
  shipped Danbooru database by default, `captioning/data/`), `fetch_tag_database`
- `Post`, `Problem`: what readers yield (`captioning.readers`)
- `Caption`, `CaptionResult`; `Profile`, `load_profile`; `Captioner`
- `TokenCounter` (`from_bpe()`: the shipped CLIP vocabulary), `build_clip_tokenizer_files`
- `captioning.hub`: is the Hugging Face Hub reachable (asked once, fast)
- `captioning.curation`: edit rules (`EditRules`, `TagEditor`) and folding a character's constant
  features into its tag (`FeatureCounter`, `FoldSettings`), used by prep
- `captioning.aesthetic`: `AestheticScorer`, an image classifier for the 3.1 profile's aesthetic
  tags (imports torch and transformers only when a model is loaded)
"""

from captioning.caption import Caption, CaptionResult
from captioning.captioner import DEFAULT_MAX_TOKENS, Captioner, compute_percentiles
from captioning.post import RATINGS, Post, Problem
from captioning.profile import Profile, ProfileError, available_profiles, load_profile
from captioning.tag_db import TagDatabase, TagDatabaseError, fetch_tag_database, load_tag_database
from captioning.tags import Category, display_tag, escape_prompt, normalize_tag
from captioning.tokens import TokenCounter, TokenizerError, build_clip_tokenizer_files

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "RATINGS",
    "Caption",
    "CaptionResult",
    "Captioner",
    "Category",
    "Post",
    "Problem",
    "Profile",
    "ProfileError",
    "TagDatabase",
    "TagDatabaseError",
    "TokenCounter",
    "TokenizerError",
    "available_profiles",
    "build_clip_tokenizer_files",
    "compute_percentiles",
    "display_tag",
    "escape_prompt",
    "fetch_tag_database",
    "load_profile",
    "load_tag_database",
    "normalize_tag",
]
