"""Numba kernels for an affine layer's weight gradient with the L2 term fused in:

    dw = x2.T @ da + reg * w          dw, w (D, M)    x2 (N, D)    da (N, M)

For the hidden layer of the notebook's network (D = 8192, M = 500, N = 50) NumPy's route makes
four passes over 16 MB arrays: OpenBLAS zeroes dw, accumulates x2.T @ da into it, then
``dw += reg * w`` reads both and writes dw again. Here w is read once and dw written once, from
sums held in registers.

Layout: da is first copied into column panels of G = 4 vectors (32 float32 columns), each
contiguous in k (``pack_panels``). A task owns ROWS rows of dw; it copies its rows of x2 into
blocks of 3 rows interleaved by k, then for every block of 3 rows x one panel sums
x2[k, i] * da[k, j:j + G] over k = 0..N-1 in 12 vector registers (``_fma_3x4``: 3 broadcasts
and 4 loads per 12 FMAs) and writes ``sum + round(reg * w)`` to dw.

The micro-kernel (``_fma_3x4``, ``_zeros_3x4``) is the direct convolution's, from
_kernels_conv.py: Numba's on-disk cache checks only this file, so after editing those
helpers clear the cache (``__pycache__/_kernels_affine.*.nbi``/``.nbc``) or touch this file.

Bits: dw[i, j] is the k-ordered FMA chain over k = 0..N-1 (from 0), then one addition of the
rounded product reg * w[i, j] (``np.add(s, np.multiply(w, reg))``). Which thread or task
computes it does not change it, so the result does not depend on the thread count.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from pipeline._kernels_conv import _fma_3x4, _zeros_3x4
from pipeline._simd import lanes, vadd, vload, vmul, vsplat, vstore

#: rows of dw per task: 16 blocks of 3 (the task's x2 rows, 3 * N values per block, stay in L1)
ROWS = 48


@njit(cache=True)
def pack_panels(da, G, dap):
    """dap[(jb * N + k) * G + c] = da[k, j0 + c] with j0 = min(jb * G, M - G): da (N, M), M >= G,
    cut into column panels of G, each contiguous in k; the last panel ends at column M - 1
    (overlapping the one before it when G does not divide M)."""
    N, M = da.shape
    for jb in range((M + G - 1) // G):
        j0 = min(jb * G, M - G)
        for k in range(N):
            o = (jb * N + k) * G
            for c in range(G):
                dap[o + c] = da[k, j0 + c]


@njit(parallel=True, cache=True)
def affine_dw_l2(x2, dap, w, reg, dw):
    """dw (D, M) = x2.T @ da + reg[0] * w, da as pack_panels left it in dap; x2 (N, D), w (D, M)
    and dw C-contiguous, one dtype; M >= G = 4 vectors (32 float32 or 16 float64 columns).

    One task per ROWS rows of dw. D not a multiple of 3: the last block of a task repeats its
    last row; both the repeated row and a panel's overlapping columns are written twice with
    the same value.
    """
    N, D = x2.shape
    M = w.shape[1]
    V = lanes(x2)
    G = 4 * V
    if M < G:  # a panel would start before column 0: vstore does no bounds checks
        raise ValueError("affine_dw_l2: w needs at least 4 vectors of columns")
    nj = (M + G - 1) // G
    wf = w.reshape(-1)
    of = dw.reshape(-1)
    for t in prange((D + ROWS - 1) // ROWS):
        i_lo = t * ROWS
        i_hi = min(i_lo + ROWS, D)
        nb = (i_hi - i_lo + 2) // 3
        # xb[(b * N + k) * 3 + r] = x2[k, row r of block b]: the broadcasts of a block, in k order
        xb = np.empty(nb * N * 3, dtype=x2.dtype)
        for b in range(nb):
            i0 = i_lo + 3 * b
            i1 = min(i0 + 1, i_hi - 1)
            i2 = min(i0 + 2, i_hi - 1)
            for k in range(N):
                q = (b * N + k) * 3
                xb[q] = x2[k, i0]
                xb[q + 1] = x2[k, i1]
                xb[q + 2] = x2[k, i2]
        rg = vsplat(reg, 0)
        for b in range(nb):
            i0 = i_lo + 3 * b
            i1 = min(i0 + 1, i_hi - 1)
            i2 = min(i0 + 2, i_hi - 1)
            for jb in range(nj):
                j0 = min(jb * G, M - G)
                # s[r][c] = sum_k x2[k, i_r] * da[k, j0 + c*V : j0 + (c+1)*V]
                s = _zeros_3x4(x2)
                for k in range(N):
                    q = (b * N + k) * 3
                    o = (jb * N + k) * G
                    s = _fma_3x4(vsplat(xb, q), vsplat(xb, q + 1), vsplat(xb, q + 2), dap,
                                 o, o + V, o + 2 * V, o + 3 * V, s)
                _store_l2_3x4(of, wf, rg, i0 * M + j0, i1 * M + j0, i2 * M + j0, V, s)


@njit(cache=True, inline="always")
def _store_l2_3x4(of, wf, rg, p0, p1, p2, V, s):
    """of[p_r + c*V : p_r + (c+1)*V] = s[r][c] + rg * wf[same] (the product rounded first), for
    rows r = 0..2 starting at p0, p1, p2 and vectors c = 0..3."""
    a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3 = s
    vstore(of, p0, vadd(a0, vmul(vload(wf, p0), rg)))
    vstore(of, p0 + V, vadd(a1, vmul(vload(wf, p0 + V), rg)))
    vstore(of, p0 + 2 * V, vadd(a2, vmul(vload(wf, p0 + 2 * V), rg)))
    vstore(of, p0 + 3 * V, vadd(a3, vmul(vload(wf, p0 + 3 * V), rg)))
    vstore(of, p1, vadd(b0, vmul(vload(wf, p1), rg)))
    vstore(of, p1 + V, vadd(b1, vmul(vload(wf, p1 + V), rg)))
    vstore(of, p1 + 2 * V, vadd(b2, vmul(vload(wf, p1 + 2 * V), rg)))
    vstore(of, p1 + 3 * V, vadd(b3, vmul(vload(wf, p1 + 3 * V), rg)))
    vstore(of, p2, vadd(c0, vmul(vload(wf, p2), rg)))
    vstore(of, p2 + V, vadd(c1, vmul(vload(wf, p2 + V), rg)))
    vstore(of, p2 + 2 * V, vadd(c2, vmul(vload(wf, p2 + 2 * V), rg)))
    vstore(of, p2 + 3 * V, vadd(c3, vmul(vload(wf, p2 + 3 * V), rg)))
