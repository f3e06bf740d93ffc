"""How a run updates its parameters: the optimizer, the learning-rate schedule, parameter groups.

    optimizer = "adam"    Adam (cs231n's: beta1 0.9, beta2 0.999, eps 1e-8)
    optimizer = "sgd"     SGD with momentum, Nesterov's by default (PyTorch's arithmetic)

Either takes decoupled weight decay (``w -= lr_t * weight_decay * w`` each step, outside the
gradient and the optimizer's state: AdamW, SGDW) besides the L2 term ``reg`` (which is part of
the loss and its gradient). The learning rate of step t (counting from 0 over the run's
``total`` steps, progress p = t / total) is ``lr * factor(t)``:

    constant      1
    triangular    linear from start_factor up to 1 at p = warmup, then down to end_factor
                  at the end (airbench's triangle)
    cosine        linear from start_factor up to 1 at p = warmup, then half a cosine down to
                  end_factor at the end
    step          1, then 0.1 from half the run, 0.01 from three quarters

and each parameter's is that times its group's factor: ``norm_lr_factor`` for the norms'
gammas and betas (airbench trains BN biases at 64x), 1 for the rest. Decoupled decay uses the
scheduled rate without the group's factor.

With SGD, ``ema`` (0 < ema < 1) keeps an exponential moving average of the weights, updated
after every step (``avg = ema * avg + (1 - ema) * w``, from the initial weights) in the state
slot Adam keeps its second moment in; the run is scored and saved with the average.

With SGD, ``lookahead`` (K > 0) is airbench94's: the same slot holds a slow copy of the weights
(from the initial ones); after every K-th step t (counting from 1) it becomes
``a * slow + (1 - a) * w`` with ``a = 0.95**K * (t / total)**3`` and the weights are set to it,
and after the last step the weights are the slow copy (``a = 1`` unless that step is a K-th).
BN's running statistics are averaged alike, by the coordinator (``_average_bn``): the weights a
run is scored with are scored with their own statistics.

With SGD, ``muon_lr`` > 0 trains the conv filters (every 4-D parameter that trains) with Muon
(Keller Jordan's; airbench94_muon's settings: rate 0.24, momentum 0.6): each step the filter's
momentum direction ``d`` (``muon_momentum``; Nesterov's as SGD's is; no L2, no decay), the filter
scaled to Frobenius norm sqrt(F) for F filters, then ``w -= muon_lr * factor(t) *
orthogonalize(d)`` (:func:`pipeline.optim.muon_update`); the other parameters take SGD as
above. A filter is updated whole by one worker: the step's slices never cut one
(:class:`pipeline.training.plan.StepPlan`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "triangular", "cosine", "step")


@dataclass(frozen=True)
class UpdateRule:
    """The update of one run (small: travels with every task)."""

    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup: float = 0.0
    start_factor: float = 1.0
    end_factor: float = 0.0
    total: int = 1  # steps of the run
    ema: float = 0.0  # the weights' moving average per step (SGD; 0: none)
    lookahead: int = 0  # steps between pulls of the weights to their slow copy (SGD; 0: none)
    muon_lr: float = 0.0  # Muon's rate for the conv filters (SGD for the rest; 0: off)
    muon_momentum: float = 0.6

    @classmethod
    def of(cls, config, total_steps: int) -> UpdateRule:
        """The rule of a run's settings (a TrainConfig) over ``total_steps``."""
        return cls(
            config.optimizer,
            config.lr,
            config.momentum,
            config.nesterov,
            config.weight_decay,
            config.schedule,
            config.warmup,
            config.start_factor,
            config.end_factor,
            max(1, int(total_steps)),
            config.ema,
            config.lookahead,
            config.muon_lr,
            config.muon_momentum,
        )

    def factor(self, t: int) -> float:
        """The schedule's multiplier of the learning rate at step ``t`` (from 0)."""
        p = t / self.total
        if self.schedule == "constant":
            return 1.0
        if self.schedule == "step":
            return 1.0 if p < 0.5 else 0.1 if p < 0.75 else 0.01
        if p < self.warmup:
            return self.start_factor + (1.0 - self.start_factor) * p / self.warmup
        rest = (p - self.warmup) / (1.0 - self.warmup) if self.warmup < 1 else 1.0
        if self.schedule == "triangular":
            return 1.0 + (self.end_factor - 1.0) * rest
        return self.end_factor + (1.0 - self.end_factor) * 0.5 * (1.0 + math.cos(math.pi * rest))

    def lr_at(self, t: int) -> float:
        return self.lr * self.factor(t)

    def scalars(self, t: int, dtype) -> tuple:
        """:func:`pipeline.training.reduce.tree_update`'s scalars for step ``t`` (from 0); Adam
        at a constant rate gives pipeline.optim.adam's bits."""
        lr = self.lr_at(t)
        lrwd = lr * self.weight_decay
        if self.optimizer == "adam":
            return adam_scalars({"learning_rate": lr, "t": t}, dtype, lrwd)
        a, pull = self.average(t)
        average = (a, 1.0 - a, float(pull), 0.001, 1.0, 1.0)  # SGD reads the first three
        return step_scalars(
            dtype, 1, average, lr=lr, momentum=self.momentum, nesterov=self.nesterov, lrwd=lrwd
        )

    def muon_at(self, t: int) -> tuple[float, float]:
        """Muon's (learning rate, momentum) at step ``t`` (from 0): its rate on the run's
        schedule (:func:`pipeline.optim.muon_update`)."""
        return self.muon_lr * self.factor(t), self.muon_momentum

    def average(self, t: int) -> tuple[float, bool]:
        """After step ``t`` (from 0), SGD's average of the weights becomes ``a * avg + (1 - a) *
        w`` (a = 0: unchanged) and, when ``pull``, the weights become the average: (a, pull)."""
        if not self.lookahead:
            return self.ema, False
        done, k = t + 1, self.lookahead
        if done % k == 0:
            return 0.95**k * (min(done, self.total) / self.total) ** 3, True
        return (1.0, True) if done >= self.total else (0.0, False)

    def problem(self) -> str | None:
        """Why this rule cannot run, in one line (None if it can)."""
        if self.optimizer not in OPTIMIZERS:
            return f"unknown optimizer {self.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}"
        if self.schedule not in SCHEDULES:
            return f"unknown schedule {self.schedule!r}: expected one of {', '.join(SCHEDULES)}"
        for name in ("momentum", "warmup", "start_factor", "end_factor"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                return f"{name} must be in [0, 1], got {value}"
        if self.warmup >= 1.0 and self.schedule in ("triangular", "cosine"):
            return f"warmup must be < 1 (a fraction of the run), got {self.warmup}"
        if not self.weight_decay >= 0:
            return f"weight_decay must be >= 0, got {self.weight_decay}"
        if not 0.0 <= self.ema < 1.0:
            return f"ema must be in [0, 1), got {self.ema}"
        if self.ema and self.optimizer != "sgd":
            return "ema works with optimizer sgd (Adam's state has no room for the average)"
        ok = isinstance(self.lookahead, int) and not isinstance(self.lookahead, bool)
        if not (ok and self.lookahead >= 0):
            return f"lookahead must be a whole number of steps >= 0, got {self.lookahead!r}"
        if self.lookahead and self.optimizer != "sgd":
            return "lookahead works with optimizer sgd (Adam's state has no room for the slow copy)"
        if self.lookahead and self.ema:
            return "lookahead and ema both keep their average in one slot: choose one"
        if not self.muon_lr >= 0:
            return f"muon_lr must be >= 0, got {self.muon_lr}"
        if self.muon_lr and self.optimizer != "sgd":
            return "muon_lr works with optimizer sgd (the parameters that are not filters take it)"
        if not 0.0 <= self.muon_momentum <= 1.0:
            return f"muon_momentum must be in [0, 1], got {self.muon_momentum}"
        return None


def step_scalars(
    dtype,
    kind: int = 0,
    adam: tuple = (0.9, 0.1, 0.999, 0.001, 1.0, 1.0),
    lr: float = 1e-3,
    eps: float = 1e-8,
    momentum: float = 0.0,
    nesterov: bool = False,
    lrwd: float = 0.0,
) -> tuple:
    """The scalars of :func:`pipeline.training.reduce.tree_update` in the kernel's order, cast
    to ``dtype``: kind (0 Adam, 1 SGD), Adam's (b1, 1 - b1, b2, 1 - b2, 1 - b1**t,
    1 - b2**t), lr, eps, SGD's momentum and Nesterov flag, lr x decoupled weight decay."""
    f = np.dtype(dtype).type
    return (kind, *(f(x) for x in adam), f(lr), f(eps), f(momentum), bool(nesterov), f(lrwd))


def adam_scalars(config: dict, dtype, lrwd: float = 0.0) -> tuple:
    """Advance Adam's step count and return :func:`step_scalars` for it, cast as
    ``pipeline.optim.adam`` casts them (with decoupled decay ``lrwd``: lr x weight decay)."""
    config.setdefault("learning_rate", 1e-3)
    config.setdefault("beta1", 0.9)
    config.setdefault("beta2", 0.999)
    config.setdefault("epsilon", 1e-8)
    config.setdefault("t", 0)
    config["t"] += 1
    t, b1, b2 = config["t"], config["beta1"], config["beta2"]
    moments = (b1, 1 - b1, b2, 1 - b2, 1 - b1**t, 1 - b2**t)
    return step_scalars(dtype, 0, moments, config["learning_rate"], config["epsilon"], lrwd=lrwd)
