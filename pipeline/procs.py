"""Which process owns a file: host, pid namespace and pid, and whether that process still runs.

Files on a shared data root or in ``/dev/shm`` can be left by processes of other hosts or of
other containers (another pid namespace, where equal pids are different processes). Only a
process of this host and this pid namespace can be checked; any other owner is assumed alive,
so nothing that may still be in use is ever removed.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


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
