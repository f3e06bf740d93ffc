"""A training step allocates its activations, im2col columns and gradients afresh and frees them;
the next step asks for the same sizes. Under Dask's default for worker processes
(MALLOC_TRIM_THRESHOLD_=65536) glibc maps every array above 128 kB afresh and its pages fault
in again (a 128-image three-layer step took 124 ms instead of 96 ms; the airbench-small
network's 329 ms instead of 273 ms). The workers convpipe starts run with
:data:`pipeline.cluster.MALLOC_ENV`; :func:`pipeline.training.memory.keep_freed_memory` is the
fallback for workers started otherwise. These checks count page faults in fresh processes
(no timing), the arrays allocated in a thread as a Dask worker's task thread does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cluster import MALLOC_ENV

ROOT = Path(__file__).resolve().parents[2]

PROBE = r"""
import resource, sys, threading
import numpy as np
from pipeline.training.memory import keep_freed_memory
if sys.argv[1] == "tuned":
    assert keep_freed_memory() and keep_freed_memory()   # True, and again (once per process)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
counts = []
def task():                                               # as a worker's task thread
    for mb in map(int, sys.argv[2:]):
        a = np.ones(mb << 18, np.float32)
        del a
        before = faults()
        for _ in range(10):
            a = np.ones(mb << 18, np.float32)
            del a
        counts.append(faults() - before)
t = threading.Thread(target=task)
t.start()
t.join()
print(*counts)
"""

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc's malloc (Linux)"
)

DASK_DEFAULT = {"MALLOC_TRIM_THRESHOLD_": "65536"}  # what Dask's nanny sets for its workers


def _faults(mode: str, env: dict[str, str], *megabytes: int) -> list[int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode, *map(str, megabytes)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return [int(n) for n in out.stdout.split()]


def test_freed_arrays_are_reused_under_the_nannys_malloc_setting():
    """The fallback (mallopt in a running worker): a 16 MB array (W2's gradient) and a 48 MB
    one (within a thread's arena) come back from the heap."""
    untuned, tuned = _faults("plain", DASK_DEFAULT, 16, 48), _faults("tuned", DASK_DEFAULT, 16, 48)
    assert max(tuned) < 10, (tuned, untuned)  # no new pages
    assert min(untuned) > 10 * max(max(tuned), 1), untuned  # untuned, each faulted in again


def test_the_workers_malloc_settings_reuse_even_the_largest_arrays():
    """A 128 MB array (the airbench network's im2col columns at batch 256) from a thread: with
    the workers' settings from the start it comes back from the heap; the fallback alone cannot
    do that (the thread's arena maps it afresh)."""
    (started,) = _faults("plain", MALLOC_ENV, 128)
    (fallback,) = _faults("tuned", DASK_DEFAULT, 128)
    assert started < 10, started
    assert fallback > 10 * max(started, 1), fallback


def test_the_compose_workers_start_with_the_same_malloc_settings():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    env = compose["services"]["worker"]["environment"]
    assert {k: str(env.get(k)) for k in MALLOC_ENV} == MALLOC_ENV
