"""The CIFAR store: a Zarr v3 group of uint8 images and labels per split, its writer and reader.

Layout (format ``convpipe.cifar``, version 1)::

    STORE/                    group; attributes below
      train/images            uint8 (N, 3, 32, 32), chunks (chunk, 3, 32, 32), Blosc zstd
      train/labels            uint8 (N,) (int32 if there are more than 256 classes),
                              chunks (chunk,) aligned with the images
      val/...  test/...       the same
      mean_image              float32 (3, 32, 32): mean of the train split's images

Group attributes: ``format``, ``format_version``, ``class_names``, ``splits`` {name: size},
``chunk``, ``image_shape``, ``labels_dtype``, ``mean_image`` (the name of the array holding
it), ``source`` (kind, path, md5 and what it is the md5 of, whether it is the official
CIFAR-10 and whether that was verified), ``order`` (how images were ordered), ``store_id``,
``created``, ``convpipe_version`` and, written last, ``complete: true``. A store without
``complete`` is an interrupted conversion and is never opened.

The reader, :func:`open_store`, keeps per process (module level, keyed by the store's path)
the metadata and, with ``cache=True``, every chunk it has decompressed, so that Dask worker
tasks that reopen the store (a :class:`CifarStore` pickles as its path) read repeated
minibatches from memory.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DataError

__all__ = [
    "FORMAT", "FORMAT_VERSION", "SPLITS", "IMAGE_SHAPE", "CifarStore", "open_store",
    "store_state", "create_layout", "write_block", "finalize_store", "clear_cache",
]

FORMAT = "convpipe.cifar"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
IMAGE_SHAPE = (3, 32, 32)
MEAN_ARRAY = "mean_image"


def _codec():
    from zarr.codecs import BloscCodec

    # bit-shuffled zstd level 1: ~12% smaller than raw on CIFAR images, fast both ways
    return BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle", typesize=1)


def labels_dtype(n_classes: int) -> np.dtype:
    return np.dtype(np.uint8) if n_classes <= 256 else np.dtype(np.int32)


# --------------------------------------------------------------------------------- writer

def create_layout(path: str | os.PathLike, sizes: dict[str, int], chunk: int, n_classes: int) -> None:
    """Create the group and the empty split arrays at ``path`` (attributes come last)."""
    import zarr

    root = zarr.create_group(store=os.fspath(path), zarr_format=3, overwrite=True)
    ldt = labels_dtype(n_classes)
    for split, n in sizes.items():
        c = max(1, min(chunk, n))
        root.create_array(f"{split}/images", shape=(n, *IMAGE_SHAPE), chunks=(c, *IMAGE_SHAPE),
                          dtype=np.uint8, compressors=_codec(), fill_value=0)
        root.create_array(f"{split}/labels", shape=(n,), chunks=(c,), dtype=ldt,
                          compressors=_codec(), fill_value=0)


def write_block(path: str | os.PathLike, split: str, start: int, images: np.ndarray,
                labels: np.ndarray) -> None:
    """Write ``images`` (n, 3, 32, 32) uint8 and ``labels`` (n,) at rows ``start:start+n``.

    The caller keeps ``start`` (and ``start + n``, unless it is the end of the split)
    chunk-aligned, so that no two writers touch one chunk.
    """
    import zarr

    n = len(images)
    img = zarr.open_array(store=os.path.join(os.fspath(path), split, "images"), mode="r+")
    lab = zarr.open_array(store=os.path.join(os.fspath(path), split, "labels"), mode="r+")
    img[start:start + n] = images
    lab[start:start + n] = labels.astype(lab.dtype, copy=False)


def finalize_store(path: str | os.PathLike, attrs: dict[str, Any], mean_image: np.ndarray) -> None:
    """Write the mean image, then the attributes with ``complete: true`` (last)."""
    import zarr

    root = zarr.open_group(store=os.fspath(path), mode="r+")
    arr = root.create_array(MEAN_ARRAY, shape=IMAGE_SHAPE, chunks=IMAGE_SHAPE, dtype=np.float32,
                            compressors=None, fill_value=0.0)
    arr[...] = mean_image.astype(np.float32)
    root.attrs.update({**attrs, "mean_image": MEAN_ARRAY})
    root.attrs.update({"complete": True})


def store_state(path: str | os.PathLike) -> str:
    """'absent', 'complete', 'incomplete' (a convpipe store whose conversion did not finish)
    or 'foreign' (something else is there)."""
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        return "absent"
    meta = p / "zarr.json"
    if not p.is_dir() or not meta.is_file():
        return "foreign"
    try:
        doc = json.loads(meta.read_text())
    except (OSError, ValueError):
        return "foreign"
    attrs = doc.get("attributes") or {}
    if doc.get("node_type") != "group" or attrs.get("format") != FORMAT:
        # a group we created but never finalized has no attributes yet
        if doc.get("node_type") == "group" and not attrs and (p / "train").is_dir():
            return "incomplete"
        return "foreign"
    return "complete" if attrs.get("complete") is True else "incomplete"


# --------------------------------------------------------------------------------- reader

@dataclass
class _Meta:
    path: str
    stamp: tuple
    attrs: dict
    splits: dict
    class_names: list
    mean_image: np.ndarray
    chunks: dict


class _SplitCache:
    """Decompressed chunks of one split, filled on demand; guarded by a lock."""

    def __init__(self, path: str, split: str, n: int, chunk: int):
        self.path, self.split, self.n, self.chunk = path, split, n, chunk
        self.images = np.empty((n, *IMAGE_SHAPE), np.uint8)  # untouched pages cost nothing
        self.loaded = np.zeros(-(-n // chunk) if n else 0, bool)
        self.labels: np.ndarray | None = None
        self.lock = threading.Lock()

    def ensure(self, idx: np.ndarray) -> None:
        if self.labels is not None and self.loaded.all():
            return
        need = np.unique(idx // self.chunk)
        missing = need[~self.loaded[need]]
        if self.labels is not None and missing.size == 0:
            return
        with self.lock:
            if self.labels is None:
                self.labels = _open_array(self.path, self.split, "labels")[:].astype(np.int64)
            missing = missing[~self.loaded[missing]]
            if missing.size == 0:
                return
            arr = _open_array(self.path, self.split, "images")
            # contiguous runs of missing chunks in one read each
            breaks = np.flatnonzero(np.diff(missing) != 1) + 1
            for run in np.split(missing, breaks):
                lo, hi = int(run[0]) * self.chunk, min(self.n, (int(run[-1]) + 1) * self.chunk)
                self.images[lo:hi] = arr[lo:hi]
            self.loaded[missing] = True


_META: dict[str, _Meta] = {}
_CACHES: dict[tuple, _SplitCache] = {}
_LOCK = threading.Lock()


def clear_cache() -> None:
    """Drop every store's cached metadata and chunks held by this process."""
    with _LOCK:
        _META.clear()
        _CACHES.clear()


def _stamp(path: str) -> tuple:
    st = os.stat(os.path.join(path, "zarr.json"))
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _open_array(path: str, split: str, name: str):
    import zarr

    try:
        return zarr.open_array(store=os.path.join(path, split, name), mode="r")
    except Exception as exc:  # noqa: BLE001 - zarr raises many kinds; name the array
        raise DataError(f"{path}: cannot open array {split}/{name} ({type(exc).__name__}: {exc})") from None


def _load_meta(path: str) -> _Meta:
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: no data store here (create it with `convpipe data prepare --out {path}`)")
    state = store_state(p)
    if state == "foreign":
        raise DataError(f"{path}: not a convpipe CIFAR store (no Zarr v3 group with format {FORMAT!r})")
    if state == "incomplete":
        raise DataError(f"{path}: incomplete store (its conversion did not finish); "
                        "rerun `convpipe data prepare`")
    stamp = _stamp(path)
    attrs = json.loads((p / "zarr.json").read_text()).get("attributes", {})
    version = attrs.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(f"{path}: store format version {version}, this convpipe reads version "
                        f"{FORMAT_VERSION}; rebuild it with `convpipe data prepare --force`")
    try:
        splits = {str(k): int(v) for k, v in attrs["splits"].items()}
        class_names = [str(c) for c in attrs["class_names"]]
    except (KeyError, AttributeError, TypeError, ValueError):
        raise DataError(f"{path}: store attributes lack 'splits' or 'class_names'") from None
    chunks = {}
    for split, n in splits.items():
        img = _open_array(path, split, "images")
        lab = _open_array(path, split, "labels")
        if img.shape != (n, *IMAGE_SHAPE) or img.dtype != np.uint8 or lab.shape != (n,):
            raise DataError(f"{path}: split {split!r} has images {img.shape} {img.dtype} and "
                            f"labels {lab.shape}, expected ({n}, 3, 32, 32) uint8 and ({n},)")
        chunks[split] = int(img.chunks[0])
    mean = _open_array(path, "", MEAN_ARRAY)[...]
    if mean.shape != IMAGE_SHAPE:
        raise DataError(f"{path}: mean_image has shape {mean.shape}, expected {IMAGE_SHAPE}")
    mean = np.ascontiguousarray(mean, dtype=np.float32)
    mean.setflags(write=False)
    return _Meta(path, stamp, attrs, splits, class_names, mean, chunks)


def _meta(path: str) -> _Meta:
    try:
        stamp = _stamp(path)
    except OSError:
        stamp = None
    meta = _META.get(path)
    if meta is not None and meta.stamp == stamp:
        return meta
    meta = _load_meta(path)
    with _LOCK:
        _META[path] = meta
        for key in [k for k in _CACHES if k[0] == path]:
            del _CACHES[key]
    return meta


class CifarStore:
    """A prepared store: split sizes, class names, mean image, and minibatch reads.

    Pickles as its path; unpickling (for example in a Dask worker) reopens it through the
    per-process cache, which costs a ``stat`` once the process has opened it before.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.path.abspath(os.fspath(path))
        meta = _meta(self.path)
        self._meta = meta
        self.splits: dict[str, int] = dict(meta.splits)
        self.class_names: list[str] = list(meta.class_names)
        self.mean_image: np.ndarray = meta.mean_image
        self.attrs: dict[str, Any] = meta.attrs
        self.chunks: dict[str, int] = dict(meta.chunks)
        self._mean_as: dict[np.dtype, np.ndarray] = {}

    def __reduce__(self):
        return (open_store, (self.path,))

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={v}" for k, v in self.splits.items())
        return f"CifarStore({self.path!r}, {sizes})"

    # -- reading --------------------------------------------------------------------------

    def _indices(self, split: str, indices) -> np.ndarray:
        if split not in self.splits:
            raise DataError(f"{self.path}: no split {split!r} (it has {', '.join(self.splits)})")
        n = self.splits[split]
        if indices is None:
            return np.arange(n, dtype=np.int64)
        if isinstance(indices, slice):
            return np.arange(n, dtype=np.int64)[indices]
        idx = np.asarray(indices)
        if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
            raise ValueError(f"indices must be a 1-D array of integers, got {idx.dtype} {idx.shape}")
        idx = idx.astype(np.int64, copy=False)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"indices out of range for split {split!r} of size {n} "
                             f"(min {idx.min()}, max {idx.max()})")
        return np.where(idx < 0, idx + n, idx)

    def _cache(self, split: str) -> _SplitCache:
        key = (self.path, self._meta.stamp, split)
        c = _CACHES.get(key)
        if c is None:
            with _LOCK:
                c = _CACHES.get(key)
                if c is None:
                    c = _CACHES[key] = _SplitCache(self.path, split, self.splits[split], self.chunks[split])
        return c

    def read_uint8(self, split: str, indices=None, cache: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Raw pixels: (X uint8 (n, 3, 32, 32), y int64 (n,)) for ``indices`` (None: all)."""
        idx = self._indices(split, indices)
        if cache:
            c = self._cache(split)
            c.ensure(idx)
            return c.images[idx], c.labels[idx]
        uniq, inverse = np.unique(idx, return_inverse=True)
        img = _open_array(self.path, split, "images")
        lab = _open_array(self.path, split, "labels")
        if uniq.size == 0:
            return np.empty((0, *IMAGE_SHAPE), np.uint8), np.empty(0, np.int64)
        X = img.get_orthogonal_selection((uniq,))
        y = lab.get_orthogonal_selection((uniq,)).astype(np.int64)
        return X[inverse], y[inverse]

    def read(self, split: str, indices, dtype=np.float32, cache: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """A minibatch: (X (n, 3, 32, 32) in ``dtype``, mean image subtracted; y int64 (n,)).

        ``indices`` may be shuffled and repeat; ``dtype`` must be a float type. With
        ``cache=True`` the decompressed chunks stay in this process's memory for later reads.
        """
        dt = np.dtype(dtype)
        if dt.kind != "f":
            raise ValueError(f"dtype must be a floating type, got {dt}")
        raw, y = self.read_uint8(split, indices, cache=cache)
        mean = self._mean_as.get(dt)
        if mean is None:
            mean = self._mean_as[dt] = self.mean_image.astype(dt)
        X = raw.astype(dt)
        X -= mean
        return X, y

    def labels(self, split: str) -> np.ndarray:
        """All labels of ``split``, int64."""
        self._indices(split, None)
        return _open_array(self.path, split, "labels")[:].astype(np.int64)


def open_store(path: str | os.PathLike) -> CifarStore:
    """Open a prepared store; :class:`DataError` naming the path if it is missing or unusable."""
    return CifarStore(path)
