"""`prep --dry-run`: the tag changes and the first captions before and after curation, in seconds.

Reads the sources' tags only (sidecars, dataset rows): no image is decoded, no tagger or aesthetic
model runs, nothing is written anywhere (embedded images stay in memory, no output folder is
claimed). The edit rules and the fold are the ones a real prep applies (train.prep.curate), so
a user can tune `[edit]` and `[curation]` and see the result before the minutes of a real run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from captioning import Post
from captioning.curation import Change, EditCounts, FoldDecisions
from captioning.tags import display_tag
from captioning.terminal import terminal_safe
from train.prep.pipeline import RowBuilder, RunOptions, _records, check_sources, load_caption_tools
from train.prep.recipe import Recipe, RecipeError
from train.prep.report import PrepStats


@dataclass
class Preview:
    """One record's caption before and after curation."""

    id: str
    before: str
    after: str
    changes: list[Change]


@dataclass
class DryRunResult:
    records: int
    untagged: int  # images without tags (a real prep would auto-tag them with a tagger)
    counts: EditCounts
    fold: FoldDecisions
    previews: list[Preview] = field(default_factory=list)


def dry_run(recipe: Recipe, captions: int = 5, shard_index: int = 0, num_shards: int = 1,
            show: bool = True) -> DryRunResult:
    """Curate the tags of every record of `recipe` and caption the first `captions` before and
    after; print the result (`show`) and return it. Writes nothing."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise RecipeError(f"--shard-index: must be in [0, {num_shards}) with --num-shards >= 1")
    kinds = check_sources(recipe)
    tools = load_caption_tools(recipe.caption, recipe.sources, models=False)
    stats = PrepStats()
    builder = RowBuilder(recipe, tools, stats)
    curator = builder.curator
    run = RunOptions(shard_index=shard_index, num_shards=num_shards)
    seen: list[tuple[str, str, Post, Post, list[Change]]] = []  # (id, source, original, edited, changes)
    records = untagged = 0
    for record, _ in _records(recipe, kinds, Path("."), None, run, stats):
        records += 1
        untagged += record.post is None
        original = builder.post_of(record)
        edited, changes = curator.edit(record.source, original)
        curator.observe(edited)
        if len(seen) < captions:
            seen.append((record.id, record.source, original, edited, changes))
    fold = curator.decide()
    result = DryRunResult(records, untagged, curator.counts, fold)
    for record_id, source_name, original, edited, changes in seen:
        source = builder.sources[source_name]
        captioner = tools.captioner(source.caption.profile or recipe.caption.profile,
                                    source.caption.max_tokens or recipe.caption.max_tokens)
        folded, fold_changes = curator.features.fold(edited, fold)
        result.previews.append(Preview(record_id, captioner.caption(original).caption.training(),
                                       captioner.caption(folded).caption.training(), changes + fold_changes))
    if show:
        print_dry_run(result, stats)
    return result


def print_dry_run(result: DryRunResult, stats: PrepStats) -> None:
    """The terminal report of a dry run (plain text: it is meant to be read and compared)."""
    out = [(f"dry run: {result.records} images listed, {len(stats.rejected)} files rejected while listing; "
            "nothing written")]
    if result.untagged:
        out.append(f"  {result.untagged} images have no tags (a real prep auto-tags them with --tagger)")
    edits = result.counts.to_json()
    labels = {"removed": "removed", "removed_by_category": "removed by category", "replaced": "replaced",
              "added": "added"}
    lines = [f"  {labels[kind]}: {display_tag(tag) if '->' not in tag else tag} x{n}"
             for kind in labels for tag, n in edits[kind].items()]
    out.append("tag changes (edit rules):" if lines else "tag changes (edit rules): none")
    out += lines
    settings = result.fold.settings
    out.append(f"fold into characters (threshold {settings.threshold:g}, at least {settings.min_images} images"
               + (", --keep-features" if settings.keep_features else "") + "):")
    if not result.fold.characters:
        out.append("  no character or trigger tags")
    for name, decision in result.fold.characters.items():
        folded = ", ".join(f"{display_tag(t)} {s:.0%}" for t, s in decision.folded.items()) or "nothing"
        out.append(f"  {display_tag(name)} ({decision.images} images): folds {folded}")
        if decision.kept:
            out.append("    kept: " + ", ".join(f"{display_tag(t)} {s:.0%}" for t, s in decision.kept.items()))
        if decision.note:
            out.append(f"    {decision.note}")
    out.append(f"first {len(result.previews)} captions, before and after:")
    for preview in result.previews:
        out.append(f"  {preview.id}")
        out.append(f"    before: {preview.before}")
        out.append(f"    after:  {preview.after}")
        gone = [f"{display_tag(c.tag)} ({c.kind})" for c in preview.changes if c.kind != "added"]
        if gone:
            out.append("    taken out: " + ", ".join(gone))
    print("\n".join(terminal_safe(line) for line in out))
