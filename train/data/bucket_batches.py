"""Bucketed batch sampling: every batch from one aspect bucket, each rank a disjoint share.

An epoch is the list of *entries*: each dataset row repeated `repeats` times (sd-scripts'
repeats). Entries are grouped by bucket, shuffled with `Random(seed + epoch)`, and cut into
*global* batches of `batch_size * num_replicas` entries; each global batch is shuffled into the
epoch order and rank r takes its r-th slice. So every rank runs the same number of steps, the
ranks never draw the same entry in an epoch, and all ranks of a step share one bucket (one
latent shape, as DDP needs nothing else).

Remainders: a bucket's last partial global batch is dropped (a different part each epoch, as
`drop_last` does); a bucket with fewer entries than one global batch is padded by cycling its
own entries, so small buckets still train. Both are listed by `report()`.

Regularization (class) images, sd-scripts' `reg_data_dir`: their rows follow the training rows
(row numbers n, n+1, ...). An epoch holds as many regularization entries as training entries, as
sd-scripts balances them (`train_util.BaseDataset`: reg images are cycled until their count
matches the training images). Regularization slot k of epoch e holds reg entry (e * N + k) mod M
(N training entries, M reg entries with their repeats): a small class set is repeated, a large one
is walked through across epochs instead of always dropping the same images. The slots are
ordinary entries (numbers N..2N-1), so bucketing, disjoint ranks and resume work unchanged, and the
batch order stays a pure function of (seed, epoch).

Resuming: the batch order is a pure function of (seed, epoch), so the position is two integers
(`state_dict()`), and `batches()` skips to it.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

Bucket = tuple[int, int]  # (width, height)


@dataclass(frozen=True)
class Batch:
    """One rank's batch: entry numbers (unique within an epoch) and their dataset rows."""

    epoch: int
    index: int  # position of this batch in the epoch
    entries: tuple[int, ...]
    rows: tuple[int, ...]


class BucketBatchSampler:
    """Yields `Batch`es for one rank, epoch after epoch (see the module docstring).

    Args:
        buckets: bucket of each dataset row.
        repeats: times each row is seen per epoch (>= 1).
        batch_size: per-rank batch size.
        num_replicas, rank: the process group (accelerate's num_processes / process_index).
        seed: base seed; epoch e is shuffled with `Random(seed + e)`.
        reg_buckets, reg_repeats: the regularization rows (numbered after the training rows).

    Raises:
        ValueError: empty dataset, mismatched lengths, repeats < 1 or rank out of range.
    """

    def __init__(
        self,
        buckets: Sequence[Bucket],
        repeats: Sequence[int],
        *,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        reg_buckets: Sequence[Bucket] = (),
        reg_repeats: Sequence[int] = (),
    ) -> None:
        if len(buckets) != len(repeats) or len(reg_buckets) != len(reg_repeats):
            raise ValueError(f"{len(buckets) + len(reg_buckets)} buckets for {len(repeats) + len(reg_repeats)} repeats")
        if not buckets:
            raise ValueError("the dataset is empty: nothing to sample")
        if any(r < 1 for r in [*repeats, *reg_repeats]):
            raise ValueError("repeats must be >= 1 for every row")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside 0..{num_replicas - 1}")
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.position = 0  # batches of `epoch` already yielded
        self.entry_rows: list[int] = [row for row, r in enumerate(repeats) for _ in range(r)]  # training entries
        self._reg_rows: list[int] = [len(buckets) + row for row, r in enumerate(reg_repeats) for _ in range(r)]
        self._buckets = [tuple(b) for b in [*buckets, *reg_buckets]]

    def epoch_rows(self, epoch: int) -> list[int]:
        """Row of each entry of `epoch`: the training entries, then the regularization slots."""
        n, m = len(self.entry_rows), len(self._reg_rows)
        if not m:
            return self.entry_rows
        return self.entry_rows + [self._reg_rows[(epoch * n + k) % m] for k in range(n)]

    def _by_bucket(self, epoch: int) -> dict[Bucket, list[int]]:
        by_bucket: dict[Bucket, list[int]] = defaultdict(list)
        for entry, row in enumerate(self.epoch_rows(epoch)):
            by_bucket[self._buckets[row]].append(entry)
        return by_bucket

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_replicas

    def __len__(self) -> int:
        """Batches in the current epoch (the same on every rank)."""
        g = self.global_batch_size
        return sum(max(1, len(entries) // g) for entries in self._by_bucket(self.epoch).values())

    def report(self) -> list[str]:
        """Human-readable lines about padded and truncated buckets (empty when all divide evenly)."""
        g = self.global_batch_size
        lines = []
        for (w, h), entries in sorted(self._by_bucket(self.epoch).items()):
            n = len(entries)
            if n < g:
                lines.append(
                    f"bucket {w}x{h}: {n} entries < global batch {g}; its batch repeats entries"
                )
            elif n % g:
                lines.append(f"bucket {w}x{h}: {n % g} of {n} entries skipped per epoch (not the same ones)")
        return lines

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All global batches of `epoch` (entry numbers), in epoch order; pure in (seed, epoch)."""
        rng = random.Random(self.seed + epoch)
        g = self.global_batch_size
        global_batches = []
        by_bucket = self._by_bucket(epoch)
        for bucket in sorted(by_bucket):
            entries = list(by_bucket[bucket])
            rng.shuffle(entries)
            if len(entries) < g:
                entries = [entries[i % len(entries)] for i in range(g)]
            global_batches += [entries[i : i + g] for i in range(0, len(entries) - g + 1, g)]
        rng.shuffle(global_batches)
        return global_batches

    def batches(self) -> Iterator[Batch]:
        """This rank's batches from the saved position on, forever (epochs roll over)."""
        while True:
            global_batches, rows = self.epoch_batches(self.epoch), self.epoch_rows(self.epoch)
            while self.position < len(global_batches):
                start = self.rank * self.batch_size
                entries = tuple(global_batches[self.position][start : start + self.batch_size])
                batch = Batch(self.epoch, self.position, entries, tuple(rows[e] for e in entries))
                self.position += 1
                yield batch
            self.epoch += 1
            self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
