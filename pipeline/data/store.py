"""The CIFAR store: a Zarr v3 group of uint8 images and labels per split, its writer and reader.

Layout (format ``convpipe.cifar``, version 2)::

    STORE/                    group; attributes below
      train/images            uint8 (N, 3, 32, 32), chunks (chunk, 3, 32, 32), Blosc zstd,
                              then a crc32c checksum of every chunk
      train/labels            uint8 (N,) (int32 if there are more than 256 classes),
                              chunks (chunk,) aligned with the images, Blosc zstd + crc32c
      val/...  test/...       the same
      mean_image              float32 (3, 32, 32): mean of the train split's images (crc32c)

Every chunk file is written, even one of zeros, so a missing chunk file is damage too. A
damaged chunk is a :class:`DataError` naming the store, the split and the chunk, never
wrong pixels; :func:`verify_store` checks every chunk. Version 1 stores (no checksums, and
chunks of zeros not written) still load; they are reported as unprotected.

Group attributes: ``format``, ``format_version``, ``class_names``, ``splits`` {name: size},
``chunk``, ``image_shape``, ``labels_dtype``, ``mean_image`` (the name of the array holding
it), ``source`` (kind, path, md5 and what it is the md5 of, whether it is the official
CIFAR-10 and whether that was verified), ``order`` (how images were ordered),
``shuffle_seed`` (version 2: the seed of the stored order), ``store_id``, ``created``,
``convpipe_version`` and, written last, ``complete: true``. A store without ``complete``
is an interrupted conversion and is never opened.

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
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from pipeline.errors import DataError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "SPLITS",
    "IMAGE_SHAPE",
    "CifarStore",
    "open_store",
    "store_state",
    "create_layout",
    "write_block",
    "finalize_store",
    "clear_cache",
    "verify_store",
    "VerifyReport",
    "ChunkDamage",
]

FORMAT = "convpipe.cifar"
FORMAT_VERSION = 2
#: versions this reader opens: 1 has no checksums and is stored in source order
READABLE_VERSIONS = (1, 2)
SPLITS = ("train", "val", "test")
IMAGE_SHAPE = (3, 32, 32)
MEAN_ARRAY = "mean_image"
CHECKSUM = "crc32c"
REBUILD = "rebuild the store with `convpipe data prepare --force`"


def _codecs(checksum: bool, compress: bool = True) -> tuple:
    """Bytes-to-bytes codecs of an array: bit-shuffled Blosc zstd level 1 (small and fast
    both ways on CIFAR images), then the crc32c of the compressed chunk, which is checked
    before anything is decompressed."""
    blosc = (
        (BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle", typesize=1),) if compress else ()
    )
    return (*blosc, Crc32cCodec()) if checksum else blosc


def labels_dtype(n_classes: int) -> np.dtype:
    return np.dtype(np.uint8) if n_classes <= 256 else np.dtype(np.int32)


# --------------------------------------------------------------------------------- writer


def create_layout(
    path: str | os.PathLike,
    sizes: dict[str, int],
    chunk: int,
    n_classes: int,
    *,
    checksum: bool = True,
) -> None:
    """Create the group and the empty split arrays at ``path`` (attributes come last).

    ``checksum=False`` writes the unprotected layout of format version 1 (for tests of old
    stores and for measuring what the checksum costs).
    """
    root = zarr.create_group(store=os.fspath(path), zarr_format=3, overwrite=True)
    ldt = labels_dtype(n_classes)
    for split, n in sizes.items():
        c = max(1, min(chunk, n))
        root.create_array(
            f"{split}/images",
            shape=(n, *IMAGE_SHAPE),
            chunks=(c, *IMAGE_SHAPE),
            dtype=np.uint8,
            compressors=_codecs(checksum),
            fill_value=0,
        )
        root.create_array(
            f"{split}/labels",
            shape=(n,),
            chunks=(c,),
            dtype=ldt,
            compressors=_codecs(checksum),
            fill_value=0,
        )


def write_block(
    path: str | os.PathLike, split: str, start: int, images: np.ndarray, labels: np.ndarray
) -> None:
    """Write ``images`` (n, 3, 32, 32) uint8 and ``labels`` (n,) at rows ``start:start+n``.

    The caller keeps ``start`` (and ``start + n``, unless it is the end of the split)
    chunk-aligned, so that no two writers touch one chunk. Chunks of zeros are written
    too, so that a missing chunk file always means damage.
    """
    n = len(images)
    img = zarr.open_array(store=os.path.join(os.fspath(path), split, "images"), mode="r+")
    lab = zarr.open_array(store=os.path.join(os.fspath(path), split, "labels"), mode="r+")
    img = img.with_config({"write_empty_chunks": True})
    lab = lab.with_config({"write_empty_chunks": True})
    img[start : start + n] = images
    lab[start : start + n] = labels.astype(lab.dtype, copy=False)


def finalize_store(
    path: str | os.PathLike, attrs: dict[str, Any], mean_image: np.ndarray, *, checksum: bool = True
) -> None:
    """Write the mean image, then the attributes with ``complete: true`` (last)."""
    root = zarr.open_group(store=os.fspath(path), mode="r+")
    arr = root.create_array(
        MEAN_ARRAY,
        shape=IMAGE_SHAPE,
        chunks=IMAGE_SHAPE,
        dtype=np.float32,
        compressors=_codecs(checksum, compress=False),
        fill_value=0.0,
    )
    arr.with_config({"write_empty_chunks": True})[...] = mean_image.astype(np.float32)
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


# --------------------------------------------------------------------------------- chunks


@dataclass(frozen=True)
class ChunkDamage:
    """One damaged chunk: ``split`` ("" for the mean image), ``array`` ("images", "labels"
    or "mean_image"), chunk ``index``, its ``rows`` (first, last + 1), its ``file``
    (relative to the store) and the ``reason``."""

    split: str
    array: str
    index: int
    rows: tuple[int, int]
    file: str
    reason: str

    def describe(self) -> str:
        if not self.split:
            return f"{self.array} (file {self.file}): {self.reason}"
        lo, hi = self.rows
        return (
            f"split {self.split!r}, {self.array} chunk {self.index} (rows {lo}-{hi - 1}, "
            f"file {self.file}): {self.reason}"
        )

    def message(self, store: str) -> str:
        return f"{store}: damaged chunk: {self.describe()}; {REBUILD}"

    def to_dict(self) -> dict:
        return {
            "split": self.split,
            "array": self.array,
            "index": self.index,
            "rows": list(self.rows),
            "file": self.file,
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ChunkDamage:
        return cls(
            str(d["split"]),
            str(d["array"]),
            int(d["index"]),
            (int(d["rows"][0]), int(d["rows"][1])),
            str(d["file"]),
            str(d["reason"]),
        )


def _has_checksum(arr) -> bool:
    return any(c.to_dict().get("name") == CHECKSUM for c in arr.compressors)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if "checksum" in text.lower():
        return f"{CHECKSUM} checksum mismatch (its bytes changed after it was written)"
    return f"cannot be decoded ({type(exc).__name__}{': ' + text if text else ''})"


class _Array:
    """One array of a store, read chunk-aware: any failure names the damaged chunk.

    ``split`` "" is the mean image (one chunk). Reads of a protected array (with a crc32c
    codec) also check that the chunk files are there: Zarr would fill a missing one with
    zeros.
    """

    def __init__(self, store: str, split: str, name: str):
        self.store, self.split, self.name = store, split, name
        self.arr = _open_array(store, split, name)
        self.n = int(self.arr.shape[0])
        self.chunk = int(self.arr.chunks[0])
        self.protected = _has_checksum(self.arr)

    @property
    def n_chunks(self) -> int:
        return -(-self.n // self.chunk) if self.n else 0

    def rows(self, k: int) -> tuple[int, int]:
        return k * self.chunk, min(self.n, (k + 1) * self.chunk)

    def file(self, k: int) -> str:
        key = self.arr.metadata.encode_chunk_key((k,) + (0,) * (self.arr.ndim - 1))
        return (
            os.path.join(self.split, self.name, key) if self.split else os.path.join(self.name, key)
        )

    def damage(self, k: int, reason: str) -> ChunkDamage:
        return ChunkDamage(self.split, self.name, k, self.rows(k), self.file(k), reason)

    def check(self, k: int) -> ChunkDamage | None:
        """The damage of chunk ``k``, or None if it reads back (and, protected, is there)."""
        if self.protected and not os.path.isfile(os.path.join(self.store, self.file(k))):
            return self.damage(k, "chunk file missing")
        lo, hi = self.rows(k)
        try:
            self.arr[lo:hi]
        except Exception as exc:  # noqa: BLE001 - codecs raise many kinds; name the chunk
            return self.damage(k, _reason(exc))
        return None

    def _fail(self, chunks, exc: BaseException | None) -> DataError:
        for k in chunks:
            d = self.check(int(k))
            if d is not None:
                return DataError(d.message(self.store))
        what = f"{self.split}/{self.name}" if self.split else self.name
        return DataError(
            f"{self.store}: cannot read {what} ({type(exc).__name__}: {exc}); {REBUILD}"
        )

    def _present(self, chunks) -> None:
        if self.protected:
            for k in chunks:
                if not os.path.isfile(os.path.join(self.store, self.file(int(k)))):
                    raise DataError(self.damage(int(k), "chunk file missing").message(self.store))

    def read(self, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Rows ``lo:hi`` (all by default); DataError naming the first damaged chunk."""
        hi = self.n if hi is None else hi
        chunks = range(lo // self.chunk, -(-hi // self.chunk)) if hi > lo else range(0)
        self._present(chunks)
        try:
            return self.arr[lo:hi]
        except Exception as exc:  # noqa: BLE001
            raise self._fail(chunks, exc) from None

    def select(self, rows: np.ndarray) -> np.ndarray:
        """The rows ``rows`` (sorted, unique int64); DataError naming a damaged chunk."""
        chunks = np.unique(rows // self.chunk)
        self._present(chunks)
        try:
            return self.arr.get_orthogonal_selection((rows,))
        except Exception as exc:  # noqa: BLE001
            raise self._fail(chunks, exc) from None


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify_store` found: ``n_chunks`` checked, the ``damaged`` ones, and
    whether every array is ``protected`` by a checksum (format ``version`` 2)."""

    path: str
    version: int
    protected: bool
    n_chunks: int
    damaged: tuple[ChunkDamage, ...]

    @property
    def ok(self) -> bool:
        return not self.damaged

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "version": self.version,
            "protected": self.protected,
            "n_chunks": self.n_chunks,
            "damaged": [d.to_dict() for d in self.damaged],
        }

    @classmethod
    def from_dict(cls, d: dict) -> VerifyReport:
        return cls(
            str(d["path"]),
            int(d["version"]),
            bool(d["protected"]),
            int(d["n_chunks"]),
            tuple(ChunkDamage.from_dict(x) for x in d["damaged"]),
        )


def verify_store(path: str | os.PathLike) -> VerifyReport:
    """Read back every chunk of every array of a store (checksum checked where the store has
    one; chunk files of a protected store must all be there). A store that cannot be opened
    at all (missing, foreign, incomplete, unreadable metadata) is a :class:`DataError`."""
    p = os.path.abspath(os.fspath(path))
    attrs = _checked_attrs(p)
    splits = _splits(p, attrs)
    arrays = [_Array(p, split, name) for split in splits for name in ("images", "labels")]
    arrays.append(_Array(p, "", MEAN_ARRAY))
    damaged = [d for a in arrays for k in range(a.n_chunks) if (d := a.check(k)) is not None]
    return VerifyReport(
        p,
        int(attrs["format_version"]),
        all(a.protected for a in arrays),
        sum(a.n_chunks for a in arrays),
        tuple(damaged),
    )


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
    protected: bool


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
                self.labels = _Array(self.path, self.split, "labels").read().astype(np.int64)
            missing = missing[~self.loaded[missing]]
            if missing.size == 0:
                return
            arr = _Array(self.path, self.split, "images")
            # contiguous runs of missing chunks in one read each
            breaks = np.flatnonzero(np.diff(missing) != 1) + 1
            for run in np.split(missing, breaks):
                lo, hi = int(run[0]) * self.chunk, min(self.n, (int(run[-1]) + 1) * self.chunk)
                self.images[lo:hi] = arr.read(lo, hi)
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
    try:
        return zarr.open_array(store=os.path.join(path, split, name), mode="r")
    except Exception as exc:  # noqa: BLE001 - zarr raises many kinds; name the array
        what = f"{split}/{name}" if split else name
        raise DataError(f"{path}: cannot open array {what} ({type(exc).__name__}: {exc})") from None


def _checked_attrs(path: str) -> dict:
    """The attributes of a complete store of a readable version; DataError otherwise."""
    p = Path(path)
    if not p.exists():
        raise DataError(
            f"{path}: no data store here (create it with `convpipe data prepare --out {path}`)"
        )
    state = store_state(p)
    if state == "foreign":
        raise DataError(
            f"{path}: not a convpipe CIFAR store (no Zarr v3 group with format {FORMAT!r})"
        )
    if state == "incomplete":
        raise DataError(
            f"{path}: incomplete store (its conversion did not finish); "
            "rerun `convpipe data prepare`"
        )
    attrs = json.loads((p / "zarr.json").read_text()).get("attributes", {})
    version = attrs.get("format_version")
    if version not in READABLE_VERSIONS:
        raise DataError(
            f"{path}: store format version {version}, this convpipe reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}; rebuild it with "
            "`convpipe data prepare --force`"
        )
    return attrs


def _splits(path: str, attrs: dict) -> dict[str, int]:
    try:
        return {str(k): int(v) for k, v in attrs["splits"].items()}
    except (KeyError, AttributeError, TypeError, ValueError):
        raise DataError(f"{path}: store attributes lack 'splits'") from None


def _load_meta(path: str) -> _Meta:
    stamp = _stamp(path) if os.path.exists(os.path.join(path, "zarr.json")) else None
    attrs = _checked_attrs(path)
    splits = _splits(path, attrs)
    try:
        class_names = [str(c) for c in attrs["class_names"]]
    except (KeyError, TypeError):
        raise DataError(f"{path}: store attributes lack 'class_names'") from None
    chunks, protected = {}, True
    for split, n in splits.items():
        img = _Array(path, split, "images")
        lab = _Array(path, split, "labels")
        if img.arr.shape != (n, *IMAGE_SHAPE) or img.arr.dtype != np.uint8 or lab.arr.shape != (n,):
            raise DataError(
                f"{path}: split {split!r} has images {img.arr.shape} {img.arr.dtype} and "
                f"labels {lab.arr.shape}, expected ({n}, 3, 32, 32) uint8 and ({n},)"
            )
        chunks[split] = img.chunk
        protected = protected and img.protected and lab.protected
    mean_arr = _Array(path, "", MEAN_ARRAY)
    mean = mean_arr.read()
    if mean.shape != IMAGE_SHAPE:
        raise DataError(f"{path}: mean_image has shape {mean.shape}, expected {IMAGE_SHAPE}")
    mean = np.ascontiguousarray(mean, dtype=np.float32)
    mean.setflags(write=False)
    return _Meta(
        path, stamp, attrs, splits, class_names, mean, chunks, protected and mean_arr.protected
    )


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
    ``protected``: every chunk carries a crc32c checksum (format version 2), so a damaged
    chunk is a :class:`DataError` rather than wrong pixels.
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
        self.protected: bool = meta.protected
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
            raise ValueError(
                f"indices must be a 1-D array of integers, got {idx.dtype} {idx.shape}"
            )
        idx = idx.astype(np.int64, copy=False)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(
                f"indices out of range for split {split!r} of size {n} "
                f"(min {idx.min()}, max {idx.max()})"
            )
        return np.where(idx < 0, idx + n, idx)

    def _cache(self, split: str) -> _SplitCache:
        key = (self.path, self._meta.stamp, split)
        c = _CACHES.get(key)
        if c is None:
            with _LOCK:
                c = _CACHES.get(key)
                if c is None:
                    c = _CACHES[key] = _SplitCache(
                        self.path, split, self.splits[split], self.chunks[split]
                    )
        return c

    def read_uint8(
        self, split: str, indices=None, cache: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Raw pixels: (X uint8 (n, 3, 32, 32), y int64 (n,)) for ``indices`` (None: all).

        A damaged chunk is a :class:`DataError` naming the store, the split and the chunk.
        """
        idx = self._indices(split, indices)
        if cache:
            c = self._cache(split)
            c.ensure(idx)
            return c.images[idx], c.labels[idx]
        uniq, inverse = np.unique(idx, return_inverse=True)
        if uniq.size == 0:
            return np.empty((0, *IMAGE_SHAPE), np.uint8), np.empty(0, np.int64)
        X = _Array(self.path, split, "images").select(uniq)
        y = _Array(self.path, split, "labels").select(uniq).astype(np.int64)
        return X[inverse], y[inverse]

    def read(
        self, split: str, indices, dtype=np.float32, cache: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
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


def open_store(path: str | os.PathLike) -> CifarStore:
    """Open a prepared store; :class:`DataError` naming the path if it is missing or unusable."""
    return CifarStore(path)
