"""Fast layers against the naive reference layers on many random shapes and parameters."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import fast_layers as fl
from pipeline import layers as L
from pipeline.gradient_check import rel_error


def _rng(seed):
    return np.random.default_rng(seed)


def _close(fast, ref, dtype, what=""):
    """float64: ~1e-9 relative to the reference's scale; float32: ~1e-4."""
    fast = np.asarray(fast)
    ref = np.asarray(ref)
    assert fast.shape == ref.shape, what
    tol = 1e-9 if dtype == np.float64 else 1e-4
    scale = max(float(np.max(np.abs(ref))), 1e-30) if ref.size else 1.0
    np.testing.assert_allclose(fast, ref, rtol=tol, atol=tol * scale, err_msg=what)


# --------------------------------------------------------------------------------------------
# convolution


def _conv_cases(count, seed):
    rng = _rng(seed)
    cases = []
    while len(cases) < count:
        stride = int(rng.integers(1, 4))
        pad = int(rng.integers(0, 4))
        HH, WW = int(rng.integers(1, 5)), int(rng.integers(1, 5))
        Ho, Wo = int(rng.integers(1, 6)), int(rng.integers(1, 6))
        H = (Ho - 1) * stride + HH - 2 * pad
        W = (Wo - 1) * stride + WW - 2 * pad
        if H < 1 or W < 1:
            continue
        N, C, F = int(rng.choice([1, 2, 3])), int(rng.integers(1, 5)), int(rng.integers(1, 6))
        cases.append((N, C, H, W, F, HH, WW, stride, pad))
    # always include 1x1 filters, N=1 and non-square ones
    cases += [
        (1, 3, 5, 7, 4, 1, 1, 1, 0),
        (2, 2, 7, 5, 3, 1, 1, 2, 1),
        (1, 1, 7, 4, 2, 3, 2, 1, 2),
        (2, 3, 9, 5, 2, 5, 1, 2, 3),
        (3, 4, 4, 4, 5, 4, 4, 1, 3),
    ]
    return cases


# The networks' shapes at the widths issue 22 names (3x3 'same' convs on 16 to 512 channels,
# each on whichever path the dispatch picks: direct, im2col or Winograd), and airbench's 2x2
# valid whitening conv on RGB images.
RECIPE_CASES = [
    (2, 16, 15, 15, 32, 3, 3, 1, 1),
    (2, 32, 16, 16, 24, 3, 3, 1, 1),
    (1, 48, 7, 7, 64, 3, 3, 1, 1),
    (2, 128, 8, 8, 17, 3, 3, 1, 1),
    (1, 256, 4, 4, 256, 3, 3, 1, 1),
    (1, 512, 3, 3, 512, 3, 3, 1, 1),
    (2, 3, 32, 32, 24, 2, 2, 1, 0),
    (3, 3, 9, 7, 6, 2, 2, 1, 0),
]

CONV_CASES = _conv_cases(40, 0) + RECIPE_CASES


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "N{}C{}H{}W{}F{}k{}x{}s{}p{}".format(*c))
def test_conv_matches_naive(case, dtype):
    N, C, H, W, F, HH, WW, stride, pad = case
    rng = _rng(hash(case) % 2**32)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((F, C, HH, WW)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    cp = {"stride": stride, "pad": pad}
    out, cache = fl.conv_forward_fast(x, w, b, cp)
    out_n, cache_n = L.conv_forward_naive(x, w, b, cp)
    assert out.dtype == dtype
    _close(out, out_n, dtype, "out")
    dout = rng.standard_normal(out.shape).astype(dtype)
    grads = fl.conv_backward_fast(dout, cache)
    grads_n = L.conv_backward_naive(dout, cache_n)
    for name, g, gn in zip(("dx", "dw", "db"), grads, grads_n):
        assert g.dtype == dtype, name
        _close(g, gn, dtype, name)


# The direct kernels (fl.direct_images_per_row). 7-wide filters at stride 1: F and C*HH
# multiples of 3 or not (the kernels work on 3 filters / 3 rows at a time), N=1, 1- to 7-high
# filters, non-square images, planes of one to several SIMD blocks, no padding, pad 6 (the
# largest for which dx is a direct "full" convolution) and pads beyond it or beyond HH - 1 (dx
# by GEMM). 3x3 filters on outputs from 15 wide (fl.DIRECT_MIN_W_OUT): 'same' and 'valid', rows
# of one vector and a bit, of two, and 33 wide, pads past 2 (dx by GEMM); narrower, several
# images side by side in a row: image counts that fill the last row or not (one image alone),
# 7 x 7 and 3 x 3 planes, pads 0, 1, 2 and 3 (dx by GEMM), non-square.
DIRECT_CASES = [
    (2, 3, 15, 15, 5, 3, 3, 1, 1),
    (1, 4, 6, 31, 4, 3, 3, 1, 1),
    (3, 2, 9, 17, 7, 3, 3, 1, 0),
    (2, 5, 4, 33, 3, 3, 3, 1, 1),
    (1, 2, 5, 16, 2, 3, 3, 1, 3),
    (9, 3, 7, 7, 5, 3, 3, 1, 1),
    (8, 2, 7, 7, 4, 3, 3, 1, 1),
    (1, 2, 7, 7, 3, 3, 3, 1, 1),
    (17, 4, 3, 3, 7, 3, 3, 1, 1),
    (5, 2, 6, 9, 3, 3, 3, 1, 0),
    (6, 3, 5, 4, 4, 3, 3, 1, 2),
    (3, 2, 4, 6, 2, 3, 3, 1, 3),
    (1, 1, 7, 7, 1, 7, 7, 1, 0),
    (2, 3, 12, 12, 8, 7, 7, 1, 3),
    (3, 2, 5, 9, 5, 3, 7, 1, 2),
    (1, 4, 1, 10, 3, 1, 7, 1, 0),
    (2, 3, 6, 4, 2, 7, 7, 1, 4),
    (3, 1, 9, 7, 7, 5, 7, 1, 1),
    (2, 1, 3, 9, 2, 1, 7, 1, 3),
    (1, 2, 20, 40, 4, 7, 7, 1, 6),
    (2, 2, 8, 8, 3, 3, 7, 1, 3),
    (1, 3, 4, 3, 5, 2, 7, 1, 8),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(
    "case", DIRECT_CASES, ids=lambda c: "N{}C{}H{}W{}F{}k{}x{}s{}p{}".format(*c)
)
def test_conv_direct_path_matches_naive(case, dtype):
    N, C, H, W, F, HH, WW, stride, pad = case
    assert fl.direct_images_per_row(HH, WW, stride, W, W + 2 * pad - WW + 1, pad, F)
    test_conv_matches_naive(case, dtype)
    rng = _rng(hash(case) % 2**32 + 1)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((F, C, HH, WW)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    out, cache = fl.conv_forward_fast(x, w, b, {"stride": stride, "pad": pad})
    dout = rng.standard_normal(out.shape).astype(dtype)
    dx, dw, db = fl.conv_backward_fast(dout, cache)
    dx0, dw0, db0 = fl.conv_backward_fast(dout, cache, compute_dx=False)
    assert dx0 is None
    np.testing.assert_array_equal(dw, dw0)
    np.testing.assert_array_equal(db, db0)


def test_the_direct_kernels_are_chosen_by_shape_alone(monkeypatch):
    """7-wide filters at stride 1 always, one image at a time; 3x3 from 15 output columns on one
    image at a time, narrower side by side in rows of at least 32 columns (up to 128 filters;
    more, im2col); the rest im2col. The CPU's vector width never enters: workers on different
    CPUs take the same path."""
    per_row = fl.direct_images_per_row  # (HH, WW, stride, W, W_out, pad, F)
    assert per_row(7, 7, 1, 3, 3, 3, 512) == per_row(1, 7, 1, 46, 40, 0, 8) == 1
    assert per_row(3, 3, 1, 15, fl.DIRECT_MIN_W_OUT, 1, 256) == 1
    assert per_row(3, 3, 1, 14, 14, 1, 64) == 3  # 3 x 15 columns >= 32
    assert per_row(3, 3, 1, 7, 7, 1, 64) == 4 and per_row(3, 3, 1, 3, 3, 1, 64) == 8
    assert per_row(3, 3, 1, 7, 7, 1, fl.DIRECT_PACKED_MAX_FILTERS + 1) == 0
    assert per_row(3, 3, 2, 31, 16, 1, 8) == per_row(7, 7, 2, 31, 16, 3, 8) == 0
    assert per_row(5, 5, 1, 31, 31, 2, 8) == per_row(3, 1, 1, 31, 31, 1, 8) == 0
    ran = []
    for name in ("direct_forward", "one_by_one", "im2col"):
        kernel = getattr(fl.kc, name)
        monkeypatch.setattr(fl.kc, name, lambda *a, _k=kernel, _n=name: ran.append(_n) or _k(*a))
    w = np.ones((3, 2, 3, 3), np.float32)
    for width, stride in ((16, 1), (14, 1), (9, 2)):
        x = np.ones((2, 2, 9, width), np.float32)
        fl.conv_forward_fast(x, w, np.zeros(3, np.float32), {"stride": stride, "pad": 1})
    assert ran == ["direct_forward", "direct_forward", "one_by_one", "im2col"]


def test_conv_direct_path_bit_identical_across_calls_and_threads():
    """The distributed trainer relies on bit-identical results for the same inputs."""
    import numba

    rng = _rng(7)
    threads = numba.get_num_threads()
    # the three-layer net's conv; airbench's first 3x3; a 3x3 on 7 x 7 planes, side by side
    for size, C, pad, H in ((7, 3, 3, 31), (3, 24, 1, 31), (3, 16, 1, 7)):
        x = rng.standard_normal((5, C, H, H)).astype(np.float32)
        w = rng.standard_normal((32, C, size, size)).astype(np.float32)
        b = rng.standard_normal(32).astype(np.float32)
        cp = {"stride": 1, "pad": pad}
        results = []
        try:
            for t in sorted({1, threads}) * 2:
                numba.set_num_threads(t)
                out, cache = fl.conv_forward_fast(x, w, b, cp)
                dout = np.sin(out)
                results.append((out,) + fl.conv_backward_fast(dout, cache))
        finally:
            numba.set_num_threads(threads)
        for r in results[1:]:
            for a, ref in zip(r, results[0]):
                np.testing.assert_array_equal(a, ref)


# Winograd's F(m x m, 3x3) (fl.winograd): 3x3 at stride 1 from 64 input channels, or on planes
# under 15 columns with more than 64 filters. Outputs a multiple of the 4 x 4 tile or not (one
# tile and a bit, a 1 x 2 plane), pads 0 to 3, non-square planes, one image, one filter, more
# images than a block of 16, the airbench shapes' 31 x 31 and 15 x 15, 7 x 7 and 3 x 3 (3 x 3
# tiles: fl.kwg.tile_side), 5 x 5.
WINOGRAD_CASES = [
    (3, 5, 7, 7, 66, 3, 3, 1, 1),
    (2, 3, 3, 3, 70, 3, 3, 1, 1),
    (1, 2, 5, 9, 65, 3, 3, 1, 2),
    (2, 4, 8, 6, 67, 3, 3, 1, 0),
    (3, 2, 1, 2, 65, 3, 3, 1, 1),
    (1, 1, 4, 8, 68, 3, 3, 1, 3),
    (2, 64, 15, 15, 5, 3, 3, 1, 1),
    (1, 65, 31, 20, 1, 3, 3, 1, 1),
    (17, 70, 3, 3, 3, 3, 3, 1, 1),
    (2, 66, 9, 30, 4, 3, 3, 1, 0),
    (3, 64, 5, 5, 6, 3, 3, 1, 1),
    (2, 67, 3, 31, 2, 3, 3, 1, 1),
]


def _winograd_cases(count, seed):
    """Random shapes with 1 to 6 channels and 1 to 9 filters, run on the Winograd kernels by
    lowering the channel count they start at (the tile arithmetic does not depend on it)."""
    rng = _rng(seed)
    cases = []
    while len(cases) < count:
        pad = int(rng.integers(0, 4))
        H, W = int(rng.integers(1, 20)), int(rng.integers(1, 20))
        if H + 2 * pad < 3 or W + 2 * pad < 3:
            continue
        N, C, F = int(rng.integers(1, 20)), int(rng.integers(1, 7)), int(rng.integers(1, 10))
        cases.append((N, C, H, W, F, 3, 3, 1, pad))
    return cases


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(
    "case", WINOGRAD_CASES, ids=lambda c: "N{}C{}H{}W{}F{}k{}x{}s{}p{}".format(*c)
)
def test_conv_winograd_path_matches_naive(case, dtype):
    N, C, H, W, F, HH, WW, stride, pad = case
    assert fl.winograd(HH, WW, stride, C, W + 2 * pad - 2, F)
    test_conv_matches_naive(case, dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize(
    "case", _winograd_cases(24, 5), ids=lambda c: "N{}C{}H{}W{}F{}k{}x{}s{}p{}".format(*c)
)
def test_conv_winograd_kernels_match_naive_on_random_shapes(case, dtype, monkeypatch):
    """Forward with the ReLU, dx, dw, db through it, and compute_dx=False, in the caller's dtype
    (float16 computed in float32), against the naive layers in float64 on the same values."""
    monkeypatch.setattr(fl, "WINOGRAD_MIN_CHANNELS", 1)
    N, C, H, W, F, HH, WW, stride, pad = case
    assert fl.winograd(HH, WW, stride, C, W + 2 * pad - 2, F)
    rng = _rng(hash(case) % 2**32)
    x, w, b = (rng.standard_normal(s).astype(dtype) for s in ((N, C, H, W), (F, C, 3, 3), (F,)))
    cp = {"stride": 1, "pad": pad}
    out, cache = fl.conv_relu_forward_fast(x, w, b, cp)
    dout = rng.standard_normal(out.shape).astype(dtype)
    grads = fl.conv_backward_fast(dout, cache)
    ref, cache_n = L.conv_forward_naive(*(a.astype(np.float64) for a in (x, w, b)), cp)
    mask = out > 0  # the ReLU as the fast layer applied it
    refs = (np.maximum(ref, 0),) + L.conv_backward_naive(dout.astype(np.float64) * mask, cache_n)
    tol = {np.float64: 1e-9, np.float32: 1e-4, np.float16: 3e-3}[dtype]
    for name, g, gn in zip(("out", "dx", "dw", "db"), (out,) + grads, refs):
        assert g.dtype == dtype, name
        scale = max(float(np.abs(gn).max()), 1e-30)
        np.testing.assert_allclose(g, gn, rtol=tol, atol=tol * scale, err_msg=name)
    dx0, dw0, db0 = fl.conv_backward_fast(dout, cache, compute_dx=False)
    assert dx0 is None
    np.testing.assert_array_equal(dw0, grads[1])
    np.testing.assert_array_equal(db0, grads[2])


def test_the_winograd_tiles_are_chosen_by_shape_alone(monkeypatch):
    """3x3 at stride 1 from 64 input channels, any plane, any pad; with fewer channels on planes
    under 15 columns with more than 64 filters (else the direct kernels side by side); nothing
    else."""
    wino = fl.winograd  # (HH, WW, stride, C, W_out, F)
    many = fl.DIRECT_PACKED_MAX_FILTERS + 1
    assert wino(3, 3, 1, fl.WINOGRAD_MIN_CHANNELS, 31, 1) and wino(3, 3, 1, 256, 3, 256)
    assert not wino(3, 3, 1, fl.WINOGRAD_MIN_CHANNELS - 1, 31, 64)
    assert wino(3, 3, 1, 3, 7, many) and wino(3, 3, 1, 3, fl.DIRECT_MIN_W_OUT - 1, many)
    assert not wino(3, 3, 1, 3, 7, many - 1) and not wino(3, 3, 1, 3, fl.DIRECT_MIN_W_OUT, many)
    assert not wino(3, 3, 2, 64, 7, 256) and not wino(5, 5, 1, 64, 7, 256)
    assert not wino(3, 1, 1, 64, 7, 256) and not wino(7, 7, 1, 64, 7, 256)
    ran = []
    for name in ("input_tiles", "output_tiles"):
        kernel = getattr(fl.kwg, name)
        monkeypatch.setattr(fl.kwg, name, lambda *a, _k=kernel, _n=name: ran.append(_n) or _k(*a))
    for name in ("im2col", "direct_forward"):
        kernel = getattr(fl.kc, name)
        monkeypatch.setattr(fl.kc, name, lambda *a, _k=kernel, _n=name: ran.append(_n) or _k(*a))
    for C, F, width in ((2, 65, 7), (2, 64, 7), (64, 3, 16), (63, 3, 16), (63, 3, 9)):
        x = np.ones((2, C, 9, width), np.float32)
        w = np.ones((F, C, 3, 3), np.float32)
        fl.conv_forward_fast(x, w, np.zeros(F, np.float32), {"stride": 1, "pad": 1})
    assert ran == [
        "input_tiles",
        "output_tiles",
        "direct_forward",
        "input_tiles",
        "output_tiles",
        "direct_forward",
        "direct_forward",
    ]


@pytest.mark.parametrize("m", sorted(fl.kwg.TRANSFORMS))
def test_winograd_transforms_are_exact(m):
    """F(m x m, 3x3): sum_j AT[i, j] G[j, k] BT[j, l] = [l == i + k] in exact fractions, so each
    output of a tile is exactly its 3-tap correlation."""
    from fractions import Fraction

    AT, G, BT = fl.kwg.TRANSFORMS[m]
    a = m + 2
    assert AT.shape == (m, a) and G.shape == (a, 3) and BT.shape == (a, a)
    Gf = [[Fraction(v).limit_denominator(24) for v in row] for row in G]
    assert np.array_equal(np.array(Gf, dtype=float), G)
    for i in range(m):
        for k in range(3):
            for col in range(a):
                total = sum(Fraction(AT[i, j]) * Gf[j][k] * Fraction(BT[j, col]) for j in range(a))
                assert total == (1 if col == i + k else 0), (i, k, col)


def test_winograd_tile_side_takes_the_fewest_products():
    """4 x 4 tiles (36 products each) on 7 x 7 and wider planes, 3 x 3 (25) on 3 x 3, 5 x 5 and
    6 x 6 ones; both on a non-square plane by the product count."""
    side = fl.kwg.tile_side
    assert [side(n, n) for n in (1, 2, 3, 4, 5, 6, 7, 8, 15, 31)] == [3, 3, 3, 4, 3, 3, 4, 4, 4, 4]
    assert side(3, 31) == 3  # 1 x 11 tiles x 25 = 275 products against 1 x 8 x 36 = 288
    assert side(4, 31) == 4  # 1 x 8 x 36 = 288 against 2 x 11 x 25 = 550


def test_conv_winograd_bit_identical_across_calls_and_threads(monkeypatch):
    """4 x 4 and 3 x 3 tiles, at shapes where every Winograd kernel runs in parallel."""
    import numba

    launched = []
    launch = fl._launch

    def recording(kernel, work, *args):
        launched.append((kernel.py_func.__name__, work >= fl._SERIAL_BELOW))
        return launch(kernel, work, *args)

    monkeypatch.setattr(fl, "_launch", recording)
    rng = _rng(8)
    threads = numba.get_num_threads()
    for H in (7, 3):
        x = rng.standard_normal((20, 64, H, H)).astype(np.float32)
        w = rng.standard_normal((72, 64, 3, 3)).astype(np.float32)
        b = rng.standard_normal(72).astype(np.float32)
        results = []
        try:
            for t in sorted({1, threads}) * 2:
                numba.set_num_threads(t)
                out, cache = fl.conv_relu_forward_fast(x, w, b, {"stride": 1, "pad": 1})
                results.append((out,) + fl.conv_backward_fast(np.sin(out), cache))
        finally:
            numba.set_num_threads(threads)
        for r in results[1:]:
            for a, ref in zip(r, results[0]):
                np.testing.assert_array_equal(a, ref)
    wino = {name: parallel for name, parallel in launched if name in vars(fl.kwg)}
    assert len(wino) == 6 and all(wino.values()), wino


def test_conv_winograd_mixed_dtypes_like_the_other_paths():
    """float32 x with float64 w and b: computed in float32, out and dx float32, dw and db in
    their parameters' float64; the same values as the im2col path's to float32 precision."""
    rng = _rng(9)
    x = rng.standard_normal((3, 64, 7, 7)).astype(np.float32)
    w, b = rng.standard_normal((5, 64, 3, 3)), rng.standard_normal(5)
    out, cache = fl.conv_forward_fast(x, w, b, {"stride": 1, "pad": 1})
    dout = rng.standard_normal(out.shape).astype(np.float32)
    dx, dw, db = fl.conv_backward_fast(dout, cache)
    assert (out.dtype, dx.dtype, dw.dtype, db.dtype) == (
        np.float32,
        np.float32,
        np.float64,
        np.float64,
    )
    ref, cache_n = L.conv_forward_naive(x.astype(np.float64), w, b, {"stride": 1, "pad": 1})
    _close(out, ref, np.float32, "out")
    for name, g, gn in zip(
        ("dx", "dw", "db"), (dx, dw, db), L.conv_backward_naive(dout.astype(np.float64), cache_n)
    ):
        _close(g, gn, np.float32, name)


def test_conv_notebook_shapes_float64():
    """The notebook's check: fast vs naive relative errors ~1e-9 or better."""
    rng = _rng(1)
    x = rng.standard_normal((100, 3, 31, 31))
    w = rng.standard_normal((25, 3, 3, 3))
    b = rng.standard_normal(25)
    cp = {"stride": 2, "pad": 1}
    out_n, cache_n = L.conv_forward_naive(x, w, b, cp)
    out_f, cache_f = fl.conv_forward_fast(x, w, b, cp)
    assert rel_error(out_n, out_f) < 1e-9
    dout = rng.standard_normal(out_n.shape)
    for g_n, g_f in zip(L.conv_backward_naive(dout, cache_n), fl.conv_backward_fast(dout, cache_f)):
        assert rel_error(g_n, g_f) < 1e-9


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_conv_compute_dx_false_skips_dx_and_keeps_dw_db(dtype):
    rng = _rng(2)
    x = rng.standard_normal((3, 3, 8, 8)).astype(dtype)
    w = rng.standard_normal((4, 3, 3, 3)).astype(dtype)
    b = rng.standard_normal(4).astype(dtype)
    out, cache = fl.conv_forward_fast(x, w, b, {"stride": 1, "pad": 1})
    dout = rng.standard_normal(out.shape).astype(dtype)
    dx, dw, db = fl.conv_backward_fast(dout, cache)
    dx0, dw0, db0 = fl.conv_backward_fast(dout, cache, compute_dx=False)
    assert dx is not None and dx0 is None
    np.testing.assert_array_equal(dw, dw0)
    np.testing.assert_array_equal(db, db0)


def test_conv_keeps_parameter_dtypes_and_does_not_modify_inputs():
    rng = _rng(3)
    x = rng.standard_normal((2, 3, 6, 5)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 2))  # float64 weights with float32 data
    b = rng.standard_normal(4).astype(np.float32)
    copies = [a.copy() for a in (x, w, b)]
    out, cache = fl.conv_forward_fast(x, w, b, {"stride": 1, "pad": 1})
    assert out.dtype == np.float32
    dout = rng.standard_normal(out.shape).astype(np.float32)
    dout_copy = dout.copy()
    dx, dw, db = fl.conv_backward_fast(dout, cache)
    assert (dx.dtype, dw.dtype, db.dtype) == (np.float32, np.float64, np.float32)
    for a, c in zip((x, w, b, dout), copies + [dout_copy]):
        np.testing.assert_array_equal(a, c)


def test_conv_non_contiguous_inputs():
    rng = _rng(4)
    xb = rng.standard_normal((5, 9, 3, 2))
    x = xb.transpose(3, 2, 0, 1)[:, :, ::-1, ::2]  # (2, 3, 5, 5), no unit strides
    w = rng.standard_normal((3, 3, 2, 8)).transpose(3, 0, 2, 1)[::2]  # (4, 3, 2, 3)
    b = rng.standard_normal(8)[::2]
    assert not x.flags.c_contiguous and not w.flags.c_contiguous and not b.flags.c_contiguous
    cp = {"stride": 1, "pad": 1}
    out, cache = fl.conv_forward_fast(x, w, b, cp)
    out_c, cache_c = fl.conv_forward_fast(*(np.ascontiguousarray(a) for a in (x, w, b)), cp)
    np.testing.assert_array_equal(out, out_c)
    dout = rng.standard_normal(out.shape[::-1]).T  # non-contiguous dout
    for g, gc in zip(
        fl.conv_backward_fast(dout, cache),
        fl.conv_backward_fast(np.ascontiguousarray(dout), cache_c),
    ):
        np.testing.assert_array_equal(g, gc)
    out_n, _ = L.conv_forward_naive(x, w, b, cp)
    _close(out, out_n, np.float64)


# --------------------------------------------------------------------------------------------
# affine-ReLU forward for few rows

# (N, D, M): D = 0 (NumPy: relu(b)), N = 1, not a multiple of 3, the notebook's 50, the last kernel
# row count 63 and the first NumPy one 64; D under / over / not a multiple of a k block (128); M
# under one group of 4 vectors (NumPy), at it, not a multiple of it, over one task's 4 groups, the
# notebook's shape
FORWARD_CASES = [
    (3, 0, 40),
    (1, 1, 40),
    (2, 5, 32),
    (4, 127, 33),
    (7, 129, 17),
    (5, 300, 95),
    (13, 64, 16),
    (50, 257, 200),
    (63, 130, 129),
    (64, 140, 70),
    (50, 8192, 500),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("case", FORWARD_CASES, ids=lambda c: "N{}D{}M{}".format(*c))
def test_affine_relu_forward_matches_naive(case, dtype):
    N, D, M = case
    rng = _rng(sum(case) + 1)
    x = rng.standard_normal((N, D)).astype(dtype)
    w = rng.standard_normal((D, M)).astype(dtype)
    b = rng.standard_normal(M).astype(dtype)
    out, ((cx, cw, cb), cout) = fl.affine_relu_forward_fast(x, w, b)
    ref = np.maximum(x.astype(np.float64) @ w.astype(np.float64) + b, 0)
    assert out.dtype == dtype and out.shape == (N, M)
    assert cout is out and cx is x and cw is w and cb is b
    if dtype == np.float16:
        np.testing.assert_allclose(out, ref, rtol=5e-3, atol=5e-3 * max(np.abs(ref).max(), 1))
    else:
        _close(out, ref, dtype, f"{case}")
    if N > 63 or D == 0 or dtype == np.float16 or M < 4 * 32 // np.dtype(dtype).itemsize:
        # NumPy's product, bias and ReLU: the naive layers bit for bit
        np.testing.assert_array_equal(out, L.relu_forward(L.affine_forward(x, w, b)[0])[0])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_affine_relu_forward_keeps_nan_and_negative_zero_like_np_maximum(dtype):
    """With D = 1 the kernel's sum is one rounded product, so out must be
    np.maximum(x * w + b, 0) bit for bit: NaN stays NaN (a diverging run must show in its loss),
    -0.0 and negatives become +0.0."""
    rng = _rng(4)
    x = rng.standard_normal((5, 1)).astype(dtype)
    x[0, 0], x[1, 0] = np.nan, -np.finfo(dtype).tiny  # NaN; a product that underflows to -0.0
    w = rng.standard_normal((1, 41)).astype(dtype)  # 41: NumPy's np.maximum has a scalar tail too
    w[0, :3] = np.finfo(dtype).tiny
    b = np.where(rng.random(41) < 0.5, -0.0, rng.standard_normal(41)).astype(dtype)
    b[:3] = -0.0
    out, _ = fl.affine_relu_forward_fast(x, w, b)
    expected = np.maximum(x * w + b, 0)
    assert (
        np.isnan(out[0]).all() and np.signbit((x * w + b)[1, :3]).all()
    )  # the cases are really there
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(np.signbit(out), np.signbit(expected))


def test_affine_relu_forward_bits_depend_on_neither_threads_nor_row_count():
    """The Solver's and the trainer's runs are reproducible only if a row's output is the same
    whatever the thread count, and a shard's rows the same in a call of any size."""
    import numba

    rng = _rng(12)
    x = rng.standard_normal((50, 2 * 4 * 4 * 32 + 7)).astype(np.float32)
    w = rng.standard_normal((x.shape[1], 301)).astype(np.float32)
    b = rng.standard_normal(301).astype(np.float32)
    threads = numba.get_num_threads()
    results = []
    counts = sorted({1, numba.config.NUMBA_NUM_THREADS})
    assert (
        len(counts) == 2 or numba.config.NUMBA_NUM_THREADS == 1
    )  # one count only on a 1-thread pool
    try:
        for t in counts * 2:
            numba.set_num_threads(t)
            results.append(fl.affine_relu_forward_fast(x, w, b)[0])
    finally:
        numba.set_num_threads(threads)
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])
    for lo, hi in ((0, 1), (3, 10), (10, 50), (49, 50)):
        np.testing.assert_array_equal(
            fl.affine_relu_forward_fast(x[lo:hi], w, b)[0], results[0][lo:hi]
        )


def test_affine_relu_forward_views_unmodified_and_bad_shapes():
    rng = _rng(6)
    x = (
        rng.standard_normal((6, 4, 3, 9)).astype(np.float32).transpose(0, 3, 2, 1)
    )  # (6, 9, 3, 4) view
    w = rng.standard_normal((40, 108)).astype(np.float32).T  # (108, 40) view
    b = rng.standard_normal(80).astype(np.float32)[::2]  # (40,) view
    copies = [a.copy() for a in (x, w, b)]
    out, _ = fl.affine_relu_forward_fast(x, w, b)
    _close(out, np.maximum(x.reshape(6, -1).astype(np.float64) @ w + b, 0), np.float32)
    for a, c in zip((x, w, b), copies):
        np.testing.assert_array_equal(a, c)
    with pytest.raises(ValueError, match=r"flattens to D=108 .* w has shape \(107, 40\)"):
        fl.affine_relu_forward_fast(x, w[:107], b)
    with pytest.raises(ValueError, match="b"):
        fl.affine_relu_forward_fast(x, w, b[:39])


# --------------------------------------------------------------------------------------------
# affine input gradient for few rows, with the weights' sum of squares

# (N, D, M): NumPy's row counts 1, 15 and 64, the kernel's first 16 and last 63; not a multiple of a
# panel of 4 vectors (32 float32, 16 float64 rows), at one and two panels, the notebook's 50; D = 1,
# not a multiple of 3 or of a task's 48 rows; M = 1, under / over one vector and pair of vectors
DX_CASES = [
    (1, 7, 40),
    (15, 100, 17),
    (16, 1, 1),
    (17, 5, 3),
    (20, 31, 33),
    (31, 49, 16),
    (32, 97, 95),
    (33, 144, 9),
    (50, 50, 500),
    (63, 130, 65),
    (64, 95, 65),
    (50, 8192, 500),
    (128, 300, 500),  # a worker's shard of 128
    (256, 97, 40),
    (257, 40, 33),  # past DX_MAX_ROWS: NumPy's
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("case", DX_CASES, ids=lambda c: "N{}D{}M{}".format(*c))
def test_affine_dx_and_sum_of_squares_match_naive(case, dtype):
    N, D, M = case
    rng = _rng(sum(case) + 2)
    da = rng.standard_normal((N, M)).astype(dtype)
    w = rng.standard_normal((D, M)).astype(dtype)
    dx, sq = fl.affine_dx_fast(da, w, sumsq=True)
    ref = da.astype(np.float64) @ w.astype(np.float64).T
    ref_sq = float(np.sum(w.astype(np.float64) ** 2))
    assert dx.dtype == dtype and dx.shape == (N, D) and isinstance(sq, float)
    np.testing.assert_array_equal(fl.affine_dx_fast(da, w), dx)  # the same dx without the squares
    if dtype == np.float16:
        np.testing.assert_allclose(dx, ref, rtol=5e-3, atol=5e-3 * np.abs(ref).max())
    else:
        _close(dx, ref, dtype, f"{case}")
    assert sq == pytest.approx(
        ref_sq, rel={np.float64: 1e-12, np.float32: 1e-6, np.float16: 1e-2}[dtype]
    )
    if not 16 <= N <= 256 or dtype == np.float16:  # NumPy's product and np.vdot, bit for bit
        np.testing.assert_array_equal(dx, da @ w.T)
        wk = w.astype(np.float32) if dtype == np.float16 else w
        assert sq == float(np.vdot(wk, wk))


def test_affine_dx_bits_depend_on_neither_threads_nor_row_count():
    """A row's dx is one k-ordered sum whatever the thread count or the call's row count from 16
    to 256 (a shard's rows give the same bits in a call of any such size); the sum of squares
    too."""
    import numba

    rng = _rng(13)
    da = rng.standard_normal((256, 301)).astype(np.float32)
    w = rng.standard_normal((2 * 48 * 3 + 7, 301)).astype(np.float32)
    threads = numba.get_num_threads()
    results = []
    counts = sorted({1, numba.config.NUMBA_NUM_THREADS})
    assert len(counts) == 2 or numba.config.NUMBA_NUM_THREADS == 1
    try:
        for t in counts * 2:
            numba.set_num_threads(t)
            results.append(fl.affine_dx_fast(da, w, sumsq=True))
    finally:
        numba.set_num_threads(threads)
    for dx, sq in results[1:]:
        np.testing.assert_array_equal(dx, results[0][0])
        assert sq == results[0][1]
    for lo, hi in ((0, 16), (3, 20), (10, 50), (0, 32), (34, 50), (1, 50), (0, 128), (7, 200)):
        np.testing.assert_array_equal(fl.affine_dx_fast(da[lo:hi], w), results[0][0][lo:hi])


def test_affine_dx_mixed_and_integer_inputs_take_numpys_path_in_the_layers_dtype():
    rng = _rng(8)
    w = rng.standard_normal((70, 40)).astype(np.float32)
    for da in (
        rng.standard_normal((5, 40)),
        rng.integers(-3, 4, (5, 40)),
    ):  # float64 / int64 with float32 w
        dx, sq = fl.affine_dx_fast(da, w, sumsq=True)
        assert dx.dtype == np.float64
        np.testing.assert_array_equal(dx, da @ w.T)
        assert sq == float(np.vdot(w, w))


def test_affine_dx_views_unmodified_and_bad_shapes():
    rng = _rng(7)
    da = rng.standard_normal((40, 20)).astype(np.float32).T  # (20, 40) view
    w = rng.standard_normal((40, 108)).astype(np.float32).T  # (108, 40) view
    copies = [a.copy() for a in (da, w)]
    dx, sq = fl.affine_dx_fast(da, w, sumsq=True)
    _close(dx, da.astype(np.float64) @ w.astype(np.float64).T, np.float32)
    assert sq == pytest.approx(float(np.sum(w.astype(np.float64) ** 2)), rel=1e-6)
    for a, c in zip((da, w), copies):
        np.testing.assert_array_equal(a, c)
    with pytest.raises(
        ValueError,
        match=r"affine_dx: expected da \(N, M\) and w \(D, M\), got da \(20, 40\), w \(108, 39\)",
    ):
        fl.affine_dx_fast(da, w[:, :39])
    with pytest.raises(ValueError, match=r"got da \(800,\)"):
        fl.affine_dx_fast(da.reshape(-1), w)


# --------------------------------------------------------------------------------------------
# affine weight gradient with the L2 term

# (N, D, M): M under / at / over one panel of 4 vectors (32 float32, 16 float64 columns) and
# not a multiple of it, D not a multiple of 3 or of a task's 48 rows, N = 1, the notebook's shape
AFFINE_CASES = [
    (1, 1, 40),
    (3, 5, 32),
    (7, 31, 33),
    (5, 100, 17),
    (4, 49, 16),
    (2, 97, 95),
    (64, 95, 65),
    (9, 144, 500),
    (50, 8192, 500),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("case", AFFINE_CASES, ids=lambda c: "N{}D{}M{}".format(*c))
def test_affine_dw_l2_matches_naive(case, dtype):
    N, D, M = case
    rng = _rng(sum(case))
    x = rng.standard_normal((N, D)).astype(dtype)
    da = rng.standard_normal((N, M)).astype(dtype)
    w = rng.standard_normal((D, M)).astype(dtype)
    dw = fl.affine_dw_l2_fast(x, da, w, 0.3)
    _, ref, _ = L.affine_backward(da, (x, w, np.zeros(M, dtype)))
    ref = ref.astype(np.float64) + 0.3 * w.astype(np.float64)
    assert dw.dtype == dtype and dw.shape == (D, M)
    if dtype == np.float16:
        np.testing.assert_allclose(dw, ref, rtol=5e-3, atol=5e-3 * np.abs(ref).max())
    else:
        _close(dw, ref, dtype, f"{case}")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_affine_dw_l2_rounds_like_numpy_in_its_last_step(dtype):
    """dw = s + round(reg * w): with a single row of x the sum s is one exact product, so
    the kernel's result is NumPy's np.add(x.T @ da, np.multiply(w, reg)) bit for bit."""
    rng = _rng(3)
    x = rng.standard_normal((1, 77)).astype(dtype)
    da = rng.standard_normal((1, 70)).astype(dtype)
    w = (rng.standard_normal((77, 70)) * 10.0 ** rng.integers(-8, 8, (77, 70))).astype(dtype)
    reg = 0.123
    expected = np.add(x.T @ da, np.multiply(w, dtype(reg)))
    np.testing.assert_array_equal(fl.affine_dw_l2_fast(x, da, w, reg), expected)


def test_affine_dw_l2_bit_identical_across_calls_and_threads():
    """The trainer's runs and the Solver's are reproducible only if no result depends on the
    thread count: each dw[i, j] is one k-ordered sum whichever thread computes it."""
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("NUMBA_NUM_THREADS < 2: one thread count only")
    rng = _rng(11)
    x = rng.standard_normal((50, 2 * 4 * 4 * 32 + 7)).astype(np.float32)
    da = rng.standard_normal((50, 133)).astype(np.float32)
    w = rng.standard_normal((x.shape[1], 133)).astype(np.float32)
    threads = numba.get_num_threads()
    results = []
    try:
        for t in sorted({1, numba.config.NUMBA_NUM_THREADS}) * 2:
            numba.set_num_threads(t)
            results.append(fl.affine_dw_l2_fast(x, da, w, 1e-3))
    finally:
        numba.set_num_threads(threads)
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize(
    "D, M", [(7, 40), (50, 64), (97, 95), (10, 17)]
)  # overlapping last panel, none, NumPy's path
@pytest.mark.parametrize("reg", [0.0, 0.3])
def test_affine_dw_l2_scaled_into_out_rounds_each_step_like_numpy(dtype, D, M, reg):
    """dw = [out +] (s + reg * w) * scale with s the kernel's own product (reg 0, scale 1, the
    bits NumPy's steps give from it): written into out, or added to it once even where the last
    column panel overlaps the one before (its columns computed twice) or a block repeats a row."""
    rng = _rng(D + M)
    x = rng.standard_normal((9, D)).astype(dtype)
    da = rng.standard_normal((9, M)).astype(dtype)
    w = rng.standard_normal((D, M)).astype(dtype)
    base = rng.standard_normal((D, M)).astype(dtype)
    s = fl.affine_dw_l2_fast(x, da, w, 0.0)
    g = np.add(s, np.multiply(w, dtype(reg))) if reg else s
    expected = np.multiply(g, dtype(9))
    out = np.full((D, M), np.nan, dtype)
    assert fl.affine_dw_l2_fast(x, da, w, reg, scale=9, out=out) is out
    np.testing.assert_array_equal(out, expected)
    out = base.copy()
    assert fl.affine_dw_l2_fast(x, da, w, reg, scale=9, out=out, add=True) is out
    np.testing.assert_array_equal(out, np.add(base, expected))
    ref = x.astype(np.float64).T @ da.astype(np.float64) + reg * w.astype(np.float64)
    if dtype != np.float16:
        _close(out, base + 9 * ref, dtype)


def test_affine_dw_l2_names_a_bad_out():
    x, da, w = (
        np.ones((2, 10), np.float32),
        np.ones((2, 40), np.float32),
        np.ones((10, 40), np.float32),
    )
    for bad in (
        np.zeros((10, 39), np.float32),
        np.zeros((10, 40), np.float64),
        np.zeros((40, 10), np.float32).T,
    ):
        with pytest.raises(
            ValueError,
            match=r"affine_dw_l2: out must be a writeable C-contiguous float32 array "
            r"of shape \(10, 40\)",
        ):
            fl.affine_dw_l2_fast(x, da, w, 0.0, out=bad)
    with pytest.raises(ValueError, match="add=True needs out"):
        fl.affine_dw_l2_fast(x, da, w, 0.0, add=True)


def test_affine_dw_l2_non_contiguous_inputs_unmodified_and_bad_shapes():
    rng = _rng(5)
    x = (
        rng.standard_normal((6, 4, 3, 9)).astype(np.float32).transpose(0, 3, 2, 1)
    )  # (6, 9, 3, 4) view
    da = rng.standard_normal((40, 6)).astype(np.float32).T  # (6, 40) view
    w = rng.standard_normal((40, 108)).astype(np.float32).T  # (108, 40) view
    copies = [a.copy() for a in (x, da, w)]
    dw = fl.affine_dw_l2_fast(x, da, w, 0.5)
    ref = x.reshape(6, -1).astype(np.float64).T @ da.astype(np.float64) + 0.5 * w.astype(np.float64)
    _close(dw, ref, np.float32)
    for a, c in zip((x, da, w), copies):
        np.testing.assert_array_equal(a, c)
    with pytest.raises(
        ValueError,
        match=r"affine_dw_l2: expected x \(N, ...\) .* got x \(6, 9, 3, 4\), da \(5, 40\)",
    ):
        fl.affine_dw_l2_fast(x, da[:5], w, 0.5)
    with pytest.raises(ValueError, match="w \\(107, 40\\)"):
        fl.affine_dw_l2_fast(x, da, w[:107], 0.5)


# --------------------------------------------------------------------------------------------
# the affine layer of several shards at once (a worker's): one pass over w, each shard's bits


def _random_order(rng, lo, hi):
    """A random binary tree over shards lo..hi-1 (in order), as sum_in_order takes it."""
    if hi - lo == 1:
        return lo
    cut = int(rng.integers(lo + 1, hi))
    return (_random_order(rng, lo, cut), _random_order(rng, cut, hi))


def _sum_by_hand(order, term):
    """The sum ``order`` says, each pair one np.add of the two parts' sums."""
    if isinstance(order, tuple):
        return np.add(_sum_by_hand(order[0], term), _sum_by_hand(order[1], term))
    return term(order)


def _recording(monkeypatch, name):
    """Replace ka.<name> by a wrapper that counts its calls."""
    from pipeline._kernels import affine as ka

    calls, kernel = [], getattr(ka, name)

    def wrapper(*args):
        calls.append(name)
        return kernel(*args)

    monkeypatch.setattr(ka, name, wrapper)
    return calls


AFFINE_SHARD_CASES = [  # (dtype, D, M, shard sizes): overlapping panels, rows of 1, deep trees
    (np.float32, 7, 40, (1, 2)),
    (np.float32, 97, 95, (3, 1, 5, 2)),
    (np.float64, 50, 64, (4, 4, 4, 4, 4)),
    (np.float32, 300, 500, (32, 32, 32, 32)),
    (np.float64, 31, 17, (6, 9, 2)),  # 17 float64 columns: 4 vectors of 32 bytes
    (np.float32, 31, 31, (6, 9, 2)),  # under 4 vectors: NumPy's path, shard by shard
    (np.float32, 40, 64, (5, 20, 16)),  # shard 0 under the dx kernel's 16 rows: shard by shard
    (np.float32, 144, 200, (16, 40, 63, 17, 20, 33)),
]


@pytest.mark.parametrize("case", range(len(AFFINE_SHARD_CASES)))
@pytest.mark.parametrize("reg", [0.0, 0.2])
def test_affine_dw_sum_has_the_bits_of_one_call_per_shard_added_in_order(case, reg, monkeypatch):
    """affine_dw_sum: the shards' scaled dw added along a random tree (and a permuted one),
    each term and sum rounded as affine_dw_l2_fast's, then np.add, give them; with reg 0 and
    the kernel's columns, in one kernel pass (ka.affine_dw_tree)."""
    dtype, D, M, sizes = AFFINE_SHARD_CASES[case]
    rng = _rng(case)
    xs = [rng.standard_normal((n, D)).astype(dtype) for n in sizes]
    das = [rng.standard_normal((n, M)).astype(dtype) for n in sizes]
    w = rng.standard_normal((D, M)).astype(dtype)
    scales = [dtype(n) for n in sizes]
    calls = _recording(monkeypatch, "affine_dw_tree")
    orders = [
        _random_order(rng, 0, len(sizes)),
        (len(sizes) - 1, _random_order(rng, 0, len(sizes) - 1)),
    ]
    for order in orders:
        out = np.full((D, M), np.nan, dtype)
        assert fl.affine_dw_sum(xs, das, w, scales, order, out, reg=reg) is out
        expected = _sum_by_hand(
            order, lambda s: fl.affine_dw_l2_fast(xs[s], das[s], w, reg, scale=scales[s])
        )
        np.testing.assert_array_equal(out, expected, err_msg=str(order))
    fused = reg == 0 and M * np.dtype(dtype).itemsize >= 128
    assert calls == (["affine_dw_tree"] * len(orders) if fused else [])
    ref = sum(n * (x.astype(np.float64).T @ d + reg * w) for n, x, d in zip(sizes, xs, das))
    _close(out, ref, dtype)


@pytest.mark.parametrize("case", range(len(AFFINE_SHARD_CASES)))
def test_affine_forward_and_dx_of_shards_have_each_shards_bits(case, monkeypatch):
    """affine_relu_forward_shards and affine_dx_shards: each shard's out, dx (and sum of
    squares) as alone; one kernel pass where every shard takes the kernel alone."""
    dtype, D, M, sizes = AFFINE_SHARD_CASES[case]
    rng = _rng(100 + case)
    xs = [rng.standard_normal((n, D)).astype(dtype) for n in sizes]
    das = [rng.standard_normal((n, M)).astype(dtype) for n in sizes]
    w, b = rng.standard_normal((D, M)).astype(dtype), rng.standard_normal(M).astype(dtype)
    fwd_calls = _recording(monkeypatch, "affine_relu_rows")
    dx_calls = _recording(monkeypatch, "affine_dx_rows")
    got = fl.affine_relu_forward_shards(xs, w, b)
    dxs, sqs = fl.affine_dx_shards(das, w, sumsq=True)
    fwd_fused, dx_fused = len(fwd_calls) == 1, len(dx_calls) == 1
    for x, da, (out, cache), dx, sq in zip(xs, das, got, dxs, sqs):
        alone, alone_cache = fl.affine_relu_forward_fast(x, w, b)
        np.testing.assert_array_equal(out, alone)
        assert cache[0][0] is x and cache[1] is out
        dx_alone, sq_alone = fl.affine_dx_fast(da, w, sumsq=True)
        np.testing.assert_array_equal(dx, dx_alone)
        assert sq == sq_alone  # the kernel's or np.vdot's, as the shard alone takes
    wide = M * np.dtype(dtype).itemsize >= 128
    assert fwd_fused == (wide and max(sizes) <= 63)
    assert dx_fused == (min(sizes) >= 16)
    assert fl.affine_dx_shards(das, w)[0].shape == das[0].shape[:1] + (D,)


def test_sum_in_order_adds_a_one_term_right_part_into_the_sum_and_a_larger_one_after():
    """sum_in_order's calls: a right part of one term is added into the running sum (a
    worker's shard added to its node), a larger one summed apart, then added."""
    log = []

    def term(s, dst, add):
        log.append((s, add))
        if add:
            dst += s + 1
        else:
            dst[...] = s + 1

    out = fl.sum_in_order(((0, 1), (2, (3, 4))), np.zeros(1), term)
    assert out[0] == 15
    assert log == [(0, False), (1, True), (2, False), (3, False), (4, True)]


@pytest.mark.parametrize(
    "n, order, message",
    [
        (3, (0, 1), r"each of the 3 shards once, got \(0, 1\)"),
        (2, (0, (1, 1)), "each of the 2 shards once"),
        (2, (0, 1, 2), r"a shard index or a pair, got \(0, 1, 2\)"),
        (2, (0, 1.0), "a shard index or a pair, got 1.0"),
    ],
)
def test_affine_dw_sum_names_a_bad_order_count_or_out(n, order, message):
    xs, das = [np.ones((2, 10), np.float32)] * n, [np.ones((2, 40), np.float32)] * n
    w, out = np.ones((10, 40), np.float32), np.zeros((10, 40), np.float32)
    with pytest.raises(ValueError, match=message):
        fl.affine_dw_sum(xs, das, w, [2.0] * n, order, out)
    good = _random_order(_rng(n), 0, n)
    with pytest.raises(ValueError, match="as many da and scales as x"):
        fl.affine_dw_sum(xs, das[:1], w, [2.0] * n, good, out)
    with pytest.raises(ValueError, match="affine_dw_sum: out must be"):
        fl.affine_dw_sum(xs, das, w, [2.0] * n, good, out.T)


# --------------------------------------------------------------------------------------------
# max pooling


def _pool_cases(count, seed):
    rng = _rng(seed)
    cases = []
    for _ in range(count):
        ph, pw, stride = int(rng.integers(1, 4)), int(rng.integers(1, 4)), int(rng.integers(1, 4))
        Ho, Wo = int(rng.integers(1, 6)), int(rng.integers(1, 6))
        H, W = (Ho - 1) * stride + ph, (Wo - 1) * stride + pw
        cases.append((int(rng.choice([1, 2, 4])), int(rng.integers(1, 4)), H, W, ph, pw, stride))
    cases += [
        (2, 3, 8, 8, 2, 2, 2),
        (1, 2, 7, 7, 3, 3, 2),
        (2, 2, 5, 6, 2, 2, 1),
        (3, 2, 5, 9, 2, 3, 3),
        (1, 1, 4, 4, 4, 4, 1),
        (2, 3, 9, 7, 1, 1, 2),
    ]
    return cases


POOL_CASES = _pool_cases(30, 5)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: "N{}C{}H{}W{}p{}x{}s{}".format(*c))
def test_max_pool_matches_naive_exactly(case, dtype):
    N, C, H, W, ph, pw, stride = case
    rng = _rng(hash(case) % 2**32)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    pp = {"pool_height": ph, "pool_width": pw, "stride": stride}
    out, cache = fl.max_pool_forward_fast(x, pp)
    out_n, cache_n = L.max_pool_forward_naive(x, pp)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, out_n)
    dout = rng.standard_normal(out.shape).astype(dtype)
    dx = fl.max_pool_backward_fast(dout, cache)
    assert dx.dtype == dtype
    np.testing.assert_array_equal(dx, L.max_pool_backward_naive(dout, cache_n))


def test_max_pool_notebook_shapes_and_ties():
    rng = _rng(6)
    x = rng.standard_normal((100, 3, 32, 32))
    pp = {"pool_height": 2, "pool_width": 2, "stride": 2}
    out_n, cache_n = L.max_pool_forward_naive(x, pp)
    out_f, cache_f = fl.max_pool_forward_fast(x, pp)
    assert rel_error(out_n, out_f) == 0.0
    dout = rng.standard_normal(out_n.shape)
    assert (
        rel_error(
            L.max_pool_backward_naive(dout, cache_n), fl.max_pool_backward_fast(dout, cache_f)
        )
        == 0.0
    )
    # ties go to the first maximum in row-major order, as in the naive layer
    xt = np.round(rng.standard_normal((2, 2, 6, 6)))
    for pp in (
        {"pool_height": 2, "pool_width": 2, "stride": 2},
        {"pool_height": 3, "pool_width": 2, "stride": 1},
    ):
        out_n, cache_n = L.max_pool_forward_naive(xt, pp)
        out_f, cache_f = fl.max_pool_forward_fast(xt, pp)
        dout = rng.standard_normal(out_n.shape)
        np.testing.assert_array_equal(
            fl.max_pool_backward_fast(dout, cache_f), L.max_pool_backward_naive(dout, cache_n)
        )


def test_max_pool_non_contiguous_and_unmodified():
    rng = _rng(7)
    x = rng.standard_normal((6, 6, 3, 2)).astype(np.float32).transpose(3, 2, 0, 1)
    x_copy = x.copy()
    pp = {"pool_height": 3, "pool_width": 3, "stride": 3}
    out, cache = fl.max_pool_forward_fast(x, pp)
    out_n, cache_n = L.max_pool_forward_naive(x, pp)
    np.testing.assert_array_equal(out, out_n)
    dout = rng.standard_normal(out.shape[::-1]).astype(np.float32).T
    np.testing.assert_array_equal(
        fl.max_pool_backward_fast(dout, cache), L.max_pool_backward_naive(dout, cache_n)
    )
    np.testing.assert_array_equal(x, x_copy)


# --------------------------------------------------------------------------------------------
# convolution then max pooling: dw straight from the pooled gradient (fl.conv_pool_dw_fast)


def _conv_pool_cases(count, seed):
    """Random shapes on the direct kernels (7-wide filters of any height, 3x3 on planes wide
    enough for one image a row or narrow enough for several), pooling windows from 1 x 1 to
    3 x 3 at strides up to one past the window (gaps between windows), 1 to 20 images (more
    than the kernel's 16 chunks; rows of images that do not fill the last one), with and
    without the pool's ReLU."""
    rng = _rng(seed)
    cases = []
    while len(cases) < count:
        HH, WW = (3, 3) if rng.random() < 0.4 else (int(rng.integers(1, 8)), 7)
        pad = int(rng.integers(0, min(HH, WW)))
        ph, pw = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        stride = max(ph, pw) + int(rng.integers(0, 2))
        Hq, Wq = int(rng.integers(1, 7)), int(rng.integers(1, 9))
        H_out, W_out = (Hq - 1) * stride + ph, (Wq - 1) * stride + pw
        H, W = H_out + HH - 1 - 2 * pad, W_out + WW - 1 - 2 * pad
        N, C, F = int(rng.integers(1, 21)), int(rng.integers(1, 5)), int(rng.integers(1, 41))
        if H < 1 or W < 1 or not fl.direct_images_per_row(HH, WW, 1, W, W_out, pad, F):
            continue
        relu = bool(rng.random() < 0.7)
        cases.append((N, C, H, W, F, HH, WW, pad, ph, pw, stride, relu))
    return cases


CONV_POOL_CASES = _conv_pool_cases(24, 11)


def _conv_pool(case, dtype, seed):
    N, C, H, W, F, HH, WW, pad, ph, pw, stride, relu = case
    rng = _rng(seed)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((F, C, HH, WW)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    cp, pp = {"stride": 1, "pad": pad}, {"pool_height": ph, "pool_width": pw, "stride": stride}
    a, conv_cache = fl.conv_forward_fast(x, w, b, cp)
    pool = fl.relu_max_pool_forward_fast if relu else fl.max_pool_forward_fast
    out, pool_cache = pool(a, pp)
    dout = rng.standard_normal(out.shape).astype(dtype)
    dout[rng.random(out.shape) < 0.1] = 0  # some windows pass no gradient
    return (x, w, b, cp, pp), dout, conv_cache, pool_cache


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(
    "case", CONV_POOL_CASES, ids=lambda c: "N{}C{}H{}W{}F{}k{}x{}p{}w{}x{}s{}r{}".format(*c)
)
def test_conv_dw_from_the_pooled_gradient_has_the_bits_of_the_two_backward_passes(case, dtype):
    args, dout, conv_cache, pool_cache = _conv_pool(case, dtype, hash(case) % 2**32)
    dw, db = fl.conv_pool_dw_fast(dout, conv_cache, pool_cache)
    assert dw.dtype == db.dtype == dtype
    da = fl.max_pool_backward_fast(dout, pool_cache)
    _, dw2, db2 = fl.conv_backward_fast(da, conv_cache, compute_dx=False)
    np.testing.assert_array_equal(dw, dw2)
    np.testing.assert_array_equal(db, db2)
    # and the naive layers' gradients
    x, w, b, cp, pp = args
    a, c1 = L.conv_forward_naive(x, w, b, cp)
    relu = case[-1]
    r, c2 = L.relu_forward(a) if relu else (a, None)
    _, c3 = L.max_pool_forward_naive(r, pp)
    dr = L.max_pool_backward_naive(dout, c3)
    _, dw_n, db_n = L.conv_backward_naive(L.relu_backward(dr, c2) if relu else dr, c1)
    _close(dw, dw_n, dtype, "dw")
    _close(db, db_n, dtype, "db")


# windows that overlap (stride 1): pooled in the convolution's pass all the same
ONE_PASS_CASES = CONV_POOL_CASES + [
    (3, 2, 12, 10, 5, 7, 7, 3, 3, 3, 1, True),
    (2, 3, 16, 16, 4, 3, 3, 1, 3, 2, 1, True),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(
    "case", ONE_PASS_CASES, ids=lambda c: "N{}C{}H{}W{}F{}k{}x{}p{}w{}x{}s{}r{}".format(*c)
)
def test_conv_relu_pool_in_one_pass_has_the_bits_and_caches_of_the_two_passes(case, dtype):
    N, C, H, W, F, HH, WW, pad, ph, pw, stride, _ = case
    rng = _rng(hash(case) % 2**32 + 2)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((F, C, HH, WW)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    cp, pp = {"stride": 1, "pad": pad}, {"pool_height": ph, "pool_width": pw, "stride": stride}
    out, (conv_cache, pool_cache) = fl.conv_relu_pool_forward_fast(x, w, b, cp, pp)
    a, conv_cache2 = fl.conv_forward_fast(x, w, b, cp)
    out2, pool_cache2 = fl.relu_max_pool_forward_fast(a, pp)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, out2)
    for i, (got, want) in enumerate(zip(pool_cache, pool_cache2)):  # shape, dtype, idx, out, pp
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=f"cache {i}")
    dout = rng.standard_normal(out.shape).astype(dtype)
    da = fl.max_pool_backward_fast(dout, pool_cache)
    for got, want in zip(
        fl.conv_backward_fast(da, conv_cache), fl.conv_backward_fast(da, conv_cache2)
    ):
        np.testing.assert_array_equal(got, want)


def test_conv_relu_pool_without_dx_takes_the_pooled_kernel_where_it_applies(monkeypatch):
    """The three-layer net's first layer pools in the convolution's pass (kc.direct_forward
    with a pool) and, without dx, runs kc.pooled_dw, not pool_backward and direct_dw;
    overlapping windows, a ReLU inside the convolution, im2col and Winograd shapes
    get None from conv_pool_dw_fast (their layers then take the two backward passes)."""
    from pipeline import layer_utils as lu

    ran = []
    for name in ("direct_forward", "pooled_dw", "direct_dw"):
        kernel = getattr(fl.kc, name)

        def run(*args, _k=kernel, _n=name):
            pooled = _n == "direct_forward" and len(args) == 9  # with its pool argument
            ran.append(_n + " pooled" * pooled)
            return _k(*args)

        monkeypatch.setattr(fl.kc, name, run)
    rng = _rng(3)
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    w = rng.standard_normal((32, 3, 7, 7)).astype(np.float32)
    b = np.zeros(32, np.float32)
    cp, pp = {"stride": 1, "pad": 3}, {"pool_height": 2, "pool_width": 2, "stride": 2}
    out, cache = lu.conv_relu_pool_forward(x, w, b, cp, pp)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    _, dw, db = lu.conv_relu_pool_backward(dout, cache, compute_dx=False)
    assert ran == ["direct_forward pooled", "pooled_dw"]
    _, dw2, db2 = lu.conv_relu_pool_backward(dout, cache)  # dx wanted: the two passes
    assert ran[2:] == ["direct_dw", "direct_forward"]  # dx: the flipped filters' convolution
    np.testing.assert_array_equal(dw, dw2)
    np.testing.assert_array_equal(db, db2)

    def pooled(x, w, pad, pp, conv=fl.conv_forward_fast):
        a, conv_cache = conv(x, w, np.zeros(len(w), x.dtype), {"stride": 1, "pad": pad})
        p, pool_cache = fl.relu_max_pool_forward_fast(a, pp)
        return fl.conv_pool_dw_fast(np.ones_like(p), conv_cache, pool_cache)

    x8 = rng.standard_normal((2, 3, 8, 8))
    assert pooled(x8, rng.standard_normal((4, 3, 7, 7)), 3, pp) is not None
    overlapping = {"pool_height": 2, "pool_width": 2, "stride": 1}
    assert pooled(x8, rng.standard_normal((4, 3, 7, 7)), 3, overlapping) is None
    assert pooled(x8, rng.standard_normal((4, 3, 7, 7)), 3, pp, fl.conv_relu_forward_fast) is None
    assert pooled(x8, rng.standard_normal((4, 3, 5, 5)), 2, pp) is None  # im2col
    x64 = rng.standard_normal((2, 64, 8, 8))
    assert pooled(x64, rng.standard_normal((4, 64, 3, 3)), 1, pp) is None  # Winograd
    x16, w16 = x8.astype(np.float16), rng.standard_normal((4, 3, 7, 7)).astype(np.float16)
    assert pooled(x16, w16, 3, pp) is None  # float16: the conv's gradient rounded to it between


def test_float16_conv_relu_pool_takes_the_two_passes():
    """float16 layers compute in float32 but round the conv's output to float16 before pooling:
    values 1 + k * 2**-12 differ in float32 and tie in float16 (its spacing at 1 is 2**-10), so
    the window's first maximum moves. float16 keeps the two passes' results."""
    rng = _rng(5)
    x = np.ones((2, 2, 8, 8), np.float16)
    x[:, 1] = rng.integers(0, 4, (2, 8, 8))
    w = np.zeros((1, 2, 7, 7), np.float16)
    w[0, 0, 3, 3], w[0, 1, 3, 3] = 1, 2.0**-12  # conv = x0 + x1 * 2**-12 = 1 + k * 2**-12
    b = np.zeros(1, np.float16)
    cp, pp = {"stride": 1, "pad": 3}, {"pool_height": 2, "pool_width": 2, "stride": 2}
    out, (_, pool_cache) = fl.conv_relu_pool_forward_fast(x, w, b, cp, pp)
    a, _ = fl.conv_forward_fast(x, w, b, cp)
    out2, pool_cache2 = fl.relu_max_pool_forward_fast(a, pp)
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, out2)
    np.testing.assert_array_equal(pool_cache[2], pool_cache2[2])
    np.testing.assert_array_equal(pool_cache[3], pool_cache2[3])
    # in float32 (one pass) the maxima are elsewhere: the case this test is about happens
    _, (_, pool_cache32) = fl.conv_relu_pool_forward_fast(
        x.astype(np.float32), w.astype(np.float32), b.astype(np.float32), cp, pp
    )
    assert not np.array_equal(pool_cache32[2], pool_cache[2])


def test_conv_pool_dw_names_a_dout_of_the_wrong_shape():
    rng = _rng(6)
    x = rng.standard_normal((2, 3, 8, 8))
    pp = {"pool_height": 2, "pool_width": 2, "stride": 2}
    out, (conv_cache, pool_cache) = fl.conv_relu_pool_forward_fast(
        x, rng.standard_normal((4, 3, 7, 7)), np.zeros(4), {"stride": 1, "pad": 3}, pp
    )
    with pytest.raises(ValueError, match=r"conv_pool_dw_fast must have .*\(2, 4, 4, 4\), got"):
        fl.conv_pool_dw_fast(np.ones((2, 4, 8, 8)), conv_cache, pool_cache)


# --------------------------------------------------------------------------------------------
# spatial batch norm, group norm


NORM_SHAPES = [(2, 3, 4, 5), (1, 4, 3, 3), (5, 6, 2, 7), (3, 8, 1, 1), (4, 2, 6, 4)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_spatial_batchnorm_matches_naive(shape, dtype):
    N, C, H, W = shape
    rng = _rng(sum(shape))
    x = (rng.standard_normal(shape) * 3 + 1.5).astype(dtype)
    gamma = rng.standard_normal(C).astype(dtype)
    beta = rng.standard_normal(C).astype(dtype)
    rm, rv = rng.standard_normal(C).astype(dtype), rng.random(C).astype(dtype)
    p_f = {"mode": "train", "momentum": 0.8, "running_mean": rm.copy(), "running_var": rv.copy()}
    p_n = {"mode": "train", "momentum": 0.8, "running_mean": rm.copy(), "running_var": rv.copy()}
    out, cache = fl.spatial_batchnorm_forward_fast(x, gamma, beta, p_f)
    out_n, cache_n = L.spatial_batchnorm_forward(x, gamma, beta, p_n)
    assert out.dtype == dtype
    _close(out, out_n, dtype, "out")
    for k in ("running_mean", "running_var"):
        assert p_f[k].dtype == dtype
        _close(p_f[k], p_n[k], dtype, k)
    dout = rng.standard_normal(shape).astype(dtype)
    for name, g, gn in zip(
        ("dx", "dgamma", "dbeta"),
        fl.spatial_batchnorm_backward_fast(dout, cache),
        L.spatial_batchnorm_backward(dout, cache_n),
    ):
        assert g.dtype == dtype and g.shape == gn.shape, name
        _close(g, gn, dtype, name)
    # test mode uses the running averages
    p_f["mode"] = p_n["mode"] = "test"
    out, cache = fl.spatial_batchnorm_forward_fast(x, gamma, beta, p_f)
    out_n, _ = L.spatial_batchnorm_forward(x, gamma, beta, p_n)
    assert cache is None
    _close(out, out_n, dtype, "test-mode out")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(
    "shape,G",
    [((2, 6, 4, 5), 3), ((1, 4, 3, 3), 1), ((3, 8, 2, 2), 8), ((2, 6, 5, 1), 2), ((4, 4, 3, 2), 4)],
)
def test_spatial_groupnorm_matches_naive(shape, G, dtype):
    N, C, H, W = shape
    rng = _rng(sum(shape) + G)
    x = (rng.standard_normal(shape) * 2 - 1).astype(dtype)
    gamma = rng.standard_normal((1, C, 1, 1)).astype(dtype)
    beta = rng.standard_normal((1, C, 1, 1)).astype(dtype)
    out, cache = fl.spatial_groupnorm_forward_fast(x, gamma, beta, G, {"eps": 1e-5})
    out_n, cache_n = L.spatial_groupnorm_forward(x, gamma, beta, G, {"eps": 1e-5})
    assert out.dtype == dtype
    _close(out, out_n, dtype, "out")
    dout = rng.standard_normal(shape).astype(dtype)
    for name, g, gn in zip(
        ("dx", "dgamma", "dbeta"),
        fl.spatial_groupnorm_backward_fast(dout, cache),
        L.spatial_groupnorm_backward(dout, cache_n),
    ):
        assert g.dtype == dtype and g.shape == gn.shape, name
        _close(g, gn, dtype, name)


def test_norms_non_contiguous_and_unmodified():
    rng = _rng(8)
    x = rng.standard_normal((5, 4, 3, 2)).transpose(3, 2, 1, 0)  # (2, 3, 4, 5)
    g, bt = rng.standard_normal(6)[::2], rng.standard_normal(3)
    x_copy, g_copy = x.copy(), g.copy()
    out, cache = fl.spatial_batchnorm_forward_fast(x, g, bt, {"mode": "train"})
    out_n, cache_n = L.spatial_batchnorm_forward(x, g, bt, {"mode": "train"})
    _close(out, out_n, np.float64)
    dout = rng.standard_normal((5, 4, 3, 2)).transpose(3, 2, 1, 0)
    for a, b_ in zip(
        fl.spatial_batchnorm_backward_fast(dout, cache), L.spatial_batchnorm_backward(dout, cache_n)
    ):
        _close(a, b_, np.float64)
    out, cache = fl.spatial_groupnorm_forward_fast(x, g, bt, 3, {})
    out_n, cache_n = L.spatial_groupnorm_forward(x, g, bt, 3, {})
    _close(out, out_n, np.float64)
    for a, b_ in zip(
        fl.spatial_groupnorm_backward_fast(dout, cache), L.spatial_groupnorm_backward(dout, cache_n)
    ):
        _close(a, b_, np.float64)
    np.testing.assert_array_equal(x, x_copy)
    np.testing.assert_array_equal(g, g_copy)


# --------------------------------------------------------------------------------------------
# bad parameters


def _conv_args(**kw):
    a = {
        "x": np.zeros((2, 3, 8, 8)),
        "w": np.zeros((4, 3, 3, 3)),
        "b": np.zeros(4),
        "conv_param": {"stride": 1, "pad": 1},
    }
    a.update(kw)
    return a


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"conv_param": {"stride": 2, "pad": 0}}, r"conv output height is not an integer"),
        ({"conv_param": {"stride": 0, "pad": 1}}, r"conv_param\['stride'\]"),
        ({"conv_param": {"stride": 1, "pad": -1}}, r"conv_param\['pad'\]"),
        ({"w": np.zeros((4, 2, 3, 3))}, r"channel mismatch.*C=3.*C=2"),
        ({"x": np.zeros((3, 8, 8))}, r"x must be a 4-D array"),
        ({"w": np.zeros((4, 3, 3))}, r"w must be a 4-D array"),
        ({"b": np.zeros(5)}, r"b must have shape \(4,\)"),
        ({"w": np.zeros((4, 3, 11, 3))}, r"window 11 is larger than the input 10"),
    ],
)
def test_conv_bad_parameters_raise_value_error(kw, match):
    with pytest.raises(ValueError, match=match):
        fl.conv_forward_fast(**_conv_args(**kw))


def test_backward_bad_dout_shape():
    out, cache = fl.conv_forward_fast(**_conv_args())
    with pytest.raises(ValueError, match=r"dout for conv must have the forward output's shape"):
        fl.conv_backward_fast(np.zeros((2, 4, 8, 7)), cache)
    out, cache = fl.max_pool_forward_fast(
        np.zeros((2, 3, 8, 8)), {"pool_height": 2, "pool_width": 2, "stride": 2}
    )
    with pytest.raises(ValueError, match=r"dout for max pool"):
        fl.max_pool_backward_fast(np.zeros((2, 3, 4, 5)), cache)


@pytest.mark.parametrize(
    "x_shape,pp,match",
    [
        (
            (2, 3, 7, 8),
            {"pool_height": 2, "pool_width": 2, "stride": 2},
            r"pool output height is not an integer",
        ),
        ((2, 3, 8, 8), {"pool_height": 2, "pool_width": 2, "stride": 0}, r"pool_param\['stride'\]"),
        (
            (2, 3, 8, 8),
            {"pool_height": 0, "pool_width": 2, "stride": 2},
            r"pool_param\['pool_height'\]",
        ),
        (
            (2, 3, 8, 8),
            {"pool_height": 2, "pool_width": 9, "stride": 1},
            r"window 9 is larger than the input 8",
        ),
        ((3, 8, 8), {"pool_height": 2, "pool_width": 2, "stride": 2}, r"x must be a 4-D array"),
    ],
)
def test_pool_bad_parameters_raise_value_error(x_shape, pp, match):
    with pytest.raises(ValueError, match=match):
        fl.max_pool_forward_fast(np.zeros(x_shape), pp)


def test_norm_bad_parameters_raise_value_error():
    x = np.zeros((2, 6, 3, 3))
    g, b = np.ones(6), np.zeros(6)
    with pytest.raises(
        ValueError, match=r"bn_param\['mode'\] must be 'train' or 'test', got 'eval'"
    ):
        fl.spatial_batchnorm_forward_fast(x, g, b, {"mode": "eval"})
    with pytest.raises(ValueError, match=r"gamma must have shape \(6,\)"):
        fl.spatial_batchnorm_forward_fast(x, np.ones(5), b, {"mode": "train"})
    with pytest.raises(ValueError, match=r"x must be a 4-D array"):
        fl.spatial_batchnorm_forward_fast(np.zeros((2, 6)), g, b, {"mode": "train"})
    with pytest.raises(
        ValueError, match=r"spatial_batchnorm_backward_fast needs the cache of a forward pass"
    ):
        fl.spatial_batchnorm_backward_fast(x, None)
    with pytest.raises(ValueError, match=r"G=4 must divide the channel count C=6"):
        fl.spatial_groupnorm_forward_fast(x, g, b, 4, {})
    with pytest.raises(ValueError, match=r"gn_param\['eps'\]"):
        fl.spatial_groupnorm_forward_fast(x, g, b, 3, {"eps": -1.0})
