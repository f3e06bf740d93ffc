"""Numba kernels for max pooling, optionally fused with a per-channel bias and a ReLU.

The kernels see their input as planes of H*W values in a 2-D array ``src``; plane t (t = n*C + c)
is ``src[row, off:off + H*W]`` where either
- layout 0 (NCHW): src is x.reshape(N*C, H*W), row = t, off = 0;
- layout 1 (the convolution's (F, N*P) GEMM output): row = c, off = n*H*W.
The forward pass records, for every output, the flat position (h*W + w) of its window's first
maximum in row-major order, which the backward pass scatters the gradient to. With ``relu``
the output is max(max(window), 0) = max over the window of relu(x), and the gradient passes
only where that output is > 0, exactly as relu followed by max pooling.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True)
def pool_forward(src, layout, N, C, H, W, ph, pw, stride, bias, has_bias, relu, out, idx):
    """out, idx (N*C, H_out*W_out): window max of (src + bias[c]) (then ReLU), argmax positions."""
    H_out = (H - ph) // stride + 1
    W_out = (W - pw) // stride + 1
    HW = H * W
    for tt in prange(N * C):
        t = np.int64(tt)
        n = t // C
        if layout == 0:
            row = t
            off = 0
        else:
            row = t - n * C
            off = n * HW
        c = t - n * C
        bc = bias[c] if has_bias else src[row, off] - src[row, off]
        for i in range(H_out):
            hs = i * stride
            for j in range(W_out):
                ws = j * stride
                pos = hs * W + ws
                if has_bias:
                    best = src[row, off + pos] + bc
                else:
                    best = src[row, off + pos]
                bi = pos
                for a in range(ph):
                    base = (hs + a) * W + ws
                    for b_ in range(pw):
                        if has_bias:
                            v = src[row, off + base + b_] + bc
                        else:
                            v = src[row, off + base + b_]
                        if v > best:
                            best = v
                            bi = base + b_
                if relu and not best > 0:
                    best = best - best  # +0.0, as np.maximum(x, 0)
                o = i * W_out + j
                out[t, o] = best
                idx[t, o] = bi


@njit(parallel=True, cache=True)
def pool_forward_2x2(src, layout, N, C, H, W, bias, has_bias, relu, out, idx):
    """pool_forward specialised to 2x2 windows at stride 2 (the model's pool)."""
    H_out = (H - 2) // 2 + 1
    W_out = (W - 2) // 2 + 1
    HW = H * W
    for tt in prange(N * C):
        t = np.int64(tt)
        n = t // C
        if layout == 0:
            row = t
            off = 0
        else:
            row = t - n * C
            off = n * HW
        c = t - n * C
        bc = bias[c] if has_bias else src[row, off] - src[row, off]
        for i in range(H_out):
            r0 = off + 2 * i * W
            r1 = r0 + W
            for j in range(W_out):
                p = 2 * j
                v0 = src[row, r0 + p]
                v1 = src[row, r0 + p + 1]
                v2 = src[row, r1 + p]
                v3 = src[row, r1 + p + 1]
                if has_bias:
                    v0 += bc
                    v1 += bc
                    v2 += bc
                    v3 += bc
                best = v0
                bi = 2 * i * W + p
                if v1 > best:
                    best = v1
                    bi = 2 * i * W + p + 1
                if v2 > best:
                    best = v2
                    bi = (2 * i + 1) * W + p
                if v3 > best:
                    best = v3
                    bi = (2 * i + 1) * W + p + 1
                if relu and not best > 0:
                    best = best - best  # +0.0, as np.maximum(x, 0)
                o = i * W_out + j
                out[t, o] = best
                idx[t, o] = bi


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
        if layout == 0:
            row = t
            off = 0
        else:
            row = t - n * C
            off = n * HW
        for q in range(HW):
            dst[row, off + q] = 0
        s = 0.0
        for o in range(P_out):
            if relu and not out[t, o] > 0:
                continue
            g = dout[t, o]
            dst[row, off + idx[t, o]] += g
            s += g
        plane_sums[t] = s
