"""Summing shard gradients in a fixed order, finishing the step gradient, combining BN moments.

The order of a floating-point sum changes its bits, so the shard gradients of a step are
always added in one fixed pairwise tree over the shard index, whoever holds them:

    level by level, neighbours are added (0+1, 2+3, ...); an odd last one moves up unchanged.

A worker sums its own shards into the largest tree nodes inside its range (``pairwise`` over
whole arrays); :func:`tree_update` finishes the tree element by element for one slice of the
parameters from every worker's nodes (:mod:`pipeline.training.plan` says which), fused with the
division by the batch size, the L2 term and the update (Adam or SGD). The bits are the same
whoever adds: IEEE addition of two numbers is the same in every process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numba
import numpy as np

from pipeline._kernels.threads import launch
from pipeline.optim import add_scaled, muon_update
from pipeline.training.update import adam_scalars, step_scalars

T = TypeVar("T")


def pairwise(items: Sequence[T], add: Callable[[T, T], T]) -> T:
    """Reduce ``items`` with ``add`` along the fixed pairwise tree (see module docstring)."""
    level = list(items)
    if not level:
        raise ValueError("pairwise: nothing to reduce")
    while len(level) > 1:
        nxt = [add(level[j], level[j + 1]) for j in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


@numba.njit(cache=True, nogil=True)
def _sumsq8(w):  # pragma: no cover - compiled
    # w (n,): sum of w**2 in float64 on 8 lanes (lane i % 8), lanes added in a fixed order
    acc = np.zeros(8, dtype=np.float64)
    n8 = w.shape[0] // 8 * 8
    for i in range(0, n8, 8):
        for j in range(8):
            x = np.float64(w[i + j])
            acc[j] += x * x
    for i in range(n8, w.shape[0]):
        x = np.float64(w[i])
        acc[i - n8] += x * x
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))


# element loops are prange loops even on one thread: the form LLVM vectorizes
@numba.njit(cache=True, nogil=True, parallel=True)
def _add(x, y, out):  # pragma: no cover - compiled
    # out (n,) = x (n,) + y (n,): one node of the shard tree
    for i in numba.prange(out.shape[0]):
        out[i] = x[i] + y[i]


@numba.njit(cache=True, nogil=True, parallel=True)
def _adam_piece(
    s, w, m, v, w2, m2, v2, reg, batch, b1, omb1, b2, omb2, bc1, bc2, lr, eps, lrwd
):  # pragma: no cover
    # s (n,) tree sums -> g = the batch's mean gradient + reg * W (the only place L2 is added);
    # then exactly pipeline.optim.adam's arithmetic: (w, m, v) (n,) -> (w2, m2, v2) (n,);
    # with lrwd (lr x weight decay, decoupled: AdamW) also w2 -= lrwd * w
    for i in numba.prange(s.shape[0]):
        wi = w[i]
        g = s[i] / batch + reg * wi
        mi = b1 * m[i] + omb1 * g
        vi = b2 * v[i] + omb2 * (g * g)
        m2[i] = mi
        v2[i] = vi
        w2[i] = wi - lr * (mi / bc1) / (np.sqrt(vi / bc2) + eps)
        if lrwd != 0:
            w2[i] = w2[i] - lrwd * wi


@numba.njit(cache=True, nogil=True, parallel=True)
def _sgd_piece(
    s, w, m, v, w2, m2, v2, reg, batch, mu, nesterov, lr, lrwd, ema, omema, pull
):  # pragma: no cover
    # s (n,) tree sums -> g as _adam_piece's; then PyTorch's SGD with momentum mu (buffer m):
    #   buf = mu * m + g;  step = g + mu * buf (Nesterov) or buf;  w2 = w - lr * step,
    # and decoupled weight decay w2 -= lrwd * w; v (Adam's, unused by SGD) holds the moving
    # average of the weights, v2 = ema * v + (1 - ema) * w2, or is carried over (ema 0); with
    # pull (lookahead) the weights then become that average, w2 = v2
    for i in numba.prange(s.shape[0]):
        wi = w[i]
        g = s[i] / batch + reg * wi
        buf = mu * m[i] + g
        d = g + mu * buf if nesterov else buf
        m2[i] = buf
        w2[i] = wi - lr * d
        if lrwd != 0:
            w2[i] = w2[i] - lrwd * wi
        v2[i] = ema * v[i] + omema * w2[i] if ema != 0 else v[i]
        if pull != 0:
            w2[i] = v2[i]


@numba.njit(cache=True, nogil=True, parallel=True)
def _muon_piece(s, w, m, v, w2, m2, v2, reg, batch, mu, nesterov):  # pragma: no cover
    # s (n,) tree sums -> g as _sgd_piece's; the momentum of a filter Muon updates, w2 = its
    # direction (buf = mu * m + g; g + mu * buf with Nesterov): tree_update then steps the
    # whole filter along its orthogonalization (pipeline.optim.muon_update); v carried over
    for i in numba.prange(s.shape[0]):
        g = s[i] / batch + reg * w[i]
        buf = mu * m[i] + g
        m2[i] = buf
        w2[i] = g + mu * buf if nesterov else buf
        v2[i] = v[i]


@numba.njit(cache=True, nogil=True)
def _tree_update(
    nodes,
    rows,
    ops,
    root,
    nbase,
    w,
    m,
    v,
    w2,
    m2,
    v2,
    wbase,
    piece_lo,
    piece_hi,
    piece_reg,
    piece_lrf,
    piece_muon,
    block_piece,
    partial,
    batch,
    kind,
    b1,
    omb1,
    b2,
    omb2,
    bc1,
    bc2,
    lr,
    eps,
    mu,
    nesterov,
    lrwd,
    muon_mu,
):  # pragma: no cover - compiled
    # nodes (r, *): the frontier nodes' gradient sums, element i in column i - nbase;
    # w, m, v (*): parameters and optimizer state in; w2, m2, v2 out; element i at i - wbase;
    # pieces [piece_lo, piece_hi) with their reg and lr factor, grouped by block (block_piece:
    # CSR offsets), piece_muon 1 where a filter Muon updates (momentum muon_mu: _muon_piece);
    # partial (blocks,) float64: each block's sum of w**2 over its regularized pieces.
    # kind 0: Adam (b1 .. eps); kind 1: SGD (mu, nesterov; b1, omb1: the weights' average's
    # decay a, 1 - a; b2: 1 to set the weights to the average, lookahead's pull;
    # UpdateRule.average); lrwd: decoupled decay.
    r = rows.shape[0]
    buf = np.empty(
        (max(ops.shape[0], 1), piece_hi.max() - piece_lo.min() if piece_lo.shape[0] else 1),
        dtype=w.dtype,
    )
    for blk in range(block_piece.shape[0] - 1):
        total = 0.0
        for p in range(block_piece[blk], block_piece[blk + 1]):
            lo, hi, reg, lrp = piece_lo[p], piece_hi[p], piece_reg[p], lr * piece_lrf[p]
            # a frozen piece (lr factor 0) is not decayed either, nor averaged (it stays)
            lrwdp = lrwd if piece_lrf[p] != 0 else lrwd - lrwd
            emap = b1 if piece_lrf[p] != 0 else b1 - b1
            pullp = b2 if piece_lrf[p] != 0 else b2 - b2
            n = hi - lo
            c0, k0 = lo - nbase, lo - wbase
            # the rest of the tree: registers 0..r-1 are node rows, op j writes register r + j
            for j in range(ops.shape[0]):
                a, b = ops[j, 1], ops[j, 2]
                x = nodes[rows[a], c0 : c0 + n] if a < r else buf[a - r, :n]
                y = nodes[rows[b], c0 : c0 + n] if b < r else buf[b - r, :n]
                _add(x, y, buf[ops[j, 0] - r, :n])
            s = nodes[rows[root], c0 : c0 + n] if root < r else buf[root - r, :n]
            if reg != 0:
                total += _sumsq8(w[k0 : k0 + n])
            views = (
                w[k0 : k0 + n],
                m[k0 : k0 + n],
                v[k0 : k0 + n],
                w2[k0 : k0 + n],
                m2[k0 : k0 + n],
                v2[k0 : k0 + n],
            )
            if kind == 0:
                _adam_piece(s, *views, reg, batch, b1, omb1, b2, omb2, bc1, bc2, lrp, eps, lrwdp)
            elif piece_muon[p] != 0:
                _muon_piece(s, *views, reg, batch, muon_mu, nesterov)
            else:
                _sgd_piece(s, *views, reg, batch, mu, nesterov, lrp, lrwdp, emap, omb1, pullp)
        partial[blk] = total


def pieces(lo: int, hi: int, segments: Sequence[tuple], chunk: int):
    """``[lo, hi)`` cut at ``chunk`` block and segment boundaries (a segment: (start, stop,
    reg[, lr factor = 1])): arrays (piece_lo, piece_hi, piece_reg, piece_lr_factor,
    block_piece), pieces grouped by block (CSR offsets)."""
    los, his, regs, factors, firsts = [], [], [], [], []
    for blk_lo in range(lo, hi, chunk):
        firsts.append(len(los))
        blk_hi = min(hi, blk_lo + chunk)
        for a, b, reg, *factor in segments:
            a, b = max(a, blk_lo), min(b, blk_hi)
            if a < b:
                los.append(a)
                his.append(b)
                regs.append(reg)
                factors.append(factor[0] if factor else 1.0)
    firsts.append(len(los))
    return (
        np.asarray(los, np.int64),
        np.asarray(his, np.int64),
        np.asarray(regs, np.float64),
        np.asarray(factors, np.float64),
        np.asarray(firsts, np.int64),
    )


def tree_update(
    nodes: np.ndarray,
    rows: Sequence[int],
    ops: Sequence[tuple[int, int, int]],
    root: int,
    nbase: int,
    state_in: tuple,
    state_out: tuple,
    wbase: int,
    lo: int,
    hi: int,
    segments: Sequence[tuple[int, int, float]],
    chunk: int,
    batch: int,
    scalars: tuple,
    muon: tuple | None = None,
) -> np.ndarray:
    """Reduce, L2 and the optimizer's update (Adam or SGD) for the parameter elements
    ``[lo, hi)`` in one pass over memory.

    ``nodes`` (r, *): frontier nodes of the shard tree, register j in row ``rows[j]``, element i
    in column ``i - nbase``; ``ops``, ``root`` (:func:`pipeline.training.plan.program`) finish
    the tree. ``state_in = (w, m, v)`` are read, ``state_out`` written, element i at
    ``i - wbase``. ``segments``: (start, stop, reg[, lr factor]) of every parameter.
    ``scalars``: :meth:`pipeline.training.update.UpdateRule.scalars` (the layout of
    :func:`pipeline.training.update.step_scalars`). ``muon`` (SGD only): ``(filters, lr,
    momentum)``, the (start, stop, rows) of each filter Muon updates and its rate and momentum
    at this step (:meth:`pipeline.training.update.UpdateRule.muon_at`); a filter lies wholly
    inside ``[lo, hi)`` or outside it (:class:`pipeline.training.plan.StepPlan` never cuts one).
    Returns, per ``chunk`` block of ``[lo, hi)``, the float64 sum of ``w**2`` over its
    regularized elements (the L2 term of the loss, before the update).
    """
    plo, phi, preg, plrf, first = pieces(lo, hi, segments, chunk)
    filters, muon_lr, muon_mu = muon if muon else ((), 0.0, 0.0)
    mine = [(a, b, rows) for a, b, rows in filters if a < hi and lo < b]
    for a, b, _ in mine:
        if a < lo or b > hi:
            raise ValueError(f"tree_update: the filter [{a}, {b}) is cut by the slice [{lo}, {hi})")
    if mine and scalars[0] != 1:
        raise ValueError("tree_update: Muon's filters need the SGD update (kind 1)")
    pmuon = np.array([any(a <= x < b for a, b, _ in mine) for x in plo], dtype=np.int64)
    dt = state_in[0].dtype.type
    partial = np.zeros(len(first) - 1, dtype=np.float64)
    launch(
        _tree_update,
        nodes,
        np.asarray(rows, dtype=np.int64),
        np.asarray(ops, dtype=np.int64).reshape(-1, 3),
        int(root),
        int(nbase),
        *state_in,
        *state_out,
        int(wbase),
        plo,
        phi,
        preg.astype(dt),
        plrf.astype(dt),
        pmuon,
        first,
        partial,
        dt(batch),
        *scalars,
        dt(muon_mu),
    )
    # Muon: each filter (its momentum direction in w2) steps along its orthogonalization, then
    # is averaged as _sgd_piece averages (a, 1 - a, pull: the scalars' b1, 1 - b1, b2)
    (w, _, v), (w2, _, v2) = state_in, state_out
    a_avg, one_minus_a, pull = scalars[1], scalars[2], scalars[3]
    for a, b, rows in mine:
        k0, k1 = a - wbase, b - wbase
        new = muon_update(w[k0:k1].reshape(rows, -1), w2[k0:k1].reshape(rows, -1), muon_lr)
        new = new.reshape(-1)
        if a_avg != 0:
            v2[k0:k1] = a_avg * v[k0:k1] + one_minus_a * new
        w2[k0:k1] = v2[k0:k1] if pull != 0 else new
    return partial


def combine_moments(
    means: Sequence[np.ndarray], variances: Sequence[np.ndarray], counts: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (biased) variance of the union of shards, from their own moments.

    Exact in exact arithmetic: ``var = sum n_i (var_i + (mean_i - mean)**2) / N``; computed in
    float64 and returned in the shards' dtype.
    """
    dtype = np.asarray(means[0]).dtype
    n = np.asarray(counts, dtype=np.float64)
    mu = np.stack([np.asarray(m, dtype=np.float64) for m in means])
    var = np.stack([np.asarray(v, dtype=np.float64) for v in variances])
    total = n.sum()
    mean = (n[:, None] * mu).sum(0) / total
    variance = (n[:, None] * (var + (mu - mean) ** 2)).sum(0) / total
    return mean.astype(dtype), variance.astype(dtype)


def warm_kernels(dtype) -> None:
    """Load (or compile) the kernels of the reduce for ``dtype`` before anything is timed: this
    module's and :func:`pipeline.optim.add_scaled` (a leaf added into its tree node)."""
    w = np.zeros(16, dtype=dtype)
    state = (w, w.copy(), w.copy())
    nodes = np.zeros((2, 16), dtype=dtype)
    for ops, root in (([], 0), ([(2, 0, 1)], 2)):
        for scalars in (adam_scalars({}, dtype), step_scalars(dtype, 1, momentum=0.9)):
            tree_update(
                nodes,
                [0, 1],
                ops,
                root,
                0,
                state,
                tuple(x.copy() for x in state),
                0,
                0,
                16,
                [(0, 16, 1e-3)],
                8,
                1,
                scalars,
            )
    add_scaled(w.copy(), w, w.dtype.type(2))
