"""What the convpipe page shows, read from the data root, run directories and the scheduler.

Nothing here writes anything. Jobs come from their records on the data root
(``ROOT/jobs/<id>/``, as ``convpipe status --root`` reads them) and from the scheduler's events
(as ``convpipe status --scheduler`` reads them, with the scheduler's live view of workers and
tasks). Runs come from their directories: the jobs' run directories, every directory under
``ROOT/runs`` and the default ``runs/`` folder, and those ``convpipe train`` announced to the
scheduler (:data:`RUNS_TOPIC`). Metrics files are read incrementally: a poll reads only the lines
added since the last one.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.curves import (
    Curves,
    recent_rate,
    run_steps_per_epoch,
    step_breakdown,
    steps_per_epoch_of_settings,
    total_steps_of_settings,
)
from pipeline.jobs.client import job_events, list_jobs
from pipeline.jobs.files_view import list_from_files, status_from_files
from pipeline.jobs.records import JobError, JobFiles

#: scheduler event topic on which `convpipe train` announces its run directory
RUNS_TOPIC = "convpipe-runs"
#: a run without summary.json and without a new line for this long (and 20 steps' time) is stopped
STALE_S = 120.0
#: run directories listed per folder (newest first)
RUNS_PER_FOLDER = 50
#: run directories whose lines stay parsed in memory
CACHED_RUNS = 64
#: step lines kept whole for the step-time breakdown and the recent rate
RECENT_STEPS = 50
#: the pictures of a finished run the page shows (rundir.write_plots)
PICTURES = ("curves.png", "filters.png")


# ---- one run directory ---------------------------------------------------------------------------


class _Lines:
    """The parsed lines of one metrics.jsonl, kept compact: (step, epoch, loss) of every step,
    the last :data:`RECENT_STEPS` step lines whole, every eval and epoch line."""

    def __init__(self):
        self.key = None  # (device, inode) of the file read
        self.offset = 0  # bytes consumed (whole lines)
        self.steps: list[tuple[int, int, float]] = []
        self.recent: collections.deque = collections.deque(maxlen=RECENT_STEPS)
        self.scored: list[dict] = []
        self.mtime = 0.0

    def refresh(self, path: Path) -> None:
        try:
            st = path.stat()
        except FileNotFoundError:
            self.__init__()
            return
        key = (st.st_dev, st.st_ino)
        if (
            key != self.key or st.st_size < self.offset
        ):  # replaced or truncated (--resume): read again
            self.__init__()
            self.key = key
        self.mtime = st.st_mtime
        if st.st_size == self.offset:
            return
        with open(path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # whole lines only: the last may be half written
        for line in data[:end].splitlines():
            self._add(line)
        self.offset += end

    def _add(self, line: bytes) -> None:
        try:
            m = json.loads(line)
        except ValueError:
            return  # a torn line of a killed run
        if not isinstance(m, dict):
            return
        if m.get("kind") == "step" and isinstance(m.get("step"), int):
            self.steps.append((m["step"], m.get("epoch"), m.get("loss")))
            self.recent.append(m)
        elif m.get("kind") in ("eval", "epoch"):
            self.scored.append(m)

    def metrics(self) -> list[dict]:
        """Metrics records enough for :class:`Curves` (step lines reduced to step, epoch, loss)."""
        lines = [{"kind": "step", "step": s, "epoch": e, "loss": loss} for s, e, loss in self.steps]
        return sorted(lines + self.scored, key=lambda m: (m.get("step", 0), m["kind"] != "step"))


@dataclass(frozen=True)
class RunView:
    """A run directory as the page shows it."""

    path: str
    exists: bool
    settings: dict | None = None
    summary: dict | None = None
    curves: Curves | None = None
    step: int = 0
    total_steps: int | None = None
    loss: float | None = None
    images_per_s: float | None = None
    seconds_per_step: float | None = None
    train_acc: float | None = None
    val_acc: float | None = None
    breakdown: dict = field(default_factory=dict)
    updated: float | None = None  # time of the last line (or of config.json), epoch seconds
    pictures: tuple[str, ...] = ()  # the PNGs write_plots left there (curves.png, filters.png)

    @property
    def name(self) -> str:
        return Path(self.path).name

    @property
    def finished(self) -> bool:
        return self.summary is not None

    def eta_s(self) -> float | None:
        """Seconds to the last step at the recent pace (None when unknown or finished)."""
        if self.finished or not self.total_steps or not self.seconds_per_step:
            return None
        return max(0, self.total_steps - self.step) * self.seconds_per_step

    def state(self, now: float | None = None) -> str:
        """done (summary.json written), running (a line lately), stopped (none for a while)."""
        if self.finished:
            return "done"
        if self.updated is None:
            return "stopped"
        quiet = (now or time.time()) - self.updated
        return "running" if quiet < max(STALE_S, 20 * (self.seconds_per_step or 0)) else "stopped"


class RunReader:
    """Reads run directories; keeps the parsed lines of the last :data:`CACHED_RUNS` runs."""

    def __init__(self):
        self._lock = threading.Lock()
        self._lines: collections.OrderedDict[str, _Lines] = collections.OrderedDict()
        self._spe: dict[
            str, tuple[float, float | None]
        ] = {}  # path -> (config mtime, steps per epoch)

    def read(self, path: str | Path) -> RunView:
        path = Path(path)
        config = _read_json(path / "config.json")
        if config is None and not (path / "metrics.jsonl").exists():
            return RunView(str(path), exists=path.is_dir())
        with self._lock:
            lines = self._lines.pop(str(path), None) or _Lines()
            self._lines[str(path)] = lines
            while len(self._lines) > CACHED_RUNS:
                self._lines.popitem(last=False)
            lines.refresh(path / "metrics.jsonl")
            metrics = lines.metrics()
            recent = list(lines.recent)
            mtime = lines.mtime
        summary = _read_json(path / "summary.json")
        spe = self._steps_per_epoch(path, metrics, config)
        curves = Curves.from_metrics(metrics, spe)
        rate, per_step = recent_rate(recent)
        last = recent[-1] if recent else {}
        scored = [m for m in metrics if m["kind"] in ("eval", "epoch")]
        total = (summary or {}).get("steps") or total_steps_of_settings(config or {}, spe)
        breakdown = (summary or {}).get("step_breakdown_s") or step_breakdown(recent)
        if summary and summary.get("images_per_s"):
            rate = summary["images_per_s"]
        updated = mtime or _mtime(path / "config.json")
        pictures = tuple(name for name in PICTURES if (path / name).is_file())
        return RunView(
            str(path),
            True,
            config,
            summary,
            curves,
            curves.last_step,
            total,
            last.get("loss"),
            rate,
            per_step,
            _last(scored, "train_acc"),
            _last(scored, "val_acc"),
            breakdown,
            updated,
            pictures,
        )

    def _steps_per_epoch(
        self, path: Path, metrics: list[dict], config: dict | None
    ) -> float | None:
        """From the settings and the store (once per config.json), else from the lines."""
        mtime = _mtime(path / "config.json")
        cached = self._spe.get(str(path))
        if cached is None or cached[0] != mtime:
            cached = (mtime, steps_per_epoch_of_settings(config) if config else None)
            self._spe[str(path)] = cached
        return cached[1] or run_steps_per_epoch(metrics, None)


def _last(records: list[dict], key: str):
    for m in reversed(records):
        if isinstance(m.get(key), (int, float)):
            return m[key]
    return None


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


# ---- the scheduler -------------------------------------------------------------------------------


class SchedulerAsClient:
    """The three calls :func:`pipeline.jobs.client.job_status` makes of a client, answered from
    the scheduler's own state (call it on the scheduler's event loop)."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def get_events(self, topic: str):
        return self.scheduler.get_events(topic)

    def sync(self, function, *args, **kwargs):
        """The scheduler's own methods (``scheduler.identity``) answer at once on its loop."""
        return function(*args, **kwargs)

    def run_on_scheduler(self, function, **kwargs):
        return function(dask_scheduler=self.scheduler, **kwargs)


@dataclass(frozen=True)
class SchedulerView:
    """What the scheduler knows, taken on its event loop: jobs as ``convpipe status`` reports
    them, announced run directories, and a problem reading them (one line) if there was one."""

    jobs: dict[str, dict] = field(default_factory=dict)
    runs: tuple[str, ...] = ()
    problem: str | None = None
    log: tuple[str, ...] = ()  # the log lines of the job asked for, from its events

    @classmethod
    def take(cls, scheduler, job_id: str | None = None) -> SchedulerView:
        """The scheduler's view; with ``job_id``, also that job's log lines from its events."""
        if scheduler is None:
            return cls()

        runs = tuple(
            dict.fromkeys(
                m["run_dir"]
                for _, m in scheduler.get_events(RUNS_TOPIC)
                if isinstance(m, dict) and isinstance(m.get("run_dir"), str)
            )
        )
        as_client = SchedulerAsClient(scheduler)
        try:
            jobs = {s["job"]: s for s in list_jobs(as_client) if "job" in s}
            log = (
                tuple(m["line"] for m in job_events(as_client, job_id) if m.get("type") == "log")
                if job_id
                else ()
            )
        except Exception as exc:  # noqa: BLE001 - the page still shows the files; it says why not these
            return cls(
                {},
                runs,
                f"the scheduler's job events could not be read ({type(exc).__name__}: {exc})",
            )
        return cls(jobs, runs, None, log)


# ---- jobs ----------------------------------------------------------------------------------------

_RANK = {"queued": 0, "running": 1, "done": 2, "failed": 2, "cancelled": 2}


def merge_status(files: dict | None, events: dict | None) -> dict:
    """One status of a job from its files and the scheduler's events: the later attempt wins;
    for the same attempt the further state (an end over running over queued), the scheduler's
    when equal (it knows whether the job's worker is still there)."""
    if not files or not events:
        return dict(files or events or {})
    fa, ea = files.get("attempt", 1), events.get("attempt", 1)
    if fa != ea:
        return dict(files if fa > ea else events)
    if _RANK.get(files.get("state"), 0) > _RANK.get(events.get("state"), 0):
        return dict(files)
    return {**files, **{k: v for k, v in events.items() if v is not None}}


@dataclass(frozen=True)
class Listing:
    """Every job and run the page lists, and problems (one line each) met reading them."""

    jobs: list[dict]
    runs: list[RunView]
    problems: list[str]


class Board:
    """The page's data: jobs under ``root`` and on the scheduler, runs under ``run_folders``."""

    def __init__(self, root: str | Path, run_folders: list[str | Path] | None = None):
        self.root = Path(root).absolute()
        folders = [self.root / "runs", *(Path(f).absolute() for f in (run_folders or []))]
        self.run_folders = list(dict.fromkeys(_real(f) for f in folders))
        self.reader = RunReader()

    # ---- jobs ----
    def job_statuses(self, view: SchedulerView) -> tuple[dict[str, dict], list[str]]:
        listing = list_from_files(str(self.root))
        files = {s["job"]: s for s in listing.jobs if "job" in s}
        ids = sorted(
            set(files) | set(view.jobs), reverse=True
        )  # newest submitted first, then by id
        ids.sort(
            key=lambda j: (files.get(j) or view.jobs.get(j) or {}).get("submitted") or "",
            reverse=True,
        )
        statuses = {j: merge_status(files.get(j), view.jobs.get(j)) for j in ids}
        return statuses, list(listing.unreadable) + ([view.problem] if view.problem else [])

    def job(self, job_id: str, view: SchedulerView) -> dict | None:
        try:
            files = status_from_files(str(self.root), job_id)
        except JobError:
            files = None
        status = merge_status(files, view.jobs.get(job_id))
        if status.get("job_dir") and "options" not in status:  # the settings it was submitted with
            try:
                record = JobFiles(status["job_dir"]).read_record()
            except JobError:
                record = None
            if record:
                status["options"] = record["options"]
        return status or None

    def job_log(self, status: dict, view: SchedulerView, lines: int = 40) -> list[str]:
        """The last ``lines`` lines of the job's log (its file; else the scheduler's events)."""
        job_dir = status.get("job_dir")
        text = JobFiles(job_dir).read_log()[0] if job_dir and os.path.isdir(job_dir) else ""
        return (text.splitlines() or list(view.log))[-lines:]

    def run_of(self, status: dict) -> RunView | None:
        run_dir = status.get("run_dir")
        if status.get("kind") != "train" or not run_dir:
            return None
        return self.reader.read(run_dir)

    # ---- runs ----
    def run_dirs(self, view: SchedulerView, statuses: dict[str, dict]) -> list[Path]:
        """Run directories not belonging to a job: under the run folders
        (newest first), announced."""
        taken = {_real(Path(s["run_dir"])) for s in statuses.values() if s.get("run_dir")}
        found: list[Path] = []
        for folder in self.run_folders:
            try:
                entries = [e for e in os.scandir(folder) if e.is_dir()]
            except OSError:
                continue
            entries.sort(key=lambda e: _entry_mtime(e), reverse=True)
            found += [
                Path(e.path)
                for e in entries[:RUNS_PER_FOLDER]
                if os.path.exists(os.path.join(e.path, "config.json"))
            ]
        found += [
            Path(p) for p in reversed(view.runs) if os.path.exists(os.path.join(p, "config.json"))
        ]
        out = []
        for p in dict.fromkeys(_real(p) for p in found):
            if p not in taken:
                out.append(p)
        return out

    def allowed_run(self, path: str, view: SchedulerView) -> bool:
        """Whether the page shows ``path``: a job's run directory, one in a run folder,
        or announced."""
        real = _real(Path(path))
        if any(real.parent == f for f in self.run_folders):
            return True
        if any(real == _real(Path(p)) for p in view.runs):
            return True
        statuses, _ = self.job_statuses(view)
        return any(
            s.get("run_dir") and _real(Path(s["run_dir"])) == real for s in statuses.values()
        )

    def listing(self, view: SchedulerView) -> Listing:
        statuses, problems = self.job_statuses(view)
        jobs = []
        for status in statuses.values():
            jobs.append({**status, "run": self.run_of(status)})
        runs = [self.reader.read(p) for p in self.run_dirs(view, statuses)]
        return Listing(jobs, runs, problems)


def _real(p: Path) -> Path:
    try:
        return p.resolve()
    except OSError:
        return p.absolute()


def _entry_mtime(entry) -> float:
    try:
        return entry.stat().st_mtime
    except OSError:
        return 0.0
