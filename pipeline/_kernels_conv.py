"""Numba kernels for the convolution: im2col / col2im and the layout changes around the GEMMs.

Layout: the columns of a convolution are one matrix ``cols`` of shape (K, N*P) with
K = C*HH*WW filter taps and P = H_out*W_out output pixels per image; column n*P + p holds the
receptive field of output pixel p of image n. Then

    out2 = w2 @ cols            (F, N*P)    forward, one GEMM
    dw2  = dout2 @ cols.T       (F, K)      backward
    dcols = w2.T @ dout2        (K, N*P)    backward, only when dx is wanted

where ``w2 = w.reshape(F, K)`` and ``dout2`` is dout in the same (F, N*P) layout. The kernels
here move data between that layout and NCHW, fusing the bias, the ReLU and the bias gradient
into those passes. All are ``parallel=True`` (``prange``) and ``cache=True``.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True)
def im2col(x, HH, WW, stride, pad, H_out, W_out, cols):
    """Fill cols (C*HH*WW, N*H_out*W_out) from x (N, C, H, W), zeros where the window is in the padding."""
    N, C, H, W = x.shape
    P = H_out * W_out
    KK = HH * WW
    K = C * KK
    for t in prange(N * K):
        n = t // K
        k = t - n * K
        c = k // KK
        r = k - c * KK
        kh = r // WW
        kw = r - kh * WW
        # output columns whose input column wo*stride + kw - pad lies inside [0, W)
        w_lo = max(0, (pad - kw + stride - 1) // stride)
        w_hi = min(W_out, (W - 1 + pad - kw) // stride + 1)
        if w_hi < w_lo:
            w_hi = w_lo
        base = n * P
        for ho in range(H_out):
            h = ho * stride + kh - pad
            row = base + ho * W_out
            if h < 0 or h >= H:
                for wo in range(W_out):
                    cols[k, row + wo] = 0
            else:
                for wo in range(w_lo):
                    cols[k, row + wo] = 0
                off = kw - pad
                for wo in range(w_lo, w_hi):
                    cols[k, row + wo] = x[n, c, h, wo * stride + off]
                for wo in range(w_hi, W_out):
                    cols[k, row + wo] = 0


@njit(parallel=True, cache=True)
def col2im(dcols, N, C, H, W, HH, WW, stride, pad, H_out, W_out, dx):
    """dx (N, C, H, W) = sum of dcols (C*HH*WW, N*P) over the windows each input lies in (padding dropped)."""
    P = H_out * W_out
    KK = HH * WW
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        for h in range(H):
            for w_ in range(W):
                dx[n, c, h, w_] = 0
        base = n * P
        for r in range(KK):
            kh = r // WW
            kw = r - kh * WW
            k = c * KK + r
            w_lo = max(0, (pad - kw + stride - 1) // stride)
            w_hi = min(W_out, (W - 1 + pad - kw) // stride + 1)
            off = kw - pad
            for ho in range(H_out):
                h = ho * stride + kh - pad
                if h < 0 or h >= H:
                    continue
                row = base + ho * W_out
                for wo in range(w_lo, w_hi):
                    dx[n, c, h, wo * stride + off] += dcols[k, row + wo]


@njit(parallel=True, cache=True)
def bias_to_nchw(out2, b, relu, out):
    """out (N, F, P) = out2 (F, N*P) + b[f], then max(., 0) when relu."""
    N, F, P = out.shape
    for t in prange(N * F):
        n = t // F
        f = t - n * F
        bf = b[f]
        src = n * P
        if relu:
            for p in range(P):
                v = out2[f, src + p] + bf
                out[n, f, p] = v if v > 0 else 0
        else:
            for p in range(P):
                out[n, f, p] = out2[f, src + p] + bf


@njit(parallel=True, cache=True)
def dout_to_2d(dout, relu_out, use_relu, dout2, db):
    """dout2 (F, N*P) = dout (N, F, P), masked by relu_out > 0 when use_relu; db[f] = sum (float64)."""
    N, F, P = dout.shape
    for f in prange(F):
        s = 0.0
        for n in range(N):
            dst = n * P
            if use_relu:
                for p in range(P):
                    v = dout[n, f, p] if relu_out[n, f, p] > 0 else 0
                    dout2[f, dst + p] = v
                    s += v
            else:
                for p in range(P):
                    v = dout[n, f, p]
                    dout2[f, dst + p] = v
                    s += v
        db[f] = s


@njit(parallel=True, cache=True)
def row_sums(a, out):
    """out[f] = sum of row f of a (float64 accumulator)."""
    F, M = a.shape
    for f in prange(F):
        s = 0.0
        for j in range(M):
            s += a[f, j]
        out[f] = s
