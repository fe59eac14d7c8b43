"""Micro-batches built ahead of the training step, in a background thread.

The step should never wait for the disk or for Python: while the GPU runs micro-batch n, a thread
loads the cached latents of n+1 (and further, `depth` ahead), draws their captions and time ids,
and pins the latents in page-locked memory, so that the copy to the GPU is asynchronous
(`.to(device, non_blocking=True)` in `train.loop.loss_step`).

Building early changes nothing: a micro-batch's content is a pure function of its number (its
random draws come from `micro_batch_seed(seed, number, rank)`) and of the sampler's order, and the
sampler position recorded in a checkpoint is that of the last micro-batch the loop *consumed*
(`sampler_position`), not of the last one built.
"""

from __future__ import annotations

import queue
import random
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from train.data.bucket_batches import Batch
from train.data.rows import TrainBatch, TrainingData


@dataclass(frozen=True)
class MicroBatch:
    number: int  # micro-batches this rank drew before this one: step * accumulation + k
    batch: Batch  # the sampler's batch: epoch, position, entries, rows
    data: TrainBatch  # latents (pinned when asked), captions, time ids, image ids


def micro_batch_seed(seed: int, micro_batch: int, rank: int) -> int:
    """A well-mixed 63-bit seed for one rank's micro-batch (numpy SeedSequence)."""
    return int(np.random.SeedSequence([seed, micro_batch, rank]).generate_state(2, np.uint64)[0] >> 1)


def sampler_position(batch: Batch) -> dict[str, int]:
    """`BucketBatchSampler.state_dict()` as it is right after `batch` was drawn."""
    return {"epoch": batch.epoch, "position": batch.index + 1}


def micro_batches(batches: Iterable[Batch], data: TrainingData, *, seed: int, rank: int, start: int,
                  pin_memory: bool) -> Iterator[MicroBatch]:
    """The training micro-batches from number `start` on (`batches` is the sampler's iterator)."""
    for number, batch in enumerate(batches, start=start):
        train_batch = data.batch(batch.rows, random.Random(micro_batch_seed(seed, number, rank)))
        if pin_memory:
            train_batch.latents = train_batch.latents.pin_memory()
        yield MicroBatch(number, batch, train_batch)


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Prefetcher:
    """Iterates `source` in a daemon thread, up to `depth` items ahead of the consumer.

    An exception in the thread is raised by the `next()` that would have returned the failing
    item. `close()` stops the thread (it is also stopped by reaching the end of `source`).
    """

    def __init__(self, source: Iterator, depth: int) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth {depth}: must be >= 1")
        self._source = source
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="batch-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._source:
                if not self._put(item):
                    return
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(_Failure(error))
            return
        self._put(StopIteration)

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self):
        item = self._queue.get()
        if item is StopIteration:
            raise StopIteration
        if isinstance(item, _Failure):
            raise item.error
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def prefetched(source: Iterator, depth: int) -> Iterator:
    """`source` itself when `depth` is 0, else a `Prefetcher` over it."""
    return Prefetcher(source, depth) if depth > 0 else source
