"""One policy for bad settings and for dtypes, in the naive layers, the fast layers, the
sandwich layers and the model: a ValueError naming the parameter and the value; out and dx in
the caller's dtype, float16 included."""

from __future__ import annotations

import ast
import inspect
import re

import numpy as np
import pytest

from pipeline import fast_layers as fl
from pipeline import layer_utils as lu
from pipeline import layers as L
from pipeline.cnn import ThreeLayerConvNet

POOL = {"pool_height": 2, "pool_width": 2, "stride": 2}


# --------------------------------------------------------------------------------------------
# group count and batch-norm momentum


@pytest.mark.parametrize(
    "num_groups,match",
    [
        (0, r"num_groups must be an integer >= 1, got 0"),
        (-2, r"num_groups must be an integer >= 1, got -2"),
        (2.5, r"num_groups must be an integer >= 1, got 2.5"),
        (5, r"num_groups=5 must divide num_filters=32"),
    ],
)
def test_model_num_groups_names_the_parameter(num_groups, match):
    with pytest.raises(ValueError, match=match):
        ThreeLayerConvNet(normalization="groupnorm", num_groups=num_groups)


def test_model_num_groups_unused_without_groupnorm():
    ThreeLayerConvNet(num_filters=6, num_groups=4)  # only groupnorm reads it


def test_sandwich_and_layers_reject_zero_groups():
    x = np.zeros((2, 3, 4, 4))
    w, b = np.zeros((4, 3, 3, 3)), np.zeros(4)
    g, bt = np.ones(4), np.zeros(4)
    with pytest.raises(ValueError, match=r"G must be an integer >= 1, got 0"):
        lu.conv_gn_relu_pool_forward(x, w, b, g, bt, {"stride": 1, "pad": 1}, 0, {}, POOL)
    with pytest.raises(ValueError, match=r"G must be an integer >= 1, got 0"):
        fl.spatial_groupnorm_forward_fast(np.zeros((2, 4, 3, 3)), g, bt, 0, {})


BAD_MOMENTA = [-0.1, 1.5, float("nan"), "0.9", None, True]


def _bn_calls(momentum):
    x4 = np.random.default_rng(0).standard_normal((2, 4, 3, 3))
    g, b = np.ones(4), np.zeros(4)
    w, cb = np.zeros((4, 4, 3, 3)), np.zeros(4)
    param = lambda: {"mode": "train", "momentum": momentum}  # noqa: E731
    return {
        "batchnorm_forward": lambda: L.batchnorm_forward(x4[:, :, 0, 0], g, b, param()),
        "spatial_batchnorm_forward": lambda: L.spatial_batchnorm_forward(x4, g, b, param()),
        "spatial_batchnorm_forward_fast": lambda: fl.spatial_batchnorm_forward_fast(
            x4, g, b, param()
        ),
        "conv_bn_relu_pool_forward": lambda: lu.conv_bn_relu_pool_forward(
            x4[:, :, :2, :2], w, cb, g, b, {"stride": 1, "pad": 1}, param(), POOL
        ),
        "test mode": lambda: fl.spatial_batchnorm_forward_fast(
            x4, g, b, {**param(), "mode": "test"}
        ),
    }


@pytest.mark.parametrize("momentum", BAD_MOMENTA, ids=repr)
@pytest.mark.parametrize("call", list(_bn_calls(0.9)))
def test_bn_momentum_outside_0_1_names_the_parameter_and_value(call, momentum):
    expected = r"bn_param\['momentum'\] must be a number in \[0, 1\], got " + re.escape(
        repr(momentum)
    )
    with pytest.raises(ValueError, match=expected):
        _bn_calls(momentum)[call]()


@pytest.mark.parametrize("momentum", [0, 0.0, 1, np.float32(0.5), 0.9])
def test_bn_momentum_in_range_is_accepted_unchanged(momentum):
    for call in _bn_calls(momentum).values():
        call()
    rm = np.zeros(4)
    bn = {"mode": "train", "momentum": momentum, "running_mean": rm.copy()}
    x = np.random.default_rng(1).standard_normal((8, 4)) + 3
    L.batchnorm_forward(x, np.ones(4), np.zeros(4), bn)
    np.testing.assert_array_equal(
        bn["running_mean"], momentum * rm + (1 - momentum) * x.mean(axis=0)
    )


@pytest.mark.parametrize("momentum", [-0.5, 2.0])
def test_model_bn_momentum_names_the_parameter(momentum):
    with pytest.raises(
        ValueError, match=rf"bn_momentum must be a number in \[0, 1\], got {momentum}"
    ):
        ThreeLayerConvNet(normalization="spatial_batchnorm", bn_momentum=momentum)


# --------------------------------------------------------------------------------------------
# dtypes: float16 stays float16 in both families (the fast kernels compute it in float32)


def _f16(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float16)


def _near(a, ref, what, tol=2e-3):
    """float16 result vs a float64 reference on the same float16 inputs, relative to the
    reference's scale: float16's rounding of the result (2**-11) when computed in float32;
    the naive layers also sum in float16 (tol 2e-2)."""
    a = np.asarray(a, dtype=np.float64)
    scale = max(float(np.max(np.abs(ref))), 1e-30)
    assert np.max(np.abs(a - ref)) <= tol * scale, what


def _layer_pairs(rng):
    """(name, fast forward, fast backward, naive forward, naive backward, float16 args)."""
    x = _f16(rng, 2, 3, 8, 8)
    w, b = _f16(rng, 4, 3, 3, 3, scale=0.3), _f16(rng, 4)
    w7 = _f16(rng, 4, 3, 7, 7, scale=0.1)
    conv = {"stride": 1, "pad": 1}
    conv7 = {"stride": 1, "pad": 3}
    xn = _f16(rng, 2, 4, 6, 6, scale=2.0) + np.float16(1)
    g, bt = _f16(rng, 4) + np.float16(1), _f16(rng, 4)
    return [
        (
            "conv im2col",
            lambda *a: fl.conv_forward_fast(*a, conv),
            fl.conv_backward_fast,
            lambda *a: L.conv_forward_naive(*a, conv),
            L.conv_backward_naive,
            (x, w, b),
        ),
        (
            "conv direct 7x7",
            lambda *a: fl.conv_forward_fast(*a, conv7),
            fl.conv_backward_fast,
            lambda *a: L.conv_forward_naive(*a, conv7),
            L.conv_backward_naive,
            (x, w7, b),
        ),
        (
            "max pool",
            lambda a: fl.max_pool_forward_fast(a, POOL),
            fl.max_pool_backward_fast,
            lambda a: L.max_pool_forward_naive(a, POOL),
            L.max_pool_backward_naive,
            (x,),
        ),
        (
            "spatial batchnorm",
            lambda *a: fl.spatial_batchnorm_forward_fast(*a, {"mode": "train"}),
            fl.spatial_batchnorm_backward_fast,
            lambda *a: L.spatial_batchnorm_forward(*a, {"mode": "train"}),
            L.spatial_batchnorm_backward,
            (xn, g, bt),
        ),
        (
            "groupnorm",
            lambda *a: fl.spatial_groupnorm_forward_fast(*a, 2, {}),
            fl.spatial_groupnorm_backward_fast,
            lambda *a: L.spatial_groupnorm_forward(*a, 2, {}),
            L.spatial_groupnorm_backward,
            (xn, g, bt),
        ),
    ]


@pytest.mark.parametrize("case", range(5))
def test_float16_in_float16_out_in_naive_and_fast_layers(case):
    rng = np.random.default_rng(case)
    name, ffwd, fbwd, nfwd, nbwd, args = _layer_pairs(rng)[case]
    before = [a.copy() for a in args]
    ref_out, ref_cache = nfwd(*[a.astype(np.float64) for a in args])
    dout = _f16(rng, *ref_out.shape)
    ref_grads = nbwd(dout.astype(np.float64), ref_cache)
    ref_grads = ref_grads if isinstance(ref_grads, tuple) else (ref_grads,)
    for family, fwd, bwd in (("fast", ffwd, fbwd), ("naive", nfwd, nbwd)):
        out, cache = fwd(*args)
        assert out.dtype == np.float16, f"{family} {name} out is {out.dtype}"
        tol = 2e-3 if family == "fast" else 2e-2
        _near(out, ref_out, f"{family} {name} out", tol)
        grads = bwd(dout, cache)
        grads = grads if isinstance(grads, tuple) else (grads,)
        for i, (gr, ref, a) in enumerate(zip(grads, ref_grads, args)):
            assert gr.dtype == np.float16 and gr.shape == a.shape, (
                f"{family} {name} grad {i}: {gr.dtype}"
            )
            _near(gr, ref, f"{family} {name} grad {i}", tol)
    for a, a0 in zip(args, before):
        np.testing.assert_array_equal(a, a0)


def test_float16_batchnorm_running_stats_stay_float16_in_both_families():
    rng = np.random.default_rng(3)
    x = _f16(rng, 4, 3, 5, 5) + np.float16(2)
    g, b = np.ones(3, np.float16), np.zeros(3, np.float16)
    for fwd in (fl.spatial_batchnorm_forward_fast, L.spatial_batchnorm_forward):
        bn = {"mode": "train"}
        fwd(x, g, b, bn)
        assert bn["running_mean"].dtype == np.float16 and bn["running_var"].dtype == np.float16, (
            fwd.__name__
        )
        _near(bn["running_mean"], 0.1 * x.astype(np.float64).mean(axis=(0, 2, 3)), fwd.__name__)
        bn["mode"] = "test"
        out, _ = fwd(x, g, b, bn)
        assert out.dtype == np.float16 and bn["running_mean"].dtype == np.float16, fwd.__name__


def test_float16_sandwich_layers_and_float32_params_keep_their_dtypes():
    rng = np.random.default_rng(4)
    x = _f16(rng, 2, 3, 8, 8)
    w, b = rng.standard_normal((4, 3, 7, 7)).astype(np.float32) * 0.1, np.zeros(4, np.float32)
    out, cache = lu.conv_relu_pool_forward(x, w, b, {"stride": 1, "pad": 3}, POOL)
    assert out.dtype == np.float16
    dx, dw, db = lu.conv_relu_pool_backward(np.ones_like(out), cache)
    assert (dx.dtype, dw.dtype, db.dtype) == (np.float16, np.float32, np.float32)
    out, cache = lu.conv_relu_forward(x, w, b, {"stride": 1, "pad": 3})
    assert out.dtype == np.float16
    assert lu.conv_relu_backward(np.ones_like(out), cache)[0].dtype == np.float16


def test_float32_and_float64_are_computed_in_their_own_dtype():
    """float32 still runs the float32 kernels (not float16's detour): same bits as before."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    out32, _ = fl.max_pool_forward_fast(x, POOL)
    out64, _ = fl.max_pool_forward_fast(x.astype(np.float64), POOL)
    assert out32.dtype == np.float32 and out64.dtype == np.float64
    np.testing.assert_array_equal(out32, out64.astype(np.float32))
    assert (
        fl.max_pool_forward_fast(x.astype(np.int32), POOL)[0].dtype == np.float64
    )  # as the naive layer


# --------------------------------------------------------------------------------------------
# the fused ReLU + pool and conv + ReLU are public, documented fast layers


def test_relu_max_pool_forward_fast_is_max_pool_of_relu():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 4, 6, 6))
    for pool in (POOL, {"pool_height": 3, "pool_width": 2, "stride": 1}):
        out, cache = fl.relu_max_pool_forward_fast(x, pool)
        r, rc = L.relu_forward(x)
        ref, pc = L.max_pool_forward_naive(r, pool)
        np.testing.assert_array_equal(out, ref)
        dout = rng.standard_normal(out.shape)
        np.testing.assert_allclose(
            fl.max_pool_backward_fast(dout, cache),
            L.relu_backward(L.max_pool_backward_naive(dout, pc), rc),
            rtol=0,
            atol=1e-15,
        )
    assert fl.relu_max_pool_forward_fast.__doc__ and "relu_max_pool_forward_fast" in fl.__all__


def test_conv_relu_forward_fast_is_relu_of_conv():
    rng = np.random.default_rng(7)
    x, w, b = (
        rng.standard_normal((2, 3, 6, 6)),
        rng.standard_normal((4, 3, 3, 3)),
        rng.standard_normal(4),
    )
    conv = {"stride": 1, "pad": 1}
    out, cache = fl.conv_relu_forward_fast(x, w, b, conv)
    a, ac = L.conv_forward_naive(x, w, b, conv)
    r, rc = L.relu_forward(a)
    np.testing.assert_allclose(out, r, rtol=1e-12, atol=1e-12)
    dout = rng.standard_normal(out.shape)
    for g, ref in zip(
        fl.conv_backward_fast(dout, cache), L.conv_backward_naive(L.relu_backward(dout, rc), ac)
    ):
        np.testing.assert_allclose(g, ref, rtol=1e-9, atol=1e-9)
    assert "conv_relu_forward_fast" in fl.__all__


def test_layer_utils_uses_only_public_fast_layers():
    tree = ast.parse(inspect.getsource(lu))
    private = sorted(
        {
            node.attr
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "fl"
            and node.attr.startswith("_")
        }
    )
    assert private == []
