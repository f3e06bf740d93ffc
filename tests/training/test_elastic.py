"""Workers that join and leave a running job: each step is planned over the workers ready when
it is planned, and the run ends with the bits of an undisturbed one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading

import pytest
from distributed import Client, get_task_stream

import pipeline.training.exchange
from pipeline.cluster import connect, worker_addresses
from pipeline.options import worker_range
from pipeline.training import TrainConfig, resume_config, train
from pipeline.training.members import Membership
from tests.helpers.cluster import ProcessCluster, convpipe_exe, local_cluster, terminal_job
from tests.helpers.training import assert_same_params, final_params, make_store, tiny_config
from tests.helpers.wait import wait_until

# epochs of 4 steps, accuracies scored at their ends only: after any other step the next one is
# planned and submitted before the step is collected (after a scored one, after the scoring)
SETTINGS = dict(
    steps=12, batch_size=128, shard_size=32, num_filters=8, hidden_dim=32, eval_every=12
)
K = 5  # the step (1-based, as progress events count) at whose end the cluster changes


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(
        tmp_path_factory.mktemp("data") / "tiny.zarr", n_train=512, n_val=32, n_test=32
    )


@pytest.fixture
def every_step(monkeypatch):
    """The run asks the scheduler for its workers each time it plans a step (not at most every
    0.25 s): the steps at which a change is seen do not depend on the machine's speed."""
    monkeypatch.setattr(pipeline.training.exchange, "POLL_S", 0.0)


@pytest.fixture(scope="module")
def calm(store, tmp_path_factory):
    """The undisturbed run, on one worker (the bits are the same for any number)."""
    out = tmp_path_factory.mktemp("calm") / "run"
    with local_cluster(1) as cluster, Client(cluster) as client:
        train(tiny_config(store, out, **SETTINGS), client=client)
    return final_params(out)


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _part_steps(run_dir, worker: str) -> list[int]:
    """The (0-based) steps with a part computed on ``worker``, from the run's step lines."""
    return sorted(
        m["step"] - 1
        for m in _metrics(run_dir)
        if m["kind"] == "step" and worker in m["part_workers"]
    )


def _warmed_on(client, worker: str) -> bool:
    def done(dask_worker):
        return any(
            str(key).startswith("warm-up-join") and ts.state == "memory"
            for key, ts in dask_worker.state.tasks.items()
        )

    return client.run(done, workers=[worker])[worker]


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_a_worker_that_joins_takes_parts_after_its_warm_up_and_the_bits_stay(
    store, calm, tmp_path, transport, every_step
):
    out = tmp_path / "joined"
    events, added = [], []
    with local_cluster(1) as cluster, Client(cluster) as client:

        def progress(event):
            events.append(event)
            if event["event"] != "step":
                return
            if event["step"] == K:  # a second worker arrives
                before = set(worker_addresses(client))
                cluster.scale(2)
                wait_until(lambda: len(worker_addresses(client)) == 2, timeout=30)
                added.extend(set(worker_addresses(client)) - before)
            if event["step"] == K + 1:  # the next plan saw it and warms it up: wait for that
                wait_until(lambda: _warmed_on(client, added[0]), timeout=60)

        summary = train(
            tiny_config(store, out, transport=transport, **SETTINGS),
            client=client,
            progress=progress,
        )
        parts = _part_steps(out, added[0])

    # step K + 1 (0-based) was planned when the warm-up had not finished; step K + 2 after it
    assert parts and K <= parts[0] <= K + 2, parts
    widths = {m["step"]: m["workers"] for m in _metrics(out) if m["kind"] == "step"}
    assert widths == {s: 1 if s <= K + 2 else 2 for s in range(1, SETTINGS["steps"] + 1)}
    assert set(range(K + 2, SETTINGS["steps"])) <= set(parts)
    joined = [e for e in events if e["event"] == "workers"]
    assert [(e["worker"], e["change"]) for e in joined] == [(added[0], "joined")]
    assert "joined" in joined[0]["message"]
    assert summary["worker_changes"] == {"joined": 1, "left": 0, "died": 0}
    assert not any(e["event"] in ("resumed", "warning") for e in events), events
    assert_same_params(calm, final_params(out))


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_a_worker_retired_mid_run_hands_over_without_a_replay_and_the_bits_stay(
    store, calm, tmp_path, transport, every_step
):
    out = tmp_path / "retired"
    events, retired = [], []
    with local_cluster(2) as cluster, Client(cluster) as client:

        def progress(event):
            events.append(event)
            if event["event"] == "step" and event["step"] == K:
                retired.append(worker_addresses(client)[-1])
                # Dask's graceful retirement: no new tasks, its data moved to the other worker
                assert list(client.retire_workers([retired[0]])) == retired

        summary = train(
            tiny_config(store, out, transport=transport, **SETTINGS),
            client=client,
            progress=progress,
        )
        parts = _part_steps(out, retired[0])

    assert parts and max(parts) <= K + 1, parts  # in flight when it was retired, no later
    widths = [m["workers"] for m in _metrics(out) if m["kind"] == "step"]
    assert widths[:K] == [2] * K and widths[-1] == 1, widths
    left = [e for e in events if e["event"] == "workers"]
    assert [(e["worker"], e["change"]) for e in left] == [(retired[0], "left")]
    assert summary["worker_changes"] == {"joined": 0, "left": 1, "died": 0}
    # no checkpoint reloaded, no replay
    assert not any(e["event"] in ("resumed", "warning") for e in events), events
    assert_same_params(calm, final_params(out))


def test_a_worker_process_retired_while_its_step_loop_has_a_step_to_start_and_the_bits_stay(
    store, calm, tmp_path, every_step
):
    # worker processes, shared memory: the retired worker's step loop dies with it mid-step,
    # Dask starts it again on the other worker, and the next plan (one part) comes while the
    # step let in to the old loops is not done: the new loop starts once it is (before, the old
    # loops ended at the gate without it and the run stalled: "step 7: no progress for 300 s")
    from pipeline.cluster import worker_cluster

    out, events = tmp_path / "retired", []
    with worker_cluster(workers=2) as client:

        def progress(event):
            events.append(event)
            if event["event"] == "step" and event["step"] == K:
                assert len(client.retire_workers([worker_addresses(client)[-1]])) == 1

        summary = train(
            tiny_config(store, out, transport="shm", stall_timeout=60.0, **SETTINGS),
            client=client,
            progress=progress,
        )
    assert summary["worker_changes"] == {"joined": 0, "left": 1, "died": 0}
    widths = [m["workers"] for m in _metrics(out) if m["kind"] == "step"]
    assert widths[:K] == [2] * K and widths[-1] == 1, widths
    assert_same_params(calm, final_params(out))


# ---- the state machine ---------------------------------------------------------------------------


def test_membership_warms_a_newcomer_before_it_takes_parts():
    m = Membership()
    m.start({"a": "running"})
    assert m.observe({"a": "running", "b": "running"}) == (["b"], [])
    assert m.ready == ["a"] and m.warming == ["b"]
    assert m.observe({"a": "running", "b": "running"}) == ([], [])  # warmed up once only
    assert m.warmed("b")
    assert m.ready == ["a", "b"] and m.counts() == {"joined": 1, "left": 0, "died": 0}


def test_membership_counts_a_retirement_as_left_and_a_vanishing_as_died():
    m = Membership()
    m.start({"a": "running", "b": "running", "c": "running"})
    m.observe({"a": "running", "b": "closing_gracefully", "c": "running"})
    assert m.ready == ["a", "c"]  # a worker being retired takes no new parts
    new, gone = m.observe({"a": "running"})
    assert new == [] and gone == ["b", "c"]
    assert m.lost("b", expected=False) == "left"  # it was seen closing gracefully
    assert m.lost("c", expected=False) == "died"
    assert m.counts() == {"joined": 0, "left": 1, "died": 1}
    assert m.observe({"a": "running"}) == ([], [])  # each one counted once


def test_membership_a_worker_paused_while_it_warms_up_is_ready_once_its_warm_up_ends():
    m = Membership()
    m.start({"a": "running"})
    m.observe({"a": "running", "b": "running"})
    assert m.observe({"a": "running", "b": "paused"}) == ([], [])
    assert m.observe({"a": "running", "b": "running"}) == ([], [])
    assert m.ready == ["a"] and m.warming == ["b"]  # not planned before its warm-up ends
    assert m.warmed("b") and m.ready == ["a", "b"]


def test_membership_never_plans_a_worker_whose_warm_up_failed_and_takes_back_a_paused_one():
    m = Membership()
    m.start({"a": "running"})
    m.observe({"a": "running", "b": "running"})
    assert not m.warmed("b", ok=False)
    assert m.observe({"a": "running", "b": "running"}) == ([], [])
    assert m.ready == ["a"]
    m.observe({"a": "paused"})
    assert m.ready == []
    m.observe({"a": "running"})
    assert m.ready == ["a"] and m.counts()["joined"] == 0
    assert not m.warmed("zzz")  # a warm-up of a worker not warming changes nothing


# ---- --workers MIN:MAX ---------------------------------------------------------------------------


def test_workers_min_max_starts_min_workers_under_dask_adaptive_scaling():
    with connect(workers="1:3", processes=False) as client:
        adaptive = client.cluster._adaptive
        assert (adaptive.minimum, adaptive.maximum) == (1, 3)
        assert len(worker_addresses(client)) == 1
    with connect(workers=2, processes=False) as client:
        assert client.cluster._adaptive is None and len(worker_addresses(client)) == 2


@pytest.mark.parametrize(
    "given, size",
    [(None, None), (3, (3, None)), ("3", (3, None)), ("1:4", (1, 4)), ("2:2", (2, 2))],
)
def test_a_workers_setting_is_a_size_or_a_range(given, size):
    assert worker_range(given) == size
    assert TrainConfig(workers=given).validate().workers == (
        size[0] if size and size[1] is None else given
    )


# ---- a worker process told to end (docker stop, a scale-down) ------------------------------------


@pytest.mark.parametrize("transport", ["tcp"])
def test_a_worker_process_sent_sigterm_is_retired_first_and_the_run_does_not_replay(
    store, calm, tmp_path, transport
):
    # real `dask worker` processes, started with docker-compose.yml's command (its nanny
    # preloads pipeline.jobs.retire); SIGTERM to one, as `docker stop` sends it: its nanny has
    # the scheduler retire it (its slices copied to the other worker) before it ends
    out, events, stopped = tmp_path / "stopped", [], []
    with ProcessCluster(tmp_path / "cluster", n_workers=2) as cluster, cluster.client() as client:
        victim = cluster.workers[1]
        names = client.run(lambda dask_worker: dask_worker.name)

        def progress(event):
            events.append(event)
            if event["event"] == "step" and event["step"] == K:
                stopped.extend(a for a, name in names.items() if name == "worker-1")
                os.kill(victim.pid, signal.SIGTERM)  # as docker stop: the main process only
                wait_until(lambda: stopped[0] not in worker_addresses(client), timeout=30)

        summary = train(
            tiny_config(store, out, transport=transport, **SETTINGS),
            client=client,
            progress=progress,
        )
        log = cluster.log("scheduler")
    assert victim.wait(30) is not None
    left = [(e["worker"], e["change"]) for e in events if e["event"] == "workers"]
    assert left == [(stopped[0], "left")], (left, log)
    assert summary["worker_changes"] == {"joined": 0, "left": 1, "died": 0}
    assert not any(e["event"] in ("resumed", "warning") for e in events), events
    assert "Retire worker addresses (stimulus_id='convpipe-nanny-close-" in log, log
    assert f"Retired worker '{stopped[0]}'" in log, log
    assert_same_params(calm, final_params(out))


def test_the_nanny_leaves_a_job_coordinators_worker_to_the_jobs_own_restart():
    from pipeline.jobs.records import task_key
    from pipeline.jobs.retire import runs_a_coordinator

    assert runs_a_coordinator(["part-3-0-ab", task_key("train-abc", 1)])
    assert not runs_a_coordinator(["part-3-0-ab", "update-3-ab-1", "convpipe-preflight-x-1"])


# ---- tasks per step ------------------------------------------------------------------------------


@pytest.mark.parametrize("transport, per_worker", [("shm", 0), ("tcp", 5)])
def test_a_step_is_a_few_tasks_per_worker_on_either_transport(
    store, tmp_path, transport, per_worker
):
    # O(W) tasks a step: tcp a part, an update and three small tasks (stats, partial sums,
    # weights) per worker: the pieces of the reduce-scatter go worker to worker, not as W^2
    # tasks of the graph; shared memory none: one step loop per worker runs every step
    steps = 6
    for width in (1, 2, 4):
        with local_cluster(width) as cluster, Client(cluster) as client:
            with get_task_stream(client) as stream:
                train(
                    tiny_config(
                        store,
                        tmp_path / f"{transport}-{width}",
                        transport=transport,
                        **{**SETTINGS, "steps": steps},
                    ),
                    client=client,
                )
        keys = [str(t["key"]) for t in stream.data]
        per_step = [k for k in keys if not k.startswith(("warm-up", "shard_predictions"))]
        if transport == "shm":  # one step loop per worker, for all the steps
            assert sorted(k.split("-")[0] for k in per_step) == ["steps"] * width, per_step
            continue
        one_offs = 2 * width  # tcp: the state's first slices and their weights
        assert (
            steps * per_worker * width <= len(per_step) <= steps * per_worker * width + one_offs
        ), (
            width,
            sorted(per_step),
        )


def test_ctrl_c_with_a_worker_that_adaptive_scaling_added_is_one_line(tmp_path):
    # `convpipe train --workers 1:2`: Dask's adaptive scaling starts the second worker process
    # mid-run; a terminal's Ctrl-C (SIGINT to the whole process group) once the run has taken
    # it: the command stops with its one line, no worker prints a KeyboardInterrupt traceback
    data = make_store(tmp_path / "big.zarr", n_train=4096, n_val=64, n_test=64, chunk=512)
    proc = subprocess.Popen(
        [
            *convpipe_exe(),
            "train",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "run"),
            "--workers",
            "1:2",
            "--steps",
            "400",
            "--batch-size",
            "256",
            "--shard-size",
            "64",
            "--train-acc-samples",
            "64",
            "--eval-every",
            "1000",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        **terminal_job(),
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        wait_until(
            lambda: any("joined" in ln for ln in lines) or proc.poll() is not None,
            timeout=120,
            what=lambda: "a worker joining:\n" + "".join(lines[-20:]),
        )
        assert proc.poll() is None, "".join(lines)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(120) == 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    reader.join(10)
    err = "".join(lines)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.rstrip().splitlines()[-1].startswith("convpipe: interrupted"), err


# ---- Ctrl-C while two steps are in flight --------------------------------------------------------


def test_an_interrupt_while_the_next_step_overwrites_the_state_keeps_the_step_in_flight(
    store, calm, tmp_path, monkeypatch
):
    # Ctrl-C lands while the coordinator waits for step K and step K + 1 (submitted ahead) has
    # begun its update, which overwrites the shared-memory copy holding the state before step
    # K: that state can no longer be kept. The run collects step K and keeps the state after
    # it. (Before: "no checkpoint of the interrupted run: the state of step K was overwritten
    # by step K + 1 while it was read", and --resume went back to an older checkpoint.)
    from pipeline.training.shm import SharedMemoryExchange

    AT = 5  # 0-based; an epoch is 4 steps, checkpointed at its end: the interrupt is not
    collect = SharedMemoryExchange.collect

    def interrupted(self, pending, timeout=None):
        step = pending[0]
        if step == AT and not getattr(self, "interrupted", False):
            self.interrupted = True
            records = self.shared.slices[(step + 1) % 2]
            wait_until(lambda: (records[:, 0] == step + 1).any(), timeout=30)  # K+1 updates
            raise KeyboardInterrupt
        return collect(self, pending, timeout)

    monkeypatch.setattr(SharedMemoryExchange, "collect", interrupted)
    out, events = tmp_path / "run", []
    settings = {**SETTINGS, "checkpoint_every": 100}
    with local_cluster(2) as cluster, Client(cluster) as client:
        with pytest.raises(KeyboardInterrupt):
            train(
                tiny_config(store, out, transport="shm", **settings),
                client=client,
                progress=events.append,
            )
        assert not [e for e in events if e["event"] == "warning"], events
        kept = [e["step"] for e in events if e["event"] == "checkpoint"]
        assert kept == [4, AT + 1], kept  # the epoch's end, then steps 0..AT done
        monkeypatch.setattr(SharedMemoryExchange, "collect", collect)
        train(resume_config(str(out)), client=client)
    lines = _metrics(out)
    assert [m["step"] for m in lines if m["kind"] == "step"] == list(
        range(1, SETTINGS["steps"] + 1)
    )
    assert_same_params(calm, final_params(out))
