"""The coordinator of data-parallel training: ``train(config)``.

Each step: shard, compute, reduce, update, sync, checkpoint.

    shard       the global batch of the step (a pure function of seed, epoch and step) is cut
                into fixed virtual shards of ``shard_size`` images, whatever the worker count,
                and the shards into one part per worker (:mod:`pipeline.training.plan`);
    compute     one Dask task per part reads its shards' images on its worker, computes each
                shard's gradient sum alone and adds them along the fixed tree;
    reduce      reduce-scatter: each worker finishes the tree for its slice of the parameters
                from every part's nodes, divides by the batch size and adds L2;
    update      each worker applies Adam to its slice (all-gather: the next step's parts read
                every slice); the coordinator moves and computes nothing of size P;
    sync        the coordinator collects the small results: loss sums (a non-finite loss stops
                the run), counts, and the spatial-BN moments it folds into the running statistics;
    checkpoint  every ``checkpoint_every`` steps and after each epoch, atomically.

Nothing here depends on which worker ran what, so the same settings give the same bits on any
number of workers, either transport, after a worker dies, and after ``--resume``. The parts of
step s + 1 are submitted before step s is collected: on their workers they read their images and
wait for step s's slices, so Dask's dispatch and the coordinator's bookkeeping stay off the
critical path.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from pipeline.augment import Augment
from pipeline.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pipeline.cluster import grows_by_itself, worker_cluster, worker_count
from pipeline.cnn import ModelSpec
from pipeline.data import open_store
from pipeline.errors import DataError, TrainingError
from pipeline.procs import Owner
from pipeline.training.config import TrainConfig
from pipeline.training.exchange import (
    WorkerLost,
    gather,
    warm_up_workers,
)
from pipeline.training.plan import Layout
from pipeline.training.reduce import combine_moments
from pipeline.training.rundir import BN_KEYS, RunDir, write_plots
from pipeline.training.shards import Schedule, cut, subset
from pipeline.training.transport import open_exchange
from pipeline.training.update import UpdateRule
from pipeline.training.worker import EVAL_SHARD, TaskSpec, shard_predictions

CHECKPOINT_FORMAT = "convpipe-train/1"
#: training images a whitening conv's filters are computed from (the first of the train split)
WHITEN_IMAGES = 5000
#: times a run replays from its last checkpoint after a worker left with data it needed (tcp)
MAX_REPLAYS = 3


@dataclass
class State:
    """Everything a checkpoint holds: with it a run continues bit for bit."""

    step: int  # steps done
    params: np.ndarray  # flat, Layout order
    m: np.ndarray  # Adam moments, flat
    v: np.ndarray
    t: int  # Adam's step count
    bn: dict[str, np.ndarray]  # spatial-BN running_mean/running_var ({} without BN)
    seconds: float = 0.0  # training time spent by earlier sessions
    images: int = 0
    metrics_lines: int = 0
    # with --ema or --lookahead: bn's average, kept as the weights' is (_average_bn)
    bn_avg: dict[str, np.ndarray] = field(default_factory=dict)


def train(
    config: TrainConfig,
    client=None,
    progress=None,
    *,
    holder: str = "convpipe train",
    gone: Owner | None = None,
) -> dict:
    """Train the run's network (ThreeLayerConvNet, or config.model's ConvNet) data-parallel on
    a Dask cluster; return the run's summary.

    ``client``: a ``distributed.Client`` to use (default: connect as ``config`` says: the
    embedded LocalCluster or ``config.scheduler``). ``progress``: called with one dict per
    event (``event`` = start, resumed, warning, step, epoch, checkpoint, done).

    This process (the coordinator) owns the run directory while it trains there
    (:meth:`RunDir.claim`; ``holder`` says what it is, e.g. ``job J attempt 2``) and releases
    it when it returns or raises (a crash, Ctrl-C, SIGTERM): a run directory that another live
    process trains in is refused with :class:`RunDirBusy`, one line naming that process.
    ``gone``: a process known to have ended (a job's coordinator whose worker left the
    cluster); its hold on the run directory is taken over even from another host.
    """
    emit = progress or (lambda event: None)
    config = config.validate()
    if config.resume or config.out:  # another process trains there: refused before a cluster
        RunDir(config.resume or config.out).check_free(gone)
    store, n_train = _open_data(config)
    schedule = Schedule(
        n_train, config.batch_size, config.shard_size, config.seed, config.epochs, config.steps
    )
    mspec = ModelSpec.of(config, len(store.class_names))
    model = mspec.build(weight_scale=config.weight_scale, reg=config.reg, seed=config.seed)
    frozen = model.frozen
    if frozen:  # a whitening conv: from the first training images, before any augmentation
        model.whiten(store.read("train", np.arange(min(WHITEN_IMAGES, n_train)))[0])
    layout = Layout.of(model.params)
    # the conv filters that train, with --muon-lr: Muon's (not L2-regularized: their norm is set)
    filters = {
        name: (sl.start, sl.stop, shape[0])
        for (name, sl), shape in zip(layout.slices().items(), layout.shapes)
        if config.muon_lr and len(shape) == 4 and name not in frozen
    }
    segments = tuple(
        (
            sl.start,
            sl.stop,
            config.reg if name.startswith("W") and name not in frozen | filters.keys() else 0.0,
            0.0
            if name in frozen
            else config.norm_lr_factor
            if name.startswith(("gamma", "beta"))
            else 1.0,
        )
        for name, sl in layout.slices().items()
    )

    with (
        worker_cluster(
            client, config.scheduler, config.workers, config.threads_per_worker
        ) as client,
        _open_run(config, holder, gone) as (run, config),
    ):
        state = (
            _resume(run, layout, config, model, emit)
            if config.resume
            else _fresh(model, layout, config)
        )
        spec = TaskSpec(
            mspec,
            store.path,
            layout,
            config.threads_per_worker,
            segments,
            UpdateRule.of(config, schedule.total_steps),
            config.stall_timeout,
            Augment(config.flip, config.translate, config.seed),
            schedule.steps_per_epoch,
            _freeze(config, model, schedule.steps_per_epoch),
            tuple(filters.values()),
        )
        exchange = open_exchange(
            client,
            config.transport,
            spec,
            layout,
            config.batch_size // config.shard_size,
            None,  # each step over the workers ready when it is planned
            config.stall_timeout,
        )
        try:
            for replay in range(MAX_REPLAYS + 1):
                try:
                    return _train_loop(
                        config, run, schedule, model, state, exchange, client, store, emit
                    )
                except WorkerLost as exc:
                    if replay == MAX_REPLAYS or client.status != "running":
                        raise
                    # the same steps again from the last checkpoint give the same bits
                    emit(
                        {
                            "event": "warning",
                            "message": f"{exc}: replaying from the last checkpoint "
                            f"({replay + 1} of at most {MAX_REPLAYS})",
                        }
                    )
                    state = _resume(run, layout, config, model, emit)
        finally:
            exchange.close()  # tasks still waiting give up


class Clock:
    """Seconds per phase of the loop, summed over steps (bookkeeping out of the loop's way)."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self.t = time.perf_counter()

    def lap(self, phase: str) -> float:
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        self.totals[phase] = self.totals.get(phase, 0.0) + dt
        return dt

    def add(self, phase: str, seconds: float) -> None:
        self.totals[phase] = self.totals.get(phase, 0.0) + seconds


@dataclass
class Progress:
    """What the loop has done this session (for the summary)."""

    images: int = 0
    steps: int = 0
    train_acc: float | None = None
    val_acc: float | None = None
    test_acc: float | None = None
    metrics_lines: int = 0


def _train_loop(config, run, schedule, model, state, exchange, client, store, emit) -> dict:
    bn, bn_avg = dict(state.bn), dict(state.bn_avg)

    def scored_bn():  # the statistics of the weights a run is scored and saved with
        return bn_avg if config.ema else bn

    done = Progress(metrics_lines=state.metrics_lines)
    emit(
        {
            "event": "start",
            "run_dir": str(run.path),
            "start_step": state.step,
            "total_steps": schedule.total_steps,
            "steps_per_epoch": schedule.steps_per_epoch,
            "epochs": schedule.num_epochs,
            "workers": worker_count(client),
            "batch_size": config.batch_size,
            "transport": exchange.kind,
            "dashboard": getattr(client, "dashboard_link", None),
        }
    )
    # while a step is collected: a job's progress callback raises its stop request there too
    # (a closing worker gives its jobs 5 s; a step waiting on it would outlast them)
    exchange.on_wait = lambda: emit({"event": "waiting"})
    exchange.start(state.step, state.params, state.m, state.v)
    if not grows_by_itself(client):  # (a step loop shows adaptive scaling no work waiting)
        exchange.follow(schedule, state.t - state.step + 1)  # adam_t of step s: s + this
    warmup = warm_up_workers(client, exchange, schedule.n_train, state.step)
    clock = Clock()
    t_begin = clock.t
    in_flight = {}

    def submit(step):  # the parts of ``step``, if it is part of the run
        if step < schedule.total_steps and step not in in_flight:
            shards = schedule.shards(step)  # shard: the step's batch in fixed virtual shards
            in_flight[step] = exchange.submit(
                step,
                exchange.plan(len(shards)),
                shards,
                sum(len(s) for s in shards),
                state.t + step - state.step + 1,
            )

    saved = [state.step]

    def log(record):  # a metrics line, and the progress event of the same
        run.append_metrics(record)
        done.metrics_lines += 1
        emit({"event": record["kind"], **record, "total_steps": schedule.total_steps})

    eval_every = config.eval_every or max(1, round(schedule.total_steps / 10))

    def checkpoint(steps_done):  # the state after ``steps_done`` steps, atomically
        params, m, v = exchange.state(steps_done)
        path = _save(
            run,
            exchange.layout,
            config,
            State(
                steps_done,
                params,
                m,
                v,
                state.t + steps_done - state.step,
                bn,
                state.seconds + time.perf_counter() - t_begin,
                state.images + done.images,
                done.metrics_lines,
                bn_avg,
            ),
        )
        saved.append(steps_done)
        emit({"event": "checkpoint", "step": steps_done, "path": str(path)})
        clock.lap("checkpoint")

    def finish(step, parts, t0, wait, sent, received) -> float:  # sync and log a collected step
        nonlocal bn, bn_avg
        for change in exchange.pool.take_events():  # workers that joined or left
            emit(_worker_event(step + 1, change, exchange))
        shards = [s for p in parts for s in p["shards"]]
        loss, n = _loss(step, shards, parts, schedule, config, run)  # a non-finite loss stops
        # sync: BN running statistics from every shard's moments (count-weighted)
        bn = _sync_bn(model, bn, shards)
        bn, bn_avg = _average_bn(exchange.spec.update, step, bn, bn_avg)
        done.images += n
        done.steps += 1
        log(
            {
                **_step_record(step, schedule, loss, n, parts, coordinator=t0, waited=wait),
                "coordinator_bytes_out": exchange.sent - sent,
                "coordinator_bytes_in": exchange.received - received,
            }
        )
        return loss

    submit(state.step)
    try:
        for step in range(state.step, schedule.total_steps):
            sent, received = exchange.sent, exchange.received
            scored = (step + 1) % eval_every == 0 or schedule.ends_epoch(step)
            # the next step waits on its workers for this one; not when accuracies are scored
            # off the clock after it: the next step's compute would leave the clock with them
            # (it hid 10 of 60 steps of a short run), so they are scored with no step beside it
            if not scored:
                submit(step + 1)
            # compute, reduce, update: on the workers; collect their small results
            t0 = clock.lap("coordinator")
            parts = exchange.collect(in_flight[step])
            del in_flight[step]  # (collected: a Ctrl-C from here on finds the next step)
            loss = finish(step, parts, t0, clock.lap("wait"), sent, received)

            if (step + 1) % eval_every == 0 and not schedule.ends_epoch(step):
                log(
                    {
                        "kind": "eval",
                        "step": step + 1,
                        "epoch": (step + 1) / schedule.steps_per_epoch,
                        **_accuracies(
                            client,
                            exchange,
                            step + 1,
                            scored_bn(),
                            store,
                            config,
                            schedule.n_train,
                            config.eval_samples,
                            config.eval_samples,
                        ),
                    }
                )
                clock.lap("eval")
                submit(step + 1)

            if schedule.ends_epoch(step):
                train_idx = subset(config.seed, schedule.n_train, config.train_acc_samples, tag=1)
                done.train_acc = _accuracy(
                    client, exchange, step + 1, scored_bn(), store, "train", train_idx, config
                )
                done.val_acc = _accuracy(
                    client, exchange, step + 1, scored_bn(), store, "val", None, config
                )
                record = {
                    "kind": "epoch",
                    "epoch": schedule.epoch_of(step) + 1,
                    "step": step + 1,
                    # False: the run ended before the epoch did (scored there all the same)
                    "end_of_epoch": (step + 1) % schedule.steps_per_epoch == 0,
                    "train_acc": done.train_acc,
                    "val_acc": done.val_acc,
                    "loss": loss,
                    "seconds": state.seconds + time.perf_counter() - t_begin,
                }
                if config.test_each_epoch:  # measuring, not training: off the run's clock
                    clock.lap("eval")
                    try:
                        record["test_acc"] = _accuracy(
                            client, exchange, step + 1, scored_bn(), store, "test", None, config
                        )
                    except KeyboardInterrupt:  # the epoch's line goes before its checkpoint
                        log(record)
                        raise
                    finally:
                        t_begin += clock.lap("test")
                log(record)
                clock.lap("eval")
                submit(step + 1)  # (held back above: it computes while the checkpoint is written)

            if (step + 1) % config.checkpoint_every == 0 or schedule.ends_epoch(step):
                checkpoint(step + 1)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: keep the last step done
        if state.step + done.steps > saved[-1]:
            try:
                try:
                    checkpoint(state.step + done.steps)
                except TrainingError:
                    # the step in flight ended and the next one (in flight too, on shared
                    # memory) overwrote the state before it: keep the state after it
                    if not _finish_in_flight(state.step + done.steps, in_flight, exchange, finish):
                        raise
                    checkpoint(state.step + done.steps)
            except TrainingError as exc:  # the last checkpoint stays
                emit(
                    {"event": "warning", "message": f"no checkpoint of the interrupted run: {exc}"}
                )
        raise

    seconds = time.perf_counter() - t_begin
    clock.lap("coordinator")
    # the test split, scored once at the end (with the run's test-time augmentation); after
    # the training's clock stopped, as a `convpipe evaluate` would
    done.test_acc = _accuracy(
        client, exchange, schedule.total_steps, scored_bn(), store, "test", None, config, config.tta
    )
    clock.lap("test")
    # the trained weights, or their moving average (the state's third part with --ema)
    final = exchange.layout.views(exchange.state(schedule.total_steps)[2 if config.ema else 0])
    final_bn = scored_bn()
    run.write_params(final, {f"bn_{k}": v for k, v in final_bn.items()} if final_bn else None)
    run.prune_checkpoints(keep=1)  # a finished run keeps what --resume needs to go on
    summary = _summary(
        config, run, schedule, state, done, clock, seconds, warmup, exchange, client, final, emit
    )
    run.write_summary(summary)
    emit({"event": "done", **summary})
    return summary


# ---- pieces of the loop --------------------------------------------------------------------------

#: how long an interrupted run waits for the results of a step that has ended
INTERRUPT_WAIT_S = 2.0


def _finish_in_flight(step, in_flight, exchange, finish) -> bool:
    """Collect and log ``step``, in flight and ended (the step after it has overwritten the
    state before it), so that the interrupted run keeps the state after it; whether it could
    (within :data:`INTERRUPT_WAIT_S`; a second Ctrl-C stops the wait)."""
    pending = in_flight.pop(step, None)
    if pending is None:
        return False
    sent, received = exchange.sent, exchange.received
    t0 = time.perf_counter()
    try:
        parts = exchange.collect(pending, timeout=INTERRUPT_WAIT_S)
        finish(step, parts, 0.0, time.perf_counter() - t0, sent, received)
    except (KeyboardInterrupt, TrainingError, OSError):
        return False
    return True


def _loss(step, shards, parts, schedule, config, run) -> tuple[float, int]:
    """The step's loss (mean data loss + L2 from the workers' per-block sums) and image count;
    raises when the shards do not cover the batch or the loss is not finite."""
    n = sum(s["n"] for s in shards)
    expected = len(schedule.batch(step))
    if n != expected or [s["slot"] for s in shards] != list(range(len(shards))):
        raise TrainingError(
            f"step {step + 1}: part results cover {n} images in shards "
            f"{[s['slot'] for s in shards]}, expected {expected}"
        )
    sumsq = math.fsum(x for p in parts for x in p["partials"])
    loss = math.fsum(s["loss_sum"] for s in shards) / n + 0.5 * config.reg * sumsq
    if not math.isfinite(loss):
        last = run.checkpoints()
        raise TrainingError(
            f"loss is {loss} at step {step + 1} (epoch {schedule.epoch_of(step) + 1}): "
            "training diverged; "
            + (f"last good checkpoint {last[0]}" if last else "no checkpoint was written yet")
            + " (try a smaller --lr)"
        )
    return loss, n


def _sync_bn(model, bn: dict, shards: list[dict]) -> dict:
    """BN running statistics after folding in the step's batch moments
    (count-weighted over shards)."""
    if not bn:
        return bn
    mean, var = combine_moments(
        [s["bn_mean"] for s in shards], [s["bn_var"] for s in shards], [s["n"] for s in shards]
    )
    model.set_state(bn)
    model.update_running_stats(mean, var)
    return model.get_state()


def _average_bn(rule: UpdateRule, step: int, bn: dict, avg: dict) -> tuple[dict, dict]:
    """BN's running statistics averaged as the weights are after ``step`` (from 0), so that
    weights and statistics scored together belong together (airbench's lookahead averages
    them too): ``avg`` becomes ``a * avg + (1 - a) * bn`` and, where the lookahead pulls the
    weights to their slow copy, ``bn`` becomes ``avg`` (``(a, pull)``:
    :meth:`UpdateRule.average`). ``avg`` is empty without --ema and --lookahead. It starts
    from the first step's statistics (the initial running variance, zero, is no statistic;
    the weights' average starts from the initial weights)."""
    if not avg:
        return bn, avg
    a, pull = rule.average(step)
    if step == 0:
        avg = {k: v.copy() for k, v in bn.items()}
    elif a != 0:
        avg = {k: a * avg[k] + (1.0 - a) * bn[k] for k in avg}
    if pull:
        bn = {k: v.copy() for k, v in avg.items()}
    return bn, avg


def _step_record(step, schedule, loss, n, parts, coordinator: float, waited: float) -> dict:
    """A metrics line for ``step``: its loss and where its time went. ``compute`` and ``reduce``
    are the busiest worker's; ``sync`` the longest wait of a worker for the others' gradients;
    ``coordinator`` the coordinator's own time since it collected the step before."""
    seconds = coordinator + waited
    busiest = max(parts, key=lambda p: p.get("compute_s", 0.0) + p.get("reduce_s", 0.0))
    timing = {
        "read": max(p.get("read_s", 0.0) for p in parts),
        "compute": busiest.get("compute_s", 0.0),
        "reduce": max(p.get("reduce_s", 0.0) for p in parts),
        "sync": max(p.get("sync_s", 0.0) for p in parts),
        "coordinator": coordinator,
    }
    return {
        "kind": "step",
        "step": step + 1,
        "epoch": schedule.epoch_of(step) + 1,
        "steps_per_epoch": schedule.steps_per_epoch,  # the page's epoch axis: no store to open
        "loss": loss,
        "n": n,
        "seconds": seconds,
        "images_per_s": n / seconds if seconds > 0 else None,
        "workers": len(parts),  # the parts of the step: the workers it was planned over
        "part_workers": [p.get("worker") for p in parts],  # where each part was computed
        **{f"{k}_s": v for k, v in timing.items()},
    }


def _worker_event(step: int, change: dict, exchange) -> dict:
    """A progress event: a worker joined (its warm-up done: it takes parts from the next step
    planned), left (retired: no replay), died, or was refused (its warm-up failed)."""
    worker, how = change["worker"], change["change"]
    text = {
        "joined": "joined: it takes parts from the next step",
        "left": "was retired: it takes no more parts",
        "died": "died or lost its connection",
        "refused": f"is not used: its warm-up failed ({change.get('error')})",
    }[how]
    return {
        "event": "workers",
        "step": step,
        "worker": worker,
        "change": how,
        "ready": len(exchange.addresses),
        "message": f"worker {worker} {text} ({len(exchange.addresses)} in use)",
    }


def _summary(
    config, run, schedule, state, done, clock, seconds, warmup, exchange, client, final, emit
) -> dict:
    """The run's summary.json: results, speed, and where the time went."""
    metrics = run.read_metrics()
    train_acc, val_acc = done.train_acc, done.val_acc
    epochs_done = [m for m in metrics if m.get("kind") == "epoch"]
    if epochs_done and train_acc is None:  # resumed after the last epoch's evaluation
        train_acc, val_acc = epochs_done[-1]["train_acc"], epochs_done[-1]["val_acc"]
    try:
        test = None if done.test_acc is None else (done.test_acc, config.tta)
        plots = [str(p) for p in write_plots(run, metrics, final["W1"], test)]
    except Exception as exc:  # noqa: BLE001 - a plot must not lose a finished run
        plots = []
        emit({"event": "warning", "message": f"plots not written: {exc}"})
    steps = [m for m in metrics if m.get("kind") == "step"][-done.steps :] if done.steps else []
    train_seconds = seconds - clock.totals.get("eval", 0.0)
    breakdown = (
        {
            k: sum(m[f"{k}_s"] for m in steps) / len(steps)
            for k in ("read", "compute", "reduce", "sync")
        }
        if steps
        else {}
    )
    if steps:
        breakdown["coordinator"] = clock.totals.get("coordinator", 0.0) / len(steps)
        breakdown["checkpoint"] = clock.totals.get("checkpoint", 0.0) / len(steps)
    return {
        "run_dir": str(run.path),
        "train_acc": train_acc,
        "val_acc": val_acc,
        "test_acc": done.test_acc,
        "tta": config.tta,
        "ema": config.ema,  # scored and saved with the weights' moving average
        "lookahead": config.lookahead,  # ended on the weights' slow copy
        "steps": schedule.total_steps,
        "steps_this_session": done.steps,
        "epochs": schedule.num_epochs,
        "images": state.images + done.images,
        "seconds": state.seconds + seconds,
        # training time of this session: the loop, checkpoints included, accuracy evaluation not
        "train_seconds": train_seconds,
        "images_per_s": done.images / train_seconds if done.steps else None,
        "step_breakdown_s": breakdown,
        # bytes of task arguments and results through the coordinator, per step (none of size P)
        "coordinator_bytes_out": sum(m["coordinator_bytes_out"] for m in steps) / len(steps)
        if steps
        else None,
        "coordinator_bytes_in": sum(m["coordinator_bytes_in"] for m in steps) / len(steps)
        if steps
        else None,
        "warmup_s": warmup,
        "workers": worker_count(client),
        # workers that joined, were retired and died while this session trained
        "worker_changes": exchange.pool.members.counts(),
        "transport": exchange.kind,
        "final_loss": next((m["loss"] for m in reversed(metrics) if m.get("kind") == "step"), None),
        "plots": plots,
        "settings": config.to_dict(),
    }


def _accuracy(
    client, exchange, step, bn, store, split, indices, config, tta="none"
) -> float | None:
    """Test-mode accuracy on ``split`` (``indices`` or all of it) with the parameters of
    ``step``, as tasks over its shards (scoring the views of test-time augmentation ``tta``)."""
    if indices is None:
        size = store.splits.get(split, 0)
        if not size:
            return None
        indices = np.arange(size, dtype=np.int64)
    futures = [
        client.submit(
            shard_predictions,
            exchange.spec,
            exchange.params_ref(step, average=config.ema > 0),
            bn or None,
            split,
            idx,
            tta,
            pure=False,
            priority=10,
        )
        for idx in cut(indices, EVAL_SHARD)
    ]
    counts = gather(client, futures, f"{split} accuracy after step {step}", config.stall_timeout)
    return sum(c["correct"] for c in counts) / sum(c["n"] for c in counts)


def _accuracies(client, exchange, step, bn, store, config, n_train, n_val, n_tr) -> dict:
    """Accuracy on fixed samples of ``n_val`` val and ``n_tr`` train images (the learning curve)."""
    val = store.splits.get("val", 0)
    val_idx = subset(config.seed, val, n_val, tag=2) if val else None
    return {
        "val_acc": _accuracy(client, exchange, step, bn, store, "val", val_idx, config)
        if val
        else None,
        "train_acc": _accuracy(
            client,
            exchange,
            step,
            bn,
            store,
            "train",
            subset(config.seed, n_train, n_tr, tag=3),
            config,
        ),
    }


def _open_data(config: TrainConfig):
    store = open_store(config.data)
    n = store.splits.get("train", 0)
    if n < 1:
        raise DataError(f"{config.data}: the store has no training images")
    problem = config.train_limit_problem(n)
    if problem:
        raise TrainingError(problem)
    if config.train_limit is not None:
        n = config.train_limit
    return store, n


@contextmanager
def _open_run(config: TrainConfig, holder: str, gone: Owner | None):
    """``(run, config)``: a fresh run directory (settings saved), or the one ``config.resume``
    names; owned by this process (:meth:`RunDir.claim`) until the ``with`` block ends."""
    if config.resume:
        run = RunDir(config.resume).require_existing()
    else:
        run = RunDir(config.out or RunDir.default_path()).create()
    with run.claim(holder, gone):
        if config.resume:
            saved = TrainConfig.load(run.config_path)
            mine, theirs = config.result_settings(), saved.result_settings()
            for key in mine:
                if key not in ("epochs", "steps") and mine[key] != theirs[key]:
                    raise TrainingError(
                        f"--resume {run.path}: {key} is {mine[key]!r} but the run was trained "
                        f"with {theirs[key]!r}"
                    )
        config = config.replace(out=str(run.path))
        config.save(run.config_path)
        yield run, config


def resume_config(run_dir: str, **overrides) -> TrainConfig:
    """The settings to resume ``run_dir`` with: its saved ones, ``overrides`` applied."""
    run = RunDir(run_dir).require_existing()
    saved = TrainConfig.load(run.config_path)
    if overrides.get("scheduler"):  # where it runs is this session's choice
        overrides.setdefault("workers", None)
    if overrides.get("workers"):
        overrides.setdefault("scheduler", None)
    return saved.replace(**overrides, resume=str(run_dir))


def _freeze(config: TrainConfig, model, steps_per_epoch: int) -> tuple[tuple[str, int], ...]:
    """TaskSpec.freeze: the whitening convs' biases from the step that ends their epochs."""
    if config.whiten_bias_epochs is None:
        return ()
    first = config.whiten_bias_epochs * steps_per_epoch
    return tuple((name, first) for name in model.whiten_biases)


def _fresh(model, layout: Layout, config: TrainConfig) -> State:
    params = layout.flatten(model.params)
    # v: Adam's second moment, or SGD's average of the weights (--ema, --lookahead: from the
    # first ones)
    averaged = bool(config.ema or config.lookahead)
    v = params.copy() if averaged else np.zeros_like(params)
    bn = model.get_state()
    bn_avg = {k: b.copy() for k, b in bn.items()} if averaged else {}
    return State(0, params, np.zeros_like(params), v, 0, bn, bn_avg=bn_avg)


def _save(run: RunDir, layout: Layout, config: TrainConfig, state: State):
    arrays = {}
    for prefix, flat in (("params", state.params), ("adam/m", state.m), ("adam/v", state.v)):
        arrays.update({f"{prefix}/{k}": v for k, v in layout.views(flat).items()})
    arrays.update({f"bn/{k}": v for k, v in state.bn.items()})
    arrays.update({f"bn_avg/{k}": v for k, v in state.bn_avg.items()})
    meta = {
        "kind": CHECKPOINT_FORMAT,
        "step": state.step,
        "adam_t": state.t,
        "seconds": state.seconds,
        "images": state.images,
        "metrics_lines": state.metrics_lines,
        "layout": layout.to_dict(),
        "settings": config.result_settings(),
    }
    run.sync_metrics()  # the lines the checkpoint counts are on disk before it is
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
    return _fresh(model, layout, config)


def _state_from(arrays: dict, meta: dict, layout: Layout, config: TrainConfig) -> State:
    if meta.get("kind") != CHECKPOINT_FORMAT or Layout.from_dict(meta["layout"]) != layout:
        raise ValueError("written by other settings (parameter layout differs)")
    if meta.get("settings", {}).get("seed") != config.seed:
        raise ValueError("written with another seed")
    flat = {
        p: layout.flatten({k: arrays[f"{p}/{k}"] for k in layout.names})
        for p in ("params", "adam/m", "adam/v")
    }

    def group(prefix):
        return {
            k.split("/", 1)[1]: arrays[k].astype(layout.dtype)
            for k in arrays
            if k.startswith(prefix)
        }

    bn, bn_avg = group("bn/"), group("bn_avg/")
    if bn and not bn_avg and (config.ema or config.lookahead):
        bn_avg = {k: b.copy() for k, b in bn.items()}  # written before BN was averaged
    return State(
        int(meta["step"]),
        flat["params"],
        flat["adam/m"],
        flat["adam/v"],
        int(meta["adam_t"]),
        bn,
        float(meta["seconds"]),
        int(meta["images"]),
        int(meta["metrics_lines"]),
        bn_avg,
    )


__all__ = ["train", "resume_config", "State", "BN_KEYS"]
