"""`convpipe submit / status / logs / cancel / resume / certs`: jobs on a Dask cluster.

    convpipe submit jobs/train-three-layer.toml --scheduler tcp://127.0.0.1:8786 --set epochs=2
    convpipe status [JOB]          convpipe logs JOB [--follow]
    convpipe cancel JOB            convpipe resume JOB

The scheduler is ``--scheduler``, else the spec's ``scheduler`` (submit), else
``$CONVPIPE_SCHEDULER``, else ``scheduler`` in convpipe's config file. Without one, ``submit``
runs the job on an embedded local cluster and follows it to the end (the cluster lives as long
as the command), and ``status``/``logs`` read the job files under ``--root`` (default ``data``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

from pipeline.cli.quiet import quiet
from pipeline.cluster import ClusterError, connect, worker_cluster
from pipeline.errors import ConvpipeError

SCHEDULER_ENV = "CONVPIPE_SCHEDULER"
POLL_S = 1.0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "submit",
        help="submit a job spec (TOML) to a Dask cluster and print its id",
        description="Validate a job spec, then run its coordinator on the cluster itself: the job "
        "goes on after this command exits. Prints the job id. Without a scheduler, runs the job "
        "on an embedded local cluster and follows it to the end.",
    )
    p.add_argument("spec", metavar="SPEC", help="job spec, e.g. jobs/train-three-layer.toml")
    _scheduler_arg(p)
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the spec (repeatable), e.g. --set epochs=2 --set norm=groupnorm",
    )
    p.add_argument("--follow", "-f", action="store_true", help="print the job's log until it ends")
    p.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="seconds to wait for the scheduler, a worker and the spec's checks (default 120)",
    )
    p.set_defaults(func=quiet(cmd_submit))

    p = subparsers.add_parser(
        "status",
        help="state of one job or of every job",
        description="State of JOB (or of every job the scheduler knows), with the reason "
        "of a failure and the command that resumes it.",
    )
    p.add_argument("job", metavar="JOB", nargs="?", help="job id (default: list every job)")
    _scheduler_arg(p)
    _root_arg(p)
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(func=quiet(cmd_status))

    p = subparsers.add_parser(
        "logs", help="a job's log", description="Print a job's log; --follow until it ends."
    )
    p.add_argument("job", metavar="JOB")
    _scheduler_arg(p)
    _root_arg(p)
    p.add_argument(
        "--follow", "-f", action="store_true", help="keep printing new lines until the job ends"
    )
    p.set_defaults(func=quiet(cmd_logs))

    p = subparsers.add_parser(
        "cancel",
        help="stop a queued or running job",
        description="Ask a job to stop: it stops between two steps and keeps its checkpoints.",
    )
    p.add_argument("job", metavar="JOB")
    _scheduler_arg(p)
    p.set_defaults(func=quiet(cmd_cancel))

    p = subparsers.add_parser(
        "resume",
        help="continue a failed or cancelled job from its last checkpoint",
        description="Queue the next attempt of a failed or cancelled job; a training job "
        "continues its run directory from the last checkpoint. Without a scheduler (--scheduler "
        "or $CONVPIPE_SCHEDULER) the job's files are read under --root (default: data) and the "
        "job runs on an embedded local cluster, followed until it ends, like an embedded "
        "`convpipe submit`.",
    )
    p.add_argument("job", metavar="JOB")
    _scheduler_arg(p)
    _root_arg(p)
    p.add_argument("--follow", "-f", action="store_true", help="print the job's log until it ends")
    p.add_argument(
        "--timeout", type=float, default=120.0, metavar="S", help="seconds to wait for the cluster"
    )
    p.set_defaults(func=quiet(cmd_resume))

    p = subparsers.add_parser(
        "certs",
        help="make a CA and TLS certificates for a private cluster",
        description="Write ca.pem and scheduler/worker/client certificates and keys to DIR "
        "(the folder the cluster's containers mount), and the CA's private key "
        "to DIR-ca/ca-key.pem, outside it (needs the 'cryptography' package).",
    )
    p.add_argument("dir", metavar="DIR")
    p.add_argument(
        "--ca-dir",
        metavar="PRIVATE_DIR",
        default=None,
        help="where the CA's private key goes (default: DIR-ca, beside DIR; never inside DIR)",
    )
    p.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name or IP the certificates are for (repeatable; default localhost, "
        "127.0.0.1, scheduler)",
    )
    p.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    p.set_defaults(func=cmd_certs)


def _scheduler_arg(p) -> None:
    p.add_argument(
        "--scheduler",
        metavar="ADDR",
        help="Dask scheduler, e.g. tcp://127.0.0.1:8786 or tls://host:8786 (default: "
        f"${SCHEDULER_ENV})",
    )
    if p.prog.split()[-1] not in ("submit", "resume"):
        p.add_argument(
            "--timeout",
            type=float,
            default=10.0,
            metavar="S",
            help="seconds to wait for the scheduler (default 10)",
        )


def _root_arg(p) -> None:
    p.add_argument(
        "--root",
        metavar="DIR",
        default=None,
        help="read the job files under DIR/jobs directly, without a scheduler (default: data)",
    )


def scheduler_address(explicit: str | None, spec_value: str | None = None) -> str | None:
    if explicit:
        return explicit
    if spec_value:
        return spec_value
    if os.environ.get(SCHEDULER_ENV):
        return os.environ[SCHEDULER_ENV]
    from pipeline.cluster.security import read_config

    value = read_config().get("scheduler")
    return value if isinstance(value, str) and value else None


# ================================================================ submit


def cmd_submit(args) -> int:
    from pipeline.cluster.security import security_for
    from pipeline.jobs import client as job_client
    from pipeline.jobs.spec import load_spec

    spec = load_spec(args.spec, args.sets)
    address = scheduler_address(args.scheduler, spec.scheduler)
    if address is None:
        return _submit_embedded(spec, args)
    security = security_for(address, spec.tls)
    with connect(address, security=security, timeout=min(args.timeout, 30.0)) as client:
        with _lost_scheduler(address):
            record = job_client.submit(client, spec, timeout=args.timeout)
        print(record["job"], flush=True)
        if not args.follow:
            print(
                f"convpipe: {spec.kind} job queued on {address}; follow it with: convpipe logs "
                f"{record['job']} --follow --scheduler {address}",
                file=sys.stderr,
            )
            return 0
        return _follow(client, address, record["job"], record)


def _submit_embedded(spec, args) -> int:
    from pipeline.jobs import client as job_client

    cluster = _embedded_cluster(spec.options)
    spec.options["workers"] = None  # it sized the embedded cluster; the job runs on it
    with cluster as client:
        from pipeline.dashboard import page_link

        print(
            "convpipe: no scheduler given: running on an embedded local cluster "
            f"({client.dashboard_link}; jobs on the convpipe page "
            f"{page_link(client.dashboard_link)})",
            file=sys.stderr,
        )
        record = job_client.submit(client, spec, timeout=args.timeout)
        print(record["job"], flush=True)
        return _follow_embedded(client, record)


def _embedded_cluster(options: dict):
    """The embedded cluster, sized by a job's ``workers`` and ``threads-per-worker``."""
    return worker_cluster(
        None, None, options.get("workers"), options.get("threads_per_worker") or 1
    )


def _follow_embedded(client, record: dict) -> int:
    """Follow a job on the embedded cluster to its end; Ctrl-C cancels it (the cluster, and so
    the job, ends with this command): :func:`_stop_embedded_job`."""
    try:
        return _follow(client, "the embedded cluster", record["job"], record)
    except KeyboardInterrupt as exc:
        state = _stop_embedded_job(client, record["job"])
        if state != "done":  # how to go on, after "convpipe: interrupted" (pipeline.cli.main)
            exc.add_note(_how_to_go_on(record, state))
        raise


def _how_to_go_on(record: dict, state: str | None) -> str:
    """``; the job is cancelled; continue with: convpipe resume JOB`` (``--root`` where the
    job's data root is not the default one)."""
    root = record.get("root")
    where = "" if not root or os.path.abspath("data") == root else f" --root {root}"
    how = {"cancelled": "is cancelled", "failed": "failed"}.get(state, "stops with the cluster")
    return f"; the job {how}; continue with: convpipe resume {record['job']}{where}"


#: how long Ctrl-C waits for a job on the embedded cluster to stop (between two steps) before
#: the cluster closes under it
STOP_WAIT_S = 60.0
#: how often that wait asks the scheduler for the job's state
STOP_POLL_S = 0.2


def _stop_embedded_job(client, job_id: str, timeout: float = STOP_WAIT_S) -> str | None:
    """Cancel the job and wait until it has stopped, before the embedded cluster closes; the
    state it ended in (None if the wait was cut short: it stops with the cluster).

    The job stops between two steps, keeps its checkpoints and records ``cancelled`` (what
    `convpipe resume` continues). The cluster used to close as soon as the cancel was sent,
    under the running job: the job recorded "interrupted: its worker is closing" rather than
    "cancelled", and when its step in flight did not end within the 4 s its worker's nanny
    gives a closing worker (with the spec's own network, about every other time) the worker
    process was killed: the job recorded "died", and the named semaphore the killed process held
    (numcodecs' blosc lock, registered with the resource tracker the worker processes share with
    this one) made Python print "resource_tracker: There appear to be 1 leaked semaphore objects
    to clean up at shutdown" after "convpipe: interrupted".

    A second Ctrl-C stops the wait (the cluster then closes at once)."""
    from pipeline.jobs import client as job_client
    from pipeline.jobs.records import TERMINAL

    try:
        with contextlib.suppress(ConvpipeError):  # it ended meanwhile (JobError: already done)
            job_client.cancel(client, job_id)
        deadline = time.monotonic() + timeout
        while (state := job_client.job_status(client, job_id)["state"]) not in TERMINAL:
            if time.monotonic() > deadline:
                return None
            time.sleep(STOP_POLL_S)
        return state
    except (KeyboardInterrupt, ConvpipeError, OSError):
        # Ctrl-C again, the scheduler unreachable: nothing more to wait for, and the first
        # Ctrl-C is what the command reports
        return None


def _follow(client, address: str, job_id: str, record: dict | None = None) -> int:
    """Print the job's new log lines until it ends; exit code 0 if it is done, else 1."""
    from pipeline.jobs import client as job_client

    seen: set[str] = set()
    job_dir = (record or {}).get("job_dir") or f"ROOT/jobs/{job_id}"
    while True:
        with _lost_scheduler(address, job_id, job_dir):
            events = job_client.job_events(client, job_id)
            status = job_client.job_status(client, job_id, events)
        job_dir = status.get("job_dir", job_dir)
        for m in events:
            if m.get("type") == "log" and m.get("id") not in seen:
                seen.add(m.get("id"))
                print(m["line"], flush=True)
        if status["state"] in ("done", "failed", "cancelled"):
            return _final(status)
        time.sleep(POLL_S)


def _resumable(status: dict) -> bool:
    """A failed or cancelled job whose kind continues where it stopped (training)."""
    from pipeline.jobs.kinds import KINDS

    return bool(status.get("resumable")) and hasattr(
        KINDS.get(status.get("kind")), "resume_options"
    )


def _final(status: dict) -> int:
    if status["state"] == "done":
        return 0
    print(
        f"convpipe: job {status['job']} {status['state']}: {status.get('reason') or ''}".rstrip(
            ": "
        ),
        file=sys.stderr,
    )
    if _resumable(status):
        print(
            f"convpipe: continue it from its last checkpoint with: convpipe resume {status['job']}",
            file=sys.stderr,
        )
    return 1


class _lost_scheduler:
    """Turn a lost connection to the scheduler into one line that says what is kept where."""

    def __init__(self, address: str, job_id: str | None = None, job_dir: str | None = None):
        self.address, self.job_id, self.job_dir = address, job_id, job_dir

    def __enter__(self):
        return self

    def __exit__(self, tp, exc, tb):
        if exc is None or isinstance(exc, (ConvpipeError, KeyboardInterrupt)):
            return False
        if _is_connection_error(exc):
            msg = f"lost the Dask scheduler at {self.address} ({type(exc).__name__})"
            if self.job_id:
                msg += (
                    f"; job {self.job_id}'s status, log and checkpoints stay in {self.job_dir} on "
                    f"the data root: convpipe status {self.job_id} --root ROOT"
                )
            raise ClusterError(msg) from None
        return False


def _is_connection_error(exc: BaseException) -> bool:
    from pipeline.cluster import connection_lost

    if connection_lost(exc):
        return True
    text = str(exc)
    return "not running" in text or "closed" in text.lower() and "client" in text.lower()


# ================================================================ status / logs / cancel / resume


def _client_or_root(args):
    address = scheduler_address(args.scheduler)
    root = getattr(args, "root", None)
    if root is not None or address is None:
        return None, address, root or "data"
    return address, address, None


def _plain_job_id(args) -> None:
    """A job id on the command line is a plain id (one name, no path): JobError otherwise."""
    from pipeline.jobs.records import check_job_id

    if args.job is not None:
        check_job_id(args.job)


def cmd_status(args) -> int:
    from pipeline.jobs import client as job_client

    _plain_job_id(args)
    address, shown, root = _client_or_root(args)
    unreadable: list[str] = []
    if address is None:
        from pipeline.jobs.files_view import list_from_files, status_from_files

        if args.job:
            statuses = [status_from_files(root, args.job)]
        else:
            listing = list_from_files(root)
            statuses, unreadable = listing.jobs, listing.unreadable
        where = f"{os.path.abspath(root)}/jobs"
    else:
        with connect(address, timeout=args.timeout) as client, _lost_scheduler(address):
            statuses = (
                [job_client.job_status(client, args.job)]
                if args.job
                else job_client.list_jobs(client)
            )
        where = address
    if args.json:
        print(
            json.dumps(statuses[0] if args.job else statuses, indent=2, sort_keys=True, default=str)
        )
    elif args.job:
        _print_status(statuses[0], "" if address else f" --root {root}")
    elif not statuses:
        print(f"no jobs on {where}")
    else:
        _print_table(statuses)
    for problem in unreadable:  # after the jobs that could be read, one line each
        print(f"convpipe: error: {problem}", file=sys.stderr)
    return 2 if unreadable else 0


def _print_table(statuses: list[dict]) -> None:
    rows = [("JOB", "KIND", "NAME", "STATE", "DETAIL")]
    for s in statuses:
        rows.append(
            (
                s.get("job", "?"),
                s.get("kind", "?"),
                s.get("name", ""),
                s.get("state", "?"),
                _detail(s),
            )
        )
    widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])


def _detail(s: dict) -> str:
    if s.get("state") == "failed":
        return s.get("reason") or ""
    if s.get("state") == "cancelled":
        return (s.get("reason") or "cancelled") + _at_step(s.get("progress"))
    if s.get("state") == "done":
        from pipeline.jobs.records import result_text

        return result_text(s.get("result"), skip=("run_dir",)) or (s.get("run_dir") or "")
    if s.get("state") == "running":
        line = s.get("last_line", "")
        return line.split(" ", 1)[1] if " " in line else line
    if s.get("cancel_requested"):
        return "cancel requested"
    return s.get("task_state", "")


def _at_step(progress) -> str:
    """`` (step 40/100)``: the last step a job's progress record names, if it names one (a
    sweep's trials each have their own)."""
    p = progress if isinstance(progress, dict) else {}
    if p.get("step") is None or "trial" in p:
        return ""
    return f" (step {p['step']}" + (f"/{p['total_steps']})" if p.get("total_steps") else ")")


def _restarts(s: dict) -> str | None:
    """How often this attempt restarted itself after the worker running its coordinator died."""
    n = s.get("restarts")
    return f"{n} (after worker {s.get('restarted_from')} died)" if n else None


def _print_status(s: dict, resume_args: str = "") -> None:
    fields = [
        ("job", s.get("job")),
        ("kind", s.get("kind")),
        ("name", s.get("name")),
        (
            "state",
            s.get("state")
            + (
                " (cancel requested)"
                if s.get("cancel_requested")
                and s.get("state") not in ("done", "failed", "cancelled")
                else ""
            ),
        ),
        ("attempt", s.get("attempt")),
        ("restarts", _restarts(s)),
        ("reason", s.get("reason")),
        ("worker", s.get("worker")),
        ("submitted", f"{s.get('submitted')} by {s.get('by')}"),
        ("started", s.get("started")),
        ("finished", s.get("finished")),
        ("run dir", s.get("run_dir")),
        ("job dir", s.get("job_dir")),
        ("last line", s.get("last_line")),
    ]
    if s.get("result"):
        from pipeline.jobs.records import result_text

        fields.append(("result", result_text(s["result"])))
    for name, value in fields:
        if value not in (None, "", "None by None"):
            print(f"{name + ':':11}{value}")
    if s.get("state") in ("failed", "cancelled") and _resumable(s):
        print(f"{'resume:':11}convpipe resume {s.get('job')}{resume_args}")
    if s.get("kind") == "sweep":
        _print_leaderboard(s.get("run_dir"))


def _print_leaderboard(run_dir: str | None) -> None:
    """A sweep's leaderboard, from its sweep.json when this machine can read the run directory."""
    from pipeline.jobs.sweep import STATE_FILE, leaderboard_text

    if run_dir and os.path.exists(os.path.join(run_dir, STATE_FILE)):
        try:
            print("\n" + leaderboard_text(run_dir))
        except ConvpipeError as exc:
            print(f"leaderboard: {exc}")


def cmd_logs(args) -> int:
    from pipeline.jobs import client as job_client

    _plain_job_id(args)
    address, _, root = _client_or_root(args)
    if address is None:
        return _logs_from_files(root, args.job, args.follow)
    with connect(address, timeout=args.timeout) as client:
        if args.follow:
            return _follow(client, address, args.job)
        with _lost_scheduler(address):
            events = job_client.job_events(client, args.job)
            status = job_client.job_status(client, args.job, events)
        lines = [m for m in events if m.get("type") == "log"]
        if lines and _dropped(events):
            print(
                f"(older lines dropped from the scheduler's memory; the whole log is "
                f"{status.get('job_dir')}/job.log on the data root)"
            )
        for m in lines:
            print(m["line"])
    return 0


def _dropped(events: list[dict]) -> bool:
    """The scheduler keeps a bounded number of events per topic: is the first one gone?"""
    first = events[0] if events else None
    return first is None or first.get("type") != "state" or first.get("state") != "queued"


def _logs_from_files(root: str, job_id: str, follow: bool) -> int:
    from pipeline.jobs.files_view import status_from_files
    from pipeline.jobs.records import JobFiles

    status = status_from_files(root, job_id)  # JobError if unknown
    files = JobFiles.existing(root, job_id)
    offset = 0
    while True:
        text, offset = files.read_log(offset)
        if text:
            print(text, end="", flush=True)
        if not follow or status["state"] in ("done", "failed", "cancelled"):
            return _final(status) if follow else 0
        time.sleep(POLL_S)
        status = status_from_files(root, job_id)


def cmd_cancel(args) -> int:
    from pipeline.jobs import client as job_client

    _plain_job_id(args)
    address = scheduler_address(args.scheduler)
    if address is None:
        raise ClusterError(
            f"cancel needs the job's scheduler: --scheduler ADDR or ${SCHEDULER_ENV}"
        )
    with connect(address, timeout=args.timeout) as client, _lost_scheduler(address):
        status = job_client.cancel(client, args.job)
    print(f"cancel requested for job {args.job} ({status['state']}); it stops before its next step")
    return 0


def cmd_resume(args) -> int:
    from pipeline.jobs import client as job_client
    from pipeline.jobs.files_view import status_from_files
    from pipeline.jobs.records import JobFiles

    _plain_job_id(args)
    address = scheduler_address(args.scheduler)
    record = None
    if address is None or args.root is not None:
        root = args.root if args.root is not None else "data"
        status = status_from_files(root, args.job)
        if status["state"] not in ("failed", "cancelled"):
            raise job_client.JobError(
                f"job {args.job} is {status['state']} according to {status.get('job_dir')}: only a "
                f"failed or cancelled job can be resumed"
            )
        record = JobFiles.existing(root, args.job).read_record()
        if record is None:
            raise job_client.JobError(f"job {args.job} has no spec.json under {root}/jobs")
        record["attempt"] = max(int(record["attempt"]), int(status.get("attempt", 1)))
    if address is None:
        return _resume_embedded(record, args)
    with connect(address, timeout=args.timeout) as client:
        with _lost_scheduler(address):
            new = job_client.resume(client, args.job, record, timeout=args.timeout)
        _queued_again(new)
        if args.follow:
            return _follow(client, address, new["job"], new)
    return 0


def _queued_again(new: dict) -> None:
    print(new["job"], flush=True)
    print(
        f"convpipe: job {new['job']} queued again (attempt {new['attempt']}), continuing "
        f"{new['run_dir']}",
        file=sys.stderr,
    )


def _resume_embedded(record: dict, args) -> int:
    """A job with no scheduler to go back to (submitted to the embedded cluster, which ended with
    the command): start the embedded cluster again, as `convpipe submit` did, and follow the job
    there until it ends."""
    from pipeline.jobs import client as job_client

    with _embedded_cluster(record["options"]) as client:
        print(
            f"convpipe: no scheduler given: resuming job {args.job} on an embedded local cluster",
            file=sys.stderr,
        )
        new = job_client.resume(client, args.job, record, timeout=args.timeout)
        _queued_again(new)
        return _follow_embedded(client, new)


def cmd_certs(args) -> int:
    from pipeline.cluster.security import make_certificates

    hosts = tuple(args.host) or ("localhost", "127.0.0.1", "scheduler")
    paths = make_certificates(args.dir, ca_dir=args.ca_dir, hosts=hosts, days=args.days)
    for name, path in paths.items():
        print(f"{name:14} {path}")
    print(
        "clients use ca.pem, client.pem and client-key.pem: export "
        f"CONVPIPE_TLS_CA_FILE={paths['ca']} CONVPIPE_TLS_CERT={paths['client']} "
        f"CONVPIPE_TLS_KEY={paths['client-key']}"
    )
    print(f"keep {paths['ca-key']} private (it signs new certificates); the cluster never needs it")
    stale = os.path.join(args.dir, "ca-key.pem")
    if os.path.exists(stale):
        print(
            f"convpipe: warning: {stale} (a CA key from an earlier `convpipe certs`) is in the "
            "folder the containers mount; it signs nothing the new ca.pem trusts: delete it",
            file=sys.stderr,
        )
    return 0
