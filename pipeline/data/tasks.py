"""The conversion's worker tasks: stage a CIFAR-10 batch (restricted unpickler, raw .npy beside
the store), write a split's rows from the staged batches, decode and write a range of images.
Each returns a user error as a value (``guarded``) instead of failing on the worker."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from pipeline.checkpoint import NPY_READ_LOCK
from pipeline.data import sources as S
from pipeline.data.store import IMAGE_SHAPE, write_block
from pipeline.errors import DataError


def warm_up(worker: str) -> str:
    return worker


def guarded(fn):
    """Run a worker task so that a user error comes back as a value, not as a failed task
    (which Dask would log with a traceback on the worker); skip it once the job is aborted."""

    def task(abort_flag: str, *args):
        if os.path.exists(abort_flag):
            return ("aborted", None)
        try:
            return ("ok", fn(*args))
        except DataError as exc:
            return ("error", exc)

    task.__name__ = task.__qualname__ = fn.__name__
    task.__module__ = fn.__module__
    return task


def stage_batch(path: str, name: str, dest: str, remove_source: bool) -> tuple[int, np.ndarray]:
    """Unpickle one batch safely and check it; save its pixels as a raw (n, 3072) uint8 .npy
    at ``dest`` (read back by slices, no unpickling); return (n, labels int64)."""
    X, y = S.read_batch(Path(path), name, None)
    np.save(dest, X.reshape(len(X), -1), allow_pickle=False)
    if remove_source:
        os.unlink(path)
    return len(X), y


stage_batch = guarded(stage_batch)


def write_rows(
    store: str,
    split: str,
    start: int,
    files: list,
    rows: np.ndarray,
    labels: np.ndarray,
    want_sum: bool,
) -> tuple[int, np.ndarray | None]:
    """Rows ``start:start+n`` of ``split``: the source images ``rows`` (int64 (n,), in the
    stored order), gathered from the split source's staged files [(npy path, first row,
    end row)] of (rows, 3072) uint8 pixels."""
    X = np.empty((len(rows), S.PIXELS), np.uint8)
    for path, lo, hi in files:
        sel = np.flatnonzero((rows >= lo) & (rows < hi))
        if sel.size:
            with NPY_READ_LOCK:  # the header is parsed with ast (see the lock)
                part = np.load(path, mmap_mode="r", allow_pickle=False)
            X[sel] = part[rows[sel] - lo]
    X = X.reshape(-1, *IMAGE_SHAPE)
    write_block(store, split, start, X, labels)
    return len(X), (X.reshape(len(X), -1).sum(axis=0, dtype=np.int64) if want_sum else None)


write_rows = guarded(write_rows)


def write_images(
    store: str,
    split: str,
    start: int,
    names: list,
    labels: list,
    pack: str | None,
    offsets: list | None,
    paths: list | None,
    label: str,
    want_sum: bool,
) -> tuple[int, np.ndarray | None, list | None]:
    """Decode images (from a pack file of concatenated bytes, or from files) and write them."""
    n = len(names)
    X = np.empty((n, *IMAGE_SHAPE), np.uint8)
    md5s = None
    if pack is not None:
        with open(pack, "rb") as f:
            blob = f.read()
        for i, name in enumerate(names):
            X[i] = S.decode_image(blob[offsets[i] : offsets[i + 1]], f"{label}:{name}")
    else:
        md5s = []
        for i, path in enumerate(paths):
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as exc:
                raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
            md5s.append(hashlib.md5(data).hexdigest())
            X[i] = S.decode_image(data, path)
    write_block(store, split, start, X, np.asarray(labels, dtype=np.int64))
    return n, (X.reshape(n, -1).sum(axis=0, dtype=np.int64) if want_sum else None), md5s


write_images = guarded(write_images)
