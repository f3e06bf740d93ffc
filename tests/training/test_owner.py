"""A run directory has one owner at a time: the process that trains there holds its owner.json
(pipeline.procs.OwnerLock through RunDir.claim); a second trainer or resume is refused in one
line naming it; the lock of an owner that has ended is taken over; it is released however the
run ends."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

from pipeline import procs
from pipeline.cli import main
from pipeline.procs import Holder, LockHeld, Owner, OwnerLock, pid_namespace, process_started
from pipeline.training import resume_config, train
from pipeline.training.rundir import RunDir, RunDirBusy
from tests.helpers.owners import held_by_another_process, left_by_a_dead_process
from tests.helpers.training import Crash, make_store, stop_at, tiny_config
from tests.helpers.wait import wait_until

HOST = socket.gethostname()
SINCE = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(
        tmp_path_factory.mktemp("data") / "tiny.zarr", n_train=128, n_val=32, n_test=32
    )


@pytest.fixture(scope="module")
def client(training_client):
    """The runs here train on the module's two in-process workers (tests/conftest.py)."""
    return training_client


def cut_run(store, tmp_path, client):
    """A run of 4 steps stopped after step 3 (its last checkpoint: step 2)."""
    run = tmp_path / "run"
    with pytest.raises(Crash):
        train(tiny_config(store, run, steps=4), client=client, progress=stop_at(3, Crash()))
    return run


def busy(run, pid: int, what: str) -> str:
    """The message of a refused trainer, as a regular expression."""
    return (
        rf"^{run} is being trained by pid {pid} on host {HOST} since {SINCE} \({what}\); "
        r"wait for it or stop it$"
    )


# ---- train and resume --------------------------------------------------------------------------


def test_a_resume_of_a_run_another_process_holds_is_refused_naming_it(store, tmp_path, client):
    run = cut_run(store, tmp_path, client)
    before = {p.name: p.read_bytes() for p in (run / "metrics.jsonl", run / "config.json")}
    with held_by_another_process(run, "job train-1 attempt 2") as holder:
        with pytest.raises(RunDirBusy, match=busy(run, holder.pid, "job train-1 attempt 2")):
            train(resume_config(run), client=client)
        # nothing of the run was touched
        assert {p: (run / p).read_bytes() for p in before} == before
        assert json.loads((run / "owner.json").read_text())["pid"] == holder.pid
    assert not (run / "owner.json").exists()
    train(resume_config(run), client=client)  # once it let go
    assert (run / "params.npz").exists()


def test_a_new_run_in_a_directory_another_process_holds_is_refused(store, tmp_path, client):
    out = tmp_path / "out"
    with held_by_another_process(out) as holder:
        with pytest.raises(RunDirBusy, match=busy(out, holder.pid, "convpipe train")):
            train(tiny_config(store, out, steps=2), client=client)
        assert list(out.iterdir()) == [out / "owner.json"]  # nothing of a run was written


def test_a_dead_owners_lock_is_taken_over(store, tmp_path, client):
    run = cut_run(store, tmp_path, client)
    dead = left_by_a_dead_process(run)
    assert not procs.pid_alive(dead)
    seen = []

    def progress(event):
        if event["event"] == "step":
            seen.append(json.loads((run / "owner.json").read_text()))

    train(resume_config(run), client=client, progress=progress)
    assert {(o["pid"], o["what"]) for o in seen} == {(os.getpid(), "convpipe train")}
    assert not (run / "owner.json").exists()


@pytest.mark.parametrize(
    "ending", [None, Crash(), KeyboardInterrupt()], ids=["finished", "crash", "ctrl-c"]
)
def test_the_owner_lets_go_however_the_run_ends(store, tmp_path, client, ending):
    run = tmp_path / "run"
    seen = []

    def progress(event):
        if event["event"] == "step":
            seen.append(json.loads((run / "owner.json").read_text()))
            if ending is not None and event["step"] == 3:
                raise ending

    config = tiny_config(store, run, steps=4)
    if ending is None:
        train(config, client=client, progress=progress)
    else:
        with pytest.raises(type(ending)):
            train(config, client=client, progress=progress)
    owner = seen[0]
    assert (owner["pid"], owner["host"], owner["what"]) == (os.getpid(), HOST, "convpipe train")
    assert owner["started"] == process_started(os.getpid())
    assert not (run / "owner.json").exists()
    if ending is not None:  # and the next one gets it
        train(resume_config(run), client=client)


def test_a_resume_refused_for_its_settings_lets_go_of_the_run(store, tmp_path, client):
    from pipeline.errors import TrainingError

    run = cut_run(store, tmp_path, client)
    with pytest.raises(TrainingError, match="lr is 0.5"):
        train(resume_config(run, lr=0.5), client=client)
    assert not (run / "owner.json").exists()


def test_convpipe_train_resume_of_a_run_that_a_trainer_trains_is_one_line(store, tmp_path, capsys):
    """A real `convpipe train` in another process (on its own embedded cluster) trains the run;
    `convpipe train --resume` of it is refused in one line naming it; SIGTERM stops that
    trainer, which lets go."""
    options = ["--batch-size=64", "--shard-size=16", "--num-filters=4", "--filter-size=3"]
    options += ["--hidden-dim=16", "--weight-scale=1e-2", "--train-acc-samples=64"]
    options += ["--steps=100000", "--checkpoint-every=1000", "--workers=1"]
    run = tmp_path / "run"
    trainer = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "train", "--data", str(store), "--out", str(run)]
        + options,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        metrics = run / "metrics.jsonl"
        wait_until(
            lambda: (
                (metrics.exists() and '"step"' in metrics.read_text()) or trainer.poll() is not None
            ),
            timeout=180,
            what="the trainer's first step",
        )
        assert trainer.poll() is None, trainer.stderr.read()
        code = main(["train", "--resume", str(run)])
        err = capsys.readouterr().err
    finally:
        trainer.send_signal(signal.SIGTERM)
        _, trainer_err = trainer.communicate(timeout=120)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"convpipe: error: {run} is being trained by pid {trainer.pid} ")
    assert err.rstrip().endswith("(convpipe train); wait for it or stop it")
    assert trainer.returncode == 128 + signal.SIGTERM, trainer_err
    assert not (run / "owner.json").exists()  # SIGTERM: it let go


# ---- the lock itself -----------------------------------------------------------------------------


def test_a_pid_now_naming_another_process_does_not_hold_the_lock(tmp_path):
    """A lock naming this process's pid with another start time was left by a process whose pid
    was reused."""
    me = Owner.me()
    stale = Holder(me, process_started(me.pid) - 1, "2000-01-01T00:00:00Z", "convpipe train")
    (tmp_path / "owner.json").write_bytes(stale.to_json("old"))
    with RunDir(tmp_path).claim("next"):
        assert json.loads((tmp_path / "owner.json").read_text())["what"] == "next"
    assert not (tmp_path / "owner.json").exists()


def test_an_owner_on_another_host_holds_until_known_gone(tmp_path):
    elsewhere = Owner("another-host", pid_namespace(), 4242)
    holder = Holder(elsewhere, 7, "2026-12-04T18:00:00Z", "job train-1 attempt 1")
    (tmp_path / "owner.json").write_bytes(holder.to_json("theirs"))
    with pytest.raises(RunDirBusy) as refused:
        RunDir(tmp_path).claim("convpipe train")
    assert str(refused.value) == (
        f"{tmp_path} is being trained by pid 4242 on host another-host since "
        "2026-12-04T18:00:00Z (job train-1 attempt 1); wait for it or stop it (if it has ended, "
        f"delete {tmp_path / 'owner.json'})"
    )
    with pytest.raises(RunDirBusy):  # another process of that host is not it
        RunDir(tmp_path).claim("x", gone=Owner("another-host", pid_namespace(), 4243))
    RunDir(tmp_path).claim("job train-1 attempt 2", gone=elsewhere).release()
    assert not (tmp_path / "owner.json").exists()


def test_a_live_local_owner_holds_whatever_the_caller_says_is_gone(tmp_path):
    with held_by_another_process(tmp_path) as holder:
        with pytest.raises(RunDirBusy):
            RunDir(tmp_path).claim("x", gone=Owner(HOST, pid_namespace(), holder.pid))


def test_a_lock_file_without_a_record_is_waited_for_then_taken_over(tmp_path, monkeypatch):
    monkeypatch.setattr(procs, "UNWRITTEN_S", 0.05)
    (tmp_path / "owner.json").write_bytes(b"")  # its maker died between creating and writing
    with RunDir(tmp_path).claim("next"):
        assert json.loads((tmp_path / "owner.json").read_text())["what"] == "next"


def test_release_never_removes_a_successors_lock(tmp_path):
    lock = OwnerLock(tmp_path / "owner.json", "first").acquire()
    (tmp_path / "owner.json").write_text("a successor's record\n")
    lock.release()
    assert (tmp_path / "owner.json").read_text() == "a successor's record\n"


def test_of_successors_racing_for_a_dead_owners_lock_one_gets_it(tmp_path):
    dead_pid = left_by_a_dead_process(tmp_path / "template")
    stale = (tmp_path / "template" / "owner.json").read_bytes()
    path = tmp_path / "owner.json"
    for _ in range(20):
        path.write_bytes(stale)
        barrier = threading.Barrier(4)
        results: list = [None] * 4

        def take(i):
            barrier.wait()
            try:
                results[i] = OwnerLock(path, f"successor {i}").acquire()
            except LockHeld as exc:
                results[i] = exc

        threads = [threading.Thread(target=take, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        won = [r for r in results if isinstance(r, OwnerLock)]
        assert len(won) == 1, results
        assert all(
            isinstance(r, LockHeld) and r.holder.what == won[0].what
            for r in results
            if r is not won[0]
        )
        assert json.loads(path.read_text())["what"] == won[0].what
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith("owner.json.")] == []
        won[0].release()
    assert not procs.pid_alive(dead_pid)
