"""Hyperparameter sweeps: many training runs as one job, with successive halving.

A sweep spec is a train spec plus two tables::

    job = "sweep"
    data = "data/cifar10.zarr"
    steps = 270                           # every trial's base settings (any train key)

    [search]
    method = "random"                     # or "grid" (lists only; every combination)
    parallel = 2                          # trials training at once on the cluster (default 1)
    trials = 16                           # random only
    seed = 0                              # draws the trials' settings (numpy default_rng)
    metric = "val_acc"                    # maximized
    lr = { log-uniform = [1e-4, 1e-2] }   # also { uniform = [a, b] }, { int-uniform = [a, b] }
    hidden-dim = [100, 250, 500]          # a list: one of these values

    [early-stopping]                      # omitted: every trial runs to the end
    min-steps = 10                        # the first rung
    reduction-factor = 3                  # keep the best 1/3 at each rung

Every trial is an ordinary training run (:func:`pipeline.training.train`, data-parallel over
the whole cluster) in ``RUN_DIR/trials/tNNN``; ``parallel`` of them train at once (default one:
a trial alone keeps every worker busy stepping; two overlap one's start-up and scoring with the
other's steps). A trial's numbers never depend on the others, so neither does the outcome.
Successive halving: the rungs are ``min-steps * factor**k`` steps, then the trials' end; every
live trial trains to the rung (continuing its checkpoint, bit-identical to a longer run), is
scored on the whole val split, and the best ``1/factor`` (at least one; ties to the lower id)
go on; the others are *stopped*. A diverging trial is *failed* with its reason; the rest go on.
A sweep that ends with no *completed* trial has no result: it fails, with the first failed
trial's reason (``SweepFailed``). A plan none of whose trials could start (``train-limit``
above the store's training images) is refused before any trial starts.

One process at a time owns the sweep's directory (``RUN_DIR/owner.json``, see
:meth:`pipeline.training.rundir.RunDir.claim`): a second sweep there is refused before it starts,
so no two sessions train the same trial. A trial whose directory another live process trains in
stops the sweep with that one line (resumable; the trial is not failed); a trial directory that
a killed earlier session claimed (``checkpoints/``) before writing its settings starts afresh.

The sweep's state is ``RUN_DIR/sweep.json`` (rewritten atomically after every trial's rung);
resumed, finished rungs are not rerun and a trial cut short continues from its checkpoint, so
the outcome is the uninterrupted sweep's bit for bit. Results: ``trials.csv``, ``summary.json``,
``sweep.png`` and ``best-params.npz`` (the best trial's ``params.npz``).

The modules: ``space`` (the spec: search space, early stopping, base settings), ``halving``
(the rungs and who goes on; pure), ``state`` (``sweep.json``), ``runner`` (training the trials)
and ``report`` (the results and the leaderboard); the figure is
:func:`pipeline.figures.sweep_figure`.
"""

from pipeline.jobs.sweep.halving import promote, rungs
from pipeline.jobs.sweep.report import curve, leaderboard_text
from pipeline.jobs.sweep.runner import SweepFailed, check_trials_can_run, run_sweep, total_steps
from pipeline.jobs.sweep.space import (
    SEARCH_KEYS,
    STOPPING_KEYS,
    EarlyStopping,
    SweepError,
    SweepPlan,
)
from pipeline.jobs.sweep.state import STATE_FILE, SweepState, Trial, best_run_dir, trained_run_dir

__all__ = [
    "SEARCH_KEYS",
    "STOPPING_KEYS",
    "EarlyStopping",
    "STATE_FILE",
    "SweepError",
    "SweepFailed",
    "SweepPlan",
    "SweepState",
    "Trial",
    "best_run_dir",
    "check_trials_can_run",
    "trained_run_dir",
    "curve",
    "leaderboard_text",
    "promote",
    "run_sweep",
    "rungs",
    "total_steps",
]
