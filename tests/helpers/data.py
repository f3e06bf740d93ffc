"""Builders of small data sources in the official layouts, for the data tests.

- CIFAR-10 python batches in both pickle flavours: "py2" is written the way Python 2's
  cPickle wrote the originals (every str a Python 2 byte string, the array reconstructor
  named ``numpy.core.multiarray._reconstruct``), "py3" is ``pickle.dumps`` of str keys at
  a given protocol (2-5).
- archives (tar.gz) and extracted ``cifar-10-batches-py/`` folders of them;
- image folders (``train/<class>/*``, ``test/<class>/*``, PNG or JPEG) as a directory or tar;
- a malicious pickle whose ``__reduce__`` runs ``os.system``.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
BATCHES = [
    "data_batch_1",
    "data_batch_2",
    "data_batch_3",
    "data_batch_4",
    "data_batch_5",
    "test_batch",
]


class Py2Pickler(pickle._Pickler):
    """Protocol-2 pickler writing every str/bytes as a Python 2 ``str`` and numpy's
    reconstructors under ``numpy.core`` (as numpy 1 on Python 2 did)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2str(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        n = len(raw)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + raw)
        self.memoize(obj)

    dispatch[bytes] = save_py2str
    dispatch[str] = save_py2str

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", None)
        qual = name or getattr(obj, "__qualname__", obj.__name__)
        if module and module.startswith("numpy._core"):
            module = module.replace("numpy._core", "numpy.core", 1)
        self.write(pickle.GLOBAL + module.encode() + b"\n" + qual.encode() + b"\n")
        self.memoize(obj)


def dumps(obj, flavour: str = "py2", protocol: int = 2) -> bytes:
    if flavour == "py2":
        buf = io.BytesIO()
        Py2Pickler(buf, protocol=2).dump(obj)
        return buf.getvalue()
    return pickle.dumps(obj, protocol=protocol)


def make_batches(
    per_batch: int = 20,
    n_test: int = 20,
    *,
    seed: int = 0,
    flavour: str = "py2",
    protocol: int = 2,
    classes=CLASSES,
) -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    """Pickled batches {file name: bytes} and the truth {'train_X', 'train_y', 'test_X',
    'test_y'} (X uint8 (n, 3, 32, 32), y int64)."""
    rng = np.random.default_rng(seed)
    files: dict[str, bytes] = {}
    xs, ys = [], []
    for b, name in enumerate(BATCHES):
        n = n_test if name == "test_batch" else per_batch
        X = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = rng.integers(0, len(classes), n)
        d = {
            "batch_label": f"batch {b}",
            "labels": [int(v) for v in y],
            "data": X,
            "filenames": [f"img_{b}_{i}.png" for i in range(n)],
        }
        files[name] = dumps(d, flavour, protocol)
        xs.append(X.reshape(n, 3, 32, 32))
        ys.append(y.astype(np.int64))
    files["batches.meta"] = dumps(
        {"label_names": list(classes), "num_cases_per_batch": per_batch, "num_vis": 3072},
        flavour,
        protocol,
    )
    files["readme.html"] = b"<html></html>\n"
    truth = {
        "train_X": np.concatenate(xs[:5]),
        "train_y": np.concatenate(ys[:5]),
        "test_X": xs[5],
        "test_y": ys[5],
    }
    return files, truth


def write_tar(
    path: Path, files: dict[str, bytes], prefix: str = "cifar-10-batches-py/", mode: str = "w:gz"
) -> Path:
    with tarfile.open(path, mode) as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(payload)
            info.mtime = 1244000000
            tar.addfile(info, io.BytesIO(payload))
    return path


def write_cifar_archive(dirpath: Path, **kw) -> tuple[Path, dict]:
    files, truth = make_batches(**kw)
    dirpath.mkdir(parents=True, exist_ok=True)
    return write_tar(dirpath / "cifar-10-python.tar.gz", files), truth


def write_batches_dir(dirpath: Path, **kw) -> tuple[Path, dict]:
    files, truth = make_batches(**kw)
    d = dirpath / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    for name, payload in files.items():
        (d / name).write_bytes(payload)
    return d, truth


def md5(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def malicious_batch(marker: Path, protocol: int = 2) -> bytes:
    """A 'batch' that runs ``touch MARKER`` when unpickled by ``pickle.load``."""
    return pickle.dumps({b"data": _RunsCode(marker), b"labels": [0]}, protocol=protocol)


def make_image_folder(
    root: Path,
    *,
    per_class_train: int = 3,
    per_class_test: int = 2,
    classes=("cat", "dog", "bird"),
    fmt: str = "PNG",
    seed: int = 0,
) -> dict:
    """Write ``root/train/<class>/*`` and ``root/test/<class>/*``; return the truth:
    {split: {relative path: (image uint8 (3, 32, 32), class index)}} (classes sorted)."""
    rng = np.random.default_rng(seed)
    from PIL import Image

    ext = {"PNG": ".png", "JPEG": ".jpg"}[fmt]
    names = sorted(classes)
    truth: dict[str, dict] = {"train": {}, "test": {}}
    for split, k in (("train", per_class_train), ("test", per_class_test)):
        for cls in classes:
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(k):
                hwc = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(hwc, "RGB").save(
                    buf, fmt, **({"quality": 95} if fmt == "JPEG" else {})
                )
                rel = f"{split}/{cls}/{i:04d}{ext}"
                (root / rel).write_bytes(buf.getvalue())
                # what a decoder gives back (JPEG is lossy)
                dec = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
                truth[split][rel] = (dec.transpose(2, 0, 1).copy(), names.index(cls))
    return truth


def tar_dir(src: Path, out: Path, mode: str = "w:gz", arc_prefix: str = "") -> Path:
    with tarfile.open(out, mode) as tar:
        for p in sorted(src.rglob("*")):
            tar.add(p, arcname=arc_prefix + str(p.relative_to(src)), recursive=False)
    return out


def make_store(
    path: Path,
    sizes=None,
    *,
    chunk: int = 100,
    seed: int = 0,
    classes=CLASSES,
    old_format: bool = False,
) -> dict:
    """A complete store written with the low-level writer (no Dask); returns the truth.

    ``old_format``: a store as format version 1 wrote it (no checksums, source order)."""
    from pipeline.data.store import (
        FORMAT,
        FORMAT_VERSION,
        create_layout,
        finalize_store,
        write_block,
    )

    sizes = sizes or {"train": 250, "val": 30, "test": 60}
    rng = np.random.default_rng(seed)
    create_layout(path, sizes, chunk, len(classes), checksum=not old_format)
    truth = {}
    for split, n in sizes.items():
        X = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        y = rng.integers(0, len(classes), n).astype(np.int64)
        for a in range(0, n, chunk):
            write_block(path, split, a, X[a : a + chunk], y[a : a + chunk])
        truth[split] = (X, y)
    mean = truth["train"][0].mean(axis=0).astype(np.float32)
    attrs = {
        "format": FORMAT,
        "format_version": 1 if old_format else FORMAT_VERSION,
        "splits": sizes,
        "class_names": list(classes),
        "chunk": chunk,
    }
    if old_format:
        attrs["order"] = {"train_val": "source order", "test": "source order"}
    else:
        attrs.update(shuffle_seed=0, order={"val": "fixture", "rows": "fixture"})
    finalize_store(path, attrs, mean, checksum=not old_format)
    truth["mean"] = mean
    return truth


def damage_chunk(store: Path, split: str, k: int, array: str = "images", nbytes: int = 64) -> Path:
    """Flip ``nbytes`` bytes in the middle of chunk ``k``'s file of ``split``/``array``
    (as a bad disk or a bad copy would); return the file."""
    f = Path(store) / split / array / "c" / str(k)
    while f.is_dir():
        f = f / "0"
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    data[mid : mid + nbytes] = bytes(b ^ 0x5A for b in data[mid : mid + nbytes])
    f.write_bytes(bytes(data))
    return f
