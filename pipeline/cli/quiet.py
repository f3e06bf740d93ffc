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


class SyncCancelRace(logging.Filter):
    """Drops tornado's record of one race in distributed's ``sync()`` (distributed 2026.8,
    ``distributed/utils.py``). A Ctrl-C while the main thread waits in ``sync()`` queues a
    ``cancel`` callback on the client's event loop; when the loop was busy (a worker joining,
    say) and the call's coroutine had not yet started its awaitable, ``cancel`` reads the
    not-yet-bound ``future`` and raises ``NameError``, which tornado logs with its traceback
    under the command's one "interrupted" line. The interrupted call then goes on uncancelled
    in the background, which does not matter to a command that is ending: the record says
    nothing to the user. Every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, NameError) or exc.__traceback__ is None:
            return True
        tb = exc.__traceback__
        while tb.tb_next is not None:
            tb = tb.tb_next
        inside = tb.tb_frame.f_globals.get("__name__") == "distributed.utils"
        return not (inside and tb.tb_frame.f_code.co_name == "cancel" and "'future'" in str(exc))


SYNC_CANCEL_RACE = SyncCancelRace()


def quiet(func):
    """``func(args)`` with distributed's and asyncio's loggers silenced while it runs."""

    def run(args):
        import distributed  # noqa: F401 - configures its loggers first

        # asyncio reports the client's abandoned waits when they are collected, after the
        # command has returned: silenced for the rest of the (command's) process
        logging.getLogger("asyncio").setLevel(logging.CRITICAL + 1)
        # a Ctrl-C's cancel callback may run after the command has returned: the same
        logging.getLogger("tornado.application").addFilter(SYNC_CANCEL_RACE)
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
