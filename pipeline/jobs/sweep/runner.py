"""Running a sweep: every live trial trains to the next rung (``parallel`` at once, each an
ordinary training run on the whole cluster), is scored, and the best go on."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from pipeline.cluster import worker_cluster
from pipeline.data import open_store
from pipeline.errors import TrainingError
from pipeline.jobs.sweep.halving import promote, rungs
from pipeline.jobs.sweep.report import settings_text, write_results
from pipeline.jobs.sweep.space import SweepError, SweepPlan
from pipeline.jobs.sweep.state import STATE_FILE, SweepState, Trial
from pipeline.procs import Owner
from pipeline.training import resume_config, train
from pipeline.training.config import TrainConfig
from pipeline.training.rundir import RunDir, RunDirBusy
from pipeline.training.shards import Schedule


def total_steps(config) -> int:
    """The steps of a whole trial with these base settings (``steps``, else epochs x batches)."""
    store = open_store(config.data)
    n = store.splits.get("train", 0)
    if config.train_limit is not None:
        n = min(n, config.train_limit)
    if n < 1:
        raise TrainingError(f"{config.data}: the store has no training images")
    if store.splits.get("val", 0) < 1:
        raise TrainingError(
            f"{config.data}: the store has no val split: a sweep scores its trials on it"
        )
    return Schedule(
        n, config.batch_size, config.shard_size, config.seed, config.epochs, config.steps
    ).total_steps


class SweepFailed(TrainingError):
    """A sweep ran to its end and no trial completed: it has no result. Its results (trials.csv,
    summary.json) are written; resuming it would not change them (failed trials stay failed)."""

    resumable = False


def check_trials_can_run(plan: SweepPlan) -> None:
    """Refuse a sweep none of whose trials can start: every trial would fail alone, the same
    way. A one-line :class:`TrainingError`, the message the first trial would have given; a
    sweep where only some trials cannot start runs (those fail with their reason)."""
    base = TrainConfig.from_job(plan.base)
    n = open_store(base.data).splits.get("train", 0)
    refusals = [
        plan.trial_config(s, base.out or "", 1).train_limit_problem(n)
        for s in plan.search.settings()
    ]
    if refusals and all(refusals):
        raise TrainingError(refusals[0])


def no_trial_completed(state: SweepState) -> str | None:
    """The one-line reason a finished sweep failed: no trial completed; None if one did."""
    if any(t.state == "completed" for t in state.trials):
        return None
    failed = [t for t in state.trials if t.state == "failed"]
    stopped = sum(t.state == "stopped" for t in state.trials)
    reason = (
        f"no trial of the sweep completed (expected at least one): {len(failed)} of "
        f"{len(state.trials)} failed, {stopped} stopped"
    )
    if failed:
        error = (failed[0].error or "").strip().splitlines()
        reason += f"; trial {failed[0].name} failed: {error[0] if error else 'no reason recorded'}"
    return reason


def run_sweep(
    plan: SweepPlan,
    out,
    client=None,
    progress=None,
    *,
    holder: str = "sweep",
    gone: Owner | None = None,
) -> dict:
    """Run (or continue) the sweep ``plan`` in run directory ``out``; return its summary.

    This process owns ``out`` while the sweep runs (``out/owner.json``,
    :meth:`~pipeline.training.rundir.RunDir.claim`; ``holder`` says what it is): a second sweep
    there is refused before it touches anything, in one line naming the owner, and so no other
    sweep trains its trials. Each trial's run directory is owned by the same process while the
    trial trains (``holder``, then ``: trial tNNN``). A trial whose directory another live
    process trains in (someone ran ``convpipe train --resume`` on it) stops the sweep with that
    one line, resumable: the trial is not failed, and a resume continues it. ``gone``: a
    coordinator known to have ended; its holds are taken over even from another host.

    Before any trial starts, a plan none of whose trials can run is refused
    (:func:`check_trials_can_run`). A sweep that ends with no completed trial writes its results,
    then raises :class:`SweepFailed` with the reason (every trial failed, or the ones promoted
    to the end did).

    ``client``: the cluster every trial trains on (default: connect as the base settings say).
    ``progress``: called with each trial's training events (``trial`` added), a ``scored``
    message per trial and rung and a ``rung`` message per rung's promotions; an exception
    from it stops the sweep where it is (resumable).
    """
    emit = progress or (lambda event: None)
    out = Path(out)
    base = TrainConfig.from_job(plan.base)
    check_trials_can_run(plan)
    with (
        worker_cluster(client, base.scheduler, base.workers, base.threads_per_worker) as client,
        _owned(out, holder, gone),
    ):
        state = _open_state(plan, out, total_steps(base))
        t0 = time.perf_counter()
        seconds0 = state.seconds
        factor = plan.early_stopping.reduction_factor if plan.early_stopping else 1
        for k, rung in enumerate(state.rungs):
            at_rung = [
                t for t in state.trials if t.target >= rung
            ]  # sent to this rung (failed ones too)
            todo = [t for t in at_rung if t.live and rung not in t.scores]
            _train_rung(
                plan,
                state,
                todo,
                rung,
                out,
                client,
                emit,
                lambda: seconds0 + time.perf_counter() - t0,
                (holder, gone),
            )
            last = k == len(state.rungs) - 1
            going_on = (
                promote({t.id: t.scores.get(rung) for t in at_rung}, factor) if not last else []
            )
            for t in at_rung:
                if t.live:
                    t.state = (
                        "completed" if last else ("running" if t.id in going_on else "stopped")
                    )
                    if t.id in going_on:
                        t.target = state.rungs[k + 1]
            state.seconds = seconds0 + time.perf_counter() - t0
            state.save(out)
            if not last:
                emit(
                    {
                        "event": "rung",
                        "message": f"rung {rung} steps: {len(going_on)} of {len(at_rung)} trials "
                        f"go on ({', '.join(state.trials[i].name for i in going_on)})",
                    }
                )
        summary = write_results(out, state, plan)
        failure = no_trial_completed(state)
        if failure is not None:
            raise SweepFailed(failure)
        return summary


def _owned(out: Path, holder: str, gone: Owner | None):
    """The lock that makes this process the owner of the sweep's directory ``out`` (made if need
    be) until the ``with`` block it is used in ends; :class:`RunDirBusy` if another owns it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrainingError(
            f"cannot create the sweep's directory {out}: {exc.strerror or exc}"
        ) from None
    return RunDir(out).claim(holder, gone)


def _open_state(plan: SweepPlan, out: Path, total: int) -> SweepState:
    """The sweep's state in ``out``: a fresh one, or the saved one when it was made by this plan."""
    mine = json.loads(json.dumps(plan.to_dict()))
    if (out / STATE_FILE).exists():
        state = SweepState.load(out)
        if state.plan != mine:
            raise SweepError(
                f"{out / STATE_FILE}: the sweep there was started with other settings; "
                f"resume it with its own spec, or choose another out"
            )
        return state
    out.mkdir(parents=True, exist_ok=True)
    state = SweepState(
        mine,
        rungs(total, plan.early_stopping),
        [Trial(i, s, target=0) for i, s in enumerate(plan.search.settings())],
    )
    for t in state.trials:
        t.target = state.rungs[0]
    state.save(out)
    return state


class SweepStopped(Exception):
    """Raised in a trial's progress callback when another trial training beside it stopped the
    sweep."""


def _train_rung(
    plan, state: SweepState, todo: list[Trial], rung: int, out: Path, client, emit, elapsed, owner
) -> None:
    """Train ``todo`` to ``rung``, ``plan.search.parallel`` of them at once (each trial's numbers
    do not depend on the others: only the order of the log lines does). The first exception
    (a crash, a cancel, a trial's directory owned by another process) stops the others at their
    next step and is raised. ``owner``: ``(holder, gone)`` of :func:`run_sweep`."""
    lock = threading.Lock()

    def save():
        with lock:
            state.seconds = elapsed()
            state.save(out)

    parallel = min(plan.search.parallel, len(todo))
    if parallel <= 1:
        for t in todo:
            _train_trial(plan, t, rung, out, client, emit, lock, save, owner)
        return
    stop = threading.Event()

    def guarded(event):
        if stop.is_set():
            raise SweepStopped("stopped beside another trial")
        with lock:
            emit(event)

    first = None
    with ThreadPoolExecutor(parallel, thread_name_prefix="convpipe-trial") as pool:
        futures = [
            pool.submit(_train_trial, plan, t, rung, out, client, guarded, lock, save, owner)
            for t in todo
        ]
        for f in as_completed(futures):
            if f.exception() is not None and first is None:
                first = f.exception()
                stop.set()
    if first is not None:
        raise first


def _train_trial(
    plan: SweepPlan, trial: Trial, rung: int, out: Path, client, emit, lock, save, owner
) -> None:
    """Train ``trial`` to ``rung`` steps (fresh, or continuing its run directory) and score it.

    A training error fails the trial (recorded; the sweep goes on), except that another live
    process owns the trial's directory (:class:`RunDirBusy`): raised, the trial left as it was.
    """
    holder, gone = owner
    run_dir = out / "trials" / trial.name
    if (run_dir / "config.json").exists():
        config = resume_config(str(run_dir), steps=rung)
    else:
        _clear_unfinished_claim(RunDir(run_dir), gone)
        config = plan.trial_config(trial.settings, str(run_dir), rung)
    with lock:
        trial.state = "running"
    save()

    def progress(event):
        emit({**event, "trial": trial.id})

    try:
        summary = train(
            config,
            client=client,
            progress=progress,
            holder=f"{holder}: trial {trial.name}",
            gone=gone,
        )
    except RunDirBusy:  # not the trial's fault: it goes on once that process is done
        raise
    except TrainingError as exc:  # diverged (or could not run): recorded, the sweep goes on
        with lock:
            trial.state, trial.error = "failed", str(exc)
        save()
        emit({"event": "warning", "message": f"trial {trial.name} failed: {exc}"})
        return
    with lock:
        trial.scores[rung] = summary["val_acc"]
        trial.steps = rung
        trial.seconds = float(summary.get("seconds") or 0.0)
        trial.images = int(summary.get("images") or 0)
    save()
    emit(
        {
            "event": "scored",
            "message": f"trial {trial.name} ({settings_text(trial.settings)}): step {rung} "
            f"val_acc {summary['val_acc']:.4f}",
        }
    )


def _clear_unfinished_claim(run: RunDir, gone: Owner | None) -> None:
    """Free a trial's directory that an earlier session of this sweep claimed (an empty
    ``checkpoints/``) and died in before writing the trial's settings: this sweep owns the
    sweep's directory, so no other sweep is starting the trial there. A live owner of the trial's
    directory is :class:`RunDirBusy`; a ``checkpoints/`` with files in it is left for ``train``
    to refuse."""
    if run.config_path.exists() or not run.checkpoint_dir.is_dir():
        return
    run.check_free(gone)
    try:
        run.checkpoint_dir.rmdir()
    except OSError:  # not empty
        pass
