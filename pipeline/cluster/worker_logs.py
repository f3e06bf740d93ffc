"""Preloaded into the embedded cluster's worker processes, whose stderr is the user's terminal:
a mistake that convpipe reports in one line (a :class:`~pipeline.errors.ConvpipeError`: a damaged
store, a setting that cannot work) is not printed there a second time as Dask's "Compute Failed"
record with its traceback. The worker's own log keeps the record (Dask's in-memory log:
``client.get_worker_logs()``, the dashboard's worker pages); errors of any other kind still
reach the terminal.

Nor does a closing worker print Dask's "Failed to communicate with scheduler during heartbeat"
with its CommClosedError traceback (:class:`ClosingHeartbeatOffTheTerminal`)."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import weakref

from distributed.core import Status

from pipeline.errors import ConvpipeError

#: how Dask's worker words a heartbeat that got no answer from the scheduler
HEARTBEAT_FAILED = "Failed to communicate with scheduler during heartbeat"
#: a worker in these states has closed, or is closing, its connections itself
CLOSING = (Status.closing, Status.closed)


def _error_names() -> tuple[str, ...]:
    """``Name(`` of ConvpipeError and each subclass defined so far: how its ``repr`` begins."""
    seen, todo = [], [ConvpipeError]
    while todo:
        cls = todo.pop()
        seen.append(f"{cls.__name__}(")
        todo.extend(cls.__subclasses__())
    return tuple(seen)


class UserErrorsOffTheTerminal(logging.Filter):
    """Drops Dask's "Compute Failed" record of a task that raised a ConvpipeError."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Compute Failed") or not isinstance(record.args, tuple):
            return True
        exception_text = str(record.args[3]) if len(record.args) > 3 else ""
        return not exception_text.startswith(_error_names())


class ClosingHeartbeatOffTheTerminal(logging.Filter):
    """Drops Dask's "Failed to communicate with scheduler during heartbeat" record (a
    CommClosedError traceback) of a worker that is closing.

    The embedded cluster closes its workers first: each worker stops its heartbeat's timer but
    not a heartbeat already waiting for the scheduler's reply, then closes its connections,
    that one's too (``Worker.close``: ``self.rpc.close()``), and the waiting heartbeat logged
    the closed connection as an error. Whenever a heartbeat was in flight at that moment (it
    goes every 0.5 s; its reply is slower while the scheduler is busy closing the cluster) the
    traceback ended the output of `convpipe train`, `convpipe submit` or bench_train.py after
    everything went well (dask/distributed#7105). A heartbeat that fails while the worker runs
    (the scheduler is gone) is still printed."""

    def __init__(self, worker=None):
        super().__init__()
        self.worker = weakref.ref(worker) if worker is not None else None

    def filter(self, record: logging.LogRecord) -> bool:
        if self.worker is None or not str(record.msg).startswith(HEARTBEAT_FAILED):
            return True
        worker = self.worker()
        return worker is not None and worker.status not in CLOSING


def install(worker=None) -> None:
    """Filter the terminal's handlers (streams to stderr) of Dask's and the root logger; the
    heartbeats of ``worker`` (this process's) too."""
    for name in ("distributed", ""):
        for handler in logging.getLogger(name).handlers:
            stream = getattr(handler, "stream", None)
            if stream not in (sys.stderr, sys.__stderr__):
                continue
            if not any(isinstance(f, UserErrorsOffTheTerminal) for f in handler.filters):
                handler.addFilter(UserErrorsOffTheTerminal())
            if worker is not None and not any(
                isinstance(f, ClosingHeartbeatOffTheTerminal) for f in handler.filters
            ):
                handler.addFilter(ClosingHeartbeatOffTheTerminal(worker))


def dask_setup(worker) -> None:  # Dask's preload hook, run as the worker process starts
    install(worker)
    terminal_interrupt_ignored()


def terminal_interrupt_ignored() -> None:
    """SIGINT ignored in this worker process: a terminal's Ctrl-C goes to its whole process
    group and belongs to the convpipe command, which stops the run and closes the cluster. The
    cluster's first workers start with SIGINT already ignored (pipeline.cluster); a worker that
    Dask's adaptive scaling starts later (``--workers MIN:MAX``) did not, and printed a
    KeyboardInterrupt traceback on Ctrl-C."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
