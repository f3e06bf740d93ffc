"""Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which stops glibc from
raising its mmap threshold: every large array a step allocates became a fresh mapping whose
pages fault in again (a 128-image step took 124 ms instead of 96 ms). Worker tasks call
:func:`pipeline.training.memory.keep_freed_memory`; these checks count page faults in a fresh
process started with the nanny's setting (no timing)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = r"""
import resource, sys
import numpy as np
from pipeline.training.memory import keep_freed_memory
if sys.argv[1] == "tuned":
    assert keep_freed_memory() and keep_freed_memory()   # True, and again (once per process)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
a = np.ones(4 << 20, np.float32)                          # 16 MB, as W2's gradient
del a
before = faults()
for _ in range(10):
    a = np.ones(4 << 20, np.float32)
    del a
print(faults() - before)
"""

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc's mallopt (Linux)"
)


def _faults(mode: str) -> int:
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"}  # what Dask's nanny sets
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


def test_freed_arrays_are_reused_under_the_nannys_malloc_setting():
    untuned, tuned = _faults("plain"), _faults("tuned")
    assert tuned < 10, (tuned, untuned)  # the 16 MB come back from the heap: no new pages
    assert untuned > 10 * max(tuned, 1), untuned  # untuned, each array faulted its pages in again
