"""Numba kernels for 3x3 convolutions at stride 1 by Winograd's minimal filtering, F(m x m, 3x3)
with m = 4 or 3 (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2016).

The output is cut into m x m tiles (``tile_side`` picks the m with the fewer products); tile
(i, j) of image n reads the a x a patch d, a = m + 2, of the padded input at rows mi .. mi+a-1,
columns mj .. mj+a-1, and

    Y_tile = AT [ (G g GT) * (BT d B) ] A        (m, m): a*a products per filter and channel
                                                   where a direct 3x3 takes m*m*9 (36 / 144
                                                   for m = 4, 25 / 81 for m = 3)

Summed over the channels, the elementwise products become a*a matrix products, one per position
xi = a*u + v of the transformed tile:

    U[xi]  (F, C)  = (G g GT)[u, v]      filter transform        filter_tiles
    V[xi]  (C, P)  = (BT d B)[u, v]      input transform         input_tiles
    M[xi]  (F, P)  = U[xi] @ V[xi]       a*a GEMMs (NumPy's BLAS, in pipeline.fast_layers)
    Y              = AT M A              output transform        output_tiles

with P = T * Np columns, column (i * tw + j) * Np + n for tile (i, j) of image n, the images
innermost and their count N padded with zero images to Np, a multiple of IMAGE_BLOCK: each
transform works on vectors of images (``pipeline._kernels.simd``), a column or a row of a tile
at a time, its sums in registers. The backward pass is the transpose of each line, in reverse
order:

    dM[xi] (F, P) = A dY AT            (inverts output_tiles; db in the same pass)  dout_tiles
    dU[xi] (F, C) = dM[xi] @ V[xi].T   (inverts the GEMM)
    dV[xi] (C, P) = U[xi].T @ dM[xi]   (inverts the GEMM)
    dg            = GT dU G            (inverts filter_tiles)                         filter_grad
    dx            = B dV BT, tiles added where they overlap (inverts input_tiles)    input_grad

Each value is one FMA chain in a fixed order, image by image in the lanes: the same bits at
every vector width and thread count (the GEMMs are OpenBLAS's, whose kernels differ between
CPUs). G's fractions are applied in float64 to the filters. A NaN or infinity in a tile's
patch makes its whole tile NaN (the transforms mix the patch), where a direct convolution
spreads it only to the outputs whose window covers it.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from pipeline._kernels.simd import lanes, vadd, vfma, vload, vsplat, vstore, vzero

#: the image count is padded to a multiple of this (64 bytes of float32): the columns, and so
#: the GEMMs' bits, do not depend on the vector width
IMAGE_BLOCK = 16

#: F(m x m, 3x3) for the output tile sides m used: (AT (m, a), G (a, 3), BT (a, a)), a = m + 2.
#: m = 4 at the points 0, 1, -1, 2, -2 and infinity (Lavin and Gray's); m = 3 at 0, 1, -1, 2
#: and infinity. AT and BT hold small integers (exact in float32).
TRANSFORMS = {
    4: (
        np.array(
            [
                [1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
                [0.0, 1.0, -1.0, 2.0, -2.0, 0.0],
                [0.0, 1.0, 1.0, 4.0, 4.0, 0.0],
                [0.0, 1.0, -1.0, 8.0, -8.0, 1.0],
            ]
        ),
        np.array(
            [
                [1 / 4, 0.0, 0.0],
                [-1 / 6, -1 / 6, -1 / 6],
                [-1 / 6, 1 / 6, -1 / 6],
                [1 / 24, 1 / 12, 1 / 6],
                [1 / 24, -1 / 12, 1 / 6],
                [0.0, 0.0, 1.0],
            ]
        ),
        np.array(
            [
                [4.0, 0.0, -5.0, 0.0, 1.0, 0.0],
                [0.0, -4.0, -4.0, 1.0, 1.0, 0.0],
                [0.0, 4.0, -4.0, -1.0, 1.0, 0.0],
                [0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
                [0.0, 2.0, -1.0, -2.0, 1.0, 0.0],
                [0.0, 4.0, 0.0, -5.0, 0.0, 1.0],
            ]
        ),
    ),
    3: (
        np.array(
            [
                [1.0, 1.0, 1.0, 1.0, 0.0],
                [0.0, 1.0, -1.0, 2.0, 0.0],
                [0.0, 1.0, 1.0, 4.0, 1.0],
            ]
        ),
        np.array(
            [
                [1 / 2, 0.0, 0.0],
                [-1 / 2, -1 / 2, -1 / 2],
                [-1 / 6, 1 / 6, -1 / 6],
                [1 / 6, 1 / 3, 2 / 3],
                [0.0, 0.0, 1.0],
            ]
        ),
        np.array(
            [
                [2.0, -1.0, -2.0, 1.0, 0.0],
                [0.0, -2.0, -1.0, 1.0, 0.0],
                [0.0, 2.0, -3.0, 1.0, 0.0],
                [0.0, -1.0, 0.0, 1.0, 0.0],
                [0.0, 2.0, -1.0, -2.0, 1.0],
            ]
        ),
    ),
}


def tile_side(H_out: int, W_out: int) -> int:
    """m: the output tile side with the fewest products per filter and channel, tiles x
    (m + 2)**2; 4 on a tie. 4 on 4 x 4, 7 x 7, 8 x 8, 15 x 15 and 31 x 31 planes; 3 on 3 x 3,
    5 x 5, 6 x 6 and 9 x 9 ones (and 1 x 1, 2 x 2)."""
    return min((4, 3), key=lambda m: tiles(H_out, W_out, m)[0] * tiles(H_out, W_out, m)[1]
               * (m + 2) ** 2)  # fmt: skip


def tiles(H_out: int, W_out: int, m: int) -> tuple[int, int]:
    """(th, tw): the m x m tiles that cover an H_out x W_out output."""
    return -(-H_out // m), -(-W_out // m)


def padded_images(N: int) -> int:
    """Np: N rounded up to a multiple of IMAGE_BLOCK."""
    return -(-N // IMAGE_BLOCK) * IMAGE_BLOCK


def tile_buffer(m: int, rows: int, cols: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(buffer (a*a, S), view (a*a, rows, cols)), a = m + 2, for U, V, M, dU, dM or dV: the a*a
    matrices S = rows * cols + IMAGE_BLOCK values apart, not a multiple of 4 KiB (the
    transforms touch all of them at once; at a power-of-two distance they would all fall in one
    set of the L1 cache)."""
    a2 = (m + 2) ** 2
    S = rows * cols + IMAGE_BLOCK
    if S * np.dtype(dtype).itemsize % 4096 == 0:
        S += IMAGE_BLOCK
    buf = np.empty((a2, S), dtype=dtype)
    return buf, buf[:, : rows * cols].reshape(a2, rows, cols)


def in_dtype(m: int, dtype) -> tuple[np.ndarray, ...]:
    """(AT, BT, A, B) of F(m x m, 3x3) flattened, in the kernels' dtype: A = AT.T and B = BT.T
    for the backward transforms."""
    AT, _, BT = TRANSFORMS[m]
    return tuple(np.ascontiguousarray(t, dtype=dtype).reshape(-1) for t in (AT, BT, AT.T, BT.T))


def filter_matrices(m: int) -> tuple[np.ndarray, np.ndarray]:
    """(G (a, 3), GT (3, a)) of F(m x m, 3x3), float64, C-contiguous."""
    G = TRANSFORMS[m][1]
    return G, np.ascontiguousarray(G.T)


@njit(cache=True, inline="always")
def _matvecs(mat, R, K, src, s0, ss, dst, d0, ds, add, vw):
    """For r < R: dst[d0 + r*ds :][:lanes] (+)= sum_k mat[r*K + k] * src[s0 + k*ss :][:lanes],
    the k with mat 0 skipped: one FMA chain per lane, k in order; with add, the chain's value
    is then added to what dst held."""
    for r in range(R):
        acc = vzero(dst, vw)
        for k in range(K):
            if mat[r * K + k] != 0:
                acc = vfma(vsplat(mat, r * K + k, vw), vload(src, s0 + k * ss, vw), acc)
        if add:
            acc = vadd(vload(dst, d0 + r * ds, vw), acc)
        vstore(dst, d0 + r * ds, acc)


@njit(cache=True, inline="always")
def _sandwich(left, right, R, K, src, s0, srow, scol, tmp, dst, d0, drow, dcol, add, vw):
    """dst (R x R vectors) (+)= left (R, K) @ X @ right.T, X the K x K vectors of src at
    s0 + a*srow + b*scol: first tmp[(r*K + b) * L] = (left @ X)[r, b], column by column, then
    each row of tmp times right.T into dst at d0 + r*drow + e*dcol."""
    L = lanes(tmp, vw)
    for b in range(K):  # column b of X
        _matvecs(left, R, K, src, s0 + b * scol, srow, tmp, b * L, K * L, False, vw)
    for r in range(R):  # row r of left @ X
        _matvecs(right, R, K, tmp, r * K * L, L, dst, d0 + r * drow, dcol, add, vw)


@njit(cache=True, inline="always")
def _every_tile(left, right, R, K, m, th, tw, Np, plane, Wq, mats, m0, S, to_mats, add, vw):
    """_sandwich for every tile and vector of images, between a plane (rows Wq * Np values
    apart, tile (i, j) at row m*i, column m*j, images innermost) and the a*a matrices of a
    tile_buffer (S apart; tile (i, j) at column m0 + (i*tw + j)*Np): plane -> matrices when
    to_mats, else matrices -> plane (added to it with add)."""
    L = lanes(plane, vw)
    tmp = np.empty(R * K * L, dtype=plane.dtype)
    for i in range(th):
        for j in range(tw):
            for nb in range(0, Np, L):
                p0 = (m * i * Wq + m * j) * Np + nb
                q0 = m0 + (i * tw + j) * Np + nb
                if to_mats:
                    _sandwich(
                        left, right, R, K, plane, p0, Wq * Np, Np, tmp, mats, q0, R * S, S,
                        False, vw,
                    )  # fmt: skip
                else:
                    _sandwich(
                        left, right, R, K, mats, q0, K * S, S, tmp, plane, p0, Wq * Np, Np,
                        add, vw,
                    )  # fmt: skip


@njit(parallel=True, cache=True)
def input_tiles(x, pad, m, th, tw, Np, BT, V, vw):
    """V (a*a, >= C*T*Np: tile_buffer), matrix xi (C, T*Np) = BT d B for each a x a patch d of
    x (N, C, H, W) zero-padded by pad on the top and left (and up to m th + 2 rows, m tw + 2
    columns); column (i*tw + j)*Np + n, zeros for the padding images n >= N."""
    N, C, H, W = x.shape
    a = m + 2
    P, S = th * tw * Np, V.shape[1]
    Hp, Wp = m * th + 2, m * tw + 2
    Vf = V.reshape(-1)
    for c in prange(C):
        xt = np.zeros(Hp * Wp * Np, dtype=x.dtype)  # xt[(h*Wp + w)*Np + n] = padded x[n, c, h, w]
        for n in range(N):
            for h in range(H):
                o = ((h + pad) * Wp + pad) * Np + n
                for w_ in range(W):
                    xt[o + w_ * Np] = x[n, c, h, w_]
        _every_tile(BT, BT, a, a, m, th, tw, Np, xt, Wp, Vf, c * P, S, True, False, vw)


@njit(parallel=True, cache=True)
def input_grad(dV, pad, m, th, tw, Np, B, dx, vw):
    """dx (N, C, H, W) = the sum over tiles of B dV BT (a x a each, at rows mi, columns mj of
    the padded plane; neighbours overlap by 2, added tile by tile in order), the padding
    dropped (inverts input_tiles). B = BT.T."""
    N, C, H, W = dx.shape
    a = m + 2
    P, S = th * tw * Np, dV.shape[1]
    Hp, Wp = m * th + 2, m * tw + 2
    dVf = dV.reshape(-1)
    for c in prange(C):
        dxt = np.zeros(Hp * Wp * Np, dtype=dx.dtype)  # as input_tiles' xt
        _every_tile(B, B, a, a, m, th, tw, Np, dxt, Wp, dVf, c * P, S, False, True, vw)
        for n in range(N):
            for h in range(H):
                o = ((h + pad) * Wp + pad) * Np + n
                for w_ in range(W):
                    dx[n, c, h, w_] = dxt[o + w_ * Np]


@njit(parallel=True, cache=True)
def output_tiles(M, b, relu, m, th, tw, Np, AT, out, vw):
    """out (N, F, H_out, W_out) = AT M A + b[f] for each tile of M (tile_buffer: a*a matrices
    (F, T*Np)), then max(., 0) when relu; the tiles' rows and columns past the output, and
    the padding images, dropped."""
    N, F, H_out, W_out = out.shape
    a = m + 2
    P, S = th * tw * Np, M.shape[1]
    Wt = m * tw
    Mf = M.reshape(-1)
    for f in prange(F):
        yt = np.empty(m * th * Wt * Np, dtype=out.dtype)  # yt[(h*Wt + w)*Np + n]
        _every_tile(AT, AT, m, a, m, th, tw, Np, yt, Wt, Mf, f * P, S, False, False, vw)
        bf = b[f]
        for n in range(N):
            for h in range(H_out):
                o = h * Wt * Np + n
                for w_ in range(W_out):
                    v = yt[o + w_ * Np] + bf
                    out[n, f, h, w_] = v if (v > 0 or not relu) else 0


@njit(parallel=True, cache=True)
def dout_tiles(dout, m, th, tw, Np, A, dM, db, vw):
    """dM (tile_buffer: a*a matrices (F, T*Np)) = A dY AT for each m x m tile dY of dout
    (N, F, H_out, W_out), zeros past its edges and for the padding images (inverts
    output_tiles); db[f] = the sum of dout[:, f] in float64, in (n, h, w) order. A = AT.T."""
    N, F, H_out, W_out = dout.shape
    a = m + 2
    P, S = th * tw * Np, dM.shape[1]
    Wt = m * tw
    dMf = dM.reshape(-1)
    for f in prange(F):
        dyt = np.zeros(m * th * Wt * Np, dtype=dout.dtype)  # as output_tiles' yt
        total = 0.0
        for n in range(N):
            for h in range(H_out):
                o = h * Wt * Np + n
                for w_ in range(W_out):
                    v = dout[n, f, h, w_]
                    dyt[o + w_ * Np] = v
                    total += v
        db[f] = total
        _every_tile(A, A, a, m, m, th, tw, Np, dyt, Wt, dMf, f * P, S, True, False, vw)


@njit(parallel=True, cache=True)
def filter_tiles(w, G, U, vw):
    """U (a*a, >= F*C: tile_buffer), matrix xi (F, C) = G g GT for each filter g = w[f, c]
    (F, C, 3, 3), G (a, 3), in float64 vectors of channels, rounded once to U's dtype."""
    F, C = w.shape[0], w.shape[1]
    a = G.shape[0]
    Gf = G.reshape(-1)
    g_ = np.empty(1)
    L = lanes(g_, vw)
    Cp = -(-C // L) * L
    for f in prange(F):
        g = np.zeros(9 * Cp)  # g[(k*3 + l)*Cp + c] = w[f, c, k, l]
        for c in range(C):
            for k in range(3):
                for l_ in range(3):
                    g[(k * 3 + l_) * Cp + c] = w[f, c, k, l_]
        u = np.empty(a * a * Cp)  # u[xi*Cp + c]
        tmp = np.empty(a * 3 * L)
        for c0 in range(0, Cp, L):
            _sandwich(Gf, Gf, a, 3, g, c0, 3 * Cp, Cp, tmp, u, c0, a * Cp, Cp, False, vw)
        for xi in range(a * a):
            dst = U[xi, f * C : f * C + C]
            src = u[xi * Cp : xi * Cp + C]
            for c in range(C):
                dst[c] = src[c]


@njit(parallel=True, cache=True)
def filter_grad(dU, GT, dw, vw):
    """dw (F, C, 3, 3) = GT dU G for each (f, c) of dU (a*a, >= F*C: tile_buffer, matrices
    (F, C)), GT (3, a) = G.T, in float64 vectors of channels (inverts filter_tiles)."""
    F, C = dw.shape[0], dw.shape[1]
    a = GT.shape[1]
    GTf = GT.reshape(-1)
    g_ = np.empty(1)
    L = lanes(g_, vw)
    Cp = -(-C // L) * L
    for f in prange(F):
        du = np.zeros(a * a * Cp)  # du[xi*Cp + c] = dU[xi, f, c]
        for xi in range(a * a):
            src = dU[xi, f * C : f * C + C]
            dst = du[xi * Cp : xi * Cp + C]
            for c in range(C):
                dst[c] = src[c]
        dg = np.empty(9 * Cp)  # dg[(k*3 + l)*Cp + c]
        tmp = np.empty(3 * a * L)
        for c0 in range(0, Cp, L):
            _sandwich(GTf, GTf, 3, a, du, c0, a * Cp, Cp, tmp, dg, c0, 3 * Cp, Cp, False, vw)
        for c in range(C):
            for k in range(3):
                for l_ in range(3):
                    dw[f, c, k, l_] = dg[(k * 3 + l_) * Cp + c]
