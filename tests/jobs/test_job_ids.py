"""Job ids: their form, a job directory that is never another job's, and a job id on the command
line that must name a job in ROOT/jobs (never a path out of it)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.jobs import client as job_client
from pipeline.jobs import records
from pipeline.jobs.records import JobError, JobFiles, check_job_id, new_job_id
from pipeline.jobs.runner import preflight_job
from pipeline.jobs.spec import spec_from_table
from tests.helpers.jobs import wait_for

ID = re.compile(r"(?P<kind>[a-z]+)-(?P<date>\d{8})-(?P<time>\d{6})-(?P<random>[0-9a-f]{16})")


def count_spec(root: Path, **options):
    return spec_from_table({"job": "count", "root": str(root), **options}, default_name="count")


@pytest.fixture
def repeating_ids(monkeypatch):
    """Job ids drawn within one second whose random part repeats once: the first two ids drawn
    are the same, the third is another."""
    draws = iter(["0123456789abcdef", "0123456789abcdef", "fedcba9876543210"])
    monkeypatch.setattr(records, "_utc_stamp", lambda: "20250101-120000")
    monkeypatch.setattr(records, "_random_hex", lambda: next(draws))
    return "count-20250101-120000-0123456789abcdef", "count-20250101-120000-fedcba9876543210"


def test_a_job_id_is_kind_utc_time_and_64_random_bits():
    ids = {new_job_id("train") for _ in range(1000)}
    assert len(ids) == 1000
    for job_id in ids:
        m = ID.fullmatch(job_id)
        assert m and m["kind"] == "train", job_id
        assert check_job_id(job_id) == job_id


def test_a_taken_drawn_id_is_drawn_again_and_the_other_jobs_directory_is_left_alone(
    tmp_path, count_kind, repeating_ids
):
    taken, fresh = repeating_ids
    spec = count_spec(tmp_path).to_dict()
    first = preflight_job(spec, new_job_id("count"), 1, "me", True)["record"]
    assert first["job"] == taken
    before = {p.name: p.read_bytes() for p in Path(first["job_dir"]).iterdir()}
    # the random source repeats: the second job draws the first one's id
    second = preflight_job(spec, new_job_id("count"), 1, "me", True)["record"]
    assert second["job"] == fresh and second["key"] == f"convpipe-job-{fresh}-1"
    assert second["job_dir"] == str(tmp_path / "jobs" / fresh) != first["job_dir"]
    assert second["run_dir"] == str(tmp_path / "runs" / fresh)
    assert {p.name: p.read_bytes() for p in Path(first["job_dir"]).iterdir()} == before
    assert JobFiles(second["job_dir"]).read_status()["job"] == fresh


def test_an_id_chosen_by_the_caller_never_enters_an_existing_directory(tmp_path, count_kind):
    (tmp_path / "jobs" / "mine").mkdir(parents=True)
    (tmp_path / "jobs" / "mine" / "status.json").write_text('{"state": "done"}\n')
    outcome = preflight_job(count_spec(tmp_path).to_dict(), "mine", 1, "me")
    assert isinstance(outcome["error"], JobError)
    assert str(outcome["error"]) == (
        f"job id mine: expected a new job, but {tmp_path / 'jobs' / 'mine'} exists (another "
        "job's directory); choose another id"
    )
    assert sorted(p.name for p in (tmp_path / "jobs" / "mine").iterdir()) == ["status.json"]


def test_a_refused_spec_leaves_no_job_directory(tmp_path, count_kind, monkeypatch):
    from pipeline.errors import DataError

    def refuse(options, root, job_id):
        raise DataError("no store here")

    monkeypatch.setattr(count_kind, "preflight", staticmethod(refuse))
    outcome = preflight_job(count_spec(tmp_path).to_dict(), new_job_id("count"), 1, "me", True)
    assert str(outcome["error"]) == "no store here"
    assert list((tmp_path / "jobs").iterdir()) == []


def test_a_submitted_job_whose_drawn_id_is_taken_runs_under_a_fresh_one(
    client, tmp_path, count_kind, repeating_ids
):
    taken, fresh = repeating_ids
    a = job_client.submit(client, count_spec(tmp_path, steps=1, label="a"))
    b = job_client.submit(client, count_spec(tmp_path, steps=1, label="b"))
    assert (a["job"], b["job"]) == (taken, fresh)
    for rec, label in ((a, "a"), (b, "b")):
        status = wait_for(client, rec["job"])
        assert status["state"] == "done" and status["job_dir"] == rec["job_dir"], status
        assert (Path(rec["run_dir"]) / "counts.txt").read_text() == f"{label} 1 1\n"
        assert json.loads((Path(rec["job_dir"]) / "spec.json").read_text())["job"] == rec["job"]
        log = (Path(rec["job_dir"]) / "job.log").read_text()
        assert log.count("submitted by") == 1 and log.count("done: ") == 1, log


# ---------------------------------------------------------------- job ids on the command line


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    from pipeline.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def a_job_outside(tmp_path) -> Path:
    """A job's files beside the data root ``tmp_path/root``, in ``tmp_path/outside``."""
    outside = JobFiles(tmp_path / "outside")
    outside.dir.mkdir()
    outside.write_status({"job": "x", "kind": "count", "state": "failed", "attempt": 1})
    outside.append_log("2020-01-01T00:00:00Z failed: secret")
    outside.write_record(
        {
            "job": "x",
            "attempt": 1,
            "kind": "count",
            "name": "x",
            "root": str(tmp_path),
            "job_dir": str(outside.dir),
            "options": {},
        },
        'job = "count"\n',
    )
    (tmp_path / "root" / "jobs").mkdir(parents=True)
    return tmp_path / "root"


COMMANDS = (
    ["status"],
    ["status", "--json"],
    ["logs"],
    ["logs", "--follow"],
    ["resume", "--scheduler", "tcp://127.0.0.1:9", "--timeout", "1"],
)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:2]))
@pytest.mark.parametrize("job_id", ["../../outside", "..", "../jobs", "a/b", "/etc", ".hidden"])
def test_a_job_id_that_is_not_plain_is_refused_in_one_line(tmp_path, capsys, command, job_id):
    root = a_job_outside(tmp_path)
    code, out, err = run_cli(capsys, command[0], job_id, *command[1:], "--root", str(root))
    assert (code, out) == (2, "")
    assert err == (
        f"convpipe: error: job id {job_id!r} is not a plain id: expected one name of letters, "
        "digits, '_', '.' and '-' (no path, not starting with '.' or '-'), e.g. "
        "train-20250101-120000-0123456789abcdef\n"
    )


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_a_job_id_must_name_a_directory_in_root_jobs(tmp_path, capsys, command):
    root = a_job_outside(tmp_path)
    jobs = root / "jobs"
    (jobs / "a-file").write_text("{}")
    (jobs / "a-link").symlink_to(tmp_path / "outside", target_is_directory=True)
    for job_id, problem in (
        ("nope", f"no job nope under {jobs} (no such directory)"),
        ("a-file", f"no job a-file under {jobs} (no such directory)"),
        (
            "a-link",
            f"job a-link: expected a directory in {jobs}, got a link to {tmp_path / 'outside'}",
        ),
    ):
        code, out, err = run_cli(capsys, command[0], job_id, *command[1:], "--root", str(root))
        assert (code, out, err) == (2, "", f"convpipe: error: {problem}\n"), job_id


@pytest.mark.parametrize("command", ["status", "logs", "cancel", "resume"])
def test_a_job_id_for_the_scheduler_is_checked_before_connecting(capsys, command):
    code, out, err = run_cli(capsys, command, "../x", "--scheduler", "tcp://127.0.0.1:9")
    assert (code, out) == (2, "") and err.startswith(
        "convpipe: error: job id '../x' is not a plain"
    )


def test_submit_refuses_a_job_id_that_is_not_plain(client, tmp_path, count_kind):
    with pytest.raises(JobError, match=r"job id '\.\./x' is not a plain id"):
        job_client.submit(client, count_spec(tmp_path), job_id="../x")
    assert not (tmp_path / "jobs").exists()
