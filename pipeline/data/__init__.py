"""CIFAR-10 data: sources, a safe unpickler, the Zarr store and its reader, the conversion job.

Public API::

    from pipeline.data import open_store, prepare
    store = open_store("data/cifar10.zarr")
    X, y = store.read("train", indices, dtype=np.float32)   # mean-subtracted, y int64
    verify_store("data/cifar10.zarr").damaged                # every chunk checked

Where data lives (``DEFAULT_STORE``, ``data_root()``, ``default_store()``, ``find_store()``,
``$CONVPIPE_DATA``) is :mod:`pipeline.data.paths`. Imports nothing of training
(``pipeline.cnn``, ``pipeline.training``).
"""

from pipeline.data.paths import DEFAULT_STORE, data_root, default_store, find_store
from pipeline.data.store import CifarStore, VerifyReport, open_store, verify_store

__all__ = [
    "CifarStore",
    "open_store",
    "verify_store",
    "VerifyReport",
    "prepare",
    "PrepareResult",
    "load_pickle",
    "UnsafePickleError",
    "DEFAULT_STORE",
    "data_root",
    "default_store",
    "find_store",
]


def __getattr__(name):  # lazy: the reader must not pay for importing the conversion job
    if name in ("prepare", "PrepareResult"):
        from pipeline.data import convert as _prepare  # noqa: PLC0415 (lazy: see __getattr__)

        return getattr(_prepare, name)
    if name in ("load_pickle", "UnsafePickleError"):
        from pipeline.data import safe_pickle  # noqa: PLC0415 (lazy: see __getattr__)

        return getattr(safe_pickle, name)
    raise AttributeError(f"module 'pipeline.data' has no attribute {name!r}")
