"""Fast layers with the cs231n API: convolution, max pooling, spatial batch norm, group norm,
an affine-ReLU forward and an affine layer's input gradient for few rows, and an affine layer's
weight gradient with its L2 term.

Numba kernels (``cache=True``: compiled once, then loaded from the on-disk cache by every new
process; no compiler toolchain needed) do the work, with NumPy's BLAS for the matrix products
of the general convolution:

- convolution at stride 1 with 7-wide filters (the model's 7x7 conv) or 3x3 filters
  (``direct_images_per_row``; narrow planes of at most 64 filters several images side by
  side): direct kernels that keep their sums in SIMD registers (``pipeline._kernels.simd``)
  over a zero-padded copy of x (``kc.direct_forward``, ``kc.direct_dw``); dx is the same
  forward kernel applied to the padded dout with the filters flipped. No column matrix.
- convolution 3x3 at stride 1 with 64 input channels or more, or on planes under 15 columns
  with more than 64 filters (``winograd``): Winograd's F(m x m, 3x3), each m x m output tile
  (4, or 3 where that needs fewer products) from an (m + 2) x (m + 2) input patch transformed
  (``pipeline._kernels.winograd``), one GEMM per transformed position (36 or 25), the output
  transform adding the bias and the ReLU; backward the transpose of each step.
- convolution, any other shape: im2col into a (C*HH*WW, N*H'*W') matrix, one GEMM with the
  (F, C*HH*WW) filters, bias added while moving the result to NCHW. Backward: dout to the same
  layout (with db in the same pass), ``dw = dout2 @ cols.T``; ``dx`` (GEMM + col2im) only
  when ``compute_dx=True``.
- affine-ReLU forward with fewer than 64 rows, ``relu(x @ w + b)`` (``affine_relu_forward_fast``,
  the model's hidden layer at the notebook's batch of 50 and on a worker's shards under 64 images):
  w's strips read straight from w into L1, sums in registers, bias and ReLU in the store
  (``ka.affine_relu_rows``). From 64 rows on, NumPy's product, then bias, then ReLU.
- an affine layer's input gradient with 16 to 256 rows, ``dx = da @ w.T``, optionally with
  ``sum(w**2)`` for the L2 loss term (``affine_dx_fast``, the model's hidden layer in the
  Solver and on a worker's shards of 16 to 256 images): w's rows broadcast against da packed
  transposed, sums in registers, each row of w squared from L1 right after
  (``ka.affine_dx_rows``). Under 16 and over 256 rows, NumPy's product and ``np.vdot``.
- an affine layer's weight gradient with its L2 term, ``dw = x.T @ da + reg * w``
  (``affine_dw_l2_fast``, the model's hidden layer when reg > 0, or when the gradient goes
  straight into a caller's array: a worker's shard, scaled by its image count, written to or
  added into its tree node): one kernel pass that reads w once (not at all when reg = 0) and
  writes dw once (``ka.affine_dw_l2``), where NumPy's product, the L2 term and the scaled copy
  pass over these 16 MB four to six times.
- the hidden layer of a worker's several shards (``affine_relu_forward_shards``,
  ``affine_dx_shards``, ``affine_dw_sum``): the forward and dx kernels take the shards' rows
  stacked, and their scaled dw summed along the reduction tree come from one pass
  (``ka.affine_dw_tree``): w read and dw written once per step instead of once per shard, each
  shard's bits unchanged.
- max pooling: one pass that records each window's argmax; backward scatters to it.
- spatial batch norm / group norm: per channel / per group reductions in float64.

Every function keeps the caller's dtype like ``pipeline.layers`` (``pipeline.shapes.layer_dtype``:
out and dx in x's dtype, float32 in -> float32 out, float16 in -> float16 out; dw, db, dgamma,
dbeta in their parameter's dtype; a non-floating x gives float64). The kernels compute in
float32 or float64: float16 in float32 (then rounded to float16), float64 and wider in float64.
Every function never modifies its inputs, accepts non-contiguous arrays, and raises
``ValueError`` naming the parameter for bad arguments. Caches are opaque tuples to be passed
back to the matching backward function.

Threads: the kernels use Numba's thread pool (``NUMBA_NUM_THREADS``; change a thread's count
with ``pipeline._kernels.threads.set_threads``, which takes the launch lock: every kernel runs
under one lock per process, see ``pipeline._kernels.threads``); the GEMMs use NumPy's BLAS,
whose thread count follows its own settings (``OPENBLAS_NUM_THREADS``, which Dask's nanny sets
to 1 in its workers).
"""

from __future__ import annotations

import numpy as np

from pipeline._kernels import affine as ka
from pipeline._kernels import conv as kc
from pipeline._kernels import norm as kn
from pipeline._kernels import pointwise as kw
from pipeline._kernels import pool as kp
from pipeline._kernels import simd, tile
from pipeline._kernels import winograd as kwg
from pipeline._kernels.threads import launch
from pipeline.layers import affine_forward, relu_forward
from pipeline.shapes import (
    check_bn_mode,
    check_dout,
    check_eps,
    check_groups,
    check_momentum,
    check_param_shape,
    check_per_channel,
    conv_output_shape,
    layer_dtype,
    pool_output_shape,
    require_ndim,
    running_average,
)

__all__ = [
    "conv_forward_fast",
    "conv_backward_fast",
    "conv_forward_im2col",
    "conv_backward_im2col",
    "affine_relu_forward_fast",
    "affine_dx_fast",
    "affine_dw_l2_fast",
    "affine_relu_forward_shards",
    "affine_dx_shards",
    "affine_dw_sum",
    "sum_in_order",
    "max_pool_forward_fast",
    "max_pool_backward_fast",
    "conv_relu_forward_fast",
    "relu_max_pool_forward_fast",
    "conv_relu_pool_forward_fast",
    "conv_pool_dw_fast",
    "spatial_batchnorm_forward_fast",
    "spatial_batchnorm_backward_fast",
    "spatial_groupnorm_forward_fast",
    "spatial_groupnorm_backward_fast",
    "gelu_forward_fast",
    "gelu_backward_fast",
    "global_avg_pool_forward_fast",
    "global_avg_pool_backward_fast",
    "global_max_pool_forward_fast",
    "global_max_pool_backward_fast",
]


# --------------------------------------------------------------------------------------------
# helpers

# Below this many elements a kernel runs on the calling thread alone: waking Numba's pool
# costs more than the work, and on a loaded machine a parallel region waits for its slowest
# thread (a gradient check makes thousands of such tiny calls).
_SERIAL_BELOW = 1 << 15


def _launch(kernel, work, *args):
    """Run a parallel kernel (under the process's launch lock: pipeline._kernels.threads), on one
    thread when ``work`` (elements touched) is small."""
    return launch(kernel, *args, serial=work < _SERIAL_BELOW)


def kernel_dtype(dtype) -> np.dtype:
    """The dtype the kernels compute in for a layer's dtype: float32 for float16 and float32,
    float64 for float64 and anything wider."""
    return np.dtype(np.float32) if np.dtype(dtype).itemsize <= 4 else np.dtype(np.float64)


def _as(a, dtype) -> np.ndarray:
    """C-contiguous array of dtype, copied only when needed (never written to)."""
    return np.ascontiguousarray(a, dtype=dtype)


def vector_bytes() -> int:
    """The SIMD vector width, in bytes (16, 32 or 64), the kernels run at here: the CPU's widest
    (64 with AVX-512, 32 with AVX2, 16 elsewhere), or ``CONVPIPE_VECTOR_BYTES``, or what
    ``pipeline._kernels.simd.using`` sets. Every width computes the same bits."""
    return simd.current().nbytes


def vector_bytes_setting() -> int:
    """The width the environment asks for, read now: ``CONVPIPE_VECTOR_BYTES`` when set, else the
    CPU's widest; a ValueError naming the variable for a value other than 16, 32 or 64."""
    return simd.process_bytes()


def vector_registers_setting() -> int:
    """The register count the environment asks for, read now: ``CONVPIPE_VECTOR_REGISTERS``
    when set, else the CPU's (32 with AVX-512, 16 with AVX2); a ValueError naming the variable
    for a value other than 16 or 32. It picks the kernels' register tiles (speed only)."""
    return simd.process_registers()


def machine_text() -> str:
    """One line: the CPU model, its vector extensions, the kernels' width and register count
    (benchmarks print it beside their figures, ``python -m pipeline.warmup`` at its start)."""
    return simd.describe()


# --------------------------------------------------------------------------------------------
# convolution
#
# Three ways to compute it, chosen by shape only (winograd, then direct_images_per_row), so
# that every CPU takes the same path (the Numba kernels then give the same bits at every
# vector width; the GEMMs of Winograd and im2col are OpenBLAS's, whose kernels differ by CPU):
# - Winograd's F(m x m, 3x3) (pipeline._kernels.winograd) for 3x3 filters at stride 1 with 64
#   input channels or more (and narrow planes with many filters): tile transforms around 36
#   (m = 4) or 25 (m = 3) GEMMs, backward their transposes.
# - direct kernels (kc.direct_forward / kc.direct_dw) at stride 1 for 7-wide filters (the
#   three-layer net's conv) and for 3x3 filters: SIMD sums over a zero-padded copy of x, no
#   column matrix; outputs narrower than DIRECT_MIN_W_OUT go several images side by side in a
#   row (with at most DIRECT_PACKED_MAX_FILTERS filters; else im2col). dx is the same forward
#   kernel run on the padded dout with the filters flipped and transposed (a "full"
#   convolution), when the padding allows it (pad < WW and pad < HH).
# - im2col + BLAS GEMMs for every other shape; dx by GEMM + col2im.
# Both keep the output in NCHW with the bias (and a fused ReLU) applied, and return db in
# float64 from the backward kernels.

#: 3x3 convolutions whose output is at least this wide take the direct kernels one image at a
#: time. They keep 3 filters x 4 vectors of an output row's pixels in registers: a row under a
#: vector (64 bytes: 16 float32) leaves lanes idle; from 15 wide the direct kernels took
#: 0.5-1.0x im2col's time at the airbench networks' shapes (docs/layers.md).
DIRECT_MIN_W_OUT = 15


#: narrower 3x3 outputs go several images side by side in a row of at least this many columns
#: (kc.pad_planes): 4 images of 7 x 7, 8 of 3 x 3 (pad 1), rows of 31 output columns
DIRECT_PACKED_ROW = 32
#: ... when they have at most this many filters (at 128 even with im2col, at 256 slower)
DIRECT_PACKED_MAX_FILTERS = 64


def direct_images_per_row(HH, WW, stride, W, W_out, pad, F) -> int:
    """How a convolution of F filters HH x WW at this stride and pad, on images W columns wide
    (W_out output columns), runs when ``winograd`` does not take it: 0 on im2col + GEMM, else
    on the direct kernels (kc.direct_forward / kc.direct_dw) with that many images side by side
    in each row. By shape alone: every CPU computes the same bits."""
    if stride != 1 or not (WW == 7 or HH == WW == 3):
        return 0
    if WW == 7 or W_out >= DIRECT_MIN_W_OUT:
        return 1
    if F > DIRECT_PACKED_MAX_FILTERS:
        return 0
    return -(-DIRECT_PACKED_ROW // _image_columns(W, W_out, pad))


#: 3x3 convolutions at stride 1 with at least this many input channels take Winograd's
#: F(m x m, 3x3): at the airbench network's shapes with 64 and 256 channels it took 0.4-0.85x
#: the time of the direct kernels or im2col, with 32 or 24 channels 1.2-1.9x the direct
#: kernels' (``benchmarks/bench_network.py --paths``, docs/benchmarks.md)
WINOGRAD_MIN_CHANNELS = 64


def winograd(HH, WW, stride, C, W_out, F) -> bool:
    """Whether a convolution of F filters C x HH x WW at this stride with W_out output columns
    runs on Winograd's F(m x m, 3x3) (``pipeline._kernels.winograd``: m = 4, 36 GEMMs over
    6 x 6 transformed tiles, or m = 3, 25 over 5 x 5, whichever needs fewer products:
    ``kwg.tile_side``; up to 3.8x fewer products than a direct 3x3): 3x3 at stride 1 with at
    least WINOGRAD_MIN_CHANNELS input channels, or on planes under DIRECT_MIN_W_OUT columns
    with more filters than DIRECT_PACKED_MAX_FILTERS (where the alternative is im2col). Checked
    before direct_images_per_row; by shape alone, like it: every CPU takes the same path."""
    if stride != 1 or not HH == WW == 3:
        return False
    return C >= WINOGRAD_MIN_CHANNELS or (
        W_out < DIRECT_MIN_W_OUT and F > DIRECT_PACKED_MAX_FILTERS
    )


def _image_columns(W, W_out, pad) -> int:
    """S: the columns between two images' starts in a row of images side by side (kc.pad_planes):
    at least pad zeros between two images, and their outputs apart."""
    return max(W + pad, W_out)


def _pad_direct(a, ph, pw, H_out, W_out, HH, WW, k=1, S=0):
    """a (N, C, H, W) zero-padded into the direct kernels' wide layout, k images side by side in
    each row S columns apart: (ap (ceil(N / k), C, L), Wp). H_out x W_out: the output of the
    side-by-side images."""
    N, C, H, W = a.shape
    wide = (k - 1) * S + W
    Wp, L = kc.direct_geometry(H_out, W_out, HH, WW, wide, pw, a.dtype.itemsize)
    ap = np.empty((-(-N // k), C, L), dtype=a.dtype)
    _launch(kc.pad_planes, ap.size, a, k, S, ph, pw, Wp, ap)
    return ap, Wp


def _conv_core_forward(x, w, b, conv_param, relu, pool_param=None):
    """Check arguments, then out (N, F, H', W') = conv(x, w) + b (then ReLU), and the state
    _conv_core_backward needs. With pool_param (and relu False), on the direct kernels one
    image a row and x in the kernels' dtype: max pooling of relu(out) computed in the same
    pass, out never written; out is then (pooled (N, F, H'', W''), idx), as
    relu_max_pool_forward_fast would give them."""
    x = np.asarray(x)
    w = np.asarray(w)
    require_ndim("x", x, 4, "(N, C, H, W)")
    require_ndim("w", w, 4, "(F, C, HH, WW)")
    N, F, H_out, W_out = conv_output_shape(x.shape, w.shape, conv_param)
    b = _check_bias(b, F)
    stride, pad = int(conv_param.get("stride", 1)), int(conv_param.get("pad", 0))
    _, C, H, W = x.shape
    _, _, HH, WW = w.shape
    x_dtype = layer_dtype(x)
    dtype = kernel_dtype(x_dtype)
    xc = _as(x, dtype)
    wc = _as(w, dtype)
    bc = _as(b, dtype)
    geom = (N, C, H, W, F, HH, WW, stride, pad, H_out, W_out)
    out = np.empty((N, F, H_out, W_out), dtype=dtype)
    wino = winograd(HH, WW, stride, C, W_out, F)
    k = 0 if wino else direct_images_per_row(HH, WW, stride, W, W_out, pad, F)
    if k:
        S = _image_columns(W, W_out, pad)
        Wo = (k - 1) * S + W_out  # the output row of k images side by side
        xp, Wp = _pad_direct(xc, pad, pad, H_out, Wo, HH, WW, k, S)
        vw, tl = simd.current(), _tile()
        work = out.size * C * HH * WW
        # pooled in this pass only where the layer computes in the kernels' dtype: float16's
        # two passes pool the conv output rounded to float16 (ties, zeros the ReLU drops)
        if pool_param is not None and k == 1 and not relu and x_dtype == dtype:
            pooled = np.empty(pool_output_shape(out.shape, pool_param), dtype=dtype)
            idx = np.empty(pooled.shape, dtype=np.int32)
            pool = (*_pool_params(pool_param), idx)
            _launch(kc.direct_forward, work, xp, Wp, wc, bc, False, pooled, tl, vw, pool)
            core = ((xp, Wp), wc, geom, x_dtype, layer_dtype(w), layer_dtype(b))
            return (pooled, idx), core
        outk = out if k == 1 else np.empty((len(xp), F, H_out, Wo), dtype)
        _launch(kc.direct_forward, work, xp, Wp, wc, bc, relu, outk, tl, vw)
        if k > 1:
            _launch(kc.one_by_one, out.size, outk, k, S, out)
        src = (xp, Wp)
    elif wino:
        m = kwg.tile_side(H_out, W_out)
        th, tw = kwg.tiles(H_out, W_out, m)
        AT, BT, _, _ = kwg.in_dtype(m, dtype)
        vw = simd.current()
        Np = kwg.padded_images(N)
        P = th * tw * Np
        Vb, V = kwg.tile_buffer(m, C, P, dtype)  # transformed input tiles, (a*a, C, P)
        _launch(kwg.input_tiles, V.size, xc, pad, m, th, tw, Np, BT, Vb, vw)
        Ub, U = kwg.tile_buffer(m, F, C, dtype)  # transformed filters, (a*a, F, C)
        _launch(kwg.filter_tiles, U.size, wc, kwg.filter_matrices(m)[0], Ub, vw)
        Mb, M = kwg.tile_buffer(m, F, P, dtype)
        np.matmul(U, V, out=M)  # (a*a, F, P): one GEMM per tile position
        _launch(kwg.output_tiles, M.size, Mb, bc, relu, m, th, tw, Np, AT, out, vw)
        src = (V, U)
    else:
        K, P = C * HH * WW, H_out * W_out
        cols = np.empty((K, N * P), dtype=dtype)
        _launch(kc.im2col, cols.size, xc, HH, WW, stride, pad, H_out, W_out, cols)
        out2 = wc.reshape(F, K) @ cols
        _launch(kc.bias_to_nchw, out.size, out2, bc, relu, out.reshape(N, F, P))
        src = cols
    core = (src, wc, geom, x_dtype, layer_dtype(w), layer_dtype(b))
    return out.astype(x_dtype, copy=False), core


def _dout_gemm_layout(d, db):
    """dout (N, F, H', W') as (F, N*H'*W') for the GEMMs; db[f] = the sum of row f (float64)."""
    N, F = d.shape[:2]
    dout2 = np.empty((F, d.size // F), dtype=d.dtype)
    _launch(kc.dout_to_2d, dout2.size, d.reshape(N, F, -1), dout2, db)
    return dout2


def _conv_core_backward(dout, core, compute_dx, mask=None):
    """dout (N, F, H', W') already checked, masked by mask > 0 when given (a ReLU's output):
    (dx or None, dw, db) in the dtypes of x, w and b."""
    src, wc, geom, x_dtype, w_dtype, b_dtype = core
    N, C, H, W, F, HH, WW, stride, pad, H_out, W_out = geom
    dtype = wc.dtype
    d = _as(dout, dtype)
    if mask is not None:
        dm = np.empty_like(d)
        _launch(
            kc.relu_masked,
            d.size,
            d.reshape(N * F, -1),
            _as(mask, dtype).reshape(N * F, -1),
            dm.reshape(N * F, -1),
        )
        d = dm
    db = np.empty(F, dtype=np.float64)
    dx = dout2 = None
    wino = winograd(HH, WW, stride, C, W_out, F)
    k = 0 if wino else direct_images_per_row(HH, WW, stride, W, W_out, pad, F)
    if k:
        xp, Wp = src
        S = _image_columns(W, W_out, pad)
        dk = d  # dout, k images side by side in each row (zeros between them)
        if k > 1:
            Wo = (k - 1) * S + W_out
            dk = np.empty((len(xp), F, H_out, Wo), dtype=dtype)
            _launch(kc.pad_planes, dk.size, d, k, S, 0, 0, Wo, dk.reshape(len(xp), F, -1))
        dw = np.empty((F, C, HH, WW), dtype=dtype)
        tl, vw = _tile_and_width(F, dtype)
        _launch(kc.direct_dw, dk.size * C * HH * WW, xp, Wp, dk, dw, db, tl, vw)
        if compute_dx and pad <= WW - 1 and pad <= HH - 1:
            # dx = dout convolved with the flipped filters, transposed to (C, F, HH, WW)
            wt = np.ascontiguousarray(wc[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
            Wi = (k - 1) * S + W  # the input row of k images side by side
            dp, Wq = _pad_direct(dk, HH - 1 - pad, WW - 1 - pad, H, Wi, HH, WW)
            dx = np.empty((N, C, H, W), dtype=dtype)
            dxk = dx if k == 1 else np.empty((len(xp), C, H, Wi), dtype=dtype)
            _launch(
                kc.direct_forward,
                dxk.size * F * HH * WW,
                dp,
                Wq,
                wt,
                np.zeros(C, dtype),
                False,
                dxk,
                _tile(),
                simd.current(),
            )
            if k > 1:
                _launch(kc.one_by_one, dx.size, dxk, k, S, dx)
            compute_dx = False
    elif wino:
        V, U = src
        m = kwg.tile_side(H_out, W_out)
        th, tw = kwg.tiles(H_out, W_out, m)
        _, _, A, B = kwg.in_dtype(m, dtype)
        vw = simd.current()
        Np = kwg.padded_images(N)
        dMb, dM = kwg.tile_buffer(m, F, V.shape[2], dtype)
        _launch(kwg.dout_tiles, dM.size, d, m, th, tw, Np, A, dMb, db, vw)
        dUb, dU = kwg.tile_buffer(m, F, C, dtype)
        np.matmul(dM, V.transpose(0, 2, 1), out=dU)  # (a*a, F, C)
        dw = np.empty((F, C, HH, WW), dtype=dtype)
        _launch(kwg.filter_grad, dU.size, dUb, kwg.filter_matrices(m)[1], dw, vw)
        if compute_dx:
            dVb, dV = kwg.tile_buffer(m, C, V.shape[2], dtype)
            np.matmul(U.transpose(0, 2, 1), dM, out=dV)  # (a*a, C, P)
            dx = np.empty((N, C, H, W), dtype=dtype)
            _launch(kwg.input_grad, dV.size, dVb, pad, m, th, tw, Np, B, dx, vw)
            compute_dx = False
    else:
        dout2 = _dout_gemm_layout(d, db)
        # (K, N*P) @ (N*P, F) then transposed: much faster in OpenBLAS than dout2 @ cols.T
        dw = (src @ dout2.T).T.reshape(F, C, HH, WW)
    if compute_dx:  # GEMM + col2im
        if dout2 is None:
            dout2 = _dout_gemm_layout(d, np.empty(F, dtype=np.float64))
        dcols = wc.reshape(F, -1).T @ dout2
        dx = np.empty((N, C, H, W), dtype=dtype)
        _launch(kc.col2im, dcols.size, dcols, N, C, H, W, HH, WW, stride, pad, H_out, W_out, dx)
    if dx is not None:
        dx = dx.astype(x_dtype, copy=False)
    return dx, dw.astype(w_dtype), db.astype(b_dtype)


def _check_bias(b, F):
    """b as an array, raising unless its shape is (F,)."""
    b = np.asarray(b)
    check_param_shape("b", b, (F,))
    return b


def conv_forward_fast(x, w, b, conv_param):
    """Fast convolution forward pass; same contract as conv_forward_naive.

    Inputs:
    - x: input data, shape (N, C, H, W)
    - w: filter weights, shape (F, C, HH, WW)
    - b: biases, shape (F,)
    - conv_param: dict with 'stride' (>= 1) and 'pad' (>= 0)

    Returns a tuple of:
    - out: output data, shape (N, F, H', W'), dtype of x
    - cache: for conv_backward_fast
    """
    return _conv_forward(x, w, b, conv_param, relu=False)


def conv_relu_forward_fast(x, w, b, conv_param):
    """Convolution followed by a ReLU, the bias and the ReLU applied in the pass that writes
    the output; conv_backward_fast is its backward pass (its cache marks the ReLU).

    Inputs: as conv_forward_fast.

    Returns a tuple of:
    - out: relu(conv(x, w) + b), shape (N, F, H', W'), dtype of x
    - cache: for conv_backward_fast, which masks dout by out > 0 first
    """
    return _conv_forward(x, w, b, conv_param, relu=True)


def conv_relu_pool_forward_fast(x, w, b, conv_param, pool_param):
    """conv_forward_fast then relu_max_pool_forward_fast, with the same results and caches; on
    the direct kernels with one image a row (``direct_images_per_row`` 1: 7-wide filters, 3x3
    from DIRECT_MIN_W_OUT output columns outside Winograd's shapes), float32 or float64, in one
    pass that pools each filter's output plane while it is in cache, never writing the
    convolution's output (kc.direct_forward with a pool).

    Returns a tuple of:
    - out: max_pool(relu(conv(x, w) + b)), shape (N, F, H'', W''), dtype of x
    - cache: (conv_cache, pool_cache), for conv_backward_fast / max_pool_backward_fast /
      conv_pool_dw_fast
    """
    res, core = _conv_core_forward(x, w, b, conv_param, False, pool_param)
    if not isinstance(res, tuple):  # the convolution's output: pool it
        out, pool_cache = relu_max_pool_forward_fast(res, pool_param)
        return out, ((core, None), pool_cache)
    pooled, idx = res
    N, _, _, _, F, _, _, _, _, H_out, W_out = core[2]
    x_dtype = core[3]
    pool_cache = ((N, F, H_out, W_out), x_dtype, idx, pooled, _pool_params(pool_param))
    return pooled.astype(x_dtype, copy=False), ((core, None), pool_cache)


def _conv_forward(x, w, b, conv_param, relu):
    out, core = _conv_core_forward(x, w, b, conv_param, relu)
    return out, (core, out if relu else None)


def conv_backward_fast(dout, cache, compute_dx=True):
    """Fast convolution backward pass.

    Inputs:
    - dout: upstream derivatives, shape (N, F, H', W')
    - cache: from conv_forward_fast or conv_relu_forward_fast
    - compute_dx: if False, dx is not computed (returned as None)

    Returns a tuple of:
    - dx: gradient w.r.t. x, shape (N, C, H, W), dtype of x; None when compute_dx=False
    - dw: gradient w.r.t. w, shape (F, C, HH, WW), dtype of w
    - db: gradient w.r.t. b, shape (F,), dtype of b

    After conv_relu_forward_fast, these are the gradients through the ReLU as well.
    """
    core, relu_out = cache
    N, C, H, W, F, HH, WW, stride, pad, H_out, W_out = core[2]
    dout = check_dout(dout, (N, F, H_out, W_out), "conv")
    return _conv_core_backward(dout, core, compute_dx, relu_out)


# cs231n's names for the same functions
conv_forward_im2col = conv_forward_fast
conv_backward_im2col = conv_backward_fast


# --------------------------------------------------------------------------------------------
# affine-ReLU forward for few rows (ka.affine_relu_rows)


def affine_relu_forward_fast(x, w, b):
    """Affine transform followed by a ReLU, as ``layer_utils.affine_relu_forward``.

    Inputs:
    - x: input, shape (N, d_1, ..., d_k), D = d_1 * ... * d_k
    - w: weights, shape (D, M)
    - b: biases, shape (M,)

    Returns a tuple of:
    - out: relu(x.reshape(N, D) @ w + b), shape (N, M), dtype of x
    - cache: ((x, w, b), out), for ``layer_utils.affine_relu_backward``

    With 1 to 63 rows (``ka.FWD_MAX_ROWS``), x, w and b sharing float32 or float64 and M at
    least 4 SIMD vectors (32 or 16 columns): one kernel pass (``ka.affine_relu_rows``) whose
    out[i, j] depends on row i of x and column j of w only, not on N or the thread count. Else
    ``layers.affine_forward`` then ``layers.relu_forward`` (which also name bad arguments).
    """
    x, w, b = np.asarray(x), np.asarray(w), np.asarray(b)
    if _rows_forward_takes(x, w, b):
        out = _affine_relu_rows(x.reshape(x.shape[0], -1), w, b)
        return out, ((x, w, b), out)
    a, _ = affine_forward(x, w, b)
    out, _ = relu_forward(a)
    return out, ((x, w, b), out)


def _rows_forward_takes(x, w, b) -> bool:
    """Whether ``affine_relu_forward_fast(x, w, b)`` takes the kernel (arrays given)."""
    N = x.shape[0] if x.ndim else 0
    dtype = layer_dtype(x)
    return (
        0 < N <= ka.FWD_MAX_ROWS
        and kernel_dtype(dtype) == dtype == x.dtype == w.dtype == b.dtype
        and w.ndim == 2
        and w.shape[0] > 0
        and w.shape[1] >= _MIN_PANEL_BYTES // dtype.itemsize
        and b.shape == (w.shape[1],)
        and x.size == N * w.shape[0]
    )


def _affine_relu_rows(x2, w, b) -> np.ndarray:
    """relu(x2 @ w + b) by ``ka.affine_relu_rows``, x2 (N, D) of any N: row i's bits are the
    same whatever the other rows are."""
    dtype = x2.dtype
    out = np.empty((x2.shape[0], w.shape[1]), dtype)
    tl, vw = _tile_and_width(w.shape[1], dtype, fit=True)
    _launch(
        ka.affine_relu_rows,
        out.size * w.shape[0],
        _as(x2, dtype),
        _as(w, dtype),
        _as(b, dtype),
        out,
        tl,
        vw,
    )
    return out


# --------------------------------------------------------------------------------------------
# affine input gradient for few rows, with w's sum of squares (ka.affine_dx_rows)


def affine_dx_fast(da, w, sumsq=False):
    """The gradient of an affine layer's loss with respect to its (flattened) input, and
    optionally the sum of its squared weights (its L2 loss term's, before ``0.5 * reg``).

    Inputs:
    - da: upstream derivative of the layer's output, shape (N, M)
    - w: weights, shape (D, M)
    - sumsq: also return sum(w**2), a Python float

    Returns dx = da @ w.T, shape (N, D), dtype ``layer_dtype(da)`` [, sumsq].

    With 16 to 256 rows (``ka.DX_MIN_ROWS``, ``ka.DX_MAX_ROWS``) and da and w sharing float32 or
    float64: one kernel pass over w (``ka.affine_dx_rows``) whose dx[i, j] depends on row i of
    da and row j of w only, not on N (within 16..256) or the thread count; the sum of squares
    then comes from the same pass: float32 (float64) vector sums over each row of w, their
    lanes summed, then added in float64 in a fixed order. Else NumPy's ``da @ w.T`` and
    :func:`sum_of_squares`.
    """
    da, w = np.asarray(da), np.asarray(w)
    if da.ndim != 2 or w.ndim != 2 or da.shape[1] != w.shape[1]:
        raise ValueError(
            f"affine_dx: expected da (N, M) and w (D, M), got da {da.shape}, w {w.shape}"
        )
    dtype = layer_dtype(da)
    if _rows_dx_takes(da, w):
        return _affine_dx_rows(da, w, sumsq)
    dx = (da @ w.T).astype(dtype, copy=False)
    return (dx, sum_of_squares(w)) if sumsq else dx


def _rows_dx_takes(da, w) -> bool:
    """Whether ``affine_dx_fast(da, w)`` takes the kernel (2-D arrays of matching M given)."""
    dtype = layer_dtype(da)
    return (
        ka.DX_MIN_ROWS <= da.shape[0] <= ka.DX_MAX_ROWS
        and kernel_dtype(dtype) == dtype == da.dtype == w.dtype
        and w.shape[0] > 0
        and w.shape[1] > 0
    )


def _affine_dx_rows(da, w, sumsq):
    """da @ w.T [, sum(w**2)] by ``ka.affine_dx_rows``, da (N, M) of any N: row i's bits (and
    the sum's) are the same whatever the other rows are."""
    N, (D, M), dtype = da.shape[0], w.shape, da.dtype
    tl, vw = _tile_and_width(N, dtype, tall=True)
    G = tl.cols * vw.lanes(dtype)
    dat = _aligned_empty(-(-N // G) * M * G, dtype)
    ka.pack_row_panels(_as(da, dtype), G, dat)
    dx = np.empty((N, D), dtype)
    sq = np.zeros(-(-D // ka.ROWS) if sumsq else 0)
    _launch(ka.affine_dx_rows, dx.size * M, dat, _as(w, dtype), N, dx, sq, tl, vw)
    return (dx, float(sq.sum())) if sumsq else dx


def sum_of_squares(w) -> float:
    """sum(w**2) as a float: NumPy's ``np.vdot``, in float32 for float16 (whose squares would
    overflow at 65,504)."""
    w = np.asarray(w)
    w = w.astype(kernel_dtype(w.dtype), copy=False) if w.dtype.kind == "f" else w
    return float(np.vdot(w, w))


# --------------------------------------------------------------------------------------------
# affine weight gradient with the L2 term (ka.affine_dw_l2)


def affine_dw_l2_fast(x, da, w, reg, scale=1.0, out=None, add=False):
    """The gradient of ``loss + 0.5 * reg * sum(w**2)`` with respect to an affine layer's w,
    times ``scale``, returned or written into (added into) ``out``.

    Inputs:
    - x: the layer's input, shape (N, d_1, ..., d_k), D = d_1 * ... * d_k
    - da: upstream derivative of the layer's output, shape (N, M)
    - w: weights, shape (D, M)
    - reg: L2 strength (0: w is not read)
    - scale: the gradient's factor (a shard's image count: its mean-loss gradient as a sum)
    - out: None, or a C-contiguous (D, M) array of w's dtype that receives the result
    - add: with ``out``, add the result to it instead of overwriting it

    Returns dw = [out +] (x.reshape(N, D).T @ da + reg * w) * scale, shape (D, M), in w's dtype
    (``out`` itself when given), each operation rounded as NumPy's ``np.add``/``np.multiply``
    would. One kernel pass over w and dw (``pipeline._kernels.affine``) when x, da and w share
    float32 or float64 and M is at least 4 SIMD vectors (32 or 16 columns); else NumPy's
    product in the inputs' dtypes (float16 stays float16, unlike the other fast layers), then
    the same steps.
    """
    x, da, w = np.asarray(x), np.asarray(da), np.asarray(w)
    N, D = _check_dw_args(x, da, w, "affine_dw_l2")
    dtype = layer_dtype(w)
    if out is not None:
        _check_dw_out(out, w, "affine_dw_l2")
    if add and out is None:
        raise ValueError("affine_dw_l2: add=True needs out (the array to add to)")
    if _dw_takes(x, da, w):
        tl, vw = _tile_and_width(w.shape[1], dtype, fit=True)
        G = tl.cols * vw.lanes(dtype)
        x2 = _as(x.reshape(N, D), dtype)
        dap = _aligned_empty(-(-w.shape[1] // G) * N * G, dtype)
        ka.pack_panels(_as(da, dtype), G, dap)
        dw = np.empty(w.shape, dtype) if out is None else out
        _launch(
            ka.affine_dw_l2,
            dw.size * N,
            x2,
            dap,
            _as(w, dtype),
            np.array([reg, scale], dtype),
            bool(add),
            dw,
            tl,
            vw,
        )
        return dw
    dw = (x.reshape(N, D).T @ da).astype(dtype, copy=False)
    if reg:
        dw = np.add(dw, np.multiply(w, dtype.type(reg)), out=dw)
    if out is None or add:
        dw = np.multiply(dw, dtype.type(scale), out=dw)
        return dw if out is None else np.add(out, dw, out=out)
    return np.multiply(dw, dtype.type(scale), out=out)


# --------------------------------------------------------------------------------------------
# the affine layer of several shards, one pass over w for all of them (ka.affine_relu_rows,
# ka.affine_dx_rows, ka.affine_dw_tree)


def affine_relu_forward_shards(xs, w, b):
    """``affine_relu_forward_fast(x, w, b)`` for each x of ``xs`` (a data-parallel worker's
    shards, each (N_s, d_1, ..., d_k)): a list of (out, cache), each with the bits it has alone.
    When each shard would take the kernel (1 to 63 rows), their rows take it together: w is
    read once, not once per shard (each row's sums do not depend on the other rows)."""
    xs = [np.asarray(x) for x in xs]
    w, b = np.asarray(w), np.asarray(b)
    if len(xs) < 2 or not all(_rows_forward_takes(x, w, b) for x in xs):
        return [affine_relu_forward_fast(x, w, b) for x in xs]
    outs = _unstack_rows(_affine_relu_rows(_stack_rows(xs), w, b), xs)
    return [(o, ((x, w, b), o)) for x, o in zip(xs, outs)]


def affine_dx_shards(das, w, sumsq=False):
    """``affine_dx_fast(da, w, sumsq)`` for each da of ``das`` (shards, each (N_s, M)): the list
    of their dx [, and the list of their sum(w**2)], each with the bits it has alone (the sum's
    bits follow the path a shard takes: the kernel's, or ``np.vdot``'s). When each shard would
    take the kernel (16 to 256 rows), their rows take it together: w is read once."""
    das, w = [np.asarray(da) for da in das], np.asarray(w)
    if not das:
        raise ValueError("affine_dx_shards: expected at least one shard's da, got none")
    if len(das) < 2 or not all(
        da.ndim == w.ndim == 2 and da.shape[1] == w.shape[1] and _rows_dx_takes(da, w) for da in das
    ):
        got = [affine_dx_fast(da, w, sumsq) for da in das]
        return ([g[0] for g in got], [g[1] for g in got]) if sumsq else got
    got = _affine_dx_rows(_stack_rows(das), w, sumsq)
    dx, sq = got if sumsq else (got, None)
    dxs = _unstack_rows(dx, das)
    return (dxs, [sq] * len(das)) if sumsq else dxs


def affine_dw_sum(xs, das, w, scales, order, out, reg=0.0):
    """The weight gradients of several shards, each scaled, summed in a fixed order into ``out``:
    the sum over shards s, in ``order`` (:func:`sum_in_order`), of
    ``affine_dw_l2_fast(xs[s], das[s], w, reg, scales[s])``, each term and each addition rounded
    as they are (``np.add``), written to out ((D, M), C-contiguous, w's dtype); returns out.

    A data-parallel worker's shards: their (mean-loss gradient x image count) summed along the
    reduction tree into one node. With reg 0 and every shard taking the kernel, one pass
    (``ka.affine_dw_tree``) reads x and writes out once; else one call per shard, added as
    :func:`sum_in_order` adds them (out read and written once per shard)."""
    n = len(xs)
    prog = _postfix(order, n)
    if len(das) != n or len(scales) != n:
        raise ValueError(
            f"affine_dw_sum: expected as many da and scales as x (shards), got {n} x, "
            f"{len(das)} da, {len(scales)} scales"
        )
    xs, das, w = [np.asarray(x) for x in xs], [np.asarray(da) for da in das], np.asarray(w)
    for x, da in zip(xs, das):
        _check_dw_args(x, da, w, "affine_dw_sum")
    _check_dw_out(out, w, "affine_dw_sum")
    dtype = layer_dtype(w)
    if n < 2 or reg or not all(_dw_takes(x, da, w) for x, da in zip(xs, das)):
        return sum_in_order(
            order,
            out,
            lambda s, dst, add: affine_dw_l2_fast(
                xs[s], das[s], w, reg, scale=scales[s], out=dst, add=add
            ),
        )
    x2, da = _stack_rows(xs), _stack_rows(das)  # w's dtype: _dw_takes checked it
    tl, vw = _tile_and_width(w.shape[1], dtype, fit=True)
    G = tl.cols * vw.lanes(dtype)
    dap = _aligned_empty(-(-w.shape[1] // G) * len(x2) * G, dtype)
    ka.pack_panels(da, G, dap)
    starts = np.cumsum([0] + [x.shape[0] for x in xs]).astype(np.int64)
    coef = np.array(scales, dtype)
    _launch(ka.affine_dw_tree, out.size * len(x2), x2, dap, starts, coef, prog, out, tl, vw)
    return out


def _stack_rows(arrays) -> np.ndarray:
    """The shards' rows, each array (N_s, ...) flattened to (N_s, D), stacked: (sum N_s, D)."""
    return np.concatenate([a.reshape(a.shape[0], -1) for a in arrays])


def _unstack_rows(stacked, arrays) -> list[np.ndarray]:
    """``stacked``'s rows cut back into the shards' (views): N_s rows for each of ``arrays``."""
    return np.split(stacked, np.cumsum([a.shape[0] for a in arrays])[:-1])


def sum_in_order(order, out, term):
    """out = the terms summed in ``order``: a shard index (its term alone) or a pair
    ``(left, right)`` of orders (left's sum + right's, one rounded addition). ``term(s, dst,
    add)`` writes term s to dst, or adds it to dst when ``add``. A right part that is one term
    is added straight into out; a larger one is summed in a temporary first. Returns out."""
    if not isinstance(order, tuple):
        term(int(order), out, False)
        return out
    left, right = order
    sum_in_order(left, out, term)
    if not isinstance(right, tuple):
        term(int(right), out, True)
    else:
        np.add(out, sum_in_order(right, np.empty_like(out), term), out=out)
    return out


def _postfix(order, n) -> np.ndarray:
    """``order`` (:func:`sum_in_order`'s) as ``ka.affine_dw_tree``'s program: s pushes shard s,
    -1 adds the top two; every shard 0..n-1 exactly once."""
    prog: list[int] = []

    def walk(o):
        if isinstance(o, tuple):
            if len(o) != 2:
                raise ValueError(f"sum order: expected a shard index or a pair, got {o!r}")
            walk(o[0])
            walk(o[1])
            prog.append(-1)
        elif isinstance(o, (int, np.integer)) and not isinstance(o, bool):
            prog.append(int(o))
        else:
            raise ValueError(f"sum order: expected a shard index or a pair, got {o!r}")

    walk(order)
    if sorted(s for s in prog if s >= 0) != list(range(n)):
        raise ValueError(f"sum order: expected each of the {n} shards once, got {order!r}")
    return np.array(prog, np.int64)


def _check_dw_args(x, da, w, name) -> tuple[int, int]:
    """(N, D) of a dw's x (N, ...), da (N, M) and w (D, M), or a ValueError naming them."""
    N = x.shape[0] if x.ndim else 0
    D = x.size // N if N else 0
    if w.ndim != 2 or da.shape != (N, w.shape[1]) or w.shape[0] != D:
        raise ValueError(
            f"{name}: expected x (N, ...) with D features, da (N, M), w (D, M); "
            f"got x {x.shape}, da {da.shape}, w {w.shape}"
        )
    return N, D


def _check_dw_out(out, w, name) -> None:
    """A ValueError unless ``out`` can take w's gradient: C-contiguous, writeable, w's shape
    and dtype."""
    dtype = layer_dtype(w)
    if not (
        isinstance(out, np.ndarray)
        and out.shape == w.shape
        and out.dtype == dtype
        and out.flags.c_contiguous
        and out.flags.writeable
    ):
        got = f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
        raise ValueError(
            f"{name}: out must be a writeable C-contiguous {dtype} array of shape {w.shape}, "
            f"got {got}"
        )


def _dw_takes(x, da, w) -> bool:
    """Whether ``affine_dw_l2_fast(x, da, w, ...)`` takes the kernel (arguments checked)."""
    dtype = layer_dtype(w)
    return (
        kernel_dtype(dtype) == dtype == x.dtype == da.dtype
        and w.shape[1] >= _MIN_PANEL_BYTES // dtype.itemsize
        and (x.shape[0] if x.ndim else 0) > 0
    )


#: the affine kernels take a layer with at least this many bytes of columns (4 AVX2 vectors: 32
#: float32 or 16 float64 columns), at every vector width, so the path (and the bits) do not
#: depend on the CPU; a narrower width runs a layer too narrow for 4 vectors of the process's
_MIN_PANEL_BYTES = 128


#: the FMA slot of an x86 core: a 16-byte vector takes a whole one, a 64-byte vector two (or
#: one where the core has 64-byte units: the choice then ties and goes to the widest)
_FMA_SLOT_BYTES = 32


def _tile(tall: bool = False) -> tile.Tile:
    """A kernel's register tile for this process's registers (``tile.tile_for``): 6 x 4 on 32
    registers for the kernels that measured faster with it (``tall``: the few-row dx), 3 x 4
    otherwise."""
    return tile.tile_for(tall)


def _tile_and_width(count, dtype, fit=False, tall=False) -> tuple[tile.Tile, simd.Width]:
    """A kernel's tile (:func:`_tile`) and the width to cut ``count`` values into groups of
    that tile's vectors at (:func:`_width_for`)."""
    tl = _tile(tall)
    return tl, _width_for(count, dtype, fit=fit, cols=tl.cols)


def _width_for(count, dtype, fit=False, cols=4) -> simd.Width:
    """The width to cut ``count`` values (filters, columns, rows) into groups of ``cols``
    vectors (a tile's) at:
    of the widths up to the process's (``simd.current()``), the one taking the fewest FMA slots
    for its padded values (a vector takes one slot per 32 bytes, at least one: 16 bytes cost a
    32-byte vector's slot), the widest on a tie; with ``fit``, only widths whose group is at
    most ``count``. (A 48-row dx on Zen 4: 64 rows at 64 bytes in 3.1 ms, 48 at 16 bytes in
    4.2.) Every width gives the same bits (``pipeline._kernels.simd``): this choice is speed
    only."""
    itemsize = np.dtype(dtype).itemsize
    top = simd.current().nbytes
    best = None
    for nbytes in simd.WIDTHS:
        G = cols * nbytes // itemsize
        if nbytes > top or (fit and G > count):
            continue
        slots = -(-count // G) * G / min(nbytes, _FMA_SLOT_BYTES)  # in units of itemsize
        if best is None or slots <= best[0]:
            best = (slots, nbytes)
    return simd.Width(best[1])


def _aligned_empty(n, dtype) -> np.ndarray:
    """An empty 1-D array of n values whose first value is aligned to the widest SIMD vector."""
    dtype = np.dtype(dtype)
    align = simd.WIDTHS[-1]
    extra = align // dtype.itemsize
    buf = np.empty(n + extra, dtype)
    skip = (-buf.ctypes.data % align) // dtype.itemsize
    return buf[skip : skip + n]


# --------------------------------------------------------------------------------------------
# max pooling


def _pool_params(pool_param):
    return (
        int(pool_param.get("pool_height", 2)),
        int(pool_param.get("pool_width", 2)),
        int(pool_param.get("stride", 2)),
    )


def max_pool_forward_fast(x, pool_param):
    """Fast max-pooling forward pass; same contract as max_pool_forward_naive.

    Inputs:
    - x: input data, shape (N, C, H, W)
    - pool_param: dict with 'pool_height', 'pool_width', 'stride' (each >= 1)

    Returns a tuple of:
    - out: output data, shape (N, C, H', W'), dtype of x
    - cache: for max_pool_backward_fast
    """
    return _max_pool_forward(x, pool_param, relu=False)


def relu_max_pool_forward_fast(x, pool_param):
    """Max pooling of relu(x) in one pass (max of the window, then max(., 0));
    max_pool_backward_fast is its backward pass (its cache marks the ReLU).

    Inputs: as max_pool_forward_fast.

    Returns a tuple of:
    - out: max_pool(relu(x)), shape (N, C, H', W'), dtype of x
    - cache: for max_pool_backward_fast, which routes dout to each window's maximum where
      out > 0 (the ReLU's gradient) and gives 0 elsewhere
    """
    return _max_pool_forward(x, pool_param, relu=True)


def _max_pool_forward(x, pool_param, relu):
    """max_pool_forward_fast, of relu(x) when relu (the backward pass then masks by out > 0)."""
    x = np.asarray(x)
    require_ndim("x", x, 4, "(N, C, H, W)")
    _, _, H_out, W_out = pool_output_shape(x.shape, pool_param)
    ph, pw, stride = _pool_params(pool_param)
    N, C, H, W = x.shape
    x_dtype = layer_dtype(x)
    dtype = kernel_dtype(x_dtype)
    src = _as(x, dtype).reshape(N * C, H * W)
    out = np.empty((N, C, H_out, W_out), dtype=dtype)
    idx = np.empty((N, C, H_out, W_out), dtype=np.int32)
    o2, i2 = out.reshape(N * C, -1), idx.reshape(N * C, -1)
    if ph == 2 and pw == 2 and stride == 2:
        _launch(kp.pool_forward_2x2, src.size, src, H, W, relu, o2, i2)
    else:
        _launch(kp.pool_forward, src.size, src, H, W, ph, pw, stride, relu, o2, i2)
    cache = (x.shape, x_dtype, idx, out if relu else None, (ph, pw, stride))
    return out.astype(x_dtype, copy=False), cache


def max_pool_backward_fast(dout, cache):
    """Fast max-pooling backward pass.

    Inputs:
    - dout: upstream derivatives, shape (N, C, H', W')
    - cache: from max_pool_forward_fast or relu_max_pool_forward_fast

    Returns:
    - dx: gradient w.r.t. x, shape (N, C, H, W), dtype of x
    """
    x_shape, x_dtype, idx, relu_out, _ = cache
    N, C, H, W = x_shape
    dout = check_dout(dout, idx.shape, "max pool")
    dtype = kernel_dtype(x_dtype)
    dx = np.empty(x_shape, dtype=dtype)
    relu = relu_out is not None
    d2 = _as(dout, dtype).reshape(N * C, -1)
    o2 = relu_out.reshape(N * C, -1) if relu else d2
    _launch(
        kp.pool_backward, dx.size, d2, idx.reshape(N * C, -1), o2, relu, dx.reshape(N * C, H * W)
    )
    return dx.astype(x_dtype, copy=False)


def conv_pool_dw_fast(dout, conv_cache, pool_cache):
    """dw and db of a convolution followed by max pooling (conv_forward_fast, then
    max_pool_forward_fast or relu_max_pool_forward_fast) straight from the pooled gradient,
    without dx: the bits of ``conv_backward_fast(max_pool_backward_fast(dout, pool_cache),
    conv_cache, compute_dx=False)[1:]``, summing only the pixels pooling routes a gradient to
    (a quarter of them for 2x2 windows: ``kc.pooled_dw``).

    Inputs:
    - dout: upstream derivatives of the pooled output, shape (N, F, H'', W''), checked
    - conv_cache, pool_cache: the two layers' caches

    Returns (dw, db) in the dtypes of w and b; None where the shapes do not take that kernel
    (not the direct convolution kernels, or pooling windows that overlap), the convolution had
    a ReLU of its own (conv_relu_forward_fast) or the layers' dtype is not the kernels' (float16:
    the two passes round the conv's gradient to it): then take the two backward passes.
    """
    core, conv_relu = conv_cache
    src, wc, geom, x_dtype, w_dtype, b_dtype = core
    N, C, H, W, F, HH, WW, stride, pad, H_out, W_out = geom
    pooled_shape, _, idx, pooled, (ph, pw, pool_stride) = pool_cache
    dout = check_dout(dout, idx.shape, "conv_pool_dw_fast")
    wino = winograd(HH, WW, stride, C, W_out, F)
    k = 0 if wino else direct_images_per_row(HH, WW, stride, W, W_out, pad, F)
    if not k or conv_relu is not None or pool_stride < max(ph, pw) or x_dtype != wc.dtype:
        return None
    if tuple(pooled_shape) != (N, F, H_out, W_out):
        raise ValueError(
            f"conv_pool_dw_fast: the pooling's input {tuple(pooled_shape)} is not the "
            f"convolution's output {(N, F, H_out, W_out)}"
        )
    xp, Wp = src
    dtype = wc.dtype
    d = _as(dout, dtype)
    relu = pooled is not None
    dw = np.empty((F, C, HH, WW), dtype=dtype)
    db = np.empty(F, dtype=np.float64)
    # lanes over a filter row's WW taps: the width wasting the fewest
    vw = _width_for(WW, dtype, cols=1)
    S = _image_columns(W, W_out, pad)
    args = (xp, Wp, k, S, W_out, d, idx, _as(pooled, dtype) if relu else d, relu)
    _launch(kc.pooled_dw, d.size * C * HH * WW, *args, pool_stride, ph, dw, db, vw)
    return dw.astype(w_dtype), db.astype(b_dtype)


# --------------------------------------------------------------------------------------------
# spatial batch norm


def spatial_batchnorm_forward_fast(x, gamma, beta, bn_param):
    """Fast spatial batch normalization forward pass; same contract as spatial_batchnorm_forward.

    Inputs:
    - x: input data, shape (N, C, H, W)
    - gamma, beta: scale and shift, shape (C,)
    - bn_param: dict with 'mode' ('train' or 'test', required), 'eps' (default 1e-5),
      'momentum' (in [0, 1], default 0.9), 'running_mean' and 'running_var' (C,) (default zeros).
      In train mode running_mean / running_var are replaced by the updated averages.

    Returns a tuple of:
    - out: output data, shape (N, C, H, W), dtype of x
    - cache: for spatial_batchnorm_backward_fast (None in test mode)
    """
    x = np.asarray(x)
    require_ndim("x", x, 4, "(N, C, H, W)")
    N, C, H, W = x.shape
    check_param_shape("gamma", gamma, (C,))
    check_param_shape("beta", beta, (C,))
    mode = check_bn_mode(bn_param.get("mode"))
    eps = check_eps("bn_param", bn_param.get("eps", 1e-5))
    momentum = check_momentum("bn_param['momentum']", bn_param.get("momentum", 0.9))
    x_dtype = layer_dtype(x)
    dtype = kernel_dtype(x_dtype)
    running_mean = np.asarray(bn_param.get("running_mean", np.zeros(C, dtype=x_dtype))).astype(
        x_dtype, copy=False
    )
    running_var = np.asarray(bn_param.get("running_var", np.zeros(C, dtype=x_dtype))).astype(
        x_dtype, copy=False
    )
    check_param_shape("bn_param['running_mean']", running_mean, (C,))
    check_param_shape("bn_param['running_var']", running_var, (C,))
    xc = _as(x, dtype).reshape(N, C, H * W)
    g, bt = _as(gamma, dtype), _as(beta, dtype)
    out = np.empty((N, C, H, W), dtype=dtype)
    if mode == "train":
        if N * H * W < 1:
            raise ValueError(
                "batch norm in train mode needs at least one value per channel, got x of shape "
                f"{x.shape}"
            )
        mean64 = np.empty(C)
        var64 = np.empty(C)
        _launch(kn.bn_stats, xc.size, xc, mean64, var64)
        mean = mean64.astype(dtype)
        var = var64.astype(dtype)
        std = np.sqrt(var + dtype.type(eps)).astype(dtype)
        _launch(kn.bn_apply, xc.size, xc, mean, std, g, bt, out.reshape(N, C, H * W))
        rm, rv = _as(running_mean, dtype), _as(running_var, dtype)
        bn_param["running_mean"] = running_average(rm, mean, momentum, x_dtype)
        bn_param["running_var"] = running_average(rv, var, momentum, x_dtype)
        cache = (
            xc,
            mean,
            std,
            g,
            layer_dtype(gamma),
            layer_dtype(beta),
            np.shape(gamma),
            np.shape(beta),
            x_dtype,
        )
    else:
        std = np.sqrt(_as(running_var, dtype) + dtype.type(eps)).astype(dtype)
        _launch(
            kn.bn_apply, xc.size, xc, _as(running_mean, dtype), std, g, bt, out.reshape(N, C, H * W)
        )
        bn_param["running_mean"] = running_mean
        bn_param["running_var"] = running_var
        cache = None
    return out.astype(x_dtype, copy=False), cache


def spatial_batchnorm_backward_fast(dout, cache):
    """Fast spatial batch normalization backward pass.

    Inputs:
    - dout: upstream derivatives, shape (N, C, H, W)
    - cache: from spatial_batchnorm_forward_fast in train mode

    Returns a tuple of:
    - dx: gradient w.r.t. x, shape (N, C, H, W), dtype of x
    - dgamma, dbeta: shape (C,), dtypes of gamma and beta
    """
    if cache is None:
        raise ValueError(
            "spatial_batchnorm_backward_fast needs the cache of a forward pass in "
            "bn_param['mode']='train'"
        )
    xc, mean, std, g, g_dtype, b_dtype, g_shape, b_shape, x_dtype = cache
    N, C, M = xc.shape
    dtype = xc.dtype
    dout = check_dout(dout, (N, C) + _hw(M, dout), "spatial batchnorm")
    d3 = _as(dout, dtype).reshape(N, C, M)
    dx = np.empty(dout.shape, dtype=dtype)
    dgamma = np.empty(C)
    dbeta = np.empty(C)
    scratch = np.empty((C, 2), dtype=dtype)
    _launch(
        kn.bn_backward,
        xc.size,
        d3,
        xc,
        mean,
        std,
        g,
        np.array([N * M], dtype=dtype),
        dx.reshape(N, C, M),
        dgamma,
        dbeta,
        scratch,
    )
    return (
        dx.astype(x_dtype, copy=False),
        dgamma.astype(g_dtype).reshape(g_shape),
        dbeta.astype(b_dtype).reshape(b_shape),
    )


def _hw(M, dout):
    """The (H, W) of dout if it multiplies to M, else something that fails the shape check."""
    shape = np.shape(dout)
    if len(shape) == 4 and shape[2] * shape[3] == M:
        return tuple(shape[2:])
    return (M,)


# --------------------------------------------------------------------------------------------
# spatial group norm


def spatial_groupnorm_forward_fast(x, gamma, beta, G, gn_param):
    """Fast spatial group normalization forward pass; same contract as spatial_groupnorm_forward.

    Inputs:
    - x: input data, shape (N, C, H, W)
    - gamma, beta: scale and shift, one value per channel, e.g. shape (1, C, 1, 1) or (C,)
    - G: number of groups, a positive divisor of C (groups of C // G consecutive channels)
    - gn_param: dict with 'eps' (default 1e-5)

    Returns a tuple of:
    - out: output data, shape (N, C, H, W), dtype of x
    - cache: for spatial_groupnorm_backward_fast
    """
    x = np.asarray(x)
    require_ndim("x", x, 4, "(N, C, H, W)")
    N, C, H, W = x.shape
    G = check_groups(C, G)
    check_per_channel("gamma", gamma, C)
    check_per_channel("beta", beta, C)
    eps = check_eps("gn_param", gn_param.get("eps", 1e-5))
    x_dtype = layer_dtype(x)
    dtype = kernel_dtype(x_dtype)
    xg = _as(x, dtype).reshape(N, G, C // G, H * W)
    g = _as(gamma, dtype).reshape(C)
    bt = _as(beta, dtype).reshape(C)
    out = np.empty((N, C, H, W), dtype=dtype)
    mean = np.empty((N, G), dtype=dtype)
    std = np.empty((N, G), dtype=dtype)
    _launch(kn.gn_forward, xg.size, xg, g, bt, eps, out.reshape(xg.shape), mean, std)
    cache = (
        xg,
        mean,
        std,
        g,
        (H, W),
        layer_dtype(gamma),
        layer_dtype(beta),
        np.shape(gamma),
        np.shape(beta),
        x_dtype,
    )
    return out.astype(x_dtype, copy=False), cache


def spatial_groupnorm_backward_fast(dout, cache):
    """Fast spatial group normalization backward pass.

    Inputs:
    - dout: upstream derivatives, shape (N, C, H, W)
    - cache: from spatial_groupnorm_forward_fast

    Returns a tuple of:
    - dx: gradient w.r.t. x, shape (N, C, H, W), dtype of x
    - dgamma, dbeta: shapes and dtypes of gamma and beta
    """
    xg, mean, std, g, (H, W), g_dtype, b_dtype, g_shape, b_shape, x_dtype = cache
    N, G, Cg, M = xg.shape
    C = G * Cg
    dtype = xg.dtype
    dout = check_dout(dout, (N, C, H, W), "spatial groupnorm")
    d4 = _as(dout, dtype).reshape(xg.shape)
    dx = np.empty((N, C, H, W), dtype=dtype)
    dg = np.empty((N, C))
    dbt = np.empty((N, C))
    scratch = np.empty((N * G, 2), dtype=dtype)
    _launch(
        kn.gn_backward,
        xg.size,
        d4,
        xg,
        mean,
        std,
        g,
        np.array([Cg * M], dtype=dtype),
        dx.reshape(xg.shape),
        dg,
        dbt,
        scratch,
    )
    dgamma = dg.sum(axis=0).astype(g_dtype).reshape(g_shape)
    dbeta = dbt.sum(axis=0).astype(b_dtype).reshape(b_shape)
    return dx.astype(x_dtype, copy=False), dgamma, dbeta


# --------------------------------------------------------------------------------------------
# GELU and global pooling (kw: pipeline._kernels.pointwise)


def gelu_forward_fast(x):
    """Fast GELU forward pass; same contract as layers.gelu_forward (float16 and float32 data
    through a vectorized rational erf, within 1e-6 of the exact form; float64 exact)."""
    x = np.asarray(x)
    x_dtype = layer_dtype(x)
    xc = _as(x, kernel_dtype(x_dtype))
    out = np.empty_like(xc)
    kernel = kw.gelu_forward_f32 if xc.dtype == np.float32 else kw.gelu_forward
    _launch(kernel, xc.size, xc.reshape(-1), out.reshape(-1))
    return out.astype(x_dtype, copy=False), (xc, x_dtype)


def gelu_backward_fast(dout, cache):
    """Fast GELU backward pass; same contract as layers.gelu_backward."""
    xc, x_dtype = cache
    d = _as(check_dout(dout, xc.shape, "gelu"), xc.dtype)
    dx = np.empty_like(xc)
    kernel = kw.gelu_backward_f32 if xc.dtype == np.float32 else kw.gelu_backward
    _launch(kernel, xc.size, xc.reshape(-1), d.reshape(-1), dx.reshape(-1))
    return dx.astype(x_dtype, copy=False)


def global_avg_pool_forward_fast(x):
    """Fast global average pooling forward pass; same contract as
    layers.global_avg_pool_forward: x (N, C, H, W) -> out (N, C)."""
    x = np.asarray(x)
    require_ndim("x", x, 4, "(N, C, H, W)")
    N, C, H, W = x.shape
    x_dtype = layer_dtype(x)
    src = _as(x, kernel_dtype(x_dtype)).reshape(N * C, H * W)
    out = np.empty(N * C, dtype=src.dtype)
    _launch(kw.global_avg_forward, src.size, src, out)
    return out.reshape(N, C).astype(x_dtype, copy=False), (x.shape, x_dtype)


def global_avg_pool_backward_fast(dout, cache):
    """Fast global average pooling backward pass: dout (N, C) -> dx (N, C, H, W)."""
    shape, x_dtype = cache
    N, C, H, W = shape
    dtype = kernel_dtype(x_dtype)
    d = _as(check_dout(dout, (N, C), "global average pool"), dtype).reshape(-1)
    dx = np.empty((N * C, H * W), dtype=dtype)
    _launch(kw.global_avg_backward, dx.size, d, dx)
    return dx.reshape(shape).astype(x_dtype, copy=False)


def global_max_pool_forward_fast(x):
    """Fast global max pooling forward pass; same contract as layers.global_max_pool_forward:
    x (N, C, H, W) -> out (N, C)."""
    x = np.asarray(x)
    require_ndim("x", x, 4, "(N, C, H, W)")
    N, C, H, W = x.shape
    if H * W < 1:
        raise ValueError(f"global max pool needs at least one pixel, got x of shape {x.shape}")
    x_dtype = layer_dtype(x)
    src = _as(x, kernel_dtype(x_dtype)).reshape(N * C, H * W)
    out = np.empty(N * C, dtype=src.dtype)
    idx = np.empty(N * C, dtype=np.int64)
    _launch(kw.global_max_forward, src.size, src, out, idx)
    return out.reshape(N, C).astype(x_dtype, copy=False), (x.shape, x_dtype, idx)


def global_max_pool_backward_fast(dout, cache):
    """Fast global max pooling backward pass: dout (N, C) -> dx (N, C, H, W), dout at each
    channel's first maximum."""
    shape, x_dtype, idx = cache
    N, C, H, W = shape
    dtype = kernel_dtype(x_dtype)
    d = _as(check_dout(dout, (N, C), "global max pool"), dtype).reshape(-1)
    dx = np.empty((N * C, H * W), dtype=dtype)
    _launch(kw.global_max_backward, dx.size, d, idx, dx)
    return dx.reshape(shape).astype(x_dtype, copy=False)
