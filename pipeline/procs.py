"""Which process owns a file: host, pid namespace and pid, and whether that process still runs.

Files on a shared data root or in ``/dev/shm`` can be left by processes of other hosts or of
other containers (another pid namespace, where equal pids are different processes). Only a
process of this host and this pid namespace can be checked; any other owner is assumed alive,
so nothing that may still be in use is ever removed.

:class:`OwnerLock` is a lock file that names its holder (pid, host, pid namespace, process start
time, since when, what for): one process at a time holds it, and a successor takes over the lock
of a holder that has ended.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path


def pid_namespace() -> int:
    """This process's pid namespace (0 where the system does not say)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


@dataclass(frozen=True)
class Owner:
    """A process as seen from anywhere: ``host``, pid ``namespace`` and ``pid``."""

    host: str
    namespace: int
    pid: int

    @classmethod
    def me(cls) -> Owner:
        return cls(socket.gethostname(), pid_namespace(), os.getpid())

    @classmethod
    def from_record(cls, record: dict | None) -> Owner | None:
        """The process a record names by ``host``, ``pid_namespace`` and ``pid`` (a job's
        status names its coordinator so); None when it names none."""
        try:
            return cls(str(record["host"]), int(record["pid_namespace"]), int(record["pid"]))
        except (KeyError, TypeError, ValueError):
            return None

    def record(self) -> dict:
        """``{"host", "pid_namespace", "pid"}``, what :meth:`from_record` reads."""
        return {"host": self.host, "pid_namespace": self.namespace, "pid": self.pid}

    def is_local(self) -> bool:
        """Whether this process can tell if the owner runs (same host, same pid namespace)."""
        return self.host == socket.gethostname() and self.namespace == pid_namespace()

    def alive(self) -> bool:
        """False only when the owner is local and its pid is gone; True when it cannot be told."""
        return not self.is_local() or pid_alive(self.pid)


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs in this pid namespace (a process of another user counts as running)."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_started(pid: int) -> int | None:
    """When process ``pid`` of this pid namespace started, in clock ticks since boot (field 22 of
    ``/proc/PID/stat``); None where the system does not say. A pid that is reused later belongs
    to a process that started later: with this, a pid names one process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    try:  # the command name, in parentheses, may hold spaces: count fields after its end
        return int(stat[stat.rindex(b")") + 2 :].split()[19])
    except (ValueError, IndexError):
        return None


# ---- owner locks ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Holder:
    """Who holds an :class:`OwnerLock`: the process (``owner``), when that process started
    (``started``, :func:`process_started`; None where unknown), since when it holds the lock
    (``since``, UTC ``YYYY-mm-ddTHH:MM:SSZ``) and what it does there (``what``)."""

    owner: Owner
    started: int | None
    since: str
    what: str

    def alive(self, gone: Owner | None = None) -> bool:
        """False when the holder has ended: a local pid that is gone, or that now names a process
        started at another time; or, for a holder this process cannot check (another host or pid
        namespace), when it is ``gone`` (a process the caller knows has ended, e.g. from the
        scheduler). True when it cannot be told."""
        if not self.owner.is_local():
            return gone != self.owner
        if not pid_alive(self.owner.pid):
            return False
        now = process_started(self.owner.pid)
        return self.started is None or now is None or now == self.started

    def text(self) -> str:
        """``pid 1234 on host h since 2026-12-04T18:00:00Z (convpipe train)``."""
        return f"pid {self.owner.pid} on host {self.owner.host} since {self.since} ({self.what})"

    def to_json(self, token: str) -> bytes:
        """The lock file's content: this record and ``token``, which makes each holder's file
        one of its own (how a successor tells a fresh lock from the stale one it judged)."""
        return (
            json.dumps(
                {
                    **self.owner.record(),
                    "started": self.started,
                    "since": self.since,
                    "what": self.what,
                    "token": token,
                },
                sort_keys=True,
            )
            + "\n"
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Holder | None:
        """The holder a lock file names; None for anything else (empty, torn, not a record)."""
        try:
            d = json.loads(raw)
            owner = Owner.from_record(d)
            started = d.get("started")
            if owner is None:
                return None
            return cls(
                owner, None if started is None else int(started), str(d["since"]), str(d["what"])
            )
        except (ValueError, TypeError, KeyError, AttributeError):
            return None


class LockHeld(Exception):
    """An :class:`OwnerLock` is held by a live process, ``holder``."""

    def __init__(self, path: Path, holder: Holder):
        super().__init__(f"{path} is held by {holder.text()}")
        self.path = path
        self.holder = holder


#: how long a lock file may stay without a holder's record in it (a holder is between creating
#: and writing it: microseconds) before it counts as left by a process that died right there
UNWRITTEN_S = 2.0


class OwnerLock:
    """A lock file that names its holder: ``path`` is created exclusively (``O_CREAT|O_EXCL``)
    holding this process's :class:`Holder` record, and removed by :meth:`release`.

    A lock whose holder has ended (:meth:`Holder.alive`: judged on this host and in this pid
    namespace, or said ``gone`` by the caller) is taken over: one successor deletes the stale
    file (:meth:`_remove_stale`), then whoever creates the file first holds the lock.
    A holder elsewhere that cannot be checked holds the lock until it releases it, or until the
    file is deleted by hand. ``with lock:`` acquires it (unless held already) and releases it.
    """

    def __init__(self, path: str | Path, what: str):
        self.path = Path(path)
        self.what = what
        self._mine: bytes | None = None

    @property
    def held(self) -> bool:
        return self._mine is not None

    def holder(self, gone: Owner | None = None) -> Holder | None:
        """The live holder of the lock; None when it is free or its holder has ended."""
        found = self._read()
        if found is None or found[0] is None:
            return None
        return found[0] if found[0].alive(gone) else None

    def acquire(self, gone: Owner | None = None) -> OwnerLock:
        """Take the lock for this process; :class:`LockHeld` if a live process holds it.
        ``gone``: a process the caller knows has ended (its lock is taken over from anywhere)."""
        me = Owner.me()
        mine = Holder(me, process_started(me.pid), utc_now(), self.what).to_json(
            secrets.token_hex(8)
        )
        waiting: dict[Path, float] = {}  # markers of other successors, since when seen
        while True:  # each turn takes the lock, raises, or sees it change hands
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                found = self._read()
                if found is None:  # released meanwhile
                    continue
                theirs, raw = found
                if theirs is not None and theirs.alive(gone):
                    raise LockHeld(self.path, theirs) from None
                self._remove_stale(raw, waiting)
                continue
            try:
                os.write(fd, mine)  # one write of a few hundred bytes
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                self.path.unlink(missing_ok=True)
                raise
            os.close(fd)
            if self._bytes() == mine:  # not deleted meanwhile as a stale empty file
                self._mine = mine
                return self

    def _bytes(self) -> bytes | None:
        """The lock file's content; None without one."""
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def release(self) -> None:
        """Delete the lock file if it is still this holder's (never one a successor took over)."""
        mine, self._mine = self._mine, None
        if mine is not None and self._bytes() == mine:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> OwnerLock:
        return self if self.held else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _read(self) -> tuple[Holder | None, bytes] | None:
        """The holder the file names (None: no record in it) and its bytes; None if there is no
        file. A file without a record is read again for :data:`UNWRITTEN_S` seconds first: its
        holder may be between creating and writing it."""
        deadline = time.monotonic() + UNWRITTEN_S
        while True:
            try:
                raw = self.path.read_bytes()
            except (FileNotFoundError, NotADirectoryError):
                return None
            holder = Holder.from_json(raw)
            if holder is not None or time.monotonic() > deadline:
                return holder, raw
            time.sleep(0.02)

    def _remove_stale(self, raw: bytes, waiting: dict[Path, float]) -> None:
        """Delete the lock file judged stale, whose content was ``raw``. Of the successors that
        judged it, the one that makes the marker ``<lock>.taking-<digest of raw>`` (a hard link
        to the lock file: made exclusively) deletes it, once the marker shows that the file is
        still that stale one; the others wait for the marker to go (``waiting``: since when),
        and delete a marker left for :data:`UNWRITTEN_S` seconds by a successor that died."""
        marker = self.path.with_name(
            f"{self.path.name}.taking-{hashlib.sha256(raw).hexdigest()[:16]}"
        )
        try:
            os.link(self.path, marker)
        except FileNotFoundError:  # released, or removed by another successor
            return
        except FileExistsError:  # another successor is removing it
            first = waiting.setdefault(marker, time.monotonic())
            if time.monotonic() - first > UNWRITTEN_S:
                marker.unlink(missing_ok=True)
                del waiting[marker]
            else:
                time.sleep(0.001)
            return
        except OSError:  # no hard links on this file system
            self._rename_stale(raw)
            return
        try:
            if marker.read_bytes() == raw:  # still the stale file: only this successor acts now
                self.path.unlink(missing_ok=True)
        finally:
            marker.unlink(missing_ok=True)

    def _rename_stale(self, raw: bytes) -> None:
        """:meth:`_remove_stale` without hard links: the file is renamed aside and put back if
        it is not the stale one (a successor's fresh lock). A third successor taking the lock
        while it is aside can make two holders; without hard links that is the best there is."""
        aside = self.path.with_name(f"{self.path.name}.stale-{secrets.token_hex(8)}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:  # another successor moved it first
            return
        try:
            if aside.read_bytes() != raw:
                os.rename(aside, self.path)
        finally:
            aside.unlink(missing_ok=True)


def utc_now() -> str:
    """The time now, UTC, to the second: ``2026-12-04T18:00:00Z`` (the form job records use)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
