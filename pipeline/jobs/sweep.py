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

The sweep's state is ``RUN_DIR/sweep.json`` (rewritten atomically after every trial's rung);
resumed, finished rungs are not rerun and a trial cut short continues from its checkpoint, so
the outcome is the uninterrupted sweep's bit for bit. Results: ``trials.csv``, ``summary.json``,
``sweep.png`` and ``best-params.npz`` (the best trial's ``params.npz``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_write, atomic_write_text
from pipeline.cluster import worker_cluster
from pipeline.data import open_store
from pipeline.errors import ConvpipeError, TrainingError
from pipeline.jobs.schema import SpecError
from pipeline.training import resume_config, train
from pipeline.training.config import TrainConfig
from pipeline.training.rundir import RunDir
from pipeline.training.shards import Schedule

METHODS = ("random", "grid")
METRICS = ("val_acc",)
RANGES = ("log-uniform", "uniform", "int-uniform")
#: settings a sweep cannot search: where and how a trial runs, not what it computes
NOT_SEARCHED = (
    "workers",
    "scheduler",
    "out",
    "resume",
    "transport",
    "threads_per_worker",
    "data",
    "stall_timeout",
)
STATE_FILE = "sweep.json"
STATE_FORMAT = "convpipe-sweep-1"
LEADERBOARD_ROWS = 10


class SweepError(SpecError):
    """A sweep's [search] / [early-stopping] tables or its state file do not fit."""


def _canon(key: str) -> str:
    return str(key).strip().replace("-", "_")


def _spelt(name: str) -> str:
    return name.replace("_", "-")


# ---- the spec ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dim:
    """One searched setting: ``values`` (a list to choose from) or a range ``kind`` = [low, high]."""

    name: str
    kind: str  # "values" or one of RANGES
    values: tuple = ()
    low: float = 0.0
    high: float = 0.0

    @property
    def log(self) -> bool:
        return self.kind == "log-uniform"

    def endpoints(self) -> tuple:
        """Every value a trial could get at the edges: each listed value, or the range's ends."""
        if self.kind == "values":
            return self.values
        if self.kind == "int-uniform":
            return (int(self.low), int(self.high))
        return (float(self.low), float(self.high))

    def draw(self, rng: np.random.Generator):
        """One value (a Python int, float, str or bool) from ``rng``."""
        if self.kind == "values":
            return self.values[int(rng.integers(len(self.values)))]
        if self.kind == "int-uniform":
            return int(rng.integers(int(self.low), int(self.high) + 1))
        if self.kind == "log-uniform":
            return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
        return float(rng.uniform(self.low, self.high))

    def to_dict(self) -> dict:
        if self.kind == "values":
            return {"name": self.name, "values": list(self.values)}
        return {"name": self.name, self.kind: [self.low, self.high]}

    @classmethod
    def parse(cls, name: str, value, where: str) -> Dim:
        """From a spec entry: a non-empty list, or ``{kind = [low, high]}``."""
        if isinstance(value, list):
            if not value:
                raise SweepError(f"{where}: empty list of values (expected at least one)")
            return cls(name, "values", tuple(value))
        if isinstance(value, dict) and len(value) == 1:
            kind, bounds = next(iter(value.items()))
            kind = str(kind).replace("_", "-")
            if kind not in RANGES:
                raise SweepError(
                    f"{where}: unknown range {kind!r} (expected {', '.join(RANGES)}, or a list of values)"
                )
            if (
                not isinstance(bounds, list)
                or len(bounds) != 2
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)
            ):
                raise SweepError(f"{where}: {kind} takes [low, high] (two numbers), got {bounds!r}")
            low, high = bounds
            if kind == "int-uniform" and not all(isinstance(b, int) for b in bounds):
                raise SweepError(f"{where}: int-uniform takes two integers, got {bounds!r}")
            if not (math.isfinite(low) and math.isfinite(high)):
                raise SweepError(f"{where}: {kind} bounds must be finite, got {bounds!r}")
            if (high < low) if kind == "int-uniform" else (high <= low):
                raise SweepError(f"{where}: empty range {bounds!r} (expected low < high)")
            if kind == "log-uniform" and low <= 0:
                raise SweepError(f"{where}: log-uniform needs low > 0, got {low!r}")
            return cls(name, kind, (), low, high)
        raise SweepError(
            f"{where}: expected a list of values or a range such as "
            f"{{ log-uniform = [1e-4, 1e-2] }}, got {value!r}"
        )


@dataclass(frozen=True)
class Search:
    """The [search] table: how trials are drawn and what they are scored by."""

    method: str = "random"
    trials: int | None = 10
    seed: int = 0
    metric: str = "val_acc"
    dims: tuple[Dim, ...] = ()
    parallel: int = 1  # trials training at once (the results do not depend on it)

    @classmethod
    def from_dict(cls, table: dict, where: str = "[search]") -> Search:
        table = {_canon(k): v for k, v in (table or {}).items()}
        method = table.pop("method", "random")
        if method not in METHODS:
            raise SweepError(
                f"{where}: unknown method {method!r} (expected {' or '.join(METHODS)})"
            )
        metric = table.pop("metric", "val_acc")
        if metric not in METRICS:
            raise SweepError(
                f"{where}: unknown metric {metric!r} (expected {', '.join(METRICS)}, maximized)"
            )
        seed = table.pop("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise SweepError(f"{where}: seed must be an integer >= 0, got {seed!r}")
        parallel = table.pop("parallel", 1)
        if not isinstance(parallel, int) or isinstance(parallel, bool) or parallel < 1:
            raise SweepError(
                f"{where}: parallel must be an integer >= 1 (trials training at once), got {parallel!r}"
            )
        trials = table.pop("trials", None)
        if method == "grid" and trials is not None:
            raise SweepError(
                f"{where}: a grid search runs every combination; remove trials = {trials!r}"
            )
        if method == "random":
            trials = 10 if trials is None else trials
            if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
                raise SweepError(f"{where}: trials must be an integer >= 1, got {trials!r}")
        dims = tuple(Dim.parse(k, v, f"{where} {_spelt(k)}") for k, v in table.items())
        if not dims:
            raise SweepError(
                f"{where}: no setting to search (add e.g. lr = {{ log-uniform = [1e-4, 1e-2] }})"
            )
        if method == "grid":
            for d in dims:
                if d.kind != "values":
                    raise SweepError(
                        f"{where} {_spelt(d.name)}: a grid search takes a list of values, got a {d.kind} range"
                    )
        return cls(method, trials, seed, metric, dims, parallel)

    def to_dict(self) -> dict:
        """What the trials and their scores depend on (not ``parallel``: a resumed sweep may change it)."""
        return {
            "method": self.method,
            "trials": self.trials,
            "seed": self.seed,
            "metric": self.metric,
            "dims": [d.to_dict() for d in self.dims],
        }

    def settings(self) -> list[dict]:
        """Every trial's searched settings, in trial order: a pure function of this table."""
        if self.method == "grid":
            return [
                dict(zip((d.name for d in self.dims), combo))
                for combo in product(*(d.values for d in self.dims))
            ]
        rng = np.random.default_rng(self.seed)
        return [{d.name: d.draw(rng) for d in self.dims} for _ in range(self.trials)]


@dataclass(frozen=True)
class EarlyStopping:
    """The [early-stopping] table: successive halving from ``min_steps`` by ``reduction_factor``."""

    min_steps: int
    reduction_factor: int = 3

    @classmethod
    def from_dict(cls, table: dict | None, where: str = "[early-stopping]") -> EarlyStopping | None:
        if table is None:
            return None
        table = {_canon(k): v for k, v in table.items()}
        unknown = sorted(set(table) - {"min_steps", "reduction_factor"})
        if unknown:
            raise SweepError(
                f"{where}: unknown key {_spelt(unknown[0])!r} (known: min-steps, reduction-factor)"
            )
        if "min_steps" not in table:
            raise SweepError(
                f"{where}: missing min-steps (the steps every trial gets before the first cut)"
            )
        for key, lowest in (("min_steps", 1), ("reduction_factor", 2)):
            v = table.get(key, 3)
            if not isinstance(v, int) or isinstance(v, bool) or v < lowest:
                raise SweepError(
                    f"{where}: {_spelt(key)} must be an integer >= {lowest}, got {v!r}"
                )
        return cls(table["min_steps"], table.get("reduction_factor", 3))

    def to_dict(self) -> dict:
        return {"min_steps": self.min_steps, "reduction_factor": self.reduction_factor}


@dataclass(frozen=True)
class SweepPlan:
    """A whole sweep: the trials' base settings (a train job's options), the search, the stopping."""

    base: dict
    search: Search
    early_stopping: EarlyStopping | None = None

    @classmethod
    def from_options(cls, options: dict, where: str = "<spec>") -> SweepPlan:
        """From a sweep job's options; checks every value a trial could get through TrainConfig."""

        base = {k: v for k, v in options.items() if k not in ("search", "early_stopping")}
        if not options.get("search"):
            raise SweepError(
                f"{where}: a sweep needs a [search] table (e.g. lr = {{ log-uniform = [1e-4, 1e-2] }})"
            )
        search = Search.from_dict(options["search"], f"{where}: [search]")
        stopping = EarlyStopping.from_dict(
            options.get("early_stopping"), f"{where}: [early-stopping]"
        )
        known = set(TrainConfig.__dataclass_fields__)
        base_config = _config(base)
        for d in search.dims:
            label = f"{where}: [search] {_spelt(d.name)}"
            if d.name not in known:
                raise SweepError(
                    f"{label}: unknown training setting (known: "
                    f"{', '.join(sorted(_spelt(k) for k in known - set(NOT_SEARCHED)))})"
                )
            if d.name in NOT_SEARCHED:
                raise SweepError(
                    f"{label}: says where or how a trial runs, not what it learns; it cannot be searched"
                )
            for value in d.endpoints():
                try:
                    base_config.replace(**{d.name: value})
                except ConvpipeError as exc:
                    raise SweepError(
                        f"{label}: value {value!r} would be refused by a train job: {exc}"
                    ) from None
        return cls(base, search, stopping)

    def trial_config(self, settings: dict, out: str, steps: int):
        """The TrainConfig of a trial: the base, its settings, its run directory and ``steps``."""
        return _config({**self.base, **settings, "out": out, "resume": None, "steps": steps})

    def to_dict(self) -> dict:
        return {
            "search": self.search.to_dict(),
            "early_stopping": self.early_stopping.to_dict() if self.early_stopping else None,
            "base": {k: v for k, v in self.base.items() if k not in NOT_SEARCHED},
        }


def _config(options: dict):

    return TrainConfig.from_dict({**options, "scheduler": None})


def rungs(total_steps: int, stopping: EarlyStopping | None) -> list[int]:
    """Steps at which trials are scored: ``min_steps * factor**k`` below the end, then the end."""
    out = []
    if stopping is not None:
        r = stopping.min_steps
        while r < total_steps:
            out.append(r)
            r *= stopping.reduction_factor
    return out + [total_steps]


def promote(scores: dict[int, float | None], factor: int) -> list[int]:
    """Trial ids going on from a rung: the best ``max(1, n // factor)`` of the ``n`` scored ones
    (failed ones, None, never), higher score first, ties to the lower id. A pure function."""
    ranked = sorted((i for i, s in scores.items() if s is not None), key=lambda i: (-scores[i], i))
    keep = max(1, len(scores) // factor)
    return sorted(ranked[:keep])


# ---- the state --------------------------------------------------------------------------------------


@dataclass
class Trial:
    """One trial's record in ``sweep.json``. ``scores``: {step: val_acc on the whole val split}."""

    id: int
    settings: dict
    state: str = "pending"  # pending, running, completed, stopped, failed
    steps: int = 0
    scores: dict = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    images: int = 0
    target: int = 0  # the rung (steps) it was last sent to

    @property
    def name(self) -> str:
        return f"t{self.id:03d}"

    @property
    def live(self) -> bool:
        return self.state in ("pending", "running")

    def best(self) -> tuple[float | None, int | None]:
        """(best score so far, its step); the earlier step on a tie."""
        if not self.scores:
            return None, None
        step = min(self.scores, key=lambda s: (-self.scores[s], s))
        return self.scores[step], step

    def final(self) -> float | None:
        return self.scores[max(self.scores)] if self.scores else None

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "settings": self.settings,
            "state": self.state,
            "steps": self.steps,
            "scores": {str(k): v for k, v in sorted(self.scores.items())},
            "error": self.error,
            "seconds": self.seconds,
            "images": self.images,
            "target": self.target,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Trial:
        return cls(
            d["id"],
            dict(d["settings"]),
            d["state"],
            d["steps"],
            {int(k): v for k, v in d["scores"].items()},
            d.get("error"),
            d.get("seconds", 0.0),
            d.get("images", 0),
            d.get("target", 0),
        )


@dataclass
class SweepState:
    """``sweep.json``: the plan it was started with, its rungs and every trial."""

    plan: dict
    rungs: list[int]
    trials: list[Trial]
    seconds: float = 0.0

    def save(self, run_dir: Path) -> None:
        atomic_write_text(
            Path(run_dir) / STATE_FILE,
            json.dumps(
                {
                    "format": STATE_FORMAT,
                    "plan": self.plan,
                    "rungs": self.rungs,
                    "seconds": self.seconds,
                    "trials": [t.to_dict() for t in self.trials],
                },
                indent=1,
                sort_keys=True,
            )
            + "\n",
        )

    @classmethod
    def load(cls, run_dir) -> SweepState:
        path = Path(run_dir) / STATE_FILE
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise SweepError(f"{path}: no such file (not a sweep's run directory?)") from None
        except (OSError, ValueError) as exc:
            raise SweepError(f"{path}: unreadable sweep state: {exc}") from None
        if not isinstance(d, dict) or d.get("format") != STATE_FORMAT:
            raise SweepError(f"{path}: not a convpipe sweep state (expected format {STATE_FORMAT})")
        return cls(
            d["plan"],
            list(d["rungs"]),
            [Trial.from_dict(t) for t in d["trials"]],
            d.get("seconds", 0.0),
        )

    def leaderboard(self) -> list[Trial]:
        """Trials by best-so-far score (higher first, ties to the lower id); unscored ones last."""
        return sorted(self.trials, key=lambda t: (t.best()[0] is None, -(t.best()[0] or 0.0), t.id))

    def best(self) -> Trial | None:
        top = self.leaderboard()
        return top[0] if top and top[0].best()[0] is not None else None


def best_run_dir(run_dir) -> str:
    """The run directory of a sweep's best trial (what :func:`pipeline.runs.load_model` loads)."""
    state = SweepState.load(run_dir)
    best = state.best()
    if best is None:
        raise SweepError(f"{run_dir}: no trial of the sweep has been scored yet")
    return str(Path(run_dir) / "trials" / best.name)


# ---- running it -------------------------------------------------------------------------------------


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


def run_sweep(plan: SweepPlan, out, client=None, progress=None) -> dict:
    """Run (or continue) the sweep ``plan`` in run directory ``out``; return its summary.

    ``client``: the cluster every trial trains on (default: connect as the base settings say).
    ``progress``: called with each trial's training events (``trial`` added) and one message
    per scored rung; an exception from it stops the sweep where it is (resumable).
    """

    emit = progress or (lambda event: None)
    out = Path(out)
    base = _config(plan.base)
    with worker_cluster(client, base.scheduler, base.workers, base.threads_per_worker) as client:
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
                        "message": f"rung {rung} steps: {len(going_on)} of {len(at_rung)} trials go on "
                        f"({', '.join(state.trials[i].name for i in going_on)})",
                        "done": 1,
                        "total": 1,
                    }
                )
        return write_results(out, state, plan)


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
    """Raised in a trial's progress callback when another trial training beside it stopped the sweep."""


def _train_rung(
    plan, state: SweepState, todo: list[Trial], rung: int, out: Path, client, emit, elapsed
) -> None:
    """Train ``todo`` to ``rung``, ``plan.search.parallel`` of them at once (each trial's numbers
    do not depend on the others: only the order of the log lines does). The first exception
    (a crash, a cancel) stops the others at their next step and is raised."""
    lock = threading.Lock()

    def save():
        with lock:
            state.seconds = elapsed()
            state.save(out)

    parallel = min(plan.search.parallel, len(todo))
    if parallel <= 1:
        for t in todo:
            _train_trial(plan, t, rung, out, client, emit, lock, save)
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
            pool.submit(_train_trial, plan, t, rung, out, client, guarded, lock, save) for t in todo
        ]
        for f in as_completed(futures):
            if f.exception() is not None and first is None:
                first = f.exception()
                stop.set()
    if first is not None:
        raise first


def _train_trial(
    plan: SweepPlan, trial: Trial, rung: int, out: Path, client, emit, lock, save
) -> None:
    """Train ``trial`` to ``rung`` steps (fresh, or continuing its run directory) and score it."""

    run_dir = out / "trials" / trial.name
    if (run_dir / "config.json").exists():
        config = resume_config(str(run_dir), steps=rung)
    else:
        config = plan.trial_config(trial.settings, str(run_dir), rung)
    with lock:
        trial.state = "running"
    save()

    def progress(event):
        emit({**event, "trial": trial.id})

    try:
        summary = train(config, client=client, progress=progress)
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
            "message": f"trial {trial.name} ({_settings_text(trial.settings)}): step {rung} "
            f"val_acc {summary['val_acc']:.4f}",
            "done": 1,
            "total": 1,
        }
    )


# ---- results ----------------------------------------------------------------------------------------


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _settings_text(settings: dict) -> str:
    return ", ".join(f"{_spelt(k)}={_fmt(v)}" for k, v in settings.items())


def trials_csv(state: SweepState) -> str:
    """One row per trial: id, searched settings, state, steps, best val_acc and its step, final, seconds."""
    names = [d["name"] for d in state.plan["search"]["dims"]]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        [
            "id",
            *(_spelt(n) for n in names),
            "state",
            "steps",
            "best_val_acc",
            "best_step",
            "final_val_acc",
            "seconds",
            "error",
        ]
    )
    for t in state.trials:
        best, step = t.best()
        w.writerow(
            [
                t.name,
                *(
                    repr(t.settings[n]) if isinstance(t.settings[n], float) else t.settings[n]
                    for n in names
                ),
                t.state,
                t.steps,
                "" if best is None else repr(best),
                "" if step is None else step,
                "" if t.final() is None else repr(t.final()),
                f"{t.seconds:.2f}",
                t.error or "",
            ]
        )
    return buf.getvalue()


def summary_of(state: SweepState, out: Path) -> dict:
    """The sweep's summary.json: the best trial, its settings and metric, and the counts."""
    best = state.best()
    counts = {
        s: sum(t.state == s for t in state.trials) for s in ("completed", "stopped", "failed")
    }
    steps = sum(t.steps for t in state.trials)
    images = sum(t.images for t in state.trials)
    return {
        "metric": state.plan["search"]["metric"],
        "trials": len(state.trials),
        **counts,
        "rungs": state.rungs,
        "best": None
        if best is None
        else {
            "trial": best.name,
            "settings": best.settings,
            "val_acc": best.best()[0],
            "step": best.best()[1],
            "final_val_acc": best.final(),
            "run_dir": str(out / "trials" / best.name),
        },
        "steps": steps,
        "steps_if_run_to_the_end": len(state.trials) * state.rungs[-1],
        "images": images,
        "seconds": state.seconds,
        "images_per_s": images / state.seconds if state.seconds > 0 else None,
    }


def write_results(out: Path, state: SweepState, plan: SweepPlan) -> dict:
    """trials.csv, summary.json, best-params.npz and sweep.png in ``out``; returns the summary."""
    atomic_write_text(out / "trials.csv", trials_csv(state))
    summary = summary_of(state, out)
    if summary["best"]:
        src = Path(summary["best"]["run_dir"]) / "params.npz"
        atomic_write(out / "best-params.npz", lambda f: f.write(src.read_bytes()))
    try:
        summary["plots"] = [str(plot_sweep(out, state))]
    except Exception as exc:  # noqa: BLE001 - a plot must not lose a finished sweep
        summary["plots"] = []
        summary["plot_error"] = str(exc)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def curve(run_dir: Path) -> tuple[list[int], list[float]]:
    """(steps, val_acc) of a trial's eval and epoch lines, in step order (later lines win)."""

    points = {}
    try:
        metrics = RunDir(run_dir).read_metrics()
    except (ConvpipeError, OSError):
        return [], []
    for m in metrics:
        if m.get("kind") in ("eval", "epoch") and isinstance(m.get("val_acc"), (int, float)):
            points[m["step"]] = m["val_acc"]
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def plot_sweep(out: Path, state: SweepState) -> Path:
    """sweep.png: val accuracy against steps for every trial (the best highlighted), and the
    best-so-far metric against each searched setting (log axis for log-uniform ranges)."""
    import matplotlib  # noqa: PLC0415 (lazy: matplotlib only when plotting)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (lazy: matplotlib only when plotting)

    dims = state.plan["search"]["dims"]
    best = state.best()
    fig, axes = plt.subplots(1, 1 + len(dims), figsize=(5 * (1 + len(dims)), 4), squeeze=False)
    ax = axes[0][0]
    for t in state.trials:
        steps, acc = curve(out / "trials" / t.name)
        if best is not None and t.id == best.id:
            continue
        ax.plot(steps, acc, color="0.6", lw=0.8, alpha=0.7, marker="o", ms=2)
    if best is not None:
        steps, acc = curve(out / "trials" / best.name)
        ax.plot(steps, acc, color="C3", lw=2.2, label=f"best: {best.name}")
        ax.legend(loc="lower right")
    for r in state.rungs[:-1]:
        ax.axvline(r, color="0.85", lw=0.8, ls="--")
    ax.set(xlabel="step", ylabel="validation accuracy", title=f"{len(state.trials)} trials")
    for ax, d in zip(axes[0][1:], dims):
        xs = [t.settings[d["name"]] for t in state.trials if t.best()[0] is not None]
        ys = [t.best()[0] for t in state.trials if t.best()[0] is not None]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        if not numeric:
            labels = sorted({str(x) for x in xs})
            xs = [labels.index(str(x)) for x in xs]
            ax.set_xticks(range(len(labels)), labels)
        ax.scatter(xs, ys, color="C0", s=18)
        if best is not None and best.best()[0] is not None:
            bx = best.settings[d["name"]]
            ax.scatter(
                [
                    bx
                    if numeric
                    else sorted(
                        {
                            str(t.settings[d["name"]])
                            for t in state.trials
                            if t.best()[0] is not None
                        }
                    ).index(str(bx))
                ],
                [best.best()[0]],
                color="C3",
                s=60,
                zorder=3,
            )
        if "log-uniform" in d or (
            numeric
            and "values" in d
            and min(d["values"]) > 0
            and max(d["values"]) / min(d["values"]) >= 100
        ):
            ax.set_xscale("log")
        ax.set(xlabel=_spelt(d["name"]), ylabel=f"best {state.plan['search']['metric']}")
    fig.tight_layout()
    path = out / "sweep.png"

    def write(f):
        fig.savefig(f, format="png", dpi=100)

    atomic_write(path, write)
    plt.close(fig)
    return path


def leaderboard_text(run_dir, rows: int = LEADERBOARD_ROWS) -> str:
    """The top ``rows`` trials: best-so-far metric and step, state, and the settings that differ."""
    state = SweepState.load(run_dir)
    names = [d["name"] for d in state.plan["search"]["dims"]]
    differ = [n for n in names if len({json.dumps(t.settings[n]) for t in state.trials}) > 1]
    header = [
        "trial",
        "state",
        "steps",
        f"best {state.plan['search']['metric']}",
        "at step",
        *map(_spelt, differ),
    ]
    table = []
    for t in state.leaderboard()[:rows]:
        best, step = t.best()
        table.append(
            [
                t.name,
                t.state,
                str(t.steps),
                "-" if best is None else f"{best:.4f}",
                "-" if step is None else str(step),
                *(_fmt(t.settings[n]) for n in differ),
            ]
        )
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *table]]
    done = sum(not t.live for t in state.trials)
    lines.insert(0, f"sweep: {done}/{len(state.trials)} trials done, rungs {state.rungs}")
    failed = [t for t in state.trials if t.state == "failed"]
    lines += [f"{t.name} failed: {t.error}" for t in failed[:3]]
    return "\n".join(lines)
