"""train.data.prefetch: micro-batches built ahead in a thread are the ones the loop would build itself."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from train.data.bucket_batches import BucketBatchSampler
from train.data.prefetch import Prefetcher, micro_batches, prefetched, sampler_position
from train.data.rows import TrainBatch


class _Data:
    """Stands in for TrainingData: a batch whose content is a function of its rows and rng."""

    def batch(self, rows, rng) -> TrainBatch:
        latents = torch.tensor([[rng.random() for _ in range(4)] for _ in rows])
        return TrainBatch(latents, [f"row{r}" for r in rows], torch.zeros(len(rows), 6), [str(r) for r in rows])


def _sampler(seed: int = 1) -> BucketBatchSampler:
    return BucketBatchSampler([(64, 64)] * 5 + [(64, 96)] * 3, [1] * 8, batch_size=2, seed=seed)


def test_prefetched_micro_batches_equal_the_loop_built_ones():
    plain = micro_batches(_sampler().batches(), _Data(), seed=3, rank=0, start=0, pin_memory=False)
    ahead = Prefetcher(micro_batches(_sampler().batches(), _Data(), seed=3, rank=0, start=0, pin_memory=False), 3)
    for _ in range(12):  # three epochs
        a, b = next(plain), next(ahead)
        assert (a.number, a.batch) == (b.number, b.batch)
        assert torch.equal(a.data.latents, b.data.latents) and a.data.ids == b.data.ids
    ahead.close()


def test_sampler_position_of_the_consumed_batch_resumes_exactly():
    """A checkpoint records the position after the last consumed batch, however far the thread ran."""
    sampler = _sampler()
    drawn = list(zip(range(7), sampler.batches()))  # 7 batches; an epoch has 3 here
    for count in range(1, 7):
        resumed = _sampler()
        resumed.load_state_dict(sampler_position(drawn[count - 1][1]))
        assert next(resumed.batches()) == drawn[count][1], count


def test_micro_batch_numbers_start_where_the_run_resumes():
    later = micro_batches(_sampler().batches(), _Data(), seed=3, rank=0, start=10, pin_memory=False)
    assert [next(later).number for _ in range(3)] == [10, 11, 12]


def test_errors_in_the_thread_reach_the_consumer():
    def source():
        yield 1
        raise OSError("latent file unreadable")

    ahead = Prefetcher(source(), 2)
    assert next(ahead) == 1
    with pytest.raises(OSError, match="latent file unreadable"):
        next(ahead)


def test_close_stops_a_thread_blocked_on_a_full_queue():
    def endless():
        n = 0
        while True:
            n += 1
            yield n

    before = threading.active_count()
    ahead = Prefetcher(endless(), 1)
    assert next(ahead) == 1
    time.sleep(0.05)
    ahead.close()
    assert threading.active_count() == before
    assert list(prefetched(iter([1, 2]), 0)) == [1, 2]  # depth 0: the source itself
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(iter([]), 0)
