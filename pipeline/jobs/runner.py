"""A job on the cluster: the checks before it is queued, and its coordinator on a worker.

:func:`preflight_job` is a short task that :func:`pipeline.jobs.client.submit` runs on a
worker first: it resolves the spec's paths there (absolute, on the shared data root), checks
that the store or run directory exists, creates the job's directory ``ROOT/jobs/<id>/`` and
writes the spec and a ``queued`` status.

:func:`run_job` is the job's coordinator, submitted under the key
``convpipe-job-<id>-<attempt>`` and kept alive by the scheduler after the submitting client
leaves. It *secedes* from the worker's thread pool (``worker_client``), so a coordinator
waiting on its shard tasks does not take the thread those tasks need, then calls the kind's
``run`` with a client of the same cluster and a :class:`Report` as its progress callback.
Each job has its own id, directory, run directory, event topic and task keys, so two jobs on
one cluster do not share parameters, outputs or logs.

Failures:
- the worker running the coordinator dies: Dask runs the task again on another worker, as it
  reruns any task whose worker died; the new run finds its attempt already ``running`` in
  ``status.json`` and *restarts* the job there from its last checkpoint (the kind's
  ``resume_options``; from the start if nothing was written yet), at most :data:`MAX_RESTARTS`
  times per attempt, each one a line in the job's log and counted in its status
  (``restarts``, ``restarted_from``); past that it records ``failed`` with the reason and the
  resume command.
- the scheduler goes away: the coordinator's calls fail; it records ``failed`` (lost the
  scheduler) in its files, which, like the checkpoints, are already on disk.
- two coordinators of one job (two ``convpipe resume`` of it at once, or Dask rerunning a
  coordinator that still runs): the coordinator holds the job's ``owner.json``
  (:class:`pipeline.procs.OwnerLock`) from before it records ``running`` until it has recorded
  how the job ended; a second one finds it held by a live process, logs a line and returns
  without touching the job's status. A preflight for a new attempt of a job that a live
  coordinator runs refuses it in one line naming that coordinator (it never writes ``queued``
  over a running job's status). A coordinator known to have ended (Dask reran its task; the
  scheduler saw its worker leave: ``gone``) is taken over even from another host.
- a cancel request (an event on the job's topic): :meth:`Report.check_cancel`, called from the
  progress callback between steps (at most once a second), raises :class:`JobCancelled`; the
  job records ``cancelled``; a job still queued stops as it starts.
- SIGTERM to the worker process, or the worker closing (``docker stop``): the progress callback
  raises :class:`pipeline.jobs.interrupt.Interrupted` at the next step; the job records
  ``failed`` (interrupted, resumable), then the process ends (:mod:`pipeline.jobs.interrupt`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
import traceback
import uuid
from pathlib import Path

from distributed import get_worker, worker_client

from pipeline.atomic import atomic_write_text
from pipeline.cluster import cancelled_by_lost_scheduler, connection_lost
from pipeline.curves import count_text
from pipeline.errors import ConvpipeError
from pipeline.jobs import interrupt
from pipeline.jobs.kinds import KINDS, job_holder
from pipeline.jobs.records import (
    TERMINAL,
    JobError,
    JobFileError,
    JobFiles,
    job_topic,
    jsonable,
    log_line,
    new_job_id,
    now_iso,
    result_text,
    task_key,
    topic_events,
)
from pipeline.jobs.spec import JobSpec
from pipeline.procs import LockHeld, Owner, OwnerLock
from pipeline.training.rundir import RunDir

#: at most one progress line per this many seconds in the job's log (epochs always)
PROGRESS_EVERY_S = 5.0
#: progress events that always make a log line (steps and chunks are thinned out)
ALWAYS_LOGGED = (
    "start",
    "resumed",
    "warning",
    "workers",
    "epoch",
    "checkpoint",
    "scored",
    "rung",
)
#: how often the coordinator looks for a cancel request
CANCEL_CHECK_EVERY_S = 1.0
#: how many times one attempt of a job restarts itself after the worker running its coordinator
#: died (Dask gives up on a task whose workers died ``distributed.scheduler.allowed-failures``
#: = 3 times: a bound below that, so the job's files, not Dask, say why it stopped)
MAX_RESTARTS = 2


class JobCancelled(Exception):
    """Raised inside a running job when a cancel request arrives."""


class Report:
    """A running job's voice: log lines and states, to its files and to the scheduler."""

    def __init__(self, record: dict, client=None, status: dict | None = None):
        self.record = record
        self.client = client
        self.files = JobFiles(record["job_dir"])
        self.topic = job_topic(record["job"])
        self.status = status if status is not None else (self.files.read_status() or {})
        self._last_progress = 0.0
        self._last_cancel_check = 0.0
        self._lock = threading.Lock()
        self._noted: set[str] = set()
        self.stop = None  # the job's interrupt.Stop while it runs on a worker

    # ---- output -------------------------------------------------------------------------------
    def _event(self, msg: dict) -> None:
        """The same record to the scheduler (the files already have it)."""
        msg = {
            "id": uuid.uuid4().hex[:12],
            "job": self.record["job"],
            "attempt": self.record["attempt"],
            **msg,
        }
        try:
            worker = get_worker()
        except (
            ValueError
        ):  # not on a worker (a kind's run called directly): the files are the record
            return
        try:
            worker.log_event(self.topic, msg)
        except (
            RuntimeError
        ) as exc:  # the worker's event loop is closed: the worker is shutting down
            self._note_once(
                "events", f"the worker is closing: no more events to the scheduler ({exc})"
            )
        except Exception as exc:  # noqa: BLE001 - say what it was; the job and its files go on
            self._note_once(
                "events",
                f"an event could not go to the scheduler ({type(exc).__name__}: {exc}); "
                f"the job's files keep everything",
            )

    def _note_once(self, what: str, text: str) -> None:
        """A line in the job's log file about a problem of its bookkeeping,
        once per kind of problem."""
        if what not in self._noted:
            self._noted.add(what)
            with self._lock:
                self.files.append_log(log_line(text))

    def log(self, text: str) -> None:
        line = log_line(text)
        with self._lock:
            self.files.append_log(line)
        self._event({"type": "log", "line": line})

    def state(self, state: str, text: str | None = None, **info) -> dict:
        status = {
            **self.status,
            **info,
            "state": state,
            "attempt": self.record["attempt"],
            "updated": now_iso(),
        }
        if state == "running":
            status["started"] = now_iso()
        if state in TERMINAL:
            status["finished"] = now_iso()
        self.status = status
        with self._lock:
            self.files.write_status(status)
        self._event({"type": "state", **jsonable(status)})
        if text:
            self.log(text)
        return status

    # ---- progress and cancellation ---------------------------------------------------------------
    def progress(self, info=None, /, **kw) -> None:
        """The kind's progress callback: a dict (or keywords) of step, epoch, loss, ...

        Between steps it is also where a job stops: after recording this event it raises
        :class:`JobCancelled` on a cancel request, or ``Interrupted`` when its worker is ending.
        """
        if isinstance(info, dict):
            kw = {**info, **kw}
        elif info is not None:
            kw = {"message": str(info), **kw}
        event = kw.get("event") or kw.get("kind")
        if event == "done":
            return  # the job's own "done" line gives the result
        if event == "waiting":  # the run waits for a step: a stop or cancel request goes first
            if self.stop is not None:
                self.stop.check()
            self.check_cancel()
            return
        now = time.monotonic()
        finished = kw.get("total") is not None and kw.get("done") == kw.get("total")
        if event in ALWAYS_LOGGED or finished or now - self._last_progress >= PROGRESS_EVERY_S:
            self._last_progress = now
            self.status["progress"] = jsonable({k: v for k, v in kw.items() if _plain(v)})
            with self._lock:
                self.files.write_status({**self.status, "updated": now_iso()})
            self.log(format_progress(kw))
        if self.stop is not None:
            self.stop.check()
        self.check_cancel()

    def check_cancel(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.client is None or (
            not force and now - self._last_cancel_check < CANCEL_CHECK_EVERY_S
        ):
            return
        self._last_cancel_check = now
        try:
            found = topic_events(self.client, self.topic)
        except (
            OSError
        ):  # the scheduler is unreachable (CommClosedError, timeouts): the job's next call says so
            return
        except Exception as exc:  # noqa: BLE001 - say what it was; the job goes on
            self._note_once(
                "cancel",
                f"cannot check for a cancel request ({type(exc).__name__}: {exc}); the job goes on",
            )
            return
        for msg in found:
            if msg.get("type") == "cancel" and msg.get("attempt") == self.record["attempt"]:
                raise JobCancelled(
                    f"cancelled by {msg.get('by', 'a client')} at {msg.get('at', '?')}"
                )


def format_progress(p: dict) -> str:
    """One log line from a progress record (training: start/step/epoch/checkpoint; data: stages)."""
    event = p.get("event") or p.get("kind")
    if p.get("message") and event in (None, "warning", "workers", "scored", "rung"):  # as they are
        return ("warning: " if event == "warning" else "") + str(p["message"])
    if event == "start" and "total_steps" in p:
        return (
            f"start: step {p.get('start_step', 0)}/{p['total_steps']}, "
            f"{count_text(p.get('epochs'), 'epoch')}, {count_text(p.get('workers'), 'worker')}, "
            f"batch {p.get('batch_size')}, transport {p.get('transport')}, run directory "
            f"{p.get('run_dir')}"
        )
    if event == "resumed":
        return (
            f"resumed at step {p.get('step')} from "
            f"{p.get('checkpoint') or 'the start (no checkpoint yet)'}"
        )
    if event == "checkpoint":
        return f"checkpoint at step {p.get('step')}: {p.get('path')}"
    parts = []
    if event and event not in ("step", "epoch"):
        parts.append(str(event))
    if "done" in p and "total" in p:
        parts.append(f"{p['done']}/{p['total']}")
    if "epoch" in p:
        epoch = p["epoch"]  # an eval line's is fractional (0.7916...): two decimals
        if isinstance(epoch, float) and not epoch.is_integer():
            epoch = f"{epoch:.2f}"
        elif isinstance(epoch, float):
            epoch = int(epoch)
        parts.append(f"epoch {epoch}" + (f"/{p['epochs']}" if p.get("epochs") else ""))
    if "step" in p and event != "epoch":
        total = p.get("total_steps")
        parts.append(f"step {p['step']}" + (f"/{total}" if total else ""))
    for key, fmt in (
        ("loss", "loss {:.4f}"),
        ("train_acc", "train_acc {:.4f}"),
        ("val_acc", "val_acc {:.4f}"),
        ("test_acc", "test_acc {:.4f}"),
        ("accuracy", "accuracy {:.4f}"),
        ("images_per_s", "{:.0f} images/s"),
    ):
        if isinstance(p.get(key), (int, float)):
            parts.append(fmt.format(p[key]))
    if isinstance(p.get("workers"), int):
        parts.append(count_text(p["workers"], "worker"))
    return " ".join(parts) if parts else str(event or "progress")


def _plain(v) -> bool:
    return isinstance(v, (str, int, float, bool)) or v is None


def preflight_job(
    spec: dict, job_id: str, attempt: int, by: str, drawn: bool = False, gone: dict | None = None
) -> dict:
    """On a worker: resolve and check the spec where it will run, create the job's directory.

    The first attempt creates ``ROOT/jobs/<job_id>`` exclusively, never entering a directory
    that exists (another job's): a ``drawn`` id (:func:`~pipeline.jobs.records.new_job_id`) that
    is taken is drawn again, and the record has the id the job got; an id chosen by the caller
    that is taken is an error. Later attempts (resume) continue the job's directory, unless a
    live coordinator runs the job (its ``owner.json``): refused, naming it. A run directory that
    a live process trains in (its ``owner.json``) is refused for any attempt. ``gone``: the
    previous coordinator (``host``, ``pid_namespace``, ``pid``) when the scheduler saw its worker
    leave; its locks count as released, and the record passes it on to the job.

    Returns ``{"record": record}`` (id, attempt, kind, name, absolute root/job_dir/run_dir,
    options), or ``{"error": exc}`` for a user error (a missing store, a run directory in use):
    returned, not raised, so that the worker does not log a mistake in a spec as a failed task
    (a "Compute Failed" traceback on the terminal of an embedded cluster). The client raises it.
    """
    try:
        return {"record": _preflight(spec, job_id, attempt, by, drawn, gone)}
    except ConvpipeError as exc:
        return {"error": exc}


#: how many ids a first attempt draws before it gives up (each clash has odds of 2**-64)
MAX_ID_DRAWS = 5


def _claim_job_dir(root: str, job_id: str, kind: str, drawn: bool) -> JobFiles:
    """A new job's directory, created exclusively (a drawn id that is taken is drawn again)."""
    files = JobFiles.of(root, job_id)
    try:
        files.dir.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(MAX_ID_DRAWS):
            try:
                files.dir.mkdir()
                return files
            except FileExistsError:
                if not drawn:
                    raise JobError(
                        f"job id {job_id}: expected a new job, but {files.dir} exists (another "
                        "job's directory); choose another id"
                    ) from None
                files = JobFiles.of(root, new_job_id(kind))
    except OSError as exc:
        raise JobError(
            f"cannot create the job's directory {files.dir} on the data root: {exc.strerror or exc}"
        ) from None
    raise JobError(
        f"{files.dir.parent}: expected a free job id, got {MAX_ID_DRAWS} taken ones in a row "
        "(is the random source broken?)"
    )


def _preflight(
    spec: dict, job_id: str, attempt: int, by: str, drawn: bool = False, gone: dict | None = None
) -> dict:
    js = JobSpec.from_dict(spec)
    root = os.path.abspath(os.path.expanduser(js.root))
    kind = KINDS[js.kind]
    if attempt > 1:  # a resumed job continues its directory
        files = JobFiles.of(root, job_id)
        _check_not_running(files, job_id, Owner.from_record(gone))
    else:
        files = _claim_job_dir(root, job_id, js.kind, drawn)
        job_id = files.dir.name
    try:
        options = kind.preflight(js.options, root, job_id)
        run_dir = kind.run_dir(options)
        if run_dir and hasattr(kind, "resume_options"):  # a kind that trains in its run directory
            RunDir(run_dir).check_free(Owner.from_record(gone))
    except BaseException:
        if attempt == 1:
            with contextlib.suppress(OSError):  # still empty: a refused spec leaves no job
                files.dir.rmdir()
        raise
    record = {
        "job": job_id,
        "attempt": attempt,
        "kind": js.kind,
        "name": js.name,
        "root": root,
        "job_dir": str(files.dir),
        "run_dir": run_dir,
        "options": options,
        "submitted": now_iso(),
        "by": by,
        "source": js.source,
        "key": task_key(job_id, attempt),
    }
    if gone is not None:
        record["gone"] = gone
    try:
        files.dir.mkdir(parents=True, exist_ok=True)  # a resumed job's, if it was removed
        js.options = options
        js.root = root
        files.write_record(record, js.to_toml())
    except OSError as exc:
        raise JobError(
            f"cannot write the job's directory {files.dir} on the data root: {exc.strerror or exc}"
        ) from None
    status = {
        k: record[k]
        for k in ("job", "kind", "name", "root", "job_dir", "run_dir", "submitted", "by")
    }
    previous = files.read_status() or {}
    status.update(
        {
            "state": "queued",
            "attempt": attempt,
            "updated": now_iso(),
            "key": record["key"],
            "history": previous.get("history", []),
        }
    )
    if previous.get("state"):
        status["history"] = status["history"] + [
            {
                k: previous.get(k)
                for k in ("attempt", "state", "reason", "worker", "started", "finished")
            }
        ]
    files.write_status(status)
    verb = "resumed" if attempt > 1 else "submitted"
    files.append_log(
        log_line(
            f"{verb} by {by} (attempt {attempt}): {js.kind} job {js.name!r}, "
            f"run directory {record['run_dir']}"
        )
    )
    return record


def _check_not_running(files: JobFiles, job_id: str, gone: Owner | None) -> None:
    """A one-line :class:`JobError` naming the coordinator if a live one runs the job."""
    try:
        holder = OwnerLock(files.owner_path, "").holder(gone)
    except OSError as exc:
        raise JobError(f"cannot read {files.owner_path}: {exc.strerror or exc}") from None
    if holder is not None:
        raise JobError(
            f"job {job_id} is running: its coordinator is {holder.text()}; wait for it or "
            f"cancel it: convpipe cancel {job_id}"
        )


def run_job(record: dict) -> dict:
    """The job's coordinator, on a worker (queued by :func:`pipeline.jobs.client.submit`);
    its final status."""
    worker = get_worker()
    try:
        report = Report(record)
    except (
        JobFileError
    ) as exc:  # status.json was damaged while the job was queued: say so in a new one
        known = {k: record.get(k) for k in ("job", "kind", "name", "root", "job_dir", "run_dir")}
        return Report(record, status=known).state(
            "failed", f"failed: {exc}", reason=str(exc), resumable=True
        )
    current = report.status
    restarting = current.get("attempt") == record["attempt"] and current.get("state") == "running"
    if not restarting and (
        current.get("attempt") != record["attempt"] or current.get("state") != "queued"
    ):
        # this attempt already ended, or a later attempt superseded it (a task Dask kept
        # around for a worker that never came back): nothing to run
        return current
    # a coordinator known to have ended: the one whose task Dask reran (its worker died), or
    # the one whose worker the scheduler saw leave before this attempt was resumed
    gone = Owner.from_record(current if restarting else record.get("gone"))
    owner = OwnerLock(report.files.owner_path, job_holder(record))
    try:
        owner.acquire(gone)
    except LockHeld as exc:  # a live coordinator runs the job: its status stays as it is
        report.files.append_log(
            log_line(
                f"a second coordinator of attempt {record['attempt']} on worker "
                f"{worker.address} did not start: the job is run by {exc.holder.text()}"
            )
        )
        return current
    except OSError as exc:
        reason = f"cannot take {owner.path}: {exc.strerror or exc}"
        return report.state("failed", f"failed: {reason}", reason=reason, resumable=True)
    with owner:
        return _run_attempt(report, record, worker, restarting, gone)


def _run_attempt(report: Report, record: dict, worker, restarting: bool, gone) -> dict:
    """The job's attempt, which this coordinator owns (the job's ``owner.json``); its final
    status. ``restarting``: the attempt's previous coordinator died (``gone``, if its status
    names it): continue its run directory."""
    current = report.status
    if restarting:
        # Dask reran the coordinator's task: the worker that ran it died (or left the cluster)
        prev = current.get("worker", "?")
        died = (
            f"the worker running the coordinator ({prev}, pid {current.get('pid')} on "
            f"{current.get('host')}) died"
        )
        restarts = int(current.get("restarts") or 0)
        if restarts >= MAX_RESTARTS:
            return report.state(
                "failed",
                f"failed: {died}, after {restarts} restart(s) (at most {MAX_RESTARTS}); "
                f"resume with: convpipe resume {record['job']}",
                reason=f"the worker running its coordinator ({prev}) died or left the cluster, "
                f"after {restarts} restart(s)",
                resumable=True,
            )
        record = restart_record(record)
        if gone is not None:  # its hold on the run directory is taken over
            record = {**record, "gone": gone.record()}
        report.record = record
        report.status["restarts"] = restarts + 1
        report.status["restarted_from"] = prev
        report.log(
            f"{died}; restarting on worker {worker.address} from the last checkpoint "
            f"(restart {restarts + 1} of at most {MAX_RESTARTS})"
        )

    with worker_client() as client, interrupt.guard(worker) as stop:
        report.client, report.stop = client, stop
        try:
            report.check_cancel(force=True)
            stop.check()
            me = Owner.me()
            report.state(
                "running",
                f"running on worker {worker.address} (pid {me.pid} on {me.host})",
                worker=worker.address,
                pid=me.pid,
                host=me.host,
                pid_namespace=me.namespace,
                reason=None,
            )
            result = KINDS[record["kind"]].run(record["options"], client, report)
        except JobCancelled as exc:
            return report.state("cancelled", f"cancelled: {exc}", reason=str(exc), resumable=True)
        except interrupt.Interrupted as exc:
            reason = f"interrupted: {exc}"
            return report.state(
                "failed",
                f"failed: {reason}; resume with: convpipe resume {record['job']}",
                reason=reason,
                resumable=True,
                interrupted=True,
            )
        except ConvpipeError as exc:  # resumable unless resuming cannot change it (SweepFailed)
            return report.state(
                "failed",
                f"failed: {exc}",
                reason=str(exc),
                resumable=getattr(exc, "resumable", True),
            )
        except BaseException as exc:  # noqa: BLE001 - anything the job raised, with its reason
            reason, lost = _failure(exc, client)
            if lost:  # a fault of the cluster, not of the job: one line, and how to go on
                return report.state(
                    "failed",
                    f"failed: {reason}; once a scheduler and workers run again: convpipe resume "
                    f"{record['job']} --root ROOT --scheduler ADDR",
                    reason=reason,
                    resumable=True,
                )
            for line in traceback.format_exc().rstrip().splitlines():
                report.files.append_log(log_line("  " + line))
            return report.state("failed", f"failed: {reason}", reason=reason, resumable=True)
        result = jsonable(result or {})
        try:
            atomic_write_text(
                report.files.dir / "result.json",
                json.dumps(result, indent=2, sort_keys=True) + "\n",
            )
        except OSError as exc:  # the result is in status.json too
            report.log(f"result.json not written: {exc.strerror or exc}")
        return report.state("done", f"done: {_result_text(result)}", result=result, reason=None)


def restart_record(record: dict) -> dict:
    """The record a restarted coordinator runs: the same attempt, continuing its run directory.

    A kind that can resume (``resume_options``) continues from the last checkpoint once its run
    directory holds a run (a train job: ``config.json`` written); before that, and for kinds
    without ``resume_options`` (prepare, evaluate: they redo their work), the same options.
    """
    kind = KINDS[record["kind"]]
    resume = getattr(kind, "resume_options", None)
    run_dir = kind.run_dir(record["options"]) if resume is not None else None
    if not run_dir or not _holds_a_run(record["kind"], run_dir):
        return record
    return {**record, "options": resume(record["options"])}


def _holds_a_run(kind: str, run_dir: str) -> bool:
    path = Path(run_dir)
    if kind == "train":
        return (path / "config.json").exists()
    return path.is_dir() and any(path.iterdir())


def _failure_reason(exc: BaseException, client=None) -> str:
    return _failure(exc, client)[0]


def _failure(exc: BaseException, client=None) -> tuple[str, bool]:
    """The one-line reason a job failed with ``exc``, and whether it was the scheduler's loss."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    lost = connection_lost(exc) or cancelled_by_lost_scheduler(exc)
    # when the scheduler goes away, the client cancels every future it waits on and closes
    # (Dask's helpers then fail in their own ways: "No clients found"): whatever the exception,
    # it is the scheduler's loss if the scheduler no longer answers
    if not lost and client is not None:
        lost = not _scheduler_answers(client)
    if lost:
        return f"lost the connection to the Dask scheduler ({type(exc).__name__}: {first})", True
    return (f"{type(exc).__name__}: {first}" if first else type(exc).__name__), False


def _scheduler_answers(client, timeout: float = 5.0) -> bool:
    try:
        client.sync(lambda: asyncio.wait_for(client.scheduler.identity(), timeout))
    except Exception:  # noqa: BLE001 - any failure to get an answer means it is gone
        return False
    return True


def _result_text(result: dict | None) -> str:
    if not result:
        return "ok"
    return result_text(result)
