"""Summing shard gradients in a fixed order, finishing the step gradient, combining BN moments.

The order of a floating-point sum changes its bits, so the shard gradients of a step are
always added in one fixed pairwise tree over the shard index, whoever holds them:

    level by level, neighbours are added (0+1, 2+3, ...); an odd last one moves up unchanged.

``pairwise`` applies that tree to whole arrays (as Dask tasks where the data lives, over TCP);
``finish_gradient`` applies the same tree element by element to gradient slots in shared
memory, fused with the division by the batch size and the L2 term. Both give the same bits:
IEEE addition of two numbers is the same whichever process does it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numba
import numpy as np

T = TypeVar("T")


def pairwise(items: Sequence[T], add: Callable[[T, T], T]) -> T:
    """Reduce ``items`` with ``add`` along the fixed pairwise tree (see module docstring)."""
    level = list(items)
    if not level:
        raise ValueError("pairwise: nothing to reduce")
    while len(level) > 1:
        nxt = [add(level[j], level[j + 1]) for j in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def add_arrays(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One node of the tree for flat gradient vectors (a Dask task in the TCP transport)."""
    return np.add(a, b)


@numba.njit(cache=True, nogil=True, parallel=True)
def _finish(slots, k, w, out, batch, reg):  # pragma: no cover - compiled
    n = w.shape[0]
    chunk = 8192
    nchunks = (n + chunk - 1) // chunk
    for c in numba.prange(nchunks):
        lo = c * chunk
        hi = min(n, lo + chunk)
        if k == 1:
            for i in range(lo, hi):
                out[i] = slots[0, i] / batch + reg * w[i]
        elif k == 2:
            for i in range(lo, hi):
                out[i] = (slots[0, i] + slots[1, i]) / batch + reg * w[i]
        else:
            # the tree level by level on a block copy: buf[j] = buf[2j] + buf[2j+1]
            buf = np.empty((k, hi - lo), dtype=out.dtype)
            for j in range(k):
                for i in range(lo, hi):
                    buf[j, i - lo] = slots[j, i]
            m = k
            while m > 1:
                h = m // 2
                for j in range(h):
                    for i in range(hi - lo):
                        buf[j, i] = buf[2 * j, i] + buf[2 * j + 1, i]
                if m % 2:
                    for i in range(hi - lo):
                        buf[h, i] = buf[m - 1, i]
                    m = h + 1
                else:
                    m = h
            for i in range(lo, hi):
                out[i] = buf[0, i - lo] / batch + reg * w[i]


@numba.njit(cache=True, nogil=True, parallel=True, fastmath={"reassoc"})
def _sumsq(w):  # pragma: no cover - compiled
    # fixed chunks, each summed in w's dtype (vectorized), chunk sums added in float64:
    # the same bits for any number of threads
    n = w.shape[0]
    chunk = 8192
    nchunks = (n + chunk - 1) // chunk
    partial = np.zeros(nchunks, dtype=np.float64)
    for c in numba.prange(nchunks):
        acc = w.dtype.type(0)
        for i in range(c * chunk, min(n, (c + 1) * chunk)):
            acc += w[i] * w[i]
        partial[c] = acc
    return partial.sum()


def finish_gradient(slots: np.ndarray, w: np.ndarray, out: np.ndarray, batch: int, reg: float) -> float:
    """``out = tree_sum(slots) / batch + reg * w``; returns ``sum(w**2)`` (float64).

    ``slots`` (k, P) holds the k shard gradient sums of one parameter (a single row when the
    tree was already reduced elsewhere), ``w`` (P,) the parameter, ``out`` (P,) receives its
    step gradient. Arithmetic is in ``w.dtype``; the sum of squares is for the loss's L2 term.
    """
    dt = w.dtype.type
    _finish(slots, slots.shape[0], w, out, dt(batch), dt(reg))
    return float(_sumsq(w))


@numba.njit(cache=True, nogil=True, parallel=True)
def _finish_adam2(s0, s1, k, w, m, v, batch, reg, b1, omb1, b2, omb2, bc1, bc2, lr, eps):  # pragma: no cover
    # k <= 2 shards: the tree is s0 (+ s1); then exactly optim._adam_kernel's arithmetic.
    # 1-D contiguous arrays in a prange loop, even on one thread: the form LLVM vectorizes.
    for i in numba.prange(w.shape[0]):
        s = s0[i] + s1[i] if k == 2 else s0[i]
        g = s / batch + reg * w[i]
        mi = b1 * m[i] + omb1 * g
        vi = b2 * v[i] + omb2 * (g * g)
        m[i] = mi
        v[i] = vi
        w[i] = w[i] - lr * (mi / bc1) / (np.sqrt(vi / bc2) + eps)


def adam_scalars(config: dict, dtype) -> tuple:
    """Advance Adam's step count and return its scalars cast as ``pipeline.optim.adam`` casts them."""
    config.setdefault("learning_rate", 1e-3)
    config.setdefault("beta1", 0.9)
    config.setdefault("beta2", 0.999)
    config.setdefault("epsilon", 1e-8)
    config.setdefault("t", 0)
    config["t"] += 1
    t, b1, b2 = config["t"], config["beta1"], config["beta2"]
    f = np.dtype(dtype).type
    return (f(b1), f(1 - b1), f(b2), f(1 - b2), f(1 - b1**t), f(1 - b2**t),
            f(config["learning_rate"]), f(config["epsilon"]))


def finish_and_adam(slots: np.ndarray, w: np.ndarray, m: np.ndarray, v: np.ndarray, batch: int,
                    segments: list[tuple[int, int, float]], scalars: tuple) -> None:
    """:func:`finish_gradient` followed by Adam, fused in one pass over memory, for k <= 2 slots.

    ``segments``: (start, stop, reg) of each parameter in the flat vectors. Bit for bit
    ``finish_gradient(slots[:, a:b], w[a:b], g[a:b], batch, reg)`` for each, then
    ``adam_inplace(w, g, config)`` (a test holds it to that); ``scalars`` from
    :func:`adam_scalars`, once per step.
    """
    if slots.shape[0] > 2:
        raise ValueError("finish_and_adam: at most two gradient slots")
    dt = w.dtype.type
    k = slots.shape[0]
    for a, b, reg in segments:
        s0 = np.ascontiguousarray(slots[0, a:b])
        s1 = np.ascontiguousarray(slots[k - 1, a:b])
        _finish_adam2(s0, s1, k, w[a:b], m[a:b], v[a:b], dt(batch), dt(reg), *scalars)


def sumsq(w: np.ndarray) -> float:
    """``sum(w**2)`` for the loss's L2 term (fixed chunks: the same bits for any thread count)."""
    return float(_sumsq(w))


def combine_moments(means: Sequence[np.ndarray], variances: Sequence[np.ndarray],
                    counts: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (biased) variance of the union of shards, from their own moments.

    Exact in exact arithmetic: ``var = sum n_i (var_i + (mean_i - mean)**2) / N``; computed in
    float64 and returned in the shards' dtype.
    """
    dtype = np.asarray(means[0]).dtype
    n = np.asarray(counts, dtype=np.float64)
    mu = np.stack([np.asarray(m, dtype=np.float64) for m in means])
    var = np.stack([np.asarray(v, dtype=np.float64) for v in variances])
    total = n.sum()
    mean = (n[:, None] * mu).sum(0) / total
    variance = (n[:, None] * (var + (mu - mean) ** 2)).sum(0) / total
    return mean.astype(dtype), variance.astype(dtype)


def update_running(running: np.ndarray, batch_stat: np.ndarray, momentum: float) -> np.ndarray:
    """cs231n's running-average update, once per step: ``momentum * running + (1 - momentum) * stat``."""
    return (momentum * running + (1 - momentum) * batch_stat).astype(running.dtype)
