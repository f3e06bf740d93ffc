"""Importing pipeline sets up the thread runtimes under the kernels the same way whatever the
process imported first (pipeline/_threads.py): Numba on its own TBB runtime, not on a libgomp
that PyTorch loaded with its own wait policy; OpenBLAS's short spin even when NumPy (or torch,
which imports it) loaded OpenBLAS before pipeline could set OPENBLAS_THREAD_TIMEOUT.

Each check runs in a fresh process; no timing is measured (benchmarks/bench_epoch.py does).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading

import pytest

from pipeline import _threads

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_TBB = _threads._tbb_path() is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="PyTorch not installed (pip install -e '.[bench]')")
needs_tbb = pytest.mark.skipif(not HAS_TBB, reason="the tbb package is not installed (a dependency on x86-64 Linux only)")

# Report, after the given imports: Numba's threading layer once a parallel kernel ran, the
# libgomp copies mapped, OMP_WAIT_POLICY, and OpenBLAS's timeout (its cached environment).
PROBE = r"""
import ctypes, json, os, sys
for name in sys.argv[1:]:
    __import__(name)
import numpy as np
import numba
from pipeline import _threads, fast_layers as fl

fl.max_pool_forward_fast(np.ones((64, 32, 32, 32), np.float32), {})  # large: runs on the pool
maps = open("/proc/self/maps").read().split()
timeouts = []
for path in _threads._loaded_openblas():
    lib = ctypes.CDLL(path)
    if hasattr(lib, "openblas_thread_timeout"):
        timeouts.append(lib.openblas_thread_timeout())
a = np.arange(160000, dtype=np.float64).reshape(400, 400) % 7
assert np.array_equal(a @ a, np.einsum("ij,jk->ik", a, a))  # GEMMs still right after a restart
print(json.dumps({"layer": numba.threading_layer(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                  "gomp": sorted({p for p in maps if "libgomp" in p}), "openblas_timeouts": timeouts,
                  "setup": __import__("pipeline")._THREAD_SETUP}))
"""


def _probe(*imports, **env_overrides):
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT", "NUMBA_THREADING_LAYER")}
    env.update(env_overrides)
    out = subprocess.run([sys.executable, "-c", PROBE, *imports], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_torch
@needs_tbb
def test_torch_imported_first_numba_still_runs_on_tbb():
    """torch loads its libgomp (default, spinning wait policy) before pipeline: the kernels must
    not run on it. They run on TBB, and torch's runtime keeps its own defaults."""
    r = _probe("torch", "pipeline")
    assert any("torch" in p for p in r["gomp"]), r  # torch's OpenMP runtime really is loaded first
    assert r["layer"] == "tbb"
    assert r["omp_wait_policy"] is None  # nothing of ours runs on OpenMP: torch's runtime untouched


@needs_tbb
def test_pipeline_first_runs_on_tbb_too():
    r = _probe("pipeline")
    assert r["layer"] == "tbb" and r["omp_wait_policy"] is None
    assert r["setup"]["tbb"] and r["setup"]["tbb"].endswith(_threads.TBB_LIBRARY)


def test_openmp_layer_chosen_by_the_user_gets_the_passive_wait_policy():
    r = _probe("pipeline", NUMBA_THREADING_LAYER="omp")
    assert r["layer"] == "omp" and r["omp_wait_policy"] == "PASSIVE"


def _openblas(r):
    if not r["openblas_timeouts"]:
        pytest.skip("NumPy's BLAS is not an OpenBLAS that reports its thread timeout")
    return r["openblas_timeouts"]


def test_openblas_short_spin_when_numpy_was_imported_first():
    r = _probe("numpy", "pipeline")
    assert _openblas(r) == [4] * len(r["openblas_timeouts"])
    assert r["setup"]["openblas_refreshed"]  # OpenBLAS had started with the default: restarted


@needs_torch
def test_openblas_short_spin_when_torch_was_imported_first():
    r = _probe("torch", "pipeline")
    assert _openblas(r) == [4] * len(r["openblas_timeouts"])


def test_openblas_no_restart_when_pipeline_comes_first():
    r = _probe("pipeline")
    assert _openblas(r) == [4] * len(r["openblas_timeouts"]) and r["setup"]["openblas_refreshed"] == []


def test_user_settings_win():
    r = _probe("numpy", "pipeline", OPENBLAS_THREAD_TIMEOUT="20", OMP_WAIT_POLICY="ACTIVE",
               NUMBA_THREADING_LAYER="omp")
    assert _openblas(r) == [20] * len(r["openblas_timeouts"]) and r["setup"]["openblas_refreshed"] == []
    assert r["layer"] == "omp" and r["omp_wait_policy"] == "ACTIVE"


def test_openblas_restart_only_from_the_main_thread():
    """A restart must not meet a GEMM on another thread: off the main thread it does nothing."""
    result = []
    t = threading.Thread(target=lambda: result.append(_threads.refresh_openblas()))
    t.start()
    t.join()
    assert result == [[]]
