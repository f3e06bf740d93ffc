"""A worker process's malloc, tuned once: freed memory kept for the next step's arrays (glibc)."""

from __future__ import annotations

import ctypes
import functools

# glibc's mallopt parameters (<malloc.h>)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


_MALLOC_KEEP = 32 << 20  # the largest mmap threshold glibc accepts; above every per-step array


@functools.cache
def keep_freed_memory() -> bool:
    """Let this process's malloc reuse freed memory instead of returning it to the system at
    once; True when done (glibc), False elsewhere. Once per process.

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, and glibc then stops
    raising its mmap threshold as it would: every array above 128 kB (a step allocates its 16 MB
    gradients and activations afresh) is a new mapping whose pages fault in one by one, then
    unmapped when freed: a worker's step ran slower than the same step in a plain process (see
    docs/scaling.md). Here arrays up to 32 MB (glibc's largest mmap threshold) come from the
    heap, and up to 256 MB of freed memory per arena stays for the next step (more resident
    memory, as Dask's monitor sees it). Larger arrays (a float32 network past about 8M
    parameters) are still mapped afresh each time."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MALLOC_KEEP)) and bool(
        mallopt(_M_TRIM_THRESHOLD, 8 * _MALLOC_KEEP)
    )
