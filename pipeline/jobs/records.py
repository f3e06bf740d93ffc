"""A job's record: its directory on the shared data root, and the same record on the scheduler.

Every job has one directory, ``ROOT/jobs/<job id>/``, written only by the worker that runs
the job (and the worker that checked it before it was queued)::

    spec.toml      the spec as submitted, overrides applied and paths made absolute
    status.json    the latest state record (replaced atomically, never torn)
    job.log        the job's log, one line per event (appended, flushed line by line)

The same records also go to the scheduler as Dask events (``Client.log_event``) on the topic
``convpipe-job-<id>``, and every submission to the topic ``convpipe-jobs``: that is what
``convpipe status`` and ``logs`` read from any machine that reaches the scheduler, without
access to the data root. The scheduler keeps them in memory only (the last
``distributed.admin.low-level-log-length`` events per topic, 1000 by default) and forgets
them when it restarts; the files stay, and ``--root DIR`` reads them directly.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from pipeline.atomic import atomic_write_text
from pipeline.errors import ConvpipeError

REGISTRY_TOPIC = "convpipe-jobs"
#: states of a job that has not ended, and of one that has
ACTIVE = ("queued", "running")
TERMINAL = ("done", "failed", "cancelled")


class JobError(ConvpipeError):
    """A job is unknown, in the wrong state for the request, or its cluster cannot run it."""


def job_topic(job_id: str) -> str:
    return f"convpipe-job-{job_id}"


def task_key(job_id: str, attempt: int) -> str:
    return f"convpipe-job-{job_id}-{attempt}"


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def new_job_id(kind: str) -> str:
    return f"{kind}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{os.urandom(2).hex()}"


def host_name() -> str:
    return socket.gethostname()


def topic_events(client, topic: str) -> list[dict]:
    """The records on a topic of the scheduler's event log, oldest first."""
    return [msg for _, msg in client.get_events(topic) if isinstance(msg, dict)]


def jsonable(d: dict) -> dict:
    """``d`` as JSON gives it back (paths and other objects as strings)."""
    return json.loads(json.dumps(d, default=str))


class JobFiles:
    """The job's directory on the data root."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)

    @classmethod
    def of(cls, root: str | Path, job_id: str) -> "JobFiles":
        return cls(Path(root) / "jobs" / job_id)

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

    def write_status(self, status: dict) -> None:
        atomic_write_text(self.status_path, json.dumps(status, indent=2, sort_keys=True) + "\n")

    def read_status(self) -> dict | None:
        try:
            value = json.loads(self.status_path.read_text())
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def append_log(self, line: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as f:
            f.write(line.rstrip("\n") + "\n")
            f.flush()

    def read_log(self, offset: int = 0) -> tuple[str, int]:
        """Text of the log from byte ``offset`` (whole lines only) and the next offset."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return "", offset
        end = data.rfind(b"\n") + 1
        return data[:end].decode(errors="replace"), offset + end

    def write_record(self, record: dict, spec_toml: str) -> None:
        atomic_write_text(self.record_path, json.dumps(record, indent=2, sort_keys=True) + "\n")
        atomic_write_text(self.spec_path, spec_toml)

    def read_record(self) -> dict | None:
        try:
            value = json.loads(self.record_path.read_text())
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None


def log_line(text: str) -> str:
    """A line of a job's log: UTC time to the second, then the text."""
    return f"{now_iso()} {text}"
