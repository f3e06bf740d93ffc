"""Networks from a spec: parsing and checking specs (one-line errors naming the layer), ConvNet
against numerical gradients, ThreeLayerConvNet's bits from its spec, BN state, the Solver."""

import numpy as np
import pytest

from pipeline.cnn import ModelSpec, ThreeLayerConvNet
from pipeline.convnet import ConvNet
from pipeline.gradient_check import eval_numerical_gradient
from pipeline.netspec import Layer, NetSpec, NetSpecError
from pipeline.solver import Solver

RICH = (
    "conv 4 3, bn scale=false, gelu, pool 3 stride=1, conv 6 2 stride=2 pad=0, gn 2, relu, gap, "
    "scale 0.5, affine, softmax smoothing=0.2"
)
OTHER = "conv 4 3, relu, conv 4 3, bn momentum=0.6, relu, pool 2, gmp, affine 7, relu, affine"
#: airbench's shape: a 2x2 conv (8 -> 7), pools that leave the last row out (7 -> 3 -> 1)
FLOORED = (
    "scale 0.5, conv 4 2 pad=0, gelu, conv 4 3, pool 2, bn scale=false momentum=0.4 eps=1e-12, "
    "gelu, pool 3, affine, scale 0.111"
)


# ---- specs ---------------------------------------------------------------------------------------


def test_a_spec_reads_from_text_and_tables_and_writes_back_the_same():
    spec = NetSpec.from_text(RICH)
    assert [layer.kind for layer in spec.layers] == [
        "conv", "bn", "gelu", "pool", "conv", "gn", "relu", "gap", "scale", "affine", "softmax"
    ]  # fmt: skip
    assert spec.layers[0] == Layer("conv", filters=4, size=3, pad=1)
    assert spec.layers[3] == Layer("pool", size=3, stride=1)
    assert spec.smoothing == 0.2
    assert NetSpec.from_text(spec.to_text()) == spec
    assert NetSpec.from_dict(spec.to_dict()) == spec
    table = {"layers": ["conv 4 3", {"kind": "BatchNorm", "scale": False}, "linear"]}
    assert NetSpec.from_dict(table).to_text() == "conv 4 3, bn scale=false, affine"
    # aliases, spaces, newlines and a trailing comma read the same; the loss is added
    assert NetSpec.from_text(" Conv 8 5 ,\n maxpool 2, linear ,") == NetSpec.from_text(
        "conv 8 5, pool 2, affine, softmax"
    )


def test_shapes_and_parameter_names_follow_cs231n():
    spec = NetSpec.from_text(OTHER)
    assert spec.shapes((3, 8, 8), 5) == [
        (4, 8, 8), (4, 8, 8), (4, 8, 8), (4, 8, 8), (4, 8, 8), (4, 4, 4), (4,), (7,), (7,), (5,)
    ]  # fmt: skip
    assert spec.param_shapes((3, 8, 8), 5) == {
        "W1": (4, 3, 3, 3), "b1": (4,), "W2": (4, 4, 3, 3), "b2": (4,), "gamma1": (4,),
        "beta1": (4,), "W3": (4, 7), "b3": (7,), "W4": (7, 5), "b4": (5,),
    }  # fmt: skip
    assert NetSpec.from_text(RICH).bn_channels((3, 8, 8), 5) == [4]
    assert "gamma1" not in NetSpec.from_text(RICH).param_shapes((3, 8, 8), 5)


@pytest.mark.parametrize(
    "text, message",
    [
        ("frob 3, affine", r"model layer 1 'frob 3': unknown layer 'frob' \(known: conv, bn,"),
        ("conv, affine", r"layer 1 'conv': conv needs its filters"),
        ("conv 4 3 7, affine", r"conv takes at most 2 positional value\(s\) \(filters, size\)"),
        ("conv 4 3 foo=1, affine", r"conv has no setting 'foo' \(it has filters, size, stride"),
        ("relu 2, affine", r"relu takes no positional value, got '2'"),
        ("pool 2 size=3, affine", "size is given twice"),
        ("conv 0 3, affine", "filters must be >= 1, got 0"),
        ("conv 4.5 3, affine", "filters must be a whole number, got 4.5"),
        ("conv inf 3, affine", "filters must be a whole number, got inf"),
        ("conv 4 nan, affine", "size must be a whole number, got nan"),
        ("bn momentum=2, affine", r"momentum must be in \[0, 1\], got 2.0"),
        ("bn scale=1, affine", "scale must be true or false, got 1"),
        ("affine, softmax smoothing=1", r"smoothing must be in \[0, 1\), got 1.0"),
        ("affine, softmax, affine", "layer 2: softmax is the loss; it comes last"),
        ("conv 4,, affine", "layer 2 '': empty layer"),
        ("", "model: no layers"),
        ("conv 4 3, pool 16, affine", r"layer 2 'pool 16': a 16x16 pool leaves no pixels of a 8x8"),
        ("conv 4 3 stride=2, affine", r"does not tile the input padded by 1 \(10 - 3 is not a"),
        ("conv 4 9 pad=0, affine", "a 9x9 filter does not fit a 8x8 input padded by 0"),
        ("conv 5 3, gn 2, affine", "layer 2 'gn 2': 2 groups do not divide 5 channels"),
        ("conv 4 3, gap, bn, affine", r"layer 3 'bn': needs images \(C, H, W\), got \(4,\)"),
        ("conv 4 3", r"ends with \(4, 8, 8\), expected one score per class \(5,\)"),
        ("conv 24 2 init=wide, affine", "init must be one of default, whiten, dirac, got 'wide'"),
        ("conv 20 2 init=whiten, affine", r"needs 2 x 3 x 2 x 2 = 24 filters .*got 20"),
        ("relu, conv 24 2 init=whiten, affine", "init=whiten is for a first conv on the images"),
        ("conv 4 3, gap, affine 3", r"ends with \(3,\), expected one score per class"),
    ],
)
def test_a_spec_that_cannot_be_built_is_one_line_naming_the_layer(text, message):
    with pytest.raises(NetSpecError, match=message) as err:
        NetSpec.from_text(text).shapes((3, 8, 8), 5)
    assert "\n" not in str(err.value)


# ---- the network ---------------------------------------------------------------------------------


def test_pools_leave_out_the_rows_no_window_covers_as_pytorch_does():
    spec = NetSpec.from_text(FLOORED)
    assert spec.shapes((3, 8, 8), 5)[1:7] == [
        (4, 7, 7), (4, 7, 7), (4, 7, 7), (4, 3, 3), (4, 3, 3), (4, 3, 3)
    ]  # fmt: skip
    assert spec.shapes((3, 8, 8), 5)[7] == (4, 1, 1)
    net = ConvNet("pool 2, affine", input_dim=(1, 3, 3), num_classes=1, dtype=np.float64, seed=0)
    x = np.arange(9.0).reshape(1, 1, 3, 3)
    assert net._forward(x, False)[1][0][0] == "pool"
    # the 3x3 image pooled by one 2x2 window: max of 0, 1, 3, 4; the last row and column unused
    net.params["W1"][:] = 1.0
    assert net.loss(x)[0, 0] == 4.0
    _, grads = net.loss(x, np.array([0]))  # softmax of one class: no gradient, right shape
    assert grads["W1"].shape == (1, 1)


@pytest.mark.parametrize("text", [RICH, OTHER, FLOORED])
def test_convnet_gradients_match_numerical_gradients_float64(text):
    rng = np.random.default_rng(2)
    model = ConvNet(text, input_dim=(3, 8, 8), num_classes=5, dtype=np.float64, reg=0.1, seed=3)
    X = rng.standard_normal((4, 3, 8, 8))
    y = rng.integers(0, 5, 4)
    _, grads = model.loss(X, y)
    assert list(grads) == list(model.params)
    for name, value in model.params.items():
        num = eval_numerical_gradient(lambda _: model.loss(X, y)[0], value, verbose=False, h=1e-6)
        scale = max(np.abs(num).max(), np.abs(grads[name]).max(), 1e-6)
        # b1 feeds a batch norm: its true gradient is zero, both sides are rounding noise
        assert np.abs(num - grads[name]).max() / scale < (1e-2 if name == "b1" else 1e-6), name


@pytest.mark.parametrize(
    "norm, text", [(None, ""), ("spatial_batchnorm", "bn,"), ("groupnorm", "gn 4,")]
)
@pytest.mark.parametrize("reg", [0.0, 0.01])
def test_the_three_layer_spec_computes_three_layer_convnets_bits(norm, text, reg):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((20, 3, 16, 16)).astype(np.float32)
    y = rng.integers(0, 10, 20)
    kw = dict(input_dim=(3, 16, 16), reg=reg, seed=0)
    three = ThreeLayerConvNet(
        num_filters=8, hidden_dim=40, normalization=norm, weight_scale=0.05, **kw
    )
    net = ConvNet(f"conv 8 7, {text} relu, pool 2, affine 40, relu, affine", **kw)
    assert {k: v.shape for k, v in net.params.items()} == {
        k: v.shape for k, v in three.params.items()
    }
    net.params = {k: v.copy() for k, v in three.params.items()}
    loss_a, grads_a = three.loss(X, y)
    loss_b, grads_b = net.loss(X, y)
    assert loss_a == loss_b
    for k in grads_a:
        assert np.array_equal(grads_a[k], grads_b[k]), k
    # a worker's gradient sums, added into its tree node
    into_a = {k: np.ones_like(v) for k, v in three.params.items()}
    into_b = {k: np.ones_like(v) for k, v in three.params.items()}
    three.loss(X, y, into=into_a, scale=np.float32(20), accumulate=True)
    net.loss(X, y, into=into_b, scale=np.float32(20), accumulate=True)
    for k in into_a:
        assert np.array_equal(into_a[k], into_b[k]), k
    if norm == "spatial_batchnorm":
        assert all(
            np.array_equal(three.get_state()[k], net.get_state()[k]) for k in three.get_state()
        )
    assert np.array_equal(three.loss(X), net.loss(X))


def test_bn_state_is_every_bn_layer_concatenated_each_with_its_momentum():
    net = ConvNet(
        "conv 4 3, bn momentum=0.5, relu, conv 6 3, bn, gap, affine", input_dim=(3, 6, 6), seed=0
    )
    assert net.bn_channels == [4, 6] and net.get_state()["running_mean"].shape == (10,)
    X = np.random.default_rng(0).standard_normal((8, 3, 6, 6)).astype(np.float32)
    net.loss(X, np.arange(8) % 10)
    mean, var = net.last_batch_stats["mean"], net.last_batch_stats["var"]
    assert mean.shape == var.shape == (10,) and var.all()
    state = net.get_state()
    np.testing.assert_allclose(state["running_mean"][:4], 0.5 * mean[:4], rtol=1e-6)
    np.testing.assert_allclose(state["running_mean"][4:], 0.1 * mean[4:], rtol=1e-6)
    # test mode uses the running statistics: set them and the scores follow
    other = ConvNet(net.spec, input_dim=(3, 6, 6), seed=0)
    other.params = net.params
    assert not np.array_equal(other.loss(X), net.loss(X))
    other.set_state(state)
    assert np.array_equal(other.loss(X), net.loss(X))
    with pytest.raises(ValueError, match=r"running_mean must have shape \(10,\), got \(4,\)"):
        other.set_state({"running_mean": np.zeros(4), "running_var": np.zeros(4)})


def test_the_same_seed_draws_the_same_weights_without_touching_numpys_global_state():
    np.random.seed(5)
    before = np.random.get_state()[1].copy()
    a = ConvNet(OTHER, input_dim=(3, 8, 8), num_classes=5, seed=7)
    b = ModelSpec(0, 0, 0, 5, "none", 1, "float32", (3, 8, 8), layers=OTHER).build(seed=7)
    assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)
    assert np.array_equal(np.random.get_state()[1], before)
    bound = 1 / np.sqrt(4 * 3 * 3)  # PyTorch's default: uniform in +-1 / sqrt(fan_in)
    assert np.abs(a.params["W2"]).max() <= bound
    assert abs(a.params["W2"].std() - bound / np.sqrt(3)) < 0.02
    assert b.params["W1"].dtype == np.float32


def test_the_solver_trains_a_convnet_past_chance():
    rng = np.random.default_rng(0)
    patterns = rng.standard_normal((4, 3, 8, 8))
    y = rng.integers(0, 4, 200)
    X = (patterns[y] + 0.5 * rng.standard_normal((200, 3, 8, 8))).astype(np.float32)
    data = {"X_train": X[:160], "y_train": y[:160], "X_val": X[160:], "y_val": y[160:]}
    spec = "conv 8 3, bn momentum=0.5, gelu, pool 2, affine"
    model = ConvNet(spec, input_dim=(3, 8, 8), num_classes=4, seed=0)
    solver = Solver(model, data, num_epochs=4, batch_size=20, update_rule="adam",
                    optim_config={"learning_rate": 1e-2}, verbose=False)  # fmt: skip
    solver.train()
    assert solver.val_acc_history[-1] > 0.9, solver.val_acc_history


# ---- patch whitening -----------------------------------------------------------------------------


def test_whitening_filters_decorrelate_the_patches_of_their_images():
    from pipeline.convnet import whitening_filters

    rng = np.random.default_rng(0)
    mix = rng.standard_normal((3, 3)) + 2 * np.eye(3)  # correlated channels
    x = np.einsum("ij,njhw->nihw", mix, rng.standard_normal((40, 3, 9, 9)))
    w = whitening_filters(x, 2, eps=0.0)
    assert w.shape == (24, 3, 2, 2)
    np.testing.assert_array_equal(w[12:], -w[:12])
    patches = np.lib.stride_tricks.sliding_window_view(x, (2, 2), axis=(2, 3))
    patches = patches.transpose(0, 2, 3, 1, 4, 5).reshape(-1, 12)
    out = patches @ w[:12].reshape(12, -1).T
    np.testing.assert_allclose(out.T @ out / len(out), np.eye(12), atol=1e-8)
    assert np.array_equal(whitening_filters(x, 2), whitening_filters(x.copy(), 2))


def test_a_whitening_conv_is_set_from_the_images_and_never_trains():
    spec = "scale 0.5, conv 24 2 pad=0 init=whiten, relu, pool 2, affine"
    net = ConvNet(spec, input_dim=(3, 8, 8), num_classes=3, reg=0.1, seed=0, dtype=np.float64)
    assert net.frozen == {"W1"}
    X = np.random.default_rng(1).standard_normal((10, 3, 8, 8))
    net.whiten(X)
    from pipeline.convnet import whitening_filters

    np.testing.assert_array_equal(net.params["W1"], whitening_filters(0.5 * X, 2))
    loss, grads = net.loss(X, np.arange(10) % 3)
    assert not grads["W1"].any() and grads["b1"].any() and grads["W2"].any()
    # its weights are not in the L2 term
    net.reg = 0.0
    plain, _ = net.loss(X, np.arange(10) % 3)
    assert loss - plain == pytest.approx(0.5 * 0.1 * np.sum(net.params["W2"] ** 2))


@pytest.mark.parametrize("into", [False, True])
def test_a_frozen_whitening_bias_stops_the_backward_pass_above_it(monkeypatch, into):
    # airbench trains the whitening conv's bias for its first epochs only; after them
    # (loss(frozen={"b1"})) nothing below the first 3x3 conv needs a gradient: its dx is not
    # computed, the whitening conv's gradients are zeros, every other gradient is unchanged
    import pipeline.convnet as convnet

    spec = "scale 0.5, conv 24 2 pad=0 init=whiten, gelu, conv 6 3, bn, relu, pool 2, affine"
    net = ConvNet(spec, input_dim=(3, 9, 9), num_classes=3, reg=0.1, seed=0, dtype=np.float64)
    assert net.whiten_biases == ("b1",)
    X = np.random.default_rng(1).standard_normal((10, 3, 9, 9))
    y = np.arange(10) % 3
    net.whiten(X)
    calls = []
    real = convnet.fl.conv_backward_fast

    def spy(dout, cache, need_dx=True):
        calls.append((dout.shape[1], need_dx))
        return real(dout, cache, need_dx)

    monkeypatch.setattr(convnet.fl, "conv_backward_fast", spy)

    def grads(**frozen):
        if not into:
            return net.loss(X, y, **frozen)
        out = {k: np.full_like(v, np.nan) for k, v in net.params.items()}
        loss, _ = net.loss(X, y, into=out, scale=2.0, **frozen)
        return loss, out

    loss, full = grads()
    assert calls == [(6, True), (24, False)] and full["b1"].any()
    calls.clear()
    loss_frozen, part = grads(frozen={"b1"})
    assert calls == [(6, False)]  # the whitening conv's own backward is skipped too
    assert loss_frozen == loss
    assert not part["W1"].any() and not part["b1"].any()
    for k in net.params:
        if k not in ("W1", "b1"):
            np.testing.assert_array_equal(part[k], full[k], err_msg=k)
    with pytest.raises(ValueError, match=r"no such parameters \['1', 'b'\]"):
        net.loss(X, y, frozen="b1")  # a name, not a set of names


def test_a_dirac_conv_passes_its_first_channels_through():
    net = ConvNet("conv 5 3 init=dirac, gap, affine", input_dim=(3, 6, 6), num_classes=2, seed=0)
    w = net.params["W1"]
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)
    from pipeline.fast_layers import conv_forward_fast

    out, _ = conv_forward_fast(x, w, net.params["b1"], {"stride": 1, "pad": 1})
    np.testing.assert_array_equal(out[:, :3], x)  # filters 0-2: channels 0-2 unchanged
    assert np.abs(w[3:]).max() > 0  # the other filters keep their default draws
    narrow = ConvNet("conv 2 3 init=dirac, gap, affine", input_dim=(3, 6, 6), seed=0)
    assert narrow.params["W1"][:, :, 1, 1].tolist() == [[1, 0, 0], [0, 1, 0]]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_bn_with_frozen_scale_is_batch_norm_with_gamma_pinned_at_one(dtype):
    """airbench's BN (scale=false): no gamma parameter, the same scores, gradients and running
    statistics as a BN whose gamma is one (its gradient aside), in train and test mode."""
    frozen = ConvNet(
        "conv 4 3, bn scale=false momentum=0.6, gelu, gap, affine", (3, 6, 6), 3, dtype=dtype
    )
    free = ConvNet("conv 4 3, bn momentum=0.6, gelu, gap, affine", (3, 6, 6), 3, dtype=dtype)
    assert set(free.params) - set(frozen.params) == {"gamma1"}
    for k in frozen.params:
        free.params[k] = frozen.params[k].copy()
    free.params["gamma1"] = np.ones(4, dtype=dtype)
    rng = np.random.default_rng(1)
    X = rng.standard_normal((5, 3, 6, 6)).astype(dtype)
    y = rng.integers(0, 3, 5)
    (loss_a, grads_a), (loss_b, grads_b) = frozen.loss(X, y), free.loss(X, y)
    assert loss_a == loss_b and set(grads_b) - set(grads_a) == {"gamma1"}
    for k in grads_a:
        assert grads_a[k].dtype == dtype and np.array_equal(grads_a[k], grads_b[k]), k
    for k in ("running_mean", "running_var"):
        assert np.array_equal(frozen.bn_param[k], free.bn_param[k]), k
    assert np.array_equal(frozen.loss(X), free.loss(X))  # test mode: the running statistics


def test_a_network_without_parameters_still_has_a_loss():
    net = ConvNet("gap", input_dim=(5, 4, 4), num_classes=5, seed=0)
    X = np.random.default_rng(0).standard_normal((3, 5, 4, 4)).astype(np.float32)
    loss, grads = net.loss(X, np.array([0, 1, 2]))
    assert grads == {} and np.isfinite(loss)
