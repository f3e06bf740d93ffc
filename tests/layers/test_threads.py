"""Importing pipeline sets up the thread runtimes under the kernels the same way whatever the
process imported first (pipeline/_kernels/threads.py): Numba on its own TBB runtime, not on a
libgomp that PyTorch loaded with its own wait policy; OpenBLAS's short spin even when NumPy (or
torch, which imports it) loaded OpenBLAS before pipeline could set OPENBLAS_THREAD_TIMEOUT.

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

from pipeline._kernels import threads as _threads

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_TBB = _threads._tbb_path() is not None
needs_torch = pytest.mark.skipif(
    not HAS_TORCH, reason="PyTorch not installed (pip install -e '.[bench]')"
)
needs_tbb = pytest.mark.skipif(
    not HAS_TBB, reason="the tbb package is not installed (a dependency on x86-64 Linux only)"
)

# Report, after the given imports: Numba's threading layer once a parallel kernel ran, the
# libgomp copies mapped, OMP_WAIT_POLICY, and OpenBLAS's timeout (its cached environment).
PROBE = r"""
import ctypes, json, os, sys
for name in sys.argv[1:]:
    __import__(name)
import numpy as np
import numba
from pipeline import fast_layers as fl
from pipeline._kernels import threads as _threads

fl.max_pool_forward_fast(np.ones((64, 32, 32, 32), np.float32), {})  # large: runs on the pool
maps = open("/proc/self/maps").read().split()
timeouts = []
for path in _threads._loaded_openblas():
    lib = ctypes.CDLL(path)
    if hasattr(lib, "openblas_thread_timeout"):
        timeouts.append(lib.openblas_thread_timeout())
a = np.arange(160000, dtype=np.float64).reshape(400, 400) % 7
assert np.array_equal(a @ a, np.einsum("ij,jk->ik", a, a))  # GEMMs still right after a restart
print(json.dumps({"layer": numba.threading_layer(),
                  "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                  "gomp": sorted({p for p in maps if "libgomp" in p}),
                  "openblas_timeouts": timeouts,
                  "setup": __import__("pipeline")._THREAD_SETUP}))
"""


def _probe(*imports, **env_overrides):
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "OMP_WAIT_POLICY",
            "OPENBLAS_THREAD_TIMEOUT",
            "NUMBA_THREADING_LAYER",
            "NUMBA_THREADING_LAYER_PRIORITY",
        )
    }
    env.update(env_overrides)
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *imports],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
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


def test_openmp_first_in_the_users_priority_gets_the_passive_wait_policy():
    r = _probe("pipeline", NUMBA_THREADING_LAYER_PRIORITY="omp tbb workqueue")
    assert r["layer"] == "omp" and r["omp_wait_policy"] == "PASSIVE"


@pytest.mark.parametrize(
    "env, chosen",
    [
        ({}, True),
        ({"NUMBA_THREADING_LAYER": "safe"}, True),
        ({"NUMBA_THREADING_LAYER": "omp"}, False),
        ({"NUMBA_THREADING_LAYER_PRIORITY": "workqueue tbb omp"}, False),
        ({"NUMBA_THREADING_LAYER_PRIORITY": "tbb omp workqueue"}, True),
    ],
)
def test_which_settings_leave_numba_on_tbb(env, chosen):
    assert _threads.tbb_chosen(env) is chosen


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
    assert (
        _openblas(r) == [4] * len(r["openblas_timeouts"]) and r["setup"]["openblas_refreshed"] == []
    )


def test_user_settings_win():
    r = _probe(
        "numpy",
        "pipeline",
        OPENBLAS_THREAD_TIMEOUT="20",
        OMP_WAIT_POLICY="ACTIVE",
        NUMBA_THREADING_LAYER="omp",
    )
    assert (
        _openblas(r) == [20] * len(r["openblas_timeouts"])
        and r["setup"]["openblas_refreshed"] == []
    )
    assert r["layer"] == "omp" and r["omp_wait_policy"] == "ACTIVE"


def test_openblas_restart_only_from_the_main_thread():
    """A restart must not meet a GEMM on another thread: off the main thread it does nothing."""
    result = []
    t = threading.Thread(target=lambda: result.append(_threads.refresh_openblas()))
    t.start()
    t.join()
    assert result == [[]]


# ---- one launch at a time per process (Numba's TBB layer is not safe otherwise) ----------------

# kernels called only from inside other compiled kernels (never launched from Python)
INNER_KERNELS = {"_add", "_adam_piece", "_sgd_piece", "_muon_piece"}


def _parallel_kernels():
    """(module, name) of every parallel Numba kernel in the package: every module of
    pipeline._kernels (found, not listed: a new one is checked too) and the others that have
    kernels."""
    import importlib
    import pkgutil

    import numba.core.registry

    import pipeline._kernels
    from pipeline import convnet, optim
    from pipeline.training import reduce

    kernel_modules = [
        importlib.import_module(f"pipeline._kernels.{info.name}")
        for info in pkgutil.iter_modules(pipeline._kernels.__path__)
    ]
    assert {m.__name__.rsplit(".", 1)[1] for m in kernel_modules} >= {"conv", "winograd"}
    found = []
    for module in (*kernel_modules, convnet, optim, reduce):
        for name, obj in vars(module).items():
            if isinstance(obj, numba.core.registry.CPUDispatcher) and obj.targetoptions.get(
                "parallel"
            ):
                found.append((module, name))
    return found


def test_every_parallel_kernel_runs_under_the_launch_lock(monkeypatch):
    """Every parallel kernel launched from Python, on the layers' every path (direct, im2col
    and Winograd convolutions with dx, pooled in the conv's pass and dw from the pooled
    gradient, both pools, both norms, the affine forward, dx and dw with L2, Adam, L2, the
    training reduce), holds the lock."""
    import numpy as np

    from pipeline import convnet, optim
    from pipeline import fast_layers as fl
    from pipeline.training import reduce

    held: dict[str, list[bool]] = {}

    def checked(name, kernel):
        def run(*args):
            held.setdefault(name, []).append(_threads.LAUNCH_LOCK.locked())
            return kernel(*args)

        return run

    kernels = [(module, name) for module, name in _parallel_kernels() if name not in INNER_KERNELS]
    assert len(kernels) >= 20, kernels  # the search finds the package's kernels
    for module, name in kernels:
        monkeypatch.setattr(module, name, checked(name, getattr(module, name)))

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    # direct kernels, then im2col + GEMM, then direct with 8 x 8 planes side by side
    for size, plane in ((7, x), (5, x), (3, x[..., :8, :8])):
        w = rng.standard_normal((4, 3, size, size)).astype(np.float32)
        out, cache = fl.conv_relu_forward_fast(
            plane, w, np.zeros(4, np.float32), {"stride": 1, "pad": size // 2}
        )
        fl.conv_backward_fast(np.ones_like(out), cache, compute_dx=True)
    x64 = rng.standard_normal((2, 64, 7, 7)).astype(np.float32)  # Winograd
    w = rng.standard_normal((4, 64, 3, 3)).astype(np.float32)
    out, cache = fl.conv_relu_forward_fast(x64, w, np.zeros(4, np.float32), {"stride": 1, "pad": 1})
    fl.conv_backward_fast(np.ones_like(out), cache, compute_dx=True)
    for pool in (
        {"pool_height": 2, "pool_width": 2, "stride": 2},
        {"pool_height": 3, "pool_width": 3, "stride": 1},
    ):
        out, cache = fl.max_pool_forward_fast(x, pool)
        fl.max_pool_backward_fast(np.ones_like(out), cache)
    # a convolution pooled in its own pass, and its dw from the pooled gradient
    w = rng.standard_normal((4, 3, 7, 7)).astype(np.float32)
    cp, pool = {"stride": 1, "pad": 3}, {"pool_height": 2, "pool_width": 2, "stride": 2}
    out, (conv_cache, cache) = fl.conv_relu_pool_forward_fast(
        x, w, np.zeros(4, np.float32), cp, pool
    )
    fl.conv_pool_dw_fast(np.ones_like(out), conv_cache, cache)
    gamma, beta = np.ones(3, np.float32), np.zeros(3, np.float32)
    out, cache = fl.spatial_batchnorm_forward_fast(x, gamma, beta, {"mode": "train"})
    fl.spatial_batchnorm_backward_fast(np.ones_like(out), cache)
    out, cache = fl.spatial_groupnorm_forward_fast(x, gamma, beta, 3, {})
    fl.spatial_groupnorm_backward_fast(np.ones_like(out), cache)
    for forward, backward in (
        (fl.gelu_forward_fast, fl.gelu_backward_fast),
        (fl.global_avg_pool_forward_fast, fl.global_avg_pool_backward_fast),
        (fl.global_max_pool_forward_fast, fl.global_max_pool_backward_fast),
    ):
        for data in (x, x.astype(np.float64)):  # GELU has a float32 kernel of its own
            out, cache = forward(data)
            backward(np.ones_like(out), cache)
    big = np.ones((64, 32, 32, 32), np.float32)  # large enough to run on the pool, not serially
    fl.max_pool_forward_fast(big, {"pool_height": 2, "pool_width": 2, "stride": 2})
    fl.affine_relu_forward_fast(
        np.ones((4, 10), np.float32), np.ones((10, 40), np.float32), np.zeros(40, np.float32)
    )
    fl.affine_dw_l2_fast(
        np.ones((4, 10), np.float32),
        np.ones((4, 40), np.float32),
        np.ones((10, 40), np.float32),
        0.1,
    )
    fl.affine_dx_fast(np.ones((20, 40), np.float32), np.ones((10, 40), np.float32), sumsq=True)
    fl.affine_dw_sum(  # two shards' dw in one pass
        [np.ones((2, 10), np.float32)] * 2,
        [np.ones((2, 40), np.float32)] * 2,
        np.ones((10, 40), np.float32),
        [2.0, 2.0],
        (0, 1),
        np.empty((10, 40), np.float32),
    )
    w = np.ones(1000, np.float32)
    optim.adam(w, w.copy(), {})
    convnet.add_l2(w.copy(), w, 1e-3)
    reduce.warm_kernels(np.float32)  # tree_adam (and add_scaled)

    launched = {name for _, name in kernels}
    assert set(held) == launched, launched ^ set(held)  # every kernel was reached ...
    assert all(all(v) for v in held.values()), held  # ... and always under the lock
    assert not _threads.LAUNCH_LOCK.locked()


def test_a_serial_launch_restores_the_threads_count():
    import numba
    import numpy as np

    from pipeline._kernels import pool as kp

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("NUMBA_NUM_THREADS < 2: no thread count to restore")
    before = numba.get_num_threads()
    _threads.set_threads(2)
    try:
        x = np.ones((1, 16), np.float32)
        out, idx = np.empty((1, 4), np.float32), np.empty((1, 4), np.int32)
        seen = []

        def probe(*args):
            seen.append(numba.get_num_threads())
            return kp.pool_forward_2x2(*args)

        _threads.launch(probe, x, 4, 4, False, out, idx, serial=True)
        _threads.launch(probe, x, 4, 4, False, out, idx)
        assert seen == [1, 2] and numba.get_num_threads() == 2
    finally:
        _threads.set_threads(before)


STRESS = r"""
import sys, threading
import numpy as np, numba
import pipeline
from pipeline._kernels import threads as _threads
from pipeline.cnn import ThreeLayerConvNet
from pipeline import optim

errors = []
def work(seed):
    try:
        rng = np.random.default_rng(seed)
        m = ThreeLayerConvNet(hidden_dim=20, num_filters=8, weight_scale=1e-2, seed=seed,
                              normalization=(None, "spatial_batchnorm", "groupnorm")[seed % 3])
        X = rng.standard_normal((16, 3, 32, 32)).astype(np.float32)
        y = rng.integers(0, 10, 16)
        cfg = {}
        for i in range(25):
            _threads.set_threads(1 + (i + seed) % 2)
            loss, grads = m.loss(X, y)
            cfg = optim.adam(m.params["W2"], grads["W2"], cfg)[1]
    except Exception as e:
        errors.append(repr(e))
for rounds in range(4):   # new threads each round, as a Dask worker starts them after a secede
    threads = [threading.Thread(target=work, args=(s,)) for s in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
print(numba.threading_layer(), errors)
"""


def test_threads_of_one_process_launching_kernels_at_once():
    """Six threads at a time run the model with different thread counts: on TBB this crashed
    the process (in numba.get_num_threads) before launches took turns."""
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_THREADING_LAYER",)}
    env["NUMBA_NUM_THREADS"] = "2"
    out = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", STRESS],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    layer, errors = out.stdout.strip().splitlines()[-1].split(" ", 1)
    assert errors == "[]"
    if HAS_TBB:
        assert layer == "tbb"
