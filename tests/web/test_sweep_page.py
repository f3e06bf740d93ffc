"""The convpipe page's job page for a sweep: its leaderboard and its trials' val curves overlaid."""

from __future__ import annotations

import json
import re

from pipeline.dashboard import render
from pipeline.dashboard.data import read_sweep
from pipeline.dashboard.files import Folders
from pipeline.jobs.sweep import SweepState, Trial


def fake_sweep(run_dir):
    """Three trials of lr x hidden-dim with metrics lines, as run_sweep leaves them."""
    plan = {
        "search": {
            "method": "grid",
            "trials": None,
            "seed": 0,
            "metric": "val_acc",
            "dims": [
                {"name": "lr", "values": [1e-3, 1e-2]},
                {"name": "hidden_dim", "values": [16]},
            ],
        },
        "early_stopping": {"min_steps": 2, "reduction_factor": 3},
        "base": {},
    }
    trials = [
        Trial(0, {"lr": 1e-3, "hidden_dim": 16}, "stopped", 2, {2: 0.30}, target=2),
        Trial(1, {"lr": 1e-2, "hidden_dim": 16}, "completed", 6, {2: 0.40, 6: 0.55}, target=6),
        Trial(
            2, {"lr": 3e-2, "hidden_dim": 16}, "failed", 0, {}, "loss is nan at step 1", target=2
        ),
    ]
    SweepState(plan, [2, 6], trials).save(run_dir)
    for t in trials:
        d = run_dir / "trials" / t.name
        d.mkdir(parents=True)
        lines = [{"kind": "eval", "step": s, "val_acc": a} for s, a in sorted(t.scores.items())]
        (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    return run_dir


def test_the_sweep_section_ranks_trials_and_overlays_their_curves(tmp_path):
    html = render.sweep_section(read_sweep(Folders([tmp_path]), fake_sweep(tmp_path / "sweep")))
    assert "Sweep: 3/3 trials done, rungs [2, 6]" in html
    assert re.findall(r'data-trial="(t\d+)"', html) == ["t001", "t000", "t002"]
    head = re.search(r"<thead>(.*?)</thead>", html).group(1)
    assert "lr" in head and "hidden-dim" not in head  # only the settings that differ
    assert "0.5500" in html and "0.01" in html
    series = dict(re.findall(r'data-series="([^"]+)" data-points="(\d+)"', html))
    assert series == {"t000": "1", "best: t001": "2"}  # the failed trial has no curve
    assert html.count('class="legend"') == 1  # only the best one is listed


def test_a_sweep_jobs_fragments_carry_it_and_other_directories_give_nothing(tmp_path):
    files = Folders([tmp_path])
    sweep = render.sweep_section(read_sweep(files, fake_sweep(tmp_path / "sweep")))
    out = render.job_fragments(
        {"state": "done", "kind": "sweep", "run_dir": str(tmp_path / "sweep")},
        None,
        [],
        "../",
        sweep,
    )
    assert out["charts"].startswith("<h2>Sweep:") and 'id="leaderboard"' in out["charts"]
    assert read_sweep(files, tmp_path) is None and read_sweep(files, None) is None
    assert render.sweep_section(None) == ""
