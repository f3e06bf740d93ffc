"""Settings, data order, the gradient tree, BN moments, shared buffers and the run directory:
the pieces of distributed training that need no cluster."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipeline.cnn import ModelSpec
from pipeline.errors import TrainingError
from pipeline.optim import adam_inplace, muon_update
from pipeline.procs import pid_namespace
from pipeline.training import rundir, shm
from pipeline.training.config import TrainConfig, parse_value
from pipeline.training.plan import CHUNK, Layout, StepPlan, covers, frontier, split
from pipeline.training.reduce import combine_moments, pairwise, tree_update
from pipeline.training.rundir import RunDir, write_plots
from pipeline.training.shards import Schedule, epoch_permutation, subset
from pipeline.training.shm import (
    SharedState,
    attach,
    record_is,
    remove_stale,
    shm_root,
    write_record,
)
from pipeline.training.update import adam_scalars, step_scalars
from pipeline.training.worker import sum_order

# ---- ModelSpec ----------------------------------------------------------------------------------

SPEC = ModelSpec(4, 3, 16, 10, "spatial_batchnorm", 4, "float32")


def test_a_spec_builds_cs231n_weights_without_touching_the_global_random_state(monkeypatch):
    from pipeline.cnn import ThreeLayerConvNet

    saved = np.random.get_state()
    np.random.seed(5)
    cs231n = ThreeLayerConvNet(
        num_filters=4,
        filter_size=3,
        hidden_dim=16,
        weight_scale=0.1,
        seed=None,
        normalization="spatial_batchnorm",
    ).params
    np.random.set_state(saved)

    def refused(*args, **kwargs):
        raise AssertionError("the global random state was used")

    for name in ("seed", "get_state", "set_state", "randn", "rand"):
        monkeypatch.setattr(np.random, name, refused)
    built = SPEC.build(weight_scale=0.1, seed=5).params
    assert sorted(built) == sorted(cs231n)
    for k in cs231n:
        assert built[k].dtype == np.float32 and np.array_equal(built[k], cs231n[k]), k


def test_networks_built_in_threads_at_once_get_their_seeds_weights():
    """Trials of a sweep build their networks in threads while an in-process cluster's workers
    build theirs: each must get its own seed's draws (they once shared np.random)."""
    import threading

    want = {seed: SPEC.build(weight_scale=0.1, seed=seed).params["W2"] for seed in (0, 1)}
    stop, wrong, built = threading.Event(), [], []

    def reseed():  # another thread using np.random all along
        while not stop.is_set():
            np.random.seed(7)
            np.random.randn(100)

    def build(seed):
        for _ in range(30):
            if not np.array_equal(SPEC.build(weight_scale=0.1, seed=seed).params["W2"], want[seed]):
                wrong.append(seed)
            built.append(seed)

    noise = threading.Thread(target=reseed)
    builders = [threading.Thread(target=build, args=(i % 2,)) for i in range(4)]
    noise.start()
    for t in builders:
        t.start()
    for t in builders:
        t.join()
    stop.set()
    noise.join()
    assert wrong == [] and len(built) == 4 * 30  # every build ran (none raised in its thread)


# ---- TrainConfig --------------------------------------------------------------------------------


def test_defaults_follow_the_seed_training_cell():
    c = TrainConfig().validate()
    assert (c.lr, c.hidden_dim, c.reg, c.weight_scale, c.epochs, c.dtype) == (
        1e-3,
        500,
        1e-3,
        1e-3,
        1,
        "float32",
    )
    assert c.data == "data/cifar10.zarr" and c.batch_size % c.shard_size == 0


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"shard_size": 100}, ["shard_size 100", "batch_size 256"]),
        ({"norm": "layernorm"}, ["norm", "layernorm", "spatial_batchnorm"]),
        ({"dtype": "float16"}, ["dtype", "float16"]),
        ({"batch_size": 0}, ["batch_size", ">= 1"]),
        ({"steps": 0}, ["steps"]),
        ({"lr": -1.0}, ["lr"]),
        ({"filter_size": 4}, ["filter_size", "odd"]),
        (
            {"norm": "groupnorm", "num_filters": 6, "num_groups": 4},
            ["num_groups 4", "num_filters 6"],
        ),
        ({"workers": 2, "scheduler": "tcp://h:8786"}, ["workers", "scheduler"]),
        ({"epochs": "2"}, ["epochs", "int"]),
        ({"lr": True}, ["lr", "float"]),
    ],
)
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
    assert TrainConfig.from_dict({"lr": 1}).lr == 1.0  # TOML's `lr = 1`
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


# ---- data order ----------------------------------------------------------------------------------


def test_every_epoch_visits_every_image_once_in_a_seeded_order():
    s = Schedule(n_train=1000, batch_size=64, shard_size=16, seed=3, epochs=2)
    assert s.steps_per_epoch == 16 and s.total_steps == 32
    for epoch in range(2):
        seen = np.concatenate(
            [np.concatenate(s.shards(step)) for step in range(epoch * 16, epoch * 16 + 16)]
        )
        assert np.array_equal(np.sort(seen), np.arange(1000))
    assert not np.array_equal(s.batch(0), s.batch(16))  # a new order each epoch
    assert np.array_equal(
        s.batch(5), Schedule(1000, 64, 16, 3, 2).batch(5)
    )  # a function of (seed, step)
    assert not np.array_equal(s.batch(5), Schedule(1000, 64, 16, 4, 2).batch(5))
    last = s.shards(15)  # 1000 = 15 * 64 + 40
    assert [len(x) for x in last] == [16, 16, 8]
    assert s.ends_epoch(15) and not s.ends_epoch(14) and s.ends_epoch(31)


def test_steps_limit_and_subset():
    s = Schedule(n_train=100, batch_size=32, shard_size=8, seed=0, epochs=5, max_steps=6)
    assert s.total_steps == 6 and s.num_epochs == 2 and s.ends_epoch(3) and s.ends_epoch(5)
    assert np.array_equal(epoch_permutation(1, 2, 50), epoch_permutation(1, 2, 50))
    sub = subset(0, 100, 30, tag=1)
    assert len(np.unique(sub)) == 30 and sub.max() < 100
    assert len(subset(0, 10, 30, tag=1)) == 10


# ---- the fixed-order gradient tree, cut into parts and slices ------------------------------------


def _symbols(k):
    return pairwise([str(i) for i in range(k)], lambda a, b: f"({a}+{b})")


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17])
def test_parts_nodes_and_program_rebuild_the_one_tree_for_any_width(k):
    for width in range(1, k + 3):
        plan = StepPlan.make(k, width, 100_000)
        assert plan.width == width and [a for a, _ in plan.parts] == sorted(
            a for a, _ in plan.parts
        )
        nodes = plan.nodes()
        assert sorted(i for n in nodes for i in range(*covers(n, k))) == list(range(k))  # a tiling
        regs = [
            pairwise([str(i) for i in range(*covers(n, k))], lambda a, b: f"({a}+{b})")
            for n in nodes
        ]
        ops, root = plan.program()
        for dst, a, b in ops:
            assert dst == len(regs)
            regs.append(f"({regs[a]}+{regs[b]})")
        assert regs[root] == _symbols(k)


@pytest.mark.parametrize("k", [2, 3, 5, 7, 8, 9, 16, 17])
def test_a_nodes_sum_order_is_the_trees(k):
    """sum_order: the order a part's node hands to loss_sum (its shards numbered from its first)
    adds them as the tree does, an odd last node moving up unchanged."""

    def render(order, first):
        if isinstance(order, tuple):
            return f"({render(order[0], first)}+{render(order[1], first)})"
        return str(order + first)

    for width in range(1, k + 1):
        for node in StepPlan.make(k, width, 100_000).nodes():
            a, b = covers(node, k)
            expected = pairwise([str(i) for i in range(a, b)], lambda x, y: f"({x}+{y})")
            assert render(sum_order(node, k, a), a) == expected


@pytest.mark.parametrize("cap, together", [(10**6, [8]), (40, [2, 2, 2, 2]), (8, [])])
def test_a_part_computes_its_node_together_up_to_the_cap_with_the_same_bits(
    monkeypatch, cap, together
):
    """compute_nodes: a node's shards through loss_sum when they hold at most
    TOGETHER_MAX_IMAGES images, else its children each so (or shard by shard); the node's
    bits and each shard's loss are the same every way."""
    from pipeline.cnn import ThreeLayerConvNet
    from pipeline.training import worker

    model = ModelSpec(4, 3, 40, 10, "none", 1, "float32", input_dim=(3, 8, 8))
    layout = Layout.of(model.build().params)
    spec = worker.TaskSpec(model=model, store="unused", layout=layout)
    plan = spec.plan(8, 1)  # one part: the whole tree, one node of 8 shards
    rng = np.random.default_rng(4)
    data = [
        (rng.standard_normal((16, 3, 8, 8)).astype(np.float32), rng.integers(10, size=16), 0.0)
        for _ in range(8)
    ]
    params = layout.flatten(model.build(weight_scale=0.1, seed=5).params)
    calls, loss_sum = [], ThreeLayerConvNet.loss_sum

    def recording(self, batches, *args):
        calls.append(len(batches))
        return loss_sum(self, batches, *args)

    monkeypatch.setattr(ThreeLayerConvNet, "loss_sum", recording)

    def part(cap):
        monkeypatch.setattr(worker, "TOGETHER_MAX_IMAGES", cap)
        empty = lambda node: np.empty(layout.size, np.float32)  # noqa: E731
        return worker.compute_nodes(
            spec, layout.views(params), 0, plan, 0, data, empty, lambda tmp: None
        )

    nodes, stats = part(cap)
    assert calls == together
    expected, ref_stats = part(0)  # the reference: shard by shard
    assert calls == together
    np.testing.assert_array_equal(nodes[0], expected[0])
    assert [st["loss_sum"] for st in stats] == [st["loss_sum"] for st in ref_stats]


def test_frontier_takes_the_largest_whole_subtrees():
    assert frontier(0, 16, 16) == [(4, 0)]
    assert frontier(0, 5, 16) == [(2, 0), (0, 4)]
    assert frontier(5, 11, 16) == [(0, 5), (1, 3), (1, 4), (0, 10)]
    assert frontier(4, 5, 5) == [(3 - 1, 1)]  # shard 4 of 5 moves up unchanged: node (2, 1)


def test_slices_are_whole_blocks_and_cover_the_vector():
    assert split(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert split(2, 4) == [(0, 0), (0, 1), (1, 1), (1, 2)]
    plan = StepPlan.make(4, 3, 5 * CHUNK + 7)
    assert plan.slices[0][0] == 0 and plan.slices[-1][1] == 5 * CHUNK + 7
    assert all(lo % CHUNK == 0 for lo, _ in plan.slices)


def test_no_slice_cuts_a_whole_range_muons_filters():
    # [0, 10) in 4 parts of units of 2, ranges [1, 7) and [7, 8) kept whole: the cut at 2 moves
    # to 8 (7 is no multiple of 2; 8 is in no range), later ones stay
    assert split(10, 4, 2, ((1, 7), (7, 9))) == [(0, 10), (10, 10), (10, 10), (10, 10)]
    assert split(10, 4, 2, ((1, 7),)) == [(0, 8), (8, 8), (8, 8), (8, 10)]
    assert split(10, 2, 1, ((3, 5),)) == [(0, 5), (5, 10)]
    assert split(10, 3) == split(10, 3, 1, ((3, 3), (0, 3)))  # empty and edge ranges cut nothing
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 50 * CHUNK))
        cuts = np.sort(rng.choice(n, size=min(n - 1, 6), replace=False))
        whole = tuple((int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:]) if rng.random() < 0.6)
        plan = StepPlan.make(8, int(rng.integers(1, 6)), n, whole)
        assert plan.slices[0][0] == 0 and plan.slices[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(plan.slices, plan.slices[1:]))
        for lo, _ in plan.slices:
            assert lo % CHUNK == 0 or lo == n
            assert not any(s < lo < e for s, e in whole)


def frontier_nodes(plan: StepPlan, slots: np.ndarray) -> np.ndarray:
    """The parts' tree nodes of shard gradients ``slots`` (k, n), as workers write them: each
    in the slot of its first shard."""
    nodes = np.zeros_like(slots)
    for node in plan.nodes():
        a, b = covers(node, plan.k)
        nodes[a] = pairwise(list(slots[a:b]), np.add)
    return nodes


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k, width", [(1, 1), (2, 2), (3, 2), (5, 2), (8, 3), (16, 4), (4, 6)])
@pytest.mark.parametrize("t", [0, 57])
def test_sliced_tree_and_adam_are_bit_for_bit_the_whole_tree_then_pipeline_optim_adam(
    k, width, t, dtype
):
    rng = np.random.default_rng(10 * k + width + t)
    n = 3 * CHUNK + 1001
    slots = (rng.standard_normal((k, n)) * 10.0 ** rng.integers(-3, 4, (k, 1))).astype(dtype)
    w0 = rng.standard_normal(n).astype(dtype)
    m0 = (0.1 * rng.standard_normal(n)).astype(dtype)
    v0 = (0.01 * np.abs(rng.standard_normal(n))).astype(dtype)
    segments = [(0, n // 3, 1e-3), (n // 3, n // 2, 0.0), (n // 2, n, 0.5)]  # a bias has no L2
    # reference: the whole tree, / batch, + reg * W, then pipeline.optim's Adam
    g = pairwise(list(slots), np.add) / dtype(200)
    for a, b, reg in segments:
        g[a:b] += dtype(reg) * w0[a:b]
    ref = {"learning_rate": 3e-3, "m": m0.copy(), "v": v0.copy(), "t": t}
    w_ref = w0.copy()
    adam_inplace(w_ref, g, ref)
    plan = StepPlan.make(k, width, n)
    nodes = frontier_nodes(plan, slots)
    ops, root = plan.program()
    out = tuple(np.full(n, np.nan, dtype) for _ in range(3))
    partials = [
        tree_update(
            nodes,
            [covers(nd, k)[0] for nd in plan.nodes()],
            ops,
            root,
            0,
            (w0, m0, v0),
            out,
            0,
            lo,
            hi,
            segments,
            CHUNK,
            200,
            adam_scalars({"learning_rate": 3e-3, "t": t}, dtype),
        )
        for lo, hi in plan.slices
    ]
    for a, b in zip(out, (w_ref, ref["m"], ref["v"])):
        assert a.dtype == dtype and np.array_equal(a, b)
    expect = sum(float(np.sum(w0[a:b].astype(np.float64) ** 2)) for a, b, reg in segments if reg)
    assert math.fsum(np.concatenate(partials)) == pytest.approx(expect, rel=1e-12)


@pytest.mark.parametrize("k, width", [(1, 1), (3, 2), (8, 3), (4, 6)])
@pytest.mark.parametrize("average", [(0.0, False), (0.7, True)])
def test_muons_filters_update_whole_and_to_the_same_bits_however_the_vector_is_sliced(
    k, width, average
):
    # three filters Muon updates (two of them longer than a block) between plain SGD pieces;
    # every slicing gives the bits of one slice, which is SGD, then muon_update, then averaging
    rng = np.random.default_rng(k + width)
    dtype, a_avg, pull = np.float32, *average
    sizes = [100, 16 * 600, 37, 4 * CHUNK + 64, 500, 8 * 27, 300]
    bounds = np.cumsum([0, *sizes])
    n = int(bounds[-1])
    filters = ((100, 100 + 16 * 600, 16), (int(bounds[3]), int(bounds[4]), 64))
    filters += ((int(bounds[5]), int(bounds[6]), 8),)
    segments = [
        (int(a), int(b), 0.0 if i % 2 else 1e-3) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))
    ]
    slots = rng.standard_normal((k, n)).astype(dtype)
    state = tuple(rng.standard_normal(n).astype(dtype) for _ in range(3))
    scalars = step_scalars(
        dtype,
        1,
        (a_avg, 1 - a_avg, float(pull), 0.001, 1, 1),
        lr=0.05,
        momentum=0.85,
        nesterov=True,
    )
    muon = (filters, 0.02, 0.6)

    def run(plan):
        nodes = frontier_nodes(plan, slots)
        ops, root = plan.program()
        out = tuple(np.full(n, np.nan, dtype) for _ in range(3))
        for lo, hi in plan.slices:
            tree_update(
                nodes,
                [covers(nd, k)[0] for nd in plan.nodes()],
                ops,
                root,
                0,
                state,
                out,
                0,
                lo,
                hi,
                segments,
                CHUNK,
                64,
                scalars,
                muon,
            )
        return out

    whole = run(StepPlan.make(k, 1, n))
    sliced = run(StepPlan.make(k, width, n, [(a, b) for a, b, _ in filters]))
    for x, y in zip(whole, sliced):
        assert np.array_equal(x, y)
    # the reference: SGD's momentum for every piece; Muon's step for the filters
    g = pairwise(list(slots), np.add) / dtype(64)
    w, m, v = state
    buf = dtype(0.6) * m + g
    for a, b, rows in filters:
        d = g[a:b] + dtype(0.6) * buf[a:b]
        new = muon_update(w[a:b].reshape(rows, -1), d.reshape(rows, -1), 0.02).reshape(-1)
        avg = dtype(a_avg) * v[a:b] + dtype(1 - a_avg) * new if a_avg else v[a:b]
        np.testing.assert_array_equal(whole[1][a:b], buf[a:b])
        np.testing.assert_allclose(whole[0][a:b], avg if pull else new, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(whole[2][a:b], avg, rtol=1e-5, atol=1e-6)
    # a slice that cuts a filter is refused (StepPlan never makes one)
    ops, root = StepPlan.make(k, 1, n).program()
    rows = [covers(nd, k)[0] for nd in StepPlan.make(k, 1, n).nodes()]
    with pytest.raises(ValueError, match=r"the filter \[100, 9700\) is cut by the slice"):
        tree_update(
            slots,
            rows,
            ops,
            root,
            0,
            state,
            whole,
            0,
            0,
            CHUNK,
            segments,
            CHUNK,
            64,
            scalars,
            muon,
        )


def test_tree_order_is_fixed_not_left_to_right():
    order = pairwise(list("abcde"), lambda a, b: f"({a}+{b})")
    assert order == "(((a+b)+(c+d))+e)"


# ---- BN moments ----------------------------------------------------------------------------------


def test_combined_moments_are_those_of_the_whole_batch():
    rng = np.random.default_rng(1)
    parts = [rng.normal(m, s, (n, 6)) for m, s, n in ((0, 1, 16), (3, 2, 16), (-1, 0.5, 7))]
    mean, var = combine_moments(
        [p.mean(0) for p in parts], [p.var(0) for p in parts], [len(p) for p in parts]
    )
    whole = np.concatenate(parts)
    np.testing.assert_allclose(mean, whole.mean(0), rtol=1e-13)
    np.testing.assert_allclose(var, whole.var(0), rtol=1e-13)
    m32, v32 = combine_moments(
        [p.mean(0).astype(np.float32) for p in parts],
        [p.var(0).astype(np.float32) for p in parts],
        [16, 16, 7],
    )
    assert m32.dtype == v32.dtype == np.float32


# ---- shared buffers ------------------------------------------------------------------------------


def test_layout_views_and_flatten_round_trip():
    params = {
        "W1": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
        "b1": np.array([7, 8], np.float32),
    }
    layout = Layout.of(params)
    flat = layout.flatten(params)
    assert flat.shape == (26,) and layout.views(flat)["b1"].tolist() == [7, 8]
    assert Layout.from_dict(json.loads(json.dumps(layout.to_dict()))) == layout


def test_workers_see_the_state_the_coordinator_starts_from_and_records_validate_themselves():
    layout = Layout(("W", "b"), ((3, 4), (4,)), "float32")
    shared = SharedState(layout, slots=2, max_slices=2, blocks=1)
    try:
        p = np.arange(16, dtype=np.float32)
        shared.start(5, p, p + 1, p + 2)
        seen = attach(shared.ref)
        assert np.array_equal(seen.state[1][0], p) and np.array_equal(
            seen.state[1][2], p + 2
        )  # 5 % 2
        assert record_is(seen.slices[0][0], 4)  # step 5's parameters are ready
        seen.slots[1] = 2.5
        assert np.all(shared.slots[1] == 2.5) and not shared.slots[0].any()
        record = seen.shards[0][1]
        write_record(record, 7, np.arange(3.0))
        assert record_is(shared.shards[0][1], 7) and not record_is(shared.shards[0][1], 6)
        record[0] = 8  # a writer of step 8 half-way through
        assert not record_is(shared.shards[0][1], 7) and not record_is(shared.shards[0][1], 8)
    finally:
        shared.close()
    assert not any(shm_root().glob(f"convpipe-*{shared.ref.token[:12]}*"))


def test_a_failed_second_shared_file_removes_the_first_and_says_why(monkeypatch):
    calls = []
    real = shm._create

    def create(path, size):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(path, size)

    monkeypatch.setattr(shm, "_create", create)
    with pytest.raises(TrainingError, match="No space left on device"):
        SharedState(Layout(("W",), ((4,),), "float32"), slots=1, max_slices=1, blocks=1)
    assert len(calls) == 2 and not any(shm_root().glob(f"{calls[0].rsplit('/', 1)[-1]}*"))


def test_shared_memory_is_refused_where_stores_may_be_reordered(monkeypatch):
    from pipeline.training.transport import open_exchange

    monkeypatch.setattr(shm.platform, "machine", lambda: "aarch64")
    with pytest.raises(TrainingError, match="x86"):
        open_exchange(None, "shm", None, Layout(("W",), ((4,),), "float32"), 1, 1)


def test_stale_shared_files_of_dead_coordinators_are_removed(tmp_path):
    dead = shm_root() / f"convpipe-999999999-{pid_namespace()}-deadbeef0000-state"
    elsewhere = shm_root() / "convpipe-999999999-1-deadbeef0000-state"  # another container's
    dead.write_bytes(b"x")
    elsewhere.write_bytes(b"x")
    try:
        remove_stale()
        assert not dead.exists() and elsewhere.exists()
    finally:
        dead.unlink(missing_ok=True)
        elsewhere.unlink(missing_ok=True)


# ---- run directory -------------------------------------------------------------------------------


def test_run_directory_refuses_to_overwrite_and_truncates_metrics(tmp_path):
    run = RunDir(tmp_path / "run").create()
    (run.config_path).write_text("{}")
    with pytest.raises(TrainingError, match="already holds a run"):
        RunDir(tmp_path / "run").create()
    for i in range(5):
        run.append_metrics({"kind": "step", "step": i + 1, "loss": 1.0})
    with open(run.metrics_path, "a") as f:
        f.write('{"kind": "st')  # torn last line of a killed run
    assert len(run.read_metrics()) == 5
    run.truncate_metrics(3)
    assert [m["step"] for m in run.read_metrics()] == [1, 2, 3]


def test_params_npz_loads_without_pickle(tmp_path):
    run = RunDir(tmp_path / "run").create()
    params = {"W1": np.random.rand(4, 3, 3, 3).astype(np.float32), "b1": np.zeros(4, np.float32)}
    run.write_params(
        params,
        {"bn_running_mean": np.ones(4, np.float32), "bn_running_var": np.ones(4, np.float32)},
    )
    with np.load(run.params_path, allow_pickle=False) as f:
        assert set(f.files) == {"W1", "b1", "bn_running_mean", "bn_running_var"}
    back, bn = run.read_params()
    assert np.array_equal(back["W1"], params["W1"]) and set(bn) == {
        "bn_running_mean",
        "bn_running_var",
    }


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plots_against_fractional_epochs_with_eval_points_legend_and_titled_filters(
    tmp_path, monkeypatch
):
    """A run of 6 steps, 4 per epoch (from config.json), scored every 2 steps and at the epoch's
    end: curves.png's x axis is step / 4 from 0, the accuracy lines hold every point, axes are
    labelled, there is a legend; filters.png is upscaled to >= 480 px and titled with the run and
    step."""
    from pipeline.curves import Curves
    from pipeline.figures import curves_figure, filters_figure

    run = RunDir(tmp_path / "run-a").create()
    TrainConfig(batch_size=64, shard_size=16, train_limit=256, steps=6).save(run.config_path)
    metrics = []
    for s in range(1, 7):
        metrics.append(
            {"kind": "step", "step": s, "epoch": (s - 1) // 4 + 1, "loss": 2.3 - 0.1 * s}
        )
        if s in (2, 6):
            metrics.append(
                {
                    "kind": "eval",
                    "step": s,
                    "epoch": s / 4,
                    "train_acc": 0.1 * s,
                    "val_acc": 0.05 * s,
                }
            )
        if s == 4:
            metrics.append(
                {"kind": "epoch", "epoch": 1, "step": 4, "train_acc": 0.4, "val_acc": 0.2}
            )
    W1 = np.random.default_rng(0).normal(size=(32, 3, 7, 7)).astype(np.float32)
    curves_png, filters_png = write_plots(run, metrics, W1)
    assert (curves_png.name, filters_png.name) == ("curves.png", "filters.png")
    assert _png_size(curves_png) == (900, 750)
    width, height = _png_size(filters_png)
    assert width >= 480 and height >= 480

    curves = Curves.from_metrics(metrics, 4)
    loss_ax, acc_ax = curves_figure("Run run-a", curves).axes
    assert [p.x for p in curves.loss] == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
    assert loss_ax.get_ylabel() == "training loss" and acc_ax.get_ylabel() == "accuracy"
    assert acc_ax.get_xlabel().startswith("epoch") and acc_ax.get_xlim()[0] == 0
    val = next(line for line in acc_ax.get_lines() if line.get_label() == "val accuracy")
    assert list(val.get_xdata()) == [0.5, 1.0, 1.5] and list(val.get_ydata()) == pytest.approx(
        [0.1, 0.2, 0.3]
    )
    legend = [t.get_text() for t in acc_ax.get_legend().get_texts()]
    assert legend == [
        "val accuracy",
        "train accuracy (sample)",
        "val, whole split (end of each epoch and of the run)",
    ]
    assert loss_ax.get_legend() is not None
    # the test split's accuracy at the end of the run, named with its test-time augmentation
    acc_ax = curves_figure("Run run-a", curves, test=(0.9067, "flip-translate")).axes[1]
    star = acc_ax.get_lines()[-1]
    assert (list(star.get_xdata()), list(star.get_ydata())) == ([1.5], [0.9067])
    assert acc_ax.get_legend().get_texts()[-1].get_text() == (
        "test split, end of the run (test-time augmentation flip-translate): 90.67%"
    )
    plain = curves_figure("Run run-a", curves, test=(0.5, "none")).axes[1]
    assert plain.get_legend().get_texts()[-1].get_text() == (
        "test split, end of the run (no test-time augmentation): 50.00%"
    )
    drawn = []  # write_plots hands the test split's score to the figure
    monkeypatch.setattr(rundir, "curves_figure", lambda *a: drawn.append(a[2]) or curves_figure(*a))
    assert write_plots(run, metrics, W1, test=(0.5, "none"))[0] == curves_png
    assert drawn == [(0.5, "none")]
    # a run with test_each_epoch: the test split at each epoch's end, a line of its own
    scored = [dict(m, test_acc=0.35) if m["kind"] == "epoch" else m for m in metrics]
    acc_ax = curves_figure("Run run-a", Curves.from_metrics(scored, 4)).axes[1]
    test = next(line for line in acc_ax.get_lines() if line.get_label().startswith("test acc"))
    assert (list(test.get_xdata()), list(test.get_ydata())) == ([1.0], [0.35])
    assert test.get_label() == "test accuracy, whole split (end of each epoch)"
    title = filters_figure("First-layer filters of run run-a, step 6", W1).axes[0].get_title()
    assert "run run-a, step 6" in title and "32 filters, 3x7x7" in title


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_leaf_added_as_computed_has_the_bits_of_multiplying_then_adding(dtype):
    # the fused out += g * n must round the product first (no fused multiply-add), as the tree's
    # np.add(out, np.multiply(g, n)) does: the workers use both forms for the same tree
    from pipeline.optim import add_scaled

    rng = np.random.default_rng(3)
    out = rng.standard_normal((37, 129)).astype(dtype)
    g = (rng.standard_normal((37, 129)) * np.exp(rng.uniform(-20, 20, (37, 129)))).astype(dtype)
    n = dtype(117)
    want = np.add(out, np.multiply(g, n))
    add_scaled(out, g, n)
    assert out.dtype == dtype and np.array_equal(out.view(np.uint8), want.view(np.uint8))
    gt = np.asfortranarray(g)  # a non-contiguous gradient is read correctly
    out2 = rng.standard_normal(g.shape).astype(dtype)
    want2 = out2 + gt * n
    add_scaled(out2, gt, n)
    assert np.array_equal(out2, want2)


def test_add_scaled_refuses_what_would_lose_or_change_the_result():
    from pipeline.optim import add_scaled

    out = np.ones((4, 6), np.float32)
    with pytest.raises(ValueError, match="C-contiguous"):
        add_scaled(out[:, ::2], np.ones((4, 3), np.float32), 2)  # a copy would be written
    with pytest.raises(ValueError, match="float32 \\(4, 6\\)"):
        add_scaled(out, np.ones((4, 6), np.float64), 2)  # would round in float64
    g = np.full((4, 6), 0.1, np.float32)
    add_scaled(out, g, 3)  # a Python int n: cast to float32
    assert np.array_equal(out, np.float32(1) + g * np.float32(3))


def test_a_closed_client_while_waiting_is_a_lost_connection_not_a_value_error():
    # Dask closes the client when the scheduler goes away; distributed.wait then finds no client
    # ("No clients found"): the coordinator must report a lost connection (CI saw the ValueError)
    from pipeline.training.exchange import _gather

    class Future:
        status, key = "pending", "part-0"

    class Client:
        status = "closed"

    def wait(*args, **kwargs):
        raise ValueError("No clients found")

    with pytest.raises(
        ConnectionError, match="step 3: the connection to the Dask scheduler is closed"
    ):
        _gather(Client(), [Future()], "step 3", 10.0, wait)
    Client.status = "running"  # a ValueError with a live client is not hidden
    with pytest.raises(ValueError, match="No clients found"):
        _gather(Client(), [Future()], "step 3", 10.0, wait)


@pytest.mark.parametrize(
    "reason,status,lost_worker",
    [
        (
            "scheduler-connection-lost",
            "running",
            False,
        ),  # reconnected to a restarted scheduler: not a worker
        ("scheduler-connection-lost", "connecting", False),
        ("unknown", "connecting", False),  # no scheduler now: not a worker either
        ("unknown", "running", True),  # the scheduler is there, a worker's data left
    ],
)
def test_cancelled_futures_are_a_lost_worker_only_while_the_scheduler_stays(
    monkeypatch, reason, status, lost_worker
):
    """exchange.gather: futures cancelled with the scheduler still connected mean a worker's data
    left (replay from a checkpoint); cancelled because the client lost its scheduler connection,
    they are that loss, raised as it came, even when the client has reconnected since."""
    from distributed.client import (
        CancelledFuturesGroup,
        FutureCancelledError,
        FuturesCancelledError,
    )

    from pipeline.training import exchange

    cancelled = FuturesCancelledError(
        [CancelledFuturesGroup([FutureCancelledError("part-0", reason)], reason)]
    )

    def gather_cancelled(*args):
        raise cancelled

    class Client:
        pass

    client = Client()
    client.status = status
    monkeypatch.setattr(exchange, "_gather", gather_cancelled)
    with pytest.raises(exchange.WorkerLost if lost_worker else FuturesCancelledError):
        exchange.gather(client, [], "step 3", 10.0)
