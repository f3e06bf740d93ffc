"""CIFAR-10 data: sources, a safe unpickler, the Zarr store and its reader, the conversion job.

Public API::

    from pipeline.data import open_store, prepare
    store = open_store("data/cifar10.zarr")
    X, y = store.read("train", indices, dtype=np.float32)   # mean-subtracted, y int64

Imports nothing of training (``pipeline.cnn``, ``pipeline.training``).
"""

from pipeline.data.store import CifarStore, open_store

__all__ = ["CifarStore", "open_store", "prepare", "PrepareResult", "load_pickle", "UnsafePickleError"]


def __getattr__(name):  # lazy: the reader must not pay for importing the conversion job
    if name in ("prepare", "PrepareResult"):
        from pipeline.data import convert as _prepare

        return getattr(_prepare, name)
    if name in ("load_pickle", "UnsafePickleError"):
        from pipeline.data import safe_pickle

        return getattr(safe_pickle, name)
    raise AttributeError(f"module 'pipeline.data' has no attribute {name!r}")
