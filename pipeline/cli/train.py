"""`convpipe train` and `convpipe evaluate`: data-parallel training and evaluation on Dask.

Options are generated from :class:`pipeline.training.TrainConfig`'s fields (same names, dashes
for underscores), so the command, job specs and ``config.json`` cannot drift apart.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import shlex
import sys
import time

from pipeline.augment import TTAS
from pipeline.cli.quiet import quiet
from pipeline.curves import count_text
from pipeline.errors import TrainingError
from pipeline.training.config import TrainConfig, in_user_words, parse_value

_SHORT_HELP = "train a network (ThreeLayerConvNet, or a --model spec) data-parallel on Dask"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help=_SHORT_HELP,
        description=_SHORT_HELP + " (the embedded local cluster by default). The run is "
        "written to runs/<date>-<time>/ under the current directory unless --out says "
        "otherwise; a job (`convpipe submit`) writes its run under the data root instead, "
        "ROOT/runs/<job id>/, where every worker of the cluster sees it.",
        argument_default=argparse.SUPPRESS,
    )
    for f in dataclasses.fields(TrainConfig):
        default = f.default
        extra = f" (default: {default})" if default is not None else ""
        meta = f.metadata
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            metavar=meta.get("metavar") or "|".join(meta.get("choices", ())),
            type=_parser_for(f.name),
            help=meta.get("help", "") + extra,
        )
    p.add_argument(
        "--no-verify",
        dest="no_verify",
        action="store_true",
        help="when the default store must be prepared first: accept a CIFAR-10 copy whose md5 "
        "is not the official one (as `convpipe data prepare --no-verify`)",
    )
    p.set_defaults(func=quiet(_train))

    e = subparsers.add_parser(
        "evaluate",
        help="accuracy of a trained run on a split, as a Dask job",
        description="Accuracy of RUN_DIR's final parameters (params.npz) on a split of a store.",
    )
    e.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="run directory written by `convpipe train` or a job; a sweep's: its best trial",
    )
    e.add_argument(
        "--data", metavar="STORE", help="Zarr store (default: the one the run was trained on)"
    )
    e.add_argument(
        "--split", default="test", metavar="test|val|train", help="split to score (default: test)"
    )
    e.add_argument(
        "--workers", type=int, metavar="N", help="worker processes of the embedded cluster"
    )
    e.add_argument("--scheduler", metavar="ADDR", help="address of a running Dask scheduler")
    e.add_argument(
        "--tta",
        default="none",
        choices=TTAS,
        help="test-time augmentation: scores averaged over the image and its mirror (flip), "
        "and over one-pixel shifts of both (flip-translate) (default: none)",
    )
    e.set_defaults(func=quiet(_evaluate))


def _parser_for(name: str):
    def parse(text: str):
        try:
            return parse_value(name, text)
        except TrainingError as exc:  # "setting lr: expected float, ...": argparse names --lr
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"setting {name}: ")) from None

    parse.__name__ = name  # argparse names the option's type in its message
    return parse


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's settings: defaults or, with --resume, the run's saved ones;
    then the options given."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    if given.get("resume"):
        from pipeline.training import resume_config

        return resume_config(given.pop("resume"), **given)
    return TrainConfig(**given).validate()


def _train(args: argparse.Namespace) -> int:
    try:
        return _train_run(args)
    except TrainingError as exc:  # a setting named as the user typed it: --batch-size
        raise TrainingError(in_user_words(str(exc), lambda key: "--" + key)) from None


def _train_run(args: argparse.Namespace) -> int:
    from pipeline.training import train

    config = config_from_args(args)
    if "data" not in vars(args) and not config.resume and not config.scheduler:
        _prepare_default_store(config.data, verify=not getattr(args, "no_verify", False))
    say_if_compiling(config)
    bar = _Progress()
    try:
        summary = train(config, progress=bar)
    except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM: how to go on (pipeline.cli.main)
        if bar.run_dir is not None:
            exc.add_note(
                f" at step {bar.saved}; continue with: convpipe train --resume "
                f"{shlex.quote(bar.run_dir)}"
            )
        raise
    finally:
        bar.close()
    print(_end_line(summary))
    print(f"run directory: {summary['run_dir']}")
    return 0


def _end_line(summary: dict) -> str:
    """The accuracies, then this session's steps, training seconds and images/s (a resumed
    run's earlier sessions are in neither: ``this session``)."""
    acc = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    rate = summary["images_per_s"]
    tta = f" ({summary['tta']})" if summary.get("tta", "none") != "none" else ""
    steps = summary["steps_this_session"]
    workers = count_text(summary["workers"], "worker")
    session = " this session" if steps < summary["steps"] else ""
    return (
        f"train acc {acc(summary['train_acc'])}, val acc {acc(summary['val_acc'])}, "
        f"test acc {acc(summary.get('test_acc'))}{tta}; "
        f"{count_text(steps, 'step')}{session} in {summary['train_seconds']:.1f} s of training, "
        f"{'n/a' if rate is None else f'{rate:,.0f}'} images/s on {workers}"
    )


def _prepare_default_store(store: str, verify: bool = True) -> None:
    """First run on a fresh machine: make the default store as `convpipe data prepare` would
    (CIFAR-10 found in data/ or downloaded), so `convpipe train` alone gets going."""
    from pipeline.cli import build_parser
    from pipeline.data.store import store_state

    if store_state(store) == "complete":
        return
    print(
        f"no complete data store at {store}: preparing it first (convpipe data prepare --out "
        f"{store})",
        file=sys.stderr,
    )
    prepare = build_parser().parse_args(
        ["data", "prepare", "--out", store] + ([] if verify else ["--no-verify"])
    )
    prepare.func(prepare)


def say_if_compiling(config: TrainConfig) -> bool:
    """Say "compiling kernels, first run only ..." on stderr when Numba's cache lacks the
    model's kernels: the embedded cluster's workers would compile them before the first step.
    Silent with --scheduler (the workers' cache is on their hosts). True if it said so."""
    if config.scheduler:
        return False
    from pipeline.warmup import say_if_compiling as say

    norm = None if config.norm == "none" else config.norm
    return say(config.dtype, config.filter_size, norm, layers=config.model)


def _evaluate(args: argparse.Namespace) -> int:
    from pipeline.jobs.sweep import trained_run_dir
    from pipeline.training import evaluate

    run_dir = trained_run_dir(args.run_dir)  # a sweep's run directory: its best trial
    if run_dir != args.run_dir:
        print(f"the sweep's best trial: {run_dir}", file=sys.stderr)

    def progress(event):
        if event["event"] == "start":
            print(
                f"scoring {event['n']} {args.split} images on "
                f"{count_text(event['workers'], 'worker')}"
                + (f"; dashboard {event['dashboard']}" if event.get("dashboard") else ""),
                file=sys.stderr,
            )

    r = evaluate(
        run_dir,
        data=args.data,
        split=args.split,
        scheduler=args.scheduler,
        workers=args.workers,
        progress=progress,
        tta=args.tta,
    )
    print(
        f"{r['split']} accuracy {r['accuracy']:.4f} ({r['correct']}/{r['n']})"
        + (f" with tta {r['tta']}" if r["tta"] != "none" else "")
        + f" in {r['seconds']:.1f} s"
    )
    return 0


def _run_page(run_dir: str) -> str | None:
    """The run's page on the cluster's dashboard (announced to its scheduler), or None."""
    from distributed import default_client

    from pipeline.dashboard import announce_run

    try:
        client = default_client()
    except ValueError:  # no client: train() was given none and made none
        return None
    return announce_run(client, run_dir)


class _Progress:
    """tqdm bar fed by the coordinator's events: step, epoch, loss, images/s, ETA."""

    #: steps the images/s shown is measured over (wall clock, evaluations included)
    RATE_STEPS = 20

    def __init__(self, clock=time.monotonic):
        self.bar, self.clock = None, clock
        self.recent = collections.deque(maxlen=self.RATE_STEPS + 1)  # (time, images) per step
        self.run_dir: str | None = None  # once the run has started
        self.saved = 0  # the step a --resume continues from: the last checkpoint's

    def _rate(self, images: int) -> float | None:
        """Images per second of wall clock over the last steps. A step's own time would not
        do: the step after an evaluation was computed while the coordinator scored, so it
        looked 10 times faster than training runs."""
        self.recent.append((self.clock(), images))
        (t0, _), (t1, _) = self.recent[0], self.recent[-1]
        if len(self.recent) < 2 or t1 <= t0:
            return None
        return sum(n for _, n in list(self.recent)[1:]) / (t1 - t0)

    def __call__(self, event: dict) -> None:
        from tqdm import tqdm

        kind = event["event"]
        if kind == "start":
            self.run_dir, self.saved = event["run_dir"], event["start_step"]
            where = f"dashboard {event['dashboard']}" if event.get("dashboard") else "no dashboard"
            page = _run_page(event["run_dir"]) if event.get("dashboard") else None
            where += f"; this run on the convpipe page {page}" if page else ""
            workers = count_text(event["workers"], "worker")
            print(
                f"training on {workers} ({event['transport']} transport), {where}", file=sys.stderr
            )
            print(f"run directory {event['run_dir']}", file=sys.stderr)
            self.bar = tqdm(
                total=event["total_steps"],
                initial=event["start_step"],
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
            )
        elif kind == "step" and self.bar is not None:
            rate = self._rate(event["n"])
            self.bar.set_postfix_str(
                f"epoch {event['epoch']}, loss {event['loss']:.4f}"
                + ("" if rate is None else f", {rate:,.0f} img/s"),
                refresh=False,
            )
            self.bar.update(1)
        elif kind == "epoch":
            where = (
                f"epoch {event['epoch']} (step {event['step']})"
                if event.get("end_of_epoch", True)
                else f"end of the run at step {event['step']}, in epoch {event['epoch']}"
            )
            self._write(
                f"{where}: train acc {event['train_acc']:.4f}, val acc "
                f"{'n/a' if event['val_acc'] is None else format(event['val_acc'], '.4f')}"
                + ("" if event.get("test_acc") is None else f", test acc {event['test_acc']:.4f}")
            )
        elif kind == "resumed":
            self._write(
                f"resuming at step {event['step']}"
                + (
                    f" from {event['checkpoint']}"
                    if event["checkpoint"]
                    else " (no checkpoint yet)"
                )
            )
        elif kind == "checkpoint":
            self.saved = event["step"]
        elif kind == "warning":
            self._write(f"warning: {event['message']}")
        elif kind == "workers":  # a worker joined or left mid-run
            self._write(event["message"])

    def _write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
