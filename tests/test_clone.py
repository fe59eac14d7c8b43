"""A clone with nothing beside it: the demo's caption and prep steps run offline.

The repository's code and the sample dataset are copied into an empty temporary folder (no sibling
`shared` folder, no Hugging Face cache, an unreachable Hub) and run from there in a fresh process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.heavy  # clones, captions and preps end to end: left out of `make test-fast`

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys
from pathlib import Path
import captioning, train
clone = Path.cwd()
assert Path(captioning.__file__).is_relative_to(clone), captioning.__file__  # not the installed copy
from train.cli import main
from train.cli.demo import prep_sample

caption = main(["caption", "datasets/sample", "-o", "out/captions.jsonl"])
prep = prep_sample(clone / "out" / "sample_prep")
print(json.dumps({"caption": caption, "prep": prep, "torch": "torch" in sys.modules}))
"""


def _copy_clone(target: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("captioning", "train"):
        shutil.copytree(REPO / folder, target / folder, ignore=ignore)
    shutil.copytree(REPO / "datasets" / "sample", target / "datasets" / "sample", ignore=ignore)
    shutil.copy2(REPO / "datasets" / "sample.toml", target / "datasets" / "sample.toml")


def test_clone_captions_and_preps_offline(tmp_path):
    clone = tmp_path / "clone" / "animagine-lora"
    _copy_clone(clone)
    assert not (clone.parent / "shared").exists()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(PYTHONPATH=str(clone), HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"),
               XDG_CACHE_HOME=str(tmp_path / "cache"))  # no cached tokenizer or Hub files either
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=clone, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"caption": 0, "prep": 0, "torch": False}, done.stderr[-3000:]
    captions = [json.loads(line) for line in (clone / "out" / "captions.jsonl").read_text().splitlines()]
    assert len(captions) == 14 and all(c["tokens"] > 0 for c in captions)  # the shipped vocabulary
    assert captions[0]["head"][:3] == ["1girl", "mira (animagine sample)", "animagine sample"]
    assert "danbooru_tags.csv.gz (shipped)" in done.stdout  # the caption summary names its database
    report = json.loads((clone / "out" / "sample_prep" / "report.json").read_text())
    assert report["counts"]["kept"] == 14
    assert "Hub" not in done.stderr  # nothing tried the network
