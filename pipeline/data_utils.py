"""cs231n-style data helpers: ``get_CIFAR10_data`` from a store, ``load_CIFAR10`` from batches.

``get_CIFAR10_data`` reads a store written by ``convpipe data prepare`` and returns the dict
the Solver takes; without ``store`` it finds one (``$CONVPIPE_DATA/cifar10.zarr``, else
``data/cifar10.zarr`` here or in the checkout: :func:`pipeline.data.find_store`).
``load_CIFAR10`` reads a ``cifar-10-batches-py`` folder as cs231n's does (NHWC float64),
but through the restricted unpickler.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from pipeline.data import find_store, open_store
from pipeline.data.sources import META, TEST_BATCH, TRAIN_BATCHES, read_batch, read_meta
from pipeline.errors import DataError


def load_CIFAR_batch(filename, n_classes: int = 10):
    """One batch file: (X (n, 32, 32, 3) float64, Y (n,) int64), as cs231n returns it."""
    X, Y = read_batch(filename, os.fspath(filename), n_classes)
    return X.transpose(0, 2, 3, 1).astype("float"), Y


def load_CIFAR10(ROOT):
    """All of CIFAR-10 from a ``cifar-10-batches-py`` folder: Xtr, Ytr, Xte, Yte (cs231n).

    X are (n, 32, 32, 3) float64 in 0..255, Y int64.
    """
    root = os.fspath(ROOT)
    meta = os.path.join(root, META)
    n_classes = len(read_meta(meta, meta)) if os.path.exists(meta) else 10
    for name in (*TRAIN_BATCHES, TEST_BATCH):
        if not os.path.exists(os.path.join(root, name)):
            raise DataError(f"{root}: missing batch {name}")
    xs, ys = zip(*(load_CIFAR_batch(os.path.join(root, b), n_classes) for b in TRAIN_BATCHES))
    Xte, Yte = load_CIFAR_batch(os.path.join(root, TEST_BATCH), n_classes)
    return np.concatenate(xs), np.concatenate(ys), Xte, Yte


def get_CIFAR10_data(
    num_training=49000,
    num_validation=1000,
    num_test=1000,
    subtract_mean=True,
    store=None,
    dtype=np.float32,
):
    """The dict the Solver takes, from a store (cs231n's ``get_CIFAR10_data``).

    X_train: the first ``num_training`` train images, X_val: the first ``num_validation``
    val images, X_test: the first ``num_test`` test images, all (N, 3, 32, 32) in ``dtype``;
    y_* int64. Stores keep every split in a shuffled order, so the first images of a split
    are a sample of all classes. With ``subtract_mean`` the mean of X_train (as returned)
    is subtracted from all three, as cs231n does. ``store``: the store's path; None finds
    it (``$CONVPIPE_DATA/cifar10.zarr``, else ``data/cifar10.zarr``), with an error that
    says how to make one. Asking for more images than a split holds is a DataError.
    """
    s = open_store(find_store() if store is None else store)
    if "shuffle_seed" not in s.attrs:
        warnings.warn(
            f"{s.path}: a store of format {s.attrs.get('format_version')} keeps its source's "
            "order, so the first images of a split may be few classes (an image folder's "
            "are one); `convpipe data prepare --force` rebuilds it shuffled",
            stacklevel=2,
        )
    wanted = {
        "train": ("num_training", num_training),
        "val": ("num_validation", num_validation),
        "test": ("num_test", num_test),
    }
    out = {}
    for split, (param, n) in wanted.items():
        have = s.splits.get(split, 0)
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise DataError(f"{param} must be an integer >= 0, got {n!r}")
        if n > have:
            raise DataError(f"{s.path}: asked for {n} {split} images, the store has {have}")
        X, y = s.read_uint8(split, np.arange(n), cache=False)
        out[split] = (X.astype(dtype), y)
    if subtract_mean and num_training > 0:
        mean = out["train"][0].mean(axis=0, dtype=np.float64).astype(dtype)
        for split in out:
            out[split][0][...] -= mean
    return {
        "X_train": out["train"][0],
        "y_train": out["train"][1],
        "X_val": out["val"][0],
        "y_val": out["val"][1],
        "X_test": out["test"][0],
        "y_test": out["test"][1],
    }
