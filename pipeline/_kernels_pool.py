"""Numba kernels for max pooling, optionally fused with a per-channel bias and a ReLU.

The kernels see their input as planes of H*W values in a 2-D array ``src``; plane t (t = n*C + c)
is ``src[row, off:off + H*W]`` where either
- layout 0 (NCHW): src is x.reshape(N*C, H*W), row = t, off = 0;
- layout 1 (the convolution's (F, N*P) GEMM output): row = c, off = n*H*W.
The forward pass records, for every output, the flat position (h*W + w) of its window's first
maximum in row-major order, which the backward pass scatters the gradient to. With ``relu``
the output is max(max(window), 0) = max over the window of relu(x), and the gradient passes
only where that output is > 0, exactly as relu followed by max pooling.
Inner loops index 1-D rows with ``np.uint64`` (no wraparound checks, see _kernels_conv).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

u64 = np.uint64


@njit(parallel=True, cache=True)
def pool_forward(src, layout, N, C, H, W, ph, pw, stride, bias, has_bias, relu, out, idx):
    """out, idx (N*C, H_out*W_out): window max of (src + bias[c]) (then ReLU), argmax positions."""
    H_out = (H - ph) // stride + 1
    W_out = (W - pw) // stride + 1
    HW = H * W
    for tt in prange(N * C):
        t = np.int64(tt)
        n = t // C
        c = t - n * C
        if layout == 0:
            s = src[t]
            off = 0
        else:
            s = src[c]
            off = n * HW
        o_t = out[t]
        i_t = idx[t]
        bc = bias[c] if has_bias else bias[0] - bias[0]
        for i in range(H_out):
            hs = i * stride
            for j in range(W_out):
                ws = j * stride
                pos = hs * W + ws
                best = s[u64(off + pos)]
                if has_bias:
                    best += bc
                bi = pos
                for a in range(ph):
                    base = (hs + a) * W + ws
                    for b_ in range(pw):
                        v = s[u64(off + base + b_)]
                        if has_bias:
                            v += bc
                        if v > best:
                            best = v
                            bi = base + b_
                if relu and not best > 0:
                    best = best - best  # +0.0, as np.maximum(x, 0)
                o = i * W_out + j
                o_t[u64(o)] = best
                i_t[u64(o)] = bi


@njit(parallel=True, cache=True)
def pool_forward_2x2(src, layout, N, C, H, W, bias, has_bias, relu, out, idx):
    """pool_forward specialised to 2x2 windows at stride 2 (the model's pool)."""
    H_out = (H - 2) // 2 + 1
    W_out = (W - 2) // 2 + 1
    HW = H * W
    for tt in prange(N * C):
        t = np.int64(tt)
        n = t // C
        c = t - n * C
        if layout == 0:
            s = src[t]
            off = 0
        else:
            s = src[c]
            off = n * HW
        o_t = out[t]
        i_t = idx[t]
        bc = bias[c] if has_bias else bias[0] - bias[0]
        for i in range(H_out):
            r0 = 2 * i * W
            r1 = r0 + W
            for j in range(W_out):
                p = 2 * j
                v0 = s[u64(off + r0 + p)]
                v1 = s[u64(off + r0 + p + 1)]
                v2 = s[u64(off + r1 + p)]
                v3 = s[u64(off + r1 + p + 1)]
                if has_bias:
                    v0 += bc
                    v1 += bc
                    v2 += bc
                    v3 += bc
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
def pool_backward(dout, idx, out, relu, layout, N, C, H, W, dst, plane_sums):
    """Scatter dout (N*C, P_out) to the recorded maxima of the planes of dst (zeroed first).

    With relu only where out > 0. plane_sums[t] gets the sum of the gradient sent to plane t.
    """
    HW = H * W
    P_out = dout.shape[1]
    for tt in prange(N * C):
        t = np.int64(tt)
        n = t // C
        c = t - n * C
        if layout == 0:
            d = dst[t]
            off = 0
        else:
            d = dst[c]
            off = n * HW
        for q in range(HW):
            d[u64(off + q)] = 0
        g_t = dout[t]
        i_t = idx[t]
        o_t = out[t]
        s = 0.0
        for o in range(P_out):
            if relu and not o_t[u64(o)] > 0:
                continue
            g = g_t[u64(o)]
            d[u64(off + i_t[u64(o)])] += g
            s += g
        plane_sums[t] = s
