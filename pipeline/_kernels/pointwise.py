"""Numba kernels for GELU and global pooling on contiguous arrays.

GELU is x * Phi(x) with Phi(x) = (1 + erf(x / sqrt(2))) / 2: in float64 with libm's erf; in
float32 with a rational approximation of erf that vectorizes (``gelu_*_f32``), within 1e-6 of
the exact form. Global pooling sees x as planes of H*W values,
src = x.reshape(N*C, H*W); the average sums each plane in float64.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

u64 = np.uint64  # unsigned indices: no wraparound checks (see conv.py)


# float32's erf as a rational function of x on [-4, 4] (+-1 beyond, to float32's precision):
# Eigen's and XLA's vectorizable erf (odd numerator of degree 13, even denominator of degree 8;
# no exp, no call: LLVM vectorizes the loop). Its derivative is the same rational function's.
_A = (
    -2.72614225801306e-10,
    2.77068142495902e-08,
    -2.10102402082508e-06,
    -5.69250639462346e-05,
    -7.34990630326855e-04,
    -2.95459980854025e-03,
    -1.60960333262415e-02,
)  # alpha_13, alpha_11, ..., alpha_1
_B = (
    -1.45660718464996e-05,
    -2.13374055278905e-04,
    -1.68282697438203e-03,
    -7.37332916720468e-03,
    -1.42647390514189e-02,
)  # beta_8, beta_6, ..., beta_0


@njit(inline="always")
def _erf_parts(z):
    """(p, q, dp, dq) at float32 z in [-4, 4]: erf(z) ~ p / q, and the derivatives of p, q."""
    f = np.float32
    z2 = z * z
    p = f(_A[0])
    dp = f(0.0)
    for c in _A[1:]:
        dp = dp * z2 + p  # d/d(z2) of the running polynomial in z2
        p = p * z2 + f(c)
    q = f(_B[0])
    dq = f(0.0)
    for c in _B[1:]:
        dq = dq * z2 + q
        q = q * z2 + f(c)
    # P(z) = z * p(z2): P' = p + 2 z2 p'(z2);  Q(z) = q(z2): Q' = 2 z q'(z2)
    return z * p, q, p + f(2.0) * z2 * dp, f(2.0) * z * dq


@njit(parallel=True, cache=True)
def gelu_forward_f32(x, out):
    """out (n,) = x * Phi(x) for float32 x (n,), Phi through the rational erf."""
    half = np.float32(0.5)
    r2 = np.float32(1.0 / math.sqrt(2.0))
    for i in prange(x.shape[0]):
        v = x[u64(i)]
        z = min(max(v * r2, np.float32(-4.0)), np.float32(4.0))
        p, q, _, _ = _erf_parts(z)
        out[u64(i)] = half * v * (np.float32(1.0) + p / q)


@njit(parallel=True, cache=True)
def gelu_backward_f32(x, dout, dx):
    """dx (n,) = dout * d/dx gelu_forward_f32(x): the derivative of its line, rational erf's
    derivative inside [-4, 4] (zero outside, where the erf is clamped)."""
    half = np.float32(0.5)
    r2 = np.float32(1.0 / math.sqrt(2.0))
    for i in prange(x.shape[0]):
        v = x[u64(i)]
        zr = v * r2
        z = min(max(zr, np.float32(-4.0)), np.float32(4.0))
        p, q, dp, dq = _erf_parts(z)
        erf = p / q
        derf = (dp * q - p * dq) / (q * q) if z == zr else np.float32(0.0)
        dx[u64(i)] = dout[u64(i)] * (half * (np.float32(1.0) + erf) + half * v * derf * r2)


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
