"""A job stops cleanly when its worker process gets SIGTERM or its worker closes
(pipeline.jobs.interrupt); real worker processes: tests/cluster/test_compose_topology.py."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
from distributed import Client

from pipeline.jobs import client as job_client
from pipeline.jobs.interrupt import Interrupted, Signals, Stop
from pipeline.jobs.records import JobFiles
from pipeline.jobs.spec import spec_from_table
from tests.helpers.cluster import local_cluster
from tests.helpers.wait import wait_until


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
    wait_until(lambda: stop.reason is not None, timeout=10, what="the job told to stop")
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
    wait_until(lambda: sigterm_recorder == [signal.SIGTERM], timeout=10, what="SIGTERM passed on")
    os.kill(os.getpid(), signal.SIGTERM)  # no job running: straight through
    wait_until(
        lambda: sigterm_recorder == [signal.SIGTERM] * 2,
        timeout=10,
        what="SIGTERM straight through",
    )


def test_a_second_sigterm_does_not_wait_for_the_job(sigterm_recorder):
    signals = Signals()
    signals.install()
    signals.add(Stop())
    os.kill(os.getpid(), signal.SIGTERM)
    wait_until(lambda: signals.pending == signal.SIGTERM, timeout=10, what="SIGTERM held back")
    os.kill(os.getpid(), signal.SIGTERM)
    wait_until(
        lambda: sigterm_recorder == [signal.SIGTERM],
        timeout=10,
        what="the second SIGTERM passed on",
    )


def test_no_handler_outside_the_main_thread():
    import threading

    result = []
    t = threading.Thread(target=lambda: result.append(Signals().install()))
    t.start()
    t.join()
    assert result == [False]


def test_a_closing_worker_stops_its_job_which_records_how_to_resume(tmp_path, count_kind):
    """docker stop of a worker with a nanny: the nanny closes its worker; the job stops between
    steps, records failed (interrupted) and resumes from where it stopped."""
    with (
        local_cluster(2) as cluster,  # in-process workers: the `count` kind is theirs too
        Client(cluster) as client,
    ):
        spec = spec_from_table(
            {"job": "count", "root": str(tmp_path), "steps": 150, "step_s": 0.02}
        )
        rec = job_client.submit(client, spec)
        counts = Path(rec["run_dir"]) / "counts.txt"
        wait_until(
            lambda: counts.exists() and counts.read_text().count("\n") >= 2,
            timeout=30,
            what="two steps counted",
        )
        running = JobFiles(rec["job_dir"]).read_status()
        worker = next(w for w in cluster.workers.values() if w.address == running["worker"])
        asyncio.run_coroutine_threadsafe(
            worker.close(reason="test: docker stop"), worker.loop.asyncio_loop
        ).result(30)

        status = JobFiles(rec["job_dir"]).read_status()
        assert status["state"] == "failed" and status["resumable"] and status["interrupted"], status
        assert status["reason"] == f"interrupted: its worker {running['worker']} is closing"
        assert (
            f"resume with: convpipe resume {rec['job']}" in JobFiles(rec["job_dir"]).read_log()[0]
        )
        done = len(counts.read_text().splitlines())
        assert 2 <= done < 150
        wait_until(
            lambda: job_client.job_status(client, rec["job"])["state"] == "failed",
            timeout=10,
            what="the scheduler's status failed",
        )
        assert job_client.job_status(client, rec["job"])["reason"] == status["reason"]

        job_client.resume(client, rec["job"])
        wait_until(
            lambda: job_client.job_status(client, rec["job"])["state"] == "done",
            timeout=60,
            what="the resumed job done",
        )
        assert counts.read_text().splitlines() == [f"x {i} {i * i}" for i in range(1, 151)]
