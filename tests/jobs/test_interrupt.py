"""A job stops cleanly when its worker process gets SIGTERM or its worker closes
(pipeline.jobs.interrupt); real worker processes: tests/test_compose_topology.py."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from distributed import Client, LocalCluster

from pipeline.jobs import client as job_client
from pipeline.jobs.interrupt import Interrupted, Signals, Stop
from pipeline.jobs.kinds import KINDS
from pipeline.jobs.records import JobFiles
from pipeline.jobs.spec import spec_from_table
from tests.jobs_helpers import Count

KINDS[Count.name] = Count


def until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.fixture
def sigterm_recorder():
    """SIGTERM handled by a recorder (as Dask's handler would be) instead of ending pytest."""
    received: list[int] = []
    original = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    yield received
    signal.signal(signal.SIGTERM, original)


def test_sigterm_stops_the_running_job_first_then_goes_on(sigterm_recorder):
    signals = Signals()
    assert signals.install()  # pytest runs tests in the main thread
    stop = Stop()
    signals.add(stop)
    os.kill(os.getpid(), signal.SIGTERM)
    until(lambda: stop.reason is not None)
    with pytest.raises(Interrupted, match="^the worker process got SIGTERM$"):
        stop.check()  # what the job's progress callback does between steps
    stop.check()  # once: the job's cleanup (a last checkpoint) reports its progress
    assert sigterm_recorder == []  # held back while the job records its end
    later = Stop()
    signals.add(later)  # a job starting while the process ends stops at once
    with pytest.raises(Interrupted):
        later.check()
    signals.remove(stop)
    signals.remove(later)  # the last job stopped: the signal goes where it went before
    until(lambda: sigterm_recorder == [signal.SIGTERM])
    os.kill(os.getpid(), signal.SIGTERM)  # no job running: straight through
    until(lambda: sigterm_recorder == [signal.SIGTERM] * 2)


def test_a_second_sigterm_does_not_wait_for_the_job(sigterm_recorder):
    signals = Signals()
    signals.install()
    signals.add(Stop())
    os.kill(os.getpid(), signal.SIGTERM)
    until(lambda: signals.pending == signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)
    until(lambda: sigterm_recorder == [signal.SIGTERM])


def test_no_handler_outside_the_main_thread():
    import threading

    result = []
    t = threading.Thread(target=lambda: result.append(Signals().install()))
    t.start()
    t.join()
    assert result == [False]


def test_a_closing_worker_stops_its_job_which_records_how_to_resume(tmp_path):
    """docker stop of a worker with a nanny: the nanny closes its worker; the job stops between
    steps, records failed (interrupted) and resumes from where it stopped."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address="127.0.0.1:0",
                      silence_logs=40) as cluster, Client(cluster) as client:
        spec = spec_from_table({"job": "count", "root": str(tmp_path), "steps": 150, "step_s": 0.02})
        rec = job_client.submit(client, spec)
        counts = Path(rec["run_dir"]) / "counts.txt"
        until(lambda: counts.exists() and counts.read_text().count("\n") >= 2, timeout=30)
        running = JobFiles(rec["job_dir"]).read_status()
        worker = next(w for w in cluster.workers.values() if w.address == running["worker"])
        asyncio.run_coroutine_threadsafe(worker.close(reason="test: docker stop"), worker.loop.asyncio_loop).result(30)

        status = JobFiles(rec["job_dir"]).read_status()
        assert status["state"] == "failed" and status["resumable"] and status["interrupted"], status
        assert status["reason"] == f"interrupted: its worker {running['worker']} is closing"
        assert f"resume with: convpipe resume {rec['job']}" in JobFiles(rec["job_dir"]).read_log()[0]
        done = len(counts.read_text().splitlines())
        assert 2 <= done < 150
        until(lambda: job_client.job_status(client, rec["job"])["state"] == "failed")
        assert job_client.job_status(client, rec["job"])["reason"] == status["reason"]

        job_client.resume(client, rec["job"])
        until(lambda: job_client.job_status(client, rec["job"])["state"] == "done", timeout=60)
        assert counts.read_text().splitlines() == [f"x {i} {i * i}" for i in range(1, 151)]
