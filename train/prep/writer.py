"""Writing the prepped dataset: rows -> Arrow via `Dataset.from_generator`, then atomic publish.

Rows are first appended to a JSONL spool file as they are produced, so nothing holds the whole
dataset in memory; `Dataset.from_generator` then writes Arrow shards from the spool and
`save_to_disk` writes the final folder. The whole output is built in a temporary folder beside
OUT and renamed into place only when complete (`publish`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
from captioning import outputs
from train.names import DATASET_COLUMNS

# The prepped dataset's columns (train.names.DATASET_COLUMNS, which the trainer reads) as Arrow types.
_ARROW_TYPES = {"string": datasets.Value("string"), "int32": datasets.Value("int32"),
                "int64": datasets.Value("int64"), "list": datasets.Sequence(datasets.Value("string"))}
FEATURES = datasets.Features({name: _ARROW_TYPES[kind] for name, kind in DATASET_COLUMNS.items()})


class Spool:
    """Append-only JSONL file in the temp folder: records written once, read back in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Held open across many appends; closed by `close()` (the spool lives in the temp folder).
        self._handle = open(path, "w", encoding="utf-8")  # noqa: SIM115
        self.count = 0

    def append(self, record: dict[str, Any]) -> None:
        with outputs.output_errors(self.path):  # ENOSPC while spooling: one line, not a traceback
            self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.count += 1

    def close(self) -> None:
        self._handle.close()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The records, once the spool is closed."""
        return _rows(str(self.path))


class RowSpool(Spool):
    """Spool of dataset rows (every column of FEATURES), read back by the Arrow writer."""

    def append(self, row: dict[str, Any]) -> None:
        missing = set(FEATURES) - set(row)
        if missing:
            raise ValueError(f"row {row.get('id')!r} lacks columns {sorted(missing)}")
        super().append(row)


def _rows(spool: str) -> Iterator[dict[str, Any]]:
    with open(spool, encoding="utf-8") as handle:
        for line in handle:
            yield json.loads(line)


def write_dataset(spool: Path, out_dir: Path, cache_dir: Path) -> int:
    """Arrow dataset at `out_dir` from the spool (an empty dataset when there are no rows)."""
    if spool.stat().st_size == 0:
        dataset = datasets.Dataset.from_dict({name: [] for name in FEATURES}, features=FEATURES)
    else:
        dataset = datasets.Dataset.from_generator(
            _rows, gen_kwargs={"spool": str(spool)}, features=FEATURES, cache_dir=str(cache_dir)
        )
    dataset.save_to_disk(str(out_dir))
    return len(dataset)


def make_temp_dir(out: Path) -> Path:
    """A fresh temporary folder beside `out`, with the normal folder mode (`captioning.outputs`)."""
    return outputs.temp_dir(out)


# Folders later stages write inside OUT, kept across re-preps: the latent cache is keyed by
# sha256 + geometry + VAE (train.data.latents), so entries stay valid for rows that did not change.
CARRIED_OVER = ("latents",)


def publish(temp: Path, out: Path) -> None:
    """Rename the complete `temp` folder to `out`, replacing a previous result.

    `CARRIED_OVER` folders of the previous result move into the new one first.

    A directory cannot be os.replace'd onto a non-empty one, so an old result is first moved
    aside; at every instant either the old or the new complete result is at a known path.
    """
    old = None
    for name in CARRIED_OVER:
        if (out / name).is_dir() and not (temp / name).exists():
            os.replace(out / name, temp / name)
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "previous")
    os.replace(temp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

