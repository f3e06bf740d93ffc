"""What the convpipe page shows, read from the data root, run directories and the scheduler.

Nothing here writes anything. Jobs come from their records on the data root
(``ROOT/jobs/<id>/``, as ``convpipe status --root`` reads them) and from the scheduler's events
(as ``convpipe status --scheduler`` reads them, with the scheduler's live view of workers and
tasks, copied on its event loop and gone through in a thread). Runs come from their
directories: the jobs' run directories, every directory under ``ROOT/runs`` and the default
``runs/`` folder, and those ``convpipe train`` announced to the scheduler (:data:`RUNS_TOPIC`).
Metrics files are read incrementally: a poll reads only the lines added since the last one.

Every file is read through :class:`pipeline.dashboard.files.Folders`: a regular file inside
``ROOT/jobs`` (jobs) or inside ``ROOT/runs`` and the run folders (runs), no link followed. A
run directory is one holding ``config.json``; a path named by a status file or an event that
lies elsewhere is not read, whatever the event says. No data store is opened: steps per epoch
come from the run's own lines (or its ``train_limit``), never from the store its config names.
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
    infer_steps_per_epoch,
    recent_rate,
    step_breakdown,
    total_steps_of_settings,
)
from pipeline.dashboard.files import Folders, NotServed, real_path
from pipeline.jobs.client import job_events, job_status, list_jobs
from pipeline.jobs.files_view import settle_dead_coordinator
from pipeline.jobs.records import (
    REGISTRY_TOPIC,
    JobFileError,
    job_topic,
    status_from_bytes,
    task_key,
)
from pipeline.jobs.sweep.state import STATE_FILE, STATE_FORMAT, SweepState, Trial

#: scheduler event topic on which `convpipe train` announces its run directory
RUNS_TOPIC = "convpipe-runs"
#: a run without summary.json and without a new line for this long (and 20 steps' time) is stopped
STALE_S = 120.0
#: run directories listed per folder (newest first), and announced ones listed
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
        self.steps_per_epoch: int | None = None  # as the step lines say (a run's coordinator)

    def refresh(self, files: Folders, path: Path) -> None:
        """Read the lines added since the last call (all of them again if the file was replaced
        or truncated); none if it is not a regular file inside ``files``' folders."""
        try:
            with files.open(path) as (f, st):
                key = (st.st_dev, st.st_ino)
                if key != self.key or st.st_size < self.offset:  # replaced or truncated (--resume)
                    self.__init__()
                    self.key = key
                self.mtime = st.st_mtime
                if st.st_size == self.offset:
                    return
                f.seek(self.offset)
                data = f.read()
        except OSError:
            self.__init__()
            return
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
        if m.get("kind") == "step" and _count(m.get("step")) is not None:
            self.steps.append((m["step"], m.get("epoch"), m.get("loss")))
            self.recent.append(m)
            self.steps_per_epoch = _count(m.get("steps_per_epoch")) or self.steps_per_epoch
        elif m.get("kind") in ("eval", "epoch") and _number(m.get("step")) is not None:
            self.scored.append(m)

    def metrics(self) -> list[dict]:
        """Metrics records enough for :class:`Curves` (step lines reduced to step, epoch, loss)."""
        lines = [{"kind": "step", "step": s, "epoch": e, "loss": loss} for s, e, loss in self.steps]
        return sorted(lines + self.scored, key=lambda m: (m["step"], m["kind"] != "step"))


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
    test_acc: float | None = None  # a finished run's test split (its summary), scored once
    tta: str | None = None  # the test-time augmentation test_acc was scored with
    breakdown: dict = field(default_factory=dict)
    updated: float | None = None  # time of the last line (or of config.json), epoch seconds
    pictures: tuple[str, ...] = ()  # the PNGs write_plots left there (curves.png, filters.png)
    workers: int | None = None  # the workers the last step was planned over
    worker_changes: dict = field(default_factory=dict)  # joined/left/died, as the summary counts

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
    """Reads run directories inside ``files``' folders; keeps what it parsed of the last
    :data:`CACHED_RUNS` of them (least recently read forgotten first), by resolved path."""

    def __init__(self, files: Folders):
        self.files = files
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[str, _Lines] = collections.OrderedDict()

    def run_dir(self, path: str | Path) -> Path | None:
        """The resolved ``path`` if it is a run directory the page shows: inside the folders,
        holding config.json as a regular file; else None."""
        real = self.files.directory(path)
        if real is None or self.files.stat(real / "config.json") is None:
            return None
        return real

    def cached(self) -> list[str]:
        """The run directories whose lines are kept, least recently read first."""
        with self._lock:
            return list(self._cache)

    def read(self, path: str | Path) -> RunView:
        """The run in ``path``; ``exists`` False when it is not a run directory the page shows."""
        real = self.files.directory(path)
        if real is None:
            return RunView(str(path), exists=False)
        try:
            data, st = self.files.read(real / "config.json")
        except OSError:  # no config.json of its own: not a run directory
            return RunView(str(path), exists=False)
        config = _json_object(data)
        config_mtime = st.st_mtime
        with self._lock:
            lines = self._cache.pop(str(real), None) or _Lines()
            self._cache[str(real)] = lines
            while len(self._cache) > CACHED_RUNS:
                self._cache.popitem(last=False)
            lines.refresh(self.files, real / "metrics.jsonl")
            metrics = lines.metrics()
            recent = list(lines.recent)
            mtime = lines.mtime
            spe = lines.steps_per_epoch
        summary = _read_json(self.files, real / "summary.json")
        spe = spe or _steps_per_epoch_of_limit(config) or infer_steps_per_epoch(metrics)
        curves = Curves.from_metrics(metrics, spe)
        rate, per_step = recent_rate(recent)
        last = recent[-1] if recent else {}
        scored = [m for m in metrics if m["kind"] in ("eval", "epoch")]
        total = _count((summary or {}).get("steps")) or _count(
            total_steps_of_settings(config or {}, spe)
        )
        breakdown = (summary or {}).get("step_breakdown_s")
        if not isinstance(breakdown, dict) or not breakdown:
            breakdown = step_breakdown(recent)
        if summary and _number(summary.get("images_per_s")):
            rate = summary["images_per_s"]
        updated = mtime or config_mtime
        pictures = tuple(name for name in PICTURES if self.files.stat(real / name) is not None)
        return RunView(
            str(real),
            True,
            config,
            summary,
            curves,
            curves.last_step,
            total,
            _number(last.get("loss")),
            rate,
            per_step,
            _last(scored, "train_acc"),
            _last(scored, "val_acc"),
            _number((summary or {}).get("test_acc")),
            _text((summary or {}).get("tta")),
            breakdown,
            updated,
            pictures,
            workers=_count(last.get("workers")),
            worker_changes=_changes((summary or {}).get("worker_changes")),
        )


def _changes(counts) -> dict[str, int]:
    """A summary's worker_changes ({joined, left, died}: counts), the non-zero ones."""
    if not isinstance(counts, dict):
        return {}
    return {k: n for k in ("joined", "left", "died") if (n := _count(counts.get(k)))}


def _steps_per_epoch_of_limit(config: dict | None) -> int | None:
    """``ceil(train_limit / batch_size)`` of a run's config.json; None without a train_limit
    (the page does not open the store its config names to count the train split)."""
    config = config or {}
    limit, batch = _count(config.get("train_limit")), _count(config.get("batch_size"))
    return -(-limit // batch) if limit and batch else None


def _last(records: list[dict], key: str):
    for m in reversed(records):
        if _number(m.get(key)) is not None:
            return m[key]
    return None


def _number(v) -> float | int | None:
    """``v`` if it is a number (not a bool), else None."""
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _text(v) -> str | None:
    """``v`` if it is a string, else None."""
    return v if isinstance(v, str) else None


def _count(v) -> int | None:
    """``v`` if it is a non-negative integer (not a bool), else None."""
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def _read_json(files: Folders, path: Path) -> dict | None:
    """The JSON object in the regular file ``path`` inside ``files``' folders, else None."""
    try:
        return _json_object(files.read(path)[0])
    except OSError:
        return None


def _json_object(data: bytes) -> dict | None:
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


# ---- a sweep -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepView:
    """A sweep's state (``sweep.json``) and its trials' (steps, val_acc) curves, or the one-line
    problem reading it."""

    state: SweepState | None = None
    curves: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    problem: str | None = None


def read_sweep(files: Folders, run_dir: str | Path | None) -> SweepView | None:
    """The sweep in ``run_dir`` (inside ``files``' folders); None when it holds no sweep."""
    real = files.directory(run_dir) if isinstance(run_dir, (str, Path)) and run_dir else None
    if real is None:
        return None
    path = real / STATE_FILE
    try:
        data = files.read(path)[0]
    except FileNotFoundError:
        return None
    except OSError as exc:
        why = str(exc) if isinstance(exc, NotServed) else f"{path}: {exc.strerror or exc}"
        return SweepView(problem=why)
    try:
        state = _sweep_state(json.loads(data))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return SweepView(
            problem=f"{path}: not a convpipe sweep state ({type(exc).__name__}: {exc})"
        )
    trials = real / "trials"
    curves = {t.name: _val_curve(files, trials / t.name / "metrics.jsonl") for t in state.trials}
    return SweepView(state, curves)


def _sweep_state(d) -> SweepState:
    """A :class:`SweepState` from the JSON of ``sweep.json``, checked to be what the page draws
    (ValueError, KeyError, TypeError otherwise)."""
    if not isinstance(d, dict) or d.get("format") != STATE_FORMAT:
        raise ValueError(f"expected format {STATE_FORMAT}")
    dims = d["plan"]["search"]["dims"]
    if not all(isinstance(x.get("name"), str) for x in dims):
        raise TypeError("a search dimension without a name")
    trials = [Trial.from_dict(t) for t in d["trials"]]
    for t in trials:
        if _count(t.id) is None or not isinstance(t.settings, dict):
            raise TypeError(f"trial {t.id!r}: id must be an integer and settings an object")
        if any(_number(v) is None for v in t.scores.values()):
            raise TypeError(f"trial {t.id}: scores must be numbers")
        for x in dims:
            t.settings.setdefault(x["name"], None)
    return SweepState(d["plan"], list(d["rungs"]), trials, d.get("seconds", 0.0))


def _val_curve(files: Folders, path: Path) -> tuple[list[int], list[float]]:
    """(steps, val_acc) of a trial's eval and epoch lines, in step order (later lines win)."""
    try:
        data = files.read(path)[0]
    except OSError:
        return [], []
    points = {}
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            m = json.loads(line)
        except ValueError:
            break  # a torn last line of a killed run
        if (
            isinstance(m, dict)
            and m.get("kind") in ("eval", "epoch")
            and _number(m.get("step")) is not None
            and _number(m.get("val_acc")) is not None
        ):
            points[m["step"]] = m["val_acc"]
    steps = sorted(points)
    return steps, [points[s] for s in steps]


# ---- the scheduler -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Worker:
    address: str


@dataclass(frozen=True)
class _Task:
    state: str
    processing_on: _Worker | None


class SchedulerCopy:
    """What the page needs of the scheduler, copied on its event loop in one go: the events of
    convpipe's topics (tuples of references), the connected workers, the states of the jobs'
    tasks; one pass over the job registry, none over the jobs' events. It answers what
    :class:`SchedulerAsClient` asks of a scheduler (``get_events``, ``identity``, ``tasks``,
    ``address``), so that the jobs are worked out from it in a thread (:meth:`SchedulerView.of`)
    while the scheduler goes on.

    Only topics of jobs the scheduler was told of (:data:`REGISTRY_TOPIC`) are looked up: the
    scheduler makes a topic for any name asked of it, and a job page's URL is anyone's."""

    def __init__(self, scheduler):
        try:
            self.address = scheduler.address
        except (AttributeError, ValueError):  # a scheduler that is not listening (tests)
            self.address = None
        registry = scheduler.get_events(REGISTRY_TOPIC)
        self.events: dict[str, tuple] = {
            REGISTRY_TOPIC: registry,
            RUNS_TOPIC: scheduler.get_events(RUNS_TOPIC),
        }
        # every attempt is registered with its task's key (pipeline.jobs.client.submit)
        jobs: dict[str, None] = {}
        keys: set[str] = set()
        for _, m in registry:
            if isinstance(m, dict) and isinstance(m.get("job"), str):
                jobs[m["job"]] = None
                if isinstance(m.get("key"), str):
                    keys.add(m["key"])
                if _count(m.get("attempt")) is not None:
                    keys.add(task_key(m["job"], m["attempt"]))
        for job in jobs:
            self.events[job_topic(job)] = scheduler.get_events(job_topic(job))
        self.jobs = tuple(jobs)
        self.workers = tuple(scheduler.workers)
        self.tasks: dict[str, _Task] = {}
        for key in keys:
            ts = scheduler.tasks.get(key)
            if ts is not None:
                on = ts.processing_on
                self.tasks[key] = _Task(ts.state, None if on is None else _Worker(on.address))

    def get_events(self, topic: str) -> tuple:
        return self.events.get(topic, ())

    def identity(self, n_workers: int = 0) -> dict:
        return {"address": self.address, "workers": {w: {} for w in self.workers}}


class SchedulerAsClient:
    """The three calls :func:`pipeline.jobs.client.job_status` makes of a client, answered from
    a scheduler's state: a :class:`SchedulerCopy` (anywhere), or the scheduler itself (on its
    event loop only)."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def get_events(self, topic: str):
        return self.scheduler.get_events(topic)

    def sync(self, function, *args, **kwargs):
        """The scheduler's own methods (``scheduler.identity``) answer at once."""
        return function(*args, **kwargs)

    def run_on_scheduler(self, function, **kwargs):
        return function(dask_scheduler=self.scheduler, **kwargs)


@dataclass(frozen=True)
class SchedulerView:
    """What the scheduler knows: jobs as ``convpipe status`` reports them, announced run
    directories, and a problem reading them (one line) if there was one."""

    jobs: dict[str, dict] = field(default_factory=dict)
    runs: tuple[str, ...] = ()
    problem: str | None = None
    log: tuple[str, ...] = ()  # the log lines of the job asked for, from its events

    @classmethod
    def of(cls, copy: SchedulerCopy | None, job_id: str | None = None) -> SchedulerView:
        """The view from a copy of the scheduler's state (call it off the event loop: it goes
        through every job's events); with ``job_id``, also that job's log lines."""
        if copy is None:
            return cls()
        runs = tuple(
            dict.fromkeys(
                m["run_dir"]
                for _, m in copy.get_events(RUNS_TOPIC)
                if isinstance(m, dict) and isinstance(m.get("run_dir"), str)
            )
        )
        as_client = SchedulerAsClient(copy)
        try:
            if job_id is None:
                listed = list_jobs(as_client)
            else:  # that job alone
                listed = [job_status(as_client, job_id)] if job_id in copy.jobs else []
            jobs = {s["job"]: s for s in listed if isinstance(s.get("job"), str)}
            log = (
                tuple(
                    str(m.get("line"))
                    for m in job_events(as_client, job_id)
                    if m.get("type") == "log"
                )
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
    fa, ea = _count(files.get("attempt", 1)) or 1, _count(events.get("attempt", 1)) or 1
    if fa != ea:
        return dict(files if fa > ea else events)
    if _rank(files.get("state")) > _rank(events.get("state")):
        return dict(files)
    return {**files, **{k: v for k, v in events.items() if v is not None}}


def _rank(state) -> int:
    return _RANK.get(state, 0) if isinstance(state, str) else 0


@dataclass(frozen=True)
class Listing:
    """Every job and run the page lists, and problems (one line each) met reading them."""

    jobs: list[dict]
    runs: list[RunView]
    problems: list[str]


#: bytes read from the end of a job's log: its last lines, without reading a long log whole
LOG_TAIL_BYTES = 256 * 1024


class Board:
    """The page's data: jobs under ``root`` and on the scheduler, runs under ``run_folders``.

    Files are read only inside ``ROOT/jobs`` (jobs) and ``ROOT/runs`` and the run folders
    (runs; and run directories this process announced, :meth:`add_run`), as regular files
    opened without following a link (:class:`pipeline.dashboard.files.Folders`)."""

    def __init__(self, root: str | Path, run_folders: list[str | Path] | None = None):
        self.root = Path(root).absolute()
        folders = [self.root / "runs", *(Path(f).absolute() for f in (run_folders or []))]
        self.run_folders = list(dict.fromkeys(real_path(f) for f in folders))
        self.runs = Folders(folders)
        self.jobs = Folders([self.root / "jobs"])
        self.reader = RunReader(self.runs)

    def add_run(self, run_dir: str | Path) -> None:
        """Show ``run_dir`` wherever it is: a run this process started (the embedded cluster's
        `convpipe train`), not one a client announced (that one must be inside the folders)."""
        self.runs.add(run_dir)

    # ---- jobs ----
    def job_from_files(self, job_id: str) -> dict | None:
        """The job's ``ROOT/jobs/<id>/status.json`` (a dead local coordinator turned failed,
        as :func:`pipeline.jobs.files_view.status_from_files` does) with its last log line;
        None if there is none; :class:`JobFileError` (one line) if it is unreadable."""
        job_dir = self.root / "jobs" / job_id
        path = job_dir / "status.json"
        try:
            raw = self.jobs.read(path)[0]
        except FileNotFoundError:
            return None
        except NotServed as exc:
            raise JobFileError(str(exc)) from None
        except OSError as exc:
            raise JobFileError(f"{path}: cannot read it ({exc.strerror or exc})") from None
        status = status_from_bytes(path, raw)
        settle_dead_coordinator(status)
        lines = self._log_lines(job_dir)
        if lines:
            status["last_line"] = lines[-1]
        return status

    def jobs_from_files(self) -> tuple[list[dict], list[str]]:
        """Every job under ``ROOT/jobs`` (newest id first) and one line per unreadable one."""
        try:
            names = sorted(os.listdir(self.root / "jobs"), reverse=True)
        except OSError:
            return [], []
        statuses, unreadable = [], []
        for name in names:
            try:
                status = self.job_from_files(name)
            except JobFileError as exc:
                unreadable.append(str(exc))
                continue
            if status is not None:  # else a folder without a status (its preflight failed)
                statuses.append(status)
        return statuses, unreadable

    def _log_lines(self, job_dir) -> list[str]:
        """The last whole lines of ``job_dir/job.log`` ([] if it is not a file the page reads)."""
        try:
            data = self.jobs.read_tail(Path(job_dir) / "job.log", LOG_TAIL_BYTES)
        except OSError:
            return []
        return data[: data.rfind(b"\n") + 1].decode(errors="replace").splitlines()

    def job_statuses(self, view: SchedulerView) -> tuple[dict[str, dict], list[str]]:
        listed, unreadable = self.jobs_from_files()
        files = {s["job"]: s for s in listed if isinstance(s.get("job"), str)}
        ids = sorted(set(files) | set(view.jobs), reverse=True)  # newest submitted, then by id
        ids.sort(
            key=lambda j: str((files.get(j) or view.jobs.get(j) or {}).get("submitted") or ""),
            reverse=True,
        )
        statuses = {j: merge_status(files.get(j), view.jobs.get(j)) for j in ids}
        return statuses, unreadable + ([view.problem] if view.problem else [])

    def job(self, job_id: str, view: SchedulerView) -> dict | None:
        try:
            files = self.job_from_files(job_id)
        except JobFileError:
            files = None
        status = merge_status(files, view.jobs.get(job_id))
        job_dir = status.get("job_dir")
        if isinstance(job_dir, str) and "options" not in status:  # the settings it was given
            record = _read_json(self.jobs, Path(job_dir) / "spec.json")
            if record and isinstance(record.get("options"), dict):
                status["options"] = record["options"]
        return status or None

    def job_log(self, status: dict, view: SchedulerView, lines: int = 40) -> list[str]:
        """The last ``lines`` lines of the job's log (its file; else the scheduler's events)."""
        job_dir = status.get("job_dir")
        text = self._log_lines(job_dir) if isinstance(job_dir, str) and job_dir else []
        return (text or list(view.log))[-lines:]

    def run_of(self, status: dict) -> RunView | None:
        run_dir = status.get("run_dir")
        if status.get("kind") != "train" or not isinstance(run_dir, str) or not run_dir:
            return None
        return self.reader.read(run_dir)

    def sweep(self, status: dict) -> SweepView | None:
        """A sweep job's sweep (its run directory, inside the run folders); None otherwise."""
        if status.get("kind") != "sweep":
            return None
        return read_sweep(self.runs, status.get("run_dir"))

    # ---- runs ----
    def run_dirs(self, view: SchedulerView, statuses: dict[str, dict]) -> list[Path]:
        """Run directories not belonging to a job: under the run folders (newest first), then
        the newest announced ones (inside the folders too)."""
        taken = {
            real_path(Path(s["run_dir"]))
            for s in statuses.values()
            if isinstance(s.get("run_dir"), str) and s["run_dir"]
        }
        found: list[str] = []
        for folder in self.run_folders:
            try:
                entries = [e for e in os.scandir(folder) if e.is_dir()]
            except OSError:
                continue
            entries.sort(key=lambda e: _entry_mtime(e), reverse=True)
            found += [e.path for e in entries[:RUNS_PER_FOLDER]]
        found += list(reversed(view.runs))[:RUNS_PER_FOLDER]  # any client may announce many
        out: dict[Path, None] = {}
        for p in found:
            real = self.reader.run_dir(p)
            if real is not None and real not in taken:
                out[real] = None
        return list(out)

    def picture(self, run_dir: str, name: str) -> bytes | None:
        """``name`` (one of :data:`PICTURES`) of a run the page shows; None otherwise."""
        real = self.reader.run_dir(run_dir)
        if real is None or name not in PICTURES:
            return None
        try:
            return self.runs.read(real / name)[0]
        except OSError:
            return None

    def listing(self, view: SchedulerView) -> Listing:
        statuses, problems = self.job_statuses(view)
        jobs = []
        for status in statuses.values():
            jobs.append({**status, "run": self.run_of(status)})
        runs = [self.reader.read(p) for p in self.run_dirs(view, statuses)]
        return Listing(jobs, runs, problems)


def _entry_mtime(entry) -> float:
    try:
        return entry.stat().st_mtime
    except OSError:
        return 0.0
