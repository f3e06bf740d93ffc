"""The pieces of the convpipe page that need no server: learning curves from metrics lines
(pipeline.curves, shared with the run's PNGs), SVG charts, incremental reading of a run, and
merging a job's files with the scheduler's events."""

from __future__ import annotations

import json
import os
import re
import time

import pytest

from pipeline.atomic import atomic_write_text
from pipeline.curves import (
    Curves,
    infer_steps_per_epoch,
    recent_rate,
    step_breakdown,
    steps_per_epoch_of_settings,
    total_steps_of_settings,
)
from pipeline.dashboard.data import RunReader, merge_status
from pipeline.dashboard.files import Folders
from pipeline.dashboard.svg import MAX_VERTICES, Series, line_chart, nice_ticks
from tests.helpers.training import make_store


def step(s: int, spe: int, loss: float = 2.0, **kw) -> dict:
    return {"kind": "step", "step": s, "epoch": (s - 1) // spe + 1, "loss": loss, **kw}


# ---- curves --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lines, expected",
    [
        (
            [
                step(1, 10),
                {"kind": "eval", "step": 3, "epoch": 0.3, "train_acc": 0.1, "val_acc": 0.1},
            ],
            10.0,
        ),
        ([step(s, 4) for s in range(1, 7)], 4.0),  # step 5 starts epoch 2
        (
            [step(s, 5) for s in range(1, 4)] + [{"kind": "epoch", "epoch": 1, "step": 3}],
            None,
        ),  # --steps 3 < an epoch
    ],
)
def test_steps_per_epoch_from_the_lines(lines, expected):
    assert infer_steps_per_epoch(lines) == expected


def test_steps_per_epoch_from_the_settings_and_the_store(tmp_path):
    store = make_store(tmp_path / "store", n_train=200)
    assert (
        steps_per_epoch_of_settings({"data": str(store), "batch_size": 64, "train_limit": None})
        == 4
    )  # ceil
    assert (
        steps_per_epoch_of_settings({"data": "nowhere", "batch_size": 64, "train_limit": 128}) == 2
    )
    assert (
        steps_per_epoch_of_settings({"data": str(tmp_path / "missing"), "batch_size": 64}) is None
    )
    assert total_steps_of_settings({"epochs": 3, "steps": None}, 4.0) == 12
    assert total_steps_of_settings({"epochs": 3, "steps": 7}, 4.0) == 7


def test_curves_put_steps_at_fractional_epochs_and_mark_whole_split_points():
    lines = [
        step(s, 4, loss=3 - s / 10, n=64, seconds=0.5, read_s=0.1, compute_s=0.3)
        for s in range(1, 9)
    ]
    lines.insert(2, {"kind": "eval", "step": 2, "epoch": 0.5, "train_acc": 0.2, "val_acc": 0.15})
    lines.insert(5, {"kind": "epoch", "epoch": 1, "step": 4, "train_acc": 0.3, "val_acc": 0.25})
    lines.append(
        {"kind": "step", "step": 9, "epoch": 3, "loss": float("nan")}
    )  # a diverged step: not drawn
    c = Curves.from_metrics(lines)
    assert c.steps_per_epoch == 4.0 and c.x_label == "epoch" and c.last_step == 8
    assert [p.x for p in c.loss] == [s / 4 for s in range(1, 9)]
    assert [(p.x, p.y, p.whole) for p in c.val_acc] == [(0.5, 0.15, False), (1.0, 0.25, True)]
    assert [p.y for p in c.train_acc] == [0.2, 0.3]
    assert step_breakdown(lines, last=4) == pytest.approx(
        {"read": 0.1, "compute": 0.3, "step": 0.5}
    )
    assert recent_rate(lines) == pytest.approx((128.0, 0.5))
    assert Curves.from_metrics([step(1, 9)]).x_label == "step"


# ---- SVG -----------------------------------------------------------------------------------------


def test_nice_ticks():
    assert nice_ticks(0, 1, 5) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(1.53, 2.81, 6) == [1.75, 2.0, 2.25, 2.5, 2.75]
    assert nice_ticks(0, 5000, 6) == [0, 1000, 2000, 3000, 4000, 5000]


def test_a_long_series_is_thinned_but_says_how_many_points_it_has():
    points = tuple((i / 100, 2 - i / 5000) for i in range(5000))
    svg = line_chart(
        [Series("loss", points, "#000"), Series("empty", (), "#111")],
        title="t <b>",
        x_label="epoch",
        y_label="loss",
        chart_id="c",
    )
    path = re.search(r'<path d="([^"]+)"[^>]*data-series="loss" data-points="(\d+)"', svg)
    assert path.group(2) == "5000" and path.group(1).count("L") == MAX_VERTICES - 1
    assert 'data-series="empty"' not in svg and "t &lt;b&gt;" in svg and ">epoch<" in svg


# ---- reading a run -------------------------------------------------------------------------------


def test_a_run_is_read_incrementally_whole_lines_only_and_again_after_resume(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(
        json.dumps({"batch_size": 64, "train_limit": 256, "data": "x", "steps": 20, "epochs": 1})
    )
    metrics = run / "metrics.jsonl"
    with open(metrics, "w") as f:
        for s in range(1, 6):
            f.write(json.dumps(step(s, 4, n=64, seconds=0.25)) + "\n")
        f.write('{"kind": "step", "st')  # being written
    reader = RunReader(Folders([tmp_path]))
    v = reader.read(run)
    assert (v.step, v.total_steps, v.curves.steps_per_epoch) == (5, 20, 4.0)
    assert v.eta_s() == pytest.approx(15 * 0.25) and v.images_per_s == pytest.approx(256)
    with open(metrics, "a") as f:  # the line completes, two more
        f.write('ep": 6, "epoch": 2, "loss": 1.0, "n": 64, "seconds": 0.25}\n')
        f.write(json.dumps(step(7, 4, n=64, seconds=0.25)) + "\n")
    v = reader.read(run)
    assert [p.step for p in v.curves.loss] == [
        1,
        2,
        3,
        4,
        5,
        6,
        7,
    ]  # the half-written line, once whole
    # --resume truncates the metrics to its checkpoint (atomically: a new file)
    atomic_write_text(metrics, "".join(json.dumps(step(s, 4)) + "\n" for s in (1, 2)))
    assert [p.step for p in reader.read(run).curves.loss] == [1, 2]


def test_run_state_done_running_stopped(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text(json.dumps(step(1, 4, seconds=1.0)) + "\n")
    reader = RunReader(Folders([tmp_path]))
    assert reader.read(run).state() == "running"
    old = time.time() - 3600
    os.utime(run / "metrics.jsonl", (old, old))
    assert reader.read(run).state() == "stopped"
    (run / "summary.json").write_text(json.dumps({"steps": 1}))
    assert reader.read(run).state() == "done"
    assert not reader.read(tmp_path / "nothing").exists


# ---- a job from its files and the scheduler's events ---------------------------------------------


def test_merge_status():
    files = {"job": "j", "attempt": 1, "state": "done", "result": {"a": 1}, "job_dir": "/d"}
    assert (
        merge_status(files, {"job": "j", "attempt": 1, "state": "running"})["state"] == "done"
    )  # files went further
    lost = merge_status(
        {"job": "j", "attempt": 1, "state": "running", "job_dir": "/d"},
        {"job": "j", "attempt": 1, "state": "failed", "reason": "worker left"},
    )
    assert (lost["state"], lost["reason"], lost["job_dir"]) == ("failed", "worker left", "/d")
    assert (
        merge_status(files, {"job": "j", "attempt": 2, "state": "queued"})["state"] == "queued"
    )  # resumed
    assert merge_status(None, {"job": "j", "state": "queued"}) == {"job": "j", "state": "queued"}
