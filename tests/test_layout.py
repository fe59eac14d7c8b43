"""The train/ package layering: imports point down only (train/__init__.py draws the layers)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

TRAIN = Path(__file__).resolve().parents[1] / "train"

# Higher may import lower; equal ranks may not import each other. Rank -1 is the foundation every
# layer may use: `names` (shared contracts), `config` (the schema), `diffusion` (pure math),
# `tensor_files`; `prep` stands apart (it uses captioning, the foundation and libraries only).
RANK = {"model": 0, "data": 1, "lora": 1, "generate": 2, "evaluate": 3, "runtime": 4, "top": 5,
        "names": -1, "config": -1, "diffusion": -1, "tensor_files": -1, "prep": -1}



def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "train":
        return None
    if len(parts) == 1:
        return "top"
    return parts[1] if parts[1] in RANK else "top"


def _imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize("path", sorted(TRAIN.rglob("*.py")), ids=lambda p: str(p.relative_to(TRAIN)))
def test_imports_point_down(path):
    me = _layer(".".join(("train", *path.relative_to(TRAIN).with_suffix("").parts)))
    for module in _imports(path):
        other = _layer(module)
        if other is None or other == me or me == "top":
            continue
        assert RANK[other] < RANK[me] or RANK[other] == -1, f"{path.name} ({me}) imports {module} ({other})"


def test_config_check_and_the_command_line_load_no_torch():
    """Validating a config (`train --check`) and starting any command import neither torch nor diffusers."""
    code = ("import sys, train.names, train.config, train.preflight, train.cli, train.cli.train, train.cli.cache, "
            "train.cli.caption, train.cli.prep, train.cli.config, train.recipe_import; print(sorted({'torch', 'diffusers', 'datasets'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], cwd=TRAIN.parent, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
