"""A worker process's malloc, tuned once: freed memory kept for the next step's arrays (glibc)."""

from __future__ import annotations

import ctypes
import functools

from pipeline.cluster import MALLOC_ENV

# glibc's mallopt parameters (<malloc.h>)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


@functools.cache
def keep_freed_memory() -> bool:
    """Let this process's malloc reuse freed memory instead of returning it to the system at
    once; True when done (glibc), False elsewhere. Once per process; every worker task calls it.

    The worker processes convpipe starts (the embedded cluster's, the compose files') already
    start so (``pipeline.cluster.MALLOC_ENV``). A worker started otherwise runs with Dask's
    ``MALLOC_TRIM_THRESHOLD_=65536``, under which every array above 128 kB is a fresh mapping
    whose pages fault in one by one (a 128-image three-layer step took 124 ms instead of 96 ms,
    docs/scaling.md). Here, as far as a running process can: nothing is mapped by malloc any
    more (``M_MMAP_MAX = 0``) and up to 1 GiB of freed memory stays for the next step. The task
    thread's arena was chosen when the thread started, and glibc still maps afresh an array too
    large for a thread's arena (64 MB): only ``MALLOC_ARENA_MAX=1`` at the process's start
    brings those from the main heap too."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    keep = int(MALLOC_ENV["MALLOC_TRIM_THRESHOLD_"])
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, keep))
