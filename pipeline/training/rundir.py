"""A run directory: the settings, metrics, checkpoints and results of one training run.

RUN_DIR/config.json          every setting (TrainConfig), read back by --resume
RUN_DIR/metrics.jsonl        one JSON line per step ({"kind": "step", ...}) and per epoch
RUN_DIR/checkpoints/*.npz    atomic checkpoints (pipeline.checkpoint), the last two kept
RUN_DIR/params.npz           final parameters + BN statistics (np.load(allow_pickle=False))
RUN_DIR/summary.json         accuracies, steps, seconds, images/s, workers, every setting
RUN_DIR/curves.png           loss and accuracy curves
RUN_DIR/filters.png          the first-layer filters
RUN_DIR/owner.json           while a process trains there: its pid, host, start time, since when
                             and what it is (a ``convpipe train``, a job); see :meth:`RunDir.claim`
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_write, atomic_write_text
from pipeline.checkpoint import read_npz
from pipeline.curves import Curves, run_steps_per_epoch
from pipeline.errors import TrainingError
from pipeline.figures import curves_figure, filters_figure
from pipeline.procs import LockHeld, Owner, OwnerLock

CHECKPOINTS_KEPT = 2
BN_KEYS = ("bn_running_mean", "bn_running_var")
OWNER_FILE = "owner.json"


class RunDirBusy(TrainingError):
    """The run directory has a live owner (another trainer holds its ``owner.json``)."""


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

    @property
    def owner_path(self) -> Path:
        return self.path / OWNER_FILE

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
        """Make a fresh run directory and claim it; refuse one that holds a run
        (nothing is overwritten).

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

    # ---- owner ----------------------------------------------------------------------------------
    def claim(self, what: str, gone: Owner | None = None) -> OwnerLock:
        """Make this process the directory's one owner until the returned lock is released:
        ``owner.json`` (:class:`pipeline.procs.OwnerLock`) names it as ``what``. A live owner
        gets :class:`RunDirBusy`, one line naming it; an owner that has ended (on this host, or
        ``gone``: known to have ended elsewhere) is taken over."""
        lock = OwnerLock(self.owner_path, what)
        try:
            return lock.acquire(gone)
        except LockHeld as exc:
            raise RunDirBusy(self._busy(exc.holder)) from None
        except OSError as exc:
            raise TrainingError(f"cannot take {self.owner_path}: {exc.strerror or exc}") from None

    def check_free(self, gone: Owner | None = None) -> None:
        """:class:`RunDirBusy` if a live process owns the directory (see :meth:`claim`)."""
        try:
            holder = OwnerLock(self.owner_path, "").holder(gone)
        except OSError as exc:
            raise TrainingError(f"cannot read {self.owner_path}: {exc.strerror or exc}") from None
        if holder is not None:
            raise RunDirBusy(self._busy(holder))

    def _busy(self, holder) -> str:
        text = f"{self.path} is being trained by {holder.text()}; wait for it or stop it"
        if not holder.owner.is_local():  # it cannot be checked from here
            text += f" (if it has ended, delete {self.owner_path})"
        return text

    # ---- metrics --------------------------------------------------------------------------------
    def append_metrics(self, record: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def sync_metrics(self) -> None:
        """Put the metrics lines written so far on disk (fsync): a checkpoint counts them, so they
        must be there before it is (a power cut must not leave a checkpoint that counts lines the
        file lost). Once per checkpoint, not per line."""
        try:
            fd = os.open(self.metrics_path, os.O_RDONLY)
        except FileNotFoundError:  # no line yet
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

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


def write_plots(
    run: RunDir, metrics: list[dict], W1: np.ndarray, test: tuple[float, str] | None = None
) -> list[Path]:
    """curves.png and filters.png of ``run`` from its ``metrics`` lines and first-layer weights
    ``W1`` (F, C, HH, WW); no filters.png when the first layer with weights is not a
    convolution of RGB images (W1 not (F, 3, HH, WW)). ``test``: the test split's accuracy and
    the test-time augmentation it was scored with, marked at the end of the curves.

    curves.png: the training loss per step and the accuracy scored every ``--eval-every`` steps
    (val and train samples) and after each epoch (the whole val split), against fractional
    epochs (step / steps per epoch, from the run's settings or its lines); labelled axes, legend.
    filters.png: the seed's "Visualize Filters" grid, upscaled without smoothing, titled with
    the run and the step of the weights.
    """
    settings = _settings(run)
    curves = Curves.from_metrics(metrics, run_steps_per_epoch(metrics, settings))
    paths = [_plot_curves(run, curves, test)]
    if np.ndim(W1) == 4 and np.shape(W1)[1] == 3:
        paths.append(_plot_filters(run, W1, curves.last_step))
    return paths


def _settings(run: RunDir) -> dict | None:
    try:
        return json.loads(run.config_path.read_text())
    except (OSError, ValueError):
        return None


def _plot_curves(run: RunDir, curves, test) -> Path:
    path = run.path / "curves.png"
    title = f"Run {run.path.name}: {curves.last_step} steps"
    curves_figure(title, curves, test).savefig(path, dpi=100)
    return path


def _plot_filters(run: RunDir, W1: np.ndarray, step: int) -> Path:
    path = run.path / "filters.png"
    filters_figure(f"First-layer filters of run {run.path.name}, step {step}", W1).savefig(
        path, dpi=100
    )
    return path
