"""Distributed training on in-process Dask clusters: determinism, equivalence with one
process, BN synchronization, the run directory, resume, divergence and evaluation."""

from __future__ import annotations

import json
import logging
import math
import time

import numpy as np
import pytest
from distributed import Client, get_task_stream

from pipeline.checkpoint import load_checkpoint
from pipeline.cnn import ModelSpec
from pipeline.data import open_store
from pipeline.errors import DataError, TrainingError
from pipeline.optim import adam
from pipeline.training import evaluate, resume_config, train
from pipeline.training.shards import Schedule
from tests.helpers.cluster import local_cluster
from tests.helpers.training import (
    Crash,
    assert_same_params,
    crash_after,
    final_params,
    make_store,
    tiny_config,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(
        tmp_path_factory.mktemp("data") / "tiny.zarr", n_train=200, n_val=48, n_test=40
    )


def _client(n):
    """A cluster of ``n`` in-process workers like ``training_client``'s, and its client."""
    cluster = local_cluster(n, dashboard_address=None, silence_logs=logging.WARNING)
    return cluster, Client(cluster)


@pytest.fixture(scope="module")
def client(training_client):
    """The runs here train on the module's two in-process workers (tests/conftest.py)."""
    return training_client


# ---- determinism ---------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["none", "spatial_batchnorm"])
def test_same_bits_with_1_2_3_and_4_workers_and_both_transports(store, tmp_path, norm):
    # 9 shards a step (7 in an epoch's last, short step): 3 workers take 3 + 3 + 3, 4 workers
    # 2 + 2 + 2 + 3; each sums its own into tree nodes and updates its slice of the parameters
    results = {}
    for n in (1, 2, 3, 4):
        cluster, c = _client(n)
        try:
            for transport in ("shm", "tcp"):
                s = train(
                    tiny_config(
                        store,
                        tmp_path / f"w{n}{transport}",
                        norm=norm,
                        steps=5,
                        batch_size=72,
                        shard_size=8,
                        transport=transport,
                    ),
                    client=c,
                )
                assert (s["workers"], s["transport"]) == (n, transport)
                results[n, transport] = final_params(tmp_path / f"w{n}{transport}")
        finally:
            c.close()
            cluster.close()
    for params in results.values():
        assert_same_params(results[1, "shm"], params)
    if norm == "spatial_batchnorm":
        assert {"gamma1", "beta1", "bn_running_mean", "bn_running_var"} <= results[1, "shm"].keys()
        assert results[1, "shm"]["bn_running_var"].any()


@pytest.mark.parametrize("shard_size", [16, 32])  # 4 shards a step in 2 parts of 2, or 2 of 1
def test_shared_memory_and_tcp_transports_give_the_same_bits(store, tmp_path, client, shard_size):
    settings = dict(norm="groupnorm", steps=4, shard_size=shard_size)
    a = train(tiny_config(store, tmp_path / "shm", transport="shm", **settings), client=client)
    b = train(tiny_config(store, tmp_path / "tcp", transport="tcp", **settings), client=client)
    assert (a["transport"], b["transport"]) == ("shm", "tcp")
    assert_same_params(final_params(tmp_path / "shm"), final_params(tmp_path / "tcp"))


def test_step_loops_give_the_bits_of_a_task_per_step_and_outwait_a_long_pause(
    store, tmp_path, client, monkeypatch
):
    """On shared memory each worker runs its part of every step in one task (a step loop), let
    in step by step by the coordinator; where the cluster may grow by itself (Dask's adaptive
    scaling), a task per part and step. Same bits. A coordinator paused past the stall timeout
    (4 s after a step, its scoring or checkpoint say) finds its loops waiting at the gate."""
    import pipeline.training.coordinator as coordinator

    settings = dict(norm="groupnorm", steps=6, shard_size=16, transport="shm", stall_timeout=2.5)
    with get_task_stream(client) as looped:
        train(tiny_config(store, tmp_path / "loops", **settings), client=client)
    with get_task_stream(client) as paused:
        train(
            tiny_config(store, tmp_path / "paused", **settings),
            client=client,
            progress=lambda e: e["event"] == "step" and e["step"] == 3 and time.sleep(4.0),
        )
    monkeypatch.setattr(coordinator, "grows_by_itself", lambda client: True)
    with get_task_stream(client) as tasks:
        train(tiny_config(store, tmp_path / "tasks", **settings), client=client)

    def keys(stream, prefix):
        return [t["key"] for t in stream.data if str(t["key"]).startswith(prefix)]

    assert len(keys(looped, "steps-")) == 2 and not keys(looped, "part-")  # 2 workers
    assert len(keys(paused, "steps-")) == 2 and not keys(paused, "part-")  # the same loops
    assert not keys(tasks, "steps-") and len(keys(tasks, "part-")) == 6 * 2
    for run in ("paused", "tasks"):
        assert_same_params(final_params(tmp_path / "loops"), final_params(tmp_path / run))


# ---- equivalence with a single process -----------------------------------------------------------


def _single_process(store, config, steps):
    """The same training in one process: the whole global batch through model.loss, cs231n Adam."""
    st = open_store(store)
    spec = ModelSpec.of(config, len(st.class_names))
    model = spec.build(weight_scale=config.weight_scale, reg=config.reg, seed=config.seed)
    sched = Schedule(
        st.splits["train"], config.batch_size, config.shard_size, config.seed, config.epochs, steps
    )
    configs = {k: {"learning_rate": config.lr} for k in model.params}
    for step in range(steps):
        X, y = st.read("train", sched.batch(step), dtype=config.dtype)
        _, grads = model.loss(X, y)
        for k in model.params:
            model.params[k], configs[k] = adam(model.params[k], grads[k], configs[k])
    return model


def test_step_gradient_equals_the_single_process_gradient_float64(store, tmp_path, client):
    config = tiny_config(store, tmp_path / "run", dtype="float64", steps=4, reg=1e-2)
    train(config, client=client)
    got = final_params(tmp_path / "run")
    model = _single_process(store, config, 4)
    for k, v in model.params.items():
        assert got[k].dtype == np.float64
        np.testing.assert_allclose(got[k], v, rtol=1e-9, atol=1e-12, err_msg=k)


@pytest.mark.parametrize("transport", ["shm", "tcp"])
@pytest.mark.parametrize("width", [1, 2, 3])
def test_reduced_gradient_is_the_whole_batch_gradient_float64(store, client, transport, width):
    # Adam hides a constant factor in the parameters, so check its first moment after one step
    # from zero, (1 - beta1) * gradient: shard sums over 5 shards (the last one short) in
    # `width` parts, tree-reduced by slice on the workers, / n, + reg * W
    from pipeline.training.plan import Layout
    from pipeline.training.transport import open_exchange
    from pipeline.training.worker import TaskSpec

    st = open_store(store)
    spec = ModelSpec(4, 3, 16, len(st.class_names), "none", 4, "float64")
    model = spec.build(weight_scale=5e-2, reg=0.3, seed=7)
    layout = Layout.of(model.params)
    segments = tuple(
        (sl.start, sl.stop, 0.3 if name[0] == "W" else 0.0) for name, sl in layout.slices().items()
    )
    exchange = open_exchange(
        client,
        transport,
        TaskSpec(spec, st.path, layout, 1, segments),
        layout,
        slots=5,
        width=width,
    )
    try:
        assert exchange.kind == transport
        params = layout.flatten(model.params)
        exchange.start(0, params, np.zeros_like(params), np.zeros_like(params))
        idx = np.random.default_rng(0).permutation(200)[:72]
        shards = [idx[i : i + 16] for i in range(0, 72, 16)]
        parts = exchange.collect(exchange.submit(0, exchange.plan(len(shards)), shards, 72, 1))
        _, m, _ = exchange.state(1)
    finally:
        exchange.close()
    assert len(parts) == width
    stats = [s for p in parts for s in p["shards"]]
    grad = m / 0.1
    X, y = st.read("train", idx, dtype="float64")
    loss, grads = model.loss(X, y)
    for name, view in layout.views(grad).items():
        np.testing.assert_allclose(view, grads[name], rtol=1e-10, atol=1e-14, err_msg=name)
    assert sum(s["n"] for s in stats) == 72 and [s["n"] for s in stats] == [16, 16, 16, 16, 8]
    data_loss = sum(s["loss_sum"] for s in stats) / 72
    reg_loss = 0.15 * sum(float(np.sum(model.params[w] ** 2)) for w in ("W1", "W2", "W3"))
    assert data_loss + reg_loss == pytest.approx(loss, rel=1e-12)
    # the workers' per-block sums of squares give the L2 term
    assert 0.15 * math.fsum(x for p in parts for x in p["partials"]) == pytest.approx(
        reg_loss, rel=1e-12
    )


def test_a_new_step_loop_starts_after_the_step_let_in_to_the_old_ones(store, client, monkeypatch):
    # A step is let in to two step loops, one of which cannot start yet (its worker's thread is
    # busy); the next step is planned in one part. The new loop must not start before the step
    # let in to the old ones is done: they end at the gate, and a loop yet to start would skip
    # it (the step never done, the run stalled). The busy thread is freed as the coordinator
    # waits for that step.
    from distributed import Event

    from pipeline.training.plan import Layout, StepPlan
    from pipeline.training.transport import open_exchange
    from pipeline.training.worker import TaskSpec

    st = open_store(store)
    spec = ModelSpec(4, 3, 16, len(st.class_names), "none", 4, "float64")
    model = spec.build(weight_scale=5e-2, reg=0.0, seed=7)
    layout = Layout.of(model.params)
    sched = Schedule(st.splits["train"], 64, 16, 0, 1)
    task = TaskSpec(spec, st.path, layout, 1, ((0, layout.size, 0.0, 1.0),), timeout=10.0)
    exchange = open_exchange(client, "shm", task, layout, slots=4, width=None, timeout=10.0)
    started, release = Event("busy-started"), Event("busy-release")

    def busy():
        started.set()
        release.wait(60)

    try:
        exchange.start(0, layout.flatten(model.params), *[np.zeros(layout.size)] * 2)
        exchange.follow(sched, 1)
        blocker = client.submit(busy, workers=[exchange.addresses[1]], pure=False)
        started.wait(30)
        first = exchange.submit(0, StepPlan.make(4, 2, layout.size), sched.shards(0), 64, 1)
        waiting = exchange._read_step

        def freed(*args):
            release.set()
            return waiting(*args)

        monkeypatch.setattr(exchange, "_read_step", freed)
        second = exchange.submit(1, StepPlan.make(4, 1, layout.size), sched.shards(1), 64, 2)
        parts = [exchange.collect(first), exchange.collect(second)]
        blocker.result(30)
    finally:
        release.set()
        exchange.close()
    assert [len(p) for p in parts] == [2, 1]
    assert [sum(s["n"] for p in step for s in p["shards"]) for step in parts] == [64, 64]


def test_bn_statistics_are_synchronized_like_one_process(store, tmp_path, client):
    # one shard per step: the workers normalize over the whole batch, as one process does,
    # so the coordinator's combined moments and momentum update must match the model's own
    config = tiny_config(
        store,
        tmp_path / "run",
        dtype="float64",
        steps=3,
        norm="spatial_batchnorm",
        batch_size=32,
        shard_size=32,
    )
    train(config, client=client)
    got = final_params(tmp_path / "run")
    model = _single_process(store, config, 3)
    np.testing.assert_allclose(got["bn_running_mean"], model.bn_param["running_mean"], rtol=1e-10)
    np.testing.assert_allclose(got["bn_running_var"], model.bn_param["running_var"], rtol=1e-10)
    np.testing.assert_allclose(got["gamma1"], model.params["gamma1"], rtol=1e-9)


def test_bn_moments_of_several_shards_combine_to_the_batch_moments(store, tmp_path, client):
    # four shards per step: the running statistics after one step must be the batch's exact
    # mean/variance (of the conv outputs at the initial weights) folded in with momentum 0.9
    config = tiny_config(
        store, tmp_path / "run", dtype="float64", steps=1, norm="spatial_batchnorm"
    )
    train(config, client=client)
    got = final_params(tmp_path / "run")
    st = open_store(store)
    spec = ModelSpec(4, 3, 16, len(st.class_names), "spatial_batchnorm", 4, "float64")
    model = spec.build(weight_scale=config.weight_scale, seed=config.seed)
    X, y = st.read("train", Schedule(200, 64, 16, 0, 1).batch(0), dtype="float64")
    model.loss(X, y)  # one whole-batch step: running = 0.9 * init + 0.1 * batch moments
    np.testing.assert_allclose(got["bn_running_mean"], model.bn_param["running_mean"], rtol=1e-10)
    np.testing.assert_allclose(got["bn_running_var"], model.bn_param["running_var"], rtol=1e-10)


# ---- the run directory ---------------------------------------------------------------------------


def test_a_run_that_ends_mid_epoch_says_so_in_its_last_scoring(store, tmp_path, client, capsys):
    """200 images / 64: 4 steps an epoch; 6 steps end in the middle of the second."""
    from pipeline.cli.train import _Progress

    bar = _Progress()
    try:
        train(tiny_config(store, tmp_path / "run", steps=6), client=client, progress=bar)
    finally:
        bar.close()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [(m["step"], m["epoch"], m["end_of_epoch"]) for m in lines if m["kind"] == "epoch"]
    assert epochs == [(4, 1, True), (6, 2, False)]
    err = capsys.readouterr().err
    assert "epoch 1 (step 4): train acc " in err
    assert (
        "end of the run at step 6, in epoch 2: train acc " in err and "epoch 2 (step 6)" not in err
    )


def test_run_directory_holds_metrics_params_summary_and_plots(store, tmp_path, client):
    s = train(
        tiny_config(store, tmp_path / "run", epochs=2, norm="spatial_batchnorm"), client=client
    )
    run = tmp_path / "run"
    lines = [__import__("json").loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if m["kind"] == "step"]
    epochs = [m for m in lines if m["kind"] == "epoch"]
    assert [m["step"] for m in steps] == list(range(1, 9))  # 200 images / 64 -> 4 steps per epoch
    assert [m["n"] for m in steps] == [64, 64, 64, 8] * 2
    assert [m["epoch"] for m in epochs] == [1, 2]
    assert [m["end_of_epoch"] for m in epochs] == [True, True]
    assert all(math.isfinite(m["loss"]) and m["images_per_s"] > 0 for m in steps)
    assert {"read_s", "compute_s", "reduce_s", "sync_s", "coordinator_s"} <= steps[0].keys()
    for key in ("train_acc", "val_acc", "steps", "seconds", "images_per_s", "workers", "settings"):
        assert s[key] is not None, key
    assert s["steps"] == 8 and s["images"] == 400 and s["settings"]["norm"] == "spatial_batchnorm"
    assert s["val_acc"] == epochs[-1]["val_acc"] and s["val_acc"] > 0.5  # 4 learnable classes
    with np.load(run / "params.npz", allow_pickle=False) as f:
        assert set(f.files) == {
            "W1",
            "b1",
            "gamma1",
            "beta1",
            "W2",
            "b2",
            "W3",
            "b3",
            "bn_running_mean",
            "bn_running_var",
        }
        assert f["W1"].dtype == np.float32 and f["W1"].shape == (4, 3, 3, 3)
    summary = __import__("json").loads((run / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["settings"]["out"] == str(run)
    for png in ("curves.png", "filters.png"):
        assert (run / png).read_bytes()[:4] == b"\x89PNG"
    # a finished run keeps only its last checkpoint (what --resume needs to train on)
    assert [p.name for p in (run / "checkpoints").glob("step-*.npz")] == ["step-00000008.npz"]


# ---- coordinator death, resume, torn checkpoints -------------------------------------------------


def test_resume_after_the_coordinator_dies_is_bit_identical(store, tmp_path, client):
    full = train(
        tiny_config(store, tmp_path / "full", epochs=2, norm="spatial_batchnorm"), client=client
    )
    config = tiny_config(store, tmp_path / "cut", epochs=2, norm="spatial_batchnorm")
    with pytest.raises(Crash):
        train(config, client=client, progress=crash_after(7))  # last checkpoint: step 6
    events = []
    resumed = train(resume_config(tmp_path / "cut"), client=client, progress=events.append)
    assert [e["step"] for e in events if e["event"] == "resumed"] == [6]
    assert [e["step"] for e in events if e["event"] == "step"] == [7, 8]
    assert_same_params(final_params(tmp_path / "full"), final_params(tmp_path / "cut"))
    # metrics read as if never interrupted: each step once, in order
    cut = [
        __import__("json").loads(x)
        for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    ]
    whole = [
        __import__("json").loads(x)
        for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    ]
    key = lambda m: (m["kind"], m["step"], m.get("loss"), m.get("val_acc"))  # noqa: E731
    assert [key(m) for m in cut] == [key(m) for m in whole]
    assert any(m["kind"] == "eval" for m in whole)  # the learning curve between epochs
    assert resumed["val_acc"] == full["val_acc"]


def test_a_torn_checkpoint_is_never_loaded(store, tmp_path, client):
    train(tiny_config(store, tmp_path / "full", steps=7), client=client)
    with pytest.raises(Crash):
        train(tiny_config(store, tmp_path / "cut", steps=7), client=client, progress=crash_after(7))
    ckpts = sorted((tmp_path / "cut" / "checkpoints").glob("step-*.npz"))
    assert [p.name for p in ckpts] == ["step-00000004.npz", "step-00000006.npz"]
    data = ckpts[-1].read_bytes()
    ckpts[-1].write_bytes(data[: len(data) // 2])  # torn: half written
    events = []
    train(resume_config(tmp_path / "cut"), client=client, progress=events.append)
    warnings = [e["message"] for e in events if e["event"] == "warning"]
    assert len(warnings) == 1 and "step-00000006.npz" in warnings[0]
    assert [e["step"] for e in events if e["event"] == "resumed"] == [4]
    assert_same_params(final_params(tmp_path / "full"), final_params(tmp_path / "cut"))


def test_resume_refuses_settings_that_change_the_result(store, tmp_path, client):
    with pytest.raises(Crash):
        train(tiny_config(store, tmp_path / "run", steps=4), client=client, progress=crash_after(3))
    with pytest.raises(TrainingError, match="lr is 0.5 but the run was trained with 0.01"):
        train(resume_config(tmp_path / "run", lr=0.5), client=client)
    with pytest.raises(TrainingError, match="not a convpipe run directory"):
        resume_config(tmp_path / "nothing")


# ---- divergence and bad input --------------------------------------------------------------------


@pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning", "ignore:overflow encountered:RuntimeWarning"
)
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(store, tmp_path, client):
    config = tiny_config(store, tmp_path / "run", lr=1e30, steps=6, checkpoint_every=1)
    with pytest.raises(TrainingError, match=r"loss is (nan|inf) at step (\d+)") as e:
        train(config, client=client)
    bad_step = int(__import__("re").search(r"at step (\d+)", str(e.value)).group(1))
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("step-*.npz"))
    assert (
        ckpts
        and ckpts[-1].name == f"step-{bad_step - 1:08d}.npz"
        and str(ckpts[-1]) in str(e.value)
    )
    arrays, meta = load_checkpoint(ckpts[-1])  # intact and loadable
    assert meta["step"] == bad_step - 1 and np.isfinite(arrays["params/W1"]).all()


def test_missing_store_and_too_large_train_limit(store, tmp_path, client):
    with pytest.raises(DataError, match="no-such.zarr"):
        train(tiny_config(tmp_path / "no-such.zarr", tmp_path / "a"), client=client)
    with pytest.raises(TrainingError, match="train_limit 500 exceeds the 200 training images"):
        train(tiny_config(store, tmp_path / "b", train_limit=500), client=client)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_train_limit_uses_only_the_first_images(store, tmp_path, client):
    s = train(tiny_config(store, tmp_path / "run", train_limit=64, epochs=2), client=client)
    assert s["steps"] == 2 and s["images"] == 128


# ---- evaluation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["none", "spatial_batchnorm"])
def test_evaluate_scores_the_final_parameters(store, tmp_path, client, norm):
    train(tiny_config(store, tmp_path / "run", epochs=2, norm=norm), client=client)
    got = evaluate(str(tmp_path / "run"), split="test", client=client, shard_size=16)
    params = final_params(tmp_path / "run")
    st = open_store(store)
    model = ModelSpec(4, 3, 16, 4, norm, 4, "float32").build()
    model.params = {k: params[k] for k in model.params}
    if norm != "none":
        model.set_state(
            {"running_mean": params["bn_running_mean"], "running_var": params["bn_running_var"]}
        )
    X, y = st.read("test", None)
    correct = int((model.loss(X).argmax(1) == y).sum())
    assert (got["correct"], got["n"], got["split"]) == (correct, 40, "test")
    assert got["accuracy"] == correct / 40
    with pytest.raises(DataError, match="no split 'holdout'"):
        evaluate(str(tmp_path / "run"), split="holdout", client=client)


def test_workers_release_the_shared_memory_of_a_finished_run(store, tmp_path, client):
    from pipeline.training import shm as shared_memory

    def mapped():
        return sorted(shm.ref.token for shm in shared_memory._ATTACHED.values())

    seen = []
    train(
        tiny_config(store, tmp_path / "run", transport="shm", steps=3),
        client=client,
        progress=lambda e: seen.append(client.run(mapped)) if e["event"] == "step" else None,
    )
    tokens = {t for got in seen for ts in got.values() for t in ts}
    assert tokens  # mapped while it ran
    assert not any(client.run(mapped).values())  # and released at the end
    assert not [
        p for t in tokens for p in shared_memory.shm_root().glob(f"convpipe-*{t[:12]}*")
    ]  # and removed
