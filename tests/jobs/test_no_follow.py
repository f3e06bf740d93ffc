"""A job's files and a sweep's state are read as regular files, never through a link:
``convpipe status/logs/resume --root`` and ``SweepState.load`` refuse a link with one line
(pipeline.safe_files, the page's opener too)."""

from __future__ import annotations

import json
import os
import threading

import pytest

from pipeline.jobs.files_view import list_from_files, status_from_files
from pipeline.jobs.records import JobFileError, JobFiles
from pipeline.jobs.sweep import SweepError, SweepState, leaderboard_text
from pipeline.jobs.sweep.state import STATE_FILE
from pipeline.safe_files import Refused, open_regular, read_regular
from tests.jobs.test_files import finished_job, run_cli
from tests.web.test_sweep_page import fake_sweep

SECRET = "a-private-line-nobody-should-see"
LINK = "cannot read it (a symbolic link, not followed)"


@pytest.fixture
def elsewhere(tmp_path):
    """A folder outside the data root with files that would read fine if a link were followed."""
    d = tmp_path / "elsewhere"
    d.mkdir()
    (d / "status.json").write_text(
        json.dumps({"job": "b-linked", "state": "done", "attempt": 1, "name": SECRET})
    )
    (d / "job.log").write_text(f"2020-01-01T00:00:00Z {SECRET}\n")
    return d


def _swap_for_link(path, target) -> None:
    path.unlink()
    path.symlink_to(target)


@pytest.mark.parametrize("name", ["status.json", "job.log"])
def test_a_linked_status_or_log_is_refused_in_one_line(tmp_path, capsys, elsewhere, name):
    root = tmp_path / "data"
    finished_job(root, "a-good-one", "done")
    bad = finished_job(root, "b-linked")
    _swap_for_link(bad.dir / name, elsewhere / name)
    problem = f"convpipe: error: {bad.dir / name}: {LINK}\n"
    for argv in (
        ["status", "b-linked"],
        ["logs", "b-linked"],
        ["resume", "b-linked", "--scheduler", "tcp://127.0.0.1:9"],
    ):
        code, out, err = run_cli(capsys, *argv, "--root", str(root))
        assert (code, out, err) == (2, "", problem), argv
    code, out, err = run_cli(capsys, "status", "--root", str(root))
    assert code == 2 and "a-good-one" in out and SECRET not in out
    assert err == problem
    assert list_from_files(str(root)).unreadable == [problem.removeprefix("convpipe: error: ")[:-1]]


def test_a_linked_record_is_refused_for_resume(tmp_path, capsys):
    root = tmp_path / "data"
    bad = finished_job(root, "b")
    good = finished_job(tmp_path / "other", "b")
    _swap_for_link(bad.record_path, good.record_path)
    code, out, err = run_cli(
        capsys, "resume", "b", "--root", str(root), "--scheduler", "tcp://127.0.0.1:9"
    )
    assert (code, out, err) == (2, "", f"convpipe: error: {bad.record_path}: {LINK}\n")


def test_a_fifo_as_a_jobs_status_does_not_block_and_is_refused(tmp_path):
    root = tmp_path / "data"
    files = finished_job(root, "f")
    files.status_path.unlink()
    os.mkfifo(files.status_path)
    out = []

    def read():
        try:
            status_from_files(str(root), "f")
        except JobFileError as exc:
            out.append(str(exc))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=20)
    assert out == [f"{files.status_path}: cannot read it (not a regular file)"], "a FIFO blocked"


def test_a_job_directory_swapped_for_a_link_is_not_walked_through(tmp_path, elsewhere):
    """JobFiles.existing checks the directory, then reads below ROOT/jobs without following a
    link: a directory swapped for a link after the check is refused too."""
    root = tmp_path / "data"
    files = finished_job(root, "j")
    checked = JobFiles.existing(root, "j")
    files.dir.rename(tmp_path / "moved")
    files.dir.symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(JobFileError, match="a symbolic link, not followed"):
        checked.read_status()
    assert JobFiles(files.dir).read_status()["name"] == SECRET  # the worker's own, as before


def test_a_linked_sweep_state_is_refused(tmp_path):
    real = fake_sweep(tmp_path / "real")
    run_dir = tmp_path / "linked"
    run_dir.mkdir()
    (run_dir / STATE_FILE).symlink_to(real / STATE_FILE)
    shown = f"{run_dir / STATE_FILE}: unreadable sweep state (a symbolic link, not followed)"
    with pytest.raises(SweepError) as err:
        SweepState.load(run_dir)
    assert str(err.value) == shown
    with pytest.raises(SweepError, match="a symbolic link"):
        leaderboard_text(run_dir)
    assert SweepState.load(real).rungs == [2, 6]


def test_a_sweep_state_of_the_wrong_shape_is_one_line(tmp_path):
    (tmp_path / STATE_FILE).write_text(json.dumps({"format": "convpipe-sweep-1", "plan": {}}))
    with pytest.raises(SweepError, match=r"not a convpipe sweep state \(KeyError: 'rungs'\)"):
        SweepState.load(tmp_path)


def test_the_opener_follows_links_above_the_folder_only(tmp_path):
    area = tmp_path / "area"
    (area / "sub").mkdir(parents=True)
    (area / "sub" / "f").write_text("inside")
    (tmp_path / "area-link").symlink_to(area, target_is_directory=True)
    (area / "sub-link").symlink_to(area / "sub", target_is_directory=True)
    (area / "f-link").symlink_to(area / "sub" / "f")
    assert read_regular(tmp_path / "area-link", ("sub", "f")) == b"inside"  # the operator's link
    assert read_regular(area, ("sub", "f"), offset=2) == b"side"
    for parts in (("f-link",), ("sub-link", "f")):
        with pytest.raises(Refused, match="a symbolic link, not followed"):
            read_regular(area, parts)
    with pytest.raises(Refused, match="not a regular file"):
        read_regular(area, ("sub",))
    with pytest.raises(FileNotFoundError):
        read_regular(area, ("sub", "missing"))
    with open_regular(area, ("sub", "f")) as (f, st):
        assert st.st_size == 6 and f.read() == b"inside"
