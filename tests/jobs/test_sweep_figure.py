"""sweep.png as a user reads it: the searched settings' axis labels never overlap, whatever
range the trials' values span."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.figures import sweep_figure
from pipeline.jobs.sweep import SweepState, Trial


def state_of(lrs, regs) -> SweepState:
    trials = [
        Trial(
            id=i,
            settings={"lr": float(lr), "reg": float(reg)},
            state="completed",
            steps=30,
            scores={10: 0.2 + 0.01 * i, 30: 0.3 + 0.01 * i},
        )
        for i, (lr, reg) in enumerate(zip(lrs, regs))
    ]
    dims = [{"name": "lr", "log-uniform": [1e-4, 1e-2]}, {"name": "reg", "log-uniform": [1e-5, 1]}]
    plan = {"search": {"dims": dims, "metric": "val_acc"}}
    return SweepState(plan=plan, rungs=[10, 30], trials=trials)


def overlapping_labels(fig) -> list[tuple[str, str]]:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    pairs = []
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        labels = [
            t
            for t in ax.get_xticklabels() + ax.get_xticklabels(minor=True)
            if t.get_visible() and t.get_text() and lo <= t.get_position()[0] <= hi
        ]
        boxes = sorted(
            ((t.get_window_extent(renderer), t.get_text()) for t in labels), key=lambda b: b[0].x0
        )
        pairs += [(a[1], b[1]) for a, b in zip(boxes, boxes[1:]) if a[0].overlaps(b[0])]
    return pairs


@pytest.mark.parametrize("lo, hi", [(-3.3, -2.3), (-2.9, -2.05), (-4, -2), (-2.5, -2.4), (-8, 0)])
def test_setting_axis_labels_never_overlap(lo, hi):
    """A range of about one decade made matplotlib write 3x10^-3 over 4x10^-3."""
    rng = np.random.default_rng(0)
    state = state_of(10 ** rng.uniform(lo, hi, 16), 10 ** rng.uniform(-5, -1, 16))
    curves = {t.name: ([10, 30], [0.2, t.best()[0]]) for t in state.trials}
    fig = sweep_figure(state, curves, lambda name: name.replace("_", "-"))
    assert overlapping_labels(fig) == []
    lr_axis = fig.axes[1]
    assert lr_axis.get_xscale() == "log" and lr_axis.get_xlabel() == "lr"
    assert len([t for t in lr_axis.get_xticklabels() if t.get_text()]) >= 2
