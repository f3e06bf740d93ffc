"""A sweep's spec: the search space (``[search]``: dimensions, method, trials, seed), early
stopping (``[early-stopping]``) and the base train settings every trial starts from; each
validated where the spec is read, with a :class:`SweepError` naming the key."""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product

import numpy as np

from pipeline.errors import ConvpipeError
from pipeline.jobs.schema import SpecError, did_you_mean
from pipeline.training.config import RUNTIME_FIELDS, TrainConfig

METHODS = ("random", "grid")


METRICS = ("val_acc",)


RANGES = ("log-uniform", "uniform", "int-uniform")


#: settings a sweep cannot search: where and how a trial runs, not what it computes
NOT_SEARCHED = RUNTIME_FIELDS

#: the keys of the [search] table besides the searched settings, and of [early-stopping]
SEARCH_KEYS = ("method", "parallel", "trials", "seed", "metric")
STOPPING_KEYS = ("min_steps", "reduction_factor")


class SweepError(SpecError):
    """A sweep's [search] / [early-stopping] tables or its state file do not fit."""


def _canon(key: str) -> str:
    return str(key).strip().replace("-", "_")


def spelt(name: str) -> str:
    return name.replace("_", "-")


@dataclass(frozen=True)
class Dim:
    """One searched setting: ``values`` (a list to choose from) or a range
    ``kind`` = [low, high]."""

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
                    f"{where}: unknown range {kind!r} (expected {', '.join(RANGES)}, or a list of "
                    "values)"
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
                f"{where}: parallel must be an integer >= 1 (trials training at once), got "
                f"{parallel!r}"
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
        settings = TrainConfig.__dataclass_fields__
        for key in table:
            if key not in settings:  # a typo of a [search] key is not a setting to search
                searchable = sorted(set(settings) - set(NOT_SEARCHED) - set(SEARCH_KEYS))
                raise SweepError(
                    f"{where}: unknown key {spelt(key)!r}"
                    + (
                        did_you_mean(key, SEARCH_KEYS + tuple(searchable))
                        or f" (neither a [search] key: {', '.join(SEARCH_KEYS)}; nor a training "
                        f"setting to search: {', '.join(spelt(k) for k in searchable)})"
                    )
                )
        dims = tuple(Dim.parse(k, v, f"{where} {spelt(k)}") for k, v in table.items())
        if not dims:
            raise SweepError(
                f"{where}: no setting to search (add e.g. lr = {{ log-uniform = [1e-4, 1e-2] }})"
            )
        if method == "grid":
            for d in dims:
                if d.kind != "values":
                    raise SweepError(
                        f"{where} {spelt(d.name)}: a grid search takes a list of values, got a "
                        f"{d.kind} range"
                    )
        return cls(method, trials, seed, metric, dims, parallel)

    def to_dict(self) -> dict:
        """What the trials and their scores depend on
        (not ``parallel``: a resumed sweep may change it)."""
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
        unknown = sorted(set(table) - set(STOPPING_KEYS))
        if unknown:
            raise SweepError(
                f"{where}: unknown key {spelt(unknown[0])!r}"
                + (
                    did_you_mean(unknown[0], STOPPING_KEYS)
                    or f" (known: {', '.join(map(spelt, STOPPING_KEYS))})"
                )
            )
        if "min_steps" not in table:
            raise SweepError(
                f"{where}: missing min-steps (the steps every trial gets before the first cut)"
            )
        for key, lowest in (("min_steps", 1), ("reduction_factor", 2)):
            v = table.get(key, 3)
            if not isinstance(v, int) or isinstance(v, bool) or v < lowest:
                raise SweepError(f"{where}: {spelt(key)} must be an integer >= {lowest}, got {v!r}")
        return cls(table["min_steps"], table.get("reduction_factor", 3))

    def to_dict(self) -> dict:
        return {"min_steps": self.min_steps, "reduction_factor": self.reduction_factor}


@dataclass(frozen=True)
class SweepPlan:
    """A whole sweep: the trials' base settings (a train job's options), the search,
    the stopping."""

    base: dict
    search: Search
    early_stopping: EarlyStopping | None = None

    @classmethod
    def from_options(cls, options: dict, where: str = "<spec>") -> SweepPlan:
        """From a sweep job's options; checks every value a trial could get through TrainConfig."""
        base = {k: v for k, v in options.items() if k not in ("search", "early_stopping")}
        if not options.get("search"):
            raise SweepError(
                f"{where}: a sweep needs a [search] table "
                "(e.g. lr = { log-uniform = [1e-4, 1e-2] })"
            )
        search = Search.from_dict(options["search"], f"{where}: [search]")
        stopping = EarlyStopping.from_dict(
            options.get("early_stopping"), f"{where}: [early-stopping]"
        )
        base_config = TrainConfig.from_job(base)
        for d in search.dims:  # each a training setting (Search.from_dict)
            label = f"{where}: [search] {spelt(d.name)}"
            if d.name in NOT_SEARCHED:
                raise SweepError(
                    f"{label}: says where or how a trial runs, not what it learns; it cannot be "
                    "searched"
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
        return TrainConfig.from_job(
            {**self.base, **settings, "out": out, "resume": None, "steps": steps}
        )

    def to_dict(self) -> dict:
        return {
            "search": self.search.to_dict(),
            "early_stopping": self.early_stopping.to_dict() if self.early_stopping else None,
            "base": {k: v for k, v in self.base.items() if k not in NOT_SEARCHED},
        }
