"""A Ctrl-C that lands while distributed's ``sync()`` waits for a coroutine the client's event
loop has not yet begun: distributed's ``cancel`` callback raises ``NameError`` and tornado logs
it with a traceback (seen once in CI under `convpipe train --workers 1:2`'s Ctrl-C, its loop
busy with a joining worker). Made certain here by holding the loop while the interrupt lands;
the commands' logging (pipeline.cli.quiet) drops that record and no other."""

from __future__ import annotations

import logging
import threading

import pytest
from distributed.utils import LoopRunner, sync

from pipeline.cli.quiet import SYNC_CANCEL_RACE


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


class InterruptedEvent(threading.Event):
    """The Event ``sync()`` waits on, whose first wait is interrupted, as a Ctrl-C would."""

    def wait(self, timeout=None):
        raise KeyboardInterrupt


async def nothing():
    return None


def interrupt_before_the_coroutine_begins(loop, monkeypatch):
    """``sync(loop, nothing)`` interrupted while the loop is held: the coroutine and the
    cancel callback both wait behind the hold, so cancel runs before the coroutine binds
    its future. Returns once the loop has run both."""
    held, ran = threading.Event(), threading.Event()
    loop.add_callback(held.wait)
    with monkeypatch.context() as m:
        m.setattr(threading, "Event", InterruptedEvent)
        with pytest.raises(KeyboardInterrupt):
            sync(loop, nothing)
    loop.add_callback(ran.set)  # queued behind sync's coroutine and its cancel
    held.set()
    assert ran.wait(30)


@pytest.fixture
def loop():
    runner = LoopRunner(asynchronous=False)
    runner.start()
    yield runner.loop
    runner.stop()


@pytest.fixture
def tornado_records():
    logger = logging.getLogger("tornado.application")
    handler = Records()
    logger.addHandler(handler)
    yield handler.records
    logger.removeHandler(handler)
    logger.removeFilter(SYNC_CANCEL_RACE)


def test_the_race_logs_a_traceback_that_the_commands_filter_drops(
    loop, tornado_records, monkeypatch
):
    interrupt_before_the_coroutine_begins(loop, monkeypatch)
    # distributed as pinned: the race is real, its record a NameError with a traceback
    assert [type(r.exc_info[1]) for r in tornado_records] == [NameError], tornado_records
    assert SYNC_CANCEL_RACE.filter(tornado_records[0]) is False

    tornado_records.clear()
    logging.getLogger("tornado.application").addFilter(SYNC_CANCEL_RACE)
    interrupt_before_the_coroutine_begins(loop, monkeypatch)
    assert tornado_records == []


def test_other_callback_errors_still_reach_the_log(loop, tornado_records):
    logging.getLogger("tornado.application").addFilter(SYNC_CANCEL_RACE)
    ran = threading.Event()

    def broken():  # a NameError about 'future', raised outside distributed
        raise NameError("cannot access free variable 'future'")

    loop.add_callback(broken)
    loop.add_callback(lambda: 1 / 0)
    loop.add_callback(ran.set)
    assert ran.wait(30)
    kinds = [type(r.exc_info[1]) for r in tornado_records]
    assert kinds == [NameError, ZeroDivisionError], tornado_records
