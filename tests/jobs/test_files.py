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
    assert (
        status["reason"] == f"the worker running its coordinator (pid {pid} on {HERE['host']}) died"
    )


@pytest.mark.parametrize(
    "who",
    [
        {**HERE, "pid_namespace": pid_namespace() + 1},  # same host, another container's pids
        {**HERE, "host": "elsewhere"},  # another host
        {"host": socket.gethostname()},  # a record without its namespace
        {**HERE, "pid": "self"},  # the process runs
    ],
)
def test_a_coordinator_that_cannot_be_judged_or_runs_stays_running(tmp_path, who):
    import os

    pid = os.getpid() if who.get("pid") == "self" else dead_pid()
    write_running(tmp_path, "j1", **{**who, "pid": pid})
    assert status_from_files(str(tmp_path), "j1")["state"] == "running"


def test_unknown_job_and_listing(tmp_path):
    with pytest.raises(JobError, match="no job nope under"):
        status_from_files(str(tmp_path), "nope")
    assert list_from_files(str(tmp_path)).jobs == []
    files = write_running(tmp_path, "j2", pid=dead_pid(), **HERE)
    files.append_log("2020-01-01T00:00:00Z step 3")
    (tmp_path / "jobs" / "not-a-job").mkdir()  # no status.json: skipped
    (listed,) = list_from_files(str(tmp_path)).jobs
    assert listed["job"] == "j2" and listed["last_line"] == "2020-01-01T00:00:00Z step 3"


# ---------------------------------------------------------------- malformed files


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    from pipeline.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def finished_job(root, job_id: str, state: str = "failed") -> JobFiles:
    files = JobFiles.of(root, job_id)
    files.dir.mkdir(parents=True)
    files.write_status(
        {
            "job": job_id,
            "kind": "count",
            "name": job_id,
            "state": state,
            "attempt": 1,
            "reason": "loss is NaN",
            "resumable": True,
        }
    )
    files.write_record(
        {
            "job": job_id,
            "attempt": 1,
            "kind": "count",
            "name": job_id,
            "root": str(root),
            "job_dir": str(files.dir),
            "run_dir": None,
            "options": {},
        },
        'job = "count"\n',
    )
    files.append_log("2020-01-01T00:00:00Z failed: loss is NaN")
    return files


@pytest.mark.parametrize(
    "content, problem",
    [
        ('{"state": "done",', "not valid JSON (Expecting"),
        ("[1, 2]", "expected a JSON object, got list"),
        (
            '{"state": "finished"}',
            "'state' must be one of queued, running, done, failed, cancelled, got 'finished'",
        ),
        (b"\xff\xfe{}", "not UTF-8 text"),
    ],
)
def test_a_malformed_status_is_one_line_and_hides_no_other_job(tmp_path, capsys, content, problem):
    finished_job(tmp_path, "a-good-one", "done")
    bad = finished_job(tmp_path, "b-bad-one")
    if isinstance(content, bytes):
        bad.status_path.write_bytes(content)
    else:
        bad.status_path.write_text(content)
    root = str(tmp_path)
    for argv in (
        ["status", "b-bad-one"],
        ["logs", "b-bad-one"],
        ["resume", "b-bad-one", "--scheduler", "tcp://127.0.0.1:9"],
    ):
        code, out, err = run_cli(capsys, *argv, "--root", root)
        assert code == 2 and out == "", (argv, out)
        assert err.count("\n") == 1 and err.startswith(
            f"convpipe: error: {bad.status_path}: {problem}"
        ), (argv, err)
    code, out, err = run_cli(capsys, "status", "--root", root)
    assert code == 2
    assert "a-good-one" in out and "b-bad-one" not in out
    assert err.count("\n") == 1 and err.startswith(f"convpipe: error: {bad.status_path}: {problem}")


@pytest.mark.parametrize(
    "content, problem",
    [
        ("not json", "not valid JSON"),
        ('{"job": "b"}', "missing 'attempt', 'kind', 'name', 'root', 'job_dir', 'options'"),
        (
            '{"job": "b", "attempt": "1", "kind": "count", "name": "b", "root": "/", '
            '"job_dir": "/", "options": {}}',
            "'attempt' must be an integer and 'options' an object, got '1' and dict",
        ),
    ],
)
def test_a_malformed_record_is_one_line_for_resume(tmp_path, capsys, content, problem):
    bad = finished_job(tmp_path, "b")
    bad.record_path.write_text(content)
    code, out, err = run_cli(
        capsys, "resume", "b", "--root", str(tmp_path), "--scheduler", "tcp://127.0.0.1:9"
    )
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(
        f"convpipe: error: {bad.record_path}: {problem}"
    ), err


def test_status_shows_a_result_rounded_as_people_read_it(tmp_path, capsys):
    files = finished_job(tmp_path, "a-train-job", "done")
    status = files.read_status()
    status["result"] = {"train_acc": 0.51234567, "images_per_s": 1496.4468, "steps": 20}
    files.write_status(status)
    code, out, err = run_cli(capsys, "status", "a-train-job", "--root", str(tmp_path))
    assert code == 0, err
    assert "result:    images_per_s 1,496, steps 20, train_acc 0.5123\n" in out
    code, out, err = run_cli(capsys, "status", "--root", str(tmp_path))  # the listing's detail
    assert code == 0 and out.rstrip().endswith("images_per_s 1,496, steps 20, train_acc 0.5123")


def test_the_listing_is_newest_first_and_says_where_a_cancelled_job_stopped(tmp_path, capsys):
    jobs = {  # id: when submitted; ids of another kind sort the other way
        "train-20250101-100000-aa": "2025-01-01T10:00:00Z",
        "sweep-20250101-120000-bb": "2025-01-01T12:00:00Z",
        "train-20250101-110000-cc": "2025-01-01T11:00:00Z",
    }
    for job_id, submitted in jobs.items():
        files = finished_job(tmp_path, job_id, "done")
        files.write_status({**files.read_status(), "submitted": submitted})
    files = JobFiles.of(tmp_path, "train-20250101-110000-cc")
    files.write_status(
        {
            **files.read_status(),
            "state": "cancelled",
            "reason": "cancelled by me@here at 2025-01-01T11:05:00Z",
            "progress": {"event": "checkpoint", "step": 40, "total_steps": 100},
        }
    )
    code, out, err = run_cli(capsys, "status", "--root", str(tmp_path))
    assert code == 0, err
    rows = out.splitlines()[1:]
    assert [r.split()[0] for r in rows] == [
        "sweep-20250101-120000-bb",
        "train-20250101-110000-cc",
        "train-20250101-100000-aa",
    ], out
    assert rows[1].endswith("cancelled  cancelled by me@here at 2025-01-01T11:05:00Z (step 40/100)")


def into_a_closed_pipe(*argv) -> subprocess.CompletedProcess:
    """``convpipe ARGV | head -1`` where head is gone before anything is written."""
    import os

    from tests.helpers.cluster import convpipe_exe

    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(
            [*convpipe_exe(), *argv], stdout=write, stderr=subprocess.PIPE, text=True, timeout=120
        )
    finally:
        os.close(write)


def test_a_reader_that_goes_away_ends_status_quietly(tmp_path):
    """`convpipe status | head -1` with the reader gone: no "Broken pipe" error, no Python
    complaint at exit; silent, as `git log | head` is (status 128 + SIGPIPE)."""
    import signal

    for i in range(200):  # rows beyond a pipe's buffer: the prints themselves fail
        finished_job(tmp_path, f"count-{i:04d}", "done")
    listing = into_a_closed_pipe("status", "--root", str(tmp_path))
    assert (listing.returncode, listing.stderr) == (128 + signal.SIGPIPE, "")
    # a few lines, still in Python's buffer when the command returns
    one = into_a_closed_pipe("status", "count-0001", "--root", str(tmp_path))
    assert (one.returncode, one.stderr) == (128 + signal.SIGPIPE, "")
