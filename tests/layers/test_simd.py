"""pipeline._kernels.simd: each vector operation against NumPy, in both float dtypes."""

import numpy as np
import pytest
from numba import njit

from pipeline._kernels.simd import (
    lanes,
    prefetch,
    vadd,
    vfma,
    vload,
    vmul,
    vsplat,
    vstore,
    vsum,
    vzero,
)


@njit(cache=False)
def _ops(a, b, c, out):
    """out[0:V] = a*b + c at offset 1; out[V:2V] = a + b; out[2V:3V] = splat(c[2]); out[3V:4V] = 0;
    out[4V:5V] = a * c."""
    V = lanes(a)
    vstore(out, 0, vfma(vload(a, 1), vload(b, 1), vload(c, 1)))
    vstore(out, V, vadd(vload(a, 0), vload(b, 0)))
    vstore(out, 2 * V, vsplat(c, 2))
    vstore(out, 3 * V, vzero(a))
    vstore(out, 4 * V, vmul(vload(a, 0), vload(c, 0)))
    return V, vsum(vload(a, 0))


@pytest.mark.parametrize("dtype, V", [(np.float32, 8), (np.float64, 4)])
def test_vector_ops_match_numpy(dtype, V):
    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal(V + 3).astype(dtype) for _ in range(3))
    out = np.full(5 * V + 2, 7, dtype=dtype)
    lanes_seen, total = _ops(a, b, c, out)
    assert lanes_seen == V
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
    expect = a[0]
    for k in range(1, V):  # lane order
        expect = dtype(expect + a[k])
    assert total == expect


def test_strided_arrays_do_not_compile():
    """A strided view read as contiguous lanes would be silently wrong: typing refuses it."""
    from numba.core.errors import TypingError

    @njit(cache=False)
    def load_first(a):
        return vsum(vload(a, 0))

    a = np.arange(32, dtype=np.float32)
    assert load_first(a) == sum(range(8))
    with pytest.raises(TypingError):
        load_first(a[::2])


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
