"""Dataset prep: from raw images (+ tags) to one training-ready `datasets` dataset and a report.

Public API:
    prepare(recipe, out, RunOptions) -> PrepResult     the whole stage (train.prep.pipeline)
    load_recipe(path) -> Recipe, RecipeError            dataset recipes (train.prep.recipe)
    CARD_BUCKETS, all_buckets, closest_bucket, place    aspect buckets (train.prep.buckets)
    dry_run(recipe, captions) -> DryRunResult          tag curation preview, writes nothing (train.prep.dry_run)
    trigger_features(out) -> {trigger: [tags]}          folded tags of a prep output (train.prep.manifest)
Heavy modules (datasets, captioning) are imported by the submodules, not here.
"""

from train.prep.buckets import CARD_BUCKETS, all_buckets, closest_bucket, place
from train.prep.recipe import Recipe, RecipeError, load_recipe

__all__ = [
    "CARD_BUCKETS",
    "Recipe",
    "RecipeError",
    "all_buckets",
    "closest_bucket",
    "load_recipe",
    "place",
]
