"""Parameter checks, output shapes and the BN running average shared by the naive and the fast
layers.

Every check raises ``ValueError`` naming the parameter and the values it got, so a bad call
fails at the layer's door and never deep inside a kernel.
"""

from __future__ import annotations

import numbers

import numpy as np


def require_ndim(name: str, a: np.ndarray, ndim: int, layout: str) -> None:
    """Raise unless ``a`` has ``ndim`` dimensions (``layout`` names them, e.g. "(N, C, H, W)")."""
    if np.ndim(a) != ndim:
        raise ValueError(f"{name} must be a {ndim}-D array {layout}, got shape {np.shape(a)}")


def require_positive_int(name: str, value) -> int:
    """Return ``value`` as an int, raising unless it is an integer >= 1."""
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def conv_output_shape(x_shape, w_shape, conv_param) -> tuple[int, int, int, int]:
    """Check a convolution's arguments and return its output shape (N, F, H_out, W_out).

    x_shape is (N, C, H, W), w_shape (F, C, HH, WW); conv_param holds 'stride' and 'pad'.
    """
    if len(x_shape) != 4:
        raise ValueError(f"x must be a 4-D array (N, C, H, W), got shape {tuple(x_shape)}")
    if len(w_shape) != 4:
        raise ValueError(f"w must be a 4-D array (F, C, HH, WW), got shape {tuple(w_shape)}")
    N, C, H, W = x_shape
    F, Cw, HH, WW = w_shape
    if C != Cw:
        raise ValueError(
            f"channel mismatch: x has C={C} channels but w expects C={Cw} (w shape "
            f"{tuple(w_shape)})"
        )
    stride = require_positive_int("conv_param['stride']", conv_param.get("stride", 1))
    pad = conv_param.get("pad", 0)
    if isinstance(pad, bool) or int(pad) != pad or pad < 0:
        raise ValueError(f"conv_param['pad'] must be an integer >= 0, got {pad!r}")
    pad = int(pad)
    H_out, W_out = [
        _window_count(f"conv output {axis}", size + 2 * pad, k, stride, f"pad={pad}")
        for axis, size, k in (("height", H, HH), ("width", W, WW))
    ]
    return N, F, H_out, W_out


def pool_output_shape(x_shape, pool_param) -> tuple[int, int, int, int]:
    """Check a max-pool's arguments and return its output shape (N, C, H_out, W_out).

    pool_param holds 'pool_height', 'pool_width' and 'stride'.
    """
    if len(x_shape) != 4:
        raise ValueError(f"x must be a 4-D array (N, C, H, W), got shape {tuple(x_shape)}")
    N, C, H, W = x_shape
    ph = require_positive_int("pool_param['pool_height']", pool_param.get("pool_height", 2))
    pw = require_positive_int("pool_param['pool_width']", pool_param.get("pool_width", 2))
    stride = require_positive_int("pool_param['stride']", pool_param.get("stride", 2))
    H_out = _window_count("pool output height", H, ph, stride, "")
    W_out = _window_count("pool output width", W, pw, stride, "")
    return N, C, H_out, W_out


def _window_count(what: str, size: int, k: int, stride: int, extra: str) -> int:
    span = size - k
    if span < 0:
        raise ValueError(
            f"{what}: window {k} is larger than the input {size}" + (f" ({extra})" if extra else "")
        )
    if span % stride:
        raise ValueError(
            f"{what} is not an integer: (input {size} - window {k}) / stride {stride} + 1 "
            f"= {span / stride + 1:g}" + (f" ({extra})" if extra else "")
        )
    return span // stride + 1


def check_groups(C: int, G, name: str = "G", channels: str = "the channel count C") -> int:
    """Return G as an int, raising unless it is a positive divisor of the channel count C.

    ``name`` and ``channels`` are what the caller calls them (e.g. "num_groups", "num_filters").
    """
    G = require_positive_int(name, G)
    if C % G:
        raise ValueError(f"{name}={G} must divide {channels}={C}")
    return G


def check_momentum(name: str, momentum):
    """Return a batch norm's running-average momentum unchanged, raising unless it is a real
    number with 0 <= momentum <= 1."""
    if (
        isinstance(momentum, (bool, np.bool_))
        or not isinstance(momentum, numbers.Real)
        or not 0 <= momentum <= 1
    ):
        raise ValueError(f"{name} must be a number in [0, 1], got {momentum!r}")
    return momentum


def layer_dtype(a) -> np.dtype:
    """The dtype a layer returns for input ``a``: its own if floating (float16, float32, float64,
    ...), else float64. The one dtype policy of the naive and the fast layers."""
    dt = np.asarray(a).dtype
    return dt if np.issubdtype(dt, np.floating) else np.dtype(np.float64)


def check_bn_mode(mode) -> str:
    """Return the batch-norm mode, raising unless it is 'train' or 'test'."""
    if mode not in ("train", "test"):
        raise ValueError(f"bn_param['mode'] must be 'train' or 'test', got {mode!r}")
    return mode


def check_dout(dout, expected_shape, layer: str) -> np.ndarray:
    """``dout`` as an array, raising unless it has the forward output's shape."""
    dout = np.asarray(dout)
    if dout.shape != tuple(expected_shape):
        raise ValueError(
            f"dout for {layer} must have the forward output's shape {tuple(expected_shape)}, "
            f"got {dout.shape}"
        )
    return dout


def check_param_shape(name: str, a, shape) -> None:
    """Raise unless parameter ``name`` has exactly ``shape``."""
    if np.shape(a) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {np.shape(a)}")


def check_per_channel(name: str, a, C: int) -> None:
    """gamma/beta of a per-channel norm: C values, in shape (C,) or (1, C, 1, 1) etc."""
    if np.size(a) != C or max(np.shape(a) or (1,)) != C:
        raise ValueError(f"{name} must hold one value per channel (C={C}), got shape {np.shape(a)}")


def check_eps(name: str, eps) -> float:
    """A norm's epsilon as a float, raising unless finite and >= 0."""
    if not np.isfinite(eps) or eps < 0:
        raise ValueError(f"{name}['eps'] must be a finite number >= 0, got {eps!r}")
    return float(eps)


def running_average(running, batch, momentum: float, dtype):
    """cs231n's batch-norm running statistic after one training batch, in ``dtype``:
    ``momentum * running + (1 - momentum) * batch``."""
    return (momentum * running + (1 - momentum) * batch).astype(dtype, copy=False)
