"""Naive reference layers, norms and losses with the cs231n assignment-2 API.

Every layer is a pair ``*_forward(...) -> (out, cache)`` and ``*_backward(dout, cache) ->
grads``. These are the readable reference implementations; ``pipeline.fast_layers`` holds the
Numba kernels and is checked against them.

Conventions shared by every function here:

- dtype: ``out`` and ``dx`` keep the dtype of ``x`` (float32 in, float32 out, float16 in,
  float16 out; a non-floating ``x`` is computed in float64: ``pipeline.shapes.layer_dtype``,
  the fast layers' rule too); a parameter's gradient (``dw``, ``db``, ``dgamma``, ``dbeta``)
  keeps that parameter's dtype. Caches hold arrays in those same dtypes.
- Inputs are never modified. The only object written to is the ``bn_param`` dict, whose
  ``running_mean`` / ``running_var`` entries are replaced by new arrays in train mode, as
  cs231n does.
- Bad parameters raise ``ValueError`` naming the parameter and the values it got (the checks
  shared with the fast layers live in ``pipeline.shapes``).
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.shapes import (
    check_bn_mode,
    check_dout,
    check_eps,
    check_groups,
    check_momentum,
    check_param_shape,
    check_per_channel,
    conv_output_shape,
    layer_dtype,
    pool_output_shape,
    require_ndim,
    running_average,
)

__all__ = [
    "affine_forward",
    "affine_backward",
    "relu_forward",
    "relu_backward",
    "gelu_forward",
    "gelu_backward",
    "global_avg_pool_forward",
    "global_avg_pool_backward",
    "global_max_pool_forward",
    "global_max_pool_backward",
    "softmax_loss",
    "svm_loss",
    "batchnorm_forward",
    "batchnorm_backward",
    "batchnorm_backward_alt",
    "layernorm_forward",
    "layernorm_backward",
    "dropout_forward",
    "dropout_backward",
    "conv_forward_naive",
    "conv_backward_naive",
    "max_pool_forward_naive",
    "max_pool_backward_naive",
    "spatial_batchnorm_forward",
    "spatial_batchnorm_backward",
    "spatial_groupnorm_forward",
    "spatial_groupnorm_backward",
]


# --------------------------------------------------------------------------------------------
# helpers


def _as_float(a, dtype=None) -> np.ndarray:
    """``a`` as an array of ``dtype`` (default: its own float dtype),
    without copying if possible."""
    a = np.asarray(a)
    return a.astype(dtype if dtype is not None else layer_dtype(a), copy=False)


# --------------------------------------------------------------------------------------------
# affine, relu


def affine_forward(x, w, b):
    """Affine (fully connected) layer forward pass.

    Inputs:
    - x: array of shape (N, d_1, ..., d_k); each example is reshaped to a vector of
      dimension D = d_1 * ... * d_k
    - w: weights, shape (D, M)
    - b: biases, shape (M,)

    Returns a tuple of:
    - out: output, shape (N, M), dtype of x
    - cache: (x, w, b)
    """
    x = np.asarray(x)
    w = np.asarray(w)
    b = np.asarray(b)
    if x.ndim < 1:
        raise ValueError(f"x must have a leading batch dimension N, got shape {x.shape}")
    require_ndim("w", w, 2, "(D, M)")
    N = x.shape[0]
    D = int(np.prod(x.shape[1:], dtype=np.int64))
    if w.shape[0] != D:
        raise ValueError(
            f"dimension mismatch: x of shape {x.shape} flattens to D={D} per example "
            f"but w has shape {w.shape} (expects D={w.shape[0]})"
        )
    check_param_shape("b", b, (w.shape[1],))
    dtype = layer_dtype(x)
    out = (x.reshape(N, D) @ w + b).astype(dtype, copy=False)
    return out, (x, w, b)


def affine_backward(dout, cache):
    """Affine layer backward pass.

    Inputs:
    - dout: upstream derivative, shape (N, M)
    - cache: (x, w, b) from affine_forward

    Returns a tuple of:
    - dx: gradient w.r.t. x, shape (N, d_1, ..., d_k), dtype of x
    - dw: gradient w.r.t. w, shape (D, M), dtype of w
    - db: gradient w.r.t. b, shape (M,), dtype of b
    """
    x, w, b = cache
    N = x.shape[0]
    dout = check_dout(dout, (N, w.shape[1]), "affine")
    x2 = x.reshape(N, -1)
    dx = (dout @ w.T).reshape(x.shape).astype(layer_dtype(x), copy=False)
    dw = (x2.T @ dout).astype(layer_dtype(w), copy=False)
    db = dout.sum(axis=0).astype(layer_dtype(b), copy=False)
    return dx, dw, db


def relu_forward(x):
    """Rectified linear unit forward pass.

    Input:
    - x: array of any shape

    Returns a tuple of:
    - out: max(x, 0), same shape and dtype as x
    - cache: x
    """
    x = np.asarray(x)
    out = np.maximum(x, 0).astype(layer_dtype(x), copy=False)
    return out, x


def relu_backward(dout, cache):
    """Rectified linear unit backward pass.

    Input:
    - dout: upstream derivatives, same shape as x
    - cache: x from relu_forward

    Returns:
    - dx: gradient w.r.t. x, same shape and dtype as x
    """
    x = cache
    dout = check_dout(dout, x.shape, "relu")
    return np.where(x > 0, dout, 0).astype(layer_dtype(x), copy=False)


def gelu_forward(x):
    """Gaussian error linear unit forward pass (the exact form, with erf, as PyTorch's default).

    Input:
    - x: array of any shape

    Returns a tuple of:
    - out: x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt(2))), same shape and dtype as x
    - cache: x
    """
    x = np.asarray(x)
    dtype = layer_dtype(x)
    x64 = x.astype(np.float64)
    out = 0.5 * x64 * (1.0 + _erf(x64 / np.sqrt(2.0)))
    return out.astype(dtype), x


def gelu_backward(dout, cache):
    """Gaussian error linear unit backward pass.

    Input:
    - dout: upstream derivatives, same shape as x
    - cache: x from gelu_forward

    Returns:
    - dx: dout * (Phi(x) + x * phi(x)), same shape and dtype as x
    """
    x = cache
    dout = check_dout(dout, x.shape, "gelu")
    x64 = x.astype(np.float64)
    cdf = 0.5 * (1.0 + _erf(x64 / np.sqrt(2.0)))
    pdf = np.exp(-0.5 * x64 * x64) / np.sqrt(2.0 * np.pi)
    return (dout.astype(np.float64) * (cdf + x64 * pdf)).astype(layer_dtype(x))


def _erf(x):
    """erf elementwise in float64 (math.erf: NumPy has none)."""
    return np.vectorize(math.erf, otypes=[np.float64])(x)


def global_avg_pool_forward(x):
    """Global average pooling forward pass: each channel's mean over its H x W values.

    Input:
    - x: input data, shape (N, C, H, W)

    Returns a tuple of:
    - out: shape (N, C), dtype of x
    - cache: (shape of x, dtype of x)
    """
    x = np.asarray(x)
    require_ndim("x", x, 4, "(N, C, H, W)")
    dtype = layer_dtype(x)
    return x.astype(np.float64).mean(axis=(2, 3)).astype(dtype), (x.shape, dtype)


def global_avg_pool_backward(dout, cache):
    """Global average pooling backward pass.

    Inputs:
    - dout: upstream derivatives, shape (N, C)
    - cache: from global_avg_pool_forward

    Returns:
    - dx: dout / (H * W) at every position, shape (N, C, H, W), dtype of x
    """
    shape, dtype = cache
    dout = check_dout(dout, shape[:2], "global average pool")
    dx = np.broadcast_to((dout / (shape[2] * shape[3]))[:, :, None, None], shape)
    return dx.astype(dtype)


def global_max_pool_forward(x):
    """Global max pooling forward pass: each channel's maximum over its H x W values.

    Input:
    - x: input data, shape (N, C, H, W)

    Returns a tuple of:
    - out: shape (N, C), dtype of x
    - cache: (shape of x, dtype of x, the flat position of each first maximum (N, C))
    """
    x = np.asarray(x)
    require_ndim("x", x, 4, "(N, C, H, W)")
    N, C = x.shape[:2]
    flat = x.reshape(N, C, -1)
    where = flat.argmax(axis=2)
    out = np.take_along_axis(flat, where[:, :, None], axis=2)[:, :, 0]
    return out.astype(layer_dtype(x)), (x.shape, layer_dtype(x), where)


def global_max_pool_backward(dout, cache):
    """Global max pooling backward pass.

    Inputs:
    - dout: upstream derivatives, shape (N, C)
    - cache: from global_max_pool_forward

    Returns:
    - dx: dout at each channel's first maximum, zero elsewhere, shape (N, C, H, W), dtype of x
    """
    shape, dtype, where = cache
    dout = check_dout(dout, shape[:2], "global max pool")
    N, C = shape[:2]
    dx = np.zeros((N, C, shape[2] * shape[3]), dtype=dtype)
    np.put_along_axis(dx, where[:, :, None], dout[:, :, None].astype(dtype), axis=2)
    return dx.reshape(shape)


# --------------------------------------------------------------------------------------------
# losses


def _check_labels(x, y):
    x = np.asarray(x)
    y = np.asarray(y)
    require_ndim("x", x, 2, "(N, C) of class scores")
    N, C = x.shape
    if y.shape != (N,):
        raise ValueError(
            f"y must have shape (N,) = ({N},) to match x of shape {x.shape}, got {y.shape}"
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
    if N and (y.min() < 0 or y.max() >= C):
        raise ValueError(
            f"y labels must lie in [0, {C - 1}] for C={C} classes, got range [{y.min()}, {y.max()}]"
        )
    return x, y


def svm_loss(x, y):
    """Multiclass SVM (hinge, margin 1) loss and gradient.

    Inputs:
    - x: scores, shape (N, C); x[i, j] is the score of class j for the i-th input
    - y: labels, shape (N,); y[i] is the label of x[i], 0 <= y[i] < C

    Returns a tuple of:
    - loss: scalar (mean over the N examples)
    - dx: gradient of the loss w.r.t. x, shape (N, C), dtype of x
    """
    x, y = _check_labels(x, y)
    dtype = layer_dtype(x)
    N = x.shape[0]
    rows = np.arange(N)
    correct = x[rows, y][:, None]
    margins = np.maximum(0, x - correct + 1.0)
    margins[rows, y] = 0
    loss = margins.sum() / N
    positive = (margins > 0).astype(dtype)
    positive[rows, y] = -positive.sum(axis=1)
    dx = (positive / N).astype(dtype, copy=False)
    return dtype.type(loss), dx


def softmax_loss(x, y, smoothing=0.0):
    """Softmax (cross-entropy) loss and gradient, optionally with label smoothing.

    Inputs:
    - x: scores, shape (N, C); x[i, j] is the score of class j for the i-th input
    - y: labels, shape (N,); y[i] is the label of x[i], 0 <= y[i] < C
    - smoothing: label smoothing s in [0, 1): the target puts 1 - s on the label and s / C on
      every class (PyTorch's ``label_smoothing``); 0 is the plain cross-entropy

    Returns a tuple of:
    - loss: scalar (mean over the N examples)
    - dx: gradient of the loss w.r.t. x, shape (N, C), dtype of x
    """
    x, y = _check_labels(x, y)
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r}")
    dtype = layer_dtype(x)
    N = x.shape[0]
    shifted = x - x.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(N)
    if smoothing:
        C = x.shape[1]
        target = np.full(x.shape, smoothing / C)
        target[rows, y] += 1.0 - smoothing
        loss = -(target * log_probs).sum() / N
        dx = ((np.exp(log_probs) - target) / N).astype(dtype, copy=False)
        return dtype.type(loss), dx
    loss = -log_probs[rows, y].sum() / N
    dx = np.exp(log_probs)
    dx[rows, y] -= 1
    dx = (dx / N).astype(dtype, copy=False)
    return dtype.type(loss), dx


# --------------------------------------------------------------------------------------------
# batch norm, layer norm


def batchnorm_forward(x, gamma, beta, bn_param):
    """Batch normalization forward pass.

    In train mode the minibatch mean and (biased) variance normalize the data and update the
    running averages
        running_mean = momentum * running_mean + (1 - momentum) * sample_mean
        running_var = momentum * running_var + (1 - momentum) * sample_var
    which test mode uses instead.

    Inputs:
    - x: data, shape (N, D)
    - gamma: scale, shape (D,)
    - beta: shift, shape (D,)
    - bn_param: dict with keys
      - mode: 'train' or 'test' (required)
      - eps: constant for numeric stability (default 1e-5)
      - momentum: constant for the running averages, in [0, 1] (default 0.9)
      - running_mean: shape (D,), running mean of the features (default zeros)
      - running_var: shape (D,), running variance of the features (default zeros)

    Returns a tuple of:
    - out: shape (N, D), dtype of x
    - cache: values needed by the backward pass (None in test mode)
    """
    x = np.asarray(x)
    require_ndim("x", x, 2, "(N, D)")
    N, D = x.shape
    check_param_shape("gamma", gamma, (D,))
    check_param_shape("beta", beta, (D,))
    mode = check_bn_mode(bn_param.get("mode"))
    eps = check_eps("bn_param", bn_param.get("eps", 1e-5))
    momentum = check_momentum("bn_param['momentum']", bn_param.get("momentum", 0.9))
    dtype = layer_dtype(x)
    x = _as_float(x, dtype)
    running_mean = _as_float(bn_param.get("running_mean", np.zeros(D, dtype=dtype)), dtype)
    running_var = _as_float(bn_param.get("running_var", np.zeros(D, dtype=dtype)), dtype)
    check_param_shape("bn_param['running_mean']", running_mean, (D,))
    check_param_shape("bn_param['running_var']", running_var, (D,))
    g = _as_float(gamma, dtype)
    bt = _as_float(beta, dtype)

    if mode == "train":
        if N < 1:
            raise ValueError(
                f"batch norm in train mode needs N >= 1 examples, got x of shape {x.shape}"
            )
        mu = x.mean(axis=0)
        xc = x - mu
        var = (xc * xc).mean(axis=0)
        std = np.sqrt(var + eps)
        xhat = xc / std
        out = g * xhat + bt
        bn_param["running_mean"] = running_average(running_mean, mu, momentum, dtype)
        bn_param["running_var"] = running_average(running_var, var, momentum, dtype)
        cache = (xhat, xc, std, np.asarray(gamma), np.asarray(beta))
    else:
        out = g * ((x - running_mean) / np.sqrt(running_var + eps)) + bt
        bn_param["running_mean"] = running_mean
        bn_param["running_var"] = running_var
        cache = None
    return out.astype(dtype, copy=False), cache


def _bn_param_grads(dout, xhat, gamma, beta, axes):
    dgamma = (dout * xhat).sum(axis=axes).astype(layer_dtype(gamma), copy=False)
    dbeta = dout.sum(axis=axes).astype(layer_dtype(beta), copy=False)
    return dgamma, dbeta


def batchnorm_backward(dout, cache):
    """Batch normalization backward pass, through the computational graph step by step.

    Inputs:
    - dout: upstream derivatives, shape (N, D)
    - cache: from batchnorm_forward in train mode

    Returns a tuple of:
    - dx: gradient w.r.t. x, shape (N, D), dtype of x
    - dgamma: gradient w.r.t. gamma, shape (D,)
    - dbeta: gradient w.r.t. beta, shape (D,)
    """
    if cache is None:
        raise ValueError(
            "batchnorm_backward needs the cache of a forward pass in bn_param['mode']='train'"
        )
    xhat, xc, std, gamma, beta = cache
    dout = check_dout(dout, xhat.shape, "batchnorm")
    dtype = xhat.dtype
    N = xhat.shape[0]
    dgamma, dbeta = _bn_param_grads(dout, xhat, gamma, beta, 0)
    # out = gamma * xhat + beta ; xhat = xc * istd ; istd = 1 / std ; std = sqrt(var + eps)
    # var = mean(xc**2) ; xc = x - mu ; mu = mean(x)
    dxhat = dout * gamma
    istd = 1.0 / std
    dxc = dxhat * istd
    distd = (dxhat * xc).sum(axis=0)
    dstd = -distd / (std * std)
    dvar = dstd * 0.5 / std
    dxc = dxc + 2.0 * xc * dvar / N
    dmu = -dxc.sum(axis=0)
    dx = dxc + dmu / N
    return dx.astype(dtype, copy=False), dgamma, dbeta


def batchnorm_backward_alt(dout, cache):
    """Batch normalization backward pass, from the simplified closed form.

    dx = gamma / (N * std) * (N * dout - sum(dout) - xhat * sum(dout * xhat))

    Same inputs and outputs as batchnorm_backward.
    """
    if cache is None:
        raise ValueError(
            "batchnorm_backward_alt needs the cache of a forward pass in bn_param['mode']='train'"
        )
    xhat, xc, std, gamma, beta = cache
    dout = check_dout(dout, xhat.shape, "batchnorm")
    dtype = xhat.dtype
    N = xhat.shape[0]
    dgamma = (dout * xhat).sum(axis=0)
    dbeta = dout.sum(axis=0)
    dx = (gamma / (N * std)) * (N * dout - dbeta - xhat * dgamma)
    return (
        dx.astype(dtype, copy=False),
        dgamma.astype(layer_dtype(gamma), copy=False),
        dbeta.astype(layer_dtype(beta), copy=False),
    )


def layernorm_forward(x, gamma, beta, ln_param):
    """Layer normalization forward pass: each example normalized over its D features.

    Inputs:
    - x: data, shape (N, D)
    - gamma: scale, shape (D,)
    - beta: shift, shape (D,)
    - ln_param: dict with key 'eps' (default 1e-5)

    Returns a tuple of:
    - out: shape (N, D), dtype of x
    - cache: values needed by the backward pass
    """
    x = np.asarray(x)
    require_ndim("x", x, 2, "(N, D)")
    N, D = x.shape
    check_param_shape("gamma", gamma, (D,))
    check_param_shape("beta", beta, (D,))
    if D < 1:
        raise ValueError(f"layer norm needs D >= 1 features, got x of shape {x.shape}")
    eps = check_eps("ln_param", ln_param.get("eps", 1e-5))
    dtype = layer_dtype(x)
    x = _as_float(x, dtype)
    mu = x.mean(axis=1, keepdims=True)
    xc = x - mu
    std = np.sqrt((xc * xc).mean(axis=1, keepdims=True) + eps)
    xhat = xc / std
    out = _as_float(gamma, dtype) * xhat + _as_float(beta, dtype)
    return out.astype(dtype, copy=False), (xhat, std, np.asarray(gamma), np.asarray(beta))


def layernorm_backward(dout, cache):
    """Layer normalization backward pass.

    Inputs:
    - dout: upstream derivatives, shape (N, D)
    - cache: from layernorm_forward

    Returns a tuple of:
    - dx: gradient w.r.t. x, shape (N, D), dtype of x
    - dgamma: gradient w.r.t. gamma, shape (D,)
    - dbeta: gradient w.r.t. beta, shape (D,)
    """
    xhat, std, gamma, beta = cache
    dout = check_dout(dout, xhat.shape, "layernorm")
    D = xhat.shape[1]
    dgamma, dbeta = _bn_param_grads(dout, xhat, gamma, beta, 0)
    dxhat = dout * gamma
    dx = (
        D * dxhat
        - dxhat.sum(axis=1, keepdims=True)
        - xhat * (dxhat * xhat).sum(axis=1, keepdims=True)
    ) / (D * std)
    return dx.astype(xhat.dtype, copy=False), dgamma, dbeta


# --------------------------------------------------------------------------------------------
# dropout


def dropout_forward(x, dropout_param):
    """Inverted dropout forward pass.

    Inputs:
    - x: data, of any shape
    - dropout_param: dict with keys
      - p: probability of KEEPING each neuron output, 0 < p <= 1 (required)
      - mode: 'test' returns the input unchanged; 'train' applies dropout (required)
      - seed: seed for the mask (optional, for gradient checks); a given seed draws the same
        mask as np.random.seed(seed); np.random.rand(*x.shape), without touching the global
        random state

    Outputs:
    - out: same shape and dtype as x; in train mode kept values are scaled by 1 / p so the
      expected output equals the input
    - cache: (dropout_param, mask); mask is None in test mode
    """
    x = np.asarray(x)
    p = dropout_param.get("p")
    if p is None or not (0 < p <= 1):
        raise ValueError(
            f"dropout_param['p'] (keep probability) must satisfy 0 < p <= 1, got {p!r}"
        )
    mode = dropout_param.get("mode")
    if mode not in ("train", "test"):
        raise ValueError(f"dropout_param['mode'] must be 'train' or 'test', got {mode!r}")
    dtype = layer_dtype(x)
    if mode == "train":
        seed = dropout_param.get("seed")
        rand = np.random.RandomState(seed).rand if seed is not None else np.random.rand
        mask = ((rand(*x.shape) < p) / p).astype(dtype)
        out = (x * mask).astype(dtype, copy=False)
    else:
        mask = None
        out = x.astype(dtype, copy=True)
    return out, (dropout_param, mask)


def dropout_backward(dout, cache):
    """Inverted dropout backward pass.

    Inputs:
    - dout: upstream derivatives, same shape as x
    - cache: (dropout_param, mask) from dropout_forward

    Returns:
    - dx: gradient w.r.t. x, same shape as dout (dtype of x in train mode)
    """
    dropout_param, mask = cache
    if dropout_param["mode"] == "train":
        dout = check_dout(dout, mask.shape, "dropout")
        return (dout * mask).astype(mask.dtype, copy=False)
    return np.array(dout, copy=True)


# --------------------------------------------------------------------------------------------
# convolution, max pooling


def conv_forward_naive(x, w, b, conv_param):
    """Naive convolution (cross-correlation) forward pass.

    The input has N data points of C channels, height H and width W; each is convolved with F
    filters spanning all C channels, of height HH and width WW.

    Input:
    - x: input data, shape (N, C, H, W)
    - w: filter weights, shape (F, C, HH, WW)
    - b: biases, shape (F,)
    - conv_param: dict with keys
      - 'stride': pixels between adjacent receptive fields, horizontally and vertically (>= 1)
      - 'pad': zero-padding on every side of the input (>= 0), applied symmetrically

    During padding 'pad' zeros are placed symmetrically along the height and width axes;
    x itself is not modified.

    Returns a tuple of:
    - out: output data, shape (N, F, H', W'), dtype of x, where
      H' = 1 + (H + 2 * pad - HH) / stride
      W' = 1 + (W + 2 * pad - WW) / stride
    - cache: (x, w, b, conv_param)
    """
    x = np.asarray(x)
    w = np.asarray(w)
    b = np.asarray(b)
    require_ndim("x", x, 4, "(N, C, H, W)")
    require_ndim("w", w, 4, "(F, C, HH, WW)")
    N, F, H_out, W_out = conv_output_shape(x.shape, w.shape, conv_param)
    check_param_shape("b", b, (F,))
    stride, pad = int(conv_param.get("stride", 1)), int(conv_param.get("pad", 0))
    _, _, HH, WW = w.shape
    dtype = layer_dtype(x)

    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out = np.empty((N, F, H_out, W_out), dtype=dtype)
    for i in range(H_out):
        hs = i * stride
        for j in range(W_out):
            ws = j * stride
            window = xp[:, :, hs : hs + HH, ws : ws + WW]  # (N, C, HH, WW)
            out[:, :, i, j] = np.tensordot(window, w, axes=([1, 2, 3], [1, 2, 3])) + b
    return out, (x, w, b, conv_param)


def conv_backward_naive(dout, cache):
    """Naive convolution backward pass.

    Inputs:
    - dout: upstream derivatives, shape (N, F, H', W')
    - cache: (x, w, b, conv_param) as in conv_forward_naive

    Returns a tuple of:
    - dx: gradient w.r.t. x, shape (N, C, H, W), dtype of x
    - dw: gradient w.r.t. w, shape (F, C, HH, WW), dtype of w
    - db: gradient w.r.t. b, shape (F,), dtype of b
    """
    x, w, b, conv_param = cache
    N, F, H_out, W_out = conv_output_shape(x.shape, w.shape, conv_param)
    dout = check_dout(dout, (N, F, H_out, W_out), "conv")
    stride, pad = int(conv_param.get("stride", 1)), int(conv_param.get("pad", 0))
    _, C, H, W = x.shape
    _, _, HH, WW = w.shape
    acc = np.result_type(layer_dtype(x), layer_dtype(w), dout.dtype)

    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad))).astype(acc, copy=False)
    dxp = np.zeros_like(xp, dtype=acc)
    dw = np.zeros(w.shape, dtype=acc)
    for i in range(H_out):
        hs = i * stride
        for j in range(W_out):
            ws = j * stride
            d = dout[:, :, i, j]  # (N, F)
            dw += np.tensordot(d, xp[:, :, hs : hs + HH, ws : ws + WW], axes=([0], [0]))
            dxp[:, :, hs : hs + HH, ws : ws + WW] += np.tensordot(d, w, axes=([1], [0]))
    dx = dxp[:, :, pad : pad + H, pad : pad + W]
    db = dout.sum(axis=(0, 2, 3))
    return (
        np.ascontiguousarray(dx, dtype=layer_dtype(x)),
        dw.astype(layer_dtype(w), copy=False),
        db.astype(layer_dtype(b), copy=False),
    )


def max_pool_forward_naive(x, pool_param):
    """Naive max-pooling forward pass.

    Inputs:
    - x: input data, shape (N, C, H, W)
    - pool_param: dict with keys
      - 'pool_height': height of each pooling region (>= 1)
      - 'pool_width': width of each pooling region (>= 1)
      - 'stride': distance between adjacent pooling regions (>= 1)

    No padding is necessary here.

    Returns a tuple of:
    - out: output data, shape (N, C, H', W'), dtype of x, where
      H' = 1 + (H - pool_height) / stride
      W' = 1 + (W - pool_width) / stride
    - cache: (x, pool_param)
    """
    x = np.asarray(x)
    require_ndim("x", x, 4, "(N, C, H, W)")
    N, C, H_out, W_out = pool_output_shape(x.shape, pool_param)
    ph = int(pool_param.get("pool_height", 2))
    pw = int(pool_param.get("pool_width", 2))
    stride = int(pool_param.get("stride", 2))
    out = np.empty((N, C, H_out, W_out), dtype=layer_dtype(x))
    for i in range(H_out):
        hs = i * stride
        for j in range(W_out):
            ws = j * stride
            out[:, :, i, j] = x[:, :, hs : hs + ph, ws : ws + pw].max(axis=(2, 3))
    return out, (x, pool_param)


def max_pool_backward_naive(dout, cache):
    """Naive max-pooling backward pass.

    Each output's gradient goes to the position of its window's maximum; where several values
    tie for the maximum, to the first in row-major order (as numpy's argmax and PyTorch do).
    Gradients of overlapping windows add up.

    Inputs:
    - dout: upstream derivatives, shape (N, C, H', W')
    - cache: (x, pool_param) as in the forward pass

    Returns:
    - dx: gradient w.r.t. x, shape (N, C, H, W), dtype of x
    """
    x, pool_param = cache
    N, C, H_out, W_out = pool_output_shape(x.shape, pool_param)
    dout = check_dout(dout, (N, C, H_out, W_out), "max pool")
    ph = int(pool_param.get("pool_height", 2))
    pw = int(pool_param.get("pool_width", 2))
    stride = int(pool_param.get("stride", 2))
    dx = np.zeros(x.shape, dtype=layer_dtype(x))
    n_idx, c_idx = np.meshgrid(np.arange(N), np.arange(C), indexing="ij")
    for i in range(H_out):
        hs = i * stride
        for j in range(W_out):
            ws = j * stride
            window = x[:, :, hs : hs + ph, ws : ws + pw].reshape(N, C, ph * pw)
            k = window.argmax(axis=2)
            dx[n_idx, c_idx, hs + k // pw, ws + k % pw] += dout[:, :, i, j]
    return dx


# --------------------------------------------------------------------------------------------
# spatial batch norm, group norm


def spatial_batchnorm_forward(x, gamma, beta, bn_param):
    """Spatial batch normalization forward pass: batch norm per channel over N, H and W.

    Inputs:
    - x: input data, shape (N, C, H, W)
    - gamma: scale, shape (C,)
    - beta: shift, shape (C,)
    - bn_param: dict as in batchnorm_forward ('mode' required; 'eps', 'momentum',
      'running_mean' (C,), 'running_var' (C,) optional)

    Returns a tuple of:
    - out: output data, shape (N, C, H, W), dtype of x
    - cache: values needed by the backward pass (None in test mode)
    """
    x = np.asarray(x)
    require_ndim("x", x, 4, "(N, C, H, W)")
    N, C, H, W = x.shape
    x2 = x.transpose(0, 2, 3, 1).reshape(-1, C)
    out2, cache = batchnorm_forward(x2, gamma, beta, bn_param)
    out = np.ascontiguousarray(out2.reshape(N, H, W, C).transpose(0, 3, 1, 2))
    return out, cache


def spatial_batchnorm_backward(dout, cache):
    """Spatial batch normalization backward pass.

    Inputs:
    - dout: upstream derivatives, shape (N, C, H, W)
    - cache: from spatial_batchnorm_forward in train mode

    Returns a tuple of:
    - dx: gradient w.r.t. x, shape (N, C, H, W), dtype of x
    - dgamma: gradient w.r.t. gamma, shape (C,)
    - dbeta: gradient w.r.t. beta, shape (C,)
    """
    if cache is None:
        raise ValueError(
            "spatial_batchnorm_backward needs the cache of a forward pass in "
            "bn_param['mode']='train'"
        )
    dout = np.asarray(dout)
    require_ndim("dout", dout, 4, "(N, C, H, W)")
    N, C, H, W = dout.shape
    dout2 = dout.transpose(0, 2, 3, 1).reshape(-1, C)
    dx2, dgamma, dbeta = batchnorm_backward_alt(dout2, cache)
    dx = np.ascontiguousarray(dx2.reshape(N, H, W, C).transpose(0, 3, 1, 2))
    return dx, dgamma, dbeta


def spatial_groupnorm_forward(x, gamma, beta, G, gn_param):
    """Spatial group normalization forward pass.

    Each example's C channels are split into G groups of C // G consecutive channels; each
    group is normalized over its channels, height and width, then scaled and shifted per
    channel.

    Inputs:
    - x: input data, shape (N, C, H, W)
    - gamma: scale, shape (1, C, 1, 1)
    - beta: shift, shape (1, C, 1, 1)
    - G: number of groups, a positive divisor of C
    - gn_param: dict with key 'eps' (default 1e-5)

    Returns a tuple of:
    - out: output data, shape (N, C, H, W), dtype of x
    - cache: values needed by the backward pass
    """
    x = np.asarray(x)
    require_ndim("x", x, 4, "(N, C, H, W)")
    N, C, H, W = x.shape
    G = check_groups(C, G)
    check_per_channel("gamma", gamma, C)
    check_per_channel("beta", beta, C)
    eps = check_eps("gn_param", gn_param.get("eps", 1e-5))
    dtype = layer_dtype(x)
    xg = _as_float(x, dtype).reshape(N, G, -1)
    mu = xg.mean(axis=2, keepdims=True)
    xc = xg - mu
    std = np.sqrt((xc * xc).mean(axis=2, keepdims=True) + eps)  # (N, G, 1)
    xhat = (xc / std).reshape(N, C, H, W)
    g = _as_float(gamma, dtype).reshape(1, C, 1, 1)
    bt = _as_float(beta, dtype).reshape(1, C, 1, 1)
    out = g * xhat + bt
    return out.astype(dtype, copy=False), (xhat, std, G, np.asarray(gamma), np.asarray(beta))


def spatial_groupnorm_backward(dout, cache):
    """Spatial group normalization backward pass.

    Inputs:
    - dout: upstream derivatives, shape (N, C, H, W)
    - cache: from spatial_groupnorm_forward

    Returns a tuple of:
    - dx: gradient w.r.t. x, shape (N, C, H, W), dtype of x
    - dgamma: gradient w.r.t. gamma, shape of gamma (1, C, 1, 1)
    - dbeta: gradient w.r.t. beta, shape of beta (1, C, 1, 1)
    """
    xhat, std, G, gamma, beta = cache
    dout = check_dout(dout, xhat.shape, "group norm")
    N, C, H, W = xhat.shape
    dgamma, dbeta = _bn_param_grads(dout, xhat, gamma, beta, (0, 2, 3))
    dgamma = dgamma.reshape(gamma.shape)
    dbeta = dbeta.reshape(beta.shape)
    dxhat = (dout * gamma.reshape(1, C, 1, 1)).reshape(N, G, -1)
    xh = xhat.reshape(N, G, -1)
    M = xh.shape[2]
    dx = (
        M * dxhat - dxhat.sum(axis=2, keepdims=True) - xh * (dxhat * xh).sum(axis=2, keepdims=True)
    ) / (M * std)
    return dx.reshape(N, C, H, W).astype(xhat.dtype, copy=False), dgamma, dbeta
