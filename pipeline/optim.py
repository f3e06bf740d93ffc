"""First-order update rules (cs231n API).

Each rule has the signature ``rule(w, dw, config) -> (next_w, config)``: ``w`` and ``dw`` are
arrays of one shape, ``config`` a dict of hyperparameters and the rule's state (moments,
caches, step count), created on the first call when absent.

``adam`` runs as one fused Numba pass over the arrays (an unfused NumPy Adam touches every
element eight times, which at 4.1M parameters costs as much as a whole training step). It
gives bit-for-bit the results of the NumPy formula in the caller's dtype: scalars are cast to
the array dtype exactly as NumPy does, and no fast-math contraction is allowed. Its moment
arrays ``config['m']``/``config['v']`` are the rule's state and are updated in place;
:func:`adam_inplace` also updates ``w`` in place (for callers that own ``w``, as the Solver and
the distributed coordinator do).
"""

from __future__ import annotations

import math

import numba
import numpy as np

from pipeline._kernels.threads import launch


def sgd(w, dw, config=None):
    """Vanilla stochastic gradient descent.

    config: learning_rate (default 1e-2). Updates ``w`` in place, as cs231n's sgd does.
    """
    if config is None:
        config = {}
    config.setdefault("learning_rate", 1e-2)
    w -= config["learning_rate"] * dw
    return w, config


def sgd_momentum(w, dw, config=None):
    """Stochastic gradient descent with momentum.

    config: learning_rate (1e-2), momentum (0.9), velocity (same shape as w, zeros).
    """
    if config is None:
        config = {}
    config.setdefault("learning_rate", 1e-2)
    config.setdefault("momentum", 0.9)
    v = config.get("velocity", np.zeros_like(w))
    v = config["momentum"] * v - config["learning_rate"] * dw
    next_w = w + v
    config["velocity"] = v
    return next_w, config


def rmsprop(w, dw, config=None):
    """RMSProp: a per-parameter learning rate from a moving average of squared gradients.

    config: learning_rate (1e-2), decay_rate (0.99), epsilon (1e-8), cache (zeros like w).
    """
    if config is None:
        config = {}
    config.setdefault("learning_rate", 1e-2)
    config.setdefault("decay_rate", 0.99)
    config.setdefault("epsilon", 1e-8)
    config.setdefault("cache", np.zeros_like(w))
    dr = config["decay_rate"]
    config["cache"] = dr * config["cache"] + (1 - dr) * dw**2
    next_w = w - config["learning_rate"] * dw / (np.sqrt(config["cache"]) + config["epsilon"])
    return next_w, config


def adam(w, dw, config=None):
    """Adam with bias correction; ``t`` is incremented before the update.

    config: learning_rate (1e-3), beta1 (0.9), beta2 (0.999), epsilon (1e-8),
    m and v (zeros like w), t (0). Returns a new ``next_w``; ``w`` is left unchanged.
    """
    next_w = np.array(w, copy=True)
    return adam_inplace(next_w, dw, config)


def adam_inplace(w, dw, config=None):
    """:func:`adam`, writing ``next_w`` into ``w`` itself (returned as ``next_w``)."""
    if config is None:
        config = {}
    config.setdefault("learning_rate", 1e-3)
    config.setdefault("beta1", 0.9)
    config.setdefault("beta2", 0.999)
    config.setdefault("epsilon", 1e-8)
    config.setdefault("t", 0)
    w_arr = np.asarray(w)
    if "m" not in config:
        config["m"] = np.zeros_like(w_arr)
    if "v" not in config:
        config["v"] = np.zeros_like(w_arr)
    m, v = config["m"], config["v"]
    if not (w_arr.shape == np.shape(dw) == m.shape == v.shape):
        raise ValueError(
            f"adam: shapes differ: w {w_arr.shape}, dw {np.shape(dw)}, m {m.shape}, v {v.shape}"
        )
    config["t"] += 1
    t = config["t"]
    b1, b2 = config["beta1"], config["beta2"]
    f = _adam_scalar_type(w_arr, dw, m, v)
    if f is None:  # mixed dtypes or non-contiguous arrays: the plain NumPy formula
        config["m"] = m = b1 * m + (1 - b1) * dw
        config["v"] = v = b2 * v + (1 - b2) * (dw**2)
        mt = m / (1 - b1**t)
        vt = v / (1 - b2**t)
        w_arr[...] = w_arr - config["learning_rate"] * mt / (np.sqrt(vt) + config["epsilon"])
        return w_arr, config
    # NumPy casts Python scalars to the array dtype after evaluating them in float64: do the same.
    launch(
        _adam_kernel,
        w_arr.reshape(-1),
        np.asarray(dw).reshape(-1),
        m.reshape(-1),
        v.reshape(-1),
        f(b1),
        f(1 - b1),
        f(b2),
        f(1 - b2),
        f(1 - b1**t),
        f(1 - b2**t),
        f(config["learning_rate"]),
        f(config["epsilon"]),
    )
    return w_arr, config


#: the quintic Newton-Schulz iteration of Muon (Keller Jordan; airbench94_muon): coefficients
#: that maximize the slope at zero, so 3 steps bring the singular values that are not far below
#: the largest into about [0.5, 1.5] (not to 1: that does not hurt training, and it takes fewer
#: steps); much smaller ones grow by about 3.4 a step
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 3


def _frobenius(x: np.ndarray) -> float:
    return math.sqrt(float(np.sum(np.square(x, dtype=np.float64))))


def orthogonalize(g: np.ndarray, steps: int = NS_STEPS) -> np.ndarray:
    """``g`` (R, C) -> about ``U V^T`` where ``g = U S V^T``: ``g`` scaled to Frobenius norm 1,
    then ``steps`` Newton-Schulz iterations ``X = a X + (b A + c A A) X`` with ``A = X X^T``
    (on ``g^T`` when R > C, so A is the smaller Gram matrix). In ``g``'s dtype, the products by
    BLAS: the same bits for the same matrix, threads and CPU."""
    dt = g.dtype.type
    a, b, c = (dt(k) for k in NS_COEFFS)
    tall = g.shape[0] > g.shape[1]
    x = (g.T if tall else g) * dt(1.0 / (_frobenius(g) + 1e-7))
    for _ in range(steps):
        gram = x @ x.T  # (r, r), r = min(R, C)
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return np.ascontiguousarray(x.T if tall else x)


def muon_update(w: np.ndarray, d: np.ndarray, lr: float) -> np.ndarray:
    """Muon's step of the filters ``w`` (F, ...) along their momentum direction ``d`` (the
    shape of w): w scaled to Frobenius norm sqrt(F), then moved by ``lr`` along
    :func:`orthogonalize` of ``d`` as an (F, rest) matrix (airbench94_muon's Muon). Returns
    the new filters, w's dtype."""
    dt, rows = w.dtype.type, w.shape[0]
    norm = _frobenius(w)
    scaled = w * dt(math.sqrt(rows) / norm) if norm > 0 else w
    return scaled - dt(lr) * orthogonalize(d.reshape(rows, -1)).reshape(w.shape)


def _adam_scalar_type(*arrays):
    dtype = arrays[0].dtype
    if dtype not in (np.float32, np.float64):
        return None
    for a in arrays:
        if not isinstance(a, np.ndarray) or a.dtype != dtype or not a.flags.c_contiguous:
            return None
    return dtype.type


def add_scaled(out: np.ndarray, g: np.ndarray, n) -> None:
    """``out (*) += g (*) * n`` in one pass, in place, with the bits of
    ``np.add(out, np.multiply(g, n))`` (the product rounded to out's dtype first) and no
    temporary: the L2 term of a gradient, a shard gradient added to a tree node. ``out`` must
    be C-contiguous, ``g`` of its shape and dtype (any layout); ``n`` is cast to that dtype."""
    if not out.flags.c_contiguous:
        raise ValueError(f"add_scaled: out must be C-contiguous, got strides {out.strides}")
    if g.shape != out.shape or g.dtype != out.dtype:
        raise ValueError(
            f"add_scaled: g must be {out.dtype} {out.shape} like out, got {g.dtype} {g.shape}"
        )
    launch(_add_scaled, out.reshape(-1), np.ascontiguousarray(g).reshape(-1), out.dtype.type(n))


@numba.njit(parallel=True, cache=True, nogil=True)
def _add_scaled(out, g, n):  # pragma: no cover - compiled
    # out (m,) += g (m,) * n; no fast-math contraction: the product is rounded before the sum
    for i in numba.prange(out.shape[0]):
        out[i] += g[i] * n


@numba.njit(parallel=True, cache=True, fastmath=False)
def _adam_kernel(w, dw, m, v, b1, one_minus_b1, b2, one_minus_b2, bc1, bc2, lr, eps):
    for i in numba.prange(w.shape[0]):
        g = dw[i]
        mi = b1 * m[i] + one_minus_b1 * g
        vi = b2 * v[i] + one_minus_b2 * (g * g)
        m[i] = mi
        v[i] = vi
        w[i] = w[i] - lr * (mi / bc1) / (np.sqrt(vi / bc2) + eps)
