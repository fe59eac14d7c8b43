"""What a LoRA's trigger tags already mean: the tags prep folded into them, in the file's metadata.

Prep leaves a character's constant features (hair colour, outfit, ...) out of its captions, so
the LoRA learns them as part of the character's tag (captioning.curation); the prep output
records them (`manifest.json`, train.prep.manifest). The exporter writes them into the LoRA's
safetensors header, and `sample` reads them back to say, before generating, that prompting the
trigger already brings those tags:

- `ss_folded_tags`: JSON `{"trigger tag": ["folded tag", ...]}`, tags in training-caption form;
- `modelspec.trigger_phrase`: the trigger tags in prompt form (parentheses escaped), the
  ModelSpec key that ComfyUI and WebUI LoRA managers show as the words to prompt.

No torch here: the metadata is plain strings.
"""

from __future__ import annotations

import json

from captioning.tags import escape_prompt

FOLDED_TAGS_KEY = "ss_folded_tags"
TRIGGER_PHRASE_KEY = "modelspec.trigger_phrase"


def trigger_metadata(features: dict[str, list[str]]) -> dict[str, str]:
    """The header keys for `{trigger: [folded tags]}` (none when nothing was folded)."""
    if not features:
        return {}
    return {FOLDED_TAGS_KEY: json.dumps(features, ensure_ascii=False),
            TRIGGER_PHRASE_KEY: ", ".join(escape_prompt(trigger) for trigger in features)}


def folded_tags(metadata: dict[str, str]) -> dict[str, list[str]]:
    """`{trigger: [folded tags]}` from a LoRA's header metadata; empty when absent or malformed
    (a LoRA from elsewhere is untrusted: only a JSON object of string lists is read)."""
    try:
        found = json.loads(metadata.get(FOLDED_TAGS_KEY) or "{}")
    except ValueError:
        return {}
    if not isinstance(found, dict):
        return {}
    return {str(trigger): [str(t) for t in tags] for trigger, tags in found.items()
            if isinstance(tags, list) and all(isinstance(t, str) for t in tags)}


def trigger_lines(features: dict[str, list[str]]) -> list[str]:
    """One line per trigger: `herta (honkai: star rail): this trigger already means: blonde hair, ...`."""
    return [f"{trigger}: this trigger already means: {', '.join(tags)}" for trigger, tags in features.items() if tags]
