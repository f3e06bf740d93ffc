"""A job has one coordinator at a time: it holds the job's owner.json while it runs; a resume of
a running job is refused in one line naming it (its status.json is not rewritten to queued); a
second coordinator of a running attempt leaves it alone; the locks of a coordinator known to
have ended are taken over, even from another host.

The jobs here are of the trivial kind ``count`` (tests/helpers/jobs.py) on the module's
in-process cluster: its coordinators run in this process.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import pytest

from pipeline.jobs import client as job_client
from pipeline.jobs.records import REGISTRY_TOPIC, JobError, JobFiles, job_topic, now_iso
from pipeline.jobs.runner import run_job
from pipeline.jobs.spec import spec_from_table
from pipeline.procs import Holder, Owner
from pipeline.training.rundir import RunDirBusy
from tests.helpers.jobs import wait_for
from tests.helpers.owners import held_by_another_process

pytestmark = pytest.mark.usefixtures("count_kind")

HOST = socket.gethostname()
SINCE = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
#: a coordinator on another host (a worker container that was killed): it cannot be checked
ELSEWHERE = {"host": "worker-7", "pid_namespace": 4026531836, "pid": 42}


def count_spec(root: Path, **options):
    return spec_from_table({"job": "count", "root": str(root), **options}, default_name="count")


def left_by(files: JobFiles, job_id: str, attempt: int, coordinator: dict) -> None:
    """The job's files as a coordinator that died on another host left them: running, locked."""
    files.write_status(
        {
            **files.read_status(),
            "state": "running",
            "attempt": attempt,
            "worker": "tcp://10.9.9.9:1",
            **coordinator,
        }
    )
    holder = Holder(
        Owner.from_record(coordinator), 9, "2026-12-04T18:00:00Z", f"job {job_id} attempt {attempt}"
    )
    files.owner_path.write_bytes(holder.to_json("theirs"))


def test_resuming_a_running_job_is_refused_naming_its_coordinator(client, tmp_path):
    rec = job_client.submit(client, count_spec(tmp_path, steps=100_000, step_s=0.01))
    job = rec["job"]
    wait_for(client, job, states=("running",))
    files = JobFiles(rec["job_dir"])
    try:
        # what `convpipe resume JOB --root` does with the job's files, racing with it
        with pytest.raises(JobError) as refused:
            job_client.resume(client, job, files.read_record())
        assert re.fullmatch(
            rf"job {job} is running: its coordinator is pid {os.getpid()} on host {HOST} since "
            rf"{SINCE} \(job {job} attempt 1\); wait for it or cancel it: convpipe cancel {job}",
            str(refused.value),
        ), str(refused.value)
        status = files.read_status()
        assert (status["state"], status["attempt"]) == ("running", 1)  # not rewritten to queued
        assert "resumed by" not in files.read_log()[0]
    finally:
        job_client.cancel(client, job)
        assert wait_for(client, job)["state"] == "cancelled"
    assert not files.owner_path.exists()  # the coordinator let go as it ended


def test_a_second_coordinator_of_a_running_attempt_leaves_it_alone(client, tmp_path):
    """Dask running the coordinator's task a second time while the first still runs (or two
    resumes of one job at once): the second does not restart the job beside the first."""
    rec = job_client.submit(client, count_spec(tmp_path, steps=100_000, step_s=0.01))
    wait_for(client, rec["job"], states=("running",))
    files = JobFiles(rec["job_dir"])
    try:
        second = client.submit(run_job, rec, pure=False).result(timeout=60)
        assert second["state"] == "running" and "restarts" not in second
        log = files.read_log()[0]
        assert (
            "a second coordinator of attempt 1 on worker " in log
            and f"did not start: the job is run by pid {os.getpid()} on host {HOST} since " in log
        ), log
        assert "restarting" not in log
    finally:
        job_client.cancel(client, rec["job"])
        status = wait_for(client, rec["job"])
    assert status["state"] == "cancelled" and "restarts" not in status
    counts = (Path(rec["run_dir"]) / "counts.txt").read_text().splitlines()
    assert [int(line.split()[1]) for line in counts] == list(range(1, len(counts) + 1))


def test_dask_rerunning_a_coordinator_whose_host_died_takes_over_its_locks(client, tmp_path):
    rec = job_client.submit(client, count_spec(tmp_path, steps=2))
    wait_for(client, rec["job"])
    files = JobFiles(rec["job_dir"])
    left_by(files, rec["job"], 1, ELSEWHERE)
    status = client.submit(run_job, rec, pure=False).result(timeout=60)
    assert status["state"] == "done" and status["restarts"] == 1, status
    assert not files.owner_path.exists()


def test_resuming_a_job_whose_worker_the_scheduler_saw_leave_takes_over_its_locks(client, tmp_path):
    """The job's status.json still says running (its coordinator died with its host); the
    scheduler knows the worker left: a resume through the scheduler takes over the locks the
    coordinator left, a resume from the files alone cannot tell and refuses."""
    rec = job_client.submit(client, count_spec(tmp_path, steps=2))
    job = rec["job"]
    wait_for(client, job)
    files = JobFiles(rec["job_dir"])
    # attempt 2 ran on a worker of another host, which then died without a word
    second = {**rec, "attempt": 2, "key": f"convpipe-job-{job}-2"}
    client.log_event(REGISTRY_TOPIC, {"type": "submitted", **second})
    client.log_event(
        job_topic(job),
        {
            "id": "fake-running-2",
            "type": "state",
            "job": job,
            "attempt": 2,
            "state": "running",
            "worker": "tcp://10.9.9.9:1",
            **ELSEWHERE,
            "updated": now_iso(),
        },
    )
    left_by(files, job, 2, ELSEWHERE)
    status = job_client.job_status(client, job)
    assert status["state"] == "failed" and status["coordinator_left"]

    with pytest.raises(JobError, match=f"^job {job} is running: its coordinator is pid 42 on "):
        job_client.resume(client, job, files.read_record())  # from the files: cannot tell

    again = job_client.resume(client, job)
    assert again["attempt"] == 3 and again["gone"] == ELSEWHERE
    done = wait_for(client, job)
    assert (done["state"], done["attempt"]) == ("done", 3), done
    assert not files.owner_path.exists()


def test_a_job_for_a_run_directory_another_process_trains_is_refused_at_submit(client, tmp_path):
    out = tmp_path / "run"
    with held_by_another_process(out) as holder:
        with pytest.raises(RunDirBusy, match=f"^{out} is being trained by pid {holder.pid} "):
            job_client.submit(client, count_spec(tmp_path, out=str(out)))
    assert not (tmp_path / "jobs").exists() or not any((tmp_path / "jobs").iterdir())
