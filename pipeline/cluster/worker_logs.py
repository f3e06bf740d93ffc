"""Preloaded into the embedded cluster's worker processes, whose stderr is the user's terminal:
a mistake that convpipe reports in one line (a :class:`~pipeline.errors.ConvpipeError`: a damaged
store, a setting that cannot work) is not printed there a second time as Dask's "Compute Failed"
record with its traceback. The worker's own log keeps the record (Dask's in-memory log:
``client.get_worker_logs()``, the dashboard's worker pages); errors of any other kind still
reach the terminal."""

from __future__ import annotations

import logging
import sys

from pipeline.errors import ConvpipeError


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


def install() -> None:
    """Filter the terminal's handlers (streams to stderr) of Dask's and the root logger."""
    for name in ("distributed", ""):
        for handler in logging.getLogger(name).handlers:
            stream = getattr(handler, "stream", None)
            if stream in (sys.stderr, sys.__stderr__) and not any(
                isinstance(f, UserErrorsOffTheTerminal) for f in handler.filters
            ):
                handler.addFilter(UserErrorsOffTheTerminal())


def dask_setup(worker) -> None:  # Dask's preload hook, run as the worker process starts
    install()
