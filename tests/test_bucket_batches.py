"""train.data.bucket_batches.BucketBatchSampler: one bucket per batch, repeats, disjoint ranks, resume."""

from __future__ import annotations

from collections import Counter
from itertools import islice

import pytest

from train.data.bucket_batches import BucketBatchSampler

BUCKETS = [(64, 64)] * 5 + [(64, 96)] * 3 + [(96, 64)]
REPEATS = [2] * 5 + [1] * 3 + [1]


def _epoch(sampler):
    return list(islice(sampler.batches(), len(sampler)))


def test_every_batch_from_one_bucket_and_repeats_honoured():
    sampler = BucketBatchSampler(BUCKETS, REPEATS, batch_size=1, seed=1)
    batches = _epoch(sampler)
    assert all(len({BUCKETS[r] for r in b.rows}) == 1 for b in batches)
    counts = Counter(r for b in batches for r in b.rows)
    assert [counts[r] for r in range(9)] == REPEATS  # batch size 1: nothing skipped


def test_seeded_shuffle_differs_per_epoch_and_reproduces():
    a = BucketBatchSampler(BUCKETS, REPEATS, batch_size=2, seed=7)
    b = BucketBatchSampler(BUCKETS, REPEATS, batch_size=2, seed=7)
    assert a.epoch_batches(0) == b.epoch_batches(0)
    assert a.epoch_batches(0) != a.epoch_batches(1)


def test_ranks_get_disjoint_entries_and_equal_step_counts():
    ranks = [BucketBatchSampler(BUCKETS, REPEATS, batch_size=2, num_replicas=2, rank=r, seed=3) for r in range(2)]
    epochs = [_epoch(s) for s in ranks]
    assert len(epochs[0]) == len(epochs[1]) == len(ranks[0])
    for b0, b1 in zip(*epochs):
        assert BUCKETS[b0.rows[0]] == BUCKETS[b1.rows[0]]  # same bucket on every rank per step
    seen = [{e for b in batches for e in b.entries} for batches in epochs]
    small = {e for e, row in enumerate(ranks[0].entry_rows) if BUCKETS[row] != (64, 64)}
    # Only the padded buckets (fewer entries than the global batch of 4) may show up on both ranks.
    assert seen[0] & seen[1] <= small


def test_small_buckets_are_padded_and_reported():
    sampler = BucketBatchSampler(BUCKETS, REPEATS, batch_size=2, num_replicas=2, seed=0)
    report = "\n".join(sampler.report())
    assert "bucket 96x64: 1 entries < global batch 4" in report
    assert "bucket 64x96: 3 entries < global batch 4" in report
    assert "bucket 64x64: 2 of 10 entries skipped" in report
    assert all(len(b) == 4 for b in sampler.epoch_batches(0))


def test_state_dict_resumes_mid_epoch():
    sampler = BucketBatchSampler(BUCKETS, REPEATS, batch_size=1, seed=5)
    stream = sampler.batches()
    full = [next(stream) for _ in range(20)]  # crosses into the third epoch
    again = BucketBatchSampler(BUCKETS, REPEATS, batch_size=1, seed=5)
    stream = again.batches()
    _ = [next(stream) for _ in range(13)]
    resumed = BucketBatchSampler(BUCKETS, REPEATS, batch_size=1, seed=5)
    resumed.load_state_dict(again.state_dict())
    assert list(islice(resumed.batches(), 7)) == full[13:]


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="empty"):
        BucketBatchSampler([], [], batch_size=1)
    with pytest.raises(ValueError, match="repeats"):
        BucketBatchSampler([(64, 64)], [0], batch_size=1)
