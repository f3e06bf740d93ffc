"""Sandwich layers: common sequences of layers as one forward/backward pair (cs231n API).

They use the fast layers inside and fuse where it saves a pass over the data:
- conv_relu: the ReLU runs in the pass that writes the conv's output (with the bias); its
  backward masks dout by that output once, before the convolution's backward kernels.
- conv_relu_pool, conv_bn_relu_pool, conv_gn_relu_pool: ReLU and pooling are one pass
  (max of the window, then max(., 0)); the pool's backward masks the gradient by its output.
- affine_relu forward with fewer than 64 rows: product, bias and ReLU in one pass
  (``fast_layers.affine_relu_forward_fast``).
- affine_relu backward's dx with 16 to 63 rows: one pass over w, which also gives sum(w**2)
  with ``sumsq`` (``fast_layers.affine_dx_fast``).
- affine_relu backward with ``reg`` or ``dw_out``: the L2 term's gradient reg * w is added to
  dw, and dw scaled and written to (or added into) the caller's array, in the pass that writes
  dw (``fast_layers.affine_dw_l2_fast``: float32 or float64 with at least 32 or 16 columns;
  otherwise after NumPy's product, with the same rounding).
The results equal those of the unfused composition of the layers (tests check that), except
where a kernel sums a product in its own order (affine_relu's forward under 64 rows, its dx with
16 to 63 rows, its dw with ``reg`` or ``dw_out``): there they agree to rounding.

Every backward function takes the keyword ``compute_dx`` (default True); with
``compute_dx=False`` it returns None for dx and skips that work (a network's first layer does
not need the gradient of its input images). dtypes follow ``pipeline.layers``: out and dx in
x's dtype, each parameter's gradient in that parameter's dtype.
"""

from __future__ import annotations

import numpy as np

from pipeline import fast_layers as fl
from pipeline.shapes import (
    check_bn_mode,
    check_dout,
    check_groups,
    conv_output_shape,
    layer_dtype,
    pool_output_shape,
    require_ndim,
)

__all__ = [
    "affine_relu_forward",
    "affine_relu_backward",
    "affine_relu_forward_shards",
    "affine_relu_dx_shards",
    "affine_relu_dw_sum",
    "conv_relu_forward",
    "conv_relu_backward",
    "conv_relu_pool_forward",
    "conv_relu_pool_backward",
    "conv_bn_relu_pool_forward",
    "conv_bn_relu_pool_backward",
    "conv_gn_relu_pool_forward",
    "conv_gn_relu_pool_backward",
]


def _check_conv_pool(x, w, conv_param, pool_param) -> None:
    """Check every shape before any work: conv arguments, then the pool on the conv's output."""
    require_ndim("x", x, 4, "(N, C, H, W)")
    require_ndim("w", w, 4, "(F, C, HH, WW)")
    pool_output_shape(conv_output_shape(np.shape(x), np.shape(w), conv_param), pool_param)


# --------------------------------------------------------------------------------------------
# affine - relu


def affine_relu_forward(x, w, b):
    """Affine transform followed by a ReLU.

    Inputs:
    - x: input, shape (N, d_1, ..., d_k)
    - w: weights, shape (D, M) with D = d_1 * ... * d_k
    - b: biases, shape (M,)

    Returns a tuple of:
    - out: relu(x.reshape(N, D) @ w + b), shape (N, M), dtype of x
    - cache: for affine_relu_backward

    Fewer than 64 rows take one kernel pass (``fast_layers.affine_relu_forward_fast``).
    """
    return fl.affine_relu_forward_fast(x, w, b)


def affine_relu_backward(
    dout,
    cache,
    compute_dx=True,
    reg=0.0,
    dw_out=None,
    scale=1.0,
    add=False,
    sumsq=False,
    compute_dw=True,
):
    """Backward pass of affine_relu_forward.

    Inputs:
    - dout: upstream derivatives, shape (N, M)
    - cache: from affine_relu_forward
    - compute_dx: if False, dx is None and not computed
    - reg: if nonzero, dw includes reg * w, the gradient of an L2 term 0.5 * reg * sum(w**2)
      (``fast_layers.affine_dw_l2_fast``)
    - dw_out, scale, add: if dw_out (a C-contiguous (D, M) array of w's dtype) is given, dw * scale
      is written into it, or added into it with ``add``, in the pass that computes dw, and
      dw_out is returned as dw
    - sumsq: if True (with compute_dx), also return sum(w**2) (for the L2 term's value), from
      the pass that computes dx (``fast_layers.affine_dx_fast``)
    - compute_dw: if False, dw is None and not computed (a model computes it in a later call,
      with compute_dx=False, e.g. right before the update that reads it)

    Returns a tuple of:
    - dx: shape of x, dtype of x (or None)
    - dw: shape (D, M), dtype of w (or None)
    - db: shape (M,), dtype of b
    - sumsq: a float, only when ``sumsq``
    """
    (x, w, b), out = cache
    da = _relu_grad(dout, cache)
    N = x.shape[0]
    if sumsq and not compute_dx:
        raise ValueError(
            "affine_relu_backward: sumsq=True comes from the dx pass; it needs compute_dx=True"
        )
    dx = sq = None
    if compute_dx:
        dx, sq = fl.affine_dx_fast(da, w, sumsq=True) if sumsq else (fl.affine_dx_fast(da, w), None)
        dx = dx.reshape(x.shape).astype(layer_dtype(x), copy=False)
    if not compute_dw:
        dw = None
    elif reg or dw_out is not None:
        dw = fl.affine_dw_l2_fast(x, da, w, reg, scale=scale, out=dw_out, add=add)
    else:
        dw = (np.asarray(x).reshape(N, -1).T @ da).astype(layer_dtype(w), copy=False)
    db = da.sum(axis=0).astype(layer_dtype(b), copy=False)
    return (dx, dw, db, sq) if sumsq else (dx, dw, db)


def _relu_grad(dout, cache):
    """The gradient at the affine output (before the ReLU) of affine_relu_forward's ``cache``."""
    out = cache[1]
    dout = check_dout(dout, out.shape, "affine_relu")
    return np.where(out > 0, dout, 0).astype(out.dtype, copy=False)


def _check_shards(douts, caches, name) -> None:
    if not caches or len(douts) != len(caches):
        raise ValueError(
            f"{name}: expected one dout per cache, at least one; got {len(douts)} dout, "
            f"{len(caches)} caches"
        )


# --------------------------------------------------------------------------------------------
# affine - relu, several shards at once (a data-parallel worker's): one pass over w per step


def affine_relu_forward_shards(xs, w, b):
    """affine_relu_forward on each x of ``xs``: a list of (out, cache), each shard's bits those
    it has alone, w read once for all of them where the kernel takes every shard
    (``fast_layers.affine_relu_forward_shards``)."""
    return fl.affine_relu_forward_shards(xs, w, b)


def affine_relu_dx_shards(douts, caches, sumsq=False):
    """affine_relu_backward(dout, cache, compute_dw=False[, sumsq]) of every shard, w read once
    for all of them where the kernel takes every shard (``fast_layers.affine_dx_shards``).

    Returns a tuple of:
    - dxs: each shard's dx, shape and dtype of its x
    - dbs: each shard's db, dtype of b
    - sumsqs: each shard's sum(w**2) (its bits follow the shard's path), only when ``sumsq``
    """
    _check_shards(douts, caches, "affine_relu_dx_shards")
    das = [_relu_grad(dout, cache) for dout, cache in zip(douts, caches)]
    w = caches[0][0][1]
    got = fl.affine_dx_shards(das, w, sumsq=sumsq)
    dxs, sq = got if sumsq else (got, None)
    dxs = [
        dx.reshape(c[0][0].shape).astype(layer_dtype(c[0][0]), copy=False)
        for dx, c in zip(dxs, caches)
    ]
    dbs = [da.sum(axis=0).astype(layer_dtype(c[0][2]), copy=False) for da, c in zip(das, caches)]
    return (dxs, dbs, sq) if sumsq else (dxs, dbs)


def affine_relu_dw_sum(douts, caches, scales, order, out, reg=0.0):
    """The shards' dw (with reg, + reg * w) times their ``scales``, summed in ``order``
    (``fast_layers.sum_in_order``) into ``out``: the bits of affine_relu_backward(dout, cache,
    compute_dx=False, reg=reg, dw_out=..., scale=..., add=...) shard by shard along ``order``,
    in one pass over out where the kernel takes every shard (``fast_layers.affine_dw_sum``).
    Returns out."""
    _check_shards(douts, caches, "affine_relu_dw_sum")
    das = [_relu_grad(dout, cache) for dout, cache in zip(douts, caches)]
    xs = [c[0][0] for c in caches]
    return fl.affine_dw_sum(xs, das, caches[0][0][1], scales, order, out, reg=reg)


# --------------------------------------------------------------------------------------------
# conv - relu


def conv_relu_forward(x, w, b, conv_param):
    """Convolution followed by a ReLU (bias and ReLU fused into the conv's output pass).

    Inputs:
    - x: input, shape (N, C, H, W)
    - w: filters, shape (F, C, HH, WW)
    - b: biases, shape (F,)
    - conv_param: dict with 'stride' and 'pad'

    Returns a tuple of:
    - out: relu(conv(x, w) + b), shape (N, F, H', W'), dtype of x
    - cache: for conv_relu_backward
    """
    return fl.conv_relu_forward_fast(x, w, b, conv_param)


def conv_relu_backward(dout, cache, compute_dx=True):
    """Backward pass of conv_relu_forward.

    Returns a tuple of:
    - dx: shape (N, C, H, W), dtype of x (None when compute_dx=False)
    - dw: shape (F, C, HH, WW), dtype of w
    - db: shape (F,), dtype of b
    """
    return fl.conv_backward_fast(dout, cache, compute_dx=compute_dx)


# --------------------------------------------------------------------------------------------
# conv - relu - pool


def conv_relu_pool_forward(x, w, b, conv_param, pool_param):
    """Convolution, ReLU and max pooling (``fast_layers.conv_relu_pool_forward_fast``: ReLU and
    pooling in one pass, and on the direct kernels in the convolution's own).

    Inputs:
    - x: input, shape (N, C, H, W)
    - w: filters, shape (F, C, HH, WW)
    - b: biases, shape (F,)
    - conv_param: dict with 'stride' and 'pad'
    - pool_param: dict with 'pool_height', 'pool_width' and 'stride'

    Returns a tuple of:
    - out: max_pool(relu(conv(x, w) + b)), shape (N, F, H'', W''), dtype of x
    - cache: for conv_relu_pool_backward
    """
    _check_conv_pool(x, w, conv_param, pool_param)
    return fl.conv_relu_pool_forward_fast(x, w, b, conv_param, pool_param)


def conv_relu_pool_backward(dout, cache, compute_dx=True):
    """Backward pass of conv_relu_pool_forward. Without dx, on the direct convolution kernels
    and windows that do not overlap, dw and db come straight from the pooled gradient
    (``fast_layers.conv_pool_dw_fast``: the same bits, a quarter of the pixels for 2x2 windows).

    Returns a tuple of:
    - dx: shape (N, C, H, W), dtype of x (None when compute_dx=False)
    - dw: shape (F, C, HH, WW), dtype of w
    - db: shape (F,), dtype of b
    """
    conv_cache, pool_cache = cache
    dout = check_dout(dout, pool_cache[2].shape, "conv_relu_pool")
    if not compute_dx:
        grads = fl.conv_pool_dw_fast(dout, conv_cache, pool_cache)
        if grads is not None:
            return None, *grads
    da = fl.max_pool_backward_fast(dout, pool_cache)
    return fl.conv_backward_fast(da, conv_cache, compute_dx=compute_dx)


# --------------------------------------------------------------------------------------------
# conv - norm - relu - pool


def conv_bn_relu_pool_forward(x, w, b, gamma, beta, conv_param, bn_param, pool_param):
    """Convolution, spatial batch norm, ReLU and max pooling (ReLU and pooling in one pass).

    Inputs:
    - x: input, shape (N, C, H, W)
    - w, b: filters (F, C, HH, WW) and biases (F,)
    - gamma, beta: batch-norm scale and shift, shape (F,)
    - conv_param: dict with 'stride' and 'pad'
    - bn_param: dict as for spatial_batchnorm_forward ('mode' required; its running_mean /
      running_var are updated in train mode)
    - pool_param: dict with 'pool_height', 'pool_width' and 'stride'

    Returns a tuple of:
    - out: shape (N, F, H'', W''), dtype of x
    - cache: for conv_bn_relu_pool_backward (only usable after a train-mode forward pass)
    """
    _check_conv_pool(x, w, conv_param, pool_param)
    check_bn_mode(bn_param.get("mode"))
    a, conv_cache = fl.conv_forward_fast(x, w, b, conv_param)
    an, bn_cache = fl.spatial_batchnorm_forward_fast(a, gamma, beta, bn_param)
    out, pool_cache = fl.relu_max_pool_forward_fast(an, pool_param)
    return out, (conv_cache, bn_cache, pool_cache)


def conv_bn_relu_pool_backward(dout, cache, compute_dx=True):
    """Backward pass of conv_bn_relu_pool_forward.

    Returns a tuple of:
    - dx: shape (N, C, H, W), dtype of x (None when compute_dx=False)
    - dw: shape (F, C, HH, WW), dtype of w
    - db: shape (F,), dtype of b
    - dgamma, dbeta: shape (F,), dtypes of gamma and beta
    """
    conv_cache, bn_cache, pool_cache = cache
    dan = fl.max_pool_backward_fast(dout, pool_cache)
    da, dgamma, dbeta = fl.spatial_batchnorm_backward_fast(dan, bn_cache)
    dx, dw, db = fl.conv_backward_fast(da, conv_cache, compute_dx=compute_dx)
    return dx, dw, db, dgamma, dbeta


def conv_gn_relu_pool_forward(x, w, b, gamma, beta, conv_param, G, gn_param, pool_param):
    """Convolution, spatial group norm, ReLU and max pooling (ReLU and pooling in one pass).

    Inputs:
    - x: input, shape (N, C, H, W)
    - w, b: filters (F, C, HH, WW) and biases (F,)
    - gamma, beta: group-norm scale and shift, one value per filter, e.g. (1, F, 1, 1) or (F,)
    - conv_param: dict with 'stride' and 'pad'
    - G: number of groups, a positive divisor of F
    - gn_param: dict with 'eps' (default 1e-5)
    - pool_param: dict with 'pool_height', 'pool_width' and 'stride'

    Returns a tuple of:
    - out: shape (N, F, H'', W''), dtype of x
    - cache: for conv_gn_relu_pool_backward
    """
    _check_conv_pool(x, w, conv_param, pool_param)
    check_groups(np.shape(w)[0], G)
    a, conv_cache = fl.conv_forward_fast(x, w, b, conv_param)
    an, gn_cache = fl.spatial_groupnorm_forward_fast(a, gamma, beta, G, gn_param)
    out, pool_cache = fl.relu_max_pool_forward_fast(an, pool_param)
    return out, (conv_cache, gn_cache, pool_cache)


def conv_gn_relu_pool_backward(dout, cache, compute_dx=True):
    """Backward pass of conv_gn_relu_pool_forward.

    Returns a tuple of:
    - dx: shape (N, C, H, W), dtype of x (None when compute_dx=False)
    - dw: shape (F, C, HH, WW), dtype of w
    - db: shape (F,), dtype of b
    - dgamma, dbeta: shapes and dtypes of gamma and beta
    """
    conv_cache, gn_cache, pool_cache = cache
    dan = fl.max_pool_backward_fast(dout, pool_cache)
    da, dgamma, dbeta = fl.spatial_groupnorm_backward_fast(dan, gn_cache)
    dx, dw, db = fl.conv_backward_fast(da, conv_cache, compute_dx=compute_dx)
    return dx, dw, db, dgamma, dbeta
