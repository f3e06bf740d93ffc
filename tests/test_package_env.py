"""Importing pipeline sets the thread-runtime defaults it documents, and a user's setting wins."""

import os
import subprocess
import sys

PROBE = (
    "import os, pipeline; "
    "print(os.environ['OMP_WAIT_POLICY'], os.environ['OPENBLAS_THREAD_TIMEOUT'])"
)


def _probe(**overrides):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT")
    }
    env.update(overrides)
    return subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    ).stdout.split()


def test_import_sets_passive_openmp_and_short_openblas_spin():
    # PASSIVE matters when Numba runs on OpenMP (without TBB, or chosen);
    # tests/layers/test_threads.py
    assert _probe(NUMBA_THREADING_LAYER="omp") == ["PASSIVE", "4"]


def test_user_settings_win():
    assert _probe(OMP_WAIT_POLICY="ACTIVE", OPENBLAS_THREAD_TIMEOUT="20") == ["ACTIVE", "20"]
