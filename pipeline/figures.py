"""The figures of runs and sweeps, as matplotlib Figures (the caller saves them):

- ``curves_figure``: a run's training loss and accuracies (a run's curves.png);
- ``filters_figure``: its first-layer filters (filters.png);
- ``sweep_figure``: a sweep's trials and the best score against each searched setting (sweep.png).

The convpipe page draws its own SVG charts (``pipeline.dashboard.svg``).
"""

from __future__ import annotations

import numpy as np

from pipeline.vis_utils import visualize_grid


def _figure(width: float, height: float, layout: str | None = "constrained"):
    """A matplotlib Figure on the Agg canvas, outside pyplot's global state (sweeps plot from
    several threads)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 (lazy: matplotlib only when plotting)
    from matplotlib.figure import Figure  # noqa: PLC0415 (lazy: matplotlib only when plotting)

    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def curves_figure(title: str, curves, test: tuple[float, str] | None = None):
    """Two panels sharing the x axis: the loss of each step with its moving average, and the
    val/train accuracy lines (the whole-split val points of epoch ends marked); ``test``: the
    test split's accuracy at the end of the run and the test-time augmentation it was scored
    with (a run's ``test_acc`` and ``tta``), a star at the last x."""
    fig = _figure(9, 7.5)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    fig.suptitle(title, fontsize=13)
    x = [p.x for p in curves.loss]
    y = [p.y for p in curves.loss]
    ax1.plot(x, y, ".", ms=3, alpha=0.35, color="tab:blue", label="loss of each step")
    if len(y) >= 5:
        k = max(2, min(50, len(y) // 10))
        ax1.plot(
            x[k - 1 :],
            _moving_average(y, k),
            "-",
            lw=2,
            color="tab:blue",
            label=f"mean of {k} steps",
        )
    ax1.set_ylabel("training loss")
    ax1.set_title("Training loss")
    ax1.grid(alpha=0.3)
    if y:
        ax1.legend(loc="upper right")

    for points, label, color in (
        (curves.val_acc, "val accuracy", "tab:orange"),
        (curves.train_acc, "train accuracy (sample)", "tab:green"),
        (curves.test_acc, "test accuracy, whole split (end of each epoch)", "tab:red"),
    ):
        if points:
            ax2.plot(
                [p.x for p in points], [p.y for p in points], "-o", ms=4, color=color, label=label
            )
    whole = [p for p in curves.val_acc if p.whole]
    if whole:
        ax2.plot(
            [p.x for p in whole],
            [p.y for p in whole],
            "s",
            ms=8,
            mfc="none",
            mec="black",
            label="val, whole split (end of each epoch and of the run)",
        )
    last = max(
        [p.x for p in curves.loss + curves.val_acc + curves.train_acc + curves.test_acc],
        default=0.0,
    )
    if test is not None:
        accuracy, tta = test
        views = "no test-time augmentation" if tta == "none" else f"test-time augmentation {tta}"
        ax2.plot(
            [last],
            [accuracy],
            "*",
            ms=14,
            color="tab:red",
            label=f"test split, end of the run ({views}): {100 * accuracy:.2f}%",
        )
    ax2.set_xlabel(
        curves.x_label + (" (fractional: step / steps per epoch)" if curves.steps_per_epoch else "")
    )
    ax2.set_ylabel("accuracy")
    ax2.set_title("Classification accuracy")
    ax2.set_ylim(0, 1)
    ax2.grid(alpha=0.3)
    if curves.val_acc or curves.train_acc or curves.test_acc or test is not None:
        ax2.legend(loc="lower right")
    ax2.set_xlim(
        0, last * 1.02 if last > 0 else 1
    )  # from the start: a lone point is not a whole axis
    return fig


def _moving_average(y: list[float], k: int) -> np.ndarray:
    c = np.cumsum(np.asarray(y, dtype=np.float64))
    c[k:] = c[k:] - c[:-k]
    return c[k - 1 :] / k


#: filters.png's grid is drawn at least this many pixels wide
FILTERS_MIN_PX = 480


def filters_figure(title: str, W1: np.ndarray):
    """The grid of first-layer filters W1 (F, C, HH, WW), each weight a square block of pixels
    (at least :data:`FILTERS_MIN_PX` wide in all, drawn at 100 dpi), under ``title``."""
    grid = _filter_grid(W1)
    h, w = grid.shape[:2]
    scale = max(1, -(-FILTERS_MIN_PX // max(h, w)))
    image = np.kron(grid, np.ones((scale, scale, 1), np.uint8))
    fig = _figure(image.shape[1] / 100 + 0.4, image.shape[0] / 100 + 0.9)
    ax = fig.add_subplot()
    rgb = image.shape[2] == 3
    ax.imshow(
        image if rgb else image[..., 0], cmap=None if rgb else "gray", interpolation="nearest"
    )
    ax.set_axis_off()
    F, C, HH, WW = np.shape(W1)
    ax.set_title(f"{title}\n{F} filters, {C}x{HH}x{WW}", fontsize=11)
    return fig


def _filter_grid(W1: np.ndarray) -> np.ndarray:
    """The seed's "Visualize Filters": W1 (F, C, HH, WW) as one uint8 image grid (H, W, C),
    each filter scaled to 0..255 on its own."""
    return visualize_grid(np.asarray(W1, dtype=np.float64).transpose(0, 2, 3, 1)).astype(np.uint8)


def sweep_figure(state, curves: dict, setting_label=str):
    """sweep.png's figure: val accuracy against steps for every trial (the best highlighted),
    and the best-so-far metric against each searched setting (log axis for log-uniform ranges).

    ``state``: a :class:`pipeline.jobs.sweep.SweepState`; ``curves``: {trial name: (steps,
    val accuracies)}; ``setting_label``: a setting's name as the axis shows it.
    """
    dims = state.plan["search"]["dims"]
    best = state.best()
    fig = _figure(5 * (1 + len(dims)), 4, layout=None)
    axes = fig.subplots(1, 1 + len(dims), squeeze=False)
    ax = axes[0][0]
    for t in state.trials:
        steps, acc = curves[t.name]
        if best is not None and t.id == best.id:
            continue
        ax.plot(steps, acc, color="0.6", lw=0.8, alpha=0.7, marker="o", ms=2)
    if best is not None:
        steps, acc = curves[best.name]
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
            _log_axis(ax, xs)
        ax.set(xlabel=setting_label(d["name"]), ylabel=f"best {state.plan['search']['metric']}")
    fig.tight_layout()
    return fig


def _log_axis(ax, values) -> None:
    """A log x axis labelled in plain numbers (0.002): at the powers of ten, and also at 2 and 5
    times them when ``values`` span two decades or less (a few even steps under half a decade);
    tilted. matplotlib's own labels for a
    range of about one decade put "3x10^-3" and "4x10^-3" on top of each other."""
    from matplotlib import ticker  # noqa: PLC0415 (lazy: matplotlib only when plotting)

    ax.set_xscale("log")
    positive = [v for v in values if v > 0]
    decades = np.log10(max(positive) / min(positive)) if positive else 0.0
    if decades > 2:
        locator = ticker.LogLocator(base=10, subs=(1.0,))
    elif decades > 0.5:
        locator = ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0))
    else:  # too narrow for two of those: a few evenly spaced values
        locator = ticker.MaxNLocator(nbins=4)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.tick_params(axis="x", labelrotation=30)
