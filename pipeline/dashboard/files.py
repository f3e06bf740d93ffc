"""The files the page reads, confined to its folders.

Paths come from ``status.json``, from job records and from scheduler events (which any Dask
client can post), so none is trusted: a path is resolved, must lie inside one of the page's
folders (the data root's ``runs/`` and ``jobs/``, the run folders it was installed with), and
its file is opened by walking down from that folder without following a link, and read only
if it is a regular file (:func:`pipeline.safe_files.open_regular`).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from pipeline.safe_files import Refused, open_regular

#: a path the page does not read (one line): outside its folders, a link, or no regular file
NotServed = Refused

#: folders added one by one (run directories announced in this process) that are remembered
MAX_ADDED = 256


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
        parts = (*real_dir.relative_to(base).parts, path.name)
        with open_regular(base, parts, str(path)) as opened:
            yield opened

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


def real_path(p: Path) -> Path:
    """``p`` with every link and ``..`` resolved (as far as it exists)."""
    try:
        return p.resolve()
    except OSError:
        return p.absolute()
