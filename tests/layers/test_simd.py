"""pipeline._kernels.simd: each vector operation against NumPy, in both float dtypes and at every
vector width (16, 32 and 64 bytes: LLVM splits a vector wider than the machine's)."""

import numpy as np
import pytest
from numba import njit

from pipeline._kernels.simd import (
    WIDTHS,
    Width,
    lanes,
    prefetch,
    vadd,
    vfma,
    vload,
    vmul,
    vsplat,
    vstore,
    vzero,
)


@njit(cache=False)
def _ops(a, b, c, out, vw):
    """out[0:V] = a*b + c at offset 1; out[V:2V] = a + b; out[2V:3V] = splat(c[2]); out[3V:4V] = 0;
    out[4V:5V] = a * c."""
    V = lanes(a, vw)
    vstore(out, 0, vfma(vload(a, 1, vw), vload(b, 1, vw), vload(c, 1, vw)))
    vstore(out, V, vadd(vload(a, 0, vw), vload(b, 0, vw)))
    vstore(out, 2 * V, vsplat(c, 2, vw))
    vstore(out, 3 * V, vzero(a, vw))
    vstore(out, 4 * V, vmul(vload(a, 0, vw), vload(c, 0, vw)))
    return V


@pytest.mark.parametrize("nbytes", WIDTHS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vector_ops_match_numpy(dtype, nbytes):
    V = nbytes // np.dtype(dtype).itemsize
    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal(V + 3).astype(dtype) for _ in range(3))
    out = np.full(5 * V + 2, 7, dtype=dtype)
    assert _ops(a, b, c, out, Width(nbytes)) == V
    # fused: one rounding, so equal to the float64 product-sum rounded once (float32) / close
    # (float64)
    exact = a[1 : V + 1].astype(np.float64) * b[1 : V + 1] + c[1 : V + 1]
    if dtype == np.float32:
        np.testing.assert_array_equal(out[:V], exact.astype(np.float32))
    else:
        np.testing.assert_allclose(out[:V], exact, rtol=1e-15)
    np.testing.assert_array_equal(out[V : 2 * V], a[:V] + b[:V])
    np.testing.assert_array_equal(out[2 * V : 3 * V], np.full(V, c[2]))
    np.testing.assert_array_equal(out[3 * V : 4 * V], 0)
    np.testing.assert_array_equal(out[4 * V : 5 * V], a[:V] * c[:V])
    np.testing.assert_array_equal(out[5 * V :], 7)  # nothing written past the last vector


def test_strided_arrays_do_not_compile():
    """A strided view read as contiguous lanes would be silently wrong: typing refuses it."""
    from numba.core.errors import TypingError

    @njit(cache=False)
    def copy_first(a, out, vw):
        vstore(out, 0, vload(a, 0, vw))

    a = np.arange(32, dtype=np.float32)
    out = np.zeros(8, np.float32)
    copy_first(a, out, Width(32))
    np.testing.assert_array_equal(out, np.arange(8))
    with pytest.raises(TypingError):
        copy_first(a[::2], out, Width(32))
    with pytest.raises(TypingError):  # a width is a Width, not a number
        copy_first(a, out, 32)


def test_prefetch_is_a_hint_that_changes_nothing():
    """Prefetching every element, the last one included, leaves the arrays and the sum alone;
    a strided view does not compile (its addresses would be wrong)."""
    from numba.core.errors import TypingError

    @njit(cache=False)
    def prefetched_sum(a):
        s = 0.0
        for i in range(a.size):
            prefetch(a, i)
            s += a[i]
        return s

    a = np.arange(1000, dtype=np.float32)
    assert prefetched_sum(a) == a.sum(dtype=np.float64)
    np.testing.assert_array_equal(a, np.arange(1000, dtype=np.float32))
    with pytest.raises(TypingError):
        prefetched_sum(a[::2])
