"""Jobs read from their files on the data root, without a scheduler (pipeline.jobs.files_view)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from pipeline.jobs.files_view import list_from_files, status_from_files
from pipeline.jobs.records import JobError, JobFiles
from pipeline.procs import pid_namespace


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def write_running(root, job_id: str, **who) -> JobFiles:
    files = JobFiles.of(root, job_id)
    files.dir.mkdir(parents=True)
    files.write_status({"job": job_id, "kind": "count", "state": "running", "attempt": 1, **who})
    return files


HERE = {"host": socket.gethostname(), "pid_namespace": pid_namespace()}


def test_a_running_job_whose_local_coordinator_is_gone_is_failed(tmp_path):
    pid = dead_pid()
    write_running(tmp_path, "j1", pid=pid, **HERE)
    status = status_from_files(str(tmp_path), "j1")
    assert status["state"] == "failed" and status["resumable"]
    assert status["reason"] == f"the worker running its coordinator (pid {pid} on {HERE['host']}) died"


@pytest.mark.parametrize("who", [
    {**HERE, "pid_namespace": pid_namespace() + 1},   # same host, another container's pids
    {**HERE, "host": "elsewhere"},                    # another host
    {"host": socket.gethostname()},                   # a record without its namespace
    {**HERE, "pid": "self"},                          # the process runs
])
def test_a_coordinator_that_cannot_be_judged_or_runs_stays_running(tmp_path, who):
    import os

    pid = os.getpid() if who.get("pid") == "self" else dead_pid()
    write_running(tmp_path, "j1", **{**who, "pid": pid})
    assert status_from_files(str(tmp_path), "j1")["state"] == "running"


def test_unknown_job_and_listing(tmp_path):
    with pytest.raises(JobError, match="no job nope under"):
        status_from_files(str(tmp_path), "nope")
    assert list_from_files(str(tmp_path)) == []
    files = write_running(tmp_path, "j2", pid=dead_pid(), **HERE)
    files.append_log("2020-01-01T00:00:00Z step 3")
    (listed,) = list_from_files(str(tmp_path))
    assert listed["job"] == "j2" and listed["last_line"] == "2020-01-01T00:00:00Z step 3"
