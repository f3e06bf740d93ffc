"""The register tile the direct convolution kernels and the affine kernels share: R rows x C
vectors of sums, R * C accumulators held in SIMD registers (``pipeline._kernels.simd``), fed per
step by R broadcasts and C vector loads.

    tl = Tile(rows, cols)                                   # a kernel argument, like a Width
    acc = tile_zeros(a, tl, vw)                             # R*C zero vectors of a's dtype
    qs = tile_rows(tl, i0, last, step, base)                # (base + min(i0 + r, last) * step)_r
    ts = tile_vectors(tl, a, vw)                            # (0, V, ..., (C - 1) * V)
    qs = tile_take_rows(tl, arr, i0, last, base)            # (base + arr[min(i0 + r, last)])_r
    ts = tile_take_cols(tl, arr, i0, last, base)
    R, C = tile_shape(tl)                                   # compile-time constants
    acc = tile_fma(src, qs, k, a, o, ts, acc, vw)           # acc[r*C + c] += src[qs[r] + k]
                                                            #     * a[o + ts[c] : + lanes]
    acc = tile_load(a, qs, ts, vw)                          # a[qs[r] + ts[c] : + lanes], r x c
    tile_store(a, qs, ts, acc)                              # the inverse of tile_load
    acc = tile_add(acc, acc2); acc = tile_mul(acc, v)       # lane by lane, each rounded
    row = row_zeros(a, tl, vw); row = row_add(row, a, o, ts, vw); row_store(a, o, ts, row)
                                                            # C sums in registers, no broadcasts

**The shape follows the register file.** 3 x 4 (12 accumulators, 4 loads) fits the 16 vector
registers of AVX2 and SSE; with 32 (AVX-512, at every width thanks to AVX-512VL; NEON) a
kernel may take 6 x 4, each vector loaded feeding twice the FMAs: the hidden layer's dx pass,
whose loads come from L2, gained 10% with it on Zen 4; the other kernels lost 3-10% and keep
3 x 4 (:func:`tile_for`). :func:`simd.registers` says which file a process has
(``CONVPIPE_VECTOR_REGISTERS`` overrides it). A tile is a type to Numba, as a width is: one
compiled specialization per (tile, width), all of them runnable on any x86 CPU (LLVM spills what
does not fit), so tests run every kernel at every tile and width.

**The shape never changes bits.** Every accumulator is one output's FMA chain, in the order its
kernel sums; a tile only decides how many chains run side by side.

The operations for each shape are generated once (``_ops``) and chosen by Numba at compile time
from the tile's and the tuples' lengths. Numba's on-disk cache checks only the file of the kernel
it compiled: after editing this file, clear the kernels' caches (``__pycache__/*.nbi``/``.nbc``
beside them) or touch their files.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from numba import types
from numba.core import cgutils
from numba.extending import (
    NativeValue,
    models,
    overload,
    register_model,
    typeof_impl,
    unbox,
)

from pipeline._kernels import simd
from pipeline._kernels.simd import lanes, vadd, vfma, vload, vmul, vsplat, vstore, vzero

#: the tile shapes the kernels are compiled for: (rows, cols)
SHAPES = ((3, 4), (6, 4))


@dataclass(frozen=True)
class Tile:
    """A register tile: ``rows`` broadcasts x ``cols`` vectors of sums (``SHAPES``)."""

    rows: int
    cols: int

    def __post_init__(self):
        if (self.rows, self.cols) not in SHAPES:
            shapes = ", ".join(f"{r}x{c}" for r, c in SHAPES)
            raise ValueError(
                f"register tile: expected one of {shapes}, got {self.rows}x{self.cols}"
            )


def tile_for(tall: bool, regs: int | None = None) -> Tile:
    """The tile for a kernel on ``regs`` registers (this process's by default): 6 x 4 for a
    ``tall`` kernel on 32 registers, else 3 x 4."""
    return Tile(6, 4) if tall and (simd.registers() if regs is None else regs) >= 32 else Tile(3, 4)


class TileType(types.Type):
    """Numba's type of a :class:`Tile`: the shape is in the type, the value carries nothing."""

    def __init__(self, rows, cols):
        self.rows = rows
        self.cols = cols
        super().__init__(name=f"Tile({rows}x{cols})")


register_model(TileType)(models.OpaqueModel)


@typeof_impl.register(Tile)
def _typeof_tile(val, c):
    return TileType(val.rows, val.cols)


@unbox(TileType)
def _unbox_tile(typ, obj, c):
    return NativeValue(cgutils.get_null_value(c.context.get_value_type(typ)))


# ---- the generated operations ------------------------------------------------------------------


def _ops_source(R: int, C: int) -> str:
    """Python source of one shape's operations (R rows x C vectors)."""
    acc = [f"a{r}_{c}" for r in range(R) for c in range(C)]
    tup = "(" + ", ".join(acc) + ",)"
    fma = []
    for c in range(C):
        fma.append(f"    x = vload(a, o + ts[{c}], vw)")
        fma += [f"    a{r}_{c} = vfma(b{r}, x, a{r}_{c})" for r in range(R)]
    loads = ", ".join(f"vload(a, qs[{r}] + ts[{c}], vw)" for r in range(R) for c in range(C))
    stores = "\n".join(
        f"    vstore(a, qs[{r}] + ts[{c}], a{r}_{c})" for r in range(R) for c in range(C)
    )
    return f"""
def zeros(like, tl, vw):
    z = vzero(like, vw)
    return ({", ".join(["z"] * (R * C))},)

def fma(src, qs, k, a, o, ts, acc, vw):
    {tup} = acc
{chr(10).join(f"    b{r} = vsplat(src, qs[{r}] + k, vw)" for r in range(R))}
{chr(10).join(fma)}
    return {tup}

def load(a, qs, ts, vw):
    return ({loads},)

def store(a, qs, ts, acc):
    {tup} = acc
{stores}

def add(x, y):
    return ({", ".join(f"vadd(x[{i}], y[{i}])" for i in range(R * C))},)

def mul(x, v):
    return ({", ".join(f"vmul(x[{i}], v)" for i in range(R * C))},)

def shape(tl):
    return ({R}, {C})

def row_zeros(like, tl, vw):
    z = vzero(like, vw)
    return ({", ".join(["z"] * C)},)

def row_add(row, a, o, ts, vw):
    return ({", ".join(f"vadd(row[{c}], vload(a, o + ts[{c}], vw))" for c in range(C))},)

def row_store(a, o, ts, row):
{chr(10).join(f"    vstore(a, o + ts[{c}], row[{c}])" for c in range(C))}

def rows(tl, i0, last, step, base):
    return ({", ".join(f"base + min(i0 + {r}, last) * step" for r in range(R))},)

def take_rows(tl, arr, i0, last, base):
    return ({", ".join(f"base + arr[min(i0 + {r}, last)]" for r in range(R))},)

def vectors(tl, a, vw):
    V = lanes(a, vw)
    return ({", ".join(f"{c} * V" for c in range(C))},)

def take_cols(tl, arr, i0, last, base):
    return ({", ".join(f"base + arr[min(i0 + {c}, last)]" for c in range(C))},)
"""


@functools.cache
def _ops(R: int, C: int) -> dict:
    """One shape's operations (Python functions, which the overloads below hand to Numba to
    compile inline), each with the parameters of the ``tile_*`` function it implements."""
    ns = {"vadd": vadd, "vfma": vfma, "vload": vload, "vmul": vmul, "vsplat": vsplat}
    ns.update(vstore=vstore, vzero=vzero, lanes=lanes)
    exec(compile(_ops_source(R, C), f"<tile {R}x{C}>", "exec"), ns)  # noqa: S102
    return ns


def _stub(*args):  # pragma: no cover - only Numba calls these, through the overloads
    raise NotImplementedError("the tile operations run inside Numba kernels only")


def tile_zeros(like, tl, vw):
    """R*C zero vectors of like's dtype."""
    _stub()


def tile_rows(tl, i0, last, step, base):
    """(base + min(i0 + r, last) * step for r < R): a tile's R row offsets."""
    _stub()


def tile_vectors(tl, a, vw):
    """(0, V, ..., (C - 1) * V), V = lanes of a's dtype: a row's C vectors, as constants (call
    it inside a kernel's loop, where LLVM folds them into addresses)."""
    _stub()


def tile_take_rows(tl, arr, i0, last, base):
    """(base + arr[min(i0 + r, last)] for r < R)."""
    _stub()


def tile_take_cols(tl, arr, i0, last, base):
    """(base + arr[min(i0 + c, last)] for c < C)."""
    _stub()


def tile_shape(tl):
    """(R, C), constants to Numba."""
    _stub()


def tile_fma(src, qs, k, a, o, ts, acc, vw):
    """The micro-kernel: acc[r*C + c] += src[qs[r] + k] * a[o + ts[c] :][:lanes] for r < R,
    c < C: R*C FMAs fed by C vector loads and R broadcasts."""
    _stub()


def tile_load(a, qs, ts, vw):
    """R*C vectors: a[qs[r] + ts[c] : + lanes], row by row."""
    _stub()


def tile_store(a, qs, ts, acc):
    """The inverse of tile_load."""
    _stub()


def tile_add(x, y):
    """x + y, vector by vector."""
    _stub()


def row_zeros(like, tl, vw):
    """C zero vectors: one row of a tile's sums, for a sum of rows (no broadcast side)."""
    _stub()


def row_add(row, a, o, ts, vw):
    """row[c] + a[o + ts[c] :][:lanes] for c < C."""
    _stub()


def row_store(a, o, ts, row):
    """a[o + ts[c] :][:lanes] = row[c] for c < C."""
    _stub()


def tile_mul(x, v):
    """x * v (one vector), vector by vector."""
    _stub()


def _by_tile(tl, *rest):
    """The shape of a call whose first argument is a tile."""
    return (tl.rows, tl.cols) if isinstance(tl, TileType) else None


def _by_tuples(qs, ts):
    """The shape of a call on a tile's row and vector offsets (two tuples of integers)."""
    if isinstance(qs, types.BaseTuple) and isinstance(ts, types.BaseTuple):
        return len(qs), len(ts)
    return None


def _by_cols(ts):
    """The shape (any with that many vectors) of a call on a row's C vector offsets."""
    if isinstance(ts, types.BaseTuple):
        return next(((r, c) for r, c in SHAPES if c == len(ts)), None)
    return None


def _by_length(x, *rest):
    """The shape of an elementwise call on a tile's accumulators (only R * C matters)."""
    if isinstance(x, types.BaseTuple):
        return next(((r, c) for r, c in SHAPES if r * c == len(x)), None)
    return None


def _register(stub, name, shape_of):
    """Numba's implementation of ``stub``: ``_ops(shape)[name]`` for the shape its argument
    types give (``shape_of``), compiled inline."""

    @functools.wraps(stub)  # Numba reads the stub's parameters through __wrapped__
    def typing(*args):
        shape = shape_of(*args)
        if shape in SHAPES:
            return _ops(*shape)[name]

    overload(stub, inline="always")(typing)


for _stub_fn, _name, _shape_of in (
    (tile_zeros, "zeros", lambda like, tl, vw: _by_tile(tl)),
    (tile_rows, "rows", _by_tile),
    (tile_vectors, "vectors", _by_tile),
    (tile_take_rows, "take_rows", _by_tile),
    (tile_take_cols, "take_cols", _by_tile),
    (tile_shape, "shape", _by_tile),
    (tile_fma, "fma", lambda src, qs, k, a, o, ts, acc, vw: _by_tuples(qs, ts)),
    (tile_load, "load", lambda a, qs, ts, vw: _by_tuples(qs, ts)),
    (tile_store, "store", lambda a, qs, ts, acc: _by_tuples(qs, ts)),
    (tile_add, "add", _by_length),
    (row_zeros, "row_zeros", lambda like, tl, vw: _by_tile(tl)),
    (row_add, "row_add", lambda row, a, o, ts, vw: _by_cols(ts)),
    (row_store, "row_store", lambda a, o, ts, row: _by_cols(ts)),
    (tile_mul, "mul", _by_length),
):
    _register(_stub_fn, _name, _shape_of)
