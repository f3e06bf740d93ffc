"""The SIMD kernels at each register tile, measured side by side in one run: what
``pipeline._kernels.tile.tile_for`` picks from.

    python benchmarks/bench_tiles.py [--threads 2] [--repeat 8]

float32 at the notebook's shapes: the hidden layer (50 rows, 8192 x 500: forward, dx with the
sum of squares, dw with the L2 term) and the 7x7 convolution (50 images of 3 x 32 x 32, 32
filters: forward with bias and ReLU, dw) at the width the layers pick for them here. Before
every call a 64 MB buffer is written, so w comes from memory as in a Solver step (where Adam
has just rewritten it) and not from a cache the previous call left warm. The cases are timed
in interleaved rounds; the table gives each case's median and minimum per call and, per
kernel, the ratio of each tile's median to 3 x 4's. Every tile computes the same bits (checked
here too).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=8, help="interleaved rounds (default 8)")
    p.add_argument("--calls", type=int, default=10, help="timed calls per case per round")
    args = p.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import numpy as np

    from pipeline import fast_layers as fl
    from pipeline._kernels import tile

    print(fl.machine_text())
    rng = np.random.default_rng(0)
    N, D, M = 50, 8192, 500
    x = rng.standard_normal((N, 32, 16, 16), dtype=np.float32)
    w = rng.standard_normal((D, M), dtype=np.float32)
    b = rng.standard_normal(M, dtype=np.float32)
    da = rng.standard_normal((N, M), dtype=np.float32)
    xc = rng.standard_normal((N, 3, 32, 32), dtype=np.float32)
    wc = rng.standard_normal((32, 3, 7, 7), dtype=np.float32)
    bc = np.zeros(32, np.float32)
    conv = {"stride": 1, "pad": 3}
    _, conv_cache = fl.conv_forward_fast(xc, wc, bc, conv)
    dconv = rng.standard_normal((N, 32, 32, 32), dtype=np.float32)
    cases = {
        "affine forward": lambda: fl.affine_relu_forward_fast(x, w, b)[0],
        "affine dx": lambda: fl.affine_dx_fast(da, w, sumsq=True)[0],
        "affine dw": lambda: fl.affine_dw_l2_fast(x, da, w, 1e-3),
        "conv forward": lambda: fl.conv_relu_forward_fast(xc, wc, bc, conv)[0],
        "conv dw": lambda: fl.conv_backward_fast(dconv, conv_cache, compute_dx=False)[1],
    }
    flops = {"affine": 2 * N * D * M, "conv": 2 * N * 32 * 3 * 49 * 32 * 32}
    tiles = [tile.Tile(*shape) for shape in tile.SHAPES]
    original = fl._tile
    junk = np.zeros(16 << 20, np.float32)  # 64 MB: more than any L3 here
    times = {(name, t): [] for name in cases for t in tiles}
    results = {}
    try:
        for t in tiles:  # compile (or load) each specialization, and keep its output
            fl._tile = lambda tall=False, t=t: t
            for name, run in cases.items():
                results[name, t] = run()
        for _ in range(args.repeat):
            for name, run in cases.items():
                for t in tiles:
                    fl._tile = lambda tall=False, t=t: t
                    for _ in range(args.calls):
                        junk.sum()  # evict w (and everything else) from the caches
                        start = time.perf_counter()
                        run()
                        times[name, t].append(time.perf_counter() - start)
    finally:
        fl._tile = original
    for name in cases:
        for t in tiles[1:]:
            np.testing.assert_array_equal(results[name, t], results[name, tiles[0]], err_msg=name)
    chosen = {}  # the tile each layer asks for here, recorded from a call
    for name, run in cases.items():
        fl._tile = lambda tall=False, name=name: chosen.setdefault(name, original(tall))
        run()
    fl._tile = original
    print(f"float32, {args.threads} threads, caches evicted before each call; same bits per tile")
    head = f"{'median ms':>10} {'min ms':>8} {'GFLOP/s':>8} {'vs 3x4':>7}"
    print(f"{'kernel':>15} {'tile':>5} {head}")
    for name in cases:
        base = statistics.median(times[name, tiles[0]])
        for t in tiles:
            med = statistics.median(times[name, t])
            rate = flops[name.split()[0]] / med / 1e9
            mark = "  <- used here" if chosen[name] == t else ""
            print(
                f"{name:>15} {t.rows}x{t.cols:<3} {1e3 * med:10.3f} "
                f"{1e3 * min(times[name, t]):8.3f} {rate:8.0f} {med / base:6.2f}x{mark}"
            )


if __name__ == "__main__":
    main()
