"""A sweep job whose Dask scheduler is SIGKILLed while its trials train, on real ``dask
scheduler`` and ``dask worker`` processes (docker-compose.yml's commands): the workers stop, the
job's files say what happened without a scheduler, nothing written is lost, and ``convpipe
resume`` on a new scheduler ends the sweep with the uninterrupted sweep's results bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.checkpoint import load_checkpoint
from pipeline.jobs import client as job_client
from pipeline.jobs.records import TERMINAL, JobFiles
from pipeline.jobs.spec import load_spec
from pipeline.jobs.sweep import SweepState
from pipeline.procs import pid_alive
from pipeline.training.shm import shm_root
from tests.helpers.cluster import ProcessCluster, convpipe
from tests.helpers.training import make_store
from tests.helpers.wait import wait_until
from tests.jobs.test_sweep_run import outcome

pytestmark = pytest.mark.timeout(300)

#: 4 trials of at most 24 tiny steps: rungs at 8 and 16 steps, the best half goes on
SEARCH = (
    '[search]\nmethod = "random"\ntrials = 4\nseed = 3\nlr = { log-uniform = [1e-3, 3e-2] }\n'
    "[early-stopping]\nmin-steps = 8\nreduction-factor = 2\n"
)


def spec_text(root: Path, store: Path) -> str:
    return (
        f'job = "sweep"\nname = "sweep-in-a-storm"\nroot = "{root}"\ndata = "{store}"\n'
        "steps = 24\nbatch-size = 64\nshard-size = 16\nnum-filters = 4\nfilter-size = 3\n"
        "hidden-dim = 16\nweight-scale = 1e-2\ncheckpoint-every = 2\ntrain-acc-samples = 64\n"
        "eval-every = 4\neval-samples = 32\n" + SEARCH
    )


def ended(root: Path, job: str) -> dict:
    """The job's status once its files say it is done (read from them: no process, no scheduler
    to ask)."""
    files = JobFiles.of(root, job)
    status = wait_until(
        lambda: (s := files.read_status()) and s["state"] in TERMINAL and s,
        timeout=180,
        what=lambda: f"the end of job {job}:\n" + files.read_log()[0][-3000:],
        interval=0.1,
    )
    assert status["state"] == "done", files.read_log()[0][-3000:]
    return status


def arrays(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def same_arrays(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_sweep_whose_scheduler_is_killed_resumes_on_a_new_one_to_the_same_bits(tmp_path):
    work = tmp_path
    data = work / "data"
    store = make_store(data / "tiny.zarr", n_train=128, n_val=48, n_test=32)
    spec = work / "sweep.toml"
    spec.write_text(spec_text(data, store))

    first = ProcessCluster(work / "first", n_workers=2)
    with first:
        r = convpipe("submit", spec, "--scheduler", first.address, cwd=work)
        assert r.returncode == 0, r.stderr
        job = r.stdout.split()[0]
        run = data / "runs" / job
        ckpts = run / "trials" / "t001" / "checkpoints"
        # the second trial is training: it has written a checkpoint
        wait_until(
            lambda: ckpts.is_dir() and any(ckpts.glob("step-*.npz")),
            timeout=120,
            what="a checkpoint of trial t001",
        )
        first.kill_scheduler()
        # the workers do not go on training without their scheduler: each worker closes, and
        # its nanny with it (the `dask worker` processes end)
        wait_until(
            lambda: all(p.poll() is not None for p in first.workers),
            timeout=60,
            what=lambda: "the workers' end:\n" + first.log("worker-0") + first.log("worker-1"),
            interval=0.1,
        )

    # the job's files, read without a scheduler: it stopped mid-sweep, resumable, in one line
    on_disk = JobFiles.of(data, job).read_status()
    assert not pid_alive(on_disk["pid"])  # the process that ran the coordinator is gone
    r = convpipe("status", job, "--root", "data", cwd=work, timeout=30)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    fields = dict(line.split(":", 1) for line in r.stdout.split("\n\n")[0].splitlines())
    assert fields["state"].strip() == "failed", r.stdout
    reason = fields["reason"].strip()
    assert reason.startswith(
        (
            "lost the connection to the Dask scheduler",
            f"the worker running its coordinator (pid {on_disk['pid']} on",
        )
    ), reason
    assert fields["resume"].strip() == f"convpipe resume {job} --root data", r.stdout
    r = convpipe("status", "--root", "data", cwd=work, timeout=30)  # the table: one row
    assert r.returncode == 0, r.stderr
    row = [line for line in r.stdout.splitlines() if line.startswith(job)]
    assert len(row) == 1 and "failed" in row[0] and reason in row[0], r.stdout
    # the job's log ends with that one line (no traceback of Dask's), and how to go on
    r = convpipe("logs", job, "--root", "data", cwd=work, timeout=30)
    assert r.returncode == 0 and "Traceback" not in r.stdout, r.stdout[-3000:]
    if reason.startswith("lost the connection"):  # the coordinator said it itself
        assert r.stdout.splitlines()[-1].endswith(
            f" failed: {reason}; once a scheduler and workers run again: convpipe resume {job} "
            "--root ROOT --scheduler ADDR"
        ), r.stdout[-3000:]

    # nothing written is lost: the sweep's state, its trials' settings, metrics and checkpoints
    assert not (run / "summary.json").exists()  # it did stop mid-sweep
    state = SweepState.load(run)
    assert [t.state for t in state.trials].count("running") >= 1
    assert not any(t.state == "failed" for t in state.trials), [t.error for t in state.trials]
    assert state.trials[0].scores  # t000 was scored before t001 started
    for trial in (run / "trials").iterdir():
        assert (trial / "config.json").exists() and (trial / "metrics.jsonl").exists()
        for ckpt in (trial / "checkpoints").glob("*"):
            assert ckpt.name.startswith("step-"), ckpt  # no torn temporary file
            assert "params/W1" in load_checkpoint(ckpt)[0]
    # and the coordinator's shared memory went with it
    assert not list(shm_root().glob(f"convpipe-{on_disk['pid']}-*"))

    # a new scheduler and workers: the job goes on there and ends as if nothing had happened
    with ProcessCluster(work / "second", n_workers=2) as second:
        r = convpipe("resume", job, "--root", "data", "--scheduler", second.address, cwd=work)
        assert r.returncode == 0, r.stderr
        assert ended(data, job)["attempt"] == 2  # its status says queued before resume returns
        with second.client() as client:  # the same spec, never interrupted
            calm_job = job_client.submit(client, load_spec(spec))["job"]
        ended(data, calm_job)
        calm = data / "runs" / calm_job

    assert outcome(run) == outcome(calm)
    assert same_arrays(arrays(run / "best-params.npz"), arrays(calm / "best-params.npz"))
    for trial in (calm / "trials").iterdir():
        assert same_arrays(
            arrays(run / "trials" / trial.name / "params.npz"), arrays(trial / "params.npz")
        ), trial.name
