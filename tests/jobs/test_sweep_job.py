"""A sweep as a job: submitted and followed through the CLI, its leaderboard in `convpipe status`,
cancelled mid-sweep and resumed to the same outcome as an uninterrupted sweep."""

from __future__ import annotations

import json
import re
from pathlib import Path

from distributed import Client

from pipeline.cli import main
from pipeline.jobs import client as job_client
from pipeline.jobs.records import JobFiles
from pipeline.jobs.spec import load_spec
from pipeline.jobs.sweep import SweepState
from tests.helpers.jobs import wait_for
from tests.helpers.training import make_store
from tests.helpers.wait import wait_until
from tests.jobs.test_sweep_run import outcome

RANDOM_LR = (
    '[search]\nmethod = "random"\ntrials = 4\nseed = 3\nlr = { log-uniform = [1e-3, 3e-2] }\n'
    "[early-stopping]\nmin-steps = 2\nreduction-factor = 2\n"
)


def spec_text(root: Path, store: Path, search: str = RANDOM_LR) -> str:
    return (
        f'job = "sweep"\nname = "tiny-sweep"\nroot = "{root}"\ndata = "{store}"\n'
        f"steps = 6\nbatch-size = 64\n"
        f"shard-size = 16\nnum-filters = 4\nfilter-size = 3\nhidden-dim = 16\nweight-scale = 1e-2\n"
        f"checkpoint-every = 2\ntrain-acc-samples = 64\neval-every = 1\neval-samples = 32\n"
        + search
    )


def test_a_sweep_job_runs_prints_its_leaderboard_and_resumes_after_a_cancel(
    cluster, tmp_path, capsys
):
    store = make_store(tmp_path / "tiny.zarr", n_train=128, n_val=48, n_test=32)
    spec = tmp_path / "sweep.toml"
    spec.write_text(spec_text(tmp_path, store))
    addr = cluster.scheduler_address
    assert main(["submit", str(spec), "--scheduler", addr, "--follow"]) == 0
    out = capsys.readouterr().out
    whole = out.splitlines()[0]
    assert "trial t000" in out and "done: trials 4" in out
    # every trial's score and every rung's promotions are log lines as they are, no "1/1"
    scored = [line for line in out.splitlines() if " trial t0" in line and "val_acc" in line]
    assert len(scored) >= 4 and not any(" 1/1" in line for line in out.splitlines())
    assert any(
        re.search(r"Z rung 2 steps: \d of 4 trials go on \(t00", line) for line in out.splitlines()
    )
    assert main(["status", whole, "--scheduler", addr]) == 0
    status = capsys.readouterr().out
    assert "sweep: 4/4 trials done, rungs [2, 4, 6]" in status and "lr" in status.splitlines()[-5]
    run_dir = tmp_path / "runs" / whole
    best = SweepState.load(run_dir).best()
    assert status.splitlines()[-4].split()[:2] == [best.name, "completed"]

    # the same sweep, cancelled once its second trial is scored, then resumed
    with Client(cluster) as client:
        rec = job_client.submit(client, load_spec(spec))
        cut = Path(rec["run_dir"])

        def scored_two():
            try:
                return sum(bool(t.scores) for t in SweepState.load(cut).trials) >= 2
            except Exception:  # noqa: BLE001 - not written yet
                return False

        wait_until(scored_two, timeout=120, what="two trials scored")
        job_client.cancel(client, rec["job"])
        assert wait_for(client, rec["job"], timeout=180)["state"] == "cancelled"
        assert not (cut / "summary.json").exists()
        job_client.resume(client, rec["job"])
        status = wait_for(client, rec["job"], timeout=180)
        assert status["state"] == "done", status.get("reason")
    assert outcome(cut) == outcome(run_dir)
    assert json.loads((cut / "summary.json").read_text())["best"]["trial"] == best.name


def test_a_sweep_job_with_no_completed_trial_ends_failed_and_its_command_exits_1(
    cluster, tmp_path, capsys
):
    store = make_store(tmp_path / "tiny.zarr", n_train=128, n_val=48, n_test=32)
    spec = tmp_path / "sweep.toml"
    spec.write_text(spec_text(tmp_path, store, '[search]\nmethod = "grid"\nlr = [1e30, 3e30]\n'))
    code = main(["submit", str(spec), "--scheduler", cluster.scheduler_address, "--follow"])
    out, err = capsys.readouterr()
    assert code == 1, err
    job = out.splitlines()[0]
    status = JobFiles.of(tmp_path, job).read_status()
    state = SweepState.load(tmp_path / "runs" / job)
    reason = (
        "no trial of the sweep completed (expected at least one): 2 of 2 failed, 0 stopped; "
        f"trial t000 failed: {state.trials[0].error}"
    )
    assert (status["state"], status["reason"], status["resumable"]) == ("failed", reason, False)
    # one line that says why, and no resume hint: resuming would not change it
    assert err.splitlines()[-1] == f"convpipe: job {job} failed: {reason}"
    assert "convpipe resume" not in err
    assert main(["status", job, "--root", str(tmp_path)]) == 0
    assert f"reason:    {reason}\n" in capsys.readouterr().out


def test_a_sweep_no_trial_can_run_is_refused_before_it_is_queued(cluster, tmp_path, capsys):
    store = make_store(tmp_path / "tiny.zarr", n_train=128, n_val=48, n_test=32)
    spec = tmp_path / "sweep.toml"
    spec.write_text(spec_text(tmp_path, store))
    addr = cluster.scheduler_address
    code = main(["submit", str(spec), "--scheduler", addr, "--set", "train-limit=500"])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert err == f"convpipe: error: train-limit 500 exceeds the 128 training images of {store}\n"
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "jobs").exists() or not any((tmp_path / "jobs").iterdir())
