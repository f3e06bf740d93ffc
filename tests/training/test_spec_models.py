"""A network from a spec (``model``) trained data-parallel: the same bits on 1, 3 and 4 workers
and both transports, every bn layer's statistics synchronized like one process, evaluation (with
test-time augmentation, from the API and the command line) and load_model, and settings refused
in one line before anything runs."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from distributed import Client

from pipeline.augment import tta_scores
from pipeline.cli import main
from pipeline.cnn import ModelSpec
from pipeline.convnet import ConvNet
from pipeline.curves import Curves
from pipeline.data import open_store
from pipeline.errors import TrainingError
from pipeline.optim import adam, muon_update
from pipeline.runs import load_model
from pipeline.training import TrainConfig, evaluate, resume_config, train
from pipeline.training.config import RUNTIME_FIELDS
from pipeline.training.plan import Layout, StepPlan
from pipeline.training.shards import Schedule
from pipeline.training.update import UpdateRule
from tests.helpers.cluster import local_cluster
from tests.helpers.training import (
    Crash,
    assert_same_params,
    crash_after,
    final_params,
    make_store,
    tiny_config,
)

#: two bn layers (8 + 8 channels of moments per shard), GELU, a global pool, label smoothing
SPEC = (
    "conv 8 3, bn, relu, pool 2, conv 8 2 stride=2, bn momentum=0.6, gelu, gap, affine, "
    "softmax smoothing=0.1"
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(
        tmp_path_factory.mktemp("data") / "tiny.zarr", n_train=160, n_val=32, n_test=40
    )


def test_a_spec_model_trains_to_the_same_bits_on_1_3_and_4_workers_and_both_transports(
    store, tmp_path
):
    # with flips and shifts drawn on the workers, in an epoch and the next (4 steps an epoch),
    # Nesterov SGD on a triangular schedule with decoupled decay and the norms at 8x the rate;
    # 6 shards a step: all on one worker, 2 on each of 3, or 2, 2, 1, 1 on 4
    results = {}
    for n in (1, 3, 4):
        cluster = local_cluster(n, dashboard_address=None, silence_logs=logging.WARNING)
        client = Client(cluster)
        try:
            for transport in ("shm", "tcp"):
                out = tmp_path / f"w{n}{transport}"
                config = tiny_config(
                    store,
                    out,
                    model=SPEC,
                    steps=6,
                    batch_size=48,
                    shard_size=8,
                    transport=transport,
                    flip="alternate",
                    translate=2,
                    optimizer="sgd",
                    schedule="triangular",
                    warmup=0.3,
                    weight_decay=5e-3,
                    norm_lr_factor=8.0,
                )
                s = train(config, client=client)
                assert (s["workers"], s["transport"]) == (n, transport)
                results[n, transport] = final_params(out)
        finally:
            client.close()
            cluster.close()
    first = results[1, "shm"]
    assert {"W1", "gamma1", "beta2", "W3", "bn_running_mean"} <= first.keys()
    assert first["bn_running_mean"].shape == (16,) and first["bn_running_var"].all()
    for params in results.values():
        assert_same_params(first, params)


def test_bn_layers_are_synchronized_like_one_process_float64(store, tmp_path, training_client):
    # one shard a step: the workers normalize over the whole batch as one process does
    config = tiny_config(
        store, tmp_path / "run", model=SPEC, dtype="float64", steps=3, batch_size=32, shard_size=32
    )
    train(config, client=training_client)
    got = final_params(tmp_path / "run")
    st = open_store(store)
    model = ModelSpec.of(config, len(st.class_names)).build(seed=config.seed)
    sched = Schedule(st.splits["train"], 32, 32, config.seed, 1, 3)
    configs = {k: {"learning_rate": config.lr} for k in model.params}
    for step in range(3):
        X, y = st.read("train", sched.batch(step), dtype="float64")
        _, grads = model.loss(X, y)
        for k in model.params:
            g = grads[k] + config.reg * model.params[k] if k.startswith("W") else grads[k]
            model.params[k], configs[k] = adam(model.params[k], g, configs[k])
    for k, v in model.params.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-8, atol=1e-12, err_msg=k)
    np.testing.assert_allclose(got["bn_running_mean"], model.bn_param["running_mean"], rtol=1e-9)
    np.testing.assert_allclose(got["bn_running_var"], model.bn_param["running_var"], rtol=1e-9)


def test_evaluate_and_load_model_give_the_spec_network(store, tmp_path, training_client, capsys):
    run = tmp_path / "run"
    summary = train(
        tiny_config(store, run, model=SPEC, epochs=8, tta="flip"), client=training_client
    )
    assert (run / "curves.png").exists() and (run / "filters.png").exists()
    model = load_model(run)
    assert isinstance(model, ConvNet) and model.spec.to_text() == SPEC
    X, y = open_store(store).read("test", None)
    correct = int((model.loss(X).argmax(1) == y).sum())
    got = evaluate(str(run), split="test", client=training_client, shard_size=16)
    assert (got["correct"], got["n"], got["tta"]) == (correct, 40, "none")
    assert summary["val_acc"] > 0.5  # 4 classes: chance is 0.25
    # test-time augmentation: the mean of the scores of the image and its mirror
    flipped = evaluate(str(run), split="test", client=training_client, tta="flip")
    both = 0.5 * model.loss(X).astype(np.float64) + 0.5 * model.loss(X[..., ::-1].copy())
    assert flipped["correct"] == int((both.argmax(1) == y).sum())
    assert summary["test_acc"] == flipped["accuracy"] and summary["tta"] == "flip"
    # flip and translate (airbench's views), and the same from the command line
    views = evaluate(str(run), split="test", client=training_client, tta="flip-translate")
    want = int((tta_scores(model.loss, X, "flip-translate").argmax(1) == y).sum())
    assert (views["correct"], views["tta"]) == (want, "flip-translate")
    address = training_client.scheduler.address
    args = ["evaluate", str(run), "--split", "test", "--tta", "flip-translate"]
    assert main([*args, "--scheduler", address]) == 0
    assert capsys.readouterr().out.startswith(
        f"test accuracy {views['accuracy']:.4f} ({want}/40) with tta flip-translate in "
    )
    with pytest.raises(TrainingError, match="unknown tta 'mirror': expected one of none, flip"):
        evaluate(str(run), tta="mirror", client=training_client)


def test_the_model_setting_is_checked_and_spelt_one_way(store, tmp_path):
    config = TrainConfig(model=" Conv 8 3 ,BatchNorm, relu,  linear").validate()
    assert config.model == "conv 8 3, bn, relu, affine"
    with pytest.raises(
        TrainingError,
        match=r"^model layer 2 'pool 64': a 64x64 pool leaves no pixels of a 32x32 input$",
    ):
        TrainConfig(model="conv 8 3, pool 64, affine").validate()
    with pytest.raises(TrainingError, match=r"^model: the network ends with \(8, 32, 32\)"):
        TrainConfig(model="conv 8 3").validate()


def test_resume_refuses_another_model(store, tmp_path, training_client):
    run = tmp_path / "run"
    train(tiny_config(store, run, model=SPEC, steps=2), client=training_client)
    with pytest.raises(
        TrainingError,
        match=r"model is 'conv 4 3, gap, affine' but the run was trained with 'conv 8 3",
    ):
        train(
            resume_config(str(run), model="conv 4 3, gap, affine", steps=3), client=training_client
        )


def test_augmentation_changes_the_training_and_resume_keeps_its_draws(
    store, tmp_path, training_client
):
    settings = dict(model=SPEC, steps=6, batch_size=48, shard_size=16, checkpoint_every=2)
    plain = tmp_path / "plain"
    train(tiny_config(store, plain, **settings), client=training_client)
    aug = dict(settings, flip="random", translate=3)
    whole = tmp_path / "whole"
    train(tiny_config(store, whole, **aug), client=training_client)
    assert not np.array_equal(final_params(plain)["W1"], final_params(whole)["W1"])
    # stopped after step 3 (checkpoint at step 2), resumed: the draws of steps 3-6 again
    cut = tmp_path / "cut"
    train(tiny_config(store, cut, **dict(aug, steps=3)), client=training_client)
    train(resume_config(str(cut), steps=6), client=training_client)
    assert_same_params(final_params(whole), final_params(cut))


@pytest.mark.parametrize(
    "average",
    [{}, {"ema": 0.75}, {"lookahead": 3}, {"muon_lr": 0.05, "muon_momentum": 0.7, "lookahead": 2}],
)
def test_sgd_with_a_schedule_groups_and_decay_is_the_single_process_update_float64(
    store, tmp_path, training_client, average
):
    # with ema, params.npz holds the weights' moving average, from the initial weights; with
    # lookahead, the weights pulled to their slow copy after step 3 and set to it after step 4;
    # BN's running statistics averaged alike (saved with the averaged weights: ema), pulled
    # with the weights (lookahead)
    ema, muon = average.get("ema", 0.0), average.get("muon_lr", 0.0)  # muon: the 4-D filters
    settings = dict(
        **average,
        optimizer="sgd",
        lr=0.05,
        momentum=0.8,
        schedule="cosine",
        warmup=0.25,
        start_factor=0.1,
        end_factor=0.05,
        weight_decay=1e-2,
        norm_lr_factor=4.0,
        reg=1e-3,
    )
    config = tiny_config(
        store,
        tmp_path / "run",
        model=SPEC,
        dtype="float64",
        steps=4,
        batch_size=32,
        shard_size=32,
        **settings,
    )
    train(config, client=training_client)
    got = final_params(tmp_path / "run")
    st = open_store(store)
    model = ModelSpec.of(config, len(st.class_names)).build(seed=config.seed)
    sched = Schedule(st.splits["train"], 32, 32, config.seed, 1, 4)
    rule = UpdateRule.of(config, 4)
    buf = {k: np.zeros_like(v) for k, v in model.params.items()}
    avg = {k: v.copy() for k, v in model.params.items()}
    bn_avg = {}
    for step in range(4):
        X, y = st.read("train", sched.batch(step), dtype="float64")
        _, grads = model.loss(X, y)
        lr = rule.lr_at(step)
        for k, w in model.params.items():
            if muon and w.ndim == 4:  # Muon's Nesterov momentum, no L2 or decay
                buf[k] = 0.7 * buf[k] + grads[k]
                model.params[k] = muon_update(w, grads[k] + 0.7 * buf[k], muon * rule.factor(step))
                continue
            g = grads[k] + (config.reg * w if k.startswith("W") else 0.0)
            buf[k] = 0.8 * buf[k] + g
            factor = 4.0 if k.startswith(("gamma", "beta")) else 1.0
            model.params[k] = w - lr * factor * (g + 0.8 * buf[k]) - lr * 1e-2 * w
        a, pull = rule.average(step)
        for k in model.params:
            avg[k] = a * avg[k] + (1 - a) * model.params[k] if a else avg[k]
            model.params[k] = avg[k] if pull else model.params[k]
        bn = model.get_state()  # the loss folded the batch's moments in (train mode)
        if ema or rule.lookahead:
            if step == 0:  # the average starts from the first step's statistics
                bn_avg = bn
            else:
                bn_avg = {k: a * bn_avg[k] + (1 - a) * bn[k] if a else bn_avg[k] for k in bn}
            model.set_state(bn_avg if pull else bn)
    for k, v in (avg if ema else model.params).items():
        np.testing.assert_allclose(got[k], v, rtol=1e-8, atol=1e-12, err_msg=k)
    for k, v in (bn_avg if ema else model.get_state()).items():
        np.testing.assert_allclose(got[f"bn_{k}"], v, rtol=1e-8, atol=1e-12, err_msg=k)
    if ema or rule.lookahead:  # averaged statistics are not the last steps' alone
        assert not np.allclose(got["bn_running_var"], bn["running_var"], rtol=1e-6)
    if ema:  # the weights themselves are not the average
        assert not np.allclose(got["W1"], model.params["W1"], rtol=1e-8, atol=1e-12)


def test_lookahead_is_the_same_on_both_transports_after_a_resume_and_changes_the_weights(
    store, tmp_path, training_client
):
    settings = dict(model=SPEC, optimizer="sgd", lr=0.05, lookahead=2, batch_size=64, steps=5)
    runs = {
        transport: train(
            tiny_config(
                store, tmp_path / transport, transport=transport, shard_size=16, **settings
            ),
            client=training_client,
        )
        for transport in ("shm", "tcp")
    }
    assert runs["shm"]["lookahead"] == runs["tcp"]["lookahead"] == 2
    assert_same_params(final_params(tmp_path / "shm"), final_params(tmp_path / "tcp"))
    cut = tmp_path / "cut"  # the coordinator dies; resumed from a checkpoint, the same bits
    with pytest.raises(Crash):
        train(
            tiny_config(store, cut, transport="shm", shard_size=16, **settings),
            client=training_client,
            progress=crash_after(4),
        )
    events = []
    train(resume_config(cut), client=training_client, progress=events.append)
    assert [e["step"] for e in events if e["event"] == "resumed"] == [3]  # between pulls
    assert_same_params(final_params(tmp_path / "shm"), final_params(cut))
    plain = tmp_path / "plain"  # without it the weights differ
    train(
        tiny_config(store, plain, shard_size=16, **dict(settings, lookahead=0)),
        client=training_client,
    )
    assert not np.array_equal(final_params(plain)["W1"], final_params(tmp_path / "shm")["W1"])


def test_muon_gives_the_same_bits_on_both_transports_and_after_a_resume(
    store, tmp_path, training_client
):
    """Muon's filters lie in the first of the two slices (a worker updates each whole), the
    affine layer's weights in both: the same bits over shm and tcp, and after a crash."""
    spec = "conv 16 3, relu, pool 2, conv 32 3, bn, relu, pool 2, affine 64, relu, affine"
    settings = dict(model=spec, optimizer="sgd", lr=0.05, muon_lr=0.05, batch_size=64, steps=5)
    config = tiny_config(store, tmp_path / "x", **settings)
    params = ModelSpec.of(config, len(open_store(store).class_names)).build().params
    layout = Layout.of(params)
    filters = [(sl.start, sl.stop) for n, sl in layout.slices().items() if params[n].ndim == 4]
    plan = StepPlan.make(4, 2, layout.size, filters)
    assert all(hi > lo for lo, hi in plan.slices) and filters[-1][1] <= plan.slices[0][1]
    for transport in ("shm", "tcp"):
        train(
            tiny_config(
                store, tmp_path / transport, transport=transport, shard_size=16, **settings
            ),
            client=training_client,
        )
    assert_same_params(final_params(tmp_path / "shm"), final_params(tmp_path / "tcp"))
    cut = tmp_path / "cut"
    with pytest.raises(Crash):
        train(
            tiny_config(store, cut, transport="shm", shard_size=16, **settings),
            client=training_client,
            progress=crash_after(3),
        )
    train(resume_config(cut), client=training_client)
    assert_same_params(final_params(tmp_path / "shm"), final_params(cut))
    plain = tmp_path / "plain"  # SGD for the filters too: other filters, the same affine shape
    train(
        tiny_config(store, plain, shard_size=16, **dict(settings, muon_lr=0.0)),
        client=training_client,
    )
    assert not np.array_equal(final_params(plain)["W1"], final_params(tmp_path / "shm")["W1"])


def test_a_whitening_conv_starts_from_the_first_training_images_and_stays(
    store, tmp_path, training_client
):
    from pipeline.convnet import whitening_filters

    spec = "scale 0.02, conv 24 2 pad=0 init=whiten, gelu, pool 2, conv 8 3, bn, gelu, gap, affine"
    run = tmp_path / "run"
    train(
        tiny_config(store, run, model=spec, steps=3, optimizer="sgd", lr=0.05, weight_decay=0.1),
        client=training_client,
    )
    got = final_params(run)
    X, _ = open_store(store).read("train", np.arange(160))  # fewer than 5,000: all of them
    np.testing.assert_array_equal(
        got["W1"], whitening_filters(0.02 * X.astype(np.float64), 2).astype(np.float32)
    )
    assert got["b1"].any()  # its bias trains


def test_the_whitening_bias_stays_after_its_epochs_on_both_transports_and_after_a_resume(
    store, tmp_path, training_client, monkeypatch
):
    # 160 images, batch 32: 5 steps an epoch; whiten_bias_epochs=1: b1 trains in steps 1-5,
    # then stays (no step, no momentum, no decay) while the rest trains on; the run's bits are
    # the same over tcp and after a coordinator's crash in the frozen epochs
    spec = "scale 0.02, conv 24 2 pad=0 init=whiten, gelu, pool 2, conv 8 3, bn, gelu, gap, affine"
    settings = dict(
        model=spec, optimizer="sgd", lr=0.05, weight_decay=0.1, batch_size=32, shard_size=16
    )
    frozen = dict(settings, epochs=3, whiten_bias_epochs=1)
    runs = {
        name: tiny_config(store, tmp_path / name, **options)
        for name, options in (
            ("shm", dict(frozen, transport="shm")),
            ("tcp", dict(frozen, transport="tcp")),
            ("five", dict(settings, steps=5)),  # the first 5 steps alone (a constant rate)
            ("plain", dict(settings, epochs=3)),  # the bias trains throughout
        )
    }
    seen = []  # what the workers' networks were told to hold still (in-process workers)
    real = ConvNet.loss

    def loss(self, X, y=None, **kwargs):
        if y is not None:
            seen.append(set(kwargs.get("frozen", ())))
        return real(self, X, y, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(ConvNet, "loss", loss)
        train(runs["shm"], client=training_client)
    # 2 shards a step (after each worker's warm-up call): no b1 backward after step 5
    assert seen[-30:] == [set()] * 10 + [{"b1"}] * 20 and {"b1"} not in seen[:-30]
    for name in ("tcp", "five", "plain"):
        train(runs[name], client=training_client)
    got = {name: final_params(tmp_path / name) for name in runs}
    assert_same_params(got["shm"], got["tcp"])
    np.testing.assert_array_equal(got["shm"]["b1"], got["five"]["b1"])
    assert got["five"]["b1"].any()  # it did train, in epoch 1
    assert not np.array_equal(got["shm"]["W2"], got["five"]["W2"])  # the rest trained on
    assert not np.array_equal(got["plain"]["b1"], got["five"]["b1"])
    cut = tmp_path / "cut"
    with pytest.raises(Crash):
        train(
            tiny_config(store, cut, **dict(frozen, checkpoint_every=3)),
            client=training_client,
            progress=crash_after(8),
        )
    train(resume_config(cut), client=training_client)
    assert_same_params(got["shm"], final_params(cut))


def test_whiten_bias_epochs_needs_a_whitening_conv_and_a_count(store, tmp_path):
    for options, message in (
        (dict(model=SPEC, whiten_bias_epochs=3), "the model has no whitening conv"),
        (dict(whiten_bias_epochs=3), "the model has no whitening conv"),  # the three-layer net
        (
            dict(model="conv 24 2 pad=0 init=whiten, gap, affine", whiten_bias_epochs=-1),
            "whiten_bias_epochs must be >= 0, got -1",
        ),
        (
            dict(
                model="conv 24 2 pad=0 init=whiten, gap, affine",
                whiten_bias_epochs=1,
                optimizer="sgd",
                ema=0.9,
            ),
            "whiten_bias_epochs and ema: the average would keep",
        ),
    ):
        with pytest.raises(TrainingError, match=message):
            tiny_config(store, tmp_path / "run", **options)


def test_the_moving_average_is_the_same_on_both_transports_and_after_a_resume(
    store, tmp_path, training_client
):
    # SGD with ema: the average lives beside the weights (where Adam keeps v), is checkpointed
    # with them, and is what the run is scored and saved with
    settings = dict(model=SPEC, optimizer="sgd", lr=0.05, ema=0.8, batch_size=64, shard_size=16)
    whole = train(
        tiny_config(store, tmp_path / "shm", transport="shm", steps=6, **settings),
        client=training_client,
    )
    train(
        tiny_config(store, tmp_path / "tcp", transport="tcp", steps=4, **settings),
        client=training_client,
    )
    resumed = train(resume_config(str(tmp_path / "tcp"), steps=6), client=training_client)
    assert_same_params(final_params(tmp_path / "shm"), final_params(tmp_path / "tcp"))
    assert whole["ema"] == resumed["ema"] == 0.8
    assert (whole["val_acc"], whole["test_acc"]) == (resumed["val_acc"], resumed["test_acc"])
    model = load_model(tmp_path / "tcp")  # the averaged network
    assert np.array_equal(model.params["W1"], final_params(tmp_path / "shm")["W1"])


def test_each_epochs_test_accuracy_is_scored_without_changing_the_training(
    store, tmp_path, training_client
):
    """``test_each_epoch``: the whole test split after every epoch (no test-time augmentation),
    in the epoch lines and the curves; the parameters are those of a run without it."""
    settings = dict(model=SPEC, epochs=3)
    plain, scored = tmp_path / "plain", tmp_path / "scored"
    train(tiny_config(store, plain, **settings), client=training_client)
    summary = train(
        tiny_config(store, scored, test_each_epoch=True, **settings), client=training_client
    )
    assert_same_params(final_params(plain), final_params(scored))
    lines = [json.loads(s) for s in (scored / "metrics.jsonl").read_text().splitlines()]
    epochs = [m for m in lines if m["kind"] == "epoch"]
    assert [m["epoch"] for m in epochs] == [1, 2, 3]
    # the last epoch's is the run's test accuracy (tta none: the same parameters, the same views)
    assert epochs[-1]["test_acc"] == summary["test_acc"]
    # the first epoch's is that of a run of one epoch (Adam's constant rate: the same steps)
    one = train(tiny_config(store, tmp_path / "one", model=SPEC), client=training_client)
    assert epochs[0]["test_acc"] == one["test_acc"]
    assert all(0 <= m["test_acc"] <= 1 for m in epochs)
    curves = Curves.from_metrics(lines)
    assert [(p.x, p.y) for p in curves.test_acc] == [
        (m["step"] / curves.steps_per_epoch, m["test_acc"]) for m in epochs
    ]
    plain_lines = [json.loads(s) for s in (plain / "metrics.jsonl").read_text().splitlines()]
    assert not any("test_acc" in m for m in plain_lines)
    assert Curves.from_metrics(plain_lines).test_acc == ()
    # it changes no number of the run: a resume may turn it on
    assert "test_each_epoch" in RUNTIME_FIELDS


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_no_step_computes_while_accuracies_are_scored_off_the_clock(
    store, tmp_path, training_client, monkeypatch, transport
):
    """After a step whose accuracies are scored (every --eval-every steps; train, val and test at
    an epoch's end), the next step is submitted only once the scoring is done: a step computed
    meanwhile would leave the run's clock with the scoring (its wait would then be short; it hid
    10 of a 60-step run's steps). Elsewhere the next step is in flight while one is collected."""
    from pipeline.training import coordinator
    from pipeline.training.shm import SharedMemoryExchange
    from pipeline.training.tcp import TcpExchange

    events = []
    scoring = coordinator._accuracy
    accuracies = coordinator._accuracies

    def scored(client, exchange, step, bn, store, split, *args, **kwargs):
        events.append(("score", split, step))
        return scoring(client, exchange, step, bn, store, split, *args, **kwargs)

    def scored_both(client, exchange, step, *args, **kwargs):
        events.append(("score", "sample", step))
        return accuracies(client, exchange, step, *args, **kwargs)

    monkeypatch.setattr(coordinator, "_accuracy", scored)
    monkeypatch.setattr(coordinator, "_accuracies", scored_both)
    for cls in (SharedMemoryExchange, TcpExchange):
        submitting, collecting = cls.submit, cls.collect

        def submit(self, step, *args, _submit=submitting, **kwargs):
            events.append(("submit", step))
            return _submit(self, step, *args, **kwargs)

        def collect(self, pending, *args, _collect=collecting, **kwargs):
            events.append(("collect", pending[0]))
            return _collect(self, pending, *args, **kwargs)

        monkeypatch.setattr(cls, "submit", submit)
        monkeypatch.setattr(cls, "collect", collect)
    settings = dict(model=SPEC, epochs=2, test_each_epoch=True, transport=transport)
    train(tiny_config(store, tmp_path / "run", eval_every=2, **settings), client=training_client)
    submits = [e[1] for e in events if e[0] == "submit"]
    tests = [e[2] for e in events if e[:2] == ("score", "test")]
    per_epoch = tests[0]
    assert per_epoch > 2 and tests == [per_epoch, 2 * per_epoch, 2 * per_epoch]  # and the run's
    assert submits == list(range(2 * per_epoch))  # each step once
    scored_after = {e[2] for e in events if e[0] == "score"}  # steps done when scored
    assert scored_after >= {2, per_epoch, 2 * per_epoch}
    for done in range(1, 2 * per_epoch):
        if done in scored_after:  # step ``done`` goes in after every scoring of the one before
            last = max(i for i, e in enumerate(events) if e[0] == "score" and e[2] == done)
            assert events.index(("submit", done)) > last, done
        else:  # in flight while the one before is collected
            assert events.index(("submit", done)) < events.index(("collect", done - 1)), done


def test_an_interrupt_while_an_epochs_test_split_is_scored_keeps_the_epoch_and_resumes(
    store, tmp_path, training_client, monkeypatch
):
    """Ctrl-C during an epoch's test scoring: the epoch's line (without its test accuracy) is
    written before the checkpoint that counts it, and --resume ends on the same bits, with every
    epoch's line once."""
    from pipeline.training import coordinator

    settings = dict(model=SPEC, epochs=3, test_each_epoch=True)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train(tiny_config(store, whole, **settings), client=training_client)
    scoring, interrupted_at = coordinator._accuracy, []

    def interrupted(client, exchange, step, bn, store, split, *args, **kwargs):
        if split == "test" and not interrupted_at:
            interrupted_at.append(step)
            raise KeyboardInterrupt
        return scoring(client, exchange, step, bn, store, split, *args, **kwargs)

    monkeypatch.setattr(coordinator, "_accuracy", interrupted)
    events = []
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(store, cut, **settings), client=training_client, progress=events.append)
    monkeypatch.setattr(coordinator, "_accuracy", scoring)
    assert [e["step"] for e in events if e["event"] == "checkpoint"][-1:] == interrupted_at

    def epochs(run):
        lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
        return [m for m in lines if m["kind"] == "epoch"]

    assert [(m["epoch"], "test_acc" in m) for m in epochs(cut)] == [(1, False)]
    train(resume_config(str(cut)), client=training_client)
    assert_same_params(final_params(whole), final_params(cut))
    want, got = epochs(whole), epochs(cut)
    assert [m["epoch"] for m in got] == [1, 2, 3] and got[0]["val_acc"] == want[0]["val_acc"]
    assert [m.get("test_acc") for m in got] == [None] + [m["test_acc"] for m in want[1:]]
