"""Sweeps on an in-process cluster: successive halving, results, a failed trial, resume after the
coordinator died (same outcome bit for bit, finished trials not rerun), load_model, the
leaderboard; a sweep's directory and its trials' have one owner at a time."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from pipeline.cnn import ThreeLayerConvNet
from pipeline.errors import TrainingError
from pipeline.jobs.kinds import Sweep
from pipeline.jobs.sweep import (
    SweepError,
    SweepFailed,
    SweepPlan,
    SweepState,
    check_trials_can_run,
    leaderboard_text,
    run_sweep,
)
from pipeline.runs import load_model
from pipeline.training import evaluate
from pipeline.training.rundir import RunDirBusy
from tests.helpers.owners import held_by_another_process
from tests.helpers.training import TINY_MODEL, assert_same_params, final_params, make_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(
        tmp_path_factory.mktemp("data") / "tiny.zarr", n_train=128, n_val=48, n_test=32
    )


@pytest.fixture(scope="module")
def client(training_client):
    """The sweeps here run on the module's two in-process workers (tests/conftest.py)."""
    return training_client


class Crash(Exception):
    """Stands for the sweep's coordinator dying."""


def plan_of(store, search: dict, early_stopping: dict | None = None, **base) -> SweepPlan:
    """Trials of the tiny model: 2 steps an epoch of 64 images, 9 steps in all."""
    opts = {k: o.default for k, o in Sweep.options().items()}
    opts.update(data=str(store), **TINY_MODEL, steps=9, eval_every=1, eval_samples=32)
    opts.update(base)
    opts["search"], opts["early_stopping"] = search, early_stopping
    return SweepPlan.from_options(opts)


GRID = {"method": "grid", "lr": [1e-3, 1e-2, 3e-2], "hidden-dim": [8, 16]}
HALVING = {"min-steps": 1, "reduction-factor": 3}


def rows(out) -> list[dict]:
    with open(out / "trials.csv") as f:
        return list(csv.DictReader(f))


def outcome(out) -> tuple:
    """What must not depend on interruptions: the rows but their seconds, the summary's results."""
    summary = json.loads((out / "summary.json").read_text())
    keep = ("trials", "completed", "stopped", "failed", "rungs", "best", "steps", "images")
    best = {**summary["best"], "run_dir": None}
    return (
        [{k: v for k, v in r.items() if k != "seconds"} for r in rows(out)],
        {k: summary[k] for k in keep} | {"best": best},
    )


@pytest.fixture(scope="module")
def whole(store, client, tmp_path_factory):
    """The grid sweep with successive halving, one trial at a time, never interrupted."""
    out = tmp_path_factory.mktemp("whole") / "sweep"
    return out, run_sweep(plan_of(store, GRID, HALVING), out, client=client)


def test_successive_halving_keeps_the_best_third_and_writes_the_results(whole, client):
    out, summary = whole
    state = SweepState.load(out)
    assert state.rungs == [1, 3, 9]
    assert [t.state for t in state.trials].count("completed") == 1
    assert sorted(t.steps for t in state.trials) == [1, 1, 1, 1, 3, 9]  # 6 -> 2 -> 1
    # promotions are the best scores at each rung (ties to the lower id)
    at1 = {t.id: t.scores[1] for t in state.trials}
    went_on = sorted(sorted(at1, key=lambda i: (-at1[i], i))[:2])
    assert sorted(t.id for t in state.trials if t.steps >= 3) == went_on
    table = rows(out)
    assert [r["id"] for r in table] == [f"t00{i}" for i in range(6)]
    assert {r["lr"] for r in table} == {"0.001", "0.01", "0.03"} and {
        r["hidden-dim"] for r in table
    } == {"8", "16"}
    assert (
        summary["steps"] == 6 * 1 + 2 * (3 - 1) + (9 - 3)
        and summary["steps_if_run_to_the_end"] == 54
    )
    best = summary["best"]
    assert best["trial"] == state.best().name and best["val_acc"] == max(
        t.best()[0] for t in state.trials
    )
    # each trial is an ordinary run directory: evaluate scores the same val accuracy
    assert (
        evaluate(best["run_dir"], split="val", client=client)["accuracy"] == best["final_val_acc"]
    )
    assert_same_params(final_params(best["run_dir"]), dict(np.load(out / "best-params.npz")))
    assert (out / "sweep.png").stat().st_size > 10_000
    # load_model: the run's parameters and BN statistics, a sweep's directory gives its best trial
    model = load_model(out)
    assert isinstance(model, ThreeLayerConvNet)
    assert_same_params({k: model.params[k] for k in model.params}, final_params(best["run_dir"]))
    X = np.zeros((3, 3, 32, 32), np.float32)
    assert model.loss(X).shape == (3, 4) and model.loss(X).dtype == np.float32
    board = leaderboard_text(out)
    lines = board.splitlines()
    assert lines[0] == "sweep: 6/6 trials done, rungs [1, 3, 9]"
    assert lines[1].split() == [
        "trial",
        "state",
        "steps",
        "best",
        "val_acc",
        "at",
        "step",
        "lr",
        "hidden-dim",
    ]
    assert lines[2].split()[:2] == [best["trial"], "completed"]


def test_convpipe_evaluate_takes_a_sweeps_directory_as_its_best_trial(whole, client, capsys):
    from pipeline.cli import main

    out, summary = whole
    code = main(["evaluate", str(out), "--split", "val", "--scheduler", client.scheduler.address])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert f"the sweep's best trial: {summary['best']['run_dir']}" in err
    assert stdout.startswith(f"val accuracy {summary['best']['final_val_acc']:.4f} ")


def test_a_sweep_resumed_after_its_coordinator_died_ends_as_an_uninterrupted_one(
    store, client, whole, tmp_path
):
    plan = plan_of(store, GRID, HALVING)
    best = SweepState.load(whole[0]).best().id

    def crash(event):  # the best trial, between its checkpoints 4 and 6
        if event.get("trial") == best and event.get("event") == "step" and event.get("step") == 5:
            raise Crash()

    with pytest.raises(Crash):
        run_sweep(plan, tmp_path / "cut", client=client, progress=crash)
    before = SweepState.load(tmp_path / "cut")
    assert [t.id for t in before.trials if t.state == "running"] == [best]
    assert not (tmp_path / "cut" / "summary.json").exists()
    events = []
    run_sweep(plan, tmp_path / "cut", client=client, progress=events.append)
    starts = [(e["trial"], e["start_step"]) for e in events if e.get("event") == "start"]
    assert starts == [(best, 4)]  # scored trials not rerun; the cut one from its checkpoint
    assert [e["step"] for e in events if e.get("event") == "resumed"] == [4]
    assert outcome(tmp_path / "cut") == outcome(whole[0])
    assert_same_params(
        dict(np.load(tmp_path / "cut" / "best-params.npz")),
        dict(np.load(whole[0] / "best-params.npz")),
    )


def test_trials_training_at_once_give_the_same_sweep_and_a_crash_among_them_resumes(
    store, client, whole, tmp_path
):
    plan = plan_of(store, {**GRID, "parallel": 3}, HALVING)
    seen = []

    def crash(event):  # trial 4 dies at its first step while others train beside it
        seen.append(event.get("trial"))
        if event.get("trial") == 4 and event.get("event") == "step":
            raise Crash()

    with pytest.raises(Crash):
        run_sweep(plan, tmp_path / "cut", client=client, progress=crash)
    assert not (tmp_path / "cut" / "summary.json").exists()
    run_sweep(plan, tmp_path / "cut", client=client)
    assert outcome(tmp_path / "cut") == outcome(whole[0])
    run_sweep(plan, tmp_path / "at-once", client=client)
    assert outcome(tmp_path / "at-once") == outcome(whole[0])


def test_a_diverging_trial_is_failed_with_its_reason_and_the_sweep_goes_on(store, client, tmp_path):
    out = tmp_path / "sweep"
    summary = run_sweep(
        plan_of(store, {"method": "grid", "lr": [1e-2, 1e30]}, steps=4), out, client=client
    )
    table = rows(out)
    assert [r["state"] for r in table] == ["completed", "failed"]
    assert "diverged" in table[1]["error"] and table[1]["best_val_acc"] == ""
    assert summary["failed"] == 1 and summary["best"]["trial"] == "t000"
    assert "t001 failed: loss is" in leaderboard_text(out)


@pytest.mark.parametrize(
    "stopping, states, counts",
    [
        (None, ["failed", "failed"], "2 of 2 failed, 0 stopped"),
        # both score chance at rung 1 (a tie: t000 goes on), then t000 diverges: none completes
        (HALVING, ["failed", "stopped"], "1 of 2 failed, 1 stopped"),
    ],
    ids=["every trial failed", "the promoted trial failed"],
)
def test_a_sweep_with_no_completed_trial_fails_with_the_first_failed_trials_reason(
    store, client, tmp_path, stopping, states, counts
):
    out = tmp_path / "sweep"
    with pytest.raises(SweepFailed) as info:
        run_sweep(
            plan_of(store, {"method": "grid", "lr": [1e30, 3e30]}, stopping, steps=3),
            out,
            client=client,
        )
    state = SweepState.load(out)
    assert [t.state for t in state.trials] == states
    assert str(info.value) == (
        f"no trial of the sweep completed (expected at least one): {counts}; "
        f"trial t000 failed: {state.trials[0].error}"
    )
    assert "\n" not in str(info.value) and "diverged" in state.trials[0].error
    assert not info.value.resumable  # its failed trials stay failed
    # its results are written all the same: what each trial did, and no completed trial
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["completed"], summary["failed"]) == (0, 1 if stopping else 2)
    assert [r["state"] for r in rows(out)] == states


def test_a_plan_no_trial_can_run_is_refused_before_any_trial_starts(store, client, tmp_path):
    from pipeline.training import train

    plan = plan_of(store, {"method": "grid", "lr": [1e-2, 3e-2]}, train_limit=500)
    events = []
    with pytest.raises(TrainingError) as refused:
        run_sweep(plan, tmp_path / "sweep", client=client, progress=events.append)
    assert events == [] and not (tmp_path / "sweep").exists()
    # the message each trial would have given, once
    with pytest.raises(TrainingError) as trial:
        train(plan.trial_config(plan.search.settings()[0], str(tmp_path / "t000"), 9))
    assert (
        str(refused.value)
        == str(trial.value)
        == (f"train_limit 500 exceeds the 128 training images of {store}")
    )
    # a searched train-limit that some trials can use: those run, the others fail alone
    check_trials_can_run(plan_of(store, {"method": "grid", "train-limit": [64, 500]}))
    with pytest.raises(TrainingError, match="^train_limit 200 exceeds the 128 training images"):
        check_trials_can_run(plan_of(store, {"method": "grid", "train-limit": [200, 500]}))


def test_a_sweep_directory_refuses_another_plan(store, client, tmp_path):
    run_sweep(
        plan_of(store, {"method": "grid", "lr": [1e-2]}, steps=2), tmp_path / "s", client=client
    )
    with pytest.raises(SweepError, match="started with other settings"):
        run_sweep(
            plan_of(store, {"method": "grid", "lr": [3e-2]}, steps=2), tmp_path / "s", client=client
        )


def test_load_model_has_the_runs_parameters_and_bn_statistics(store, client, tmp_path):
    from pipeline.errors import TrainingError
    from pipeline.solver import Solver
    from pipeline.training import train
    from tests.helpers.training import tiny_config

    summary = train(
        tiny_config(store, tmp_path / "bn", norm="spatial_batchnorm", steps=3), client=client
    )
    model = load_model(tmp_path / "bn")
    with np.load(tmp_path / "bn" / "params.npz") as f:
        saved = {k: f[k] for k in f.files}
    assert_same_params(
        {k: model.params[k] for k in model.params},
        {k: v for k, v in saved.items() if not k.startswith("bn_")},
    )
    assert np.array_equal(model.bn_param["running_mean"], saved["bn_running_mean"])
    assert np.array_equal(model.bn_param["running_var"], saved["bn_running_var"])
    assert model.params["W1"].dtype == np.float32
    # test-mode predictions on the whole val split: the run's own val accuracy, through the Solver
    from pipeline.data import open_store

    X, y = open_store(str(store)).read("val", np.arange(48), dtype=np.float32)
    solver = Solver(model, {"X_train": X, "y_train": y, "X_val": X, "y_val": y})
    assert solver.check_accuracy(X, y) == summary["val_acc"]
    (tmp_path / "bn" / "params.npz").unlink()
    with pytest.raises(TrainingError, match="params.npz: no such file"):
        load_model(tmp_path / "bn")
    assert summary["val_acc"] is not None


# ---- one owner at a time -------------------------------------------------------------------------


def test_a_sweep_directory_another_process_owns_is_refused_before_anything_runs(
    store, client, tmp_path
):
    out = tmp_path / "sweep"
    events = []
    with held_by_another_process(out, "job sweep-1 attempt 1") as holder:
        with pytest.raises(RunDirBusy) as refused:
            run_sweep(
                plan_of(store, {"method": "grid", "lr": [1e-2]}, steps=2),
                out,
                client=client,
                progress=events.append,
            )
    assert str(refused.value).startswith(f"{out} is being trained by pid {holder.pid} on host ")
    assert str(refused.value).endswith("(job sweep-1 attempt 1); wait for it or stop it")
    assert events == [] and sorted(p.name for p in out.iterdir()) == []


def test_a_trial_another_process_trains_stops_the_sweep_unfailed_and_the_sweep_resumes(
    store, client, tmp_path
):
    plan = plan_of(store, {"method": "grid", "lr": [1e-2, 3e-2]}, steps=2)
    run_sweep(plan, tmp_path / "whole", client=client)
    out = tmp_path / "cut"
    trial = out / "trials" / "t001"
    with held_by_another_process(trial) as holder:
        with pytest.raises(RunDirBusy, match=f"^{trial} is being trained by pid {holder.pid} "):
            run_sweep(plan, out, client=client)
        state = SweepState.load(out)
        assert [(t.state, t.error) for t in state.trials] == [("running", None)] * 2
        assert state.trials[0].scores and not state.trials[1].scores
    run_sweep(plan, out, client=client)  # once it let go: the trial is trained, not failed
    assert outcome(out) == outcome(tmp_path / "whole")


def test_a_trial_claimed_by_a_session_that_died_before_its_settings_starts_fresh(
    store, client, tmp_path
):
    """The earlier session made the trial's checkpoints/ (its claim) and died before its
    config.json: that claim does not fail the trial."""
    plan = plan_of(store, {"method": "grid", "lr": [1e-2, 3e-2]}, steps=2)
    run_sweep(plan, tmp_path / "whole", client=client)
    out = tmp_path / "cut"
    (out / "trials" / "t001" / "checkpoints").mkdir(parents=True)
    run_sweep(plan, out, client=client)
    assert [r["state"] for r in rows(out)] == ["completed", "completed"]
    assert outcome(out) == outcome(tmp_path / "whole")
