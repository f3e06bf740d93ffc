"""A run's learning curves from its ``metrics.jsonl`` lines: loss and accuracy against epochs.

Shared by the run's PNGs (:func:`pipeline.training.rundir.write_plots`) and the convpipe page
(:mod:`pipeline.dashboard`); knows nothing of Dask, Numba or Zarr (the store is opened only to
count its images when the lines alone do not say how many steps an epoch has).

The lines (see :mod:`pipeline.training.coordinator`)::

    {"kind": "step",  "step": s, "epoch": e, "loss": ..., "images_per_s": ..., "read_s": ...}
    {"kind": "eval",  "step": s, "epoch": s / steps_per_epoch, "train_acc": ..., "val_acc": ...}
    {"kind": "epoch", "step": s, "epoch": e, "train_acc": ..., "val_acc": ...[, "test_acc": ...]}

``step`` counts steps done (1 after the first); a step line's ``epoch`` is the 1-based epoch it
belongs to. On the curves, step ``s`` sits at the fractional epoch ``s / steps_per_epoch``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.data.store import open_store
from pipeline.errors import ConvpipeError

#: the per-step timing fields of a step line, in the order the loop spends them
PHASES = ("read", "compute", "reduce", "sync", "coordinator")


@dataclass(frozen=True)
class Point:
    """One point of a curve: at ``step`` (fractional epoch ``x``), value ``y``;
    ``whole``: scored on the whole split (an epoch line's val accuracy) rather than a sample."""

    step: int
    x: float
    y: float
    whole: bool = False


@dataclass(frozen=True)
class Curves:
    """Loss and accuracies of a run, x in epochs (or in steps when ``steps_per_epoch`` is None)."""

    steps_per_epoch: float | None
    loss: tuple[Point, ...]
    val_acc: tuple[Point, ...]
    train_acc: tuple[Point, ...]
    #: the whole test split at epoch ends (a run with ``test_each_epoch``), else empty
    test_acc: tuple[Point, ...] = ()

    @property
    def x_label(self) -> str:
        return "epoch" if self.steps_per_epoch else "step"

    @property
    def last_step(self) -> int:
        return self.loss[-1].step if self.loss else 0

    def x_of(self, step: int) -> float:
        return step / self.steps_per_epoch if self.steps_per_epoch else float(step)

    @classmethod
    def from_metrics(cls, metrics: list[dict], steps_per_epoch: float | None = None) -> Curves:
        """The curves of ``metrics`` (records of metrics.jsonl, in order). ``steps_per_epoch``:
        known from the run's settings, else read from the lines (:func:`infer_steps_per_epoch`)."""
        spe = steps_per_epoch or infer_steps_per_epoch(metrics)
        x = (lambda s: s / spe) if spe else float
        loss = tuple(
            Point(int(m["step"]), x(int(m["step"])), float(m["loss"]))
            for m in metrics
            if m.get("kind") == "step" and _finite(m.get("loss"))
        )
        scored = sorted(
            (m for m in metrics if m.get("kind") in ("eval", "epoch")),
            key=lambda m: m.get("step", 0),
        )

        def accuracy(key: str) -> tuple[Point, ...]:
            return tuple(
                Point(
                    int(m["step"]),
                    x(int(m["step"])),
                    float(m[key]),
                    whole=m["kind"] == "epoch" and key in ("val_acc", "test_acc"),
                )
                for m in scored
                if _finite(m.get(key)) and "step" in m
            )

        return cls(spe, loss, accuracy("val_acc"), accuracy("train_acc"), accuracy("test_acc"))


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def infer_steps_per_epoch(metrics: list[dict]) -> float | None:
    """Steps per epoch as the lines tell it, or None when they cannot (a run shorter than an
    epoch without eval lines).

    - an eval line: ``step / epoch`` (its epoch is fractional);
    - the first step line of epoch ``e > 1``: epoch ``e - 1`` ended at ``step - 1``;
    - an epoch line other than the last: epoch ``e`` ended at its ``step``.
    """
    for m in metrics:
        if m.get("kind") == "eval" and _finite(m.get("epoch")) and m["epoch"] > 0 and m.get("step"):
            return float(round(m["step"] / m["epoch"]))
    for m in metrics:
        if (
            m.get("kind") == "step"
            and isinstance(m.get("epoch"), int)
            and m["epoch"] > 1
            and m.get("step")
        ):
            return (m["step"] - 1) / (m["epoch"] - 1)
    epochs = [
        m
        for m in metrics
        if m.get("kind") == "epoch"
        and isinstance(m.get("epoch"), int)
        and m["epoch"] >= 1
        and m.get("step")
    ]
    if len(epochs) > 1:
        return epochs[0]["step"] / epochs[0]["epoch"]
    return None


def steps_per_epoch_of_settings(settings: dict) -> int | None:
    """``ceil(n_train / batch_size)`` from a run's ``config.json`` (``train_limit``, else the
    size of the store's train split); None when the store cannot be read."""
    try:
        batch = int(settings["batch_size"])
        n = settings.get("train_limit")
        if n is None:
            n = open_store(settings["data"]).splits.get("train", 0)
    except (ConvpipeError, OSError, KeyError, TypeError, ValueError):  # the lines decide instead
        return None
    return math.ceil(int(n) / batch) if n and batch > 0 else None


def total_steps_of_settings(settings: dict, steps_per_epoch: float | None) -> int | None:
    """Steps the run will make: ``steps`` if set, else ``epochs * steps_per_epoch``."""
    if isinstance(settings.get("steps"), int):
        return settings["steps"]
    if steps_per_epoch and isinstance(settings.get("epochs"), int):
        return int(settings["epochs"] * steps_per_epoch)
    return None


def run_steps_per_epoch(metrics: list[dict], settings: dict | None) -> float | None:
    """Steps per epoch of a run: from its settings and store, else from its lines."""
    spe = steps_per_epoch_of_settings(settings) if settings else None
    return float(spe) if spe else infer_steps_per_epoch(metrics)


def step_breakdown(metrics: list[dict], last: int | None = None) -> dict[str, float]:
    """Mean seconds per step of each phase (read, compute, reduce, sync, coordinator) and of the
    whole step (``step``), over the last ``last`` step lines (all when None); {} without any."""
    steps = [m for m in metrics if m.get("kind") == "step"]
    if last is not None:
        steps = steps[-last:]
    if not steps:
        return {}
    out = {}
    for phase in PHASES:
        values = [m[f"{phase}_s"] for m in steps if _finite(m.get(f"{phase}_s"))]
        if values:
            out[phase] = sum(values) / len(values)
    seconds = [m["seconds"] for m in steps if _finite(m.get("seconds"))]
    if seconds:
        out["step"] = sum(seconds) / len(seconds)
    return out


def recent_rate(metrics: list[dict], last: int = 20) -> tuple[float | None, float | None]:
    """(images per second, seconds per step) over the last ``last`` step lines, or Nones."""
    steps = [m for m in metrics if m.get("kind") == "step" and _finite(m.get("seconds"))][-last:]
    seconds = sum(m["seconds"] for m in steps)
    if not steps or seconds <= 0:
        return None, None
    images = sum(m.get("n", 0) for m in steps if _finite(m.get("n")))
    return (images / seconds if images else None), seconds / len(steps)


def count_text(n, noun: str) -> str:
    """``1 worker``, ``84 steps``: a count and its noun, plural but for one."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def number_text(v) -> str:
    """A number as the page and `convpipe status` show it: 4 significant digits, thousands
    grouped from 1,000 on (1,496 images/s, accuracy 0.5123, 12.35 s); other values as ``str``."""
    if not isinstance(v, float):
        return str(v)
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.4g}"
