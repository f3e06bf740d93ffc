"""Checks of the naive reference layers from the CS231n ConvolutionalNetworks notebook.

Notebook values are compared both with pipeline.layers and with independent loop
implementations written here, so a wrong expected value cannot hide.
"""

import numpy as np
import pytest

from pipeline import layers as L
from pipeline.gradient_check import (
    eval_numerical_gradient,
    eval_numerical_gradient_array,
    rel_error,
)
from pipeline.vis_utils import visualize_grid

# ------------------------------------------------------------------------------------------
# independent references (explicit loops, written from the definitions)


def conv_loops(x, w, b, stride, pad):
    N, C, H, W = x.shape
    F, _, HH, WW = w.shape
    xp = np.zeros((N, C, H + 2 * pad, W + 2 * pad))
    xp[:, :, pad : pad + H, pad : pad + W] = x
    Ho = (H + 2 * pad - HH) // stride + 1
    Wo = (W + 2 * pad - WW) // stride + 1
    out = np.zeros((N, F, Ho, Wo))
    for n in range(N):
        for f in range(F):
            for i in range(Ho):
                for j in range(Wo):
                    s = b[f]
                    for c in range(C):
                        for k in range(HH):
                            for m in range(WW):
                                s += xp[n, c, i * stride + k, j * stride + m] * w[f, c, k, m]
                    out[n, f, i, j] = s
    return out


def pool_loops(x, ph, pw, stride):
    N, C, H, W = x.shape
    Ho, Wo = (H - ph) // stride + 1, (W - pw) // stride + 1
    out = np.zeros((N, C, Ho, Wo))
    for n in range(N):
        for c in range(C):
            for i in range(Ho):
                for j in range(Wo):
                    out[n, c, i, j] = max(
                        x[n, c, i * stride + k, j * stride + m]
                        for k in range(ph)
                        for m in range(pw)
                    )
    return out


# ------------------------------------------------------------------------------------------
# convolution


CONV_CORRECT_OUT = np.array(
    # The CS231n notebook's correct_out for the linspace example; the last six entries were
    # misremembered in the task brief and are the values of the independent loop conv below.
    [
        [
            [[-0.08759809, -0.10987781], [-0.18387192, -0.2109216]],
            [[0.21027089, 0.21661097], [0.22847626, 0.23004637]],
            [[0.50813986, 0.54309974], [0.64082444, 0.67101435]],
        ],
        [
            [[-0.98053589, -1.03143541], [-1.19128892, -1.24695841]],
            [[0.69108355, 0.66880383], [0.59480972, 0.56776003]],
            [[2.36270298, 2.36904306], [2.38090835, 2.38247847]],
        ],
    ]
)


def linspace_conv_inputs():
    x = np.linspace(-0.1, 0.5, num=2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    w = np.linspace(-0.2, 0.3, num=3 * 3 * 4 * 4).reshape(3, 3, 4, 4)
    b = np.linspace(-0.1, 0.2, num=3)
    return x, w, b, {"stride": 2, "pad": 1}


def test_conv_forward_naive_notebook_example():
    x, w, b, conv_param = linspace_conv_inputs()
    out, _ = L.conv_forward_naive(x, w, b, conv_param)
    assert out.shape == (2, 3, 2, 2)
    assert rel_error(out, CONV_CORRECT_OUT) < 1e-7
    # the expected values themselves agree with the definition (8 printed digits)
    assert rel_error(conv_loops(x, w, b, 2, 1), CONV_CORRECT_OUT) < 1e-7
    assert rel_error(out, conv_loops(x, w, b, 2, 1)) < 1e-12


@pytest.mark.parametrize(
    "x_shape, w_shape, stride, pad",
    [
        ((2, 3, 7, 5), (4, 3, 3, 3), 1, 0),
        ((1, 2, 8, 8), (3, 2, 4, 2), 2, 1),
        ((3, 1, 5, 6), (2, 1, 1, 2), 1, 2),
        ((2, 2, 9, 9), (2, 2, 3, 3), 3, 0),
    ],
)
def test_conv_forward_naive_matches_loops(x_shape, w_shape, stride, pad):
    rng = np.random.default_rng(11)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    b = rng.standard_normal(w_shape[0])
    out, _ = L.conv_forward_naive(x, w, b, {"stride": stride, "pad": pad})
    assert rel_error(out, conv_loops(x, w, b, stride, pad)) < 1e-12


def test_conv_backward_naive_numeric():
    rng = np.random.default_rng(231)
    x = rng.standard_normal((4, 3, 5, 5))
    w = rng.standard_normal((2, 3, 3, 3))
    b = rng.standard_normal(2)
    dout = rng.standard_normal((4, 2, 5, 5))
    conv_param = {"stride": 1, "pad": 1}
    dx_num = eval_numerical_gradient_array(
        lambda x: L.conv_forward_naive(x, w, b, conv_param)[0], x, dout
    )
    dw_num = eval_numerical_gradient_array(
        lambda w: L.conv_forward_naive(x, w, b, conv_param)[0], w, dout
    )
    db_num = eval_numerical_gradient_array(
        lambda b: L.conv_forward_naive(x, w, b, conv_param)[0], b, dout
    )
    _, cache = L.conv_forward_naive(x, w, b, conv_param)
    dx, dw, db = L.conv_backward_naive(dout, cache)
    assert dx.shape == x.shape and dw.shape == w.shape and db.shape == b.shape
    assert rel_error(dx, dx_num) < 1e-8
    assert rel_error(dw, dw_num) < 1e-8
    assert rel_error(db, db_num) < 1e-8


def test_conv_backward_naive_numeric_strided():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 2, 7, 7))
    w = rng.standard_normal((3, 2, 3, 3))
    b = rng.standard_normal(3)
    conv_param = {"stride": 2, "pad": 1}
    out, cache = L.conv_forward_naive(x, w, b, conv_param)
    dout = rng.standard_normal(out.shape)
    dx, dw, db = L.conv_backward_naive(dout, cache)
    assert (
        rel_error(
            dx,
            eval_numerical_gradient_array(
                lambda x: L.conv_forward_naive(x, w, b, conv_param)[0], x, dout
            ),
        )
        < 1e-8
    )
    assert (
        rel_error(
            dw,
            eval_numerical_gradient_array(
                lambda w: L.conv_forward_naive(x, w, b, conv_param)[0], w, dout
            ),
        )
        < 1e-8
    )
    assert rel_error(db, dout.sum(axis=(0, 2, 3))) < 1e-12


# ------------------------------------------------------------------------------------------
# max pooling


POOL_CORRECT_OUT = np.array(
    [
        [
            [[-0.26315789, -0.24842105], [-0.20421053, -0.18947368]],
            [[-0.14526316, -0.13052632], [-0.08631579, -0.07157895]],
            [[-0.02736842, -0.01263158], [0.03157895, 0.04631579]],
        ],
        [
            [[0.09052632, 0.10526316], [0.14947368, 0.16421053]],
            [[0.20842105, 0.22315789], [0.26736842, 0.28210526]],
            [[0.32631579, 0.34105263], [0.38526316, 0.4]],
        ],
    ]
)


def test_max_pool_forward_naive_notebook_example():
    x = np.linspace(-0.3, 0.4, num=2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    out, _ = L.max_pool_forward_naive(x, {"pool_width": 2, "pool_height": 2, "stride": 2})
    assert out.shape == (2, 3, 2, 2)
    assert rel_error(out, POOL_CORRECT_OUT) < 1e-7
    assert rel_error(pool_loops(x, 2, 2, 2), POOL_CORRECT_OUT) < 1e-7


@pytest.mark.parametrize(
    "ph, pw, stride, shape",
    [(2, 2, 2, (2, 3, 8, 6)), (3, 2, 1, (1, 2, 5, 6)), (3, 3, 2, (2, 1, 7, 9))],
)
def test_max_pool_forward_naive_matches_loops(ph, pw, stride, shape):
    x = np.random.default_rng(3).standard_normal(shape)
    out, _ = L.max_pool_forward_naive(x, {"pool_height": ph, "pool_width": pw, "stride": stride})
    assert np.array_equal(out, pool_loops(x, ph, pw, stride))


@pytest.mark.parametrize(
    "pool_param, shape",
    [
        ({"pool_height": 2, "pool_width": 2, "stride": 2}, (3, 2, 8, 8)),
        ({"pool_height": 3, "pool_width": 2, "stride": 1}, (2, 2, 5, 4)),
    ],
)
def test_max_pool_backward_naive_numeric(pool_param, shape):
    rng = np.random.default_rng(231)
    x = rng.standard_normal(shape)
    out, cache = L.max_pool_forward_naive(x, pool_param)
    dout = rng.standard_normal(out.shape)
    dx_num = eval_numerical_gradient_array(
        lambda x: L.max_pool_forward_naive(x, pool_param)[0], x, dout
    )
    dx = L.max_pool_backward_naive(dout, cache)
    assert rel_error(dx, dx_num) < 1e-11  # notebook: ~1e-12


def test_max_pool_backward_routes_ties_to_first_max():
    x = np.zeros((1, 1, 2, 2))
    _, cache = L.max_pool_forward_naive(x, {"pool_height": 2, "pool_width": 2, "stride": 2})
    dx = L.max_pool_backward_naive(np.full((1, 1, 1, 1), 3.0), cache)
    assert dx.ravel().tolist() == [3.0, 0.0, 0.0, 0.0]


# ------------------------------------------------------------------------------------------
# affine, relu, losses, dropout


def test_affine_forward_notebook_example():
    num_inputs, input_shape, output_dim = 2, (4, 5, 6), 3
    input_size = num_inputs * np.prod(input_shape)
    weight_size = output_dim * np.prod(input_shape)
    x = np.linspace(-0.1, 0.5, num=input_size).reshape(num_inputs, *input_shape)
    w = np.linspace(-0.2, 0.3, num=weight_size).reshape(np.prod(input_shape), output_dim)
    b = np.linspace(-0.3, 0.1, num=output_dim)
    out, _ = L.affine_forward(x, w, b)
    correct_out = np.array(
        [[1.49834967, 1.70660132, 1.91485297], [3.25553199, 3.5141327, 3.77273342]]
    )
    assert rel_error(out, correct_out) < 1e-7
    assert rel_error(out, x.reshape(2, -1) @ w + b) < 1e-12


def test_affine_backward_numeric():
    rng = np.random.default_rng(231)
    x = rng.standard_normal((10, 2, 3))
    w = rng.standard_normal((6, 5))
    b = rng.standard_normal(5)
    dout = rng.standard_normal((10, 5))
    _, cache = L.affine_forward(x, w, b)
    dx, dw, db = L.affine_backward(dout, cache)
    assert (
        rel_error(
            dx, eval_numerical_gradient_array(lambda x: L.affine_forward(x, w, b)[0], x, dout)
        )
        < 1e-8
    )
    assert (
        rel_error(
            dw, eval_numerical_gradient_array(lambda w: L.affine_forward(x, w, b)[0], w, dout)
        )
        < 1e-8
    )
    assert (
        rel_error(
            db, eval_numerical_gradient_array(lambda b: L.affine_forward(x, w, b)[0], b, dout)
        )
        < 1e-8
    )


def test_relu_forward_notebook_example_and_backward():
    x = np.linspace(-0.5, 0.5, num=12).reshape(3, 4)
    out, _ = L.relu_forward(x)
    correct_out = np.array(
        [
            [0.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.04545455, 0.13636364],
            [0.22727273, 0.31818182, 0.40909091, 0.5],
        ]
    )
    assert rel_error(out, correct_out) < 1e-7
    rng = np.random.default_rng(231)
    x = rng.standard_normal((10, 10))
    dout = rng.standard_normal(x.shape)
    dx = L.relu_backward(dout, L.relu_forward(x)[1])
    assert (
        rel_error(dx, eval_numerical_gradient_array(lambda x: L.relu_forward(x)[0], x, dout))
        < 1e-10
    )


@pytest.mark.parametrize("loss_fn, expected", [(L.svm_loss, 9.0), (L.softmax_loss, np.log(10))])
def test_losses_on_small_random_scores(loss_fn, expected):
    # notebook: with scores 0.001 * randn the SVM loss is ~ C - 1 = 9 and the softmax ~ ln C
    rng = np.random.default_rng(231)
    num_classes, num_inputs = 10, 50
    x = 0.001 * rng.standard_normal((num_inputs, num_classes))
    y = rng.integers(num_classes, size=num_inputs)
    loss, dx = loss_fn(x, y)
    assert abs(loss - expected) < 0.01
    dx_num = eval_numerical_gradient(lambda x: loss_fn(x, y)[0], x, verbose=False)
    assert rel_error(dx, dx_num) < 1e-8


def test_softmax_loss_exact_value_and_stability():
    x = np.array([[1.0, 2.0, 3.0], [1000.0, 0.0, -1000.0]])
    y = np.array([2, 0])
    loss, dx = L.softmax_loss(x, y)
    expected = (-(3 - np.log(np.exp(1) + np.exp(2) + np.exp(3))) + 0.0) / 2
    assert np.isfinite(loss) and abs(loss - expected) < 1e-12
    assert np.allclose(dx.sum(axis=1), 0)


def test_svm_loss_exact_value():
    x = np.array([[3.0, 1.0, 2.5], [0.0, 0.5, 0.2]])
    y = np.array([0, 2])
    # example 0: max(0, 1-3+1) + max(0, 2.5-3+1) = 0 + 0.5; example 1: 0.8 + 1.3
    loss, dx = L.svm_loss(x, y)
    assert abs(loss - (0.5 + 2.1) / 2) < 1e-12
    assert np.allclose(dx, np.array([[-0.5, 0, 0.5], [0.5, 0.5, -1.0]]))


def test_dropout_forward_preserves_mean():
    rng = np.random.default_rng(231)
    x = rng.standard_normal((500, 500)) + 10
    for i, p in enumerate([0.25, 0.4, 0.7]):
        out, _ = L.dropout_forward(x, {"mode": "train", "p": p, "seed": i})
        out_test, _ = L.dropout_forward(x, {"mode": "test", "p": p})
        # kept values are x / p with probability p: the mean's standard deviation is about
        # mean(x) * sqrt((1 - p) / p / size); allow 5 of them (0.05 flat failed 1 run in ~6)
        assert abs(out.mean() - x.mean()) < 5 * x.mean() * np.sqrt((1 - p) / p / x.size)
        assert abs((out == 0).mean() - (1 - p)) < 0.01
        assert np.array_equal(out_test, x)


def test_dropout_backward_numeric_and_seed():
    rng = np.random.default_rng(231)
    x = rng.standard_normal((10, 10)) + 10
    dout = rng.standard_normal(x.shape)
    dropout_param = {"mode": "train", "p": 0.2, "seed": 123}
    out, cache = L.dropout_forward(x, dropout_param)
    out2, _ = L.dropout_forward(x, dropout_param)
    assert np.array_equal(out, out2)  # the seed fixes the mask
    dx = L.dropout_backward(dout, cache)
    dx_num = eval_numerical_gradient_array(
        lambda xx: L.dropout_forward(xx, dropout_param)[0], x, dout
    )
    assert rel_error(dx, dx_num) < 1e-10
    state = np.random.get_state()[1].copy()
    L.dropout_forward(x, dropout_param)
    assert np.array_equal(np.random.get_state()[1], state)  # a seeded call leaves np.random alone


# ------------------------------------------------------------------------------------------
# dtype, immutability, errors


def _float32_calls(rng):
    f = np.float32
    x4 = rng.standard_normal((2, 3, 6, 6)).astype(f)
    w4 = rng.standard_normal((4, 3, 3, 3)).astype(f)
    b4 = rng.standard_normal(4).astype(f)
    x2 = rng.standard_normal((5, 7)).astype(f)
    w2 = rng.standard_normal((7, 3)).astype(f)
    b2 = rng.standard_normal(3).astype(f)
    y = rng.integers(3, size=5)
    pp = {"pool_height": 2, "pool_width": 2, "stride": 2}
    return [
        ("affine", L.affine_forward, L.affine_backward, (x2, w2, b2)),
        ("relu", L.relu_forward, L.relu_backward, (x2,)),
        (
            "dropout",
            L.dropout_forward,
            L.dropout_backward,
            (x2, {"mode": "train", "p": 0.5, "seed": 1}),
        ),
        ("dropout-test", L.dropout_forward, L.dropout_backward, (x2, {"mode": "test", "p": 0.5})),
        (
            "conv",
            L.conv_forward_naive,
            L.conv_backward_naive,
            (x4, w4, b4, {"stride": 1, "pad": 1}),
        ),
        ("pool", L.max_pool_forward_naive, L.max_pool_backward_naive, (x4, pp)),
    ], (x2, w2, y)


def test_float32_preserved_and_inputs_untouched():
    rng = np.random.default_rng(0)
    calls, (x2, w2, y) = _float32_calls(rng)
    for name, fwd, bwd, args in calls:
        before = [a.copy() for a in args if isinstance(a, np.ndarray)]
        out, cache = fwd(*args)
        assert out.dtype == np.float32, name
        dout = rng.standard_normal(out.shape).astype(np.float32)
        dout_before = dout.copy()
        grads = bwd(dout, cache)
        grads = grads if isinstance(grads, tuple) else (grads,)
        for g, a in zip(grads, args):
            assert g.dtype == np.float32, name
            assert g.shape == a.shape, name
        for a, a0 in zip([a for a in args if isinstance(a, np.ndarray)], before):
            assert np.array_equal(a, a0), name
        assert np.array_equal(dout, dout_before), name
    for loss_fn in (L.softmax_loss, L.svm_loss):
        scores = x2 @ w2
        loss, dx = loss_fn(scores, y)
        assert dx.dtype == np.float32 and np.asarray(loss).dtype == np.float32


def test_float32_conv_matches_float64():
    rng = np.random.default_rng(1)
    x, w, b = (
        rng.standard_normal((2, 3, 6, 6)),
        rng.standard_normal((4, 3, 3, 3)),
        rng.standard_normal(4),
    )
    cp = {"stride": 1, "pad": 1}
    out64, c64 = L.conv_forward_naive(x, w, b, cp)
    out32, c32 = L.conv_forward_naive(
        x.astype(np.float32), w.astype(np.float32), b.astype(np.float32), cp
    )
    assert rel_error(out32, out64) < 1e-4
    dout = rng.standard_normal(out64.shape)
    for g32, g64 in zip(
        L.conv_backward_naive(dout.astype(np.float32), c32), L.conv_backward_naive(dout, c64)
    ):
        assert g32.dtype == np.float32 and np.max(np.abs(g32 - g64)) < 1e-4 * np.max(np.abs(g64))


def test_conv_pads_without_touching_x():
    x = np.ones((1, 1, 3, 3))
    out, _ = L.conv_forward_naive(x, np.ones((1, 1, 3, 3)), np.zeros(1), {"stride": 1, "pad": 1})
    # corner windows see 4 ones, edges 6, the centre 9
    assert out[0, 0].tolist() == [[4, 6, 4], [6, 9, 6], [4, 6, 4]]
    assert x.shape == (1, 1, 3, 3) and np.all(x == 1)


@pytest.mark.parametrize(
    "x_shape, w_shape, b_shape, conv_param, match",
    [
        (
            (2, 3, 6, 6),
            (4, 3, 3, 3),
            (4,),
            {"stride": 2, "pad": 0},
            r"conv output height is not an integer.*stride 2 \+ 1 = 2\.5",
        ),
        ((2, 3, 5, 5), (4, 2, 3, 3), (4,), {"stride": 1, "pad": 1}, r"channel mismatch.*C=3.*C=2"),
        ((2, 3, 5, 5), (4, 3, 3, 3), (4,), {"stride": 0, "pad": 1}, r"conv_param\['stride'\].*0"),
        ((2, 3, 5, 5), (4, 3, 3, 3), (4,), {"stride": 1, "pad": -1}, r"conv_param\['pad'\].*-1"),
        (
            (3, 5, 5),
            (4, 3, 3, 3),
            (4,),
            {"stride": 1, "pad": 1},
            r"x must be a 4-D array.*\(3, 5, 5\)",
        ),
        ((2, 3, 5, 5), (3, 3, 3), (4,), {"stride": 1, "pad": 1}, r"w must be a 4-D array"),
        (
            (2, 3, 5, 5),
            (4, 3, 3, 3),
            (3,),
            {"stride": 1, "pad": 1},
            r"b must have shape \(4,\), got \(3,\)",
        ),
    ],
)
def test_conv_forward_bad_parameters(x_shape, w_shape, b_shape, conv_param, match):
    with pytest.raises(ValueError, match=match):
        L.conv_forward_naive(np.zeros(x_shape), np.zeros(w_shape), np.zeros(b_shape), conv_param)


@pytest.mark.parametrize(
    "x_shape, pool_param, match",
    [
        (
            (1, 1, 5, 5),
            {"pool_height": 2, "pool_width": 2, "stride": 2},
            r"pool output height is not an integer.*= 2\.5",
        ),
        (
            (1, 1, 4, 4),
            {"pool_height": 2, "pool_width": 2, "stride": 0},
            r"pool_param\['stride'\].*0",
        ),
        (
            (1, 1, 4, 4),
            {"pool_height": 0, "pool_width": 2, "stride": 1},
            r"pool_param\['pool_height'\].*0",
        ),
        (
            (1, 1, 4, 4),
            {"pool_height": 2, "pool_width": -1, "stride": 1},
            r"pool_param\['pool_width'\].*-1",
        ),
        (
            (4, 4),
            {"pool_height": 2, "pool_width": 2, "stride": 2},
            r"x must be a 4-D array.*\(4, 4\)",
        ),
    ],
)
def test_max_pool_bad_parameters(x_shape, pool_param, match):
    with pytest.raises(ValueError, match=match):
        L.max_pool_forward_naive(np.zeros(x_shape), pool_param)


def test_backward_rejects_wrong_dout_shape():
    x, w, b, cp = linspace_conv_inputs()
    _, cache = L.conv_forward_naive(x, w, b, cp)
    with pytest.raises(ValueError, match=r"dout.*\(2, 3, 2, 2\).*\(2, 3, 3, 3\)"):
        L.conv_backward_naive(np.zeros((2, 3, 3, 3)), cache)


def test_affine_and_loss_bad_parameters():
    with pytest.raises(ValueError, match=r"dimension mismatch.*D=6"):
        L.affine_forward(np.zeros((2, 2, 3)), np.zeros((5, 4)), np.zeros(4))
    with pytest.raises(ValueError, match=r"y labels must lie in \[0, 2\]"):
        L.softmax_loss(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match=r"dropout_param\['p'\].*1.5"):
        L.dropout_forward(np.zeros(3), {"mode": "train", "p": 1.5})
    with pytest.raises(ValueError, match=r"dropout_param\['mode'\].*'eval'"):
        L.dropout_forward(np.zeros(3), {"mode": "eval", "p": 0.5})


# ------------------------------------------------------------------------------------------
# gradient_check, vis_utils


def test_eval_numerical_gradient_restores_x_and_is_exact_on_quadratic():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 4))
    x0 = x.copy()
    A = rng.standard_normal((4, 4))
    grad = eval_numerical_gradient(lambda z: np.sum(z @ A * z), x, verbose=False)
    assert np.array_equal(x, x0)
    assert rel_error(grad, x @ (A + A.T)) < 1e-8
    df = rng.standard_normal((3, 4))
    grad_arr = eval_numerical_gradient_array(lambda z: np.sin(z), x, df)
    assert np.array_equal(x, x0)
    assert rel_error(grad_arr, np.cos(x) * df) < 1e-8


def test_eval_numerical_gradient_restores_x_when_f_raises():
    x = np.arange(4.0)

    def f(z):
        if z[0] != 0:
            raise RuntimeError("boom")
        return z.sum()

    with pytest.raises(RuntimeError):
        eval_numerical_gradient(f, x, verbose=False)
    assert x.tolist() == [0.0, 1.0, 2.0, 3.0]


def test_visualize_grid_layout_and_scaling():
    rng = np.random.default_rng(4)
    Xs = rng.standard_normal((5, 3, 4, 2))
    grid = visualize_grid(Xs, ubound=255.0, padding=1)
    assert grid.shape == (3 * 3 + 2, 3 * 4 + 2, 2)  # 5 images -> 3x3 grid
    for idx in range(5):
        gy, gx = divmod(idx, 3)
        tile = grid[gy * 4 : gy * 4 + 3, gx * 5 : gx * 5 + 4]
        img = Xs[idx]
        assert np.allclose(tile, 255.0 * (img - img.min()) / (img.max() - img.min()))
    assert np.all(grid[3, :] == 0) and np.all(grid[:, 4] == 0)  # padding rows/cols
    assert np.all(grid[8:, 10:] == 0)  # unused cells
    assert np.all(visualize_grid(np.ones((1, 2, 2, 3))) == 0)  # a constant image, no NaN


def test_vis_utils_does_not_import_matplotlib():
    import subprocess
    import sys

    code = "import sys, pipeline.vis_utils; print('matplotlib' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"
