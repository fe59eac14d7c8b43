"""The documentation points only at what a clone has: links, headings and cited files exist.

Cheap static checks over the repository's text files: every relative Markdown link in the README,
docs/ and bench/ names an existing file (and, with `#anchor`, a heading of that file, slugged as
GitHub does); every repository file a page, a config or a docstring cites by its path (a `.py`,
`.md` or `.toml` file under train, captioning, tests, bench or docs) exists; nothing refers to the
sibling folder outside the repository that a user's clone does not have.
"""

from __future__ import annotations

import os
import re
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SKIP_DIRS = {"out", "build", "node_modules", "__pycache__", "results"}  # and every dot-folder (.venv, .git)


def _files(*suffixes: str) -> list[Path]:
    """The repository's files ending in `suffixes`, without walking into .venv, .git or outputs."""
    found = []
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not (d.startswith(".") or d in SKIP_DIRS or d.endswith(".egg-info"))]
        found += [Path(folder, name) for name in files if name.endswith(suffixes)]
    return sorted(found)


MARKDOWN = _files(".md")
SOURCES = _files(".py", ".toml", ".md", "Makefile")

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# A repository file cited in backticks or plain text: a top-level folder of ours, then a path.
CITED = re.compile(r"(?<![\w./-])((?:train|captioning|tests|bench|docs)/[\w./-]+\.(?:py|md|toml))")
FENCE = re.compile(r"^\s*(```|~~~)")


PLACEHOLDER = re.compile(r"/(?!README\.)[A-Z_]+\.\w+$")  # `train/cli/NAME.py`: a name to fill in


@cache
def anchors(path: Path) -> set[str]:
    """The heading anchors GitHub gives a Markdown file: lowercase, punctuation but `-` and `_`
    removed, spaces as hyphens, repeats numbered `-1`, `-2`, ... (headings in code blocks skipped)."""
    seen: dict[str, int] = {}
    found = set()
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_code = not in_code
            continue
        match = None if in_code else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def _links(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)  # links inside code blocks are not links
    return [target for target in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", target)]


@pytest.mark.parametrize("page", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_reach_existing_files_and_headings(page):
    broken = []
    for target in _links(page):
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        if not linked.exists() or not linked.is_relative_to(REPO):
            broken.append(f"{target}: no such file in the repository")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading '#{anchor}' in {linked.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def test_cited_repository_files_exist():
    missing = []
    for source in SOURCES:
        for cited in set(CITED.findall(source.read_text(encoding="utf-8", errors="replace"))):
            if not PLACEHOLDER.search(cited) and not (REPO / cited).exists():
                missing.append(f"{source.relative_to(REPO)} cites {cited}")
    assert not missing, "\n".join(sorted(missing))


def test_nothing_refers_to_files_outside_the_repository():
    outside = re.compile(r"\.\./" + "shared|/work/" + "shared")  # split so this file does not match itself
    found = [str(p.relative_to(REPO)) for p in SOURCES
             if outside.search(p.read_text(encoding="utf-8", errors="replace"))]
    assert not found, found


def test_the_readme_is_a_guide():
    """The README stays short and links into docs/; measured figures live in bench/RESULTS.md."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 220
    for page in sorted((REPO / "docs").glob("*.md")):
        assert f"docs/{page.name}" in readme, f"the README does not link docs/{page.name}"
    assert "make demo" in readme and "make test" in readme
