"""The coordinator of data-parallel training: ``train(config)``.

Each step: shard, compute, reduce, update, sync, checkpoint.

    shard       the global batch of the step (a pure function of seed, epoch and step) is cut
                into fixed virtual shards of ``shard_size`` images, whatever the worker count;
    compute     one Dask task per shard reads its images from the Zarr store on its worker and
                returns the shard's gradient *sums*, loss sum, count and BN batch moments;
    reduce      the shard sums are added along one fixed pairwise tree, divided by the batch
                size, and the L2 term is added once;
    update      Adam (pipeline.optim.adam_inplace) on the flat parameter vector;
    sync        spatial-BN running statistics from all shards' moments (count-weighted), then
                the new parameters are published to every worker once;
    checkpoint  every ``checkpoint_every`` steps and after each epoch, atomically.

Nothing here depends on which worker ran what, so the same settings give the same bits on
1, 2 or 4 workers, after a worker dies, and after ``--resume``.

With the shared-memory transport the next step's tasks are submitted as soon as this step's
shards are done: on their workers they read their images, then wait until the parameters of
their step are published; a finished shard marks its status record in shared memory. Dask still
places, runs and (after a worker dies) reruns every task, but its message latency is off
the critical path.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass

import numpy as np

from pipeline.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pipeline.training.config import TrainConfig
from pipeline.cluster import worker_cluster, worker_count
from pipeline.training.exchange import open_exchange, warm_up_workers
from pipeline.training.reduce import adam_scalars, combine_moments, finish_and_adam, finish_gradient
from pipeline.training.reduce import sumsq as sum_of_squares
from pipeline.training.rundir import BN_KEYS, RunDir, write_plots
from pipeline.training.shards import Schedule, cut, subset
from pipeline.training.transport import Layout
from pipeline.training.worker import ModelSpec, TaskSpec, shard_predictions
from pipeline.errors import DataError, TrainingError
from pipeline.optim import adam_inplace

EVAL_SHARD = 500            # images per accuracy task
# steps whose shard tasks are submitted before their parameters exist. One: when step k + 1's
# tasks are submitted, all of step k's have finished, so a task waiting for its parameters
# never holds a worker thread an earlier step's task needs (two could deadlock 1-thread workers)
AHEAD = 1
REGULARIZED = ("W1", "W2", "W3")
CHECKPOINT_FORMAT = "convpipe-train/1"


@dataclass
class State:
    """Everything a checkpoint holds: with it a run continues bit for bit."""

    step: int                      # steps done
    params: np.ndarray             # flat, Layout order
    m: np.ndarray                  # Adam moments, flat
    v: np.ndarray
    t: int                         # Adam's step count
    bn: dict[str, np.ndarray]      # spatial-BN running_mean/running_var ({} without BN)
    seconds: float = 0.0           # training time spent by earlier sessions
    images: int = 0
    metrics_lines: int = 0


def train(config: TrainConfig, client=None, progress=None) -> dict:
    """Train ThreeLayerConvNet data-parallel on a Dask cluster; return the run's summary.

    ``client``: a ``distributed.Client`` to use (default: connect as ``config`` says: the
    embedded LocalCluster or ``config.scheduler``). ``progress``: called with one dict per
    event (``event`` = start, resumed, warning, step, epoch, checkpoint, done).
    """
    emit = progress or (lambda event: None)
    config = config.validate()
    store, n_train = _open_data(config)
    schedule = Schedule(n_train, config.batch_size, config.shard_size, config.seed, config.epochs, config.steps)
    mspec = ModelSpec(config.num_filters, config.filter_size, config.hidden_dim, len(store.class_names),
                      config.norm, config.num_groups, config.dtype)
    model = mspec.build(weight_scale=config.weight_scale, reg=config.reg, seed=config.seed)
    layout = Layout.of(model.params)

    with worker_cluster(client, config.scheduler, config.workers, config.threads_per_worker) as client, \
            _numba_threads(1):
        run, config = _open_run(config)
        state = _resume(run, layout, config, model, emit) if config.resume else _fresh(model, layout)
        spec = TaskSpec(mspec, store.path, layout, config.threads_per_worker)
        exchange = open_exchange(client, config.transport, spec, layout, config.batch_size // config.shard_size)
        try:
            return _train_loop(config, run, schedule, model, layout, state, exchange, client, store, emit)
        finally:
            exchange.close()                      # tasks still waiting for parameters give up


def _train_loop(config, run, schedule, model, layout, state, exchange, client, store, emit) -> dict:
    params = exchange.params                      # the flat vector the workers see
    params[:] = state.params
    grad = np.empty_like(params)
    slices = layout.slices()
    adam = {"learning_rate": config.lr, "m": state.m, "v": state.v, "t": state.t}
    bn = dict(state.bn)
    metrics_lines = state.metrics_lines
    totals = dict.fromkeys(("read", "compute", "transfer", "reduce", "adam", "bn_sync", "checkpoint", "eval"), 0.0)
    images, steps_run = 0, 0
    train_acc = val_acc = None
    workers = worker_count(client)
    emit({"event": "start", "run_dir": str(run.path), "start_step": state.step, "total_steps": schedule.total_steps,
          "steps_per_epoch": schedule.steps_per_epoch, "epochs": schedule.num_epochs, "workers": workers,
          "batch_size": config.batch_size, "transport": exchange.kind,
          "dashboard": getattr(client, "dashboard_link", None)})
    exchange.publish(state.step)
    t_warm = time.perf_counter()
    _warm_up_kernels(params.dtype)
    warmup = warm_up_workers(client, exchange, schedule.n_train) + (time.perf_counter() - t_warm)
    t_begin = time.perf_counter()
    ahead = {}                                    # step -> its shard tasks, submitted in advance
    last_published = time.time()

    for step in range(state.step, schedule.total_steps):
        t0 = time.perf_counter()
        # shard: this step's global batch, cut into fixed virtual shards
        shards = schedule.shards(step)
        # compute: one task per shard, on the workers, returning gradient sums
        early = step in ahead
        stats, slots = exchange.collect(ahead.pop(step) if early else exchange.submit(step, shards))
        t1, collected = time.perf_counter(), time.time()
        if exchange.early:
            # keep the next steps' tasks in flight: on their workers they read their images,
            # then wait for the parameters of their step (Dask's dispatch hides behind compute)
            for nxt in range(step + 1, min(step + 1 + AHEAD, schedule.total_steps)):
                if nxt not in ahead:
                    ahead[nxt] = exchange.submit(nxt, schedule.shards(nxt))
        t1b = time.perf_counter()
        n = sum(s["n"] for s in stats)
        if n != sum(len(s) for s in shards) or [s["slot"] for s in stats] != list(range(len(shards))):
            raise TrainingError(f"step {step + 1}: shard results cover {n} images in slots "
                                f"{[s['slot'] for s in stats]}, expected {sum(len(s) for s in shards)}")
        # reduce: fixed-order tree over the shards, / n, + reg * W (the only place L2 is added)
        sumsq = math.fsum(sum_of_squares(params[slices[name]]) for name in REGULARIZED)
        loss = math.fsum(s["loss_sum"] for s in stats) / n + 0.5 * config.reg * sumsq
        if not math.isfinite(loss):
            last = run.checkpoints()
            raise TrainingError(
                f"loss is {loss} at step {step + 1} (epoch {schedule.epoch_of(step) + 1}): training diverged; "
                + (f"last good checkpoint {last[0]}" if last else "no checkpoint was written yet")
                + " (try a smaller --lr)"
            )
        # update: Adam on the flat vector, in place (exactly pipeline.optim.adam's update);
        # with at most two shards the tree, L2 and Adam run fused in one pass over memory
        if len(shards) <= 2:
            t2 = time.perf_counter()
            segments = [(sl.start, sl.stop, config.reg if name in REGULARIZED else 0.0) for name, sl in slices.items()]
            finish_and_adam(slots, params, adam["m"], adam["v"], n, segments, adam_scalars(adam, params.dtype))
        else:
            for name, sl in slices.items():
                finish_gradient(slots[:, sl], params[sl], grad[sl], n, config.reg if name in REGULARIZED else 0.0)
            t2 = time.perf_counter()
            adam_inplace(params, grad, adam)
        t3 = time.perf_counter()
        # sync: BN running statistics from every shard's moments, then parameters to the workers
        if bn:
            mean, var = combine_moments([s["bn_mean"] for s in stats], [s["bn_var"] for s in stats],
                                        [s["n"] for s in stats])
            model.set_state(bn)
            model.update_running_stats(mean, var)
            bn = model.get_state()
        t4 = time.perf_counter()
        exchange.publish(step + 1)
        t5 = time.perf_counter()
        published = time.time()

        # time of the step: compute = busiest worker's forward/backward + writing its sums;
        # transfer = the rest of the wait for the shard results (scheduling, messages, reading
        # images unless that overlapped the previous update) + publishing the parameters
        busiest = _busiest(stats)
        critical = busiest["compute_s"] + (0.0 if early else busiest["read_s"])
        timing = {"read": busiest["read_s"], "compute": busiest["compute_s"],
                  "transfer": max(0.0, (t1 - t0) - critical) + (t1b - t1) + (t5 - t4),
                  "reduce": t2 - t1b, "adam": t3 - t2, "bn_sync": t4 - t3}
        for k, v in timing.items():
            totals[k] += v
        images += n
        steps_run += 1
        record = {"kind": "step", "step": step + 1, "epoch": schedule.epoch_of(step) + 1, "loss": loss, "n": n,
                  "seconds": t5 - t0, "images_per_s": n / (t5 - t0), **{f"{k}_s": v for k, v in timing.items()},
                  # of the transfer: shard tasks starting after the parameters were published,
                  # and their results reaching the coordinator after the last one finished
                  "start_latency_s": max(s["begin"] for s in stats) - last_published if early else None,
                  "return_latency_s": collected - max(s["end"] for s in stats),
                  "arrival_after_publish_s": max(s["arrived"] for s in stats) - last_published if early else None}
        last_published = published
        run.append_metrics(record)
        metrics_lines += 1
        emit({"event": "step", **record, "total_steps": schedule.total_steps})

        if schedule.ends_epoch(step):
            te = time.perf_counter()
            train_idx = subset(config.seed, schedule.n_train, config.train_acc_samples, tag=1)
            train_acc = _accuracy(client, exchange, bn, store, "train", train_idx)
            val_acc = _accuracy(client, exchange, bn, store, "val", None)
            totals["eval"] += time.perf_counter() - te
            record = {"kind": "epoch", "epoch": schedule.epoch_of(step) + 1, "step": step + 1,
                      "train_acc": train_acc, "val_acc": val_acc, "loss": loss,
                      "seconds": state.seconds + time.perf_counter() - t_begin}
            run.append_metrics(record)
            metrics_lines += 1
            emit({"event": "epoch", **record})

        if (step + 1) % config.checkpoint_every == 0 or schedule.ends_epoch(step):
            tc = time.perf_counter()
            path = _save(run, layout, config, State(step + 1, params, adam["m"], adam["v"], adam["t"], bn,
                                                    state.seconds + time.perf_counter() - t_begin,
                                                    state.images + images, metrics_lines))
            totals["checkpoint"] += time.perf_counter() - tc
            emit({"event": "checkpoint", "step": step + 1, "path": str(path)})

    seconds = time.perf_counter() - t_begin
    final = layout.views(params.copy())
    run.write_params(final, {f"bn_{k}": v for k, v in bn.items()} if bn else None)
    metrics = run.read_metrics()
    epochs_done = [m for m in metrics if m.get("kind") == "epoch"]
    if epochs_done and train_acc is None:  # resumed after the last epoch's evaluation
        train_acc, val_acc = epochs_done[-1]["train_acc"], epochs_done[-1]["val_acc"]
    try:
        plots = [str(p) for p in write_plots(run, metrics, final["W1"])]
    except Exception as exc:  # noqa: BLE001 - a plot must not lose a finished run
        plots = []
        emit({"event": "warning", "message": f"plots not written: {exc}"})
    summary = {
        "run_dir": str(run.path),
        "train_acc": train_acc,
        "val_acc": val_acc,
        "steps": schedule.total_steps,
        "steps_this_session": steps_run,
        "epochs": schedule.num_epochs,
        "images": state.images + images,
        "seconds": state.seconds + seconds,
        # training time of this session: the loop, checkpoints included, accuracy evaluation not
        "train_seconds": seconds - totals["eval"],
        "images_per_s": images / (seconds - totals["eval"]) if steps_run else None,
        "step_breakdown_s": {k: v / steps_run for k, v in totals.items()} if steps_run else {},
        "warmup_s": warmup,
        "fused_update": config.batch_size // config.shard_size <= 2,   # reduce and Adam in one pass
        "workers": workers,
        "transport": exchange.kind,
        "final_loss": next((m["loss"] for m in reversed(metrics) if m.get("kind") == "step"), None),
        "plots": plots,
        "settings": config.to_dict(),
    }
    run.write_summary(summary)
    emit({"event": "done", **summary})
    return summary


# ---- pieces of the loop ----------------------------------------------------------------------------

def _warm_up_kernels(dtype) -> None:
    """Load the coordinator's compiled kernels (Numba's cache) before the timed steps."""
    x = np.zeros((2, 8), dtype=dtype)
    w, m, v, g = (np.zeros(8, dtype=dtype) for _ in range(4))
    sum_of_squares(w)
    finish_and_adam(x, w, m, v, 1, [(0, 8, 0.0)], adam_scalars({}, dtype))
    finish_and_adam(x[:1], w, m, v, 1, [(0, 8, 0.0)], adam_scalars({}, dtype))
    finish_gradient(np.zeros((3, 8), dtype=dtype), w, g, 1, 0.0)
    adam_inplace(w, g, {})


@contextlib.contextmanager
def _numba_threads(n: int):
    """The coordinator's kernels (sum of squares, fused reduce+Adam) on ``n`` threads: they are
    memory-bound, and a parallel region on a busy machine waits for its slowest thread."""
    import numba

    before, interval = numba.get_num_threads(), sys.getswitchinterval()
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    # the scheduler's event loop shares this process: hand the GIL back and forth quickly,
    # so that the update does not wait 5 ms for it after each kernel
    sys.setswitchinterval(min(interval, 2e-4))
    try:
        yield
    finally:
        numba.set_num_threads(before)
        sys.setswitchinterval(interval)


def _busiest(stats: list[dict]) -> dict:
    """Read and compute seconds of the worker that was busiest this step (the critical path)."""
    per = {}
    for s in stats:
        agg = per.setdefault(s["worker"], {"read_s": 0.0, "compute_s": 0.0})
        agg["read_s"] += s["read_s"]
        agg["compute_s"] += s["compute_s"] + s["write_s"]
    return max(per.values(), key=lambda a: a["read_s"] + a["compute_s"])


def _accuracy(client, exchange, bn, store, split, indices) -> float | None:
    """Test-mode accuracy on ``split`` (``indices`` or all of it), as tasks over its shards."""
    if indices is None:
        size = store.splits.get(split, 0)
        if not size:
            return None
        indices = np.arange(size, dtype=np.int64)
    spec = exchange.spec
    futures = [client.submit(shard_predictions, spec, exchange.params_ref(), bn or None, split, idx, pure=False)
               for idx in cut(indices, EVAL_SHARD)]
    counts = client.gather(futures)
    return sum(c["correct"] for c in counts) / sum(c["n"] for c in counts)


def _open_data(config: TrainConfig):
    from pipeline.data import open_store

    store = open_store(config.data)
    n = store.splits.get("train", 0)
    if n < 1:
        raise DataError(f"{config.data}: the store has no training images")
    if config.train_limit is not None:
        if config.train_limit > n:
            raise TrainingError(f"train_limit {config.train_limit} exceeds the {n} training images of {config.data}")
        n = config.train_limit
    return store, n


def _open_run(config: TrainConfig) -> tuple[RunDir, TrainConfig]:
    """A fresh run directory (settings saved), or the one ``config.resume`` names."""
    if config.resume:
        run = RunDir(config.resume).require_existing()
        saved = TrainConfig.load(run.config_path)
        mine, theirs = config.result_settings(), saved.result_settings()
        for key in mine:
            if key not in ("epochs", "steps") and mine[key] != theirs[key]:
                raise TrainingError(f"--resume {run.path}: {key} is {mine[key]!r} but the run was trained "
                                    f"with {theirs[key]!r}")
        config = config.replace(out=str(run.path))
        config.save(run.config_path)
        return run, config
    run = RunDir(config.out or RunDir.default_path()).create()
    config = config.replace(out=str(run.path))
    config.save(run.config_path)
    return run, config


def resume_config(run_dir: str, **overrides) -> TrainConfig:
    """The settings to resume ``run_dir`` with: its saved ones, ``overrides`` applied."""
    run = RunDir(run_dir).require_existing()
    saved = TrainConfig.load(run.config_path)
    if overrides.get("scheduler"):      # where it runs is this session's choice
        overrides.setdefault("workers", None)
    if overrides.get("workers"):
        overrides.setdefault("scheduler", None)
    return saved.replace(**overrides, resume=str(run_dir))


def _fresh(model, layout: Layout) -> State:
    params = layout.flatten(model.params)
    return State(0, params, np.zeros_like(params), np.zeros_like(params), 0, model.get_state())


def _save(run: RunDir, layout: Layout, config: TrainConfig, state: State):
    arrays = {}
    for prefix, flat in (("params", state.params), ("adam/m", state.m), ("adam/v", state.v)):
        arrays.update({f"{prefix}/{k}": v for k, v in layout.views(flat).items()})
    arrays.update({f"bn/{k}": v for k, v in state.bn.items()})
    meta = {"kind": CHECKPOINT_FORMAT, "step": state.step, "adam_t": state.t, "seconds": state.seconds,
            "images": state.images, "metrics_lines": state.metrics_lines, "layout": layout.to_dict(),
            "settings": config.result_settings()}
    path = save_checkpoint(run.checkpoint_path(state.step), arrays, meta)
    run.prune_checkpoints()
    return path


def _resume(run: RunDir, layout: Layout, config: TrainConfig, model, emit) -> State:
    """The newest checkpoint that loads intact; a torn or damaged one is skipped, never used."""
    for path in run.checkpoints():
        try:
            arrays, meta = load_checkpoint(path)
            state = _state_from(arrays, meta, layout, config)
        except (CheckpointError, KeyError, ValueError) as exc:
            emit({"event": "warning", "message": f"skipping checkpoint {path.name}: {exc}"})
            continue
        run.truncate_metrics(state.metrics_lines)
        emit({"event": "resumed", "step": state.step, "checkpoint": str(path)})
        return state
    # killed before its first checkpoint: start over (same seed, same result)
    run.truncate_metrics(0)
    emit({"event": "resumed", "step": 0, "checkpoint": None})
    return _fresh(model, layout)


def _state_from(arrays: dict, meta: dict, layout: Layout, config: TrainConfig) -> State:
    if meta.get("kind") != CHECKPOINT_FORMAT or Layout.from_dict(meta["layout"]) != layout:
        raise ValueError("written by other settings (parameter layout differs)")
    if meta.get("settings", {}).get("seed") != config.seed:
        raise ValueError("written with another seed")
    flat = {p: layout.flatten({k: arrays[f"{p}/{k}"] for k in layout.names}) for p in ("params", "adam/m", "adam/v")}
    bn = {k.split("/", 1)[1]: arrays[k].astype(layout.dtype) for k in arrays if k.startswith("bn/")}
    return State(int(meta["step"]), flat["params"], flat["adam/m"], flat["adam/v"], int(meta["adam_t"]), bn,
                 float(meta["seconds"]), int(meta["images"]), int(meta["metrics_lines"]))


__all__ = ["train", "resume_config", "State", "BN_KEYS"]
