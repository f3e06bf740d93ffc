"""Compile every Numba kernel once into its on-disk cache: ``python -m pipeline.warmup``.

The kernels are declared with ``cache=True``, so later processes (tests, Dask workers) load the
machine code instead of compiling it. This runs each public fast path on tiny inputs, in
float32 and float64, and prints how long it took.

:func:`cold_kernels` tells, without compiling anything, which of a model's kernels the cache
has no machine code for yet (the first run after an install, an upgrade, another CPU or another
dtype): the command line says "compiling kernels, first run only" before such a run goes quiet
for a while.
"""

from __future__ import annotations

import sys
import time

import numpy as np
from numba import from_dtype, types

from pipeline import fast_layers as fl
from pipeline._kernels import conv as kc
from pipeline._kernels import norm as kn
from pipeline._kernels import pointwise as kw
from pipeline._kernels import pool as kp
from pipeline._kernels import simd, tile
from pipeline._kernels import winograd as kwg
from pipeline.cnn import ThreeLayerConvNet
from pipeline.convnet import ConvNet
from pipeline.fast_layers import direct_images_per_row, kernel_dtype
from pipeline.layer_utils import (
    conv_relu_backward,
    conv_relu_forward,
    conv_relu_pool_backward,
    conv_relu_pool_forward,
)
from pipeline.netspec import NetSpec
from pipeline.optim import adam, adam_inplace
from pipeline.training.reduce import warm_kernels

WARM_SPEC = "conv 4 3, bn, gelu, pool 3 stride=1, conv 4 3, gn 2, relu, pool 2, gap, affine"
COMPILING_MESSAGE = (
    "compiling kernels, first run only (Numba compiles them once, a minute or so, "
    "then loads them from its cache) ..."
)


def model_kernels(
    filter_size: int = 7,
    normalization: str | None = None,
    layers: str | None = None,
    dtype="float32",
) -> list:
    """The cached Numba kernels a ThreeLayerConvNet training step runs: its convolution's
    (direct kernels or im2col: for its 32 filters on 32 x 32 images, 'same' output), ReLU +
    2x2 max pool (on the direct kernels without a norm: pooled in the convolution's pass, dw
    from the pooled gradient), and its norm's; or, with ``layers`` (a model spec's text), those of
    that ConvNet's layers."""
    if layers is not None:
        return _spec_kernels(NetSpec.from_text(layers), kernel_dtype(dtype) == np.float32)
    pad = (filter_size - 1) // 2
    direct = direct_images_per_row(
        filter_size, filter_size, 1, 32, 32 + 2 * pad - filter_size + 1, pad, 32
    )
    pool = [kp.pool_forward_2x2, kp.pool_backward]
    if direct and normalization is None:  # pooled in the conv's pass, dw from the pooled gradient
        conv, pool = [kc.pad_planes, kc.direct_forward, kc.pooled_dw], []
    elif direct:
        conv = [kc.pad_planes, kc.direct_forward, kc.direct_dw]
    else:
        conv = [kc.im2col, kc.bias_to_nchw, kc.dout_to_2d]
    norm = {
        "spatial_batchnorm": [kn.bn_stats, kn.bn_apply, kn.bn_backward],
        "groupnorm": [kn.gn_forward, kn.gn_backward],
    }.get(normalization, [])
    return conv + pool + norm


def _spec_kernels(spec: NetSpec, f32: bool) -> list:
    kinds = {layer.kind for layer in spec.body}
    gelu = (
        [kw.gelu_forward_f32, kw.gelu_backward_f32] if f32 else [kw.gelu_forward, kw.gelu_backward]
    )
    by_kind = {
        "conv": [kc.im2col, kc.bias_to_nchw, kc.dout_to_2d, kc.col2im]
        + [kc.pad_planes, kc.direct_forward, kc.direct_dw, kc.one_by_one]
        + [kwg.input_tiles, kwg.filter_tiles, kwg.output_tiles]
        + [kwg.dout_tiles, kwg.filter_grad, kwg.input_grad],
        "bn": [kn.bn_stats, kn.bn_apply, kn.bn_backward],
        "gn": [kn.gn_forward, kn.gn_backward],
        "pool": [kp.pool_forward, kp.pool_forward_2x2, kp.pool_backward],
        "gelu": gelu,
        "gap": [kw.global_avg_forward, kw.global_avg_backward],
        "gmp": [kw.global_max_forward, kw.global_max_backward],
    }
    return [k for kind, kernels in by_kind.items() if kind in kinds for k in kernels]


def cold_kernels(kernels, dtype) -> list[str] | None:
    """Names of the ``kernels`` (``cache=True`` dispatchers) for which Numba's on-disk cache
    holds no machine code for a layer dtype ``dtype``, built for this CPU from their current
    source.

    Reads only the cache's index files (where ``NUMBA_CACHE_DIR`` or ``__pycache__`` puts them);
    compiles nothing. Returns None when it cannot tell (a Numba whose cache layout differs).
    """
    try:
        want = kernel_dtype(dtype)  # float16 runs the float32 kernels
        return [k.py_func.__name__ for k in kernels if not _has_cached_code(k, want)]
    except Exception:  # noqa: BLE001 - Numba's cache internals are not a public API: say nothing
        return None


def _has_cached_code(dispatcher, dtype: np.dtype) -> bool:
    """Whether the dispatcher's cache index lists code for this machine, this source, a first
    array argument of ``dtype`` (every kernel's data; float64 accumulators come later) and, for
    a kernel that takes a vector width, a width this process may run it at (its own or a
    narrower one), and a register tile it may pick (``tile.tile_for``). Numba keys each entry
    by (argument types, the CPU's target triple, name and features, hashes of the bytecode);
    the index itself is empty when the source file changed since."""
    cache = dispatcher._cache
    index = cache._cache_file._load_index()
    _, machine, code = cache._index_key(None, dispatcher.targetctx.codegen())
    want = from_dtype(dtype)
    width = simd.current().nbytes
    tiles = {(t.rows, t.cols) for t in (tile.tile_for(False), tile.tile_for(True))}
    return any(
        key[1] == machine
        and key[2] == code
        and next((arg.dtype for arg in key[0] if isinstance(arg, types.Array)), None) == want
        # a kernel runs at the process's width or narrower (conv dw of 32 filters at 32 bytes)
        and all(arg.nbytes <= width for arg in key[0] if isinstance(arg, simd.WidthType))
        # and with a tile of the process's registers
        and all((a.rows, a.cols) in tiles for a in key[0] if isinstance(a, tile.TileType))
        for key in index
    )


def say_if_compiling(
    dtype="float32",
    filter_size: int = 7,
    normalization: str | None = None,
    file=None,
    layers: str | None = None,
) -> bool:
    """Print :data:`COMPILING_MESSAGE` (on stderr by default) when the model's kernels are not
    in Numba's cache yet; True if it did."""
    cold = cold_kernels(model_kernels(filter_size, normalization, layers, dtype), dtype)
    if cold:
        print(COMPILING_MESSAGE, file=file if file is not None else sys.stderr, flush=True)
    return bool(cold)


def warm() -> None:
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        x = rng.standard_normal((2, 3, 8, 8)).astype(dtype)
        w = rng.standard_normal((4, 3, 3, 3)).astype(dtype)
        w5 = rng.standard_normal((4, 3, 5, 5)).astype(dtype)
        w65 = rng.standard_normal((65, 3, 3, 3)).astype(dtype)
        # 3x3 on 8 x 8: the direct kernels, side by side; 5x5: im2col; 65 3x3 filters: Winograd
        for filters in (w, w5, w65):
            pad = filters.shape[-1] // 2
            bias = np.zeros(len(filters), dtype)
            out, cache = fl.conv_forward_fast(x, filters, bias, {"stride": 1, "pad": pad})
            fl.conv_backward_fast(out, cache)
            fl.conv_backward_fast(out, cache, compute_dx=False)
        for pool in (
            {"pool_height": 2, "pool_width": 2, "stride": 2},
            {"pool_height": 3, "pool_width": 3, "stride": 1},
        ):
            p, pcache = fl.max_pool_forward_fast(x, pool)
            fl.max_pool_backward_fast(p, pcache)
        for norm in (None, "spatial_batchnorm", "groupnorm"):
            model = ThreeLayerConvNet(
                input_dim=(3, 8, 8),
                num_filters=4,
                filter_size=3,
                hidden_dim=5,
                dtype=dtype,
                normalization=norm,
                num_groups=2,
                seed=0,
                reg=1e-3,
            )
            model.loss(x, np.array([0, 1]))
            model.loss(x)
        # a ConvNet with every other layer kind (GELU, global pools, a 3x3 pool)
        for spec in (WARM_SPEC, WARM_SPEC.replace("gap", "gmp")):
            model = ConvNet(spec, input_dim=(3, 8, 8), num_classes=2, dtype=dtype, seed=0)
            model.loss(x, np.array([0, 1]))
            model.loss(x)
        # the SIMD kernels at the widths the three-layer net runs them at here: the process's,
        # and 32 bytes below it (fast_layers picks it where 64 would waste lanes: 32 filters,
        # 25-row shards); 16 bytes only where it is the process's (smaller layers compile it
        # when first used); float64 (gradient checks) at the process's width only
        top = simd.current().nbytes
        for nbytes in {top, min(top, 32)} if dtype == np.float32 else {top}:
            with simd.using(nbytes):
                warm_vector_kernels(dtype, rng)
        adam(w, w, {})
        adam_inplace(w.copy(), w, {})
        warm_kernels(dtype)  # the workers' reduce + Adam


def warm_vector_kernels(dtype, rng) -> None:
    """Run the direct 7-wide convolution (also pooled in its pass, and its dw from a 2x2 pool's
    gradient, at the width that kernel picks) and the hidden layer's forward, dx (with
    sum(w**2)) and dw with its L2 term (a Solver step with reg > 0) or a worker's shards' dw
    summed in one pass, at shapes (64 filters, columns and rows rounded up) where every width
    up to ``simd.current()`` ties, so that width runs."""
    x = rng.standard_normal((2, 3, 8, 8)).astype(dtype)
    w7 = rng.standard_normal((64, 3, 7, 7)).astype(dtype)
    out, cache = conv_relu_forward(x, w7, np.zeros(64, dtype), {"stride": 1, "pad": 3})
    conv_relu_backward(out, cache)
    pool = {"pool_height": 2, "pool_width": 2, "stride": 2}
    out, cache = conv_relu_pool_forward(x, w7, np.zeros(64, dtype), {"stride": 1, "pad": 3}, pool)
    conv_relu_pool_backward(out, cache, compute_dx=False)
    w = rng.standard_normal((x[0].size, 64)).astype(dtype)
    fl.affine_relu_forward_fast(x, w, np.zeros(64, dtype))
    fl.affine_dx_fast(rng.standard_normal((63, 64)).astype(dtype), w, sumsq=True)
    da = rng.standard_normal((2, 64)).astype(dtype)
    fl.affine_dw_l2_fast(x, da, w, 1e-3)
    fl.affine_dw_sum([x[:1], x[1:]], [da[:1], da[1:]], w, [1.0, 1.0], (0, 1), np.empty_like(w))


def main() -> None:
    start = time.perf_counter()
    print(simd.describe())
    say_if_compiling()
    warm()
    print(f"numba kernels compiled or loaded from cache in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
