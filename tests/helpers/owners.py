"""Other processes that own a directory (``owner.json``, :class:`pipeline.procs.OwnerLock`): one
that holds it until the test lets go, and one that took it and died without letting go."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

from tests.helpers.wait import wait_until

#: claims ``argv[1]`` as ``argv[2]`` (RunDir.claim) and holds it until stdin closes; with
#: ``argv[3] == "die"`` it ends at once without releasing it (as a killed process would)
_HOLDER = """
import os, sys
from pipeline.training.rundir import RunDir
lock = RunDir(sys.argv[1]).claim(sys.argv[2])
if sys.argv[3] == "die":
    os._exit(0)
sys.stdin.read()
lock.release()
"""


@contextlib.contextmanager
def held_by_another_process(path, what: str = "convpipe train"):
    """A live process that owns ``path`` (made if need be) while the ``with`` block runs;
    yields its ``Popen`` (``.pid``). It lets go when the block ends."""
    Path(path).mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path), what, "hold"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(
            lambda: _holder_pid(path) == proc.pid or proc.poll() is not None,
            timeout=60,
            what=f"{path}/owner.json naming pid {proc.pid}",
        )
        assert proc.poll() is None, proc.stderr.read()
        yield proc
    finally:
        proc.stdin.close()
        proc.wait(60)


def _holder_pid(path) -> int | None:
    try:
        return json.loads((Path(path) / "owner.json").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def left_by_a_dead_process(path, what: str = "convpipe train") -> int:
    """``path`` (made if need be) with an ``owner.json`` naming a process that has ended
    without releasing it; that process's pid."""
    Path(path).mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-c", _HOLDER, str(path), what, "die"], capture_output=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads((Path(path) / "owner.json").read_text())["pid"]
