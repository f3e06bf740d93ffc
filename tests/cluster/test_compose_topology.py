"""The docker-compose topology from real processes: ``dask scheduler`` and two ``dask worker``
processes on 127.0.0.1, started with the compose services' own commands; then ``convpipe data
prepare --scheduler``, ``convpipe train --scheduler`` and ``convpipe submit`` against them, run
as a user runs them. The tests run in order on one cluster; the last one kills its scheduler.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipeline.checkpoint import load_checkpoint
from tests.helpers.cluster import (
    TINY_SETS,
    TINY_TRAIN,
    ProcessCluster,
    convpipe,
    convpipe_exe,
    wait_status,
)
from tests.helpers.jobs import ran_at_the_same_time
from tests.helpers.wait import wait_until

REPO = Path(__file__).resolve().parents[2]
STEPS = 16
SETTINGS = [*TINY_TRAIN, "--steps", str(STEPS), "--checkpoint-every", "2"]
SETS = [a for s in [*TINY_SETS, f"steps={STEPS}", "checkpoint-every=2"] for a in ("--set", s)]
RUN_FILES = {
    "config.json",
    "metrics.jsonl",
    "params.npz",
    "summary.json",
    "curves.png",
    "filters.png",
    "checkpoints",
}

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def topo(tmp_path_factory):
    from tests.helpers.data import write_cifar_archive

    work = tmp_path_factory.mktemp("compose")
    (work / "data").mkdir()
    archive, _ = write_cifar_archive(work / "src", per_batch=40, n_test=40)
    with ProcessCluster(work, n_workers=2) as pc:
        r = convpipe(
            "data",
            "prepare",
            "--source",
            archive,
            "--out",
            "data/cifar10.zarr",
            "--val",
            "20",
            "--chunk",
            "40",
            "--no-verify",
            "--scheduler",
            pc.address,
            "--quiet",
            cwd=work,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        assert (work / "data" / "cifar10.zarr" / "zarr.json").exists()
        yield pc, work


def params(run_dir: Path) -> dict:
    with np.load(run_dir / "params.npz", allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def same_params(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def submit(pc, work, *extra) -> str:
    r = convpipe(
        "submit",
        REPO / "jobs" / "train-three-layer.toml",
        "--scheduler",
        pc.address,
        *SETS,
        *extra,
        cwd=work,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.split()[0]


def test_train_then_submit_give_the_same_run(topo):
    pc, work = topo
    r = convpipe(
        "train",
        "--scheduler",
        pc.address,
        "--data",
        "data/cifar10.zarr",
        "--out",
        "data/runs/direct",
        *SETTINGS,
        cwd=work,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    direct = work / "data" / "runs" / "direct"
    assert RUN_FILES <= {p.name for p in direct.iterdir()}

    job = submit(pc, work)  # the submitting command has exited: the job runs on the cluster
    status = wait_status(job, pc.address, work)
    assert status["state"] == "done", status
    run = Path(status["run_dir"])
    assert run == work / "data" / "runs" / job
    assert RUN_FILES <= {p.name for p in run.iterdir()}
    assert same_params(params(run), params(direct))
    assert json.loads((run / "summary.json").read_text())["steps"] == STEPS
    r = convpipe("logs", job, "--scheduler", pc.address, cwd=work)
    assert f"start: step 0/{STEPS}" in r.stdout and "done: train_acc" in r.stdout


def test_prepare_and_evaluate_jobs(topo):
    """The compose one-shot service's first job, and an evaluation, submitted and followed."""
    pc, work = topo
    archive = next((work / "src").glob("*.tar.gz"))
    r = convpipe(
        "submit",
        REPO / "jobs" / "prepare-cifar10.toml",
        "--scheduler",
        pc.address,
        "--follow",
        "--set",
        f"source={archive}",
        "--set",
        "out=data/again.zarr",
        "--set",
        "val=20",
        "--set",
        "chunk=40",
        "--set",
        "no-verify=true",
        cwd=work,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "done: store" in r.stdout
    from pipeline.data import open_store

    again, first = (
        open_store(work / "data" / "again.zarr"),
        open_store(work / "data" / "cifar10.zarr"),
    )
    assert again.splits == first.splits
    assert np.array_equal(again.read_uint8("test")[0], first.read_uint8("test")[0])

    r = convpipe(
        "submit",
        REPO / "jobs" / "evaluate.toml",
        "--scheduler",
        pc.address,
        "--follow",
        "--set",
        "run=direct",
        "--set",
        "split=val",
        cwd=work,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    job = r.stdout.splitlines()[0]
    result = json.loads((work / "data" / "jobs" / job / "result.json").read_text())
    assert result["split"] == "val" and result["n"] == 20 and 0 <= result["accuracy"] <= 1
    assert result["run_dir"] == str(work / "data" / "runs" / "direct")


def test_two_jobs_at_once_keep_to_themselves(topo):
    pc, work = topo
    from pipeline.jobs import client as job_client
    from pipeline.jobs.spec import load_spec

    sets = [*TINY_SETS, f"steps={STEPS}", "checkpoint-every=2"]
    spec_a = load_spec(REPO / "jobs" / "train-three-layer.toml", [*sets, "name=job-a"])
    spec_b = load_spec(
        REPO / "jobs" / "train-three-layer.toml", [*sets, "name=job-b", "seed=7", "norm=groupnorm"]
    )
    with pc.client() as client:  # submitted back to back, so that they surely run at the same time
        a = job_client.submit(client, spec_a)["job"]
        b = job_client.submit(client, spec_b)["job"]
    sa, sb = wait_status(a, pc.address, work), wait_status(b, pc.address, work)
    assert sa["state"] == sb["state"] == "done", (sa, sb)
    with pc.client() as client:  # they overlapped: each started before the other ended
        assert ran_at_the_same_time(client, a, b)
    ra, rb = Path(sa["run_dir"]), Path(sb["run_dir"])
    assert ra != rb
    # a's parameters are exactly those of the same settings trained alone
    assert same_params(params(ra), params(work / "data" / "runs" / "direct"))
    assert json.loads((rb / "config.json").read_text())["norm"] == "groupnorm"
    assert "gamma1" in params(rb) and "gamma1" not in params(ra)
    log_a = (work / "data" / "jobs" / a / "job.log").read_text()
    log_b = (work / "data" / "jobs" / b / "job.log").read_text()
    assert str(rb) not in log_a and str(ra) not in log_b
    r = convpipe("status", "--scheduler", pc.address, cwd=work)
    assert a in r.stdout and b in r.stdout


def test_a_killed_coordinator_restarts_itself_on_another_worker(topo):
    """SIGKILL to the worker process running a job's coordinator: Dask reruns the task on the
    other worker, the job restarts there from its last checkpoint (same attempt, counted and
    logged) and ends with the parameters of the undisturbed run."""
    pc, work = topo
    job = submit(pc, work, "--set", "name=victim", "--set", "steps=60")
    job_dir = work / "data" / "jobs" / job
    ckpts = work / "data" / "runs" / job / "checkpoints"
    wait_until(
        lambda: ckpts.is_dir() and any(ckpts.glob("step-*.npz")), timeout=60, what="a checkpoint"
    )
    status = json.loads((job_dir / "status.json").read_text())
    assert status["state"] == "running"
    os.kill(status["pid"], signal.SIGKILL)  # the worker process running the coordinator

    done = wait_status(job, pc.address, work, timeout=120)
    assert done["state"] == "done" and done["attempt"] == 1, done
    assert done["restarts"] == 1 and done["restarted_from"] == status["worker"] != done["worker"]
    log = (job_dir / "job.log").read_text()
    assert f"the worker running the coordinator ({status['worker']}, pid {status['pid']}" in log
    assert "died; restarting on worker" in log and "resumed at step" in log
    r = convpipe("status", job, "--scheduler", pc.address, cwd=work)
    assert f"restarts:  1 (after worker {status['worker']} died)" in r.stdout
    r = convpipe(
        "train",
        "--scheduler",
        pc.address,
        "--data",
        "data/cifar10.zarr",
        "--out",
        "data/runs/direct60",
        *TINY_TRAIN,
        "--steps",
        "60",
        "--checkpoint-every",
        "2",
        cwd=work,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert same_params(
        params(work / "data" / "runs" / job), params(work / "data" / "runs" / "direct60")
    )
    pc.wait_for_workers(2)  # the nanny has restarted the killed worker


def test_sigterm_to_the_coordinator_s_worker_stops_the_job_cleanly(topo):
    """``kill -TERM`` (docker stop, a preemption) of the worker process running a job's
    coordinator: the job stops between steps, records failed (interrupted) with its resume
    command, and only then does the process end."""
    pc, work = topo
    job = submit(pc, work, "--set", "steps=100000", "--set", "name=stopped")
    job_dir = work / "data" / "jobs" / job
    ckpts = work / "data" / "runs" / job / "checkpoints"
    wait_until(
        lambda: ckpts.is_dir() and any(ckpts.glob("step-*.npz")), timeout=60, what="a checkpoint"
    )
    running = json.loads((job_dir / "status.json").read_text())
    os.kill(running["pid"], signal.SIGTERM)

    failed = wait_status(job, pc.address, work, states=("failed",), timeout=60)
    assert failed["reason"] == "interrupted: the worker process got SIGTERM", failed
    on_disk = json.loads((job_dir / "status.json").read_text())  # written by the process itself
    assert on_disk["reason"] == failed["reason"] and on_disk["resumable"]
    assert f"resume with: convpipe resume {job}" in (job_dir / "job.log").read_text()
    r = convpipe("status", job, "--scheduler", pc.address, cwd=work)
    assert f"convpipe resume {job}" in r.stdout
    # then the signal went on: the process ended
    wait_until(
        lambda: not os.path.exists(f"/proc/{running['pid']}"),
        timeout=30,
        what="the worker process's end",
    )
    kept = sorted(ckpts.glob("step-*.npz"))
    assert kept and load_checkpoint(kept[-1])[1]["step"] >= 1
    pc.wait_for_workers(2)  # the nanny has started a new worker process


def _parent(pid: int) -> int:
    """The parent process of ``pid`` (/proc/PID/stat's fourth field)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def test_docker_stop_of_the_coordinator_s_worker_keeps_its_last_step_and_resumes(topo):
    """``docker stop`` sends SIGTERM to the container's ``dask worker`` process (the nanny),
    not to the worker process: the nanny closes its worker (not retired: it runs a job's
    coordinator, pipeline.jobs.retire), the job stops between two steps, keeps a checkpoint of
    the last step it logged, records failed (interrupted), and resumes to the undisturbed
    run's parameters."""
    pc, work = topo
    job = submit(pc, work, "--set", "name=docker-stop", "--set", "steps=60")
    job_dir, run = work / "data" / "jobs" / job, work / "data" / "runs" / job
    wait_until(
        lambda: any((run / "checkpoints").glob("step-*.npz")) if run.is_dir() else False,
        timeout=60,
        what="a checkpoint",
    )
    running = json.loads((job_dir / "status.json").read_text())
    nanny = _parent(running["pid"])
    assert nanny in [w.pid for w in pc.workers if w.poll() is None]
    os.kill(nanny, signal.SIGTERM)

    failed = wait_status(job, pc.address, work, states=("failed", "done"), timeout=60)
    assert failed["state"] == "failed" and failed["resumable"], failed
    assert failed["reason"].startswith("interrupted"), failed
    steps = [
        json.loads(ln)["step"]
        for ln in (run / "metrics.jsonl").read_text().splitlines()
        if json.loads(ln)["kind"] == "step"
    ]
    kept = sorted((run / "checkpoints").glob("step-*.npz"))[-1]
    assert load_checkpoint(kept)[1]["step"] == steps[-1], (kept, steps[-1])  # its last step
    next(w for w in pc.workers if w.pid == nanny).wait(30)
    pc.add_worker("worker-after-stop")
    pc.wait_for_workers(2)
    r = convpipe("resume", job, "--scheduler", pc.address, cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    done = wait_status(job, pc.address, work, timeout=120)
    assert done["state"] == "done", done
    if (work / "data" / "runs" / "direct60").is_dir():  # the killed-coordinator test's reference
        assert same_params(params(run), params(work / "data" / "runs" / "direct60"))


def test_scheduler_gone_mid_job_is_one_line_and_keeps_everything(topo):
    pc, work = topo
    job = submit(pc, work, "--set", "steps=100000", "--set", "name=orphan")
    follow = subprocess.Popen(
        [*convpipe_exe(), "logs", job, "--follow", "--scheduler", pc.address],
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = follow.stdout.readline()  # the follower is connected and reading the job's log
    assert job in first or "submitted by" in first, first
    ckpts = work / "data" / "runs" / job / "checkpoints"
    wait_until(
        lambda: ckpts.is_dir() and len(list(ckpts.glob("step-*.npz"))) >= 2,
        timeout=60,
        what="two checkpoints",
    )
    pc.kill_scheduler()
    try:
        out, err = follow.communicate(timeout=60)
    finally:
        follow.kill()
    assert follow.returncode == 2, (out[-2000:], err[-2000:])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"convpipe: error: lost the Dask scheduler at {pc.address}"
    )
    assert str(work / "data" / "jobs" / job) in lines[0]
    # the coordinator records the loss in its files, and what was written is still there and
    # readable
    status_file = work / "data" / "jobs" / job / "status.json"
    wait_until(
        lambda: json.loads(status_file.read_text())["state"] != "running",
        timeout=60,
        what="the coordinator recording the lost scheduler",
    )
    kept = sorted(ckpts.glob("step-*.npz"))
    assert kept
    arrays, meta = load_checkpoint(kept[-1])
    assert meta["step"] >= 2 and "params/W1" in arrays
    assert (work / "data" / "jobs" / job / "job.log").read_text().count("\n") >= 3
    status = json.loads((work / "data" / "jobs" / job / "status.json").read_text())
    assert status["job"] == job and status["state"] == "failed", status
    assert status["reason"].startswith("lost the connection to the Dask scheduler")
    r = convpipe("status", job, "--root", "data", cwd=work)
    assert r.returncode == 0 and job in r.stdout
