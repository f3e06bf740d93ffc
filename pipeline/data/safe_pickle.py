"""A restricted unpickler for CIFAR-10 batches: plain containers and numeric numpy arrays only.

The CIFAR-10 "python version" batches are pickles downloaded from the internet, and
``pickle.load`` runs whatever callable a pickle names. :func:`load_pickle` resolves only the
handful of globals that real batches (and numpy array pickles in general) reference:

- ``numpy.core.multiarray._reconstruct`` / ``numpy._core.multiarray._reconstruct`` (ndarray,
  protocols 0-4; ``numpy.core`` is what Python 2's cPickle and numpy 1 wrote),
- ``numpy.ndarray``, ``numpy.dtype``,
- ``numpy.core.multiarray.scalar`` (numpy scalars), ``numpy.core.numeric._frombuffer``
  (ndarray, protocol 5),
- ``_codecs.encode`` with the latin-1 codec only (how Python 3 writes ``bytes`` at protocol 2).

Any other global (``os.system``, ``builtins.eval``, ``subprocess.Popen``, ...) is refused
*before* it is looked up, so the code a crafted pickle names never runs. After loading, the
object is checked to contain only dict, list, tuple, str, bytes, int, float, bool, None,
numeric numpy arrays and numpy scalars.

Python 2 batches store their keys as byte strings; they are loaded with ``encoding="bytes"``
(as torchvision and cs231n do), so keys come back as ``bytes``: :func:`str_keys` turns them
into ``str``.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any

import numpy as np

from pipeline.errors import DataError

__all__ = ["UnsafePickleError", "load_pickle", "loads_pickle", "str_keys"]

#: numeric dtype kinds an array or scalar may have: bool, signed, unsigned, float, complex
_PLAIN_KINDS = frozenset("biufc")


class UnsafePickleError(DataError):
    """A pickle references something a CIFAR-10 batch never contains; it was not run."""


class _Refused(pickle.UnpicklingError):
    """Internal: raised inside the unpickler, turned into UnsafePickleError with the file name."""


def _plain_dtype(dtype: Any) -> np.dtype:
    dt = np.dtype(dtype)
    if dt.hasobject or dt.kind not in _PLAIN_KINDS:
        raise _Refused(f"an array of dtype {dt!s}, not a plain numeric dtype")
    return dt


def _reconstruct(subtype, shape, dtype_code):
    if subtype is not np.ndarray:
        raise _Refused(
            f"an array of type {getattr(subtype, '__name__', subtype)!r}, not numpy.ndarray"
        )
    # an empty array whatever shape the pickle names: __setstate__ gives shape, dtype and data
    return np.ndarray.__new__(np.ndarray, (0,), np.uint8)


def _dtype(spec, align=False, copy=False):
    if isinstance(spec, bytes):  # Python 2 str
        spec = spec.decode("latin1")
    if not isinstance(spec, str):
        raise _Refused(f"a dtype built from {type(spec).__name__}")
    return _plain_dtype(np.dtype(spec, bool(align), bool(copy)))


def _scalar(dtype, data=None):
    dt = _plain_dtype(dtype)
    if isinstance(data, str):  # Python 2 str loaded with encoding='latin1'
        data = data.encode("latin1")
    if not isinstance(data, (bytes, bytearray)) or len(data) != dt.itemsize:
        raise _Refused("a numpy scalar without its raw bytes")
    return np.frombuffer(bytes(data), dtype=dt)[0]


def _frombuffer(buf, dtype, shape, order):
    dt = _plain_dtype(dtype)
    if not isinstance(buf, (bytes, bytearray, memoryview, pickle.PickleBuffer)):
        raise _Refused(f"an array buffer of type {type(buf).__name__}")
    if order not in ("C", "F"):
        raise _Refused(f"an array of memory order {order!r}")
    arr = np.frombuffer(buf, dtype=dt)
    return arr.reshape(shape, order=order)


def _codecs_encode(obj, encoding="utf-8", errors="strict"):
    if encoding not in ("latin1", "latin-1", "iso-8859-1") or not isinstance(obj, str):
        raise _Refused(f"_codecs.encode with the {encoding!r} codec")
    return obj.encode("latin1", errors)


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _codecs_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise _Refused(f"it references {module}.{name}") from None

    def persistent_load(self, pid):
        raise _Refused("it uses a persistent id")


def _check_plain(obj: Any, depth: int = 0) -> None:
    if depth > 32:
        raise _Refused("it nests containers more than 32 deep")
    if obj is None or isinstance(obj, (str, bytes, bool, int, float)):
        return
    if isinstance(obj, np.ndarray):
        if type(obj) is not np.ndarray:
            raise _Refused(f"an array of type {type(obj).__name__}")
        _plain_dtype(obj.dtype)
        return
    if isinstance(obj, np.generic):
        _plain_dtype(obj.dtype)
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, depth + 1)
            _check_plain(v, depth + 1)
        return
    if isinstance(obj, (list, tuple)):
        for v in obj:
            _check_plain(v, depth + 1)
        return
    raise _Refused(f"an object of type {type(obj).__name__}")


def loads_pickle(data: bytes, name: str, *, encoding: str = "bytes") -> Any:
    """Load a pickle from ``data`` with the restricted unpickler; ``name`` is used in errors.

    ``encoding`` is how Python 2 ``str`` objects are decoded ("bytes" keeps them bytes,
    as torchvision and cs231n load CIFAR-10). Raises :class:`UnsafePickleError` for a pickle
    that references anything but plain data, :class:`DataError` for a corrupt one.
    """
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()
        _check_plain(obj)
    except _Refused as exc:
        raise UnsafePickleError(
            f"{name}: refused to load this pickle: {exc}, which a CIFAR-10 batch never "
            "contains (the file may be malicious; nothing in it was run)"
        ) from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        IndexError,
        KeyError,
        AttributeError,
        OverflowError,
        MemoryError,
        UnicodeError,
    ) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{name}: corrupt or truncated pickle ({reason})") from None
    return obj


def load_pickle(
    path: str | os.PathLike, *, encoding: str = "bytes", name: str | None = None
) -> Any:
    """Load the pickle file at ``path`` with the restricted unpickler (see :func:`loads_pickle`)."""
    label = name or os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise DataError(f"{label}: cannot read ({exc.strerror or exc})") from None
    return loads_pickle(data, label, encoding=encoding)


def str_keys(d: dict) -> dict:
    """A copy of dict ``d`` with bytes keys decoded as latin-1 (Python 2 ``str`` keys)."""
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in d.items()}
