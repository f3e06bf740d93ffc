"""A sweep's results: ``trials.csv``, ``summary.json``, ``sweep.png``, ``best-params.npz`` and
the leaderboard text `convpipe status` prints."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from pipeline.atomic import atomic_write, atomic_write_text
from pipeline.errors import ConvpipeError
from pipeline.figures import sweep_figure
from pipeline.jobs.sweep.space import SweepPlan, spelt
from pipeline.jobs.sweep.state import SweepState
from pipeline.training.rundir import RunDir

LEADERBOARD_ROWS = 10


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def settings_text(settings: dict) -> str:
    return ", ".join(f"{spelt(k)}={_fmt(v)}" for k, v in settings.items())


def trials_csv(state: SweepState) -> str:
    """One row per trial: id, searched settings, state, steps, best val_acc and its step,
    final, seconds."""
    names = [d["name"] for d in state.plan["search"]["dims"]]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        [
            "id",
            *(spelt(n) for n in names),
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
    """sweep.png in the sweep's run directory ``out`` (:func:`pipeline.figures.sweep_figure`)."""
    curves = {t.name: curve(out / "trials" / t.name) for t in state.trials}
    fig = sweep_figure(state, curves, spelt)
    path = out / "sweep.png"

    def write(f):
        fig.savefig(f, format="png", dpi=100)

    atomic_write(path, write)
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
        *map(spelt, differ),
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
