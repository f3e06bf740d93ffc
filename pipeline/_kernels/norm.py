"""Numba kernels for spatial batch norm and group norm on contiguous NCHW data.

Sums and means accumulate in float64 whatever the data's dtype; the per-element arithmetic
runs in the data's dtype, following the naive layers' formulas:
    xhat = (x - mean) / std,  out = gamma * xhat + beta,
    dx = gamma / (M * std) * (M * dout - sum(dout) - xhat * sum(dout * xhat))
with M the number of values normalized together.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

u64 = np.uint64  # unsigned indices: no wraparound checks, vectorized loops (see conv.py)
# let LLVM reorder the float64 sums (vectorized reductions); no other fast-math assumption
REASSOC = {"reassoc"}


# ---------------------------------------------------------------- spatial batch norm: x (N, C, HW)


@njit(parallel=True, cache=True, fastmath=REASSOC)
def bn_stats(x, mean, var):
    """Per-channel mean and biased variance of x (N, C, HW), two passes, float64."""
    N, C, M = x.shape
    inv = 1.0 / (N * M)
    for c in prange(C):
        s = 0.0
        for n in range(N):
            r = x[n, c]
            for p in range(M):
                s += r[u64(p)]
        mu = s * inv
        s2 = 0.0
        for n in range(N):
            r = x[n, c]
            for p in range(M):
                d = r[u64(p)] - mu
                s2 += d * d
        mean[c] = mu
        var[c] = s2 * inv


@njit(parallel=True, cache=True)
def bn_apply(x, mean, std, gamma, beta, out):
    """out = gamma[c] * (x - mean[c]) / std[c] + beta[c], all in x's dtype."""
    N, C, M = x.shape
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        mu = mean[c]
        sd = std[c]
        g = gamma[c]
        b = beta[c]
        r = x[n, c]
        o = out[n, c]
        for p in range(M):
            o[u64(p)] = g * ((r[u64(p)] - mu) / sd) + b


@njit(parallel=True, cache=True, fastmath=REASSOC)
def bn_backward(dout, x, mean, std, gamma, count, dx, dgamma, dbeta, scratch):
    """Spatial batch-norm gradients; dgamma, dbeta float64 (C,).

    count: 1-element array holding N*HW in x's dtype; scratch: (C, 2) in x's dtype.
    """
    N, C, M = x.shape
    for c in prange(C):
        mu = mean[c]
        sd = std[c]
        s1 = 0.0
        s2 = 0.0
        for n in range(N):
            r = x[n, c]
            dr = dout[n, c]
            for p in range(M):
                d = dr[u64(p)]
                s1 += d
                s2 += d * ((r[u64(p)] - mu) / sd)
        dgamma[c] = s2
        dbeta[c] = s1
        scratch[c, 0] = s1
        scratch[c, 1] = s2
        sd1 = scratch[c, 0]
        sd2 = scratch[c, 1]
        NM = count[0]
        k = gamma[c] / (NM * sd)
        for n in range(N):
            r = x[n, c]
            dr = dout[n, c]
            o = dx[n, c]
            for p in range(M):
                xh = (r[u64(p)] - mu) / sd
                o[u64(p)] = k * (NM * dr[u64(p)] - sd1 - xh * sd2)


# ---------------------------------------------------------------- group norm: x (N, G, Cg, HW)


@njit(parallel=True, cache=True, fastmath=REASSOC)
def gn_forward(x, gamma, beta, eps, out, mean, std):
    """Group norm forward; mean/std (N, G) in x's dtype."""
    N, G, Cg, M = x.shape
    inv = 1.0 / (Cg * M)
    for t in prange(N * G):
        n = t // G
        g = t - n * G
        s = 0.0
        for cc in range(Cg):
            r = x[n, g, cc]
            for p in range(M):
                s += r[u64(p)]
        mu64 = s * inv
        s2 = 0.0
        for cc in range(Cg):
            r = x[n, g, cc]
            for p in range(M):
                d = r[u64(p)] - mu64
                s2 += d * d
        mean[n, g] = mu64
        std[n, g] = np.sqrt(s2 * inv + eps)
        mu = mean[n, g]
        sd = std[n, g]
        for cc in range(Cg):
            c = g * Cg + cc
            gm = gamma[c]
            bt = beta[c]
            r = x[n, g, cc]
            o = out[n, g, cc]
            for p in range(M):
                o[u64(p)] = gm * ((r[u64(p)] - mu) / sd) + bt


@njit(parallel=True, cache=True, fastmath=REASSOC)
def gn_backward(dout, x, mean, std, gamma, count, dx, dgamma_part, dbeta_part, scratch):
    """Group norm backward; per-(n, c) partial parameter gradients (float64) to sum over n.

    count: 1-element array holding Cg*HW in x's dtype; scratch: (N*G, 2) in x's dtype.
    """
    N, G, Cg, M = x.shape
    for t in prange(N * G):
        n = t // G
        g = t - n * G
        mu = mean[n, g]
        sd = std[n, g]
        s1 = 0.0
        s2 = 0.0
        for cc in range(Cg):
            c = g * Cg + cc
            gm = gamma[c]
            pg = 0.0
            pb = 0.0
            r = x[n, g, cc]
            dr = dout[n, g, cc]
            for p in range(M):
                d = dr[u64(p)]
                xh = (r[u64(p)] - mu) / sd
                pg += d * xh
                pb += d
            dgamma_part[n, c] = pg
            dbeta_part[n, c] = pb
            s1 += gm * pb
            s2 += gm * pg
        scratch[t, 0] = s1
        scratch[t, 1] = s2
        s1t = scratch[t, 0]
        s2t = scratch[t, 1]
        GM = count[0]
        den = GM * sd
        for cc in range(Cg):
            gm = gamma[g * Cg + cc]
            r = x[n, g, cc]
            dr = dout[n, g, cc]
            o = dx[n, g, cc]
            for p in range(M):
                xh = (r[u64(p)] - mu) / sd
                o[u64(p)] = (GM * (dr[u64(p)] * gm) - s1t - xh * s2t) / den
