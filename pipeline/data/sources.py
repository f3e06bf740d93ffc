"""Data sources: finding CIFAR-10, telling what a path holds, reading batches and image folders.

Kinds of source:

- ``cifar-archive``: ``cifar-10-python.tar.gz`` (any tar, recognised by its
  ``cifar-10-batches-py/`` members), official md5 ``c58f30108f718f92721af3b95e74349a``;
- ``cifar-batches``: the extracted ``cifar-10-batches-py/`` folder (or a folder holding it),
  official per-file md5s as torchvision lists them;
- ``image-folder``: ``train/<class>/*`` and ``test/<class>/*`` JPEG or PNG images, as a
  directory or a tar(.gz) (optionally all under one top folder); classes in sorted order.
"""

from __future__ import annotations

import bz2
import hashlib
import io
import lzma
import os
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.data.safe_pickle import load_pickle, str_keys
from pipeline.errors import DataError

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
OFFICIAL_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
BATCHES_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")
TEST_BATCH = "test_batch"
META = "batches.meta"
#: md5 of each file of the official archive (the values torchvision checks)
BATCH_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
PIXELS = 3 * 32 * 32

Progress = Callable[[str, int, int], None]


@dataclass
class Source:
    kind: str  # "cifar-archive" | "cifar-batches" | "image-folder"
    path: Path
    container: str  # "tar" | "dir"
    prefix: str = ""  # image-folder tar: the top folder ("" or "name/")


# ------------------------------------------------------------------------------ finding


def keras_datasets_dir() -> Path:
    base = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(base) / "datasets"


def search_paths(data_root: str | os.PathLike = "data") -> list[Path]:
    """Where CIFAR-10 may already be, in the order they are tried."""
    root = Path(data_root)
    keras = keras_datasets_dir()
    return [
        root / BATCHES_DIR,  # torchvision root=data, extracted
        root / ARCHIVE_NAME,  # torchvision root=data, archive
        root / "cifar10" / BATCHES_DIR,
        root / "cifar10" / ARCHIVE_NAME,
        keras / BATCHES_DIR,  # Keras 2
        keras / "cifar-10-batches-py-target" / BATCHES_DIR,  # Keras 3
        keras / "cifar-10-batches-py.tar.gz",  # Keras 2 archive
        keras / "cifar-10-batches-py-target_archive",  # Keras 3 archive (a tar.gz)
    ]


def find_cifar10(data_root: str | os.PathLike = "data") -> Path | None:
    """The first existing copy of CIFAR-10 among :func:`search_paths`, or None."""
    for p in search_paths(data_root):
        if p.is_dir() and (p / TRAIN_BATCHES[0]).exists():
            return p
        if p.is_file():
            return p
    return None


# ------------------------------------------------------------------------------ classifying


def _tar_error(path, exc) -> DataError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DataError(f"{path}: truncated or corrupt archive ({reason})")


_TAR_ERRORS = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError, ValueError)


def classify(path: str | os.PathLike) -> Source:
    """What ``path`` holds; :class:`DataError` if it is none of the known kinds."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    if p.is_dir():
        if (p / TRAIN_BATCHES[0]).exists() or (p / META).exists():
            return Source("cifar-batches", p, "dir")
        if (p / BATCHES_DIR).is_dir():
            return Source("cifar-batches", p / BATCHES_DIR, "dir")
        if (p / "train").is_dir() or (p / "test").is_dir():
            return Source("image-folder", p, "dir")
        raise DataError(
            f"{p}: neither a {BATCHES_DIR}/ folder (data_batch_1..5, test_batch, "
            "batches.meta) nor an image folder (train/<class>/*, test/<class>/*)"
        )
    with open(p, "rb") as f:
        head = f.read(512)
    if head[:1] == b"\x80" or head[:1] == b"(":
        raise DataError(
            f"{p}: a single pickle, not a source; give the {BATCHES_DIR}/ folder "
            "that holds all the batches"
        )
    try:
        with tarfile.open(p, "r:*") as tar:
            # stop at the first member that tells (skipping a member means decompressing it)
            names = []
            for m in tar:
                names.append(m.name)
                parts = _norm(m.name).split("/")
                if (
                    BATCHES_DIR in parts
                    or _image_tar_prefix([m.name]) is not None
                    or len(names) >= 64
                ):
                    break
    except _TAR_ERRORS as exc:
        if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00":
            raise _tar_error(p, exc) from None
        raise DataError(
            f"{p}: not a tar archive or a folder (expected {ARCHIVE_NAME}, "
            f"a {BATCHES_DIR}/ folder or an image folder)"
        ) from None
    if not names:
        raise DataError(f"{p}: empty archive")
    if any(BATCHES_DIR in n.split("/") for n in names):
        return Source("cifar-archive", p, "tar")
    prefix = _image_tar_prefix(names)
    if prefix is None:
        raise DataError(
            f"{p}: neither the CIFAR-10 archive ({BATCHES_DIR}/...) nor an image "
            "folder archive (train/<class>/*, test/<class>/*)"
        )
    return Source("image-folder", p, "tar", prefix)


def _norm(name: str) -> str:
    return name[2:] if name.startswith("./") else name


def _image_tar_prefix(names: list[str]) -> str | None:
    for raw in names:
        parts = _norm(raw).split("/")
        if parts[0] in ("train", "test") and len(parts) > 1:
            return ""
        if len(parts) > 2 and parts[1] in ("train", "test"):
            return parts[0] + "/"
    return None


# ------------------------------------------------------------------------------ CIFAR batches


class _HashingReader(io.RawIOBase):
    """Reads a file, feeding an md5 and a progress callback."""

    def __init__(self, f, progress: Progress | None, total: int):
        self.f, self.md5, self.done, self.total, self.progress = (
            f,
            hashlib.md5(),
            0,
            total,
            progress,
        )

    def readable(self):
        return True

    def read(self, n=-1):
        data = self.f.read(n)
        self.md5.update(data)
        self.done += len(data)
        if self.progress:
            self.progress("read", self.done, self.total)
        return data

    def drain(self) -> str:
        while self.read(1 << 20):
            pass
        return self.md5.hexdigest()


def extract_cifar_archive(
    path: Path,
    staging: Path,
    progress: Progress | None = None,
    on_file: Callable[[str, Path], None] | None = None,
) -> tuple[str, dict[str, Path]]:
    """Read the archive once, writing its batches into ``staging``; return (md5 of the
    archive file, {batch name: staged path}). ``on_file(name, path)`` is called as each file
    is staged. Missing batches are reported by the caller."""
    staging.mkdir(parents=True, exist_ok=True)
    wanted = set(TRAIN_BATCHES) | {TEST_BATCH, META}
    staged: dict[str, Path] = {}
    total = os.path.getsize(path)
    with open(path, "rb") as raw:
        reader = _HashingReader(raw, progress, total)
        try:
            with tarfile.open(fileobj=reader, mode="r|*", bufsize=1 << 20) as tar:
                for m in tar:
                    parts = _norm(m.name).split("/")
                    if len(parts) != 2 or parts[0] != BATCHES_DIR or parts[1] not in wanted:
                        continue
                    if not m.isfile():
                        raise DataError(f"{path}: {m.name} is not a regular file")
                    if m.size > MAX_BATCH_BYTES:
                        raise DataError(
                            f"{path}: {m.name} holds {m.size:,} bytes, more than a CIFAR batch "
                            f"can ({MAX_BATCH_BYTES:,}): refused"
                        )
                    src = tar.extractfile(m)
                    dest = staging / parts[1]
                    with open(dest, "wb") as out:
                        while block := src.read(1 << 20):
                            out.write(block)
                    if dest.stat().st_size != m.size:
                        raise DataError(f"{path}: truncated or corrupt archive ({m.name} is short)")
                    staged[parts[1]] = dest
                    if on_file is not None:
                        on_file(parts[1], dest)
            md5 = reader.drain()
        except DataError:
            raise
        except _TAR_ERRORS as exc:
            raise _tar_error(path, exc) from None
    return md5, staged


def batch_files(
    folder: Path, staged: dict[str, Path] | None = None, label: str | None = None
) -> dict[str, Path]:
    """{name: path} of the six batches and batches.meta; DataError naming a missing one."""
    found = (
        dict(staged)
        if staged is not None
        else {n: folder / n for n in (*TRAIN_BATCHES, TEST_BATCH, META) if (folder / n).is_file()}
    )
    for n in (*TRAIN_BATCHES, TEST_BATCH, META):
        if n not in found:
            raise DataError(f"{label or folder}: missing batch {BATCHES_DIR}/{n}")
    return found


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def read_meta(path: Path, name: str) -> list[str]:
    """Class names from ``batches.meta``."""
    d = load_pickle(path, name=name)
    if not isinstance(d, dict):
        raise DataError(f"{name}: expected a dict with 'label_names', got {type(d).__name__}")
    names = str_keys(d).get("label_names")
    if (
        not isinstance(names, list)
        or not names
        or not all(isinstance(n, (str, bytes)) for n in names)
    ):
        raise DataError(f"{name}: 'label_names' is missing or not a list of names")
    return [n.decode("latin1") if isinstance(n, bytes) else n for n in names]


def read_batch(path: Path, name: str, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One batch: (X uint8 (n, 3, 32, 32), y int64 (n,)), checked; DataError naming ``name``."""
    d = load_pickle(path, name=name)
    return check_batch(d, name, n_classes)


def check_batch(d, name: str, n_classes: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(X uint8 (n, 3, 32, 32), y int64) of an unpickled batch ``d``, checked (labels range
    too unless ``n_classes`` is None); DataError naming ``name``."""
    if not isinstance(d, dict):
        raise DataError(f"{name}: expected a dict with 'data' and 'labels', got {type(d).__name__}")
    d = str_keys(d)
    if "data" not in d or "labels" not in d:
        raise DataError(f"{name}: expected keys 'data' and 'labels', found {sorted(map(str, d))}")
    data, labels = d["data"], d["labels"]
    if not isinstance(data, np.ndarray) or data.ndim != 2:
        raise DataError(f"{name}: 'data' is not a 2-D array of images (one row per image)")
    if data.shape[1] != PIXELS:
        raise DataError(
            f"{name}: wrong image size: rows of {data.shape[1]} values, expected "
            f"{PIXELS} (3 x 32 x 32)"
        )
    if data.dtype != np.uint8:
        raise DataError(f"{name}: 'data' has dtype {data.dtype}, expected uint8")
    try:
        y = np.asarray(labels)
    except (TypeError, ValueError):
        y = np.asarray([], dtype=object)
    if y.ndim != 1 or (y.size and y.dtype.kind not in "iu"):
        raise DataError(f"{name}: 'labels' is not a list of integers")
    if len(y) != len(data):
        raise DataError(f"{name}: {len(y)} labels for {len(data)} images")
    if n_classes is not None:
        check_labels(y, name, n_classes)
    return data.reshape(len(data), 3, 32, 32), y.astype(np.int64)


def check_labels(y: np.ndarray, name: str, n_classes: int) -> None:
    if y.size:
        bad = np.flatnonzero((y < 0) | (y >= n_classes))
        if bad.size:
            raise DataError(
                f"{name}: label {int(y[bad[0]])} of image {int(bad[0])} out of range "
                f"0..{n_classes - 1}"
            )


# ------------------------------------------------------------------------------ image folders


@dataclass
class ImageListing:
    classes: list[str]
    #: split -> [(relative name "train/cat/0001.jpg", class index)], sorted by (class, name)
    items: dict[str, list[tuple[str, int]]]
    #: for a tar source, relative name -> file bytes (read once by the coordinator)
    blobs: dict[str, bytes] = field(default_factory=dict)
    md5: str | None = None  # of the tar file, if any


def _check_image_name(label: str, rel: str) -> bool:
    """True for an image to use, False for a hidden file to skip; DataError otherwise."""
    base = rel.rsplit("/", 1)[-1]
    if base.startswith("."):
        return False
    if not base.lower().endswith(IMAGE_EXTENSIONS):
        raise DataError(f"{label}: {rel} is not a JPEG or PNG image (expected .jpg, .jpeg or .png)")
    return True


def _finish_listing(label: str, found: dict[str, dict[str, list[str]]]) -> tuple[list[str], dict]:
    for split in ("train", "test"):
        if split not in found:
            raise DataError(
                f"{label}: no {split}/ folder (expected train/<class>/* and test/<class>/*)"
            )
        for cls, files in found[split].items():
            if not files:
                raise DataError(f"{label}: empty class {split}/{cls}/ (no JPEG or PNG images)")
    classes = sorted(found["train"])
    if not classes:
        raise DataError(f"{label}: train/ has no class folders")
    if sorted(found["test"]) != classes:
        only_train = sorted(set(classes) - set(found["test"]))
        only_test = sorted(set(found["test"]) - set(classes))
        what = (
            (f"classes only in train/: {', '.join(only_train)}" if only_train else "")
            + ("; " if only_train and only_test else "")
            + (f"classes only in test/: {', '.join(only_test)}" if only_test else "")
        )
        raise DataError(f"{label}: train/ and test/ have different classes ({what})")
    items = {
        split: [
            (f"{split}/{cls}/{f}", i)
            for i, cls in enumerate(classes)
            for f in sorted(found[split][cls])
        ]
        for split in ("train", "test")
    }
    return classes, items


#: an image-folder tar is unpacked in memory up to this many bytes, or UNPACK_RATIO times its
#: compressed size when that is more: a compression bomb (a small file that unpacks to tens of
#: GB) is refused instead of running the process out of memory. Image data hardly compresses:
#: CIFAR-10's JPEG folders unpack to about 1.1x their .tar.gz.
UNPACK_FLOOR = 1 << 30
UNPACK_RATIO = 20
#: one member of a CIFAR batches archive holds at most this many bytes (a batch of 10,000
#: 32x32 images is 31 MB): checked from its header before it is written out
MAX_BATCH_BYTES = 1 << 28


def unpack_limit(compressed: int) -> int:
    """How many bytes an archive of ``compressed`` bytes may unpack to (see UNPACK_FLOOR)."""
    return max(UNPACK_FLOOR, UNPACK_RATIO * compressed)


def _decompress_bounded(kind: str, raw: bytes, limit: int, path: Path) -> bytes:
    """``raw`` decompressed (``kind``: gzip, bz2 or xz; bz2 and xz as many concatenated streams
    as it holds, as ``bz2.decompress`` and ``lzma.decompress`` read them), refused with one line
    past ``limit`` bytes; never holds more than ``limit`` + 1 bytes of output."""
    out = bytearray()
    data = raw
    while True:
        if kind == "gzip":
            d = zlib.decompressobj(wbits=47)
            out += d.decompress(data, limit + 1 - len(out))
            while d.unconsumed_tail and len(out) <= limit:
                out += d.decompress(d.unconsumed_tail, limit + 1 - len(out))
            rest = b""  # one gzip member, as before
        else:
            d = bz2.BZ2Decompressor() if kind == "bz2" else lzma.LZMADecompressor()
            out += d.decompress(data, max_length=limit + 1 - len(out))
            while not d.eof and not d.needs_input and len(out) <= limit:
                out += d.decompress(b"", max_length=limit + 1 - len(out))
            rest = d.unused_data if d.eof else b""
        if len(out) > limit:
            raise DataError(
                f"{path}: unpacks to more than {limit:,} bytes from {len(raw):,}: refused as a "
                f"likely compression bomb (allowed: {UNPACK_RATIO}x the archive's size, at least "
                f"{UNPACK_FLOOR:,} bytes)"
            )
        if not d.eof:
            raise DataError(f"{path}: truncated or corrupt archive (the {kind} stream ends early)")
        if not rest:
            return bytes(out)
        data = rest


def _open_tar_in_memory(path: Path, progress: Progress | None):
    """(md5 of the file, the uncompressed tar bytes, a TarFile over them): one decompression
    in C (bounded by :func:`unpack_limit`), then member headers parsed from memory (many small
    members read fast this way)."""
    with open(path, "rb") as f:
        raw = f.read()
    md5 = hashlib.md5(raw).hexdigest()
    if progress:
        progress("read", len(raw), len(raw))
    limit = unpack_limit(len(raw))
    if raw[:2] == b"\x1f\x8b":
        data = _decompress_bounded("gzip", raw, limit, path)
    elif raw[:3] == b"BZh":
        data = _decompress_bounded("bz2", raw, limit, path)
    elif raw[:6] == b"\xfd7zXZ\x00":
        data = _decompress_bounded("xz", raw, limit, path)
    else:
        data = raw
    del raw
    return md5, data, tarfile.open(fileobj=io.BytesIO(data), mode="r:")


def list_image_folder(src: Source, progress: Progress | None = None) -> ImageListing:
    """List (and, for a tar, read) an image folder; DataError for a bad layout."""
    label = str(src.path)
    found: dict[str, dict[str, list[str]]] = {}
    blobs: dict[str, bytes] = {}
    md5 = None
    if src.container == "dir":
        for split in ("train", "test"):
            d = src.path / split
            if not d.is_dir():
                continue
            found[split] = {}
            for entry in sorted(os.scandir(d), key=lambda e: e.name):
                if entry.name.startswith("."):
                    continue
                if not entry.is_dir():
                    raise DataError(
                        f"{label}: {split}/{entry.name} is not a class folder "
                        f"(expected {split}/<class>/<image>)"
                    )
                files = found[split][entry.name] = []
                for f in os.scandir(entry.path):
                    rel = f"{split}/{entry.name}/{f.name}"
                    if f.is_dir():
                        if not f.name.startswith("."):
                            raise DataError(f"{label}: {rel}/ is a folder inside a class folder")
                        continue
                    if _check_image_name(label, rel):
                        files.append(f.name)
    else:
        try:
            md5, data, tar = _open_tar_in_memory(src.path, progress)
            with tar:
                for m in tar:
                    name = _norm(m.name).rstrip("/")
                    if src.prefix:
                        if not name.startswith(src.prefix):
                            continue
                        name = name[len(src.prefix) :]
                    parts = name.split("/")
                    if parts[0] not in ("train", "test") or len(parts) == 1:
                        continue
                    split = parts[0]
                    found.setdefault(split, {})
                    if any(p.startswith(".") for p in parts[1:]):
                        continue
                    if len(parts) == 2:
                        if m.isdir():
                            found[split].setdefault(parts[1], [])
                            continue
                        raise DataError(
                            f"{label}: {name} is not in a class folder "
                            f"(expected {split}/<class>/<image>)"
                        )
                    if len(parts) > 3:
                        raise DataError(f"{label}: {name} is nested inside a class folder")
                    if m.isdir():
                        raise DataError(f"{label}: {name}/ is a folder inside a class folder")
                    files = found[split].setdefault(parts[1], [])
                    if not m.isfile() or not _check_image_name(label, name):
                        continue
                    if m.offset_data + m.size > len(data):
                        raise DataError(
                            f"{label}: truncated or corrupt archive ({m.name} is short)"
                        )
                    blobs[name] = data[m.offset_data : m.offset_data + m.size]
                    files.append(parts[2])
        except DataError:
            raise
        except _TAR_ERRORS as exc:
            raise _tar_error(src.path, exc) from None
    classes, items = _finish_listing(label, found)
    return ImageListing(classes, items, blobs, md5)


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Decode one JPEG/PNG to uint8 (3, 32, 32); DataError naming ``name`` otherwise."""
    try:
        img = Image.open(io.BytesIO(data), formats=("JPEG", "PNG"))
    except (UnidentifiedImageError, OSError, ValueError):
        raise DataError(f"{name}: not a JPEG or PNG image (cannot decode it)") from None
    if img.size != (32, 32):
        raise DataError(
            f"{name}: wrong image size {img.size[0]}x{img.size[1]}, expected 32x32 "
            "(all images must be 32x32)"
        )
    try:
        arr = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{name}: corrupt image ({exc})") from None
    return arr.transpose(2, 0, 1)
