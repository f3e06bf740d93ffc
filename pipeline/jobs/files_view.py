"""Jobs as their files on the data root tell them, without a scheduler.

``convpipe status --root DIR`` and ``logs --root DIR`` read ``DIR/jobs/<id>/`` directly (after
the scheduler restarted and forgot its events, or from a machine that reaches the data root
but not the scheduler). A job recorded as running whose coordinator process is gone is
reported ``failed``; that is judged only when the process ran on this host and in this pid
namespace (:class:`pipeline.procs.Owner`): elsewhere an equal pid is another process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pipeline.jobs.records import JobError, JobFileError, JobFiles, newest_first
from pipeline.procs import Owner


def status_from_files(root: str, job_id: str) -> dict:
    """The job's ``status.json``, a dead local coordinator turned ``failed``,
    with its last log line.

    :class:`JobError` if ``job_id`` is not a plain id, or there is no such job (no directory
    ``root/jobs/<job_id>``, or no status in it); :class:`JobFileError` (one line naming the file
    and the problem) if its status file is malformed, or its status or log is a link or no
    regular file (never followed: :class:`~pipeline.jobs.records.JobFiles` reads them).
    """
    files = JobFiles.existing(root, job_id)
    status = files.read_status()
    if status is None:
        raise JobError(f"no job {job_id} under {os.path.abspath(root)}/jobs (no status.json)")
    settle_dead_coordinator(status)
    lines = files.read_log()[0].splitlines()
    if lines:
        status["last_line"] = lines[-1]
    return status


def settle_dead_coordinator(status: dict) -> dict:
    """``status`` (changed in place) as ``failed``, resumable, when it says ``running`` but names
    a coordinator process that is known dead (one on this host: a record naming another host,
    or no process, stays as it is)."""
    owner = Owner.from_record(status)
    if status.get("state") == "running" and owner is not None and not owner.alive():
        status.update(
            state="failed",
            resumable=True,
            reason=f"the worker running its coordinator (pid {owner.pid} on {owner.host}) died",
        )
    return status


@dataclass(frozen=True)
class Listing:
    """Every job under a data root: ``jobs`` (statuses, newest first) and ``unreadable`` (one
    line per job whose files are malformed, naming the file and the problem)."""

    jobs: list[dict]
    unreadable: list[str]


def list_from_files(root: str) -> Listing:
    """Every job under ``root/jobs``, newest first; a malformed one does not hide the others."""
    jobs = os.path.join(root, "jobs")
    if not os.path.isdir(jobs):
        return Listing([], [])
    statuses, unreadable = [], []
    for name in sorted(os.listdir(jobs)):
        try:
            statuses.append(status_from_files(root, name))
        except JobFileError as exc:
            unreadable.append(str(exc))
        except JobError:
            continue  # a folder without a status (not a job, or one whose preflight failed)
    return Listing(newest_first(statuses), unreadable)
