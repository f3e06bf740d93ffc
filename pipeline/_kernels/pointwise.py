"""Numba kernels for GELU and global pooling on contiguous arrays.

GELU is the exact form, x * Phi(x) with Phi(x) = (1 + erf(x / sqrt(2))) / 2, computed in the
data's dtype (erf of a float32 is float32's erf). Global pooling sees x as planes of H*W values,
src = x.reshape(N*C, H*W); the average sums each plane in float64.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

u64 = np.uint64  # unsigned indices: no wraparound checks (see conv.py)


@njit(parallel=True, cache=True)
def gelu_forward(x, out):
    """out (n,) = x * Phi(x) for x (n,)."""
    half = x.dtype.type(0.5)
    one = x.dtype.type(1.0)
    r2 = x.dtype.type(1.0 / math.sqrt(2.0))
    for i in prange(x.shape[0]):
        v = x[u64(i)]
        out[u64(i)] = half * v * (one + math.erf(v * r2))


@njit(parallel=True, cache=True)
def gelu_backward(x, dout, dx):
    """dx (n,) = dout * (Phi(x) + x * phi(x)): the derivative of gelu_forward's line."""
    half = x.dtype.type(0.5)
    one = x.dtype.type(1.0)
    r2 = x.dtype.type(1.0 / math.sqrt(2.0))
    rpi = x.dtype.type(1.0 / math.sqrt(2.0 * math.pi))
    for i in prange(x.shape[0]):
        v = x[u64(i)]
        cdf = half * (one + math.erf(v * r2))
        pdf = rpi * math.exp(-half * v * v)
        dx[u64(i)] = dout[u64(i)] * (cdf + v * pdf)


@njit(parallel=True, cache=True)
def global_avg_forward(src, out):
    """out (N*C,) = the float64 mean of each plane of src (N*C, HW), rounded to out's dtype."""
    M = src.shape[1]
    for t in prange(src.shape[0]):
        r = src[t]
        s = 0.0
        for p in range(M):
            s += r[u64(p)]
        out[t] = s / M


@njit(parallel=True, cache=True)
def global_avg_backward(dout, dx):
    """dx (N*C, HW) = dout (N*C,) / HW: global_avg_forward's mean spread back evenly."""
    M = dx.shape[1]
    for t in prange(dx.shape[0]):
        g = dout[t] / M
        r = dx[t]
        for p in range(M):
            r[u64(p)] = g


@njit(parallel=True, cache=True)
def global_max_forward(src, out, idx):
    """out, idx (N*C,): each plane of src (N*C, HW)'s maximum and the position of its first."""
    M = src.shape[1]
    for t in prange(src.shape[0]):
        r = src[t]
        best = r[0]
        bi = 0
        for p in range(1, M):
            v = r[u64(p)]
            if v > best:
                best = v
                bi = p
        out[t] = best
        idx[t] = bi


@njit(parallel=True, cache=True)
def global_max_backward(dout, idx, dx):
    """dx (N*C, HW): dout (N*C,) at each plane's maximum idx, zero elsewhere."""
    M = dx.shape[1]
    z = dx.dtype.type(0.0)
    for t in prange(dx.shape[0]):
        r = dx[t]
        for p in range(M):
            r[u64(p)] = z
        r[u64(idx[t])] = dout[t]
