"""The worker side of a job without a cluster: its Report (log, state, cancel check, events)."""

from __future__ import annotations

import pytest

from pipeline.jobs.records import JobFiles
from pipeline.jobs.runner import JobCancelled, Report


def make_report(tmp_path, client=None) -> Report:
    files = JobFiles.of(tmp_path, "j")
    files.dir.mkdir(parents=True)
    files.write_status({"job": "j", "state": "running", "attempt": 1})
    return Report({"job": "j", "attempt": 1, "job_dir": str(files.dir)}, client=client)


class Events:
    """A client whose scheduler answers get_events with ``answer`` (a list, or an exception to
    raise)."""

    def __init__(self, answer):
        self.answer, self.calls = answer, 0

    def get_events(self, topic):
        self.calls += 1
        if isinstance(self.answer, BaseException):
            raise self.answer
        return [(0.0, m) for m in self.answer]


def log_of(report: Report) -> list[str]:
    return [line.split(" ", 1)[1] for line in report.files.read_log()[0].splitlines()]


def test_a_cancel_request_for_this_attempt_raises(tmp_path):
    report = make_report(
        tmp_path,
        Events(
            [
                {"type": "cancel", "attempt": 2},
                {"type": "cancel", "attempt": 1, "by": "me@h", "at": "t"},
            ]
        ),
    )
    with pytest.raises(JobCancelled, match="cancelled by me@h at t"):
        report.check_cancel(force=True)


def test_an_unreachable_scheduler_is_left_to_the_job_s_next_call(tmp_path):
    report = make_report(tmp_path, Events(ConnectionResetError("gone")))
    report.check_cancel(force=True)
    assert log_of(report) == []


def test_any_other_failure_of_the_cancel_check_is_logged_once(tmp_path):
    client = Events(RuntimeError("boom"))
    report = make_report(tmp_path, client)
    report.check_cancel(force=True)
    report.check_cancel(force=True)
    assert client.calls == 2
    assert log_of(report) == [
        "cannot check for a cancel request (RuntimeError: boom); the job goes on"
    ]


def test_events_off_a_worker_go_to_the_files_only(tmp_path):
    report = make_report(tmp_path)
    report.log("hello")  # no worker here: get_worker() fails, the file has the line
    assert log_of(report) == ["hello"]


def test_an_event_the_worker_refuses_is_logged_once(tmp_path, monkeypatch):
    from pipeline.jobs import runner

    class Worker:
        def log_event(self, topic, msg):
            raise TypeError("Message must be msgpack serializable")

    monkeypatch.setattr(runner, "get_worker", lambda: Worker())
    report = make_report(tmp_path)
    report.log("one")
    report.log("two")
    assert log_of(report) == [
        "one",
        "an event could not go to the scheduler (TypeError: Message must be msgpack "
        "serializable); the job's files keep everything",
        "two",
    ]


def test_a_stop_is_raised_after_the_event_is_recorded_and_only_once(tmp_path):
    from pipeline.jobs.interrupt import Interrupted, Stop

    report = make_report(tmp_path)
    report.stop = Stop()
    report.stop.request("the worker process got SIGTERM")
    with pytest.raises(Interrupted):
        report.progress({"event": "checkpoint", "step": 3, "path": "ckpt-3.npz"})
    report.progress(
        {"event": "checkpoint", "step": 4, "path": "ckpt-4.npz"}
    )  # the job's own last checkpoint
    assert log_of(report) == [
        "checkpoint at step 3: ckpt-3.npz",
        "checkpoint at step 4: ckpt-4.npz",
    ]


class _LiveClient:
    """A client whose scheduler answers (as Client.sync runs a coroutine)."""

    def sync(self, f, *args, **kwargs):
        import asyncio

        return asyncio.run(f())

    class scheduler:
        @staticmethod
        async def identity():
            return {}


def test_any_exception_while_the_scheduler_is_gone_is_the_lost_scheduler():
    """A job's coordinator can fail in many ways when its scheduler dies (CI: distributed.wait's
    "ValueError: No clients found"); the reason recorded is the lost connection whenever the
    scheduler no longer answers, and the exception's own text when it does."""
    from pipeline.jobs.runner import _failure_reason

    class GoneClient:
        def sync(self, *args, **kwargs):
            raise RuntimeError("Client is closed")

    exc = ValueError("No clients found\nStart a client")
    assert _failure_reason(exc, GoneClient()) == (
        "lost the connection to the Dask scheduler (ValueError: No clients found)"
    )
    assert _failure_reason(exc, _LiveClient()) == "ValueError: No clients found"
    assert _failure_reason(KeyError("W9"), None) == "KeyError: 'W9'"


def test_futures_cancelled_by_a_lost_scheduler_connection_are_the_lost_scheduler():
    """When the scheduler restarts, the client cancels its futures with the reason
    "scheduler-connection-lost", which FuturesCancelledError prints below its first line; the
    new scheduler may already answer by then (CI, compose: a restarted scheduler)."""
    from distributed.client import (
        CancelledFuturesGroup,
        FutureCancelledError,
        FuturesCancelledError,
    )

    from pipeline.jobs.runner import _failure_reason

    lost = FuturesCancelledError(
        [
            CancelledFuturesGroup(
                [
                    FutureCancelledError(
                        "task-1", "scheduler-connection-lost", "Client lost the connection"
                    )
                ],
                "scheduler-connection-lost",
            )
        ]
    )
    assert _failure_reason(lost, _LiveClient()) == (
        "lost the connection to the Dask scheduler (FuturesCancelledError: 1 Future cancelled:)"
    )
    other = FuturesCancelledError(
        [CancelledFuturesGroup([FutureCancelledError("task-1", "unknown")], "unknown")]
    )
    assert _failure_reason(other, _LiveClient()) == "FuturesCancelledError: 1 Future cancelled:"


def test_a_done_jobs_log_line_rounds_its_result_as_status_does():
    from pipeline.jobs.runner import _result_text

    result = {"train_acc": 0.503, "seconds": 22.9153, "images_per_s": 2433.0422, "steps": 192}
    assert _result_text(result) == "train_acc 0.5030, seconds 22.9, images_per_s 2,433, steps 192"
    # accuracies to 4 decimals and seconds to 1, as the progress lines; a TTA test score says so
    result = {"val_acc": 0.3, "test_acc": 0.11, "tta": "flip-translate", "seconds": 7.504}
    assert _result_text(result) == (
        "val_acc 0.3000, test_acc 0.1100 (tta flip-translate), seconds 7.5"
    )
    assert _result_text({"test_acc": 0.11, "tta": "none"}) == "test_acc 0.1100"


def test_a_jobs_log_and_status_say_the_workers_of_a_step_and_who_joined_or_left():
    from pipeline.jobs.runner import ALWAYS_LOGGED, format_progress

    line = format_progress(
        {"event": "step", "step": 3, "total_steps": 10, "loss": 1.5, "workers": 2}
    )
    assert line == "step 3/10 loss 1.5000 2 workers"
    one = {"event": "step", "step": 3, "total_steps": 10, "loss": 1.5, "workers": 1}
    assert format_progress(one) == "step 3/10 loss 1.5000 1 worker"
    start = {"event": "start", "start_step": 0, "total_steps": 4, "epochs": 1, "workers": 1}
    start.update(batch_size=64, transport="shm", run_dir="/r")
    assert format_progress(start) == (
        "start: step 0/4, 1 epoch, 1 worker, batch 64, transport shm, run directory /r"
    )
    change = {"event": "workers", "step": 4, "message": "worker tcp://w:1 joined: it takes ..."}
    assert format_progress(change) == change["message"] and "workers" in ALWAYS_LOGGED


def test_an_eval_line_gives_its_fractional_epoch_in_two_decimals():
    from pipeline.jobs.runner import format_progress

    line = format_progress(
        {"event": "eval", "epoch": 0.7916666666666666, "step": 38, "total_steps": 192}
    )
    assert line.startswith("eval epoch 0.79 step 38/192"), line
    assert format_progress({"event": "eval", "epoch": 2.0, "step": 96}).startswith("eval epoch 2 ")
