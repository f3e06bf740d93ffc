"""Explicit SIMD vectors for the Numba kernels: one vector type and a few LLVM vector operations.

Numba's loop vectorizer only vectorizes innermost loops and keeps their accumulators in
memory; a convolution kernel needs a dozen vector accumulators held in registers across a
loop over filter taps. These intrinsics give that directly: a ``Vec`` value is an LLVM
``<lanes x float>`` (32 bytes: 8 float32 or 4 float64, the AVX2 register width; LLVM splits or
fuses it on other targets), kept in a register like any scalar local.

    V = lanes(a)                 # lanes for a's dtype (8 for float32, 4 for float64)
    v = vload(a, i)              # a[i : i + V]          (a 1-D, C-contiguous)
    vstore(a, i, v)              # a[i : i + V] = v
    s = vsplat(a, i)             # a[i] in every lane
    z = vzero(a)                 # zeros, a's dtype
    v = vfma(a, b, c)            # a * b + c, fused, lane by lane
    v = vadd(a, b)               # a + b
    v = vmul(a, b)               # a * b
    x = vsum(v)                  # lanes summed in lane order (deterministic)
    prefetch(a, i)               # a hint: bring a[i]'s cache line towards L1 (no effect on values)

``vload`` / ``vstore`` / ``vsplat`` take C-contiguous arrays only (others do not compile) and do
no bounds checks: the caller sizes its arrays for every index it uses. Kernels using them
compile with ``cache=True`` like any other.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

VECTOR_BYTES = 32

__all__ = [
    "VECTOR_BYTES",
    "Vec",
    "lanes",
    "vzero",
    "vload",
    "vstore",
    "vsplat",
    "vfma",
    "vadd",
    "vmul",
    "vsum",
    "prefetch",
]


class Vec(types.Type):
    """A SIMD vector of ``lanes`` values of ``dtype`` (a Numba float type)."""

    def __init__(self, dtype, lanes):
        self.dtype = dtype
        self.lanes = lanes
        super().__init__(name=f"Vec({dtype}, {lanes})")


@register_model(Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        elem = dmm.lookup(fe_type.dtype).get_value_type()
        super().__init__(dmm, fe_type, ir.VectorType(elem, fe_type.lanes))


def _vec_for(arr):
    """The Vec type for a C-contiguous float array type, or None (no typing: Numba reports the
    mismatch at compile time, so a strided view can never be read as if it were contiguous)."""
    if (
        isinstance(arr, types.Array)
        and arr.layout == "C"
        and arr.dtype in (types.float32, types.float64)
    ):
        return Vec(arr.dtype, VECTOR_BYTES // (arr.dtype.bitwidth // 8))
    return None


def _element_ptr(context, builder, arr_t, arr, i, i_t):
    data = context.make_array(arr_t)(context, builder, arr).data
    return builder.gep(data, [context.cast(builder, i, i_t, types.intp)])


def _vec_ptr(context, builder, vt, ptr):
    return builder.bitcast(ptr, context.get_value_type(vt).as_pointer())


@intrinsic
def lanes(typingctx, arr):
    vt = _vec_for(arr)
    if vt is None:
        return None

    def codegen(context, builder, sig, args):
        return context.get_constant(types.intp, vt.lanes)

    return types.intp(arr), codegen


@intrinsic
def vzero(typingctx, arr):
    vt = _vec_for(arr)
    if vt is None:
        return None

    def codegen(context, builder, sig, args):
        return ir.Constant(context.get_value_type(vt), None)

    return vt(arr), codegen


@intrinsic
def vload(typingctx, arr, i):
    vt = _vec_for(arr)
    if vt is None or not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        p = _element_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        return builder.load(_vec_ptr(context, builder, vt, p), align=vt.dtype.bitwidth // 8)

    return vt(arr, i), codegen


@intrinsic
def vstore(typingctx, arr, i, v):
    vt = _vec_for(arr)
    if vt is None or not isinstance(i, types.Integer) or v != vt:
        return None

    def codegen(context, builder, sig, args):
        p = _element_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        builder.store(args[2], _vec_ptr(context, builder, vt, p), align=vt.dtype.bitwidth // 8)
        return context.get_dummy_value()

    return types.none(arr, i, v), codegen


@intrinsic
def vsplat(typingctx, arr, i):
    vt = _vec_for(arr)
    if vt is None or not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        p = _element_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        vty = context.get_value_type(vt)
        i32 = ir.IntType(32)
        one = builder.insert_element(
            ir.Constant(vty, ir.Undefined), builder.load(p), ir.Constant(i32, 0)
        )
        mask = ir.Constant(ir.VectorType(i32, vt.lanes), [0] * vt.lanes)
        return builder.shuffle_vector(one, ir.Constant(vty, ir.Undefined), mask)

    return vt(arr, i), codegen


@intrinsic
def vfma(typingctx, a, b, c):
    if not (isinstance(a, Vec) and a == b == c):
        return None

    def codegen(context, builder, sig, args):
        vty = context.get_value_type(a)
        fn = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(vty, [vty, vty, vty]),
            f"llvm.fma.v{a.lanes}f{a.dtype.bitwidth}",
        )
        return builder.call(fn, args)

    return a(a, b, c), codegen


@intrinsic
def vadd(typingctx, a, b):
    if not (isinstance(a, Vec) and a == b):
        return None

    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], args[1])

    return a(a, b), codegen


@intrinsic
def vmul(typingctx, a, b):
    if not (isinstance(a, Vec) and a == b):
        return None

    def codegen(context, builder, sig, args):
        return builder.fmul(args[0], args[1])

    return a(a, b), codegen


@intrinsic
def vsum(typingctx, v):
    if not isinstance(v, Vec):
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        s = builder.extract_element(args[0], ir.Constant(i32, 0))
        for k in range(1, v.lanes):
            s = builder.fadd(s, builder.extract_element(args[0], ir.Constant(i32, k)))
        return s

    return v.dtype(v), codegen


@intrinsic
def prefetch(typingctx, arr, i):
    vt = _vec_for(arr)
    if vt is None or not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        p = _element_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        i8p = builder.bitcast(p, ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(ir.VoidType(), [i8p.type, i32, i32, i32]),
            "llvm.prefetch.p0",
        )
        # read (0), high temporal locality (3: keep in all cache levels), data cache (1)
        builder.call(fn, [i8p, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.none(arr, i), codegen
