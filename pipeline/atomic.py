"""Atomic file writes: a reader sees the old file or the new one, never a torn one.

The content goes to a temporary file in the same directory, is fsync'ed, then renamed over the
final name (and the directory fsync'ed). Files get ordinary permissions (0666 less the umask,
read from /proc without changing it, so threads writing at the same time are safe), not
``mkstemp``'s 0600.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(f)`` on a binary file that becomes ``path`` only once complete; nothing is
    left of it on failure. An OSError of the writing (a full disk) names ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if exc.filename is None and exc.errno is not None:  # a write or fsync on the descriptor
            raise type(exc)(exc.errno, exc.strerror, str(path)) from None
        raise
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(text.encode()))


def _umask() -> int:
    """The process's umask, read without changing it: ``os.umask`` can only be read by setting
    it, and a file another thread creates meanwhile would get no umask at all."""
    mask = _proc_umask()
    return _IMPORT_UMASK if mask is None else mask


def _proc_umask() -> int | None:
    """The ``Umask:`` line of ``/proc/self/status`` (Linux >= 4.7), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        return None
    return None


def _swap_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: where /proc does not tell: the umask when this module was imported (set and restored once)
_IMPORT_UMASK = _proc_umask()
if _IMPORT_UMASK is None:  # pragma: no cover - not Linux
    _IMPORT_UMASK = _swap_umask()


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
