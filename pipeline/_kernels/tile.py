"""The register tile both direct convolution kernels and the affine kernels share: 3 rows x 4
vectors of sums, 12 accumulators held in SIMD registers (``pipeline._kernels.simd``).

    acc = zeros_3x4(a, vw)                                # 12 zero vectors of a's dtype
    acc = load_3x4(a, r0, r1, r2, t0, t1, t2, t3, vw)     # a[r + t : r + t + lanes], r x t
    store_3x4(a, r0, r1, r2, t0, t1, t2, t3, acc)         # the inverse of load_3x4
    acc = fma_3x4(u, v, s, a, t0, t1, t2, t3, acc, vw)    # acc[r][j] += (u, v, s)[r] * a[t_j:]

``vw`` is the kernel's vector width (``pipeline._kernels.simd.Width``); 12 accumulators and 4
loads fit AVX2's 16 registers, and leave AVX-512's 32 room for its broadcasts.

Numba's on-disk cache checks only the file of the kernel it compiled: after editing these
helpers, clear the kernels' caches (``__pycache__/*.nbi``/``.nbc`` beside them) or touch their
files.
"""

from __future__ import annotations

from numba import njit

from pipeline._kernels.simd import vfma, vload, vstore, vzero


@njit(cache=True, inline="always")
def zeros_3x4(like, vw):
    z = vzero(like, vw)
    return (z, z, z, z, z, z, z, z, z, z, z, z)


@njit(cache=True, inline="always")
def load_3x4(a, r0, r1, r2, t0, t1, t2, t3, vw):
    """12 vectors: a[r + t : r + t + lanes] for rows r = r0, r1, r2 and columns t = t0..t3."""
    return (
        vload(a, r0 + t0, vw),
        vload(a, r0 + t1, vw),
        vload(a, r0 + t2, vw),
        vload(a, r0 + t3, vw),
        vload(a, r1 + t0, vw),
        vload(a, r1 + t1, vw),
        vload(a, r1 + t2, vw),
        vload(a, r1 + t3, vw),
        vload(a, r2 + t0, vw),
        vload(a, r2 + t1, vw),
        vload(a, r2 + t2, vw),
        vload(a, r2 + t3, vw),
    )


@njit(cache=True, inline="always")
def store_3x4(a, r0, r1, r2, t0, t1, t2, t3, acc):
    """The inverse of load_3x4."""
    a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3 = acc
    vstore(a, r0 + t0, a0)
    vstore(a, r0 + t1, a1)
    vstore(a, r0 + t2, a2)
    vstore(a, r0 + t3, a3)
    vstore(a, r1 + t0, b0)
    vstore(a, r1 + t1, b1)
    vstore(a, r1 + t2, b2)
    vstore(a, r1 + t3, b3)
    vstore(a, r2 + t0, c0)
    vstore(a, r2 + t1, c1)
    vstore(a, r2 + t2, c2)
    vstore(a, r2 + t3, c3)


@njit(cache=True, inline="always")
def fma_3x4(u, v, s, a, t0, t1, t2, t3, acc, vw):
    """The micro-kernel of both direct kernels: acc[r][j] += (u, v, s)[r] * a[t_j : t_j + lanes]
    for r = 0..2, j = 0..3: 12 FMAs fed by 4 vector loads (u, v, s are 3 broadcasts)."""
    a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3 = acc
    x = vload(a, t0, vw)
    a0 = vfma(u, x, a0)
    b0 = vfma(v, x, b0)
    c0 = vfma(s, x, c0)
    x = vload(a, t1, vw)
    a1 = vfma(u, x, a1)
    b1 = vfma(v, x, b1)
    c1 = vfma(s, x, c1)
    x = vload(a, t2, vw)
    a2 = vfma(u, x, a2)
    b2 = vfma(v, x, b2)
    c2 = vfma(s, x, c2)
    x = vload(a, t3, vw)
    a3 = vfma(u, x, a3)
    b3 = vfma(v, x, b3)
    c3 = vfma(s, x, c3)
    return (a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3)
