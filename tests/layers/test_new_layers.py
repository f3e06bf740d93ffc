"""GELU, global average / max pooling and label-smoothed softmax: the naive references against
numerical gradients, the Numba paths against the naive references on many random shapes."""

import numpy as np
import pytest

from pipeline import fast_layers as fl
from pipeline import layers as L
from pipeline.gradient_check import eval_numerical_gradient, eval_numerical_gradient_array

PAIRS = {
    "gelu": (L.gelu_forward, L.gelu_backward, fl.gelu_forward_fast, fl.gelu_backward_fast),
    "gap": (
        L.global_avg_pool_forward,
        L.global_avg_pool_backward,
        fl.global_avg_pool_forward_fast,
        fl.global_avg_pool_backward_fast,
    ),
    "gmp": (
        L.global_max_pool_forward,
        L.global_max_pool_backward,
        fl.global_max_pool_forward_fast,
        fl.global_max_pool_backward_fast,
    ),
}


def rel_error(x, y):
    return np.max(np.abs(x - y) / np.maximum(1e-8, np.abs(x) + np.abs(y)))


@pytest.mark.parametrize("name", PAIRS)
def test_naive_backward_matches_the_numerical_gradient(name):
    forward, backward, _, _ = PAIRS[name]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4, 5))
    out, cache = forward(x)
    dout = rng.standard_normal(out.shape)
    num = eval_numerical_gradient_array(lambda z: forward(z)[0], x, dout)
    assert rel_error(num, backward(dout, cache)) < 1e-7


@pytest.mark.parametrize("name", PAIRS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_fast_paths_match_the_naive_layers_on_random_shapes(name, dtype):
    forward, backward, fast_forward, fast_backward = PAIRS[name]
    rng = np.random.default_rng(1)
    tol = {np.float64: 1e-12, np.float32: 1e-5, np.float16: 2e-3}[dtype]
    for _ in range(12):
        shape = tuple(int(d) for d in rng.integers(1, 9, 4))
        x = rng.standard_normal(shape).astype(dtype)
        out, cache = forward(x)
        got, fcache = fast_forward(x)
        assert got.dtype == out.dtype == dtype and got.shape == out.shape
        np.testing.assert_allclose(got, out, rtol=tol, atol=tol)
        dout = rng.standard_normal(out.shape).astype(dtype)
        dx, fdx = backward(dout, cache), fast_backward(dout, fcache)
        assert fdx.dtype == dtype and fdx.shape == x.shape
        np.testing.assert_allclose(fdx, dx, rtol=tol, atol=tol)


def test_global_max_pool_routes_the_gradient_to_the_first_maximum_only():
    x = np.zeros((1, 1, 2, 2), np.float32)  # every value ties: the first wins
    for forward, backward in (
        (L.global_max_pool_forward, L.global_max_pool_backward),
        (fl.global_max_pool_forward_fast, fl.global_max_pool_backward_fast),
    ):
        out, cache = forward(x)
        dx = backward(np.ones_like(out), cache)
        assert dx.reshape(-1).tolist() == [1, 0, 0, 0]


def test_layers_leave_their_inputs_unchanged_and_refuse_wrong_shapes():
    x = np.random.default_rng(2).standard_normal((2, 3, 4, 4)).astype(np.float32)
    before = x.copy()
    for forward, backward, fast_forward, fast_backward in PAIRS.values():
        for f, b in ((forward, backward), (fast_forward, fast_backward)):
            out, cache = f(x)
            b(np.ones_like(out), cache)
            with pytest.raises(ValueError, match="dout"):
                b(np.ones((5, 5), np.float32), cache)
    np.testing.assert_array_equal(x, before)
    for f in (
        L.global_avg_pool_forward,
        fl.global_avg_pool_forward_fast,
        fl.global_max_pool_forward_fast,
    ):
        with pytest.raises(ValueError, match=r"x must .*\(N, C, H, W\)"):
            f(np.ones((2, 3), np.float32))


def test_label_smoothing_matches_its_numerical_gradient_and_pytorchs_definition():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 5))
    y = rng.integers(0, 5, 6)
    loss, dx = L.softmax_loss(x, y, smoothing=0.2)
    num = eval_numerical_gradient(
        lambda z: L.softmax_loss(z, y, smoothing=0.2)[0], x, verbose=False
    )
    assert rel_error(num, dx) < 1e-7
    # PyTorch's: (1 - s) * cross-entropy + s * mean over classes of -log p
    logp = x - x.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    want = np.mean(0.8 * -logp[np.arange(6), y] + 0.2 * -logp.mean(1))
    assert abs(loss - want) < 1e-12
    # smoothing 0 is the plain loss, bit for bit
    plain, dplain = L.softmax_loss(x, y)
    zero, dzero = L.softmax_loss(x, y, smoothing=0.0)
    assert plain == zero and np.array_equal(dplain, dzero)
    with pytest.raises(ValueError, match=r"smoothing must be in \[0, 1\), got 1"):
        L.softmax_loss(x, y, smoothing=1)
