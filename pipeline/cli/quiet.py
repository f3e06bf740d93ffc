"""Keeping Dask's own log records off the terminal while a command runs.

Commands report what went wrong in one line of their own (a lost scheduler, a stalled step);
distributed's client-side records (reconnect attempts, "couldn't gather, rescheduling",
tracebacks) and asyncio's "Task exception was never retrieved" for the client's abandoned
waits would bury that line.
"""

from __future__ import annotations

import logging

QUIET = (
    "distributed",
    "distributed.client",
    "distributed.comm",
    "distributed.core",
    "distributed.batched",
)


def quiet(func):
    """``func(args)`` with distributed's and asyncio's loggers silenced while it runs."""

    def run(args):
        import distributed  # noqa: F401 - configures its loggers first

        # asyncio reports the client's abandoned waits when they are collected, after the
        # command has returned: silenced for the rest of the (command's) process
        logging.getLogger("asyncio").setLevel(logging.CRITICAL + 1)
        names = {n for n in logging.root.manager.loggerDict if n.startswith("distributed.")} | set(
            QUIET
        )
        loggers = [logging.getLogger(n) for n in sorted(names)]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.setLevel(logging.CRITICAL + 1)
        try:
            return func(args)
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)

    run.__name__ = func.__name__
    return run
