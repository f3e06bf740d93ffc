"""The fixed shuffled order every split is stored in: a splitmix64 permutation that depends on
``(n, seed, stream)`` alone, with every NumPy version (``shuffle_order``), and the source rows
of each split in that order (``split_rows``)."""

from __future__ import annotations

import numpy as np

SHUFFLE_SEED = 0


#: the stream of :func:`shuffle_order` each ordering draws from
STREAMS = {"pool": 0, "train": 1, "val": 2, "test": 3}


_MASK = (1 << 64) - 1


_GAMMA = 0x9E3779B97F4A7C15


def _mix64(x):
    """splitmix64's finalizer, on Python ints or uint64 arrays (wrapping)."""
    if isinstance(x, int):
        x ^= x >> 30
        x = (x * 0xBF58476D1CE4E5B9) & _MASK
        x ^= x >> 27
        x = (x * 0x94D049BB133111EB) & _MASK
        return x ^ (x >> 31)
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def shuffle_order(n: int, seed: int, stream: int) -> np.ndarray:
    """A permutation of ``range(n)`` (int64 (n,)) that depends on ``(n, seed, stream)``
    alone, with every NumPy version: the indices sorted by the splitmix64 sequence started
    from ``(seed, stream)``."""
    start = _mix64(((seed & _MASK) * _GAMMA + stream) & _MASK)
    with np.errstate(over="ignore"):
        steps = np.arange(1, n + 1, dtype=np.uint64) * np.uint64(_GAMMA)
        keys = _mix64(steps + np.uint64(start))
    return np.argsort(keys, kind="stable").astype(np.int64)


def split_rows(
    n_pool: int, n_test: int, val: int, seed: int = SHUFFLE_SEED, *, shuffle_pool: bool
) -> dict[str, np.ndarray]:
    """Source rows of each split in stored order: {"train", "val": rows of the train source
    (int64), "test": rows of the test source}.

    The pool is the train source in its order, shuffled first (stream 0) if ``shuffle_pool``
    (an image folder, listed by class); val is its last ``val`` rows, train the others. Each
    split is then stored in ``shuffle_order(n, seed, stream)`` order (train 1, val 2,
    test 3). Train and val are disjoint and together the whole pool.
    """
    pool = np.arange(n_pool, dtype=np.int64)
    if shuffle_pool:
        pool = pool[shuffle_order(n_pool, seed, STREAMS["pool"])]
    n_train = n_pool - val
    parts = {
        "train": pool[:n_train],
        "val": pool[n_train:],
        "test": np.arange(n_test, dtype=np.int64),
    }
    return {
        split: rows[shuffle_order(len(rows), seed, STREAMS[split])] for split, rows in parts.items()
    }
