"""Update rules: cs231n's expected values, and the fused Adam bit-identical to the NumPy formula."""

import numpy as np
import pytest

from pipeline.optim import (
    adam,
    adam_inplace,
    muon_update,
    orthogonalize,
    rmsprop,
    sgd,
    sgd_momentum,
)


def rel_error(x, y):
    return np.max(np.abs(x - y) / np.maximum(1e-8, np.abs(x) + np.abs(y)))


N, D = 4, 5
W = np.linspace(-0.4, 0.6, num=N * D).reshape(N, D)
DW = np.linspace(-0.6, 0.4, num=N * D).reshape(N, D)


def test_sgd_updates_in_place_like_cs231n():
    w = W.copy()
    next_w, config = sgd(w, DW, {"learning_rate": 0.1})
    assert next_w is w
    np.testing.assert_allclose(next_w, W - 0.1 * DW)


def test_sgd_momentum_matches_notebook():
    v = np.linspace(0.6, 0.9, num=N * D).reshape(N, D)
    next_w, config = sgd_momentum(W, DW, {"learning_rate": 1e-3, "velocity": v})
    expected_next_w = np.asarray(
        [
            [0.1406, 0.20738947, 0.27417895, 0.34096842, 0.40775789],
            [0.47454737, 0.54133684, 0.60812632, 0.67491579, 0.74170526],
            [0.80849474, 0.87528421, 0.94207368, 1.00886316, 1.07565263],
            [1.14244211, 1.20923158, 1.27602105, 1.34281053, 1.4096],
        ]
    )
    expected_velocity = np.asarray(
        [
            [0.5406, 0.55475789, 0.56891579, 0.58307368, 0.59723158],
            [0.61138947, 0.62554737, 0.63970526, 0.65386316, 0.66802105],
            [0.68217895, 0.69633684, 0.71049474, 0.72465263, 0.73881053],
            [0.75296842, 0.76712632, 0.78128421, 0.79544211, 0.8096],
        ]
    )
    assert rel_error(next_w, expected_next_w) < 1e-8
    assert rel_error(config["velocity"], expected_velocity) < 1e-8


def test_rmsprop_matches_notebook():
    cache = np.linspace(0.6, 0.9, num=N * D).reshape(N, D)
    next_w, config = rmsprop(W, DW, {"learning_rate": 1e-2, "cache": cache})
    expected_next_w = np.asarray(
        [
            [-0.39223849, -0.34037513, -0.28849239, -0.23659121, -0.18467247],
            [-0.132737, -0.08078555, -0.02881884, 0.02316247, 0.07515774],
            [0.12716641, 0.17918792, 0.23122175, 0.28326742, 0.33532447],
            [0.38739248, 0.43947102, 0.49155973, 0.54365823, 0.59576619],
        ]
    )
    assert rel_error(next_w, expected_next_w) < 1e-7


def test_adam_matches_notebook():
    m = np.linspace(0.6, 0.9, num=N * D).reshape(N, D)
    v = np.linspace(0.7, 0.5, num=N * D).reshape(N, D)
    w = W.copy()
    next_w, config = adam(w, DW, {"learning_rate": 1e-2, "m": m, "v": v, "t": 5})
    expected_next_w = np.asarray(
        [
            [-0.40094747, -0.34836187, -0.29577703, -0.24319299, -0.19060977],
            [-0.1380274, -0.08544591, -0.03286534, 0.01971428, 0.0722929],
            [0.1248705, 0.17744702, 0.23002243, 0.28259667, 0.33516969],
            [0.38774145, 0.44031188, 0.49288093, 0.54544852, 0.59801459],
        ]
    )
    expected_v = np.asarray(
        [
            [0.69966, 0.68908382, 0.67851319, 0.66794809, 0.65738853],
            [0.64683452, 0.63628604, 0.6257431, 0.61520571, 0.60467385],
            [0.59414753, 0.58362676, 0.57311152, 0.56260183, 0.55209767],
            [0.54159906, 0.53110598, 0.52061845, 0.51013645, 0.49966],
        ]
    )
    expected_m = np.asarray(
        [
            [0.48, 0.49947368, 0.51894737, 0.53842105, 0.55789474],
            [0.57736842, 0.59684211, 0.61631579, 0.63578947, 0.65526316],
            [0.67473684, 0.69421053, 0.71368421, 0.73315789, 0.75263158],
            [0.77210526, 0.79157895, 0.81105263, 0.83052632, 0.85],
        ]
    )
    assert (
        rel_error(expected_next_w, next_w) < 1e-6
    )  # notebook: "around e-7 or less" (8 printed digits)
    assert rel_error(expected_v, config["v"]) < 1e-7
    assert rel_error(expected_m, config["m"]) < 1e-7
    assert config["t"] == 6
    np.testing.assert_array_equal(w, W)  # adam leaves w alone; adam_inplace writes into it


def numpy_adam(w, dw, config):
    """cs231n's unfused NumPy Adam: the reference the fused kernel must equal bit for bit."""
    config.setdefault("learning_rate", 1e-3)
    config.setdefault("beta1", 0.9)
    config.setdefault("beta2", 0.999)
    config.setdefault("epsilon", 1e-8)
    config.setdefault("m", np.zeros_like(w))
    config.setdefault("v", np.zeros_like(w))
    config.setdefault("t", 0)
    config["t"] += 1
    b1, b2, t = config["beta1"], config["beta2"], config["t"]
    config["m"] = b1 * config["m"] + (1 - b1) * dw
    config["v"] = b2 * config["v"] + (1 - b2) * (dw**2)
    mt = config["m"] / (1 - b1**t)
    vt = config["v"] / (1 - b2**t)
    return w - config["learning_rate"] * mt / (np.sqrt(vt) + config["epsilon"]), config


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1,), (7, 3), (513, 129), (32, 3, 7, 7)])
def test_fused_adam_is_bit_identical_to_numpy(dtype, shape):
    rng = np.random.default_rng(42)
    w_ref = rng.standard_normal(shape).astype(dtype)
    w_fused = w_ref.copy()
    c_ref, c_fused = {"learning_rate": 3e-3}, {"learning_rate": 3e-3}
    for _ in range(4):
        dw = (rng.standard_normal(shape) * 10 ** rng.uniform(-6, 1)).astype(dtype)
        w_ref, c_ref = numpy_adam(w_ref, dw, c_ref)
        out, c_fused = adam_inplace(w_fused, dw, c_fused)
        assert out is w_fused and out.dtype == dtype
        np.testing.assert_array_equal(w_fused, w_ref)
        np.testing.assert_array_equal(c_fused["m"], c_ref["m"])
        np.testing.assert_array_equal(c_fused["v"], c_ref["v"])
    assert c_fused["t"] == 4


def test_adam_non_contiguous_and_mixed_dtypes_fall_back_to_same_formula():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 8)).T  # non-contiguous float64
    dw = rng.standard_normal((8, 6)).astype(np.float32)
    expected, _ = numpy_adam(w.copy(), dw, {})
    got, _ = adam(w, dw, {})
    np.testing.assert_array_equal(got, expected)


def test_adam_shape_mismatch_names_shapes():
    with pytest.raises(ValueError, match=r"w \(3, 4\), dw \(4, 3\)"):
        adam(np.zeros((3, 4)), np.zeros((4, 3)), {})


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(64, 216), (256, 576), (40, 8), (8, 40), (1, 9)])
def test_orthogonalize_brings_the_singular_values_near_one_in_the_callers_dtype(dtype, shape):
    # random Gaussian matrices of these shapes have their singular values within a few times
    # of each other: all of them come into the quintic's band (much smaller ones would not)
    rng = np.random.default_rng(sum(shape))
    g = (rng.standard_normal(shape) * rng.uniform(1e-3, 1e3)).astype(dtype)
    o = orthogonalize(g)
    assert o.dtype == dtype and o.shape == shape and o.flags.c_contiguous
    s = np.linalg.svd(o.astype(np.float64), compute_uv=False)
    assert 0.5 < s.min() and s.max() < 1.5, s  # whatever g's scale
    # the same directions as g's: U V^T's, not some other orthogonal matrix
    u, _, vt = np.linalg.svd(g.astype(np.float64), full_matrices=False)
    assert np.sum(o * (u @ vt)) > 0.6 * min(shape)
    assert np.array_equal(orthogonalize(g), o)  # the same bits again
    assert np.allclose(orthogonalize(g * dtype(8)), o, rtol=1e-4, atol=1e-5)  # scale-free


def test_muon_update_scales_the_filters_then_steps_along_the_orthogonalized_direction():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 3, 3, 3)).astype(np.float32) * 5
    d = rng.standard_normal(w.shape).astype(np.float32)
    new = muon_update(w, d, 0.0)
    assert new.dtype == np.float32 and new.shape == w.shape
    assert np.isclose(np.linalg.norm(new), 4.0, rtol=1e-6)  # sqrt(16 filters)
    assert np.allclose(new, w * (4.0 / np.linalg.norm(w)), rtol=1e-6)
    step = muon_update(w, d, 0.1) - new
    assert np.allclose(step, -0.1 * orthogonalize(d.reshape(16, -1)).reshape(w.shape), atol=1e-6)
    assert np.array_equal(muon_update(np.zeros_like(w), d, 0.0), np.zeros_like(w))  # no 0 / 0
