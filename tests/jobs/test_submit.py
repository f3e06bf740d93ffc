"""The job machinery on an in-process cluster: submit, status, logs, cancel, resume, failures.

The jobs here are of the trivial kind ``count`` (tests/helpers/jobs.py), which submits tasks
to the cluster from its coordinator like training does; training jobs themselves run in
tests/cluster/test_compose_topology.py against real scheduler and worker processes.
"""

from __future__ import annotations

import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple
from pathlib import Path

import dask
import pytest
from distributed import Client

from pipeline.cli import main
from pipeline.cluster import worker_addresses
from pipeline.errors import DataError
from pipeline.jobs import client as job_client
from pipeline.jobs.records import REGISTRY_TOPIC, JobFiles, job_topic, log_line, now_iso
from pipeline.jobs.runner import run_job
from pipeline.jobs.spec import spec_from_table
from pipeline.procs import Owner
from tests.helpers.cluster import local_cluster
from tests.helpers.jobs import ran_at_the_same_time, wait_for, wait_gate
from tests.helpers.wait import wait_until

# the `count` kind for each test (tests/jobs/conftest.py); the clusters here (the module's
# `cluster` and `client` of tests/conftest.py, or their own) run their workers in this process
pytestmark = pytest.mark.usefixtures("count_kind")


def count_spec(root: Path, **options):
    return spec_from_table({"job": "count", "root": str(root), **options}, default_name="count")


def log_lines(client, job_id: str) -> list[str]:
    return [m["line"] for m in job_client.job_events(client, job_id) if m.get("type") == "log"]


def test_a_job_runs_on_the_cluster_and_leaves_its_record(client, tmp_path):
    rec = job_client.submit(client, count_spec(tmp_path, steps=4, label="a"))
    status = wait_for(client, rec["job"])
    assert status["state"] == "done", status
    assert status["result"] == {"steps": 4, "run_dir": rec["run_dir"]}
    assert Path(rec["run_dir"]) == tmp_path / "runs" / rec["job"]
    assert (Path(rec["run_dir"]) / "counts.txt").read_text().splitlines() == [
        f"a {i} {i * i}" for i in range(1, 5)
    ]
    # the same record on the data root as on the scheduler
    files = JobFiles.of(tmp_path, rec["job"])
    on_disk = files.read_status()
    assert on_disk["state"] == "done" and on_disk["result"] == status["result"]
    assert on_disk["worker"] == status["worker"] and on_disk["worker"] in worker_addresses(client)
    assert (on_disk["host"], on_disk["pid_namespace"], on_disk["pid"]) == astuple(
        Owner.me()
    )  # in-process workers
    assert json.loads((files.dir / "result.json").read_text()) == status["result"]
    assert 'job = "count"' in files.spec_path.read_text()
    file_lines = files.read_log()[0].splitlines()
    events = log_lines(client, rec["job"])
    assert [l.split(" ", 1)[1] for l in file_lines[1:]] == [l.split(" ", 1)[1] for l in events[1:]]
    assert "running on worker" in events[1] and events[-1].split(" ", 1)[1].startswith(
        "done: steps 4"
    )
    # the registry lists it
    assert rec["job"] in [s["job"] for s in job_client.list_jobs(client)]


def test_the_coordinator_secedes_so_a_one_thread_worker_runs_its_tasks(tmp_path):
    with (
        local_cluster(1) as c,
        Client(c) as client,
    ):
        rec = job_client.submit(client, count_spec(tmp_path, steps=3))
        assert wait_for(client, rec["job"], timeout=20)["state"] == "done"


def test_two_jobs_at_once_do_not_mix_outputs_or_logs(client, tmp_path):
    a = job_client.submit(client, count_spec(tmp_path, steps=6, step_s=0.05, label="alpha"))
    b = job_client.submit(client, count_spec(tmp_path, steps=4, step_s=0.08, label="beta"))
    assert a["job"] != b["job"] and a["run_dir"] != b["run_dir"] and a["job_dir"] != b["job_dir"]
    sa, sb = wait_for(client, a["job"]), wait_for(client, b["job"])
    assert sa["state"] == sb["state"] == "done"
    # both ran at the same time: each started before the other ended (scheduler arrival order)
    assert ran_at_the_same_time(client, a["job"], b["job"])
    ca = (Path(a["run_dir"]) / "counts.txt").read_text().splitlines()
    cb = (Path(b["run_dir"]) / "counts.txt").read_text().splitlines()
    assert ca == [f"alpha {i} {i * i}" for i in range(1, 7)]
    assert cb == [f"beta {i} {i * i}" for i in range(1, 5)]
    for rec, other in ((a, b), (b, a)):
        text = Path(rec["job_dir"], "job.log").read_text()
        assert other["job"] not in text and other["run_dir"] not in text
        assert all(other["job"] not in line for line in log_lines(client, rec["job"]))
    assert {s["job"] for s in job_client.list_jobs(client)} >= {a["job"], b["job"]}


def test_cancel_a_running_job_then_resume_it(client, tmp_path):
    rec = job_client.submit(client, count_spec(tmp_path, steps=40, step_s=0.05))
    wait_for(client, rec["job"], states=("running",))
    counts = Path(rec["run_dir"]) / "counts.txt"
    wait_until(counts.exists, what="the first step")
    job_client.cancel(client, rec["job"])
    status = wait_for(client, rec["job"])
    assert status["state"] == "cancelled" and status["resumable"]
    assert "cancelled by" in status["reason"]
    done_before = len(counts.read_text().splitlines())
    assert 1 <= done_before < 40
    with pytest.raises(job_client.JobError, match="already cancelled"):
        job_client.cancel(client, rec["job"])

    again = job_client.resume(client, rec["job"])
    assert (
        again["job"] == rec["job"] and again["attempt"] == 2 and again["run_dir"] == rec["run_dir"]
    )
    status = wait_for(client, rec["job"])
    assert status["state"] == "done" and status["attempt"] == 2, status.get("reason")
    lines = counts.read_text().splitlines()
    assert lines == [f"x {i} {i * i}" for i in range(1, 41)]  # continued, nothing counted twice
    on_disk = JobFiles.of(tmp_path, rec["job"]).read_status()
    assert on_disk["state"] == "done" and on_disk["history"][-1]["state"] == "cancelled"
    assert any("resumed by" in line for line in log_lines(client, rec["job"]))


def test_a_running_job_never_reads_as_dead_while_the_clients_cache_refreshes(cluster, tmp_path):
    """Client.scheduler_info() returns the client's cached identity, which its periodic refresh
    (fetched without per-worker entries) can overwrite between the fetch and the return. A status
    taken then read a live job as "the worker running its coordinator died or left the cluster"
    (CI, 2026-11-30). Here the refresh runs every 5 ms while the status is asked 400 times."""
    with (
        dask.config.set({"distributed.client.scheduler-info-interval": "5ms"}),
        Client(cluster) as client,
    ):
        rec = job_client.submit(client, count_spec(tmp_path, steps=100_000, step_s=0.001))
        wait_for(client, rec["job"], states=("running",))
        seen = [job_client.job_status(client, rec["job"]) for _ in range(400)]
        addresses = [worker_addresses(client) for _ in range(400)]
        job_client.cancel(client, rec["job"])
        assert wait_for(client, rec["job"])["state"] == "cancelled"
    assert {s["state"] for s in seen} == {"running"}, next(
        s for s in seen if s["state"] != "running"
    )
    assert all(sorted(a) == sorted(cluster.scheduler.workers) for a in addresses)


def test_a_cancelled_queued_job_never_runs(tmp_path):
    from distributed import Event

    with (
        local_cluster(1) as c,
        Client(c) as client,
    ):
        # the only thread is held by `first`; the preflight (top priority) runs next, then `later`
        # (priority 10) holds the thread while the job (priority 0) waits in the queue
        first = client.submit(wait_gate, "first", pure=False)
        later = client.submit(wait_gate, "later", pure=False, priority=10)
        job_id = "count-queued-1"
        submitting = ThreadPoolExecutor(1).submit(
            job_client.submit, client, count_spec(tmp_path, steps=2), job_id=job_id
        )
        preflight = f"convpipe-preflight-{job_id}-1"
        # queued on the worker itself, not only sent: the scheduler calls a task "processing"
        # while its message may still be on the way, and `later` would take the thread first
        wait_until(
            lambda: worker_task_state(client, preflight) == "ready",
            what="the preflight queued on the worker",
        )
        Event("first", client=client).set()
        rec = submitting.result(timeout=60)
        assert job_client.job_status(client, job_id)["state"] == "queued"
        assert task_state(client, rec["key"]) in ("waiting", "queued", "processing")
        job_client.cancel(client, job_id)
        assert job_client.job_status(client, job_id)["cancel_requested"]
        Event("later", client=client).set()
        status = wait_for(client, job_id)
        assert first.result() and later.result()
        assert status["state"] == "cancelled"
        assert not (Path(rec["run_dir"]) / "counts.txt").exists()


def worker_task_state(client, key: str) -> str | None:
    """The task's state on the (one) worker: "ready" once it waits there for a thread."""

    def state(dask_worker=None, key=key):
        ts = dask_worker.state.tasks.get(key)
        return None if ts is None else ts.state

    (found,) = client.run(state).values()
    return found


def task_state(client, key: str) -> str | None:
    def state(dask_scheduler=None, key=key):
        ts = dask_scheduler.tasks.get(key)
        return None if ts is None else ts.state

    return client.run_on_scheduler(state)


def test_a_failing_job_is_failed_with_its_reason(client, tmp_path):
    rec = job_client.submit(client, count_spec(tmp_path, steps=5, fail_at=3))
    status = wait_for(client, rec["job"])
    assert status["state"] == "failed"
    assert status["reason"] == "loss is NaN at step 3"
    assert JobFiles.of(tmp_path, rec["job"]).read_status()["reason"] == "loss is NaN at step 3"
    assert len((Path(rec["run_dir"]) / "counts.txt").read_text().splitlines()) == 2


def test_a_job_whose_worker_left_is_reported_failed(client, tmp_path):
    """The scheduler has the job as running on a worker that is no longer in the cluster."""
    job_id = "count-19990101-000000-dead"
    gone = "tcp://127.0.0.1:1"
    client.log_event(
        REGISTRY_TOPIC,
        {
            "type": "submitted",
            "job": job_id,
            "kind": "count",
            "name": "c",
            "attempt": 1,
            "key": f"convpipe-job-{job_id}-1",
            "options": {},
            "root": str(tmp_path),
            "job_dir": "d",
            "run_dir": "r",
            "by": "me",
        },
    )
    client.log_event(
        job_topic(job_id),
        {
            "id": "1",
            "type": "state",
            "job": job_id,
            "attempt": 1,
            "state": "running",
            "worker": gone,
            "pid": 4242,
            "host": "h",
            "updated": now_iso(),
        },
    )
    status = job_client.job_status(client, job_id)
    assert status["state"] == "failed" and status["resumable"]
    assert (
        status["reason"]
        == f"the worker running its coordinator ({gone}, pid 4242 on h) died or left the cluster"
    )


def test_dask_rerunning_a_dead_coordinator_restarts_the_job_from_its_run_directory(
    client, tmp_path
):
    """What the next worker does when the scheduler reruns the task of a coordinator that died:
    the same attempt continues (resume options: the run directory as it is), counted and logged."""
    rec = job_client.submit(client, count_spec(tmp_path, steps=2))
    wait_for(client, rec["job"])
    files = JobFiles(rec["job_dir"])
    counts = Path(rec["run_dir"]) / "counts.txt"
    counts.write_text(
        counts.read_text().splitlines()[0] + "\n"
    )  # it had done step 1 when its worker died
    # as if attempt 1 were still running on a worker that then died
    files.write_status(
        {
            **files.read_status(),
            "state": "running",
            "worker": "tcp://10.9.9.9:1",
            "pid": 1,
            "host": "h",
        }
    )
    status = client.submit(
        run_job, {**rec, "options": {**rec["options"], "steps": 3}}, pure=False
    ).result()
    assert status["state"] == "done" and status["attempt"] == 1, status
    assert status["restarts"] == 1 and status["restarted_from"] == "tcp://10.9.9.9:1"
    assert [ln.split()[1] for ln in counts.read_text().splitlines()] == [
        "1",
        "2",
        "3",
    ]  # continued, not redone
    log = files.read_log()[0]
    assert (
        "the worker running the coordinator (tcp://10.9.9.9:1, pid 1 on h) died; "
        "restarting on worker" in log
    )
    assert "(restart 1 of at most 2)" in log
    assert files.read_status()["restarts"] == 1


def test_a_job_restarts_itself_a_bounded_number_of_times(client, tmp_path):
    from pipeline.jobs.runner import MAX_RESTARTS

    rec = job_client.submit(client, count_spec(tmp_path, steps=2))
    wait_for(client, rec["job"])
    files = JobFiles(rec["job_dir"])
    files.write_status(
        {
            **files.read_status(),
            "state": "running",
            "worker": "tcp://10.9.9.9:1",
            "pid": 1,
            "restarts": MAX_RESTARTS,
        }
    )
    status = client.submit(run_job, rec, pure=False).result()
    assert status["state"] == "failed" and status["resumable"]
    assert (
        "tcp://10.9.9.9:1" in status["reason"]
        and f"after {MAX_RESTARTS} restart(s)" in status["reason"]
    )
    assert f"convpipe resume {rec['job']}" in files.read_log()[0].splitlines()[-1]
    assert len((Path(rec["run_dir"]) / "counts.txt").read_text().splitlines()) == 2  # not run again


def test_a_coordinator_that_finds_its_status_damaged_records_why(client, tmp_path):
    rec = job_client.submit(client, count_spec(tmp_path, steps=2))
    wait_for(client, rec["job"])
    files = JobFiles(rec["job_dir"])
    files.status_path.write_text("{ torn")
    status = client.submit(run_job, rec, pure=False).result()
    assert status["state"] == "failed" and status["reason"].startswith(
        f"{files.status_path}: not valid JSON"
    )
    assert (
        files.read_status()["reason"] == status["reason"]
    )  # a readable status again, saying what happened
    assert len((Path(rec["run_dir"]) / "counts.txt").read_text().splitlines()) == 2  # not run again


def test_a_stale_attempt_never_runs_beside_a_newer_one(client, tmp_path):
    """A task of attempt 1 that Dask kept waiting (its only worker died) must not train when a
    worker comes back after attempt 2 was queued."""
    rec = job_client.submit(client, count_spec(tmp_path, steps=2))
    wait_for(client, rec["job"])
    files = JobFiles(rec["job_dir"])
    files.write_status({**files.read_status(), "state": "queued", "attempt": 2})
    status = client.submit(run_job, rec, pure=False).result()
    assert status["attempt"] == 2 and status["state"] == "queued"
    assert len((Path(rec["run_dir"]) / "counts.txt").read_text().splitlines()) == 2


def test_preflight_errors_stop_the_job_before_it_is_queued(client, tmp_path):
    spec = spec_from_table(
        {"job": "train", "root": str(tmp_path), "data": str(tmp_path / "missing.zarr")}
    )
    worker_log = _Records()
    logging.getLogger("distributed.worker").addHandler(worker_log)  # the in-process workers' logger
    try:
        with pytest.raises(DataError, match="missing.zarr") as info:
            job_client.submit(client, spec)
    finally:
        logging.getLogger("distributed.worker").removeHandler(worker_log)
    assert "\n" not in str(info.value)
    # a mistake in the spec is not a failed task: no "Compute Failed" and traceback in the
    # worker's log
    assert not [r for r in worker_log.records if "Compute Failed" in r.getMessage()]
    assert not (tmp_path / "jobs").exists() or not any((tmp_path / "jobs").iterdir())
    assert not [m for m in job_client.submissions(client) if m.get("root") == str(tmp_path)]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_unknown_job(client):
    with pytest.raises(job_client.JobError, match="no job nope on the scheduler"):
        job_client.job_status(client, "nope")


# ---------------------------------------------------------------- the commands


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_submit_status_logs_cancel(cluster, tmp_path, capsys, monkeypatch):
    addr = cluster.scheduler_address
    spec = tmp_path / "count.toml"
    spec.write_text(f'job = "count"\nname = "counter"\nroot = "{tmp_path}"\nsteps = 3\n')
    code, out, err = run_cli(
        capsys, "submit", str(spec), "--scheduler", addr, "--set", "label=cli", "--follow"
    )
    assert code == 0, err
    job_id = out.splitlines()[0]
    assert job_id.startswith("count-") and "done: steps 3" in out and "running on worker" in out
    assert (tmp_path / "runs" / job_id / "counts.txt").read_text().startswith("cli 1 1")

    monkeypatch.setenv("CONVPIPE_SCHEDULER", addr)
    code, out, _ = run_cli(capsys, "status", job_id)
    assert code == 0 and "state:     done" in out and f"job:       {job_id}" in out
    code, out, _ = run_cli(capsys, "status")
    assert code == 0 and job_id in out and "counter" in out
    code, out, _ = run_cli(capsys, "logs", job_id)
    assert code == 0 and "submitted by" in out and "done: steps 3" in out
    code, out, _ = run_cli(capsys, "status", job_id, "--json")
    assert json.loads(out)["state"] == "done"
    # the files alone tell the same, without a scheduler
    code, out, _ = run_cli(capsys, "status", job_id, "--root", str(tmp_path))
    assert code == 0 and "state:     done" in out
    code, out, _ = run_cli(capsys, "logs", job_id, "--root", str(tmp_path))
    assert "done: steps 3" in out
    code, _, err = run_cli(capsys, "cancel", job_id)
    assert code == 2 and err.strip() == f"convpipe: error: job {job_id} is already done"


def test_cli_submit_refuses_a_train_limit_beyond_the_store_before_queueing(
    cluster, tmp_path, capsys
):
    """The store is read on a worker, in the job's preflight: refused there in one line, no job
    left behind and no resume hint (a job that failed on it could not be resumed)."""
    from tests.helpers.training import make_store

    store = make_store(tmp_path / "tiny.zarr", n_train=64, n_val=16, n_test=16)
    spec = tmp_path / "train.toml"
    spec.write_text(f'job = "train"\nroot = "{tmp_path}"\ndata = "{store}"\n')
    code, out, err = run_cli(
        capsys,
        "submit",
        str(spec),
        "--scheduler",
        cluster.scheduler_address,
        "--set",
        "train-limit=99999",
    )
    assert (code, out) == (2, "")
    assert err == f"convpipe: error: train-limit 99999 exceeds the 64 training images of {store}\n"
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "jobs").exists() or not any((tmp_path / "jobs").iterdir())


def test_cli_failed_job_says_why_and_how_to_resume(cluster, tmp_path, capsys):
    addr = cluster.scheduler_address
    spec = tmp_path / "count.toml"
    spec.write_text(f'job = "count"\nroot = "{tmp_path}"\nsteps = 4\nfail-at = 2\n')
    code, out, err = run_cli(capsys, "submit", str(spec), "--scheduler", addr, "--follow")
    assert code == 1
    assert "failed: loss is NaN at step 2" in out
    assert err.strip().splitlines()[0].endswith("failed: loss is NaN at step 2")
    job_id = out.splitlines()[0]
    code, out, _ = run_cli(capsys, "status", job_id, "--scheduler", addr)
    assert "reason:    loss is NaN at step 2" in out


def test_cli_lost_scheduler_is_one_line(tmp_path, capsys):
    code, _, err = run_cli(capsys, "status", "--scheduler", "tcp://127.0.0.1:9", "--timeout", "1")
    assert (
        code == 2
        and err.count("\n") == 1
        and "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in err
    )


def test_log_line_format():
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ x", log_line("x"))


def test_cli_submit_without_a_scheduler_runs_on_the_embedded_cluster(tmp_path, monkeypatch):
    """No scheduler anywhere: the job runs on an embedded local cluster of worker processes,
    followed to its end, and its record stays on the data root for `status` to read."""
    from tests.helpers.cluster import TINY_SETS, convpipe
    from tests.helpers.training import make_store

    make_store(tmp_path / "data" / "cifar10.zarr")
    env = {"CONVPIPE_SCHEDULER": "", "CONVPIPE_CONFIG": str(tmp_path / "none.toml")}
    (tmp_path / "none.toml").write_text("")
    sets = [a for s in [*TINY_SETS, "steps=2", "workers=1"] for a in ("--set", s)]
    r = convpipe(
        "submit",
        Path(__file__).parents[2] / "jobs" / "train-three-layer.toml",
        *sets,
        cwd=tmp_path,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    job = r.stdout.splitlines()[0]
    assert "embedded local cluster" in r.stderr and "done: train_acc" in r.stdout
    assert (tmp_path / "data" / "runs" / job / "params.npz").exists()
    r = convpipe("status", job, cwd=tmp_path, env=env)
    assert r.returncode == 0 and "state:     done" in r.stdout, r.stderr
    r = convpipe("status", cwd=tmp_path, env=env)
    assert job in r.stdout and "done" in r.stdout


def test_cli_resume_from_the_files_when_the_scheduler_forgot_the_job(tmp_path, capsys):
    """After a scheduler restart only the data root knows the job: resume reads it there."""
    spec = tmp_path / "count.toml"
    spec.write_text(f'job = "count"\nroot = "{tmp_path}"\nsteps = 3\nfail-at = 2\n')
    with local_cluster(1) as old:
        code, out, _ = run_cli(
            capsys, "submit", str(spec), "--scheduler", old.scheduler_address, "--follow"
        )
        assert code == 1
    job_id = out.splitlines()[0]
    code, out, _ = run_cli(capsys, "status", job_id, "--root", str(tmp_path))
    assert "state:     failed" in out and f"convpipe resume {job_id} --root {tmp_path}\n" in out
    # the failing step is fixed by hand (fail-at is part of the recorded options); then resume
    files = JobFiles.of(tmp_path, job_id)
    record = files.read_record()
    record["options"]["fail_at"] = None
    files.write_record(record, files.spec_path.read_text())
    with local_cluster(1) as new:
        code, out, err = run_cli(
            capsys,
            "resume",
            job_id,
            "--root",
            str(tmp_path),
            "--scheduler",
            new.scheduler_address,
            "--follow",
        )
        assert code == 0, err
    assert out.splitlines()[0] == job_id and "done: steps 3" in out
    assert files.read_status()["attempt"] == 2
    assert (tmp_path / "runs" / job_id / "counts.txt").read_text().splitlines() == [
        "x 1 1",
        "x 2 4",
        "x 3 9",
    ]


def test_cli_resume_without_a_scheduler_runs_the_job_on_the_embedded_cluster(
    tmp_path, capsys, monkeypatch
):
    """A job submitted with no scheduler has none to go back to: `convpipe resume JOB` reads its
    files under the data root (data/ here) and runs it on the embedded cluster again, as an
    embedded `convpipe submit` does, followed to its end."""
    from pipeline.jobs.spec import load_spec
    from tests.helpers.cluster import TINY_SETS
    from tests.helpers.training import make_store

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CONVPIPE_SCHEDULER", "")
    monkeypatch.setenv("CONVPIPE_CONFIG", str(tmp_path / "none.toml"))
    (tmp_path / "none.toml").write_text("")
    make_store(tmp_path / "data" / "cifar10.zarr")
    spec = load_spec(
        Path(__file__).parents[2] / "jobs" / "train-three-layer.toml",
        # 400 tiny steps: the cancel lands long before the end (with 40, the job sometimes ran
        # them all, about 1 run in 4, before its cancel arrived, and ended done)
        [*TINY_SETS, "steps=400", "checkpoint-every=2"],
    )
    with local_cluster(1) as first, Client(first) as client:
        rec = job_client.submit(client, spec)
        checkpoints = Path(rec["run_dir"]) / "checkpoints"
        wait_until(lambda: any(checkpoints.glob("*.npz")), 120, "the job's first checkpoint")
        job_client.cancel(client, rec["job"])
        assert wait_for(client, rec["job"], timeout=120)["state"] == "cancelled"
    code, out, err = run_cli(capsys, "resume", rec["job"])
    assert code == 0, err
    assert f"resuming job {rec['job']} on an embedded local cluster" in err
    assert out.splitlines()[0] == rec["job"] and "done:" in out
    status = JobFiles.of(tmp_path / "data", rec["job"]).read_status()
    assert (status["state"], status["attempt"]) == ("done", 2)
    assert (Path(rec["run_dir"]) / "params.npz").is_file()


def test_cli_submit_with_a_missing_store_prints_one_line(tmp_path):
    """On the embedded cluster the workers share the terminal: the failed check is one line
    there."""
    from tests.helpers.cluster import convpipe

    env = {"CONVPIPE_SCHEDULER": "", "CONVPIPE_CONFIG": str(tmp_path / "none.toml")}
    (tmp_path / "none.toml").write_text("")
    r = convpipe(
        "submit",
        Path(__file__).parents[2] / "jobs" / "train-three-layer.toml",
        "--set",
        "data=missing.zarr",
        "--set",
        "workers=1",
        cwd=tmp_path,
        env=env,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("convpipe: no scheduler given: running on an embedded local cluster")
    assert lines[1:] == [
        f"convpipe: error: {tmp_path / 'missing.zarr'}: no data store here (create it with "
        f"`convpipe data prepare --out {tmp_path / 'missing.zarr'}`)"
    ], r.stderr


def test_status_says_restarting_while_dask_reruns_a_dead_coordinator():
    """job_status's view of a running job whose worker left: Dask has its task again (waiting or
    processing elsewhere) and the job has restarts left -> restarting; else failed."""
    from pipeline.jobs.client import _restarting
    from pipeline.jobs.runner import MAX_RESTARTS

    running = {"state": "running", "worker": "tcp://gone:1", "restarts": 0}
    assert _restarting(running, ("processing", "tcp://other:2"))
    assert _restarting(running, ("waiting", None)) and _restarting(running, ("no-worker", None))
    assert not _restarting(running, None)  # the scheduler forgot the task: nothing reruns it
    assert not _restarting(running, ("erred", None))
    assert not _restarting({**running, "restarts": MAX_RESTARTS}, ("processing", "tcp://other:2"))
