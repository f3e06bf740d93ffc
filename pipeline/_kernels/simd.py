"""Explicit SIMD vectors for the Numba kernels: one vector type and a few LLVM vector operations,
at the vector width a kernel is called with.

Numba's loop vectorizer only vectorizes innermost loops and keeps their accumulators in
memory; a convolution kernel needs a dozen vector accumulators held in registers across a
loop over filter taps. These intrinsics give that directly: a ``Vec`` value is an LLVM
``<lanes x float>`` kept in a register like any scalar local.

**The width is an argument.** A kernel takes a :class:`Width` (``vw``: 16, 32 or 64 bytes) and
hands it to the operations that make vectors; Numba compiles (and caches on disk) one
specialization per width, so one process can run every width, and a test can run the 64-byte
path on an AVX2 machine (LLVM splits a vector wider than the machine's registers). The width a
process uses, :func:`current`, is the CPU's own (:func:`native_bytes`: 64 with AVX-512, 32 with
AVX2 and FMA, 16 otherwise and off x86), or ``CONVPIPE_VECTOR_BYTES``, or what
:func:`using` sets for a block of code.

    V = lanes(a, vw)             # lanes of a's dtype in one vector (float32: vw.nbytes // 4)
    v = vload(a, i, vw)          # a[i : i + V]          (a 1-D, C-contiguous)
    vstore(a, i, v)              # a[i : i + V] = v
    s = vsplat(a, i, vw)         # a[i] in every lane
    z = vzero(a, vw)             # zeros, a's dtype
    v = vfma(a, b, c)            # a * b + c, fused, lane by lane
    v = vadd(a, b)               # a + b
    v = vmul(a, b)               # a * b
    prefetch(a, i)               # a hint: bring a[i]'s cache line towards L1 (no effect on values)

``vload`` / ``vstore`` / ``vsplat`` take C-contiguous arrays only (others do not compile) and do
no bounds checks: the caller sizes its arrays for every index it uses. Kernels using them
compile with ``cache=True`` like any other.

**Bits do not depend on the width.** The kernels built on these keep one FMA chain per output
value in a fixed order (the lanes of a vector are independent values), and sum across lanes
only in 64-byte logical blocks (``pipeline._kernels.affine._row_sumsq``): every width gives the
same results, so workers on different CPUs compute the same bits (tests run every width).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import platform
from dataclasses import dataclass

from llvmlite import binding, ir
from numba import types
from numba.core import cgutils
from numba.extending import (
    NativeValue,
    intrinsic,
    models,
    register_model,
    typeof_impl,
    unbox,
)

#: the widths the kernels run at, in bytes (SSE/NEON, AVX2, AVX-512)
WIDTHS = (16, 32, 64)
#: the environment variable that overrides the CPU's width for a process (and its workers)
WIDTH_ENV = "CONVPIPE_VECTOR_BYTES"
#: the environment variable that overrides the CPU's SIMD register count for a process (16, 32)
REGISTERS_ENV = "CONVPIPE_VECTOR_REGISTERS"

__all__ = [
    "WIDTHS",
    "WIDTH_ENV",
    "Width",
    "native_bytes",
    "cpu_features",
    "cpu_model",
    "describe",
    "process_bytes",
    "REGISTERS_ENV",
    "native_registers",
    "process_registers",
    "registers",
    "current",
    "using",
    "Vec",
    "lanes",
    "vzero",
    "vload",
    "vstore",
    "vsplat",
    "vfma",
    "vadd",
    "vmul",
    "prefetch",
]


@dataclass(frozen=True)
class Width:
    """A SIMD vector width in bytes, passed to a kernel: Numba types it as ``WidthType(nbytes)``,
    so each width is its own compiled (and cached) specialization."""

    nbytes: int

    def __post_init__(self):
        if self.nbytes not in WIDTHS:
            raise ValueError(
                f"vector width: expected one of {', '.join(map(str, WIDTHS))} bytes, "
                f"got {self.nbytes!r}"
            )

    def lanes(self, dtype) -> int:
        """Values of ``dtype`` (a NumPy dtype or its itemsize) in one vector."""
        itemsize = dtype if isinstance(dtype, int) else dtype.itemsize
        return self.nbytes // itemsize


def cpu_features() -> set[str]:
    """The features Numba compiles for: NUMBA_CPU_FEATURES when set, else the host's."""
    given = os.environ.get("NUMBA_CPU_FEATURES", "").strip()
    if given:
        return {f[1:] for f in given.split(",") if f.startswith("+")}
    return {name for name, on in binding.get_host_cpu_features().items() if on}


def _is_x86(machine: str | None) -> bool:
    """Whether ``machine`` (``platform.machine()``'s name; this one's when None) is x86."""
    return (machine or platform.machine()).lower() in ("x86_64", "amd64", "i686", "i386")


def native_bytes(features: set[str] | None = None, machine: str | None = None) -> int:
    """The widest vector the CPU computes with: 64 bytes with AVX-512 (avx512f), 32 with AVX2
    and FMA, else 16 (SSE on x86; NEON and the rest off x86)."""
    if not _is_x86(machine):
        return 16
    features = cpu_features() if features is None else features
    if "avx512f" in features:
        return 64
    if {"avx2", "fma"} <= features:
        return 32
    return 16


def process_bytes(environ=None) -> int:
    """This process's width: ``CONVPIPE_VECTOR_BYTES`` when set (16, 32 or 64), else
    :func:`native_bytes`. A bad value is a ValueError naming the variable."""
    raw = (os.environ if environ is None else environ).get(WIDTH_ENV, "").strip()
    if not raw:
        return native_bytes()
    try:
        nbytes = int(raw)
    except ValueError:
        nbytes = None
    if nbytes not in WIDTHS:
        raise ValueError(
            f"{WIDTH_ENV}: expected one of {', '.join(map(str, WIDTHS))} (bytes), got {raw!r}"
        )
    return nbytes


def native_registers(features: set[str] | None = None, machine: str | None = None) -> int:
    """The CPU's SIMD registers: 32 with AVX-512 (avx512f) and off x86 (NEON, SVE), else 16."""
    if not _is_x86(machine):
        return 32
    features = cpu_features() if features is None else features
    return 32 if "avx512f" in features else 16


def process_registers(environ=None) -> int:
    """This process's register count: ``CONVPIPE_VECTOR_REGISTERS`` when set (16 or 32), else
    :func:`native_registers`. A bad value is a ValueError naming the variable."""
    raw = (os.environ if environ is None else environ).get(REGISTERS_ENV, "").strip()
    if not raw:
        return native_registers()
    if raw not in ("16", "32"):
        raise ValueError(f"{REGISTERS_ENV}: expected 16 or 32 (vector registers), got {raw!r}")
    return int(raw)


@functools.cache
def registers() -> int:
    """The register count the kernels' tiles are chosen for in this process (read once)."""
    return process_registers()


#: the extensions a machine line names, in this order (LLVM's feature names)
_NAMED_EXTENSIONS = ("sse4.2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl")
_NAMED_EXTENSIONS += ("avx512vnni", "avx512bf16", "amx-tile", "neon", "sve")


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what the platform module says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe() -> str:
    """One line for benchmarks and warm-up: the CPU, its vector extensions, LLVM's name for it,
    and the width and register count the kernels use (and why)."""
    features = cpu_features()
    named = [f for f in _NAMED_EXTENSIONS if f in features] or ["no vector extensions named"]
    env = os.environ.get(WIDTH_ENV, "").strip()
    why = f"{WIDTH_ENV}={env}" if env else "the CPU's widest"
    regs = os.environ.get(REGISTERS_ENV, "").strip()
    regs_why = f"{REGISTERS_ENV}={regs}" if regs else "the CPU's"
    return (
        f"{cpu_model()} ({binding.get_host_cpu_name()}, {platform.machine()}: {' '.join(named)}); "
        f"kernels at {current().nbytes}-byte vectors ({why}), register tiles for "
        f"{registers()} vector registers ({regs_why})"
    )


_process_width: Width | None = None
_width: contextvars.ContextVar[Width | None] = contextvars.ContextVar("vector_width", default=None)


def current() -> Width:
    """The width the fast layers call their kernels with: :func:`using`'s, else the process's
    (chosen once, on first use)."""
    global _process_width
    w = _width.get()
    if w is not None:
        return w
    if _process_width is None:
        _process_width = Width(process_bytes())
    return _process_width


@contextlib.contextmanager
def using(nbytes: int):
    """Run the fast layers at ``nbytes`` (16, 32 or 64) inside the block (this thread/context)."""
    token = _width.set(Width(int(nbytes)))
    try:
        yield
    finally:
        _width.reset(token)


class WidthType(types.Type):
    """Numba's type of a :class:`Width`: the width is in the type, the value carries nothing."""

    def __init__(self, nbytes):
        self.nbytes = nbytes
        super().__init__(name=f"Width({nbytes})")


register_model(WidthType)(models.OpaqueModel)


@typeof_impl.register(Width)
def _typeof_width(val, c):
    return WidthType(val.nbytes)


@unbox(WidthType)
def _unbox_width(typ, obj, c):
    return NativeValue(c.context.get_constant_null(typ))


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


def _vec_for(arr, vw):
    """The Vec type for a C-contiguous float array type at width ``vw`` (a WidthType), or None
    (no typing: Numba reports the mismatch at compile time, so a strided view can never be read
    as if it were contiguous)."""
    if _is_float_array(arr) and isinstance(vw, WidthType):
        return Vec(arr.dtype, vw.nbytes // (arr.dtype.bitwidth // 8))
    return None


def _is_float_array(arr):
    """Whether ``arr`` is a C-contiguous float32 or float64 array type."""
    return (
        isinstance(arr, types.Array)
        and arr.layout == "C"
        and arr.dtype in (types.float32, types.float64)
    )


def _element_ptr(context, builder, arr_t, arr, i, i_t):
    data = context.make_array(arr_t)(context, builder, arr).data
    return builder.gep(data, [context.cast(builder, i, i_t, types.intp)])


def _vec_ptr(context, builder, vt, ptr):
    return builder.bitcast(ptr, context.get_value_type(vt).as_pointer())


@intrinsic
def lanes(typingctx, arr, vw):
    vt = _vec_for(arr, vw)
    if vt is None:
        return None

    def codegen(context, builder, sig, args):
        return context.get_constant(types.intp, vt.lanes)

    return types.intp(arr, vw), codegen


@intrinsic
def vzero(typingctx, arr, vw):
    vt = _vec_for(arr, vw)
    if vt is None:
        return None

    def codegen(context, builder, sig, args):
        return ir.Constant(context.get_value_type(vt), None)

    return vt(arr, vw), codegen


@intrinsic
def vload(typingctx, arr, i, vw):
    vt = _vec_for(arr, vw)
    if vt is None or not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        p = _element_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        return builder.load(_vec_ptr(context, builder, vt, p), align=vt.dtype.bitwidth // 8)

    return vt(arr, i, vw), codegen


@intrinsic
def vstore(typingctx, arr, i, v):
    if not (_is_float_array(arr) and isinstance(i, types.Integer) and isinstance(v, Vec)):
        return None
    if v.dtype != arr.dtype:
        return None
    vt = v

    def codegen(context, builder, sig, args):
        p = _element_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        builder.store(args[2], _vec_ptr(context, builder, vt, p), align=vt.dtype.bitwidth // 8)
        return context.get_dummy_value()

    return types.none(arr, i, v), codegen


@intrinsic
def vsplat(typingctx, arr, i, vw):
    vt = _vec_for(arr, vw)
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

    return vt(arr, i, vw), codegen


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
def prefetch(typingctx, arr, i):
    if not (_is_float_array(arr) and isinstance(i, types.Integer)):
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
