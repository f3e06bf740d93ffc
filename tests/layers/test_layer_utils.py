"""Sandwich layers: against the composition of the naive layers and against numeric gradients."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from pipeline import layer_utils as lu
from pipeline import layers as L
from pipeline.gradient_check import eval_numerical_gradient_array, rel_error

POOL = {"pool_height": 2, "pool_width": 2, "stride": 2}
CONV = {"stride": 1, "pad": 1}


def _close(fast, ref, dtype, what=""):
    fast, ref = np.asarray(fast), np.asarray(ref)
    assert fast.shape == ref.shape, what
    tol = 1e-9 if dtype == np.float64 else 1e-4
    scale = max(float(np.max(np.abs(ref))), 1e-30)
    np.testing.assert_allclose(fast, ref, rtol=tol, atol=tol * scale, err_msg=what)


def _numeric_ok(num, ana, what=""):
    """Numeric vs analytic gradient: max error ~1e-8 of the gradient's scale.

    cs231n's rel_error divides elementwise, so an element near zero shows the centered
    difference's own noise (~1e-10 absolute); it is checked loosely, the scaled error tightly.
    """
    assert num.shape == ana.shape, what
    scale = max(float(np.max(np.abs(num))), 1e-12)
    assert np.max(np.abs(num - ana)) / scale < 1e-8, what
    assert rel_error(num, ana) < 1e-5, what


# --------------------------------------------------------------------------------------------
# naive compositions


def naive_conv_relu_pool(x, w, b, conv_param, pool_param, dout):
    a, c1 = L.conv_forward_naive(x, w, b, conv_param)
    r, c2 = L.relu_forward(a)
    out, c3 = L.max_pool_forward_naive(r, pool_param)
    if dout is None:
        return out
    dx, dw, db = L.conv_backward_naive(L.relu_backward(L.max_pool_backward_naive(dout, c3), c2), c1)
    return out, (dx, dw, db)


def naive_conv_norm_relu_pool(norm, x, w, b, gamma, beta, conv_param, norm_args, pool_param, dout):
    a, c1 = L.conv_forward_naive(x, w, b, conv_param)
    if norm == "bn":
        an, c2 = L.spatial_batchnorm_forward(a, gamma, beta, *norm_args)
    else:
        an, c2 = L.spatial_groupnorm_forward(a, gamma, beta, *norm_args)
    r, c3 = L.relu_forward(an)
    out, c4 = L.max_pool_forward_naive(r, pool_param)
    if dout is None:
        return out
    dr = L.relu_backward(L.max_pool_backward_naive(dout, c4), c3)
    back = L.spatial_batchnorm_backward if norm == "bn" else L.spatial_groupnorm_backward
    da, dgamma, dbeta = back(dr, c2)
    dx, dw, db = L.conv_backward_naive(da, c1)
    return out, (dx, dw, db, dgamma, dbeta)


# --------------------------------------------------------------------------------------------
# the notebook's numeric gradient checks (float64)


@pytest.fixture
def one_thread():
    """Thousands of tiny forward passes: one Numba thread avoids waking the pool for each."""
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(before)


def _conv_setup(seed=231, shape=(2, 3, 16, 16)):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    w = rng.standard_normal((3, shape[1], 3, 3))
    b = rng.standard_normal(3)
    return rng, x, w, b


def test_conv_relu_numeric_gradients(one_thread):
    rng, x, w, b = _conv_setup()
    out, cache = lu.conv_relu_forward(x, w, b, CONV)
    dout = rng.standard_normal(out.shape)
    dx, dw, db = lu.conv_relu_backward(dout, cache)
    dx_num = eval_numerical_gradient_array(
        lambda x: lu.conv_relu_forward(x, w, b, CONV)[0], x, dout
    )
    dw_num = eval_numerical_gradient_array(
        lambda w: lu.conv_relu_forward(x, w, b, CONV)[0], w, dout
    )
    db_num = eval_numerical_gradient_array(
        lambda b: lu.conv_relu_forward(x, w, b, CONV)[0], b, dout
    )
    _numeric_ok(dx_num, dx)
    _numeric_ok(dw_num, dw)
    _numeric_ok(db_num, db)


def test_conv_relu_pool_numeric_gradients(one_thread):
    rng, x, w, b = _conv_setup()
    out, cache = lu.conv_relu_pool_forward(x, w, b, CONV, POOL)
    assert out.shape == (2, 3, 8, 8)
    dout = rng.standard_normal(out.shape)
    dx, dw, db = lu.conv_relu_pool_backward(dout, cache)

    def f(x, w, b):
        return lu.conv_relu_pool_forward(x, w, b, CONV, POOL)[0]

    dx_num = eval_numerical_gradient_array(lambda x_: f(x_, w, b), x, dout)
    dw_num = eval_numerical_gradient_array(lambda w_: f(x, w_, b), w, dout)
    db_num = eval_numerical_gradient_array(lambda b_: f(x, w, b_), b, dout)
    _numeric_ok(dx_num, dx)
    _numeric_ok(dw_num, dw)
    _numeric_ok(db_num, db)


def test_conv_bn_relu_pool_numeric_gradients(one_thread):
    rng, x, w, b = _conv_setup(7, (4, 3, 8, 8))
    gamma, beta = rng.standard_normal(3), rng.standard_normal(3)

    def f(x_=x, w_=w, b_=b, g_=gamma, bt_=beta):
        return lu.conv_bn_relu_pool_forward(x_, w_, b_, g_, bt_, CONV, {"mode": "train"}, POOL)[0]

    out, cache = lu.conv_bn_relu_pool_forward(x, w, b, gamma, beta, CONV, {"mode": "train"}, POOL)
    dout = rng.standard_normal(out.shape)
    grads = lu.conv_bn_relu_pool_backward(dout, cache)
    nums = [
        eval_numerical_gradient_array(lambda v: f(x_=v), x, dout),
        eval_numerical_gradient_array(lambda v: f(w_=v), w, dout),
        eval_numerical_gradient_array(lambda v: f(b_=v), b, dout),
        eval_numerical_gradient_array(lambda v: f(g_=v), gamma, dout),
        eval_numerical_gradient_array(lambda v: f(bt_=v), beta, dout),
    ]
    for name, g, n in zip(("dx", "dw", "db", "dgamma", "dbeta"), grads, nums):
        # db is ~0 analytically (batch norm removes the bias): compare absolutely
        if name == "db":
            assert np.max(np.abs(g - n)) < 1e-8, name
        else:
            _numeric_ok(n, g, name)


def test_conv_gn_relu_pool_numeric_gradients(one_thread):
    rng, x, w, b = _conv_setup(11, (2, 3, 8, 8))
    w = rng.standard_normal((4, 3, 3, 3))
    b = rng.standard_normal(4)
    gamma, beta = rng.standard_normal((1, 4, 1, 1)), rng.standard_normal((1, 4, 1, 1))

    def f(x_=x, w_=w, b_=b, g_=gamma, bt_=beta):
        return lu.conv_gn_relu_pool_forward(x_, w_, b_, g_, bt_, CONV, 2, {}, POOL)[0]

    out, cache = lu.conv_gn_relu_pool_forward(x, w, b, gamma, beta, CONV, 2, {}, POOL)
    dout = rng.standard_normal(out.shape)
    grads = lu.conv_gn_relu_pool_backward(dout, cache)
    nums = [
        eval_numerical_gradient_array(lambda v: f(x_=v), x, dout),
        eval_numerical_gradient_array(lambda v: f(w_=v), w, dout),
        eval_numerical_gradient_array(lambda v: f(b_=v), b, dout),
        eval_numerical_gradient_array(lambda v: f(g_=v), gamma, dout),
        eval_numerical_gradient_array(lambda v: f(bt_=v), beta, dout),
    ]
    for name, g, n in zip(("dx", "dw", "db", "dgamma", "dbeta"), grads, nums):
        assert g.shape == n.shape, name
        if name == "db":
            assert np.max(np.abs(g - n)) < 1e-8, name
        else:
            _numeric_ok(n, g, name)


def test_affine_relu_numeric_gradients():
    rng = np.random.default_rng(3)
    x, w, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((12, 10)), rng.standard_normal(10)
    out, cache = lu.affine_relu_forward(x, w, b)
    dout = rng.standard_normal(out.shape)
    dx, dw, db = lu.affine_relu_backward(dout, cache)

    def f(x, w, b):
        return lu.affine_relu_forward(x, w, b)[0]

    _numeric_ok(eval_numerical_gradient_array(lambda v: f(v, w, b), x, dout), dx)
    _numeric_ok(eval_numerical_gradient_array(lambda v: f(x, v, b), w, dout), dw)
    _numeric_ok(eval_numerical_gradient_array(lambda v: f(x, w, v), b, dout), db)


def test_affine_relu_backward_with_reg_numeric_gradient():
    """dw with reg is the gradient of sum(out * dout) + 0.5 * reg * sum(w**2); 40 columns: the
    fused kernel's path (fast_layers.affine_dw_l2_fast), not NumPy's."""
    rng = np.random.default_rng(4)
    x, w, b = rng.standard_normal((3, 2, 7)), rng.standard_normal((14, 40)), rng.standard_normal(40)
    out, cache = lu.affine_relu_forward(x, w, b)
    dout = rng.standard_normal(out.shape)
    reg = 0.7
    _, dw, _ = lu.affine_relu_backward(dout, cache, reg=reg)

    def f(v):
        return np.sum(lu.affine_relu_forward(x, v, b)[0] * dout) + 0.5 * reg * np.sum(v * v)

    _numeric_ok(eval_numerical_gradient_array(f, w, np.ones(())), dw)


# --------------------------------------------------------------------------------------------
# fused == composition of the naive layers, many shapes, both dtypes

CRP_CASES = [
    # x shape, w shape, conv_param, pool_param
    ((2, 3, 16, 16), (3, 3, 3, 3), CONV, POOL),
    (
        (1, 3, 9, 11),
        (4, 3, 3, 3),
        {"stride": 1, "pad": 1},
        {"pool_height": 3, "pool_width": 3, "stride": 2},
    ),
    (
        (3, 2, 9, 7),
        (5, 2, 2, 4),
        {"stride": 1, "pad": 2},
        {"pool_height": 2, "pool_width": 2, "stride": 1},
    ),
    (
        (2, 1, 11, 11),
        (2, 1, 5, 5),
        {"stride": 2, "pad": 3},
        {"pool_height": 3, "pool_width": 1, "stride": 2},
    ),
    (
        (2, 4, 5, 6),
        (3, 4, 1, 1),
        {"stride": 1, "pad": 0},
        {"pool_height": 2, "pool_width": 3, "stride": 3},
    ),
    ((4, 3, 12, 12), (8, 3, 7, 7), {"stride": 1, "pad": 3}, POOL),
    ((1, 2, 10, 12), (5, 2, 3, 7), {"stride": 1, "pad": 2}, POOL),  # direct kernels: odd F, N=1
    (
        (2, 2, 9, 10),
        (3, 2, 2, 7),
        {"stride": 1, "pad": 3},
        POOL,
    ),  # direct, but dx by GEMM (pad > HH-1)
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", range(len(CRP_CASES)))
def test_conv_relu_pool_equals_naive_composition(case, dtype):
    xs, ws, cp, pp = CRP_CASES[case]
    rng = np.random.default_rng(case)
    x, w, b = (rng.standard_normal(s).astype(dtype) for s in (xs, ws, ws[:1]))
    out, cache = lu.conv_relu_pool_forward(x, w, b, cp, pp)
    assert out.dtype == dtype
    dout = rng.standard_normal(out.shape).astype(dtype)
    out_n, grads_n = naive_conv_relu_pool(x, w, b, cp, pp, dout)
    _close(out, out_n, dtype, "out")
    grads = lu.conv_relu_pool_backward(dout, cache)
    for name, g, gn in zip(("dx", "dw", "db"), grads, grads_n):
        assert g.dtype == dtype, name
        _close(g, gn, dtype, name)
    dx0, dw0, db0 = lu.conv_relu_pool_backward(dout, cache, compute_dx=False)
    assert dx0 is None
    np.testing.assert_array_equal(dw0, grads[1])
    np.testing.assert_array_equal(db0, grads[2])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", [0, 1, 2, 5, 6, 7])
def test_conv_relu_equals_naive_composition(case, dtype):
    xs, ws, cp, _ = CRP_CASES[case]
    rng = np.random.default_rng(100 + case)
    x, w, b = (rng.standard_normal(s).astype(dtype) for s in (xs, ws, ws[:1]))
    out, cache = lu.conv_relu_forward(x, w, b, cp)
    a, c1 = L.conv_forward_naive(x, w, b, cp)
    r, c2 = L.relu_forward(a)
    assert out.dtype == dtype
    _close(out, r, dtype, "out")
    dout = rng.standard_normal(out.shape).astype(dtype)
    grads_n = L.conv_backward_naive(L.relu_backward(dout, c2), c1)
    grads = lu.conv_relu_backward(dout, cache)
    for name, g, gn in zip(("dx", "dw", "db"), grads, grads_n):
        assert g.dtype == dtype, name
        _close(g, gn, dtype, name)
    dx0, dw0, db0 = lu.conv_relu_backward(dout, cache, compute_dx=False)
    assert dx0 is None
    np.testing.assert_array_equal(dw0, grads[1])
    np.testing.assert_array_equal(db0, grads[2])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", [0, 1, 3, 5])
def test_conv_bn_relu_pool_equals_naive_composition(case, dtype):
    xs, ws, cp, pp = CRP_CASES[case]
    rng = np.random.default_rng(200 + case)
    x, w, b = (rng.standard_normal(s).astype(dtype) for s in (xs, ws, ws[:1]))
    F = ws[0]
    gamma, beta = rng.standard_normal(F).astype(dtype), rng.standard_normal(F).astype(dtype)
    p_f, p_n = {"mode": "train", "momentum": 0.7}, {"mode": "train", "momentum": 0.7}
    out, cache = lu.conv_bn_relu_pool_forward(x, w, b, gamma, beta, cp, p_f, pp)
    dout = rng.standard_normal(out.shape).astype(dtype)
    out_n, grads_n = naive_conv_norm_relu_pool("bn", x, w, b, gamma, beta, cp, (p_n,), pp, dout)
    assert out.dtype == dtype
    _close(out, out_n, dtype, "out")
    for k in ("running_mean", "running_var"):
        _close(p_f[k], p_n[k], dtype, k)
    grads = lu.conv_bn_relu_pool_backward(dout, cache)
    for name, g, gn in zip(("dx", "dw", "db", "dgamma", "dbeta"), grads, grads_n):
        assert g.dtype == dtype, name
        if name == "db":  # ~0 analytically: absolute comparison at the scale of dw
            assert np.max(np.abs(g - gn)) < (1e-9 if dtype == np.float64 else 1e-4) * np.max(
                np.abs(grads_n[1])
            )
        else:
            _close(g, gn, dtype, name)
    g0 = lu.conv_bn_relu_pool_backward(dout, cache, compute_dx=False)
    assert g0[0] is None
    for a, c in zip(g0[1:], grads[1:]):
        np.testing.assert_array_equal(a, c)
    # test mode: running averages, no cache for a backward pass
    p_f["mode"] = p_n["mode"] = "test"
    out_t, _ = lu.conv_bn_relu_pool_forward(x, w, b, gamma, beta, cp, p_f, pp)
    _close(
        out_t, naive_conv_norm_relu_pool("bn", x, w, b, gamma, beta, cp, (p_n,), pp, None), dtype
    )


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case,G", [(0, 3), (1, 2), (3, 1), (5, 4)])
def test_conv_gn_relu_pool_equals_naive_composition(case, G, dtype):
    xs, ws, cp, pp = CRP_CASES[case]
    rng = np.random.default_rng(300 + case)
    x, w, b = (rng.standard_normal(s).astype(dtype) for s in (xs, ws, ws[:1]))
    F = ws[0]
    gamma = rng.standard_normal((1, F, 1, 1)).astype(dtype)
    beta = rng.standard_normal((1, F, 1, 1)).astype(dtype)
    out, cache = lu.conv_gn_relu_pool_forward(x, w, b, gamma, beta, cp, G, {"eps": 1e-5}, pp)
    dout = rng.standard_normal(out.shape).astype(dtype)
    out_n, grads_n = naive_conv_norm_relu_pool(
        "gn", x, w, b, gamma, beta, cp, (G, {"eps": 1e-5}), pp, dout
    )
    assert out.dtype == dtype
    _close(out, out_n, dtype, "out")
    grads = lu.conv_gn_relu_pool_backward(dout, cache)
    for name, g, gn in zip(("dx", "dw", "db", "dgamma", "dbeta"), grads, grads_n):
        assert g.dtype == dtype and g.shape == gn.shape, name
        if name == "db":
            assert np.max(np.abs(g - gn)) < (1e-9 if dtype == np.float64 else 1e-4) * np.max(
                np.abs(grads_n[1])
            )
        else:
            _close(g, gn, dtype, name)
    assert lu.conv_gn_relu_pool_backward(dout, cache, compute_dx=False)[0] is None


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("x_shape,M", [((5, 2, 3, 2), 7), ((50, 4, 4, 3), 70), ((64, 4, 4, 3), 70)])
def test_affine_relu_equals_naive_composition(dtype, x_shape, M):
    # NumPy's path (M 7), the kernels' (50 rows, M 70: the forward kernel and reg's dw kernel),
    # 64 rows: NumPy's forward product again
    rng = np.random.default_rng(9)
    x = rng.standard_normal(x_shape).astype(dtype)
    D = int(np.prod(x_shape[1:]))
    w, b = rng.standard_normal((D, M)).astype(dtype), rng.standard_normal(M).astype(dtype)
    out, cache = lu.affine_relu_forward(x, w, b)
    a, c1 = L.affine_forward(x, w, b)
    r, c2 = L.relu_forward(a)
    if x_shape[0] < 64 and M >= 32:
        _close(out, r, dtype, "out")
    else:
        np.testing.assert_array_equal(out, r)
    dout = rng.standard_normal(out.shape).astype(dtype)
    grads = lu.affine_relu_backward(dout, cache)
    for g, gn in zip(grads, L.affine_backward(L.relu_backward(dout, c2), c1)):
        assert g.dtype == dtype
        _close(g, gn, dtype)
    dx0, dw0, db0 = lu.affine_relu_backward(dout, cache, compute_dx=False)
    assert dx0 is None
    np.testing.assert_array_equal(dw0, grads[1])
    # reg changes dw only: + reg * w
    dx2, dw2, db2 = lu.affine_relu_backward(dout, cache, reg=1e-2)
    np.testing.assert_array_equal(dx2, grads[0])
    np.testing.assert_array_equal(db2, grads[2])
    assert dw2.dtype == dtype
    _close(dw2, grads[1].astype(np.float64) + 1e-2 * w.astype(np.float64), dtype)
    # sumsq: the same three, and sum(w**2) for the L2 term's value from the dx pass
    *same, sq = lu.affine_relu_backward(dout, cache, reg=1e-2, sumsq=True)
    for g, g2 in zip(same, (dx2, dw2, db2)):
        np.testing.assert_array_equal(g, g2)
    assert sq == pytest.approx(
        float(np.sum(w.astype(np.float64) ** 2)), rel=1e-12 if dtype == np.float64 else 1e-6
    )
    # compute_dw=False: dx, db and sum(w**2) as above, no dw (a model computes it later)
    dx3, dw3, db3, sq3 = lu.affine_relu_backward(dout, cache, sumsq=True, compute_dw=False)
    assert dw3 is None
    for g, g2 in ((dx3, dx2), (db3, db2)):
        np.testing.assert_array_equal(g, g2)
    assert sq3 == sq
    with pytest.raises(
        ValueError, match="sumsq=True comes from the dx pass; it needs compute_dx=True"
    ):
        lu.affine_relu_backward(dout, cache, compute_dx=False, sumsq=True)


def test_sandwiches_do_not_modify_inputs_and_accept_views():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((8, 8, 3, 2)).astype(np.float32).transpose(3, 2, 0, 1)  # (2, 3, 8, 8)
    w = rng.standard_normal((3, 3, 3, 4)).astype(np.float32).transpose(3, 2, 1, 0)  # (4, 3, 3, 3)
    b = rng.standard_normal(4).astype(np.float32)
    gamma, beta = np.ones(4, np.float32), np.zeros(4, np.float32)
    copies = [a.copy() for a in (x, w, b, gamma, beta)]
    out, cache = lu.conv_relu_pool_forward(x, w, b, CONV, POOL)
    out_c, _ = lu.conv_relu_pool_forward(
        np.ascontiguousarray(x), np.ascontiguousarray(w), b, CONV, POOL
    )
    np.testing.assert_array_equal(out, out_c)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    dout_copy = dout.copy()
    lu.conv_relu_pool_backward(dout, cache)
    out, cache = lu.conv_bn_relu_pool_forward(x, w, b, gamma, beta, CONV, {"mode": "train"}, POOL)
    lu.conv_bn_relu_pool_backward(dout, cache)
    out, cache = lu.conv_gn_relu_pool_forward(x, w, b, gamma, beta, CONV, 2, {}, POOL)
    lu.conv_gn_relu_pool_backward(dout, cache)
    for a, c in zip((x, w, b, gamma, beta, dout), copies + [dout_copy]):
        np.testing.assert_array_equal(a, c)


def test_sandwich_bad_parameters_raise_value_error():
    x, w, b = np.zeros((2, 3, 8, 8)), np.zeros((4, 3, 3, 3)), np.zeros(4)
    with pytest.raises(ValueError, match=r"pool output height is not an integer"):
        lu.conv_relu_pool_forward(x, w, b, CONV, {"pool_height": 3, "pool_width": 3, "stride": 2})
    with pytest.raises(ValueError, match=r"channel mismatch"):
        lu.conv_relu_forward(x, np.zeros((4, 2, 3, 3)), b, CONV)
    with pytest.raises(ValueError, match=r"G=3 must divide the channel count C=4"):
        lu.conv_gn_relu_pool_forward(x, w, b, np.ones(4), np.zeros(4), CONV, 3, {}, POOL)
    with pytest.raises(ValueError, match=r"bn_param\['mode'\]"):
        lu.conv_bn_relu_pool_forward(x, w, b, np.ones(4), np.zeros(4), CONV, {}, POOL)
    out, cache = lu.conv_relu_pool_forward(x, w, b, CONV, POOL)
    with pytest.raises(ValueError, match=r"dout for conv_relu_pool"):
        lu.conv_relu_pool_backward(np.zeros((2, 4, 8, 8)), cache)
