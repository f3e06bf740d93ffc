"""Faults with real processes: a worker process killed mid-epoch, the coordinator process
killed and resumed from the command line."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from pipeline.cluster import worker_cluster
from pipeline.training import train
from tests.helpers.training import assert_same_params, final_params, make_store, tiny_config
from tests.helpers.wait import wait_until


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(
        tmp_path_factory.mktemp("data") / "tiny.zarr", n_train=512, n_val=32, n_test=32
    )


#: a spec network with what its recipe adds to the three-layer net's: flips and shifts drawn on
#: the workers, batch norm, Nesterov SGD on a schedule, lookahead
RECIPE = dict(
    model="conv 4 3, bn momentum=0.6 scale=false, gelu, pool 2, conv 6 3, relu, gap, affine",
    flip="alternate",
    translate=2,
    optimizer="sgd",
    lr=0.05,
    schedule="triangular",
    warmup=0.25,
    lookahead=3,
    norm_lr_factor=4.0,
)


@pytest.mark.parametrize(
    "transport, recipe",
    [("shm", False), ("tcp", False), ("shm", True), ("tcp", True)],
    ids=["shm", "tcp", "shm-recipe", "tcp-recipe"],
)
def test_a_worker_process_killed_mid_epoch_loses_no_shard(store, tmp_path, transport, recipe):
    # a process-based LocalCluster (worker processes under nannies), one worker SIGKILLed
    # while the step's part tasks run: with shared memory the scheduler reruns its part (which
    # finds its inputs intact), over tcp the slices' state it held is gone and the run replays
    # from its last checkpoint; either way the run ends with the same bits as an undisturbed one
    # (with a recipe's network: its augmentation draws, BN statistics and lookahead too)
    settings = dict(
        steps=14, batch_size=128, shard_size=32, num_filters=8, hidden_dim=32, transport=transport
    )
    settings.update(RECIPE if recipe else {})
    with worker_cluster(workers=2) as client:
        train(tiny_config(store, tmp_path / "calm", **settings), client=client)
        before = client.run(os.getpid)
        victim = sorted(before.values())[0]
        killed = threading.Event()
        events = []

        def progress(event):
            events.append(event)
            # once: a replay (tcp) reports step 4 again
            if (
                event["event"] == "step"
                and event["step"] == 4
                and not any(e["event"] == "resumed" for e in events)
            ):

                def kill():
                    os.kill(victim, signal.SIGKILL)
                    killed.set()

                threading.Timer(0.01, kill).start()  # lands inside step 5's part tasks

        summary = train(
            tiny_config(store, tmp_path / "killed", **settings), client=client, progress=progress
        )
        assert killed.wait(5)
        # the nanny brought a worker back: two workers again, and the victim's pid is gone
        client.wait_for_workers(2, timeout=60)
        assert victim not in client.run(os.getpid).values()
        # and the scheduler ran at least one of the run's part tasks a second time (its first
        # run died with the worker): the lost work was redone, not skipped
        starts = client.run_on_scheduler(_processing_starts)
    replayed = [
        e
        for e in events
        if e["event"] == "warning" and "replaying from the last checkpoint" in e["message"]
    ]
    if transport == "shm":
        assert any(n >= 2 for key, n in starts.items() if key.startswith("steps-")), starts
        assert not replayed
    else:
        assert len(replayed) == 1, replayed
    assert summary["steps"] == 14 and summary["images"] == 14 * 128  # every shard counted once
    steps = [
        json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [m["n"] for m in steps if m["kind"] == "step"] == [128] * 14
    assert_same_params(final_params(tmp_path / "calm"), final_params(tmp_path / "killed"))


def _processing_starts(dask_scheduler=None) -> dict:
    """How often each task key was sent to a worker (from the scheduler's transition log)."""
    counts: dict = {}
    for key, _start, finish, *_ in dask_scheduler.transition_log:
        if finish == "processing":
            counts[str(key)] = counts.get(str(key), 0) + 1
    return counts


def _cli(*args):
    return [sys.executable, "-m", "pipeline.cli", *map(str, args)]


TINY = dict(
    batch_size=64,
    shard_size=16,
    num_filters=4,
    filter_size=3,
    hidden_dim=16,
    weight_scale=0.01,
    lr=0.01,
    train_acc_samples=64,
    steps=24,
    checkpoint_every=3,
)


@pytest.mark.parametrize("recipe", [False, True], ids=["three-layer", "recipe"])
def test_the_coordinator_killed_resumes_from_its_checkpoint_bit_identically(
    store, tmp_path, recipe
):
    # a cluster of worker processes outlives its coordinator: `convpipe train --scheduler`
    # is SIGKILLed after its first checkpoint, `convpipe train --resume` finishes the run
    # (the three-layer net, or a spec network with its recipe's augmentation and lookahead)
    settings = {**TINY, **(RECIPE if recipe else {})}
    options = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    with _shared_cluster(tmp_path / "cluster") as client:
        address = client.scheduler.address
        train(tiny_config(store, tmp_path / "full", **settings), client=client)  # the reference

        run = tmp_path / "cut"
        proc = subprocess.Popen(
            _cli("train", "--data", store, "--scheduler", address, "--out", run, *options),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            wait_until(
                lambda: list((run / "checkpoints").glob("step-*.npz")) or proc.poll() is not None,
                timeout=120,
                what="the run's first checkpoint",
            )
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the coordinator dies mid-run
        assert proc.wait(30) == -signal.SIGKILL
        assert not (run / "params.npz").exists()
        steps_before = sum(
            1 for x in (run / "metrics.jsonl").read_text().splitlines() if '"step"' in x
        )
        assert 3 <= steps_before < 24

        resumed = subprocess.run(
            _cli("train", "--resume", run, "--scheduler", address),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert resumed.returncode == 0, resumed.stderr
        assert "resuming at step" in resumed.stderr
        assert_same_params(final_params(tmp_path / "full"), final_params(run))
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in lines if m["kind"] == "step"] == list(range(1, 25))

        evaluated = subprocess.run(
            _cli("evaluate", run, "--split", "val", "--scheduler", address),
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert evaluated.returncode == 0, evaluated.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert evaluated.stdout.startswith("val accuracy ")
    assert float(evaluated.stdout.split()[2]) == pytest.approx(summary["val_acc"], abs=1e-4)


def _external_cluster(tmp_path, workers: int, nanny: bool):
    """A `dask scheduler` and `dask worker` processes (with or without nannies);
    -> (address, procs)."""
    sched_file = tmp_path / "scheduler.json"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "distributed.cli.dask_scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",
                "--scheduler-file",
                sched_file,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    ]
    wait_until(sched_file.exists, timeout=60, what="the scheduler's file", interval=0.05)
    address = json.loads(sched_file.read_text())["address"]
    for _ in range(workers):
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "distributed.cli.dask_worker",
                    address,
                    "--nthreads",
                    "1",
                    "--host",
                    "127.0.0.1",
                    "--no-dashboard",
                    *([] if nanny else ["--no-nanny"]),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
    return address, procs


@contextlib.contextmanager
def _shared_cluster(tmp_path, workers: int = 1):
    """A client of a `dask scheduler` and worker processes (nannies) that other processes can
    reach with `--scheduler ADDR`: the embedded cluster speaks TLS with a certificate only its
    own process holds, so a second `convpipe` could not join it."""
    from distributed import Client

    tmp_path.mkdir(parents=True, exist_ok=True)
    address, procs = _external_cluster(tmp_path, workers, nanny=True)
    try:
        with Client(address, timeout=30) as client:
            client.wait_for_workers(workers, timeout=60)
            yield client
    finally:
        for p in procs:
            p.kill()
            p.wait(30)


def test_every_worker_gone_stops_training_within_the_stall_timeout(store, tmp_path):
    # workers that nothing restarts (no nanny) all die mid-run: `convpipe train` fails with one
    # line naming the step and what happened, within its stall timeout, and keeps its checkpoint
    from distributed import Client

    address, procs = _external_cluster(tmp_path, 2, nanny=False)
    try:
        with Client(address) as client:
            client.wait_for_workers(2, timeout=60)
            pids = list(client.run(os.getpid).values())
        run = tmp_path / "run"
        options = [f"--{k.replace('_', '-')}={v}" for k, v in {**TINY, "steps": 100000}.items()]
        proc = subprocess.Popen(
            _cli(
                "train",
                "--data",
                store,
                "--scheduler",
                address,
                "--out",
                run,
                "--stall-timeout",
                5,
                *options,
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        wait_until(
            lambda: list((run / "checkpoints").glob("step-*.npz")) or proc.poll() is not None,
            timeout=120,
            what="the run's first checkpoint",
        )
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = proc.communicate(timeout=90)
        assert proc.returncode == 2, err
        assert time.monotonic() - killed_at < 60
        last = err.strip().splitlines()[-1]
        assert (
            last.startswith("convpipe: error: step ")
            and "no progress for 5 s" in last
            and "0 workers" in last
        ), err
        checkpoints = sorted((run / "checkpoints").glob("step-*.npz"))
        assert checkpoints
        from pipeline.checkpoint import load_checkpoint

        load_checkpoint(checkpoints[-1])  # intact
    finally:
        for p in procs:
            p.kill()
            p.wait(30)


def test_sigterm_stops_train_like_ctrl_c_and_the_run_resumes_bit_identically(store, tmp_path):
    options = [
        f"--{k.replace('_', '-')}={v}" for k, v in {**TINY, "checkpoint_every": 1000}.items()
    ]
    with _shared_cluster(tmp_path / "cluster") as client:
        address = client.scheduler.address
        train(
            tiny_config(store, tmp_path / "full", **{**TINY, "checkpoint_every": 1000}),
            client=client,
        )
        run = tmp_path / "cut"
        proc = subprocess.Popen(
            _cli("train", "--data", store, "--scheduler", address, "--out", run, *options),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        metrics = run / "metrics.jsonl"
        try:
            wait_until(
                lambda: metrics.exists() and metrics.read_text().count('"step"') >= 3,
                timeout=120,
                what="3 steps in metrics.jsonl",
            )
        finally:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 143, err
        saved = sorted((run / "checkpoints").glob("step-*.npz"))
        assert saved, "no checkpoint of the interrupted run"  # none was due before step 1000
        step = int(saved[-1].stem.removeprefix("step-"))
        assert err.strip().splitlines()[-1] == (
            f"convpipe: terminated (SIGTERM) at step {step}; continue with: convpipe train "
            f"--resume {run}"
        ), err
        resumed = subprocess.run(
            _cli("train", "--resume", run, "--scheduler", address),
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert resumed.returncode == 0, resumed.stderr
    assert_same_params(final_params(tmp_path / "full"), final_params(run))
