"""A job's record: its directory on the shared data root, and the same record on the scheduler.

Every job has one directory, ``ROOT/jobs/<job id>/``, written only by the worker that runs
the job (and the worker that checked it before it was queued)::

    spec.toml      the spec as submitted, overrides applied and paths made absolute
    status.json    the latest state record (replaced atomically, never torn)
    job.log        the job's log, one line per event (appended, flushed line by line)
    owner.json     while a coordinator runs the job: its pid, host and since when (one at a time)

The same records also go to the scheduler as Dask events (``Client.log_event``) on the topic
``convpipe-job-<id>``, and every submission to the topic ``convpipe-jobs``: that is what
``convpipe status`` and ``logs`` read from any machine that reaches the scheduler, without
access to the data root. The scheduler keeps them in memory only (the last
``distributed.admin.low-level-log-length`` events per topic, 1000 by default) and forgets
them when it restarts; the files stay, and ``--root DIR`` reads them directly. They are read
as regular files without following a link (:mod:`pipeline.safe_files`): a link in the job's
directory is refused with one line, not followed.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import time
from pathlib import Path

from pipeline.atomic import atomic_write_text
from pipeline.curves import number_text
from pipeline.errors import ConvpipeError
from pipeline.procs import utc_now as now_iso  # a record's times, as lock files give them
from pipeline.safe_files import read_regular

REGISTRY_TOPIC = "convpipe-jobs"
#: states of a job that has not ended, and of one that has
ACTIVE = ("queued", "running")
TERMINAL = ("done", "failed", "cancelled")


#: keys every job record (spec.json) has
RECORD_KEYS = ("job", "attempt", "kind", "name", "root", "job_dir", "options")


class JobError(ConvpipeError):
    """A job is unknown, in the wrong state for the request, or its cluster cannot run it."""


class JobFileError(JobError):
    """A job's file on the data root is there but cannot be read, or is not what convpipe writes."""


def job_topic(job_id: str) -> str:
    return f"convpipe-job-{job_id}"


def task_key(job_id: str, attempt: int) -> str:
    return f"convpipe-job-{job_id}-{attempt}"


#: random bytes in a job id (64 bits: two ids drawn by two clients at once never meet in practice)
JOB_ID_RANDOM_BYTES = 8
#: what a job id is on the command line: one plain path component (no separator, no ``..``);
#: ids convpipe draws are ``<kind>-<UTC date>-<UTC time>-<16 hex digits>``
JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def new_job_id(kind: str) -> str:
    """``<kind>-<YYYYmmdd>-<HHMMSS>-<16 hex digits>`` (UTC): readable, in time order, and with
    :data:`JOB_ID_RANDOM_BYTES` random bytes. The job's directory is created exclusively
    (:func:`pipeline.jobs.runner.preflight_job`): an id that is taken is drawn again."""
    return f"{kind}-{_utc_stamp()}-{_random_hex()}"


def _utc_stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def _random_hex() -> str:
    return secrets.token_hex(JOB_ID_RANDOM_BYTES)


def check_job_id(job_id: str) -> str:
    """``job_id`` if it is a plain id (one path component: letters, digits, ``_ . -``, not
    starting with a dot or dash); else a one-line :class:`JobError`."""
    if not JOB_ID_PATTERN.fullmatch(job_id):
        raise JobError(
            f"job id {job_id!r} is not a plain id: expected one name of letters, digits, '_', "
            "'.' and '-' (no path, not starting with '.' or '-'), e.g. "
            "train-20250101-120000-0123456789abcdef"
        )
    return job_id


def host_name() -> str:
    return socket.gethostname()


def topic_events(client, topic: str) -> list[dict]:
    """The records on a topic of the scheduler's event log, oldest first."""
    return [msg for _, msg in client.get_events(topic) if isinstance(msg, dict)]


def jsonable(d: dict) -> dict:
    """``d`` as JSON gives it back (paths and other objects as strings)."""
    return json.loads(json.dumps(d, default=str))


class JobFiles:
    """The job's directory on the data root. Its files are read without following a link
    below ``folder`` (default: the directory itself; ``ROOT/jobs`` for :meth:`existing`)."""

    def __init__(self, directory: str | Path, folder: str | Path | None = None):
        self.dir = Path(directory)
        self.folder = self.dir if folder is None else Path(folder)

    @classmethod
    def of(cls, root: str | Path, job_id: str) -> JobFiles:
        return cls(Path(root) / "jobs" / job_id)

    @classmethod
    def existing(cls, root: str | Path, job_id: str) -> JobFiles:
        """The directory of job ``job_id`` (a plain id, :func:`check_job_id`) in ``root/jobs``;
        a one-line :class:`JobError` if the id is not plain or names no directory there."""
        check_job_id(job_id)
        jobs = Path(os.path.abspath(root)) / "jobs"
        files = cls(jobs / job_id, jobs)
        if not files.dir.is_dir():
            raise JobError(f"no job {job_id} under {jobs} (no such directory)")
        if files.dir.resolve().parent != jobs.resolve():
            raise JobError(
                f"job {job_id}: expected a directory in {jobs}, got a link to {files.dir.resolve()}"
            )
        return files

    @property
    def status_path(self) -> Path:
        return self.dir / "status.json"

    @property
    def log_path(self) -> Path:
        return self.dir / "job.log"

    @property
    def spec_path(self) -> Path:
        return self.dir / "spec.toml"

    @property
    def record_path(self) -> Path:
        return self.dir / "spec.json"

    @property
    def owner_path(self) -> Path:
        """The lock file of the coordinator running the job (:class:`pipeline.procs.OwnerLock`)."""
        return self.dir / "owner.json"

    def write_status(self, status: dict) -> None:
        atomic_write_text(self.status_path, json.dumps(status, indent=2, sort_keys=True) + "\n")

    def read_status(self) -> dict | None:
        """The latest state record; None if there is none;
        :class:`JobFileError` if it is malformed."""
        raw = self._read_bytes(self.status_path)
        return None if raw is None else status_from_bytes(self.status_path, raw)

    def append_log(self, line: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as f:
            f.write(line.rstrip("\n") + "\n")
            f.flush()

    def read_log(self, offset: int = 0) -> tuple[str, int]:
        """Text of the log from byte ``offset`` (whole lines only) and the next offset;
        :class:`JobFileError` if it cannot be read."""
        data = self._read_bytes(self.log_path, offset)
        if data is None:
            return "", offset
        end = data.rfind(b"\n") + 1
        return data[:end].decode(errors="replace"), offset + end

    def write_record(self, record: dict, spec_toml: str) -> None:
        atomic_write_text(self.record_path, json.dumps(record, indent=2, sort_keys=True) + "\n")
        atomic_write_text(self.spec_path, spec_toml)

    def read_record(self) -> dict | None:
        """The job's record as submitted; None if there is none;
        :class:`JobFileError` if malformed."""
        raw = self._read_bytes(self.record_path)
        record = None if raw is None else json_object(self.record_path, raw)
        missing = [k for k in RECORD_KEYS if record is not None and k not in record]
        if missing:
            raise JobFileError(
                f"{self.record_path}: missing {', '.join(map(repr, missing))} (not a job record "
                f"written by convpipe)"
            )
        if record is not None and (
            isinstance(record["attempt"], bool)
            or not isinstance(record["attempt"], int)
            or not isinstance(record["options"], dict)
        ):
            raise JobFileError(
                f"{self.record_path}: 'attempt' must be an integer and 'options' an object, got "
                f"{record['attempt']!r} and {type(record['options']).__name__}"
            )
        return record

    def _read_bytes(self, path: Path, offset: int = 0) -> bytes | None:
        """The bytes of the regular file ``path`` (in the directory) from ``offset``, no link
        followed; None if it does not exist; else a one-line JobFileError."""
        try:
            return read_regular(self.folder, path.relative_to(self.folder).parts, offset)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise JobFileError(f"{path}: cannot read it ({exc.strerror or exc})") from None


def json_object(path: str | Path, raw: bytes) -> dict:
    """The JSON object ``raw`` (the bytes read from ``path``) holds; else one-line JobFileError
    naming ``path``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JobFileError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise JobFileError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise JobFileError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def status_from_bytes(path: str | Path, raw: bytes) -> dict:
    """A job's state record from the bytes of its ``status.json`` at ``path``; a one-line
    :class:`JobFileError` if it is no JSON object or names no known state. ``convpipe status
    --root`` and the page (which reads the file its own way) both check it here."""
    status = json_object(path, raw)
    if status.get("state") not in ACTIVE + TERMINAL:
        raise JobFileError(
            f"{path}: 'state' must be one of {', '.join(ACTIVE + TERMINAL)}, "
            f"got {status.get('state')!r}"
        )
    return status


def newest_first(statuses: list[dict]) -> list[dict]:
    """Jobs' statuses, the latest submitted (or resumed) first, whatever their ids' kinds."""
    return sorted(
        statuses, key=lambda s: (str(s.get("submitted") or ""), str(s.get("job"))), reverse=True
    )


def log_line(text: str) -> str:
    """A line of a job's log: UTC time to the second, then the text."""
    return f"{now_iso()} {text}"


def result_text(result: dict | None, skip: tuple[str, ...] = ()) -> str:
    """A job's result as its log, ``convpipe status`` and the page show it: ``key value`` pairs,
    rounded as the progress lines are (accuracies to 4 decimals, seconds to 1, other numbers as
    people read them: :func:`pipeline.curves.number_text`); a test accuracy scored with
    test-time augmentation says so (``test_acc 0.9012 (tta flip-translate)``)."""
    result = dict(result or {})
    tta = result.get("tta") if "test_acc" in result else None
    if tta is not None:
        result.pop("tta")
    parts = []
    for key, value in result.items():
        if key in skip:
            continue
        text = _value_text(key, value)
        if key == "test_acc" and tta not in (None, "none"):
            text += f" (tta {tta})"
        parts.append(f"{key} {text}")
    return ", ".join(parts)


def _value_text(key: str, value) -> str:
    if isinstance(value, float) and (key.endswith("_acc") or key == "accuracy"):
        return f"{value:.4f}"
    if isinstance(value, (int, float)) and not isinstance(value, bool) and key == "seconds":
        return f"{value:.1f}"
    return number_text(value)
