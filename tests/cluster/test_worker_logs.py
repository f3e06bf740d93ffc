"""The embedded cluster's worker processes print on the user's terminal: a ConvpipeError a task
raises is convpipe's one line, not also Dask's "Compute Failed" traceback; other errors still
show, and the worker's own log keeps every record."""

from __future__ import annotations

import pytest

from pipeline.cluster import connect
from pipeline.errors import DataError
from tests.helpers.wait import wait_until


def _damaged_store():
    raise DataError("s.zarr: damaged chunk: split 'train', images chunk 1")


def _a_bug():
    raise ValueError("a bug in a task")


def test_a_user_error_is_off_the_terminal_and_in_the_workers_log(capfd):
    seen = []

    def terminal():  # what the worker process wrote to stderr (inherited: the terminal's)
        seen.append(capfd.readouterr().err)
        return "".join(seen)

    with connect(workers=1, dashboard_address=None) as client:
        with pytest.raises(DataError):
            client.submit(_damaged_store, pure=False).result()
        with pytest.raises(ValueError):
            client.submit(_a_bug, pure=False).result()

        def logged():
            return "\n".join(msg for logs in client.get_worker_logs().values() for _, msg in logs)

        wait_until(lambda: "a bug in a task" in logged(), timeout=30, what="the bug's record")
        assert "damaged chunk" in logged()  # the worker's own log keeps both records
        wait_until(
            lambda: "a bug in a task" in terminal(),
            timeout=30,
            what="the bug's Compute Failed record on the terminal",
        )
    assert "Compute Failed" in terminal() and "damaged chunk" not in terminal()
