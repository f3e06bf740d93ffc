"""The page's cards: the workers a run's last step was planned over, a finished run's joins,
retirements and deaths (workers come and go while a job runs), and its test accuracy."""

from __future__ import annotations

import json

from pipeline.dashboard.data import RunReader
from pipeline.dashboard.files import Folders
from pipeline.dashboard.render import cards


def _run(tmp_path, widths: list, summary: dict | None = None):
    run = tmp_path / "run"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"batch_size": 64, "epochs": 1}))
    lines = [
        {
            "kind": "step",
            "step": s + 1,
            "epoch": 1,
            "loss": 2.0,
            "n": 64,
            "seconds": 0.1,
            "workers": w,
        }
        for s, w in enumerate(widths)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    if summary is not None:
        (run / "summary.json").write_text(json.dumps({"steps": len(widths), **summary}))
    return RunReader(Folders([tmp_path])).read(run)


def _card(html: str, label: str) -> str:
    value = html.split(f"<span>{label}</span>")[0].rsplit("<b>", 1)[1]
    return value.split("</b>")[0]


def test_a_running_run_shows_its_last_steps_workers(tmp_path):
    view = _run(tmp_path, [1, 1, 2, 3])
    assert view.workers == 3
    assert _card(cards(view, active=True), "workers") == "3"


def test_a_finished_run_shows_who_joined_left_and_died(tmp_path):
    view = _run(tmp_path, [2, 3, 2], {"worker_changes": {"joined": 1, "left": 1, "died": 0}})
    assert _card(cards(view, active=False), "workers") == "2 <small>(1 joined, 1 left)</small>"


def test_a_run_without_worker_counts_shows_a_dash_and_bad_values_are_not_shown(tmp_path):
    view = _run(tmp_path, [None, "<b>x</b>"], {"worker_changes": {"joined": "<script>"}})
    assert view.workers is None and view.worker_changes == {}
    assert _card(cards(view, active=False), "workers") == "–"


def test_a_finished_run_shows_its_test_accuracy_with_its_test_time_augmentation(tmp_path):
    views = {
        "tta": _run(tmp_path / "a", [2], {"test_acc": 0.9067, "tta": "flip-translate"}),
        "plain": _run(tmp_path / "b", [2], {"test_acc": 0.5, "tta": "none"}),
        "running": _run(tmp_path / "c", [2, 2]),
        "not a number": _run(tmp_path / "d", [2], {"test_acc": "90%", "tta": "flip"}),
        "markup": _run(tmp_path / "e", [2], {"test_acc": 0.25, "tta": "<b>x</b>"}),
    }
    shown = {k: _card(cards(v, active=False), "test accuracy") for k, v in views.items()}
    assert shown == {
        "tta": "90.7% <small>(flip-translate)</small>",
        "plain": "50.0%",
        "running": "–",
        "not a number": "–",
        "markup": "25.0% <small>(&lt;b&gt;x&lt;/b&gt;)</small>",
    }
