"""Numerical gradients by centered differences, as in cs231n's gradient_check.

Both functions perturb ``x`` in place one element at a time and restore every element they
touch, so ``x`` holds its original values when they return (also if ``f`` raises).
Use float64 arrays: in float32 a step of h=1e-5 is lost in rounding.
"""

from __future__ import annotations

import numpy as np

__all__ = ["eval_numerical_gradient", "eval_numerical_gradient_array", "rel_error"]


def eval_numerical_gradient(f, x, verbose=True, h=1e-5):
    """Numerical gradient of a scalar function ``f`` at ``x``.

    Inputs:
    - f: function taking the array x and returning a scalar
    - x: array at which to evaluate the gradient (perturbed in place, then restored)
    - verbose: print each index and its gradient
    - h: half the step of the centered difference

    Returns:
    - grad: array of x's shape, grad[ix] = (f(x + h e_ix) - f(x - h e_ix)) / (2h)
    """
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"], op_flags=["readwrite"])
    while not it.finished:
        ix = it.multi_index
        oldval = x[ix]
        try:
            x[ix] = oldval + h
            fxph = f(x)
            x[ix] = oldval - h
            fxmh = f(x)
        finally:
            x[ix] = oldval
        grad[ix] = (fxph - fxmh) / (2 * h)
        if verbose:
            print(ix, grad[ix])
        it.iternext()
    return grad


def eval_numerical_gradient_array(f, x, df, h=1e-5):
    """Numerical gradient of an array-valued function ``f`` at ``x``, contracted with ``df``.

    Inputs:
    - f: function taking the array x and returning an array
    - x: array at which to evaluate the gradient (perturbed in place, then restored)
    - df: upstream gradient, of f(x)'s shape
    - h: half the step of the centered difference

    Returns:
    - grad: array of x's shape, grad[ix] = sum((f(x + h e_ix) - f(x - h e_ix)) * df) / (2h)
    """
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"], op_flags=["readwrite"])
    while not it.finished:
        ix = it.multi_index
        oldval = x[ix]
        try:
            x[ix] = oldval + h
            pos = np.array(f(x), copy=True)
            x[ix] = oldval - h
            neg = np.array(f(x), copy=True)
        finally:
            x[ix] = oldval
        grad[ix] = np.sum((pos - neg) * df) / (2 * h)
        it.iternext()
    return grad


def rel_error(x, y):
    """Maximum relative error between two arrays, as in the cs231n notebooks."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return float(np.max(np.abs(x - y) / np.maximum(1e-8, np.abs(x) + np.abs(y))))
