"""A sweep's state, ``RUN_DIR/sweep.json``: its trials (settings, scores per rung, status),
rewritten atomically after every trial's rung, read back on resume and by the page (as a
regular file: a link there is refused, not followed)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.atomic import atomic_write_text
from pipeline.jobs.sweep.space import SweepError
from pipeline.safe_files import read_regular

STATE_FILE = "sweep.json"


STATE_FORMAT = "convpipe-sweep-1"


@dataclass
class Trial:
    """One trial's record in ``sweep.json``. ``scores``: {step: val_acc on the whole val split}."""

    id: int
    settings: dict
    state: str = "pending"  # pending, running, completed, stopped, failed
    steps: int = 0
    scores: dict = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    images: int = 0
    target: int = 0  # the rung (steps) it was last sent to

    @property
    def name(self) -> str:
        return f"t{self.id:03d}"

    @property
    def live(self) -> bool:
        return self.state in ("pending", "running")

    def best(self) -> tuple[float | None, int | None]:
        """(best score so far, its step); the earlier step on a tie."""
        if not self.scores:
            return None, None
        step = min(self.scores, key=lambda s: (-self.scores[s], s))
        return self.scores[step], step

    def final(self) -> float | None:
        return self.scores[max(self.scores)] if self.scores else None

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "settings": self.settings,
            "state": self.state,
            "steps": self.steps,
            "scores": {str(k): v for k, v in sorted(self.scores.items())},
            "error": self.error,
            "seconds": self.seconds,
            "images": self.images,
            "target": self.target,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Trial:
        return cls(
            d["id"],
            dict(d["settings"]),
            d["state"],
            d["steps"],
            {int(k): v for k, v in d["scores"].items()},
            d.get("error"),
            d.get("seconds", 0.0),
            d.get("images", 0),
            d.get("target", 0),
        )


@dataclass
class SweepState:
    """``sweep.json``: the plan it was started with, its rungs and every trial."""

    plan: dict
    rungs: list[int]
    trials: list[Trial]
    seconds: float = 0.0

    def save(self, run_dir: Path) -> None:
        atomic_write_text(
            Path(run_dir) / STATE_FILE,
            json.dumps(
                {
                    "format": STATE_FORMAT,
                    "plan": self.plan,
                    "rungs": self.rungs,
                    "seconds": self.seconds,
                    "trials": [t.to_dict() for t in self.trials],
                },
                indent=1,
                sort_keys=True,
            )
            + "\n",
        )

    @classmethod
    def load(cls, run_dir) -> SweepState:
        """``run_dir``'s sweep.json, read as a regular file (a link there is refused, not
        followed); a one-line :class:`SweepError` if it cannot be read or is not a sweep's."""
        path = Path(run_dir) / STATE_FILE
        try:
            d = json.loads(read_regular(run_dir, (STATE_FILE,)))
        except FileNotFoundError:
            raise SweepError(f"{path}: no such file (not a sweep's run directory?)") from None
        except OSError as exc:
            raise SweepError(f"{path}: unreadable sweep state ({exc.strerror or exc})") from None
        except ValueError as exc:
            raise SweepError(f"{path}: unreadable sweep state: {exc}") from None
        if not isinstance(d, dict) or d.get("format") != STATE_FORMAT:
            raise SweepError(f"{path}: not a convpipe sweep state (expected format {STATE_FORMAT})")
        try:
            return cls(
                d["plan"],
                list(d["rungs"]),
                [Trial.from_dict(t) for t in d["trials"]],
                d.get("seconds", 0.0),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SweepError(
                f"{path}: not a convpipe sweep state ({type(exc).__name__}: {exc})"
            ) from None

    def leaderboard(self) -> list[Trial]:
        """Trials by best-so-far score (higher first, ties to the lower id); unscored ones last."""
        return sorted(self.trials, key=lambda t: (t.best()[0] is None, -(t.best()[0] or 0.0), t.id))

    def best(self) -> Trial | None:
        top = self.leaderboard()
        return top[0] if top and top[0].best()[0] is not None else None


def trained_run_dir(path) -> str:
    """The run directory whose parameters ``path`` names: ``path`` itself for a training run
    (a ``convpipe train`` run, a job's, a sweep trial's), a sweep's best trial for a sweep's
    run directory (``sweep.json`` and no ``config.json``)."""
    path = Path(path)
    if (path / STATE_FILE).exists() and not (path / "config.json").exists():
        return best_run_dir(path)
    return str(path)


def best_run_dir(run_dir) -> str:
    """The run directory of a sweep's best trial (what :func:`pipeline.runs.load_model` loads)."""
    state = SweepState.load(run_dir)
    best = state.best()
    if best is None:
        raise SweepError(f"{run_dir}: no trial of the sweep has been scored yet")
    return str(Path(run_dir) / "trials" / best.name)
