"""Ctrl-C in a terminal during `convpipe submit` on the embedded cluster (pipeline.cli.jobs:
_stop_embedded_job): the job stops between two steps and records ``cancelled`` with its
checkpoints before the cluster closes, and the command's last word is "convpipe: interrupted"
and how to go on.

The cluster used to close as soon as the cancel was sent: the job's worker was closed under the
running job (the job recorded "interrupted: its worker is closing", or, when its step outlasted
the nanny's 4 s, the worker process was killed: "died") and a killed worker's semaphore was
reported by multiprocessing's resource tracker: "There appear to be 1 leaked semaphore objects
to clean up at shutdown"."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from tests.helpers.cluster import convpipe, convpipe_exe, terminal_job
from tests.helpers.training import make_store
from tests.helpers.wait import wait_until

SPEC = Path(__file__).parents[2] / "jobs" / "train-three-layer.toml"


def test_ctrl_c_cancels_an_embedded_job_and_says_how_to_go_on(tmp_path):
    """The spec's own network (not the tests' tiny one): steps of a good part of a second, with
    which the old close killed the job's worker about every other time (the leaked semaphore);
    the job's state told the difference every time."""
    make_store(tmp_path / "data" / "cifar10.zarr", n_train=1024)
    (tmp_path / "none.toml").write_text("")
    env = {
        **os.environ,
        "CONVPIPE_SCHEDULER": "",
        "CONVPIPE_CONFIG": str(tmp_path / "none.toml"),
        "PYTHONUNBUFFERED": "1",
    }
    sets = ["steps=100000", "checkpoint-every=1", "workers=2"]
    proc = subprocess.Popen(
        [*convpipe_exe(), "submit", str(SPEC), *[a for s in sets for a in ("--set", s)]],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **terminal_job(),
    )
    try:
        wait_until(
            lambda: (
                any((tmp_path / "data" / "runs").glob("*/checkpoints/*.npz"))
                or proc.poll() is not None
            ),
            timeout=180,
            what="the job's first checkpoint",
            interval=0.1,
        )
        assert proc.poll() is None, proc.communicate()
        os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C: the whole process group
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)

    assert proc.returncode == 130, err
    job = out.splitlines()[0]
    lines = err.splitlines()
    assert lines[0].startswith("convpipe: no scheduler given: running on an embedded"), err
    assert lines[1:] == [  # no leaked semaphore, no traceback: how to go on
        f"convpipe: interrupted; the job is cancelled; continue with: convpipe resume {job}"
    ], err

    r = convpipe("status", job, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert "state:     cancelled\n" in r.stdout, r.stdout
    assert f"resume:    convpipe resume {job} --root data\n" in r.stdout, r.stdout
    assert list((tmp_path / "data" / "runs" / job / "checkpoints").glob("step-*.npz"))
