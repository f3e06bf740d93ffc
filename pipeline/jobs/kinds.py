"""What each kind of job runs: its options, its checks, and the call it makes on the cluster.

A kind has four parts:

- ``options()``: {name: Option}, mirroring its command's options;
- ``validate(spec)``: settings that do not fit, checked where the spec is read;
- ``preflight(options, root, job_id)``: runs on a worker before the job is queued, so that paths
  mean what they mean on the cluster: makes them absolute, checks that the store (or run
  directory) is there, chooses the run directory; returns the options the job will run with;
- ``run(options, client, report)``: runs on a worker as the job's coordinator, with a client of
  the cluster it runs on; ``report.progress(dict)`` is its progress callback (a line in the
  job's log; a cancel request raises there, between steps). Returns a small JSON-able dict, the
  job's result.

:data:`KINDS` maps a spec's ``job`` to its kind.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.augment import TTAS
from pipeline.data import open_store, prepare
from pipeline.data.convert import DEFAULT_STORE, DEFAULT_VAL
from pipeline.data.download import is_url
from pipeline.data.store import store_state
from pipeline.errors import ConvpipeError, DataError, TrainingError
from pipeline.jobs.records import ACTIVE, JobError, JobFiles
from pipeline.jobs.schema import Option, SpecError, options_from_dataclass
from pipeline.jobs.sweep import (
    SEARCH_KEYS,
    STATE_FILE,
    STOPPING_KEYS,
    SweepPlan,
    check_trials_can_run,
    run_sweep,
    total_steps,
    trained_run_dir,
)
from pipeline.procs import Owner
from pipeline.training.config import TrainConfig, in_user_words
from pipeline.training.coordinator import train
from pipeline.training.evaluation import evaluate
from pipeline.training.rundir import RunDir


def _spec_error(spec, exc: Exception) -> ConvpipeError:
    """A setting that does not fit, named as the spec spells it (``batch-size``)."""
    return SpecError(f"{spec.source}: {in_user_words(str(exc))}")


def _abs(path: str | None) -> str | None:
    return None if path is None else os.path.abspath(os.path.expanduser(path))


def job_holder(record: dict) -> str:
    """What a job's coordinator is in the locks it holds: ``job J attempt N``."""
    return f"job {record['job']} attempt {record['attempt']}"


def as_job(report) -> dict:
    """``holder`` and ``gone`` for :func:`~pipeline.training.coordinator.train` and
    :func:`~pipeline.jobs.sweep.run_sweep` in a job: its coordinator names itself ``job J attempt
    N`` in the run directory's ``owner.json``, and takes over the hold of the coordinator known
    to have ended before it (``gone`` in its record)."""
    record = report.record
    return {"holder": job_holder(record), "gone": Owner.from_record(record.get("gone"))}


def check_run_dir_free(run_dir: str, root: str, job_id: str) -> None:
    """Refuse a run directory that a queued or running job on this data root already uses."""
    jobs = Path(root) / "jobs"
    if not jobs.is_dir():
        return
    for d in jobs.iterdir():
        if d.name == job_id:
            continue
        try:
            status = JobFiles(d).read_status()
        except JobError:
            # a job whose status cannot be read cannot be told to use it; `status` reports it
            continue
        if status and status.get("state") in ACTIVE and status.get("run_dir") == run_dir:
            raise SpecError(
                f"run directory {run_dir} is in use by job {d.name} ({status['state']}); "
                f"choose another out"
            )


class _InRunDirectory:
    """A kind whose job writes the run directory ``out`` and continues it on resume (from its
    last checkpoint; a sweep from its sweep.json)."""

    @staticmethod
    def run_dir(options: dict) -> str | None:
        return options.get("out")

    @staticmethod
    def resume_options(options: dict) -> dict:
        """The next attempt continues the same run directory."""
        return {**options, "resume": options["out"]}


class Train(_InRunDirectory):
    """``convpipe train`` as a job:
    the coordinator of :func:`pipeline.training.coordinator.train`."""

    name = "train"

    @staticmethod
    def options():
        # the scheduler is the job's own key; the job runs on the cluster it is submitted to
        return options_from_dataclass(TrainConfig, exclude=("scheduler",))

    @staticmethod
    def config(options: dict):
        return TrainConfig.from_job(options)

    @classmethod
    def validate(cls, spec) -> None:
        try:
            cls.config(spec.options)
        except ConvpipeError as exc:
            raise _spec_error(spec, exc) from None

    @classmethod
    def preflight(cls, options: dict, root: str, job_id: str) -> dict:
        o = dict(options)
        o["data"] = _abs(o["data"])
        o["workers"] = None  # the job runs on the cluster's workers
        if o.get("resume"):
            o["resume"] = _abs(o["resume"])
            RunDir(o["resume"]).require_existing()
            o["out"] = o["resume"]
        else:
            o["out"] = _abs(o.get("out") or os.path.join(root, "runs", job_id))
            if (Path(o["out"]) / "config.json").exists():
                raise SpecError(
                    f"run directory {o['out']} already holds a run: resume that job, or choose "
                    "another out"
                )
        store = open_store(o["data"])  # DataError naming the path if it is missing or not a store
        check_run_dir_free(o["out"], root, job_id)
        problem = cls.config(o).train_limit_problem(store.splits.get("train", 0))
        if problem:  # refused here, not failed on the worker with a resume that cannot help
            raise SpecError(in_user_words(problem))
        return o

    @classmethod
    def run(cls, options: dict, client, report) -> dict:
        config = cls.config(options)
        summary = train(config, client=client, progress=report.progress, **as_job(report))
        keep = (
            "train_acc",
            "val_acc",
            "test_acc",
            "tta",  # how test_acc was scored
            "steps",
            "seconds",
            "images_per_s",
            "workers",
            "run_dir",
        )
        result = {k: summary[k] for k in keep if k in summary}
        result.setdefault("run_dir", options["out"])
        return result


class Prepare:
    """``convpipe data prepare`` as a job: :func:`pipeline.data.prepare` on the cluster."""

    name = "prepare"

    @staticmethod
    def options():
        return {
            "source": Option(
                "source",
                (str, type(None)),
                None,
                "CIFAR-10 archive, its batches folder, an image folder (or .tar.gz), or a URL "
                "(default: found under the data root, else downloaded)",
            ),
            "out": Option("out", (str,), DEFAULT_STORE, "the Zarr store to write"),
            "val": Option("val", (int,), DEFAULT_VAL, "training images held out as the val split"),
            "chunk": Option("chunk", (int, type(None)), None, "images per chunk (default 1000)"),
            "force": Option("force", (bool,), False, "rebuild a complete store"),
            "no_verify": Option("no_verify", (bool,), False, "accept a non-official CIFAR-10 copy"),
        }

    @staticmethod
    def validate(spec) -> None:
        o = spec.options
        if o["source"] is not None and not o["source"].strip():  # not "the current directory"
            raise SpecError(
                f"{spec.source}: source is empty (leave it out to find or download CIFAR-10)"
            )
        if o["val"] < 0:
            raise SpecError(f"{spec.source}: val must be >= 0, got {o['val']}")
        if o["chunk"] is not None and o["chunk"] < 1:
            raise SpecError(f"{spec.source}: chunk must be >= 1, got {o['chunk']}")

    @staticmethod
    def preflight(options: dict, root: str, job_id: str) -> dict:
        o = dict(options)
        o["out"] = _abs(o["out"])
        if o["source"] and not is_url(o["source"]):
            o["source"] = _abs(o["source"])
            if not os.path.exists(o["source"]):
                raise DataError(
                    f"source {o['source']} does not exist (paths are read on the cluster's workers)"
                )
        if store_state(o["out"]) == "foreign":
            raise DataError(
                f"{o['out']}: exists and is not a convpipe store; remove it or choose another out"
            )
        o["data_root"] = root
        check_run_dir_free(o["out"], root, job_id)
        return o

    @staticmethod
    def run(options: dict, client, report) -> dict:
        def progress(stage, done, total):
            report.progress({"event": stage, "done": done, "total": total})

        result = prepare(
            options["source"],
            options["out"],
            val=options["val"],
            chunk=options["chunk"],
            force=options["force"],
            verify=not options["no_verify"],
            client=client,
            data_root=options["data_root"],
            progress=progress,
        )
        return {
            "store": str(result.path),
            "skipped": result.skipped,
            "splits": dict(result.splits),
            "seconds": round(result.seconds, 2),
            "bytes": result.nbytes,
        }

    @staticmethod
    def run_dir(options: dict) -> str | None:
        return options.get("out")


class Evaluate:
    """``convpipe evaluate RUN_DIR`` as a job: :func:`pipeline.training.evaluation.evaluate`."""

    name = "evaluate"
    SPLITS = ("test", "val", "train")

    @staticmethod
    def options():
        return {
            "run": Option(
                "run", (str, type(None)), None, "the run directory to evaluate (required)"
            ),
            "data": Option("data", (str, type(None)), None, "Zarr store (default: the run's own)"),
            "split": Option("split", (str,), "test", "test, val or train"),
            "tta": Option(
                "tta", (str,), "none", "test-time augmentation: none, flip or flip-translate"
            ),
        }

    @classmethod
    def validate(cls, spec) -> None:
        if not spec.options["run"]:
            raise SpecError(
                f'{spec.source}: an evaluate job needs run = "RUN_DIR" (the run to evaluate)'
            )
        if spec.options["split"] not in cls.SPLITS:
            raise SpecError(
                f"{spec.source}: unknown split {spec.options['split']!r} (expected one of "
                f"{', '.join(cls.SPLITS)})"
            )
        if spec.options["tta"] not in TTAS:
            raise SpecError(
                f"{spec.source}: unknown tta {spec.options['tta']!r} (expected one of "
                f"{', '.join(TTAS)})"
            )

    @staticmethod
    def preflight(options: dict, root: str, job_id: str) -> dict:
        o = dict(options)
        run_dir = o["run"]
        if not os.path.isabs(os.path.expanduser(run_dir)) and not os.path.exists(run_dir):
            # a bare job id or a path relative to the data root's runs/
            for candidate in (os.path.join(root, "runs", run_dir), os.path.join(root, run_dir)):
                if os.path.isdir(candidate):
                    run_dir = candidate
                    break
        o["run"] = _abs(trained_run_dir(run_dir))  # a sweep's: its best trial
        run = RunDir(o["run"]).require_existing()
        if not run.params_path.exists():
            raise TrainingError(
                f"{run.path} has no params.npz: the run has not finished (resume it first)"
            )
        o["data"] = _abs(o["data"]) if o["data"] else TrainConfig.load(run.config_path).data
        open_store(o["data"])
        return o

    @staticmethod
    def run(options: dict, client, report) -> dict:
        result = evaluate(
            options["run"],
            options["data"],
            options["split"],
            client=client,
            progress=report.progress,
            tta=options.get("tta", "none"),
        )
        keep = ("split", "accuracy", "correct", "n", "tta", "seconds", "run_dir")
        return {k: result[k] for k in keep if k in result}

    @staticmethod
    def run_dir(options: dict) -> str | None:
        return options.get("run")


class Sweep(_InRunDirectory):
    """A hyperparameter sweep (:mod:`pipeline.jobs.sweep`): a train spec's keys are every trial's
    base, plus the [search] and [early-stopping] tables."""

    name = "sweep"

    @staticmethod
    def options():
        return {
            **Train.options(),
            "search": Option(
                "search",
                (dict,),
                None,
                "[search] table: method, trials, seed, metric and the searched settings",
                keys=SEARCH_KEYS,
            ),
            "early_stopping": Option(
                "early_stopping",
                (dict, type(None)),
                None,
                "[early-stopping] table: min-steps, reduction-factor",
                keys=STOPPING_KEYS,
            ),
        }

    @staticmethod
    def plan(options: dict, where: str = "<spec>"):
        return SweepPlan.from_options(options, where)

    @classmethod
    def validate(cls, spec) -> None:
        try:
            Train.config(
                {k: v for k, v in spec.options.items() if k not in ("search", "early_stopping")}
            )
            cls.plan(spec.options, spec.source)
        except ConvpipeError as exc:
            if exc.args and str(exc).startswith(spec.source):
                raise
            raise _spec_error(spec, exc) from None

    @classmethod
    def preflight(cls, options: dict, root: str, job_id: str) -> dict:
        o = dict(options)
        o["data"] = _abs(o["data"])
        o["workers"] = None
        if o.get("resume"):
            o["out"] = o["resume"] = _abs(
                o["resume"]
            )  # its sweep.json, if written, says what is done
        else:
            o["out"] = _abs(o.get("out") or os.path.join(root, "runs", job_id))
            if (Path(o["out"]) / STATE_FILE).exists() or (Path(o["out"]) / "config.json").exists():
                raise SpecError(
                    f"run directory {o['out']} already holds a run: resume that job, or choose "
                    "another out"
                )
        check_run_dir_free(o["out"], root, job_id)
        plan = cls.plan(o)
        total_steps(
            Train.config({k: v for k, v in o.items() if k not in ("search", "early_stopping")})
        )  # the store
        try:
            check_trials_can_run(plan)  # before any trial: not every trial failing alone
        except TrainingError as exc:
            raise SpecError(in_user_words(str(exc))) from None  # train-limit, as a spec spells it
        return o

    @classmethod
    def run(cls, options: dict, client, report) -> dict:
        summary = run_sweep(
            cls.plan(options),
            options["out"],
            client=client,
            progress=report.progress,
            **as_job(report),
        )
        best = summary.get("best") or {}
        return {
            "trials": summary["trials"],
            "completed": summary["completed"],
            "stopped": summary["stopped"],
            "failed": summary["failed"],
            "best_trial": best.get("trial"),
            "val_acc": best.get("val_acc"),
            "steps": summary["steps"],
            "seconds": summary["seconds"],
            "run_dir": options["out"],
        }


KINDS: dict[str, type] = {"prepare": Prepare, "train": Train, "evaluate": Evaluate, "sweep": Sweep}
