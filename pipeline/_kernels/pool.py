"""Numba kernels for max pooling, optionally fused with a ReLU.

The kernels see their input as planes of H*W values: src is x.reshape(N*C, H*W). The forward
pass records, for every output, the flat position (h*W + w) of its window's first maximum in
row-major order, which the backward pass scatters the gradient to. With ``relu`` the output
is max(max(window), 0) = max over the window of relu(x), and the gradient passes only where
that output is > 0, exactly as relu followed by max pooling.
Inner loops index 1-D rows with ``np.uint64`` (no wraparound checks, see conv.py).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

u64 = np.uint64


@njit(parallel=True, cache=True)
def pool_forward(src, H, W, ph, pw, stride, relu, out, idx):
    """out, idx (N*C, H_out*W_out): window max of the planes src (N*C, H*W) (then ReLU), argmax."""
    H_out = (H - ph) // stride + 1
    W_out = (W - pw) // stride + 1
    for t in prange(src.shape[0]):
        s = src[t]
        o_t = out[t]
        i_t = idx[t]
        for i in range(H_out):
            hs = i * stride
            for j in range(W_out):
                ws = j * stride
                pos = hs * W + ws
                best = s[u64(pos)]
                bi = pos
                for a in range(ph):
                    base = (hs + a) * W + ws
                    for b_ in range(pw):
                        v = s[u64(base + b_)]
                        if v > best:
                            best = v
                            bi = base + b_
                if relu and not best > 0:
                    best = best - best  # +0.0, as np.maximum(x, 0)
                o = i * W_out + j
                o_t[u64(o)] = best
                i_t[u64(o)] = bi


@njit(parallel=True, cache=True)
def pool_forward_2x2(src, H, W, relu, out, idx):
    """pool_forward specialised to 2x2 windows at stride 2 (the model's pool)."""
    H_out = (H - 2) // 2 + 1
    W_out = (W - 2) // 2 + 1
    for t in prange(src.shape[0]):
        s = src[t]
        o_t = out[t]
        i_t = idx[t]
        for i in range(H_out):
            r0 = 2 * i * W
            r1 = r0 + W
            for j in range(W_out):
                p = 2 * j
                v0 = s[u64(r0 + p)]
                v1 = s[u64(r0 + p + 1)]
                v2 = s[u64(r1 + p)]
                v3 = s[u64(r1 + p + 1)]
                best = v0
                bi = r0 + p
                if v1 > best:
                    best = v1
                    bi = r0 + p + 1
                if v2 > best:
                    best = v2
                    bi = r1 + p
                if v3 > best:
                    best = v3
                    bi = r1 + p + 1
                if relu and not best > 0:
                    best = best - best  # +0.0, as np.maximum(x, 0)
                o = i * W_out + j
                o_t[u64(o)] = best
                i_t[u64(o)] = bi


@njit(parallel=True, cache=True)
def pool_backward(dout, idx, out, relu, dst):
    """Scatter dout (N*C, P_out) to the recorded maxima of the planes dst (N*C, H*W), zeroed
    first; with relu only where out > 0."""
    HW = dst.shape[1]
    P_out = dout.shape[1]
    for t in prange(dst.shape[0]):
        d = dst[t]
        for q in range(HW):
            d[u64(q)] = 0
        g_t = dout[t]
        i_t = idx[t]
        o_t = out[t]
        for o in range(P_out):
            if relu and not o_t[u64(o)] > 0:
                continue
            d[u64(i_t[u64(o)])] += g_t[u64(o)]
