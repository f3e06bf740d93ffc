"""A client's side of jobs: submit, resume and cancel them, ask the scheduler about them.

``submit(client, spec)``:

1. a short *preflight* task on a worker (:func:`pipeline.jobs.runner.preflight_job`) checks
   the spec where it will run and creates the job's directory on the data root;
2. the submission is recorded on the scheduler (Dask events, see :mod:`pipeline.jobs.records`);
3. :func:`pipeline.jobs.runner.run_job` is submitted under the key
   ``convpipe-job-<id>-<attempt>`` and handed to ``fire_and_forget``: the scheduler keeps it
   alive after the submitting client leaves.

``job_status`` reads a job's events on the scheduler and checks them against the cluster's
live state: a job recorded as running whose worker has left is ``failed`` as soon as the
scheduler has dropped that worker, unless Dask is rerunning its coordinator task elsewhere
(the job then restarts itself: ``restarting``). ``resume(client, job_id)`` queues attempt n+1, which
continues the run directory from its last checkpoint. ``cancel`` sends a request event that the
coordinator checks between steps.
"""

from __future__ import annotations

import os
import time
import uuid

from distributed import fire_and_forget

from pipeline.cluster import worker_addresses
from pipeline.jobs.kinds import KINDS
from pipeline.jobs.records import (
    REGISTRY_TOPIC,
    TERMINAL,
    JobError,
    check_job_id,
    host_name,
    job_topic,
    jsonable,
    log_line,
    new_job_id,
    newest_first,
    now_iso,
    task_key,
    topic_events,
)
from pipeline.jobs.runner import MAX_RESTARTS, preflight_job, run_job
from pipeline.jobs.schema import SpecError
from pipeline.jobs.spec import JobSpec
from pipeline.procs import Owner

__all__ = [
    "JobError",
    "cancel",
    "job_events",
    "job_status",
    "list_jobs",
    "resume",
    "submissions",
    "submit",
    "wait_for_workers",
]

#: the preflight task runs before anything else queued on the cluster
PREFLIGHT_PRIORITY = 1_000_000


def _by() -> str:
    return f"{os.environ.get('USER') or os.environ.get('USERNAME') or 'user'}@{host_name()}"


def wait_for_workers(client, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not worker_addresses(client):
        if time.monotonic() > deadline:
            raise JobError(
                f"no Dask workers joined the scheduler at {client.scheduler.address} within "
                f"{timeout:.0f} s"
            )
        time.sleep(0.2)


def submit(
    client,
    spec,
    *,
    job_id: str | None = None,
    attempt: int = 1,
    timeout: float = 120.0,
    gone: dict | None = None,
) -> dict:
    """Check ``spec`` on the cluster, queue its job; return the job's record (``record['job']``).

    ``job_id``: the job's id (a plain id); by default a new one is drawn (and drawn again on the
    worker if it is taken: the record has the id the job got). ``gone``: the previous attempt's
    coordinator (``host``, ``pid_namespace``, ``pid``) when the scheduler saw its worker leave:
    the new attempt takes over the locks it left (:func:`pipeline.jobs.runner.preflight_job`)."""
    drawn = job_id is None
    job_id = new_job_id(spec.kind) if drawn else check_job_id(job_id)
    if spec.options.get("workers") is not None and spec.kind == "train":
        raise SpecError(
            f"{spec.source}: workers sizes the embedded cluster only; a cluster at a scheduler "
            f"has its own workers (scale it instead)"
        )
    wait_for_workers(client, timeout)
    by = _by()
    future = client.submit(
        preflight_job,
        spec.to_dict(),
        job_id,
        attempt,
        by,
        drawn,
        gone,
        pure=False,
        key=f"convpipe-preflight-{job_id}-{attempt}",
        priority=PREFLIGHT_PRIORITY,
    )
    try:
        outcome = future.result(timeout=timeout)
    finally:
        future.release()
    if "error" in outcome:
        raise outcome["error"]
    record = outcome["record"]
    job_id = record["job"]
    client.log_event(REGISTRY_TOPIC, {"type": "submitted", **jsonable(record)})
    client.log_event(
        job_topic(job_id),
        {
            "id": uuid.uuid4().hex[:12],
            "job": job_id,
            "attempt": attempt,
            "type": "state",
            "state": "queued",
            **{
                k: record[k]
                for k in ("kind", "name", "root", "job_dir", "run_dir", "submitted", "by", "key")
            },
            "updated": now_iso(),
        },
    )
    verb = "resumed" if attempt > 1 else "submitted"
    client.log_event(
        job_topic(job_id),
        {
            "id": uuid.uuid4().hex[:12],
            "job": job_id,
            "attempt": attempt,
            "type": "log",
            "line": log_line(
                f"{verb} by {by} (attempt {attempt}): {spec.kind} job {spec.name!r}, "
                f"run directory {record['run_dir']}"
            ),
        },
    )
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
        if any(
            m.get("type") == "state" and m.get("attempt") == attempt and m.get("state") != "queued"
            for m in job_events(client, job_id)
        ):
            return
        time.sleep(0.05)
    raise JobError(
        f"the scheduler at {client.scheduler.address} did not take job {job_id} within "
        f"{timeout:.0f} s"
    )


def submissions(client, job_id: str | None = None) -> list[dict]:
    """Submission records on this scheduler (all attempts), oldest first."""
    out = [m for m in topic_events(client, REGISTRY_TOPIC) if m.get("type") == "submitted"]
    return [m for m in out if job_id is None or m.get("job") == job_id]


def job_events(client, job_id: str) -> list[dict]:
    return topic_events(client, job_topic(job_id))


def _task_states(client, keys: list[str]) -> dict:
    """{key: (state, worker address or None)} of tasks on the scheduler; None if it has none."""

    def states(dask_scheduler=None, keys=()):
        out = {}
        for k in keys:
            ts = dask_scheduler.tasks.get(k)
            if ts is None:
                out[k] = None
            else:
                out[k] = (
                    ts.state,
                    ts.processing_on.address if ts.processing_on is not None else None,
                )
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
        raise JobError(
            f"no job {job_id} on the scheduler at {client.scheduler.address} (it keeps jobs "
            f"while it runs; the job's files are in ROOT/jobs/{job_id}: convpipe status {job_id} "
            "--root ROOT)"
        )
    status: dict = {}
    for m in subs:
        status.update(
            {
                k: m[k]
                for k in (
                    "job",
                    "kind",
                    "name",
                    "root",
                    "job_dir",
                    "run_dir",
                    "submitted",
                    "by",
                    "attempt",
                    "key",
                )
                if k in m
            }
        )
    attempt = max([m.get("attempt", 1) for m in states + subs])
    # events from the client and from the worker travel on different connections: order the
    # states of this attempt by their meaning (queued < running < an end), then by arrival
    mine = [m for m in states if m.get("attempt") == attempt]
    for m in sorted(mine, key=lambda m: _RANK.get(m.get("state"), 0)):
        status.update({k: v for k, v in m.items() if k not in ("id", "type")})
    status.setdefault("state", "queued")
    status["attempt"] = attempt
    status["cancel_requested"] = any(
        m.get("type") == "cancel" and m.get("attempt", attempt) == attempt for m in events
    )
    if status["state"] not in TERMINAL:
        _check_alive(client, status)
        if status["state"] in TERMINAL:
            # the job may have ended between reading its events and asking for its task
            again = [
                m
                for m in job_events(client, job_id)
                if m.get("type") == "state"
                and m.get("attempt") == attempt
                and m.get("state") in TERMINAL
            ]
            if again:
                status.update({k: v for k, v in again[-1].items() if k not in ("id", "type")})
    logs = [m["line"] for m in events if m.get("type") == "log"]
    if logs:
        status["last_line"] = logs[-1]
    return status


_RANK = {"queued": 0, "running": 1, "done": 2, "failed": 2, "cancelled": 2}


def _check_alive(client, status: dict) -> None:
    key = status.get("key") or task_key(status["job"], status["attempt"])
    workers = set(worker_addresses(client))
    task = _task_states(client, [key]).get(key)
    if status["state"] == "running":
        worker = status.get("worker")
        if worker not in workers and _restarting(status, task):
            # Dask reruns the coordinator's task on another worker, which restarts the job
            status["reason"] = (
                f"the worker running its coordinator ({worker}) died; restarting on another "
                f"worker from the last checkpoint (restart {int(status.get('restarts') or 0) + 1} "
                f"of at most {MAX_RESTARTS})"
            )
            status["restarting"] = True
        elif worker not in workers:
            status.update(
                state="failed",
                resumable=True,
                reason=f"the worker running its coordinator ({worker}, pid {status.get('pid')} on "
                f"{status.get('host')}) died or left the cluster",
                coordinator_left=True,
            )
        elif task is None or task[1] != worker:
            where = (
                "is gone from the scheduler"
                if task is None
                else f"is {task[0]} on {task[1] or 'no worker'}"
            )
            status.update(
                state="failed",
                resumable=True,
                reason=f"its coordinator task {key} {where} (worker {worker} lost it)",
            )
    elif status["state"] == "queued":
        if task is None:
            status.update(
                state="failed",
                resumable=True,
                reason=f"its task {key} is gone from the scheduler (restarted, or removed)",
            )
        elif task[0] == "erred":
            status.update(
                state="failed", resumable=True, reason=f"its task {key} erred before it started"
            )
        else:
            status["task_state"] = task[0]


def _restarting(status: dict, task) -> bool:
    """Whether Dask is rerunning a job's coordinator task whose worker died,
    and the job will restart."""
    return (
        task is not None
        and task[0] in ("released", "waiting", "queued", "no-worker", "processing")
        and task[1] != status.get("worker")
        and int(status.get("restarts") or 0) < MAX_RESTARTS
    )


def list_jobs(client) -> list[dict]:
    """Every job this scheduler knows, newest first, each as :func:`job_status` reports it."""
    seen: dict[str, None] = {}
    for m in submissions(client):
        seen[m["job"]] = None
    out = []
    for job_id in seen:
        try:
            out.append(job_status(client, job_id))
        except JobError:
            continue
    return newest_first(out)


def cancel(client, job_id: str) -> dict:
    """Ask a queued or running job to stop; returns its status as it was."""
    status = job_status(client, job_id)
    if status["state"] in TERMINAL:
        raise JobError(f"job {job_id} is already {status['state']}")
    by = _by()
    client.log_event(
        job_topic(job_id),
        {
            "id": uuid.uuid4().hex[:12],
            "job": job_id,
            "attempt": status["attempt"],
            "type": "cancel",
            "by": by,
            "at": now_iso(),
        },
    )
    client.log_event(
        job_topic(job_id),
        {
            "id": uuid.uuid4().hex[:12],
            "job": job_id,
            "attempt": status["attempt"],
            "type": "log",
            "line": log_line(f"cancel requested by {by}"),
        },
    )
    return status


def resume(client, job_id: str, record: dict | None = None, timeout: float = 120.0) -> dict:
    """Queue the next attempt of a failed or cancelled job:
    it continues from its last checkpoint.

    A job whose coordinator's worker the scheduler saw leave (failed without saying so itself)
    is resumed with that coordinator as ``gone``: the locks it left on the data root (the job's
    and its run directory's ``owner.json``) are taken over even from another host."""
    gone = None
    if record is None:
        subs = submissions(client, job_id)
        if not subs:
            raise JobError(
                f"no job {job_id} on the scheduler at {client.scheduler.address}; give the data "
                f"root that holds its files: convpipe resume {job_id} --root ROOT"
            )
        status = job_status(client, job_id)
        if status["state"] not in ("failed", "cancelled"):
            raise JobError(
                f"job {job_id} is {status['state']}: only a failed or cancelled job can be resumed"
            )
        record = subs[-1]
        if status.get("coordinator_left"):
            coordinator = Owner.from_record(status)
            gone = coordinator.record() if coordinator is not None else None
    kind = KINDS[record["kind"]]
    if not hasattr(kind, "resume_options"):
        raise JobError(f"a {record['kind']} job cannot be resumed; submit its spec again")
    options = kind.resume_options(record["options"])
    spec = JobSpec(
        kind=record["kind"],
        name=record["name"],
        options=options,
        root=record["root"],
        source=f"job {job_id}",
    )
    return submit(
        client, spec, job_id=job_id, attempt=int(record["attempt"]) + 1, timeout=timeout, gone=gone
    )
