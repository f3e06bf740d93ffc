"""A run directory: the settings, metrics, checkpoints and results of one training run.

RUN_DIR/config.json          every setting (TrainConfig), read back by --resume
RUN_DIR/metrics.jsonl        one JSON line per step ({"kind": "step", ...}) and per epoch
RUN_DIR/checkpoints/*.npz    atomic checkpoints (pipeline.checkpoint), the last two kept
RUN_DIR/params.npz           final parameters + BN statistics (np.load(allow_pickle=False))
RUN_DIR/summary.json         accuracies, steps, seconds, images/s, workers, every setting
RUN_DIR/curves.png           loss and accuracy curves
RUN_DIR/filters.png          the first-layer filters
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_write, atomic_write_text
from pipeline.checkpoint import read_npz
from pipeline.curves import Curves, run_steps_per_epoch
from pipeline.errors import TrainingError
from pipeline.vis_utils import visualize_grid

CHECKPOINTS_KEPT = 2
BN_KEYS = ("bn_running_mean", "bn_running_var")


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    # ---- layout -------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def params_path(self) -> Path:
        return self.path / "params.npz"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoint_dir / f"step-{step:08d}.npz"

    @staticmethod
    def default_path(root: str | Path = "runs") -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(root) / stamp
        i = 1
        while path.exists():
            i += 1
            path = Path(root) / f"{stamp}-{i}"
        return path

    # ---- creation -----------------------------------------------------------------------------
    def create(self) -> RunDir:
        """Make a fresh run directory and claim it; refuse one that holds a run (nothing is overwritten).

        The claim is ``checkpoints/``, made with ``mkdir`` (no ``exist_ok``): of two runs that
        name the same directory at the same time, exactly one gets it; the other gets a
        :class:`TrainingError`.
        """
        taken = (
            f"{self.path} already holds a run (or another run is starting there): continue it with "
            f"--resume {self.path} or choose another --out"
        )
        if self.config_path.exists() or self.metrics_path.exists():
            raise TrainingError(taken)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.checkpoint_dir.mkdir()
        except FileExistsError:
            raise TrainingError(taken) from None
        except OSError as exc:
            raise TrainingError(
                f"cannot create run directory {self.path}: {exc.strerror or exc}"
            ) from None
        return self

    def require_existing(self) -> RunDir:
        if not self.config_path.exists():
            raise TrainingError(f"{self.path} is not a convpipe run directory (no config.json)")
        return self

    # ---- metrics --------------------------------------------------------------------------------
    def append_metrics(self, record: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        out = []
        for line in self.metrics_path.read_text().splitlines():
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError:  # a torn last line of a killed run
                    break
        return out

    def truncate_metrics(self, n_lines: int) -> None:
        """Keep the first ``n_lines`` records (those written before the checkpoint resumed from)."""
        records = self.read_metrics()[:n_lines]
        atomic_write_text(
            self.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
        )

    # ---- checkpoints ----------------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """Checkpoint files, newest first."""
        if not self.checkpoint_dir.exists():
            return []
        return sorted(self.checkpoint_dir.glob("step-*.npz"), reverse=True)

    def prune_checkpoints(self, keep: int = CHECKPOINTS_KEPT) -> None:
        for old in self.checkpoints()[keep:]:
            try:
                old.unlink()
            except FileNotFoundError:
                pass

    # ---- results --------------------------------------------------------------------------------
    def write_params(self, params: dict[str, np.ndarray], bn: dict[str, np.ndarray] | None) -> None:
        arrays = {k: np.ascontiguousarray(v) for k, v in params.items()}
        if bn:
            arrays.update({k: np.ascontiguousarray(v) for k, v in bn.items()})
        atomic_savez(self.params_path, arrays)

    def read_params(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
        if not self.params_path.exists():
            raise TrainingError(f"{self.params_path}: no such file (has the run finished?)")
        try:
            arrays = read_npz(self.params_path)
        except (OSError, ValueError) as exc:
            raise TrainingError(f"{self.params_path}: unreadable parameters: {exc}") from None
        bn = {k: arrays.pop(k) for k in BN_KEYS if k in arrays} or None
        return arrays, bn

    def write_summary(self, summary: dict) -> None:
        atomic_write_text(self.summary_path, json.dumps(summary, indent=2, sort_keys=True) + "\n")


# ---- atomic writes -------------------------------------------------------------------------------


def atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    atomic_write(path, lambda f: np.savez(f, **arrays))


# ---- plots ---------------------------------------------------------------------------------------


def write_plots(run: RunDir, metrics: list[dict], W1: np.ndarray) -> list[Path]:
    """curves.png and filters.png of ``run`` from its ``metrics`` lines and first-layer weights
    ``W1`` (F, C, HH, WW).

    curves.png: the training loss per step and the accuracy scored every ``--eval-every`` steps
    (val and train samples) and after each epoch (the whole val split), against fractional
    epochs (step / steps per epoch, from the run's settings or its lines); labelled axes, legend.
    filters.png: the seed's "Visualize Filters" grid, upscaled without smoothing, titled with
    the run and the step of the weights.
    """
    settings = _settings(run)
    curves = Curves.from_metrics(metrics, run_steps_per_epoch(metrics, settings))
    return [_plot_curves(run, curves), _plot_filters(run, W1, curves.last_step)]


def _settings(run: RunDir) -> dict | None:
    try:
        return json.loads(run.config_path.read_text())
    except (OSError, ValueError):
        return None


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 (lazy: matplotlib only when plotting)
    from matplotlib.figure import Figure  # noqa: PLC0415 (lazy: matplotlib only when plotting)

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _plot_curves(run: RunDir, curves) -> Path:
    path = run.path / "curves.png"
    curves_figure(f"Run {run.path.name}: {curves.last_step} steps", curves).savefig(path, dpi=100)
    return path


def curves_figure(title: str, curves):
    """Two panels sharing the x axis: the loss of each step with its moving average, and the
    val/train accuracy lines (the whole-split val points of epoch ends marked)."""
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
            label="val, whole split (end of epoch)",
        )
    ax2.set_xlabel(
        curves.x_label + (" (fractional: step / steps per epoch)" if curves.steps_per_epoch else "")
    )
    ax2.set_ylabel("accuracy")
    ax2.set_title("Classification accuracy")
    ax2.set_ylim(0, 1)
    ax2.grid(alpha=0.3)
    if curves.val_acc or curves.train_acc:
        ax2.legend(loc="lower right")
    last = max([p.x for p in curves.loss + curves.val_acc + curves.train_acc], default=0.0)
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


def _plot_filters(run: RunDir, W1: np.ndarray, step: int) -> Path:
    path = run.path / "filters.png"
    filters_figure(f"First-layer filters of run {run.path.name}, step {step}", W1).savefig(
        path, dpi=100
    )
    return path


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
