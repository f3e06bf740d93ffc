"""Stopping a job cleanly when the worker process running its coordinator is told to end.

``docker stop``, a batch system's preemption or ``kill`` send SIGTERM; a worker started by a
nanny is closed by its nanny when the nanny gets the signal. Either way a job whose coordinator
runs there stops between two steps, like a cancel: its progress callback raises
:class:`Interrupted`, it keeps its checkpoints and records ``failed`` (interrupted) with the
command that resumes it. Only then does the process go on ending: the SIGTERM handler that was
there before runs (Dask's, which closes the worker) or the signal's default action; a closing
worker waits for its jobs at most :data:`CLOSE_WAIT_S` seconds.

Python runs signal handlers in the main thread, and only there can one be installed. A worker
process runs its event loop in the main thread and the coordinator in a seceded thread, so
:func:`guard` installs the handler through the worker's loop; where that loop runs in another
thread (an in-process cluster) there is no handler, and only a closing worker stops its jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator

from distributed.diagnostics.plugin import WorkerPlugin

STOP_SIGNALS = (signal.SIGTERM,)
#: how long a closing worker waits for its jobs to record that they stopped
CLOSE_WAIT_S = 5.0
#: after its last job stopped, how long a process waits before passing the signal on, so that
#: the worker's batched stream sends the job's last events and result to the scheduler first
FLUSH_S = 0.5
#: how long a job waits for the worker's event loop to install the handler
INSTALL_WAIT_S = 10.0


class Interrupted(KeyboardInterrupt):
    """Raised in a running job (from its progress callback) when its process or worker is ending.

    A KeyboardInterrupt, so the job stops as a run stops on Ctrl-C (where the training loop
    keeps a checkpoint of the last step it finished)."""


class Stop:
    """One running job's stop request: once ``request``ed, the next ``check()`` raises
    :class:`Interrupted`; later ones do not, so the progress of the job's own cleanup (a last
    checkpoint) is logged."""

    def __init__(self):
        self.reason: str | None = None
        self.raised = False
        self.stopped = threading.Event()  # set once the job has recorded its end

    def request(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def check(self) -> None:
        if self.reason is not None and not self.raised:
            self.raised = True
            raise Interrupted(self.reason)


class Signals:
    """A process's SIGTERM handler: while jobs run, it stops them and holds the signal back;
    once the last one has stopped (or when none runs) the signal goes where it went before."""

    def __init__(self):
        self.lock = threading.RLock()  # the handler runs in the main thread, which may hold it
        self.jobs: set[Stop] = set()
        self.previous: dict[int, object] = {}
        self.pending: int | None = None  # a signal held back until the jobs have stopped
        self.loop = None  # the worker's event loop (main thread), to pass the signal on later

    def install(self, loop=None) -> bool:
        """Install the handler, in the main thread only (else False); ``loop`` runs there."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for sig in STOP_SIGNALS:
            current = signal.getsignal(sig)
            if current != self.handle:
                self.previous[sig] = current
                signal.signal(sig, self.handle)
        self.loop = loop
        return True

    def handle(self, signum, frame) -> None:
        with self.lock:
            if self.jobs and self.pending is None:
                self.pending = signum
                for stop in self.jobs:
                    stop.request(_signal_reason(signum))
                return
        self.pass_on(signum, frame)  # no job runs, or the signal came again: no more waiting

    def pass_on(self, signum: int, frame=None) -> None:
        previous = self.previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:  # the default action: as if this handler were not there
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def add(self, stop: Stop) -> None:
        with self.lock:
            self.jobs.add(stop)
            if self.pending is not None:  # the process is already ending
                stop.request(_signal_reason(self.pending))

    def remove(self, stop: Stop) -> None:
        """The job has stopped; the last one lets a held-back signal through."""
        with self.lock:
            self.jobs.discard(stop)
            signum = self.pending if not self.jobs else None
            if signum is not None:
                self.pending = None
        if signum is None:
            return
        # again to this process: the handler, in the main thread, now passes it on
        if self.loop is not None:
            self.loop.add_callback(self.loop.call_later, FLUSH_S, os.kill, os.getpid(), signum)
        else:
            os.kill(os.getpid(), signum)


def _signal_reason(signum: int) -> str:
    return f"the worker process got {signal.Signals(signum).name}"


#: the one handler of this process
SIGNALS = Signals()


class CloseHook(WorkerPlugin):
    """On a closing worker (its nanny got SIGTERM, or it is retired): stop its jobs,
    wait for them."""

    name = "convpipe-job-stop"

    def __init__(self):
        self.jobs: set[Stop] = set()

    async def teardown(self, worker) -> None:
        stream = worker.batched_stream
        if stream.comm is None or stream.comm.closed():
            return  # the scheduler is gone: the jobs fail on their own and say so
        jobs = list(self.jobs)
        for stop in jobs:
            stop.request(f"its worker {worker.address} is closing")
        deadline = time.monotonic() + CLOSE_WAIT_S
        while time.monotonic() < deadline and not all(stop.stopped.is_set() for stop in jobs):
            await asyncio.sleep(0.05)


def _prepare(worker) -> CloseHook:
    """On the worker's event loop: the SIGTERM handler (if that is the main thread) and the hook."""
    SIGNALS.install(worker.loop)
    hook = worker.plugins.get(CloseHook.name)
    if not isinstance(hook, CloseHook):
        hook = worker.plugins[CloseHook.name] = CloseHook()
    return hook


def _on_loop(worker, fn):
    """Run ``fn(worker)`` on the worker's event loop and return its result (None if it is stuck)."""
    done, box = threading.Event(), {}

    def call():
        try:
            box["value"] = fn(worker)
        finally:
            done.set()

    worker.loop.add_callback(call)
    done.wait(INSTALL_WAIT_S)
    return box.get("value")


@contextlib.contextmanager
def guard(worker) -> Iterator[Stop]:
    """While a job's coordinator runs on ``worker``:
    SIGTERM or the worker closing request a stop."""
    hook = _on_loop(worker, _prepare)
    stop = Stop()
    SIGNALS.add(stop)
    if hook is not None:
        hook.jobs.add(stop)
    try:
        yield stop
    finally:
        stop.stopped.set()
        if hook is not None:
            hook.jobs.discard(stop)
        SIGNALS.remove(stop)
