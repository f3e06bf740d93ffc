"""The files the page reads, confined to its folders.

Paths come from ``status.json``, from job records and from scheduler events (which any Dask
client can post), so none is trusted: a path is resolved, must lie inside one of the page's
folders (the data root's ``runs/`` and ``jobs/``, the run folders it was installed with), and
its file is opened by walking down from that folder one component at a time with
``O_NOFOLLOW`` (a link swapped in meanwhile is refused too), then read only if ``fstat`` says
it is a regular file (not a link, a FIFO that would block the reader, a device, a directory).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import stat
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

# O_PATH where there is one: walking down needs search permission only, as a path lookup does
_DIR_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO must not wait for a writer; regular files read as usual
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: folders added one by one (run directories announced in this process) that are remembered
MAX_ADDED = 256


class NotServed(OSError):
    """A path the page does not read: outside its folders, a link, or not a regular file."""

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


class Folders:
    """The folders the page reads regular files from (resolved when used: a folder may appear
    after the page started, or be a link the operator made)."""

    def __init__(self, folders: Iterable[str | Path]):
        self._folders = tuple(dict.fromkeys(Path(f).absolute() for f in folders))
        self._added: collections.OrderedDict[Path, None] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Folders({[str(f) for f in self.folders]})"

    @property
    def folders(self) -> tuple[Path, ...]:
        with self._lock:
            return self._folders + tuple(self._added)

    def add(self, folder: str | Path) -> None:
        """Read from ``folder`` too (resolved now); the oldest of more than
        :data:`MAX_ADDED` added ones is forgotten."""
        real = real_path(Path(folder))
        with self._lock:
            self._added.pop(real, None)
            self._added[real] = None
            while len(self._added) > MAX_ADDED:
                self._added.popitem(last=False)

    def inside(self, path: str | Path) -> tuple[Path, Path] | None:
        """(folder, resolved path) for a ``path`` inside one of the folders, else None."""
        real = real_path(Path(path))
        for folder in self.folders:
            base = real_path(folder)
            if real.is_relative_to(base):
                return base, real
        return None

    def directory(self, path: str | Path) -> Path | None:
        """The resolved ``path`` if it lies inside one of the folders, else None."""
        found = self.inside(path)
        return found[1] if found else None

    @contextlib.contextmanager
    def open(self, path: str | Path) -> Iterator[tuple[BinaryIO, os.stat_result]]:
        """(binary file, its fstat) of the regular file ``path``; FileNotFoundError when it is
        not there, :class:`NotServed` when the page does not read it (one line saying why)."""
        path = Path(path)
        found = self.inside(path.parent)
        if found is None:
            raise NotServed(errno.EACCES, "outside the folders the page reads", str(path))
        base, real_dir = found
        fd = _open_below(base, real_dir.relative_to(base).parts, path.name, str(path))
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise NotServed(errno.EACCES, "not a regular file", str(path))
            f = os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
        with f:
            yield f, st

    def read(self, path: str | Path, offset: int = 0) -> tuple[bytes, os.stat_result]:
        """The bytes of the regular file ``path`` from ``offset``, and its fstat."""
        with self.open(path) as (f, st):
            if offset:
                f.seek(offset)
            return f.read(), st

    def read_tail(self, path: str | Path, size: int) -> bytes:
        """At most the last ``size`` bytes of the regular file ``path``, from a line's start."""
        with self.open(path) as (f, st):
            start = max(0, st.st_size - size)
            f.seek(start)
            data = f.read()
        if start:
            data = data[data.find(b"\n") + 1 :]
        return data

    def stat(self, path: str | Path) -> os.stat_result | None:
        """The fstat of the regular file ``path``; None when the page does not read it."""
        try:
            with self.open(path) as (_, st):
                return st
        except OSError:
            return None


def _open_below(base: Path, parts: tuple[str, ...], name: str, shown: str) -> int:
    """A descriptor of ``base/parts.../name``, opened one component at a time, no link
    followed below ``base``."""
    try:
        fd = os.open(base, _DIR_FLAGS)
    except OSError as exc:
        raise _why(exc, shown) from None
    try:
        for part in parts:
            try:
                below = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                raise _why(exc, shown) from None
            os.close(fd)
            fd = below
        try:
            return os.open(name, _FILE_FLAGS, dir_fd=fd)
        except OSError as exc:
            raise _why(exc, shown) from None
    finally:
        os.close(fd)


def _why(exc: OSError, shown: str) -> OSError:
    """FileNotFoundError for what is not there (or is no directory where one is walked
    through: with O_PATH a link there reads so), NotServed for a link, else ``exc``."""
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return FileNotFoundError(errno.ENOENT, "no such file", shown)
    if exc.errno == errno.ELOOP:
        return NotServed(errno.ELOOP, "a symbolic link (the page follows none)", shown)
    return exc


def real_path(p: Path) -> Path:
    """``p`` with every link and ``..`` resolved (as far as it exists)."""
    try:
        return p.resolve()
    except OSError:
        return p.absolute()
