"""Compile every Numba kernel once into its on-disk cache: ``python -m pipeline.warmup``.

The kernels are declared with ``cache=True``, so later processes (tests, Dask workers) load the
machine code instead of compiling it. This runs each public fast path on tiny inputs, in
float32 and float64, and prints how long it took.
"""

from __future__ import annotations

import time

import numpy as np


def warm() -> None:
    from pipeline import fast_layers as fl
    from pipeline.cnn import ThreeLayerConvNet
    from pipeline.layer_utils import conv_relu_backward, conv_relu_forward
    from pipeline.optim import adam, adam_inplace

    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        x = rng.standard_normal((2, 3, 8, 8)).astype(dtype)
        w = rng.standard_normal((4, 3, 3, 3)).astype(dtype)
        b = np.zeros(4, dtype)
        out, cache = fl.conv_forward_fast(x, w, b, {"stride": 1, "pad": 1})
        fl.conv_backward_fast(out, cache)
        fl.conv_backward_fast(out, cache, compute_dx=False)
        w7 = rng.standard_normal((4, 3, 7, 7)).astype(dtype)  # the direct 7-wide kernels
        out, cache = conv_relu_forward(x, w7, b, {"stride": 1, "pad": 3})
        conv_relu_backward(out, cache)
        for pool in ({"pool_height": 2, "pool_width": 2, "stride": 2}, {"pool_height": 3, "pool_width": 3, "stride": 1}):
            p, pcache = fl.max_pool_forward_fast(x, pool)
            fl.max_pool_backward_fast(p, pcache)
        for norm in (None, "spatial_batchnorm", "groupnorm"):
            model = ThreeLayerConvNet(input_dim=(3, 8, 8), num_filters=4, filter_size=3, hidden_dim=5,
                                      dtype=dtype, normalization=norm, num_groups=2, seed=0, reg=1e-3)
            model.loss(x, np.array([0, 1]))
            model.loss(x)
        adam(w, w, {})
        adam_inplace(w.copy(), w, {})


def main() -> None:
    start = time.perf_counter()
    warm()
    print(f"numba kernels compiled or loaded from cache in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
