"""Numba kernels for the convolution: the direct SIMD kernels at stride 1 (second half of this
file; ``pipeline.fast_layers.direct_images_per_row`` says which shapes take them), and for every
other shape im2col / col2im and the layout changes around the GEMMs.

GEMM layout: the columns of a convolution are one matrix ``cols`` of shape (K, N*P) with
K = C*HH*WW filter taps and P = H_out*W_out output pixels per image; column n*P + p holds the
receptive field of output pixel p of image n. Then

    out2 = w2 @ cols            (F, N*P)    forward, one GEMM
    dw2  = (cols @ dout2.T).T   (F, K)      backward
    dcols = w2.T @ dout2        (K, N*P)    backward, only when dx is wanted

where ``w2 = w.reshape(F, K)`` and ``dout2`` is dout in the same (F, N*P) layout. The kernels
here move data between that layout and NCHW, fusing the bias, the ReLU and the bias gradient
into those passes. All kernels are ``parallel=True`` (``prange``) and ``cache=True``.

Inner loops index 1-D rows with ``np.uint64`` indices: Numba then emits no negative-index
wraparound check, and LLVM vectorizes the copies (it does not with signed indexing).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from pipeline._kernels.simd import (
    WIDTHS,
    lanes,
    vfma,
    vload,
    vsplat,
    vstore,
)
from pipeline._kernels.tile import (
    row_add,
    row_store,
    row_zeros,
    tile_fma,
    tile_load,
    tile_rows,
    tile_shape,
    tile_store,
    tile_take_cols,
    tile_take_rows,
    tile_vectors,
    tile_zeros,
)

u64 = np.uint64


@njit(parallel=True, cache=True)
def im2col(x, HH, WW, stride, pad, H_out, W_out, cols):
    """Fill cols (C*HH*WW, N*H_out*W_out) from x (N, C, H, W),
    zeros where the window is in the padding."""
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
        w_lo = min(W_out, max(0, (pad - kw + stride - 1) // stride))
        w_hi = max(w_lo, min(W_out, (W - 1 + pad - kw) // stride + 1))
        off = kw - pad
        dst = cols[k]
        base = n * P
        for ho in range(H_out):
            h = ho * stride + kh - pad
            row = base + ho * W_out
            if h < 0 or h >= H:
                for wo in range(W_out):
                    dst[u64(row + wo)] = 0
            else:
                src = x[n, c, h]
                for wo in range(w_lo):
                    dst[u64(row + wo)] = 0
                if stride == 1:  # contiguous copy, vectorized
                    for wo in range(w_lo, w_hi):
                        dst[u64(row + wo)] = src[u64(wo + off)]
                else:
                    for wo in range(w_lo, w_hi):
                        dst[u64(row + wo)] = src[u64(wo * stride + off)]
                for wo in range(w_hi, W_out):
                    dst[u64(row + wo)] = 0


@njit(parallel=True, cache=True)
def col2im(dcols, N, C, H, W, HH, WW, stride, pad, H_out, W_out, dx):
    """dx (N, C, H, W) = sum of dcols (C*HH*WW, N*P) over the windows each input lies in
    (padding dropped)."""
    P = H_out * W_out
    KK = HH * WW
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        for h in range(H):
            d = dx[n, c, h]
            for w_ in range(W):
                d[u64(w_)] = 0
        base = n * P
        for r in range(KK):
            kh = r // WW
            kw = r - kh * WW
            src = dcols[c * KK + r]
            w_lo = min(W_out, max(0, (pad - kw + stride - 1) // stride))
            w_hi = max(w_lo, min(W_out, (W - 1 + pad - kw) // stride + 1))
            off = kw - pad
            for ho in range(H_out):
                h = ho * stride + kh - pad
                if h < 0 or h >= H:
                    continue
                d = dx[n, c, h]
                row = base + ho * W_out
                if stride == 1:
                    for wo in range(w_lo, w_hi):
                        d[u64(wo + off)] += src[u64(row + wo)]
                else:
                    for wo in range(w_lo, w_hi):
                        d[u64(wo * stride + off)] += src[u64(row + wo)]


@njit(cache=True, inline="always")
def _add_bias_row(src, s0, bf, relu, dst):
    """dst[:] = src[s0 : s0 + len(dst)] + bf, then max(., 0) when relu."""
    if relu:
        for p in range(dst.shape[0]):
            v = src[u64(s0 + p)] + bf
            dst[u64(p)] = v if v > 0 else 0
    else:
        for p in range(dst.shape[0]):
            dst[u64(p)] = src[u64(s0 + p)] + bf


@njit(parallel=True, cache=True)
def bias_to_nchw(out2, b, relu, out):
    """out (N, F, P) = out2 (F, N*P) + b[f], then max(., 0) when relu."""
    N, F, P = out.shape
    for t in prange(N * F):
        n = t // F
        f = t - n * F
        _add_bias_row(out2[f], n * P, b[f], relu, out[n, f])


@njit(parallel=True, cache=True, fastmath={"reassoc"})
def dout_to_2d(dout, dout2, db):
    """dout2 (F, N*P) = dout (N, F, P); db[f] = the sum of row f (float64)."""
    N, F, P = dout.shape
    for f in prange(F):
        s = 0.0
        dst = dout2[f]
        for n in range(N):
            src = dout[n, f]
            d0 = n * P
            for p in range(P):
                v = src[u64(p)]
                dst[u64(d0 + p)] = v
                s += v
        db[f] = s


@njit(parallel=True, cache=True)
def relu_masked(dout, relu_out, out):
    """out = dout where relu_out > 0, else 0 (all (M, P): rows of planes); both conv paths."""
    for t in prange(dout.shape[0]):
        d = dout[t]
        m = relu_out[t]
        o = out[t]
        for p in range(d.shape[0]):
            o[u64(p)] = d[u64(p)] if m[u64(p)] > 0 else 0


# --------------------------------------------------------------------------------------------
# direct convolution at stride 1 (the three-layer net's 7x7 conv; 3x3 convs)
#
# Each plane of the input is zero-padded once into a "wide" row layout xp (N, C, L): rows of
# Wp = max(W + pw, W_out) values, each row [pw zeros][W values][zeros], ph zero rows above and
# zeros after. For output pixel (ho, wo) at q = ho*Wp + wo, filter tap (c, kh, kw) reads
# xp[n, c, kh*Wp + kw + q]: a contiguous run per tap along an output row. A row's right padding
# is the next row's left padding (Wp = 35 at the three-layer net's shapes); the kernels compute
# only the W_out real columns of each row. Filters are HH x WW, any size.
#
# The kernels hold their sums in SIMD registers (pipeline._kernels.simd), 12 accumulators fed by 4
# vector loads and 3 broadcasts per 12 FMAs (fma_3x4): the forward pass keeps 3 filters x 4
# vectors of output pixels over all C*HH*WW taps; dw keeps 3 taps x 4 vectors of filters over
# the output pixels. No column matrix is built. Every output element / weight gradient is
# summed in a fixed order that depends only on the shapes: results do not depend on the
# thread count.
#
# Planes narrower than a vector or two leave lanes idle. Such planes go k images side by side:
# image n is slot s = n % k of super-image g = n // k, its columns from s * S of a row
# (k - 1) * S + W values wide, S = max(W + pw, W_out): at least pw zeros between two images
# (each image's left padding the right padding of the one before it), and outputs that do not
# overlap. Output column s * S + wo of the super-image is image n's column wo (the columns
# between two images' outputs are junk, computed and dropped), and the same holds for dx; dout
# goes in with zeros there. A real output reads exactly the values and zeros it would alone:
# the same sums.


@njit(parallel=True, cache=True)
def pad_planes(x, k, S, ph, pw, Wp, xp):
    """xp (G, C, L) = x (N, C, H, W) in the wide layout, k images side by side in each row, S
    columns apart (G = ceil(N / k); slots past image N - 1 stay zero). With ph = pw = 0 and
    L = H * Wp: the images side by side, nothing else (a dout for the kernels)."""
    N, C, H, W = x.shape
    G, _, L = xp.shape
    for t in prange(G * C):
        g = t // C
        c = t - g * C
        d = xp[g, c]
        for i in range(L):
            d[u64(i)] = 0
        for n in range(g * k, min(N, g * k + k)):
            src_plane = x[n, c]
            base = pw + (n - g * k) * S
            for h in range(H):
                src = src_plane[h]
                o = (h + ph) * Wp + base
                for j in range(W):
                    d[u64(o + j)] = src[u64(j)]


@njit(parallel=True, cache=True)
def one_by_one(packed, k, S, a):
    """a (N, F, H, W) = image n's columns of packed (G, F, H, Ws) from (n % k) * S: the inverse
    of pad_planes(a, k, S, 0, 0, Ws, packed.reshape(G, F, H * Ws))."""
    N, F, H, W = a.shape
    for t in prange(N * F):
        n = t // F
        f = t - n * F
        g = n // k
        o = (n - g * k) * S
        for h in range(H):
            src = packed[g, f, h]
            d = a[n, f, h]
            for j in range(W):
                d[u64(j)] = src[u64(o + j)]


def direct_geometry(H_out, W_out, HH, WW, W, pw, itemsize):
    """(Wp, L): the wide row length and the padded plane length the direct kernels need for
    HH x WW filters.

    L covers the ph + H + ph rows (at most H_out + HH - 1) and every read: (HH - 1) rows and
    WW - 1 taps past the output plane of H_out rows of Wp positions, whose last row
    direct_forward reads as whole vectors (a vector can be longer than a row), and pooled_dw
    reads a filter row's WW taps as whole vectors.
    """
    V = WIDTHS[-1] // itemsize  # the widest vector: one geometry for every width
    Wp = max(W + pw, W_out)
    L = max(
        (H_out + HH - 1) * Wp + pw + 1,
        (H_out + HH - 2) * Wp + max(W_out, V) + WW,
        (H_out + HH - 2) * Wp + W_out + -(-WW // V) * V,  # pooled_dw's vectors of a row's taps
    )
    return Wp, L


@njit(cache=True, inline="always")
def _vector_start(i, nv, V, Wp, W_out, RW):
    """Vector i of an output plane cut into nv vectors per row: (its start in the wide layout,
    its start in a scratch plane of rows of RW). The last vector of a row ends at the row's end
    (overlapping the one before it), or starts at 0 when the row is shorter than a vector."""
    ho = i // nv
    col = max(min((i - ho * nv) * V, W_out - V), 0)
    return ho * Wp + col, ho * RW + col


@njit(cache=True, inline="always")
def _direct_planes(xf, wf, n, fb, C, L, Wp, HH, WW, F, qv, sv, tmp, tl, vw):
    """tmp (R, plane) = the conv sums (no bias) of image n for filters fb .. fb + R - 1 (the
    tile's R; past F, filter F-1 again), each output plane's vectors at sv (starts at qv in the
    wide layout): per block of C vectors (the tile's), R * C sums in registers over all taps."""
    R, TC = tile_shape(tl)
    NV = len(qv)
    K = C * HH * WW
    fq = tile_rows(tl, fb, F - 1, K, 0)
    tq = tile_rows(tl, 0, R - 1, len(tmp) // R, 0)
    for i in range(0, NV, TC):  # NV not a multiple of C: the last block repeats vector NV-1
        qs = tile_take_cols(tl, qv, i, NV - 1, 0)
        acc = tile_zeros(xf, tl, vw)
        for c in range(C):
            for kh in range(HH):
                i0 = (n * C + c) * L + kh * Wp
                k0 = (c * HH + kh) * WW
                for kw in range(WW):
                    acc = tile_fma(wf, fq, k0 + kw, xf, i0 + kw, qs, acc, vw)
        tile_store(tmp, tq, tile_take_cols(tl, sv, i, NV - 1, 0), acc)


@njit(cache=True)
def _vector_starts(H_out, W_out, V, Wp):
    """(qv, sv, RW): the starts of an output plane's vectors in the wide layout and in a scratch
    plane of rows of RW = whole vectors (_vector_start)."""
    nv = (W_out + V - 1) // V  # vectors per output row
    RW = nv * V
    NV = H_out * nv
    qv = np.empty(NV, dtype=np.intp)
    sv = np.empty(NV, dtype=np.intp)
    for i in range(NV):
        qv[i], sv[i] = _vector_start(i, nv, V, Wp, W_out, RW)
    return qv, sv, RW


@njit(cache=True, inline="always")
def _pool_plane(tmp, s0, RW, W_out, bf, ph, pw, stride, o_t, i_t):
    """o_t (Hq, Wq) = max pooling of relu(the plane at tmp[s0:] (rows of RW) + bf): over each
    ph x pw window (stride apart) of the values tmp + bf, then max(., 0); i_t (Hq, Wq) its first
    maximum (row-major) as a flat position in the plane of W_out columns. pool_forward's (and
    pool_forward_2x2's) values, rounded the same."""
    Hq, Wq = o_t.shape
    for i in range(Hq):
        r0 = s0 + i * stride * RW
        p0 = i * stride * W_out
        o_i = o_t[i]
        i_i = i_t[i]
        if ph == 2 and pw == 2 and stride == 2:  # pool_forward_2x2's loop: vectorizable
            for jj in range(Wq):
                v0 = tmp[u64(r0 + 2 * jj)] + bf
                v1 = tmp[u64(r0 + 2 * jj + 1)] + bf
                v2 = tmp[u64(r0 + RW + 2 * jj)] + bf
                v3 = tmp[u64(r0 + RW + 2 * jj + 1)] + bf
                best = v0
                bi = p0 + 2 * jj
                if v1 > best:
                    best = v1
                    bi = p0 + 2 * jj + 1
                if v2 > best:
                    best = v2
                    bi = p0 + W_out + 2 * jj
                if v3 > best:
                    best = v3
                    bi = p0 + W_out + 2 * jj + 1
                o_i[u64(jj)] = best if best > 0 else best - best  # +0.0, as np.maximum(x, 0)
                i_i[u64(jj)] = bi
            continue
        for jj in range(Wq):
            q = r0 + jj * stride  # the window's first value
            best = tmp[u64(q)] + bf
            bi = p0 + jj * stride
            for a in range(ph):
                for c in range(pw):
                    v = tmp[u64(q + a * RW + c)] + bf
                    if v > best:
                        best = v
                        bi = p0 + jj * stride + a * W_out + c
            o_i[u64(jj)] = best if best > 0 else best - best
            i_i[u64(jj)] = bi


@njit(parallel=True, cache=True)
def direct_forward(xp, Wp, w, b, relu, out, tl, vw, pool=None):
    """out (N, F, H_out, W_out) = conv(xp, w) + b[f] (then max(., 0) when relu); w (F, C, HH, WW).
    With pool = (ph, pw, stride, idx): out (N, F, Hq, Wq) = max pooling of relu(conv + b[f])
    instead (relu is not read), idx its windows' maxima (_pool_plane), the convolution's
    output never written: the values of direct_forward then pool_forward with relu.

    One task per (image, R filters: the tile's rows). Each output row is cut into vectors (no
    junk columns); per block of C vectors (the tile's), R * C sums in registers over all taps,
    stored to a scratch plane (_direct_planes), then copied to out with the bias (and ReLU), or
    pooled from there.
    """
    N, C, L = xp.shape
    F, _, HH, WW = w.shape
    _, _, H_out, W_out = out.shape
    if pool is not None:  # the conv's plane: windows cover it whole (pool_output_shape checks)
        H_out = (out.shape[2] - 1) * pool[2] + pool[0]
        W_out = (out.shape[3] - 1) * pool[2] + pool[1]
    R, _ = tile_shape(tl)
    qv, sv, RW = _vector_starts(H_out, W_out, lanes(xp, vw), Wp)
    nfb = (F + R - 1) // R
    xf = xp.reshape(-1)
    wf = w.reshape(-1)
    plane = H_out * RW
    for t in prange(N * nfb):
        n = t // nfb
        fb = (t - n * nfb) * R
        tmp = np.empty(R * plane, dtype=xp.dtype)
        _direct_planes(xf, wf, n, fb, C, L, Wp, HH, WW, F, qv, sv, tmp, tl, vw)
        for j in range(min(R, F - fb)):
            f = fb + j
            if pool is None:
                for ho in range(H_out):
                    _add_bias_row(tmp, (j * H_out + ho) * RW, b[f], relu, out[n, f, ho])
            else:
                ph, pw, stride, idx = pool
                _pool_plane(tmp, j * plane, RW, W_out, b[f], ph, pw, stride, out[n, f], idx[n, f])


@njit(cache=True)
def _dout_transposed(dout, n, Fp, eT):
    """eT[p * Fp + f] = dout[n, f] at output pixel p = ho * W_out + wo.

    Eight filters at a time, so each pixel gets one contiguous 8-value store (filters past F
    repeat filter F-1 into eT's padding columns, which nobody reads).
    """
    _, F, H_out, W_out = dout.shape
    P = H_out * W_out
    d = dout[n].reshape(F, P)
    for fb in range(0, F, 8):
        r0 = d[fb]
        r1 = d[min(fb + 1, F - 1)]
        r2 = d[min(fb + 2, F - 1)]
        r3 = d[min(fb + 3, F - 1)]
        r4 = d[min(fb + 4, F - 1)]
        r5 = d[min(fb + 5, F - 1)]
        r6 = d[min(fb + 6, F - 1)]
        r7 = d[min(fb + 7, F - 1)]
        for p in range(P):
            s = u64(p * Fp + fb)
            w = u64(p)
            eT[s] = r0[w]
            eT[s + u64(1)] = r1[w]
            eT[s + u64(2)] = r2[w]
            eT[s + u64(3)] = r3[w]
            eT[s + u64(4)] = r4[w]
            eT[s + u64(5)] = r5[w]
            eT[s + u64(6)] = r6[w]
            eT[s + u64(7)] = r7[w]


@njit(cache=True)
def _sum_chunks(part, part_db, fs, rs, ks, dw, db):
    """dw[f, c, kh, kw] = the chunks' partial sums part[ch, f * fs + (c * HH + kh) * rs + kw * ks]
    added in chunk order; db[f] = part_db[:, f] added in chunk order (float64)."""
    F, C, HH, WW = dw.shape
    nch = part.shape[0]
    for f in range(F):
        s = 0.0
        for ch in range(nch):
            s += part_db[ch, f]
        db[f] = s
        for c in range(C):
            for kh in range(HH):
                for kw in range(WW):
                    i = f * fs + (c * HH + kh) * rs + kw * ks
                    a = part[0, i]
                    for ch in range(1, nch):
                        a += part[ch, i]
                    dw[f, c, kh, kw] = a


@njit(parallel=True, cache=True)
def direct_dw(xp, Wp, dout, dw, db, tl, vw):
    """dw (F, C, HH, WW) and db (F,) (float64) of direct_forward for dout (N, F, H_out, W_out).

    SIMD lanes run over filters: each image's dout is transposed to eT (P, Fp), Fp = F rounded
    up to G = C vectors (the tile's C), and tap k = (c, kh, kw) of G filters is the sum over
    output pixels (ho, wo) of eT[ho*W_out + wo] * xp[n, c, (ho + kh)*Wp + wo + kw]. Per block
    of R taps (the tile's rows) x G filters, R * C sums in registers over the plane: C vector
    loads and R broadcasts per R * C FMAs. Images are split into a fixed number of chunks (by N
    only), summed in chunk order at the end.
    """
    N, C, L = xp.shape
    F, _, HH, WW = dw.shape
    _, _, H_out, W_out = dout.shape
    R, TC = tile_shape(tl)
    V = lanes(xp, vw)
    G = TC * V
    Fp = (F + G - 1) // G * G
    P = H_out * W_out
    T = HH * WW
    K = C * T
    KR = (K + R - 1) // R * R  # K not a multiple of R: the last block repeats tap K-1 (discarded)
    nch = min(N, 16)
    xf = xp.reshape(-1)
    # tap k = (c, kh, kw) reads image n's xp from n*C*L + tap[k]
    tap = np.empty(K, dtype=np.intp)
    for k in range(K):
        c = k // T
        kh = (k - c * T) // WW
        tap[k] = c * L + kh * Wp + (k - c * T - kh * WW)
    part = np.zeros((nch, KR, Fp), dtype=xp.dtype)
    part_db = np.zeros((nch, Fp))
    for ch in prange(nch):
        ts = tile_vectors(tl, xp, vw)
        eT = np.zeros(P * Fp, dtype=xp.dtype)
        part_ch = part[ch].reshape(-1)
        sums = np.empty(G, dtype=xp.dtype)
        for n in range(ch * N // nch, (ch + 1) * N // nch):
            _dout_transposed(dout, n, Fp, eT)
            for fg in range(0, Fp, G):
                row = row_zeros(xp, tl, vw)
                for p in range(P):
                    row = row_add(row, eT, p * Fp + fg, ts, vw)
                row_store(sums, 0, ts, row)
                for j in range(G):
                    part_db[ch, fg + j] += sums[j]
                for k in range(0, KR, R):
                    xq = tile_take_rows(tl, tap, k, K - 1, n * C * L)
                    gq = tile_rows(tl, k, k + R - 1, Fp, fg)
                    acc = tile_load(part_ch, gq, ts, vw)
                    for ho in range(H_out):
                        q0 = ho * Wp
                        p0 = ho * W_out * Fp + fg
                        for wo in range(W_out):
                            acc = tile_fma(xf, xq, q0 + wo, eT, p0 + wo * Fp, ts, acc, vw)
                    tile_store(part_ch, gq, ts, acc)
    # tap k = (c, kh, kw) of filter f at k * Fp + f
    _sum_chunks(part.reshape(nch, -1), part_db, 1, WW * Fp, Fp, dw, db)


@njit(cache=True, inline="always")
def _routed(pool, relu, n, f, k, S, Wp, W_out, stride, ph, eq, eg, zero):
    """The pixels of filter f's conv output planes in the row of images n (images n*k ...,
    side by side S columns apart) that max pooling routes a gradient to, in direct_dw's order
    (row by row, left to right across the images), into (eq, eg): their offsets in the wide
    layout (rows of Wp) and their gradients (0 where the pool's ReLU blocked it: pool_backward
    adds nothing there); returns how many. pool = (dout, idx, pooled) of shape (N, F, Hq, Wq).
    Branch-free: every window is written, and counted when its maximum is in the row at hand."""
    dout, idx, pooled = pool
    N, F, Hq, Wq = dout.shape
    df = dout.reshape(-1)
    idxf = idx.reshape(-1)
    of = pooled.reshape(-1)
    cnt = 0
    for i in range(Hq):
        for a in range(ph):
            ho = i * stride + a  # windows never overlap: pooled row i alone covers this row
            row0 = ho * W_out
            for m in range(min(k, N - n * k)):
                base = ho * (Wp - W_out) + m * S  # + row0 + col: the pixel's offset
                w0 = (((n * k + m) * F + f) * Hq + i) * Wq
                for j in range(Wq):
                    w = u64(w0 + j)
                    pos = idxf[w]
                    v = df[w]
                    if relu and not of[w] > 0:
                        v = zero
                    eq[u64(cnt)] = base + pos
                    eg[u64(cnt)] = v
                    cnt += u64(pos - row0) < u64(W_out)
    return cnt


@njit(parallel=True, cache=True)
def pooled_dw(xp, Wp, k, S, W_out, dout, idx, pooled, relu, stride, ph, dw, db, vw):
    """dw (F, C, HH, WW) and db (F,) (float64) of direct_forward on xp (Ng, C, L: N images, k
    side by side in a row, S columns apart) for the gradient that max pooling (windows ph high,
    never overlapping: stride >= the window) routes from dout (N, F, Hq, Wq) to its windows'
    maxima idx (flat positions in the conv output's planes, W_out wide), with relu only where
    pooled > 0. The same bits as pool_backward then direct_dw, summing a quarter of the pixels
    for 2x2 windows:

    direct_dw sums, for tap (c, kh, kw) and filter f, dout_conv[f, p] * xp[c, tap + p] over the
    output pixels p in order; all but the routed pixels add zero. Here each filter's routed
    pixels (eq: offsets, eg: gradients) are listed in that order (_routed), and SIMD lanes run
    over a filter row's WW taps (vectors of V lanes, nvs = ceil(WW / V) per row): blocks of 7
    vectors of taps in registers (a0 .. a6), one FMA chain per tap in direct_dw's order.
    Images are split into direct_dw's chunks.
    """
    Ng, C, L = xp.shape
    N, F, Hq, Wq = dout.shape
    _, _, HH, WW = dw.shape
    V = lanes(xp, vw)
    nvs = (WW + V - 1) // V
    NS = C * HH * nvs  # vectors of taps per filter
    nch = min(Ng, 16)
    xf = xp.reshape(-1)
    pool = (dout, idx, pooled)
    # vector s = (c, kh, v) of taps starts at xp[n, c, kh * Wp + v * V] (relative to a pixel)
    so = np.empty(NS, dtype=np.intp)
    for s in range(NS):
        ck = s // nvs
        c = ck // HH
        so[s] = c * L + (ck - c * HH) * Wp + (s - ck * nvs) * V
    part = np.zeros((nch, F, NS * V), dtype=xp.dtype)
    part_db = np.zeros((nch, F))
    cap = k * Hq * Wq  # routed pixels of a row of images, at most; + 1 for a write past them
    zero = np.zeros(1, dtype=xp.dtype)[0]
    for ch in prange(nch):
        eq = np.empty(cap + 1, dtype=np.intp)
        eg = np.empty(cap + 1, dtype=xp.dtype)
        for n in range(ch * Ng // nch, (ch + 1) * Ng // nch):
            x0 = n * C * L
            for f in range(F):
                cnt = _routed(pool, relu, n, f, k, S, Wp, W_out, stride, ph, eq, eg, zero)
                pf = part[ch, f]
                s_db = zero  # db's sum over the routed pixels, in order (beside the first block)
                for sb in range(0, NS, 7):  # the 7 accumulators a0 .. a6
                    o0 = x0 + so[min(sb, NS - 1)]
                    o1 = x0 + so[min(sb + 1, NS - 1)]
                    o2 = x0 + so[min(sb + 2, NS - 1)]
                    o3 = x0 + so[min(sb + 3, NS - 1)]
                    o4 = x0 + so[min(sb + 4, NS - 1)]
                    o5 = x0 + so[min(sb + 5, NS - 1)]
                    o6 = x0 + so[min(sb + 6, NS - 1)]
                    a0 = vload(pf, min(sb, NS - 1) * V, vw)
                    a1 = vload(pf, min(sb + 1, NS - 1) * V, vw)
                    a2 = vload(pf, min(sb + 2, NS - 1) * V, vw)
                    a3 = vload(pf, min(sb + 3, NS - 1) * V, vw)
                    a4 = vload(pf, min(sb + 4, NS - 1) * V, vw)
                    a5 = vload(pf, min(sb + 5, NS - 1) * V, vw)
                    a6 = vload(pf, min(sb + 6, NS - 1) * V, vw)
                    for e in range(cnt):
                        ge = eg[e]
                        if sb == 0:
                            s_db += ge
                        gv = vsplat(eg, e, vw)
                        q = eq[e]
                        a0 = vfma(gv, vload(xf, q + o0, vw), a0)
                        a1 = vfma(gv, vload(xf, q + o1, vw), a1)
                        a2 = vfma(gv, vload(xf, q + o2, vw), a2)
                        a3 = vfma(gv, vload(xf, q + o3, vw), a3)
                        a4 = vfma(gv, vload(xf, q + o4, vw), a4)
                        a5 = vfma(gv, vload(xf, q + o5, vw), a5)
                        a6 = vfma(gv, vload(xf, q + o6, vw), a6)
                    # a block past NS repeats vector NS-1: the same chain, stored twice
                    vstore(pf, min(sb + 6, NS - 1) * V, a6)
                    vstore(pf, min(sb + 5, NS - 1) * V, a5)
                    vstore(pf, min(sb + 4, NS - 1) * V, a4)
                    vstore(pf, min(sb + 3, NS - 1) * V, a3)
                    vstore(pf, min(sb + 2, NS - 1) * V, a2)
                    vstore(pf, min(sb + 1, NS - 1) * V, a1)
                    vstore(pf, min(sb, NS - 1) * V, a0)
                part_db[ch, f] += s_db
    # tap (c, kh, kw) of filter f at f * NS * V + (c * HH + kh) * nvs * V + kw
    _sum_chunks(part.reshape(nch, -1), part_db, NS * V, nvs * V, 1, dw, db)
