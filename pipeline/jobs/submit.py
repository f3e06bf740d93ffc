"""Running a job's coordinator on the cluster itself, and asking the cluster about jobs.

``submit(client, spec)``:

1. a short *preflight* task on a worker resolves the spec's paths there (absolute, on the
   shared data root), checks that the store or run directory exists, creates the job's
   directory ``ROOT/jobs/<id>/`` and writes the spec and a ``queued`` status;
2. the submission is recorded on the scheduler (Dask events, see :mod:`pipeline.jobs.records`);
3. :func:`run_job` is submitted under the key ``convpipe-job-<id>-<attempt>`` and handed to
   ``fire_and_forget``: the scheduler keeps it alive after the submitting client leaves.

:func:`run_job` runs on a worker. It *secedes* from the worker's thread pool
(``worker_client``), so a coordinator waiting on its shard tasks does not take the thread those
tasks need, then calls the kind's ``run`` with a client of the same cluster. Each job has its
own id, directory, run directory, event topic and task keys, so two jobs on one cluster do not
share parameters, outputs or logs.

Failures:
- the worker running the coordinator dies: Dask would run the task again elsewhere; the new
  run finds its attempt already ``running`` in ``status.json`` and records ``failed`` with the
  reason instead of starting over; ``status`` reports the same as soon as the scheduler has
  dropped that worker. ``resume(client, job_id)`` queues attempt n+1, which continues the run
  directory from its last checkpoint.
- the scheduler goes away: the coordinator's calls fail; it records ``failed`` (lost the
  scheduler) in its files, which, like the checkpoints, are already on disk.
- ``cancel``: a request event on the job's topic; the coordinator checks it between steps (at
  most once a second) and stops, recording ``cancelled``; a job still queued stops as it starts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import threading
import time
import traceback
import uuid

from pipeline.atomic import atomic_write_text
from pipeline.errors import ConvpipeError
from pipeline.jobs.records import (
    REGISTRY_TOPIC,
    TERMINAL,
    JobFiles,
    host_name,
    job_topic,
    log_line,
    new_job_id,
    now_iso,
    task_key,
)

#: at most one progress line per this many seconds in the job's log (epochs always)
PROGRESS_EVERY_S = 5.0
#: progress events that always make a log line (steps and chunks are thinned out)
ALWAYS_LOGGED = ("start", "resumed", "warning", "epoch", "checkpoint")
#: how often the coordinator looks for a cancel request
CANCEL_CHECK_EVERY_S = 1.0
#: the preflight task runs before anything else queued on the cluster
PREFLIGHT_PRIORITY = 1_000_000


class JobError(ConvpipeError):
    """A job is unknown, in the wrong state for the request, or its cluster cannot run it."""


class JobCancelled(Exception):
    """Raised inside a running job when a cancel request arrives."""


# ================================================================ on the worker

def _events(client, topic: str) -> list[dict]:
    return [msg for _, msg in client.get_events(topic) if isinstance(msg, dict)]


class Report:
    """A running job's voice: log lines and states, to its files and to the scheduler."""

    def __init__(self, record: dict, client=None):
        self.record = record
        self.client = client
        self.files = JobFiles(record["job_dir"])
        self.topic = job_topic(record["job"])
        self.status = self.files.read_status() or {}
        self._last_progress = 0.0
        self._last_cancel_check = 0.0
        self._lock = threading.Lock()

    # ---- output -------------------------------------------------------------------------------
    def _event(self, msg: dict) -> None:
        msg = {"id": uuid.uuid4().hex[:12], "job": self.record["job"], "attempt": self.record["attempt"], **msg}
        try:
            from distributed import get_worker

            get_worker().log_event(self.topic, msg)
        except Exception:  # no scheduler (lost) or not on a worker: the files have it
            pass

    def log(self, text: str) -> None:
        line = log_line(text)
        with self._lock:
            self.files.append_log(line)
        self._event({"type": "log", "line": line})

    __call__ = log

    def state(self, state: str, text: str | None = None, **info) -> dict:
        status = {**self.status, **info, "state": state, "attempt": self.record["attempt"],
                  "updated": now_iso()}
        if state == "running":
            status["started"] = now_iso()
        if state in TERMINAL:
            status["finished"] = now_iso()
        self.status = status
        with self._lock:
            self.files.write_status(status)
        self._event({"type": "state", **_jsonable(status)})
        if text:
            self.log(text)
        return status

    # ---- progress and cancellation ----------------------------------------------------------------
    def progress(self, info=None, /, **kw) -> None:
        """The kind's progress callback: a dict (or keywords) of step, epoch, loss, ..."""
        if isinstance(info, dict):
            kw = {**info, **kw}
        elif info is not None:
            kw = {"message": str(info), **kw}
        self.check_cancel()
        now = time.monotonic()
        event = kw.get("event") or kw.get("kind")
        if event == "done":
            return  # the job's own "done" line gives the result
        finished = kw.get("total") is not None and kw.get("done") == kw.get("total")
        if event in ALWAYS_LOGGED or finished or now - self._last_progress >= PROGRESS_EVERY_S:
            self._last_progress = now
            self.status["progress"] = _jsonable({k: v for k, v in kw.items() if _plain(v)})
            with self._lock:
                self.files.write_status({**self.status, "updated": now_iso()})
            self.log(format_progress(kw))

    def check_cancel(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.client is None or (not force and now - self._last_cancel_check < CANCEL_CHECK_EVERY_S):
            return
        self._last_cancel_check = now
        try:
            events = _events(self.client, self.topic)
        except Exception:
            return
        for msg in events:
            if msg.get("type") == "cancel" and msg.get("attempt") == self.record["attempt"]:
                raise JobCancelled(f"cancelled by {msg.get('by', 'a client')} at {msg.get('at', '?')}")


def format_progress(p: dict) -> str:
    """One log line from a progress record (training: start/step/epoch/checkpoint; data: stages)."""
    event = p.get("event") or p.get("kind")
    if p.get("message") and event in (None, "warning"):
        return (f"{event}: " if event else "") + str(p["message"])
    if event == "start" and "total_steps" in p:
        return (f"start: step {p.get('start_step', 0)}/{p['total_steps']}, {p.get('epochs')} epoch(s), "
                f"{p.get('workers')} workers, batch {p.get('batch_size')}, transport {p.get('transport')}, "
                f"run directory {p.get('run_dir')}")
    if event == "resumed":
        return f"resumed at step {p.get('step')} from {p.get('checkpoint') or 'the start (no checkpoint yet)'}"
    if event == "checkpoint":
        return f"checkpoint at step {p.get('step')}: {p.get('path')}"
    parts = []
    if event and event not in ("step", "epoch"):
        parts.append(str(event))
    if "done" in p and "total" in p:
        parts.append(f"{p['done']}/{p['total']}")
    if "epoch" in p:
        parts.append(f"epoch {p['epoch']}" + (f"/{p['epochs']}" if p.get("epochs") else ""))
    if "step" in p and event != "epoch":
        total = p.get("total_steps")
        parts.append(f"step {p['step']}" + (f"/{total}" if total else ""))
    for key, fmt in (("loss", "loss {:.4f}"), ("train_acc", "train_acc {:.4f}"), ("val_acc", "val_acc {:.4f}"),
                     ("accuracy", "accuracy {:.4f}"), ("images_per_s", "{:.0f} images/s")):
        if isinstance(p.get(key), (int, float)):
            parts.append(fmt.format(p[key]))
    return " ".join(parts) if parts else str(event or "progress")


def _plain(v) -> bool:
    return isinstance(v, (str, int, float, bool)) or v is None


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))


def preflight_job(spec: dict, job_id: str, attempt: int, by: str) -> dict:
    """On a worker: resolve and check the spec where it will run, create the job's directory.

    Returns the job's record: id, attempt, kind, name, absolute root/job_dir/run_dir, options.
    """
    from pipeline.jobs.kinds import KINDS
    from pipeline.jobs.spec import JobSpec

    js = JobSpec.from_dict(spec)
    root = os.path.abspath(os.path.expanduser(js.root))
    kind = KINDS[js.kind]
    options = kind.preflight(js.options, root, job_id)
    files = JobFiles.of(root, job_id)
    record = {
        "job": job_id, "attempt": attempt, "kind": js.kind, "name": js.name, "root": root,
        "job_dir": str(files.dir), "run_dir": kind.run_dir(options), "options": options,
        "submitted": now_iso(), "by": by, "source": js.source, "key": task_key(job_id, attempt),
    }
    try:
        files.dir.mkdir(parents=True, exist_ok=True)
        js.options = options
        js.root = root
        files.write_record(record, js.to_toml())
    except OSError as exc:
        raise JobError(f"cannot write the job's directory {files.dir} on the data root: {exc.strerror or exc}") from None
    status = {k: record[k] for k in ("job", "kind", "name", "root", "job_dir", "run_dir", "submitted", "by")}
    previous = files.read_status() or {}
    status.update({"state": "queued", "attempt": attempt, "updated": now_iso(),
                   "key": record["key"], "history": previous.get("history", [])})
    if previous.get("state"):
        status["history"] = status["history"] + [
            {k: previous.get(k) for k in ("attempt", "state", "reason", "worker", "started", "finished")}]
    files.write_status(status)
    verb = "resumed" if attempt > 1 else "submitted"
    files.append_log(log_line(f"{verb} by {by} (attempt {attempt}): {js.kind} job {js.name!r}, "
                              f"run directory {record['run_dir']}"))
    return record


def run_job(record: dict) -> dict:
    """The job's coordinator, on a worker (submitted by :func:`submit`). Returns its final status."""
    from distributed import get_worker, worker_client

    from pipeline.jobs.kinds import KINDS

    worker = get_worker()
    report = Report(record)
    current = report.status
    if current.get("attempt") == record["attempt"] and current.get("state") == "running":
        prev = current.get("worker", "?")
        return report.state(
            "failed",
            f"failed: the worker running the coordinator ({prev}, pid {current.get('pid')} on "
            f"{current.get('host')}) died; resume with: convpipe resume {record['job']}",
            reason=f"the worker running its coordinator ({prev}) died or left the cluster",
            resumable=True,
        )
    if current.get("attempt") != record["attempt"] or current.get("state") != "queued":
        # this attempt already ended, or a later attempt superseded it (a task Dask kept
        # around for a worker that never came back): nothing to run
        return current

    with worker_client() as client:
        report.client = client
        try:
            report.check_cancel(force=True)
            report.state("running", f"running on worker {worker.address} (pid {os.getpid()} on {host_name()})",
                         worker=worker.address, pid=os.getpid(), host=host_name(), reason=None)
            result = KINDS[record["kind"]].run(record["options"], client, report)
        except JobCancelled as exc:
            return report.state("cancelled", f"cancelled: {exc}", reason=str(exc), resumable=True)
        except ConvpipeError as exc:
            return report.state("failed", f"failed: {exc}", reason=str(exc), resumable=True)
        except BaseException as exc:  # noqa: BLE001 - anything the job raised, with its reason
            reason = _failure_reason(exc, client)
            for line in traceback.format_exc().rstrip().splitlines():
                report.files.append_log(log_line("  " + line))
            return report.state("failed", f"failed: {reason}", reason=reason, resumable=True)
        result = _jsonable(result or {})
        with contextlib.suppress(OSError):
            atomic_write_text(report.files.dir / "result.json", json.dumps(result, indent=2, sort_keys=True) + "\n")
        return report.state("done", f"done: {_result_text(result)}", result=result, reason=None)


def _failure_reason(exc: BaseException, client=None) -> str:
    from distributed.comm.core import CommClosedError

    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    lost = isinstance(exc, (CommClosedError, ConnectionError, TimeoutError, OSError)) or "scheduler-connection-lost" in first
    # when the scheduler goes away, the client cancels every future it waits on: a
    # cancellation is the scheduler's loss if the scheduler no longer answers
    if not lost and isinstance(exc, (asyncio.CancelledError, concurrent.futures.CancelledError)) and client is not None:
        lost = not _scheduler_answers(client)
    if lost:
        return f"lost the connection to the Dask scheduler ({type(exc).__name__}: {first})"
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _scheduler_answers(client, timeout: float = 5.0) -> bool:
    try:
        client.sync(lambda: asyncio.wait_for(client.scheduler.identity(), timeout))
    except Exception:  # noqa: BLE001 - any failure to get an answer means it is gone
        return False
    return True


def _result_text(result: dict | None) -> str:
    if not result:
        return "ok"
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items())


# ================================================================ on the client

def _by() -> str:
    return f"{os.environ.get('USER') or os.environ.get('USERNAME') or 'user'}@{host_name()}"


def wait_for_workers(client, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not client.scheduler_info().get("workers"):
        if time.monotonic() > deadline:
            raise JobError(f"no Dask workers joined the scheduler at {client.scheduler.address} within {timeout:.0f} s")
        time.sleep(0.2)


def submit(client, spec, *, job_id: str | None = None, attempt: int = 1, timeout: float = 120.0) -> dict:
    """Check ``spec`` on the cluster, queue its job; return the job's record (``record['job']``)."""
    from distributed import fire_and_forget

    job_id = job_id or new_job_id(spec.kind)
    if spec.options.get("workers") is not None and spec.kind == "train":
        from pipeline.jobs.spec import SpecError

        raise SpecError(f"{spec.source}: workers sizes the embedded cluster only; a cluster at a scheduler "
                        f"has its own workers (scale it instead)")
    wait_for_workers(client, timeout)
    by = _by()
    future = client.submit(preflight_job, spec.to_dict(), job_id, attempt, by, pure=False,
                           key=f"convpipe-preflight-{job_id}-{attempt}", priority=PREFLIGHT_PRIORITY)
    try:
        record = future.result(timeout=timeout)
    finally:
        future.release()
    client.log_event(REGISTRY_TOPIC, {"type": "submitted", **_jsonable(record)})
    client.log_event(job_topic(job_id), {
        "id": uuid.uuid4().hex[:12], "job": job_id, "attempt": attempt, "type": "state", "state": "queued",
        **{k: record[k] for k in ("kind", "name", "root", "job_dir", "run_dir", "submitted", "by", "key")},
        "updated": now_iso()})
    verb = "resumed" if attempt > 1 else "submitted"
    client.log_event(job_topic(job_id), {
        "id": uuid.uuid4().hex[:12], "job": job_id, "attempt": attempt, "type": "log",
        "line": log_line(f"{verb} by {by} (attempt {attempt}): {spec.kind} job {spec.name!r}, "
                         f"run directory {record['run_dir']}")})
    job = client.submit(run_job, record, key=record["key"], pure=False, retries=0)
    fire_and_forget(job)
    _wait_until_known(client, job_id, attempt, record["key"])
    return record


def _wait_until_known(client, job_id: str, attempt: int, key: str, timeout: float = 30.0) -> None:
    """Return once the scheduler has the job's task (or this attempt has already started)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _task_states(client, [key]).get(key) is not None:
            return
        if any(m.get("type") == "state" and m.get("attempt") == attempt and m.get("state") != "queued"
               for m in job_events(client, job_id)):
            return
        time.sleep(0.05)
    raise JobError(f"the scheduler at {client.scheduler.address} did not take job {job_id} within {timeout:.0f} s")


def submissions(client, job_id: str | None = None) -> list[dict]:
    """Submission records on this scheduler (all attempts), oldest first."""
    out = [m for m in _events(client, REGISTRY_TOPIC) if m.get("type") == "submitted"]
    return [m for m in out if job_id is None or m.get("job") == job_id]


def job_events(client, job_id: str) -> list[dict]:
    return _events(client, job_topic(job_id))


def _task_states(client, keys: list[str]) -> dict:
    """{key: (state, worker address or None)} of tasks on the scheduler; None if it has none."""

    def states(dask_scheduler=None, keys=()):
        out = {}
        for k in keys:
            ts = dask_scheduler.tasks.get(k)
            if ts is None:
                out[k] = None
            else:
                out[k] = (ts.state, ts.processing_on.address if ts.processing_on is not None else None)
        return out

    return client.run_on_scheduler(states, keys=list(keys))


def job_status(client, job_id: str, events: list[dict] | None = None) -> dict:
    """The job's latest state on this scheduler, checked against the cluster's live state.

    A job recorded as running whose worker has left the cluster is reported ``failed`` with
    that reason, even before Dask re-runs its task and the job records it itself.
    """
    events = job_events(client, job_id) if events is None else events
    states = [m for m in events if m.get("type") == "state"]
    subs = submissions(client, job_id)
    if not states and not subs:
        raise JobError(f"no job {job_id} on the scheduler at {client.scheduler.address} (it keeps jobs "
                       f"while it runs; the job's files are in ROOT/jobs/{job_id}: convpipe status {job_id} --root ROOT)")
    status: dict = {}
    for m in subs:
        status.update({k: m[k] for k in ("job", "kind", "name", "root", "job_dir", "run_dir", "submitted", "by",
                                         "attempt", "key") if k in m})
    attempt = max([m.get("attempt", 1) for m in states + subs])
    # events from the client and from the worker travel on different connections: order the
    # states of this attempt by their meaning (queued < running < an end), then by arrival
    mine = [m for m in states if m.get("attempt") == attempt]
    for m in sorted(mine, key=lambda m: _RANK.get(m.get("state"), 0)):
        status.update({k: v for k, v in m.items() if k not in ("id", "type")})
    status.setdefault("state", "queued")
    status["attempt"] = attempt
    status["cancel_requested"] = any(m.get("type") == "cancel" and m.get("attempt", attempt) == attempt
                                     for m in events)
    if status["state"] not in TERMINAL:
        _check_alive(client, status)
        if status["state"] in TERMINAL:
            # the job may have ended between reading its events and asking for its task
            again = [m for m in job_events(client, job_id) if m.get("type") == "state"
                     and m.get("attempt") == attempt and m.get("state") in TERMINAL]
            if again:
                status.update({k: v for k, v in again[-1].items() if k not in ("id", "type")})
    logs = [m["line"] for m in events if m.get("type") == "log"]
    if logs:
        status["last_line"] = logs[-1]
    return status


_RANK = {"queued": 0, "running": 1, "done": 2, "failed": 2, "cancelled": 2}


def _check_alive(client, status: dict) -> None:
    key = status.get("key") or task_key(status["job"], status["attempt"])
    workers = set(client.scheduler_info(n_workers=-1).get("workers", {})) if _has_n_workers(client) \
        else set(client.scheduler_info().get("workers", {}))
    task = _task_states(client, [key]).get(key)
    if status["state"] == "running":
        worker = status.get("worker")
        if worker not in workers:
            status.update(state="failed", resumable=True,
                          reason=f"the worker running its coordinator ({worker}, pid {status.get('pid')} on "
                                 f"{status.get('host')}) died or left the cluster")
        elif task is None or task[1] != worker:
            where = "is gone from the scheduler" if task is None else f"is {task[0]} on {task[1] or 'no worker'}"
            status.update(state="failed", resumable=True,
                          reason=f"its coordinator task {key} {where} (worker {worker} lost it)")
    elif status["state"] == "queued":
        if task is None:
            status.update(state="failed", resumable=True,
                          reason=f"its task {key} is gone from the scheduler (restarted, or removed)")
        elif task[0] == "erred":
            status.update(state="failed", resumable=True, reason=f"its task {key} erred before it started")
        else:
            status["task_state"] = task[0]


def _has_n_workers(client) -> bool:
    import inspect

    return "n_workers" in inspect.signature(client.scheduler_info).parameters


def list_jobs(client) -> list[dict]:
    """Every job this scheduler knows, newest first, each as :func:`job_status` reports it."""
    seen: dict[str, None] = {}
    for m in submissions(client):
        seen[m["job"]] = None
    out = []
    for job_id in reversed(list(seen)):
        try:
            out.append(job_status(client, job_id))
        except JobError:
            continue
    return out


def cancel(client, job_id: str) -> dict:
    """Ask a queued or running job to stop; returns its status as it was."""
    status = job_status(client, job_id)
    if status["state"] in TERMINAL:
        raise JobError(f"job {job_id} is already {status['state']}")
    by = _by()
    client.log_event(job_topic(job_id), {"id": uuid.uuid4().hex[:12], "job": job_id, "attempt": status["attempt"],
                                         "type": "cancel", "by": by, "at": now_iso()})
    client.log_event(job_topic(job_id), {"id": uuid.uuid4().hex[:12], "job": job_id, "attempt": status["attempt"],
                                         "type": "log", "line": log_line(f"cancel requested by {by}")})
    return status


def resume(client, job_id: str, record: dict | None = None, timeout: float = 120.0) -> dict:
    """Queue the next attempt of a failed or cancelled job: it continues from its last checkpoint."""
    from pipeline.jobs.kinds import KINDS
    from pipeline.jobs.spec import JobSpec

    if record is None:
        subs = submissions(client, job_id)
        if not subs:
            raise JobError(f"no job {job_id} on the scheduler at {client.scheduler.address}; give the data root "
                           f"that holds its files: convpipe resume {job_id} --root ROOT")
        status = job_status(client, job_id)
        if status["state"] not in ("failed", "cancelled"):
            raise JobError(f"job {job_id} is {status['state']}: only a failed or cancelled job can be resumed")
        record = subs[-1]
    kind = KINDS[record["kind"]]
    if not hasattr(kind, "resume_options"):
        raise JobError(f"a {record['kind']} job cannot be resumed; submit its spec again")
    options = kind.resume_options(record["options"])
    spec = JobSpec(kind=record["kind"], name=record["name"], options=options, root=record["root"],
                   source=f"job {job_id}")
    return submit(client, spec, job_id=job_id, attempt=int(record["attempt"]) + 1, timeout=timeout)


# ================================================================ from the files alone

def status_from_files(root: str, job_id: str) -> dict:
    files = JobFiles.of(root, job_id)
    status = files.read_status()
    if status is None:
        raise JobError(f"no job {job_id} under {os.path.abspath(root)}/jobs (no status.json)")
    if status.get("state") == "running" and status.get("host") == host_name() and status.get("pid"):
        from pipeline.jobs.records import pid_alive

        if not pid_alive(int(status["pid"])):
            status.update(state="failed", resumable=True,
                          reason=f"the worker running its coordinator (pid {status['pid']} on {status['host']}) died")
    lines = files.read_log()[0].splitlines()
    if lines:
        status["last_line"] = lines[-1]
    return status


def list_from_files(root: str) -> list[dict]:
    jobs = os.path.join(root, "jobs")
    if not os.path.isdir(jobs):
        return []
    out = []
    for name in sorted(os.listdir(jobs), reverse=True):
        try:
            out.append(status_from_files(root, name))
        except JobError:
            continue
    return out
