"""Numba kernels for the hidden affine layer: its forward product for few rows with bias and
ReLU fused in, its input gradient for few rows with the L2 loss term's sum of squares fused in,
and its weight gradient with the L2 term fused in:

    out = relu(x2 @ w + b)            out (N, M)    x2 (N, D)    w (D, M)    (N < 64)
    dx = da @ w.T, sum(w**2)          dx (N, D)     da (N, M)    w (D, M)    (15 < N < 257)
      (both for any N: a worker's shards, each of those sizes, take them with their rows stacked)
    dw = x2.T @ da + reg * w          dw, w (D, M)    x2 (N, D)    da (N, M)
    dw = sum over shards s, in a tree, of (x2_s.T @ da_s) * n_s      (a worker's shards)

**The register tile** (``pipeline._kernels.tile``): R rows x C = 4 vectors of sums, R * C
accumulators fed per step by R broadcasts and 4 vector loads. R = 3 (12 accumulators) unless
the caller passes 6 x 4 (the dx pass on a CPU with 32 vector registers, where it measured
faster; the forward and dw measured slower with it). G = 4 vectors of columns (or rows) is
the unit of every panel below. The tile never changes bits: each output is one FMA chain.

**The forward product** (``affine_relu_rows``). With 50 rows (the notebook's batch) OpenBLAS
packs w's panels before multiplying them and gains little from a second thread. Here a
task owns FWD_TASK_COLS columns (groups of G) for all N rows; k runs in blocks whose strip of w
(k x G, FWD_STRIP_BYTES) is read straight from w, kept in L1 while every tile of R rows sums
over it, with the next strip prefetched meanwhile. The sums go to a per-task scratch between k
blocks, and at the end ``relu(sum + b)`` to out. Bits: out[i, j] is the k-ordered FMA chain over
k = 0..D-1, then one rounded addition of b[j], then ``np.maximum(., 0)``'s choice (NaN kept,
-0.0 to +0.0): which thread, task or tile computes it, and how many rows the call has, do not
change it.

**The input gradient** (``affine_dx_rows``, for 16 to 256 rows). With 50 rows OpenBLAS's
``da @ w.T`` ran well below NumPy's rate on large products, and the loss's L2 term read w's
16 MB once more (``np.vdot(w, w)``). Here da is first copied transposed into panels of G
rows (``pack_row_panels``, zeros past row N - 1), each contiguous in k; a task owns ROWS rows of
w, and for every block of R of them x one panel sums w[j, k] * da[i:i + G, k] over k = 0..M-1
(w's R values are the broadcasts), then stores the R x G sums transposed into dx[i, j]. While a
block reads its rows of w, it prefetches the next block's, line by line at the rate it reads its
own (w comes from memory: a Solver step's Adam has just written it). The block's rows of w,
just read, are then squared from L1 for the L2 term. dx[i, j] is the k-ordered FMA chain over
k = 0..M-1 (from 0): neither the thread count nor the call's row count changes it. The sum of
squares: per row of w, float32 sums over k in 16 lanes (``_row_sumsq``: the same at every
vector width), then in float64 the tail, added in row order within a task; the caller adds the
tasks' sums (``np.sum``: one fixed order).

**The weight gradient** (``affine_dw_l2``).

For the hidden layer of the notebook's network (D = 8192, M = 500, N = 50) NumPy's route makes
four passes over 16 MB arrays: OpenBLAS zeroes dw, accumulates x2.T @ da into it, then
``dw += reg * w`` reads both and writes dw again. Here w is read once and dw written once, from
sums held in registers.

Layout: da is first copied into column panels of G columns, each contiguous in k
(``pack_panels``). A task owns ROWS rows of dw; it copies its rows of x2 into blocks of R rows
interleaved by k, then for every block of R rows x one panel sums x2[k, i] * da[k, j:j + G] over
k = 0..N-1 and writes ``sum + round(reg * w)`` to dw. Each panel first prefetches the lines of w
and dw the next one finishes with: a panel's 600 FMAs were otherwise followed by a stall on
lines from memory.

The micro-kernel is the direct convolution's, from tile.py: Numba's on-disk cache checks only
this file, so after editing those helpers clear the cache (``__pycache__/affine.*.nbi``/``.nbc``)
or touch this file.

Bits: dw[i, j] is the k-ordered FMA chain over k = 0..N-1 (from 0), then one addition of the
rounded product reg * w[i, j] (``np.add(s, np.multiply(w, reg))``). Which thread or task
computes it does not change it, so the result does not depend on the thread count.

**Several shards' weight gradients** (``affine_dw_tree``). A data-parallel worker sums its
shards' gradients (each scaled by its image count) along a fixed tree; one ``affine_dw_l2``
call per shard reads and writes the 16 MB dw once per shard, and a pair of pairs adds two such
arrays once more. Here the shards' rows are stacked and packed as one, each tile of dw sums
every shard's rows apart (each shard's chain from 0 over its own rows: the bits it has alone),
scales it, and the tree's additions run on tiles held in registers and L1 (a postfix program);
dw is written once. The forward and dx kernels above take several shards' rows stacked
without change (a row's sums never depend on the other rows), so w is read once per step too.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from pipeline._kernels.simd import (
    lanes,
    prefetch,
    vfma,
    vload,
    vsplat,
    vstore,
    vzero,
)
from pipeline._kernels.tile import (
    tile_add,
    tile_fma,
    tile_load,
    tile_mul,
    tile_rows,
    tile_shape,
    tile_store,
    tile_vectors,
    tile_zeros,
)

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
def affine_dw_l2(x2, dap, w, coef, add, dw, tl, vw):
    """dw (D, M) = [dw +] (x2.T @ da + coef[0] * w) * coef[1], da as pack_panels left it in dap;
    x2 (N, D), w (D, M) and dw C-contiguous, one dtype; M >= G = C vectors (the tile's). Each
    operation rounded in turn as NumPy's ``np.add(dw, np.multiply(np.add(s, np.multiply(w,
    reg)), scale))`` would; w is not read when coef[0] == 0 (s taken as is), dw not read unless
    ``add``. coef[1] = 1 leaves the sum unchanged (an exact product).

    One task per ROWS rows of dw, in blocks of R (the tile's rows). D not a multiple of R: the
    last block of a task repeats its last row; both the repeated row and a panel's overlapping
    columns are written twice with the same value. With ``add``, a block's vectors are all read
    before any is stored (so a repeated row adds once), and the last panel, when it overlaps
    the one before, adds to the values its columns had before that panel stored them (copied
    first into ``tail``).
    """
    N, D = x2.shape
    M = w.shape[1]
    R, C = tile_shape(tl)
    V = lanes(x2, vw)
    G = C * V
    if M < G:  # a panel would start before column 0: vstore does no bounds checks
        raise ValueError("affine_dw_l2: w needs at least one tile's vectors of columns")
    nj = (M + G - 1) // G
    wf = w.reshape(-1)
    of = dw.reshape(-1)
    use_w = coef[0] != 0
    for t in prange((D + ROWS - 1) // ROWS):
        ts = tile_vectors(tl, w, vw)  # a row's vectors: 0, V, ..., (C - 1) * V
        i_lo = t * ROWS
        i_hi = min(i_lo + ROWS, D)
        nb = (i_hi - i_lo + R - 1) // R
        xb = _broadcasts(x2, i_lo, i_hi, R)
        rg = vsplat(coef, 0, vw)
        sc = vsplat(coef, 1, vw)
        tail = np.empty(R * G, dtype=dw.dtype)  # the last panel's old values (add, overlap)
        trows = tile_rows(tl, 0, R - 1, G, 0)
        overlap = add and M % G != 0
        for b in range(nb):
            i0 = i_lo + R * b
            xq = tile_rows(tl, 0, R - 1, 1, b * N * R)
            if overlap:
                last = tile_rows(tl, i0, i_hi - 1, M, M - G)  # the block's last G columns
                tile_store(tail, trows, ts, tile_load(of, last, ts, vw))
            for jb in range(nj):
                j0 = min(jb * G, M - G)
                _prefetch_next_panel(of, wf, use_w, tl, i0, i_hi, D, M, jb, G)
                # s[r*C + c] = sum_k x2[k, i_r] * da[k, j0 + c*V : j0 + (c+1)*V]
                s = tile_zeros(x2, tl, vw)
                for k in range(N):
                    s = tile_fma(xb, xq, k * R, dap, (jb * N + k) * G, ts, s, vw)
                p = tile_rows(tl, i0, i_hi - 1, M, j0)
                if use_w:  # s + round(reg * w)
                    s = tile_add(s, tile_mul(tile_load(wf, p, ts, vw), rg))
                s = tile_mul(s, sc)
                if add:  # the values before this call: the saved tail for an overlapping panel
                    if overlap and jb == nj - 1:
                        s = tile_add(tile_load(tail, trows, ts, vw), s)
                    else:
                        s = tile_add(tile_load(of, p, ts, vw), s)
                tile_store(of, p, ts, s)


@njit(parallel=True, cache=True)
def affine_dw_tree(x2, dap, starts, coef, prog, dw, tl, vw):
    """dw (D, M) = the sum, in the order ``prog`` gives, of every shard's term (x2_s.T @ da_s)
    * coef[s], where shard s is rows starts[s]:starts[s + 1] of x2 (N, D) and of da (N, M), which
    pack_panels left in dap; dw C-contiguous, x2's dtype, written, never read. Each term has the
    bits ``affine_dw_l2`` gives the shard alone with reg 0 and scale coef[s] (the k-ordered FMA
    chain from 0 over its own rows, times coef[s], rounded). ``prog``, postfix: s >= 0 pushes
    shard s's term, -1 pops b, then a, and pushes a + b (one rounded addition, as ``np.add``);
    it must leave one value.

    The tasks, blocks and panels are ``affine_dw_l2``'s: x2 and dw are each passed once, where
    one call per shard (with ``add``) reads and writes dw once per shard. A block's terms and
    partial sums wait in a stack of R x G tiles, its top in registers, the rest in L1.
    """
    N, D = x2.shape
    M = dw.shape[1]
    R, C = tile_shape(tl)
    V = lanes(x2, vw)
    G = C * V
    if M < G:  # a panel would start before column 0: vstore does no bounds checks
        raise ValueError("affine_dw_tree: dw needs at least one tile's vectors of columns")
    ns = starts.size - 1
    depth = 0
    height = 0
    for code in prog:  # the program's stack depth; it must pop only what it pushed, and end at 1
        if code >= ns or code < -1 or (code == -1 and height < 2):
            raise ValueError(
                "affine_dw_tree: prog pushes a shard that is not there or pops too much"
            )
        height += 1 if code >= 0 else -1
        depth = max(depth, height)
    if height != 1 or dw.shape[0] != D or starts[0] != 0 or starts[ns] != N or coef.size != ns:
        raise ValueError(
            "affine_dw_tree: expected prog leaving one value, dw (D, M), starts 0..N, a coef each"
        )
    nj = (M + G - 1) // G
    of = dw.reshape(-1)
    for t in prange((D + ROWS - 1) // ROWS):
        ts = tile_vectors(tl, dw, vw)  # a row's vectors: 0, V, ..., (C - 1) * V
        i_lo = t * ROWS
        i_hi = min(i_lo + ROWS, D)
        nb = (i_hi - i_lo + R - 1) // R
        xb = _broadcasts(x2, i_lo, i_hi, R)  # a worker's node: at most 256 rows
        stack = np.empty(max(1, depth - 1) * R * G, dtype=dw.dtype)  # under the top
        for b in range(nb):
            i0 = i_lo + R * b
            xq = tile_rows(tl, 0, R - 1, 1, b * N * R)
            for jb in range(nj):
                j0 = min(jb * G, M - G)
                _prefetch_next_panel(of, of, False, tl, i0, i_hi, D, M, jb, G)
                # the stack's top stays in registers (top), the values under it in ``stack``
                top = tile_zeros(x2, tl, vw)
                sp = 0
                for op in prog:
                    if op >= 0:  # push (sum over shard op's rows k of x2[k, i_r] * da[k, j]) * coef
                        if sp > 0:
                            tile_store(stack, tile_rows(tl, 0, R - 1, G, (sp - 1) * R * G), ts, top)
                        top = tile_zeros(x2, tl, vw)
                        for k in range(starts[op], starts[op + 1]):
                            top = tile_fma(xb, xq, k * R, dap, (jb * N + k) * G, ts, top, vw)
                        top = tile_mul(top, vsplat(coef, op, vw))
                        sp += 1
                    else:  # a + b, b the top
                        a = tile_load(stack, tile_rows(tl, 0, R - 1, G, (sp - 2) * R * G), ts, vw)
                        top = tile_add(a, top)
                        sp -= 1
                tile_store(of, tile_rows(tl, i0, i_hi - 1, M, j0), ts, top)


#: bytes in a cache line (the unit of a prefetch)
LINE = 64


@njit(cache=True, inline="always")
def _broadcasts(x2, i_lo, i_hi, R):
    """xb[(b * N + k) * R + r] = x2[k, min(i_lo + R * b + r, i_hi - 1)]: the broadcasts of a
    dw task's blocks of R rows (rows i_lo..i_hi-1 of dw), in k order (3 * N values a block: in
    L1)."""
    N = x2.shape[0]
    nb = (i_hi - i_lo + R - 1) // R
    xb = np.empty(nb * N * R, dtype=x2.dtype)
    for b in range(nb):
        for r in range(R):
            i = min(i_lo + R * b + r, i_hi - 1)
            for k in range(N):
                xb[(b * N + k) * R + r] = x2[k, i]
    return xb


@njit(cache=True, inline="always")
def _prefetch_next_panel(of, wf, use_w, tl, i0, i_hi, D, M, jb, G):
    """Prefetch the lines of dw (``of``), and of w (``wf``) when ``use_w``, that the panel after
    panel jb of the block at row i0 finishes with (after a block's last panel: the next block's
    first)."""
    R, C = tile_shape(tl)
    nxt = tile_rows(tl, i0, i_hi - 1, M, min(jb * G + G, M - G))
    if jb == (M + G - 1) // G - 1:
        nxt = tile_rows(tl, min(i0 + R, D - 1), D - 1, M, 0)
    for r in range(R):
        for e in range(0, G + LINE // of.itemsize, LINE // of.itemsize):
            if use_w:
                prefetch(wf, nxt[r] + e)
            prefetch(of, nxt[r] + e)


# ---- the input gradient for few rows ---------------------------------------------------------

#: the fewest rows that take ``affine_dx_rows``: a panel is 32 float32
#: rows whatever N; below 16 OpenBLAS is faster, from 16 a worker's shard trains faster with the
#: kernel (timings in docs/scaling.md, "The few-row dx kernel")
DX_MIN_ROWS = 16
#: the most rows that take ``affine_dx_rows``: with w cold in memory (as in training) it beat
#: OpenBLAS's product and ``np.vdot``'s squares up to 512 rows on Zen 4 (6 x 4 tiles; 3 x 4
#: ties at 512), so a worker's shard of up to 256 images takes it (docs/scaling.md)
DX_MAX_ROWS = 256


@njit(cache=True)
def pack_row_panels(da, G, dat):
    """dat[(p * M + k) * G + c] = da[p * G + c, k], 0 past row N - 1: da (N, M) transposed into
    panels of G rows, each contiguous in k (ceil(N / G) panels)."""
    N, M = da.shape
    for p in range((N + G - 1) // G):
        for k in range(M):
            o = (p * M + k) * G
            for c in range(G):
                i = p * G + c
                dat[o + c] = da[i, k] if i < N else 0


@njit(parallel=True, cache=True)
def affine_dx_rows(dat, w, N, dx, sq, tl, vw):
    """dx (N, D) = da @ w.T, da (N, M) as pack_row_panels left it in dat (panels of G = C
    vectors of rows, the tile's C); w (D, M) and dx C-contiguous, one dtype. Meant for
    DX_MIN_ROWS <= N <= DX_MAX_ROWS; correct for any N >= 1. sq: empty, or one float64 per
    task of ROWS rows of w: sq[t] = the sum of w[j]**2 over the task's rows (each row's sum as
    ``_row_sumsq`` takes it, added in row order).

    One task per ROWS rows of w, in blocks of R (the tile's rows). D not a multiple of R: the
    last block of a task repeats its last row (its dx column written again with the same value,
    its square counted once).
    """
    D, M = w.shape
    R, C = tile_shape(tl)
    V = lanes(w, vw)
    G = C * V
    npan = (N + G - 1) // G
    if dx.shape[0] != N or dx.shape[1] != D or dat.size < npan * M * G or N < 1:
        raise ValueError(
            "affine_dx_rows: expected dat of ceil(N / G) panels, w (D, M), dx (N, D), N >= 1"
        )
    if sq.size != 0 and sq.size != (D + ROWS - 1) // ROWS:
        raise ValueError("affine_dx_rows: sq must be empty or hold one value per task of ROWS rows")
    wf = w.reshape(-1)
    KL = LINE // w.itemsize  # values in a cache line
    for t in prange((D + ROWS - 1) // ROWS):
        ts = tile_vectors(tl, w, vw)
        trows = tile_rows(tl, 0, R - 1, G, 0)
        i_lo = t * ROWS
        i_hi = min(i_lo + ROWS, D)
        tb = np.empty(R * G, dtype=w.dtype)  # one tile's sums: tb[r * G + c] = dx[p * G + c, j_r]
        lb = np.empty(SUMSQ_BYTES // w.itemsize, dtype=w.dtype)  # _row_sumsq's lanes
        total = 0.0
        for j0 in range(i_lo, i_hi, R):
            qs = tile_rows(tl, j0, i_hi - 1, M, 0)  # rows j_r = min(j0 + r, i_hi - 1) of w
            # the rows the next block reads (the next task's first after the last), fetched
            # line by line as these are read: w streams from memory at the rate it is used
            nq = tile_rows(tl, j0 + R, D - 1, M, 0)
            for p in range(npan):
                # s[r*C + c] = sum_k w[j_r, k] * da[p*G + c*V : p*G + (c+1)*V, k]
                s = tile_zeros(w, tl, vw)
                for k0 in range(0, M, KL):
                    if p == 0:
                        for r in range(R):
                            prefetch(wf, nq[r] + k0)
                    for k in range(k0, min(M, k0 + KL)):
                        s = tile_fma(wf, qs, k, dat, (p * M + k) * G, ts, s, vw)
                tile_store(tb, trows, ts, s)
                for c in range(min(G, N - p * G)):
                    row = dx[p * G + c]
                    for r in range(R):
                        row[min(j0 + r, i_hi - 1)] = tb[r * G + c]
            if sq.size:  # the rows just read, from L1, in row order
                for r in range(min(R, i_hi - j0)):
                    total += _row_sumsq(wf, (j0 + r) * M, M, lb, vw)
        if sq.size:
            sq[t] = total


#: _row_sumsq's sums run over logical blocks of this many bytes (16 float32 / 8 float64 lanes),
#: whatever the vector width: the same bits at every width
SUMSQ_BYTES = 64


@njit(cache=True, inline="always")
def _row_sumsq(wf, q, M, lb, vw):
    """sum of wf[q:q + M]**2, the same bits at every width: lane l of a logical block of
    B = SUMSQ_BYTES values sums the squares of wf[q + l], wf[q + l + B], ... (an FMA chain in w's
    dtype; B / V vectors at width V), then the lanes are folded, (l, l + B/2) pairs added and the
    pairs summed in order in w's dtype, then the tail's squares (each rounded in w's dtype) added
    one by one in float64. lb: scratch of B values."""
    V = lanes(wf, vw)
    B = lb.size
    nv = B // V  # 1, 2 or 4 vectors per logical block
    a0 = vzero(wf, vw)
    a1 = vzero(wf, vw)
    a2 = vzero(wf, vw)
    a3 = vzero(wf, vw)
    k = 0
    while k + B <= M:
        u = vload(wf, q + k, vw)
        a0 = vfma(u, u, a0)
        if nv > 1:
            u = vload(wf, q + k + V, vw)
            a1 = vfma(u, u, a1)
        if nv > 2:
            u = vload(wf, q + k + 2 * V, vw)
            a2 = vfma(u, u, a2)
            u = vload(wf, q + k + 3 * V, vw)
            a3 = vfma(u, u, a3)
        k += B
    vstore(lb, 0, a0)
    if nv > 1:
        vstore(lb, V, a1)
    if nv > 2:
        vstore(lb, 2 * V, a2)
        vstore(lb, 3 * V, a3)
    h = B // 2
    s = lb[0] + lb[h]
    for i in range(1, h):
        s += lb[i] + lb[i + h]
    total = np.float64(s)  # (Numba's float() keeps a float32 a float32)
    while k < M:
        total += np.float64(wf[q + k] * wf[q + k])
        k += 1
    return total


# ---- the forward product for few rows ----------------------------------------------------------

#: at most this many rows take ``affine_relu_rows``; from 64 rows on one thread OpenBLAS's product
#: was as fast or faster (timings in docs/scaling.md, "The few-row forward kernel")
FWD_MAX_ROWS = 63
#: columns per task (at least one group of G = C vectors): 2 tasks for M = 500 in float32
FWD_TASK_COLS = 256
#: bytes of w per k block: a strip of w (k x G) read by every row tile from L1 (32 kB: 128 k
#: at G = 64 float32 columns)
FWD_STRIP_BYTES = 32768


@njit(parallel=True, cache=True)
def affine_relu_rows(x2, w, b, out, tl, vw):
    """out (N, M) = relu(x2 (N, D) @ w (D, M) + b (M,)); all C-contiguous, one dtype;
    M >= G = C vectors (the tile's C). Meant for N < 64 (``FWD_MAX_ROWS``); correct for any
    N >= 1.

    One task per FWD_TASK_COLS columns, in groups of G (the last group ends at column M - 1,
    overlapping the one before it when G does not divide M; both compute the same values). N
    not a multiple of R (the tile's rows): the last row tile repeats row N - 1 into scratch rows
    that are never read.
    """
    N, D = x2.shape
    M = w.shape[1]
    R, C = tile_shape(tl)
    V = lanes(w, vw)
    G = C * V
    if M < G:  # a group would start before column 0: vload does no bounds checks
        raise ValueError("affine_relu_rows: w needs at least one tile's vectors of columns")
    if w.shape[0] != D or b.shape[0] != M or out.shape[0] != N or out.shape[1] != M or D == 0:
        raise ValueError(
            "affine_relu_rows: expected x2 (N, D), w (D, M), b (M,), out (N, M) with D >= 1"
        )
    ng = (M + G - 1) // G
    gpt = max(1, FWD_TASK_COLS // G)  # groups per task
    nt = (N + R - 1) // R  # row tiles of R
    TS = nt * R * G  # one group's sums in scratch: row i at i * G
    KB = max(1, FWD_STRIP_BYTES // (G * w.itemsize))  # k per block
    ppt = (min(KB, D) + nt - 1) // nt  # rows of the next strip each tile prefetches
    xf = x2.reshape(-1)
    wf = w.reshape(-1)
    for task in prange((ng + gpt - 1) // gpt):
        g_lo = task * gpt
        g_hi = min(ng, g_lo + gpt)
        acc = np.empty((g_hi - g_lo) * TS, dtype=w.dtype)
        for k0 in range(0, D, KB):
            k1 = min(D, k0 + KB)
            for g in range(g_lo, g_hi):
                j0 = min(g * G, M - G)
                # the strip read next: the next group's in this k block, else the first group's
                # in the next block (none past the last)
                nk0, nj0 = (
                    (k0, min((g + 1) * G, M - G))
                    if g + 1 < g_hi
                    else (k0 + KB, min(g_lo * G, M - G))
                )
                nk1 = min(D, nk0 + KB)
                base = (g - g_lo) * TS
                for t in range(nt):
                    i0 = R * t
                    for kk in range(nk0 + t * ppt, min(nk1, nk0 + (t + 1) * ppt)):
                        o = kk * M + nj0
                        prefetch(wf, o)
                        prefetch(wf, o + G // 2)
                        prefetch(wf, o + G - 1)
                    _strip(
                        xf,
                        tile_rows(tl, i0, N - 1, D, k0),
                        wf,
                        k0 * M + j0,
                        M,
                        k1 - k0,
                        acc,
                        tile_rows(tl, i0, i0 + R - 1, G, base),
                        k0 == 0,
                        tl,
                        vw,
                    )
        # out = relu(sums + b) as np.maximum(v, 0) gives it: v when v > 0 or NaN, else +0.0
        # (-0.0 too)
        for g in range(g_lo, g_hi):
            j0 = min(g * G, M - G)
            base = (g - g_lo) * TS
            for i in range(N):
                row = out[i]
                for c in range(G):
                    v = acc[base + i * G + c] + b[j0 + c]
                    row[j0 + c] = v if (v > 0 or v != v) else 0


@njit(cache=True, inline="never")
def _strip(xf, ps, wf, q, M, nk, acc, ss, first, tl, vw):
    """acc[s_r : s_r + G] (+)= sum over k < nk of xf[p_r + k] * wf[q + k*M : q + k*M + G] for
    the tile's rows r (G = C vectors), from zeros when ``first``: one strip of w for one row
    tile. Not inlined: LLVM keeps the sums in registers in a loop of its own."""
    ts = tile_vectors(tl, wf, vw)
    sums = tile_zeros(wf, tl, vw) if first else tile_load(acc, ss, ts, vw)
    for k in range(nk):
        sums = tile_fma(xf, ps, k, wf, q + k * M, ts, sums, vw)
    tile_store(acc, ss, ts, sums)
