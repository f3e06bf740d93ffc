"""Which images each step and each shard uses: a pure function of (seed, epoch, step).

Every epoch visits the training images in a permutation drawn from ``(seed, epoch)``; step
``i`` of the epoch takes the next ``batch_size`` of them (the last batch of an epoch may be
shorter), and the batch is cut into fixed virtual shards of ``shard_size`` images. None of
this depends on the number of workers, so the same seed gives the same shards, the same
gradients and the same parameters on any cluster, and a resumed run can recompute the data
order from the step alone.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Schedule:
    """The step plan of a run over ``n_train`` images."""

    n_train: int
    batch_size: int
    shard_size: int
    seed: int
    epochs: int
    max_steps: int | None = None

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_train / self.batch_size)

    @property
    def total_steps(self) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return self.epochs * self.steps_per_epoch

    @property
    def num_epochs(self) -> int:
        """Epochs started by the run (the last may be partial with ``max_steps``)."""
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def ends_epoch(self, step: int) -> bool:
        """Whether ``step`` is the last step of an epoch (or of the run)."""
        return (step + 1) % self.steps_per_epoch == 0 or step + 1 == self.total_steps

    def batch(self, step: int) -> np.ndarray:
        """Indices (into the train split) of the global batch of ``step``."""
        epoch, i = divmod(step, self.steps_per_epoch)
        order = epoch_permutation(self.seed, epoch, self.n_train)
        return order[i * self.batch_size : (i + 1) * self.batch_size]

    def shards(self, step: int) -> list[np.ndarray]:
        """The batch of ``step`` cut into consecutive shards of ``shard_size``
        (last may be short)."""
        return cut(self.batch(step), self.shard_size)


@functools.lru_cache(maxsize=2)
def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order in which epoch ``epoch`` visits ``n`` images: fixed by (seed, epoch). Computed
    once per epoch, not every step (it permutes all ``n`` images), and read-only."""
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    order = rng.permutation(n).astype(np.int64)
    order.flags.writeable = False
    return order


def cut(indices: np.ndarray, size: int) -> list[np.ndarray]:
    """Consecutive pieces of ``size`` (the last one shorter when ``size`` does not divide)."""
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def subset(seed: int, n: int, k: int, tag: int) -> np.ndarray:
    """A fixed sample of ``min(k, n)`` indices out of ``n``
    (e.g. images scored for train accuracy)."""
    rng = np.random.default_rng([seed, tag, 0xACC])
    return np.sort(rng.choice(n, size=min(k, n), replace=False)).astype(np.int64)
