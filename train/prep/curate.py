"""A recipe's tag curation, applied record by record: edit rules per source, then the fold.

`Curator` holds what `captioning.curation` needs for one dataset: the edit rules of each source
(the recipe's `[edit]` table plus the source's own `[sources.edit]`, resolved through the tag
database), the per-character feature counts and, once every record has been seen, the fold
decisions. Prep runs it in two passes: `edit` + `observe` for every kept image, `decide`, then
`fold` for each image as its row is written. The dry run does the same on tags alone.
"""

from __future__ import annotations

from captioning import Post, TagDatabase, load_profile
from captioning.curation import (
    Change,
    EditCounts,
    EditRules,
    FeatureCounter,
    FoldDecisions,
    FoldSettings,
    TagEditor,
    TagResolver,
)
from train.prep.recipe import EditOptions, Recipe


def edit_rules(options: EditOptions) -> EditRules:
    return EditRules.of(options.remove_tags, options.replace_tags, options.remove_categories, options.add_tags)


def fold_settings(recipe: Recipe) -> FoldSettings:
    curation = recipe.curation
    return FoldSettings(curation.fold_threshold, curation.keep_features, tuple(curation.fold_exempt),
                        curation.fold_min_images)


class Curator:
    """Edit rules per source and the fold into characters, for one recipe."""

    def __init__(self, recipe: Recipe, tag_db: TagDatabase | None) -> None:
        self.resolver = TagResolver(tag_db)
        shared = edit_rules(recipe.edit)
        self.editors = {s.name: TagEditor(shared.merged(edit_rules(s.edit)), self.resolver) for s in recipe.sources}
        self.settings = fold_settings(recipe)
        self.features = FeatureCounter(self.resolver, load_profile(recipe.caption.profile).people_tags)
        self.counts = EditCounts()
        self.decisions: FoldDecisions | None = None

    def edit(self, source: str, post: Post) -> tuple[Post, list[Change]]:
        """The post after its source's edit rules (counted), and what changed."""
        post, changes = self.editors[source].apply(post)
        self.counts.count(changes)
        return post, changes

    def observe(self, post: Post) -> None:
        self.features.observe(post)

    def decide(self) -> FoldDecisions:
        self.decisions = self.features.decide(self.settings)
        return self.decisions

    def fold(self, post: Post) -> tuple[Post, list[Change]]:
        """The post without the features folded into its characters (counted); `decide` first."""
        if self.decisions is None:
            raise RuntimeError("Curator.fold before Curator.decide")
        post, changes = self.features.fold(post, self.decisions)
        self.counts.count(changes)
        return post, changes

    def characters(self, post: Post) -> list[str]:
        return self.features.characters_and_features(post)[0]
