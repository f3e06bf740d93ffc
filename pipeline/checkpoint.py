"""Atomic, pickle-free checkpoints: named arrays plus JSON metadata in one ``.npz`` file.

Loading never runs code: arrays are read with ``allow_pickle=False`` and the metadata is JSON.
Writing is atomic (:mod:`pipeline.atomic`): a reader sees either the old checkpoint or the new
one, never a torn file.
A damaged file (truncated, bad CRC, missing metadata) raises :class:`CheckpointError`.
"""

from __future__ import annotations

import json
import threading
import zipfile
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_write
from pipeline.errors import ConvpipeError

META_KEY = "__meta__"
FORMAT = "convpipe-checkpoint/1"


#: held while a thread reads .npy/.npz files. NumPy parses each array's header with
#: ``ast.literal_eval``, and CPython 3.11's AST constructor keeps its recursion depth in state
#: shared by the interpreter's threads (python/cpython#106905): two threads parsing at once can
#: fail with "SystemError: AST constructor recursion depth mismatch". A sweep's trials resume
#: from their checkpoints in threads of one process; CI saw the error there once.
NPY_READ_LOCK = threading.Lock()


def read_npz(path) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` at ``path``, read eagerly, pickle-free, under NPY_READ_LOCK
    (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError pass through)."""
    with NPY_READ_LOCK, np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


class CheckpointError(ConvpipeError):
    """A checkpoint file is missing, torn or not a convpipe checkpoint."""


def save_checkpoint(path, arrays: dict[str, np.ndarray], meta: dict | None = None) -> Path:
    """Write ``arrays`` and JSON-serialisable ``meta`` to ``path`` atomically; return the path.

    Array names may contain '/' to group them (e.g. ``"adam/W1/m"``).
    """
    path = Path(path)
    if META_KEY in arrays:
        raise ValueError(f"array name {META_KEY!r} is reserved for the checkpoint's metadata")
    meta = {"format": FORMAT, **(meta or {})}
    blob = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    arrays = {META_KEY: blob, **{k: np.ascontiguousarray(v) for k, v in arrays.items()}}
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def load_checkpoint(path) -> tuple[dict[str, np.ndarray], dict]:
    """Read a checkpoint written by :func:`save_checkpoint`: ``(arrays, meta)``.

    Every array is read eagerly, so a damaged member is found here, not later.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        arrays = read_npz(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is damaged or torn ({type(exc).__name__}: {exc})"
        ) from None
    blob = arrays.pop(META_KEY, None)
    try:
        meta = json.loads(bytes(blob).decode()) if blob is not None else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has no convpipe metadata (not a {FORMAT} file)")
    return arrays, meta
