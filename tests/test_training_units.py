"""Settings, data order, the gradient tree, BN moments, shared buffers and the run directory:
the pieces of distributed training that need no cluster."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.training.config import TrainConfig, parse_value
from pipeline.training.reduce import (add_arrays, adam_scalars, combine_moments, finish_and_adam, finish_gradient,
                                  pairwise, update_running)
from pipeline.optim import adam_inplace
from pipeline.training.rundir import RunDir, write_plots
from pipeline.training.shards import Schedule, epoch_permutation, subset
from pipeline.training.transport import Layout, SharedBuffers, attach, remove_stale, shm_root
from pipeline.errors import TrainingError


# ---- TrainConfig --------------------------------------------------------------------------------

def test_defaults_follow_the_seed_training_cell():
    c = TrainConfig().validate()
    assert (c.lr, c.hidden_dim, c.reg, c.weight_scale, c.epochs, c.dtype) == (1e-3, 500, 1e-3, 1e-3, 1, "float32")
    assert c.data == "data/cifar10.zarr" and c.batch_size % c.shard_size == 0


@pytest.mark.parametrize("changes, words", [
    ({"shard_size": 100}, ["shard_size 100", "batch_size 256"]),
    ({"norm": "layernorm"}, ["norm", "layernorm", "spatial_batchnorm"]),
    ({"dtype": "float16"}, ["dtype", "float16"]),
    ({"batch_size": 0}, ["batch_size", ">= 1"]),
    ({"steps": 0}, ["steps"]),
    ({"lr": -1.0}, ["lr"]),
    ({"filter_size": 4}, ["filter_size", "odd"]),
    ({"norm": "groupnorm", "num_filters": 6, "num_groups": 4}, ["num_groups 4", "num_filters 6"]),
    ({"workers": 2, "scheduler": "tcp://h:8786"}, ["workers", "scheduler"]),
    ({"epochs": "2"}, ["epochs", "int"]),
    ({"lr": True}, ["lr", "float"]),
])
def test_bad_settings_name_the_setting(changes, words):
    with pytest.raises(TrainingError) as e:
        TrainConfig(**changes).validate()
    for w in words:
        assert w in str(e.value)


def test_from_dict_refuses_unknown_keys_and_wrong_types():
    with pytest.raises(TrainingError, match="unknown training setting 'learning_rate'"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(TrainingError, match="hidden_dim: expected int"):
        TrainConfig.from_dict({"hidden_dim": 1.5})
    assert TrainConfig.from_dict({"lr": 1}).lr == 1.0          # TOML's `lr = 1`
    assert TrainConfig.from_dict({"steps": None}).steps is None


def test_parse_value_uses_the_field_type():
    assert parse_value("batch_size", "128") == 128
    assert parse_value("lr", "3e-4") == 3e-4
    assert parse_value("steps", "none") is None
    assert parse_value("norm", "groupnorm") == "groupnorm"
    with pytest.raises(TrainingError, match="batch_size: expected int, got 'x'"):
        parse_value("batch_size", "x")
    with pytest.raises(TrainingError, match="unknown training setting 'batchsize'"):
        parse_value("batchsize", "1")


def test_config_round_trips_through_json(tmp_path):
    c = TrainConfig(norm="spatial_batchnorm", steps=7, lr=5e-4)
    c.save(tmp_path / "config.json")
    assert TrainConfig.load(tmp_path / "config.json") == c
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(TrainingError, match="bad.json"):
        TrainConfig.load(tmp_path / "bad.json")


# ---- data order -----------------------------------------------------------------------------------

def test_every_epoch_visits_every_image_once_in_a_seeded_order():
    s = Schedule(n_train=1000, batch_size=64, shard_size=16, seed=3, epochs=2)
    assert s.steps_per_epoch == 16 and s.total_steps == 32
    for epoch in range(2):
        seen = np.concatenate([np.concatenate(s.shards(step)) for step in range(epoch * 16, epoch * 16 + 16)])
        assert np.array_equal(np.sort(seen), np.arange(1000))
    assert not np.array_equal(s.batch(0), s.batch(16))                      # a new order each epoch
    assert np.array_equal(s.batch(5), Schedule(1000, 64, 16, 3, 2).batch(5))  # a function of (seed, step)
    assert not np.array_equal(s.batch(5), Schedule(1000, 64, 16, 4, 2).batch(5))
    last = s.shards(15)                                                      # 1000 = 15 * 64 + 40
    assert [len(x) for x in last] == [16, 16, 8]
    assert s.ends_epoch(15) and not s.ends_epoch(14) and s.ends_epoch(31)


def test_steps_limit_and_subset():
    s = Schedule(n_train=100, batch_size=32, shard_size=8, seed=0, epochs=5, max_steps=6)
    assert s.total_steps == 6 and s.num_epochs == 2 and s.ends_epoch(3) and s.ends_epoch(5)
    assert np.array_equal(epoch_permutation(1, 2, 50), epoch_permutation(1, 2, 50))
    sub = subset(0, 100, 30, tag=1)
    assert len(np.unique(sub)) == 30 and sub.max() < 100
    assert len(subset(0, 10, 30, tag=1)) == 10


# ---- the fixed-order gradient tree ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 7, 8, 9, 16])
def test_shared_memory_tree_equals_the_array_tree_bit_for_bit(k, dtype):
    rng = np.random.default_rng(k)
    slots = (rng.standard_normal((k, 20011)) * 10.0 ** rng.integers(-3, 4, (k, 1))).astype(dtype)
    w = rng.standard_normal(20011).astype(dtype)
    out = np.empty_like(w)
    sumsq = finish_gradient(slots, w, out, 96, 1e-3)
    ref = pairwise(list(slots), add_arrays) / dtype(96) + dtype(1e-3) * w
    assert out.dtype == dtype and np.array_equal(out, ref)
    assert sumsq == pytest.approx(float(np.sum(w.astype(np.float64) ** 2)), rel=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("t", [0, 1, 57])
def test_fused_reduce_and_adam_is_bit_for_bit_pipeline_optim_adam(k, dtype, t):
    rng = np.random.default_rng(10 * k + t)
    n = 30011
    w0 = rng.standard_normal(n).astype(dtype)
    slots = (rng.standard_normal((k, n)) * 50).astype(dtype)
    m0 = (0.1 * rng.standard_normal(n)).astype(dtype)
    v0 = (0.01 * np.abs(rng.standard_normal(n))).astype(dtype)
    fused = {"learning_rate": 3e-3, "t": t}
    w, m, v = w0.copy(), m0.copy(), v0.copy()
    cut = n // 3     # two parameters: the first with L2, the second (a bias) without
    w_ref, g = w0.copy(), np.empty_like(w0)
    finish_gradient(slots[:, :cut], w_ref[:cut], g[:cut], 200, 1e-3)
    finish_gradient(slots[:, cut:], w_ref[cut:], g[cut:], 200, 0.0)
    ref = {"learning_rate": 3e-3, "m": m0.copy(), "v": v0.copy(), "t": t}
    adam_inplace(w_ref, g, ref)
    finish_and_adam(slots, w, m, v, 200, [(0, cut, 1e-3), (cut, n, 0.0)], adam_scalars(fused, dtype))
    assert fused["t"] == ref["t"] == t + 1
    for a, b in ((w, w_ref), (m, ref["m"]), (v, ref["v"])):
        assert a.dtype == dtype and np.array_equal(a, b)


def test_tree_order_is_fixed_not_left_to_right():
    order = pairwise(list("abcde"), lambda a, b: f"({a}+{b})")
    assert order == "(((a+b)+(c+d))+e)"


def test_finish_gradient_works_on_strided_parameter_slices():
    rng = np.random.default_rng(0)
    slots = rng.standard_normal((4, 1000)).astype(np.float32)
    w = rng.standard_normal(1000).astype(np.float32)
    out = np.zeros_like(w)
    finish_gradient(slots[:, 100:300], w[100:300], out[100:300], 10, 0.0)
    assert np.array_equal(out[100:300], pairwise(list(slots[:, 100:300]), add_arrays) / np.float32(10))
    assert not out[:100].any() and not out[300:].any()


# ---- BN moments -------------------------------------------------------------------------------------

def test_combined_moments_are_those_of_the_whole_batch():
    rng = np.random.default_rng(1)
    parts = [rng.normal(m, s, (n, 6)) for m, s, n in ((0, 1, 16), (3, 2, 16), (-1, 0.5, 7))]
    mean, var = combine_moments([p.mean(0) for p in parts], [p.var(0) for p in parts], [len(p) for p in parts])
    whole = np.concatenate(parts)
    np.testing.assert_allclose(mean, whole.mean(0), rtol=1e-13)
    np.testing.assert_allclose(var, whole.var(0), rtol=1e-13)
    m32, v32 = combine_moments([p.mean(0).astype(np.float32) for p in parts],
                               [p.var(0).astype(np.float32) for p in parts], [16, 16, 7])
    assert m32.dtype == v32.dtype == np.float32
    r = update_running(np.ones(6, np.float32), np.zeros(6, np.float32), 0.9)
    assert r.dtype == np.float32 and np.allclose(r, 0.9)


# ---- shared buffers -------------------------------------------------------------------------------

def test_layout_views_and_flatten_round_trip():
    params = {"W1": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2), "b1": np.array([7, 8], np.float32)}
    layout = Layout.of(params)
    flat = layout.flatten(params)
    assert flat.shape == (26,) and layout.views(flat)["b1"].tolist() == [7, 8]
    assert Layout.from_dict(json.loads(json.dumps(layout.to_dict()))) == layout


def test_workers_see_parameters_read_only_and_write_their_slot():
    layout = Layout(("W", "b"), ((3, 4), (4,)), "float32")
    buf = SharedBuffers(layout, slots=2)
    try:
        buf.params[:] = np.arange(16)
        buf.publish(5)
        seen = attach(buf.ref)
        assert int(seen.version[0]) == 5 and np.array_equal(seen.param_views["b"], [12, 13, 14, 15])
        with pytest.raises(ValueError):
            seen.params[0] = 1.0                          # the model cannot change the parameters
        seen.grads[1] = 2.5
        assert np.all(buf.grads[1] == 2.5) and not buf.grads[0].any()
        buf.params[0] = 42                                 # the coordinator's update is visible
        assert seen.param_views["W"][0, 0] == 42
    finally:
        buf.close()
    assert not any(shm_root().glob(f"convpipe-*{buf.token[:12]}*"))


def test_stale_shared_files_of_dead_coordinators_are_removed(tmp_path):
    from pipeline.training.transport import _pid_namespace

    dead = shm_root() / f"convpipe-999999999-{_pid_namespace()}-deadbeef0000-params"
    elsewhere = shm_root() / "convpipe-999999999-1-deadbeef0000-params"   # another container's
    dead.write_bytes(b"x")
    elsewhere.write_bytes(b"x")
    try:
        remove_stale()
        assert not dead.exists() and elsewhere.exists()
    finally:
        dead.unlink(missing_ok=True)
        elsewhere.unlink(missing_ok=True)


# ---- run directory --------------------------------------------------------------------------------

def test_run_directory_refuses_to_overwrite_and_truncates_metrics(tmp_path):
    run = RunDir(tmp_path / "run").create()
    (run.config_path).write_text("{}")
    with pytest.raises(TrainingError, match="already holds a run"):
        RunDir(tmp_path / "run").create()
    for i in range(5):
        run.append_metrics({"kind": "step", "step": i + 1, "loss": 1.0})
    with open(run.metrics_path, "a") as f:
        f.write('{"kind": "st')                            # torn last line of a killed run
    assert len(run.read_metrics()) == 5
    run.truncate_metrics(3)
    assert [m["step"] for m in run.read_metrics()] == [1, 2, 3]


def test_params_npz_loads_without_pickle_and_plots_are_pngs(tmp_path):
    run = RunDir(tmp_path / "run").create()
    params = {"W1": np.random.rand(4, 3, 3, 3).astype(np.float32), "b1": np.zeros(4, np.float32)}
    run.write_params(params, {"bn_running_mean": np.ones(4, np.float32), "bn_running_var": np.ones(4, np.float32)})
    with np.load(run.params_path, allow_pickle=False) as f:
        assert set(f.files) == {"W1", "b1", "bn_running_mean", "bn_running_var"}
    back, bn = run.read_params()
    assert np.array_equal(back["W1"], params["W1"]) and set(bn) == {"bn_running_mean", "bn_running_var"}
    metrics = [{"kind": "step", "step": 1, "loss": 2.3}, {"kind": "step", "step": 2, "loss": 2.1},
               {"kind": "epoch", "epoch": 1, "step": 2, "train_acc": 0.3, "val_acc": 0.25}]
    for png in write_plots(run, metrics, params["W1"]):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
