"""Checks of batch norm, layer norm, spatial batch norm and group norm (CS231n notebooks).

Numerical gradients of normalizations carry round-off of ~1e-10 in absolute terms, so the
element-wise relative error of the few smallest dx entries can reach 1e-6 on inputs scaled
like the notebook's (5 * randn + 12). Each dx check therefore asserts both the element-wise
relative error (notebook scale) and the error relative to the gradient's largest entry,
which a real mistake would push to ~1e-1.
"""

import numpy as np
import pytest

from pipeline import layers as L
from pipeline.gradient_check import eval_numerical_gradient_array, rel_error


def scaled_error(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def numeric_grads(f, args, dout):
    """Numerical gradients of f(*args) w.r.t. each array in args, contracted with dout."""
    grads = []
    for i in range(len(args)):

        def fi(a, i=i):
            return f(*args[:i], a, *args[i + 1 :])

        grads.append(eval_numerical_gradient_array(fi, args[i].copy(), dout))
    return grads


# ------------------------------------------------------------------------------------------
# batch norm, layer norm (vectors)


def two_layer_activations(rng, N=200, D1=50, D2=60, D3=3):
    X = rng.standard_normal((N, D1))
    W1 = rng.standard_normal((D1, D2))
    W2 = rng.standard_normal((D2, D3))
    return np.maximum(0, X @ W1) @ W2


def test_batchnorm_forward_train_statistics():
    rng = np.random.default_rng(231)
    a = two_layer_activations(rng)
    assert np.all(np.abs(a.mean(axis=0)) > 1)  # the raw activations are far from normalized
    out, _ = L.batchnorm_forward(a, np.ones(3), np.zeros(3), {"mode": "train"})
    assert np.allclose(out.mean(axis=0), 0, atol=1e-10)
    assert np.allclose(out.std(axis=0), 1, atol=1e-5)
    gamma, beta = np.array([1.0, 2.0, 3.0]), np.array([11.0, 12.0, 13.0])
    out, _ = L.batchnorm_forward(a, gamma, beta, {"mode": "train"})
    assert np.allclose(out.mean(axis=0), beta, atol=1e-10)
    assert np.allclose(out.std(axis=0), gamma, atol=1e-5)


def test_batchnorm_running_statistics_and_test_mode():
    rng = np.random.default_rng(231)
    N, D1, D2, D3 = 200, 50, 60, 3
    W1 = rng.standard_normal((D1, D2))
    W2 = rng.standard_normal((D2, D3))
    bn_param = {"mode": "train"}
    gamma, beta = np.ones(D3), np.zeros(D3)
    for _ in range(50):
        a = np.maximum(0, rng.standard_normal((N, D1)) @ W1) @ W2
        L.batchnorm_forward(a, gamma, beta, bn_param)
    bn_param["mode"] = "test"
    a = np.maximum(0, rng.standard_normal((N, D1)) @ W1) @ W2
    out, cache = L.batchnorm_forward(a, gamma, beta, bn_param)
    assert cache is None
    assert np.all(np.abs(out.mean(axis=0)) < 0.2)
    assert np.all(np.abs(out.std(axis=0) - 1) < 0.2)
    expected = (a - bn_param["running_mean"]) / np.sqrt(bn_param["running_var"] + 1e-5)
    assert rel_error(out, expected) < 1e-12


def test_batchnorm_running_average_formula():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 4)) * 3 + 2
    rm0, rv0 = rng.standard_normal(4), rng.random(4)
    bn_param = {
        "mode": "train",
        "momentum": 0.8,
        "running_mean": rm0.copy(),
        "running_var": rv0.copy(),
    }
    L.batchnorm_forward(x, np.ones(4), np.zeros(4), bn_param)
    assert np.allclose(bn_param["running_mean"], 0.8 * rm0 + 0.2 * x.mean(axis=0))
    assert np.allclose(bn_param["running_var"], 0.8 * rv0 + 0.2 * x.var(axis=0))


def test_batchnorm_backward_numeric_and_alt():
    rng = np.random.default_rng(231)
    N, D = 4, 5
    x = 5 * rng.standard_normal((N, D)) + 12
    gamma, beta = rng.standard_normal(D), rng.standard_normal(D)
    dout = rng.standard_normal((N, D))
    bn_param = {"mode": "train"}
    dx_num, dgamma_num, dbeta_num = numeric_grads(
        lambda x, g, b: L.batchnorm_forward(x, g, b, bn_param)[0], (x, gamma, beta), dout
    )
    _, cache = L.batchnorm_forward(x, gamma, beta, bn_param)
    dx, dgamma, dbeta = L.batchnorm_backward(dout, cache)
    assert rel_error(dx, dx_num) < 1e-6 and scaled_error(dx, dx_num) < 1e-8
    assert rel_error(dgamma, dgamma_num) < 1e-9
    assert rel_error(dbeta, dbeta_num) < 1e-9
    dx_alt, dgamma_alt, dbeta_alt = L.batchnorm_backward_alt(dout, cache)
    assert rel_error(dx, dx_alt) < 1e-10
    assert rel_error(dgamma, dgamma_alt) < 1e-12
    assert rel_error(dbeta, dbeta_alt) < 1e-12


def test_layernorm_forward_statistics():
    rng = np.random.default_rng(231)
    a = two_layer_activations(rng, N=4)
    out, _ = L.layernorm_forward(a, np.ones(3), np.zeros(3), {})
    assert np.allclose(out.mean(axis=1), 0, atol=1e-10)
    assert np.allclose(out.std(axis=1), 1, atol=1e-4)
    out, _ = L.layernorm_forward(a, np.full(3, 3.0), np.full(3, 5.0), {})
    assert np.allclose(out.mean(axis=1), 5, atol=1e-10)
    assert np.allclose(out.std(axis=1), 3, atol=1e-3)


def test_layernorm_backward_numeric():
    rng = np.random.default_rng(231)
    N, D = 4, 5
    x = 5 * rng.standard_normal((N, D)) + 12
    gamma, beta = rng.standard_normal(D), rng.standard_normal(D)
    dout = rng.standard_normal((N, D))
    ln_param = {}
    dx_num, dgamma_num, dbeta_num = numeric_grads(
        lambda x, g, b: L.layernorm_forward(x, g, b, ln_param)[0], (x, gamma, beta), dout
    )
    _, cache = L.layernorm_forward(x, gamma, beta, ln_param)
    dx, dgamma, dbeta = L.layernorm_backward(dout, cache)
    assert rel_error(dx, dx_num) < 1e-6 and scaled_error(dx, dx_num) < 1e-8
    assert rel_error(dgamma, dgamma_num) < 1e-9
    assert rel_error(dbeta, dbeta_num) < 1e-9


# ------------------------------------------------------------------------------------------
# spatial batch norm


def test_spatial_batchnorm_forward_train_statistics():
    rng = np.random.default_rng(231)
    N, C, H, W = 2, 3, 4, 5
    x = 4 * rng.standard_normal((N, C, H, W)) + 10
    out, _ = L.spatial_batchnorm_forward(x, np.ones(C), np.zeros(C), {"mode": "train"})
    assert out.shape == x.shape
    assert np.allclose(out.mean(axis=(0, 2, 3)), 0, atol=1e-10)
    assert np.allclose(out.std(axis=(0, 2, 3)), 1, atol=1e-5)
    gamma, beta = np.array([3.0, 4.0, 5.0]), np.array([6.0, 7.0, 8.0])
    out, _ = L.spatial_batchnorm_forward(x, gamma, beta, {"mode": "train"})
    assert np.allclose(out.mean(axis=(0, 2, 3)), beta, atol=1e-10)
    assert np.allclose(out.std(axis=(0, 2, 3)), gamma, atol=1e-4)
    # per channel, over N, H and W, from the definition
    mu = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)
    expected = gamma.reshape(1, C, 1, 1) * (x - mu) / np.sqrt(var + 1e-5) + beta.reshape(1, C, 1, 1)
    assert rel_error(out, expected) < 1e-12


def test_spatial_batchnorm_test_time_after_training():
    rng = np.random.default_rng(231)
    N, C, H, W = 10, 4, 11, 12
    bn_param = {"mode": "train"}
    gamma, beta = np.ones(C), np.zeros(C)
    for _ in range(50):
        x = 2.3 * rng.standard_normal((N, C, H, W)) + 13
        L.spatial_batchnorm_forward(x, gamma, beta, bn_param)
    assert bn_param["running_mean"].shape == (C,)
    assert np.allclose(bn_param["running_mean"], 13, atol=0.1)
    assert np.allclose(bn_param["running_var"], 2.3**2, atol=0.3)
    bn_param["mode"] = "test"
    x = 2.3 * rng.standard_normal((N, C, H, W)) + 13
    out, _ = L.spatial_batchnorm_forward(x, gamma, beta, bn_param)
    assert np.all(np.abs(out.mean(axis=(0, 2, 3))) < 0.1)
    assert np.all(np.abs(out.std(axis=(0, 2, 3)) - 1) < 0.1)


def test_spatial_batchnorm_backward_numeric():
    rng = np.random.default_rng(231)
    N, C, H, W = 2, 3, 4, 5
    x = 5 * rng.standard_normal((N, C, H, W)) + 12
    gamma, beta = rng.standard_normal(C), rng.standard_normal(C)
    dout = rng.standard_normal((N, C, H, W))
    bn_param = {"mode": "train"}
    dx_num, dgamma_num, dbeta_num = numeric_grads(
        lambda x, g, b: L.spatial_batchnorm_forward(x, g, b, bn_param)[0], (x, gamma, beta), dout
    )
    _, cache = L.spatial_batchnorm_forward(x, gamma, beta, bn_param)
    dx, dgamma, dbeta = L.spatial_batchnorm_backward(dout, cache)
    assert dx.shape == x.shape and dgamma.shape == (C,) and dbeta.shape == (C,)
    assert rel_error(dx, dx_num) < 1e-5 and scaled_error(dx, dx_num) < 1e-8
    assert rel_error(dgamma, dgamma_num) < 1e-9
    assert rel_error(dbeta, dbeta_num) < 1e-9


# ------------------------------------------------------------------------------------------
# group norm


def groupnorm_loops(x, gamma, beta, G, eps=1e-5):
    N, C, H, W = x.shape
    out = np.empty_like(x)
    cg = C // G
    for n in range(N):
        for g in range(G):
            block = x[n, g * cg : (g + 1) * cg]
            mu = block.mean()
            var = ((block - mu) ** 2).mean()
            for c in range(g * cg, (g + 1) * cg):
                out[n, c] = (
                    gamma[0, c, 0, 0] * (x[n, c] - mu) / np.sqrt(var + eps) + beta[0, c, 0, 0]
                )
    return out


def test_spatial_groupnorm_forward_group_statistics():
    rng = np.random.default_rng(231)
    N, C, H, W, G = 2, 6, 4, 5, 2
    x = 4 * rng.standard_normal((N, C, H, W)) + 10
    x[:, :3] += 5 * np.arange(3).reshape(1, 3, 1, 1)  # channels of a group differ in mean
    gamma, beta = np.ones((1, C, 1, 1)), np.zeros((1, C, 1, 1))
    out, _ = L.spatial_groupnorm_forward(x, gamma, beta, G, {})
    groups = out.reshape(N * G, -1)
    assert np.allclose(groups.mean(axis=1), 0, atol=1e-10)
    assert np.allclose(groups.std(axis=1), 1, atol=1e-5)
    # per group, not per channel: channel 0 of group 0 sits below the group mean
    assert np.all(out[:, 0].mean(axis=(1, 2)) < -0.5)
    gamma, beta = rng.standard_normal((1, C, 1, 1)), rng.standard_normal((1, C, 1, 1))
    out, _ = L.spatial_groupnorm_forward(x, gamma, beta, G, {})
    assert rel_error(out, groupnorm_loops(x, gamma, beta, G)) < 1e-12


@pytest.mark.parametrize("G", [1, 3, 6])
def test_spatial_groupnorm_forward_other_group_counts(G):
    rng = np.random.default_rng(G)
    x = 3 * rng.standard_normal((3, 6, 3, 4)) - 2
    gamma, beta = rng.standard_normal((1, 6, 1, 1)), rng.standard_normal((1, 6, 1, 1))
    out, _ = L.spatial_groupnorm_forward(x, gamma, beta, G, {"eps": 1e-3})
    assert rel_error(out, groupnorm_loops(x, gamma, beta, G, eps=1e-3)) < 1e-12


def test_spatial_groupnorm_backward_numeric():
    rng = np.random.default_rng(231)
    N, C, H, W, G = 2, 6, 4, 5, 2
    x = 5 * rng.standard_normal((N, C, H, W)) + 12
    gamma, beta = rng.standard_normal((1, C, 1, 1)), rng.standard_normal((1, C, 1, 1))
    dout = rng.standard_normal((N, C, H, W))
    gn_param = {}
    dx_num, dgamma_num, dbeta_num = numeric_grads(
        lambda x, g, b: L.spatial_groupnorm_forward(x, g, b, G, gn_param)[0], (x, gamma, beta), dout
    )
    _, cache = L.spatial_groupnorm_forward(x, gamma, beta, G, gn_param)
    dx, dgamma, dbeta = L.spatial_groupnorm_backward(dout, cache)
    assert dx.shape == x.shape and dgamma.shape == (1, C, 1, 1) and dbeta.shape == (1, C, 1, 1)
    assert rel_error(dx, dx_num) < 1e-5 and scaled_error(dx, dx_num) < 1e-8
    assert rel_error(dgamma, dgamma_num) < 1e-9
    assert rel_error(dbeta, dbeta_num) < 1e-9


# ------------------------------------------------------------------------------------------
# dtype, immutability, errors


def _norm_cases(rng, dtype):
    x2 = (3 * rng.standard_normal((6, 5)) + 1).astype(dtype)
    x4 = (3 * rng.standard_normal((2, 6, 3, 4)) + 1).astype(dtype)
    g5, b5 = rng.standard_normal(5).astype(dtype), rng.standard_normal(5).astype(dtype)
    g6, b6 = rng.standard_normal(6).astype(dtype), rng.standard_normal(6).astype(dtype)
    g6s, b6s = g6.reshape(1, 6, 1, 1), b6.reshape(1, 6, 1, 1)
    return [
        (
            "batchnorm",
            lambda x, g, b: L.batchnorm_forward(x, g, b, {"mode": "train"}),
            L.batchnorm_backward,
            (x2, g5, b5),
        ),
        (
            "batchnorm_alt",
            lambda x, g, b: L.batchnorm_forward(x, g, b, {"mode": "train"}),
            L.batchnorm_backward_alt,
            (x2, g5, b5),
        ),
        (
            "layernorm",
            lambda x, g, b: L.layernorm_forward(x, g, b, {}),
            L.layernorm_backward,
            (x2, g5, b5),
        ),
        (
            "spatial_bn",
            lambda x, g, b: L.spatial_batchnorm_forward(x, g, b, {"mode": "train"}),
            L.spatial_batchnorm_backward,
            (x4, g6, b6),
        ),
        (
            "groupnorm",
            lambda x, g, b: L.spatial_groupnorm_forward(x, g, b, 3, {}),
            L.spatial_groupnorm_backward,
            (x4, g6s, b6s),
        ),
    ]


@pytest.mark.parametrize("case", range(5))
def test_norms_keep_float32_and_leave_inputs_alone(case):
    rng = np.random.default_rng(case)
    name, fwd, bwd, args = _norm_cases(rng, np.float32)[case]
    _, _, _, args64 = _norm_cases(np.random.default_rng(case), np.float64)[case]
    before = [a.copy() for a in args]
    out, cache = fwd(*args)
    assert out.dtype == np.float32, name
    dout = rng.standard_normal(out.shape).astype(np.float32)
    dout0 = dout.copy()
    grads = bwd(dout, cache)
    for g, a in zip(grads, args):
        assert g.dtype == np.float32 and g.shape == a.shape, name
    for a, a0 in zip(args, before):
        assert np.array_equal(a, a0), name
    assert np.array_equal(dout, dout0), name
    # and float32 agrees with float64 to float32 accuracy
    out64, cache64 = fwd(*args64)
    assert np.max(np.abs(out - out64)) < 1e-4 * np.max(np.abs(out64)), name
    for g32, g64 in zip(grads, bwd(dout.astype(np.float64), cache64)):
        assert np.max(np.abs(g32 - g64)) < 1e-4 * np.max(np.abs(g64)), name


def test_batchnorm_float32_running_stats_stay_float32():
    x = np.random.default_rng(0).standard_normal((10, 4, 3, 3)).astype(np.float32)
    bn_param = {"mode": "train"}
    L.spatial_batchnorm_forward(x, np.ones(4, np.float32), np.zeros(4, np.float32), bn_param)
    assert (
        bn_param["running_mean"].dtype == np.float32 and bn_param["running_var"].dtype == np.float32
    )
    bn_param["mode"] = "test"
    out, _ = L.spatial_batchnorm_forward(
        x, np.ones(4, np.float32), np.zeros(4, np.float32), bn_param
    )
    assert out.dtype == np.float32


def test_batchnorm_does_not_modify_running_arrays_in_place():
    rm, rv = np.zeros(3), np.ones(3)
    bn_param = {"mode": "train", "running_mean": rm, "running_var": rv}
    L.batchnorm_forward(
        np.random.default_rng(1).standard_normal((5, 3)) + 4, np.ones(3), np.zeros(3), bn_param
    )
    assert np.all(rm == 0) and np.all(rv == 1)
    assert np.all(bn_param["running_mean"] != 0)


def test_norm_bad_parameters():
    x4 = np.zeros((2, 6, 3, 3))
    with pytest.raises(ValueError, match=r"G=4 must divide the channel count C=6"):
        L.spatial_groupnorm_forward(x4, np.ones((1, 6, 1, 1)), np.zeros((1, 6, 1, 1)), 4, {})
    with pytest.raises(ValueError, match=r"G must be an integer >= 1, got 0"):
        L.spatial_groupnorm_forward(x4, np.ones((1, 6, 1, 1)), np.zeros((1, 6, 1, 1)), 0, {})
    with pytest.raises(ValueError, match=r"gamma.*C=6.*\(1, 5, 1, 1\)"):
        L.spatial_groupnorm_forward(x4, np.ones((1, 5, 1, 1)), np.zeros((1, 6, 1, 1)), 2, {})
    with pytest.raises(ValueError, match=r"x must be a 4-D array.*\(6, 3, 3\)"):
        L.spatial_groupnorm_forward(
            np.zeros((6, 3, 3)), np.ones((1, 6, 1, 1)), np.zeros((1, 6, 1, 1)), 2, {}
        )
    with pytest.raises(
        ValueError, match=r"bn_param\['mode'\] must be 'train' or 'test', got 'eval'"
    ):
        L.spatial_batchnorm_forward(x4, np.ones(6), np.zeros(6), {"mode": "eval"})
    with pytest.raises(ValueError, match=r"bn_param\['mode'\].*None"):
        L.batchnorm_forward(np.zeros((3, 6)), np.ones(6), np.zeros(6), {})
    with pytest.raises(ValueError, match=r"x must be a 4-D array.*\(2, 6\)"):
        L.spatial_batchnorm_forward(np.zeros((2, 6)), np.ones(6), np.zeros(6), {"mode": "train"})
    with pytest.raises(ValueError, match=r"gamma must have shape \(6,\), got \(5,\)"):
        L.spatial_batchnorm_forward(x4, np.ones(5), np.zeros(6), {"mode": "train"})
    with pytest.raises(ValueError, match=r"x must be a 2-D array.*\(2, 6, 3, 3\)"):
        L.layernorm_forward(x4, np.ones(6), np.zeros(6), {})
    _, cache = L.spatial_batchnorm_forward(
        x4,
        np.ones(6),
        np.zeros(6),
        {"mode": "test", "running_mean": np.zeros(6), "running_var": np.ones(6)},
    )
    with pytest.raises(ValueError, match=r"mode'\]='train'"):
        L.spatial_batchnorm_backward(np.zeros_like(x4), cache)
