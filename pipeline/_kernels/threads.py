"""The thread runtimes under the layers, set up when ``pipeline`` is imported, so that its
speed does not depend on what the process imported first (PyTorch, NumPy).

A training step alternates Numba's parallel kernels with NumPy's OpenBLAS GEMMs on the same
cores; a runtime whose idle threads spin after its work starves the other one.

- Numba's threading layer is TBB where the ``tbb`` package is installed (a dependency on
  x86-64 Linux). pip puts ``libtbb.so.12`` in ``<prefix>/lib``, where the dynamic loader does
  not look, so :func:`load_tbb` loads it by path; Numba, which tries TBB first, then takes it
  when the first parallel kernel runs. TBB is a runtime of its own: nothing else in the process
  shares it. The OpenMP layer it replaces binds to the first ``libgomp`` loaded into the
  process, e.g. PyTorch's, which keeps the wait policy it read when it loaded: a notebook that
  imported torch first ran every kernel with spinning threads.
- Without TBB (another platform, or ``NUMBA_THREADING_LAYER=omp``), Numba uses OpenMP and
  ``OMP_WAIT_POLICY=PASSIVE`` is set by default: a runtime loaded after this import reads it,
  so there the import order still matters (import pipeline first).
- ``OPENBLAS_THREAD_TIMEOUT=4`` by default: OpenBLAS's idle threads spin for up to 2**28 cycles
  after each GEMM, into the Numba kernels that follow. OpenBLAS reads it when NumPy loads; when
  NumPy was imported first (as PyTorch does), :func:`refresh_openblas` makes OpenBLAS read its
  environment again and restart its threads, which then spin 2**4 cycles.

A setting of the user's (environment variable) always wins.

Numba's TBB layer is not safe when several threads of one process launch parallel kernels or
change their thread counts at once (a Dask worker with several threads, an in-process test
cluster: it segfaulted in ``numba.get_num_threads``; numba issue 10563 is the same crash in
Numba's own tests). Every parallel kernel of the package runs through :func:`launch`, and
thread counts change through :func:`set_threads`, under one lock per process: kernels of two
threads take turns (each still uses its thread count), while their NumPy work runs at once.

TBB hands a ``prange`` loop's chunks to its threads as they come free, so a kernel must never
accumulate across iterations into a variable outside the loop (Numba would keep one partial sum
per thread, added in an order that changes from run to run): every kernel's sums stay inside one
iteration or over fixed chunks, which keeps the same bits on any thread count.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from importlib import metadata

#: held while a parallel kernel runs or Numba's thread count changes (see the module docstring)
LAUNCH_LOCK = threading.Lock()

TBB_LIBRARY = "libtbb.so.12"  # the name Numba's TBB layer links against (TBB 2021 and later)
TBB_LAYERS = (
    "default",
    "tbb",
    "safe",
    "threadsafe",
    "forksafe",
)  # NUMBA_THREADING_LAYER values that take TBB


def launch(kernel, *args, serial: bool = False):
    """Run a parallel Numba kernel with the process's launch lock held, on this thread's Numba
    thread count, or on one thread when ``serial`` (the count is restored); its return value."""
    import numba  # noqa: PLC0415 (lazy: Numba loads after configure())

    with LAUNCH_LOCK:
        threads = numba.get_num_threads()
        if not serial or threads == 1:
            return kernel(*args)
        numba.set_num_threads(1)
        try:
            return kernel(*args)
        finally:
            numba.set_num_threads(threads)


def set_threads(n: int) -> int:
    """Set this thread's Numba thread count to ``n``, within 1 and NUMBA_NUM_THREADS;
    the count set."""
    import numba  # noqa: PLC0415 (lazy: Numba loads after configure())

    n = max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))
    with LAUNCH_LOCK:
        numba.set_num_threads(n)
    return n


def configure() -> dict:
    """Set up the runtimes as the module docstring says; returns what was done (for tests)."""
    numpy_first = "numpy" in sys.modules
    user_timeout = "OPENBLAS_THREAD_TIMEOUT" in os.environ
    tbb = load_tbb()
    if tbb is None or not tbb_chosen(os.environ):
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    refreshed = refresh_openblas() if numpy_first and not user_timeout else []
    return {"tbb": tbb, "openblas_refreshed": refreshed}


def tbb_chosen(env) -> bool:
    """Whether Numba, given environment ``env`` and TBB available, picks TBB: a layer setting
    that allows it, with TBB first in ``NUMBA_THREADING_LAYER_PRIORITY`` (its default order)."""
    if env.get("NUMBA_THREADING_LAYER", "default").lower() not in TBB_LAYERS:
        return False
    priority = env.get("NUMBA_THREADING_LAYER_PRIORITY", "tbb omp workqueue").lower().split()
    return not priority or priority[0] == "tbb"


def load_tbb() -> str | None:
    """Load the ``tbb`` package's libtbb.so.12 (Linux) so Numba's TBB layer can link to it;
    its path, or None when there is none (or it does not load)."""
    if not sys.platform.startswith("linux"):
        return None
    path = _tbb_path()
    if path is None:
        return None
    try:
        ctypes.CDLL(path)  # then the loader finds it by its soname, as Numba asks for it
    except OSError:
        return None
    return path


def _tbb_path() -> str | None:
    """The ``tbb`` package's libtbb.so.12: where pip puts it (``<prefix>/lib``), else where the
    package's metadata says (a slower lookup)."""
    usual = os.path.join(sys.prefix, "lib", TBB_LIBRARY)
    if os.path.exists(usual):
        return os.path.realpath(usual)

    try:
        files = metadata.files("tbb") or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == TBB_LIBRARY:
            path = f.locate()
            if os.path.exists(path):
                return os.path.realpath(path)
    return None


def refresh_openblas() -> list[str]:
    """Make every OpenBLAS loaded in this process re-read its environment (thread timeout) and
    restart its threads with it, as OpenBLAS does after a fork; the paths refreshed.

    Only from the main thread: a restart must not meet a GEMM running on another thread.
    """
    if threading.current_thread() is not threading.main_thread():
        return []
    done = []
    for path in _loaded_openblas():
        try:
            lib = ctypes.CDLL(path)
            read_env, shutdown = lib.openblas_read_env, lib.blas_thread_shutdown_
        except (OSError, AttributeError):
            continue
        read_env()
        shutdown()  # the next threaded call starts the threads again, with the new timeout
        done.append(path)
    return done


def _loaded_openblas() -> list[str]:
    """Paths of the OpenBLAS libraries mapped into this process (Linux)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {
                parts[5].strip() for parts in (line.split(None, 5) for line in f) if len(parts) == 6
            }
    except OSError:
        return []
    return sorted(p for p in paths if "openblas" in os.path.basename(p).lower() and ".so" in p)
