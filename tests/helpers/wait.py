"""The one way the tests wait for something that happens in another thread or process."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T],
    timeout: float = 30.0,
    what: str | Callable[[], str] = "the condition",
    *,
    interval: float = 0.01,
) -> T:
    """Poll ``condition()`` until it returns a true value, and return that value; fail with an
    AssertionError naming ``what`` (a string, or a function that says it at the time of failure,
    e.g. with a log's tail) once ``timeout`` seconds have passed on the monotonic clock.

    ``interval`` is only the polling period (raise it where one poll is costly, e.g. a process)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            said = what() if callable(what) else what
            raise AssertionError(f"{said} not reached within {timeout} s")
        time.sleep(interval)
    return value
