"""Reading a regular file below a folder without following links.

Paths on the data root come from files and events others can write, so a reader does not trust
them: the file is opened by walking down from the folder one component at a time with
``O_NOFOLLOW`` (links in the folder's own path are the operator's and are followed; none below
it, not even one swapped in meanwhile), then read only if ``fstat`` says it is a regular file
(not a link, a FIFO that would block the reader, a device, a directory).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

# O_PATH where there is one: walking down needs search permission only, as a path lookup does
_DIR_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO must not wait for a writer; regular files read as usual
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

LINK = "a symbolic link, not followed"
NOT_REGULAR = "not a regular file"


class Refused(OSError):
    """A file not read: a symbolic link, or not a regular file (one line: the path and why)."""

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


@contextlib.contextmanager
def open_regular(
    folder: str | Path, parts: Sequence[str], shown: str | None = None
) -> Iterator[tuple[BinaryIO, os.stat_result]]:
    """(binary file, its fstat) of the regular file ``folder/parts...``; FileNotFoundError when
    it is not there, :class:`Refused` when it or a folder on the way below ``folder`` is a link,
    or it is no regular file. Errors name ``shown`` (default: the joined path)."""
    shown = shown or str(Path(folder, *parts))
    fd = _open_below(folder, parts, shown)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused(errno.EACCES, NOT_REGULAR, shown)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f, st


def read_regular(folder: str | Path, parts: Sequence[str], offset: int = 0) -> bytes:
    """The bytes of the regular file ``folder/parts...`` from ``offset`` (:func:`open_regular`)."""
    with open_regular(folder, parts) as (f, _):
        if offset:
            f.seek(offset)
        return f.read()


def _open_below(folder: str | Path, parts: Sequence[str], shown: str) -> int:
    """A descriptor of ``folder/parts...``, opened one component at a time."""
    if not parts:
        raise ValueError("no file named below the folder")
    try:
        fd = os.open(folder, _DIR_FLAGS)
    except OSError as exc:
        raise _why(exc, shown) from None
    try:
        for part in parts[:-1]:
            try:
                below = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                raise _why(exc, shown, _is_link(part, fd)) from None
            os.close(fd)
            fd = below
        try:
            return os.open(parts[-1], _FILE_FLAGS, dir_fd=fd)
        except OSError as exc:
            raise _why(exc, shown) from None
    finally:
        os.close(fd)


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _why(exc: OSError, shown: str, link: bool = False) -> OSError:
    """:class:`Refused` for a link (ELOOP; with O_PATH a linked folder reads ENOTDIR), else
    FileNotFoundError for what is not there (or no folder where one is walked through), else
    ``exc``."""
    if link or exc.errno == errno.ELOOP:
        return Refused(errno.ELOOP, LINK, shown)
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return FileNotFoundError(errno.ENOENT, "no such file", shown)
    return exc
