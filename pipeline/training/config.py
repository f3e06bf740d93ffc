"""Every setting of a training run, typed and validated in one place.

``convpipe train`` builds its options from these fields, job specs (TOML) and
``--set key=value`` are checked against them, and a run directory records them in
``config.json`` so that ``--resume`` continues with exactly the same settings.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.atomic import atomic_write_text
from pipeline.augment import FLIPS, TTAS
from pipeline.errors import TrainingError
from pipeline.netspec import NetSpec, NetSpecError
from pipeline.options import ValueType, WrongType, field_types, worker_range
from pipeline.training.update import OPTIMIZERS, SCHEDULES, UpdateRule

NORMS = ("none", "spatial_batchnorm", "groupnorm")
DTYPES = ("float32", "float64")
TRANSPORTS = ("auto", "shm", "tcp")
#: what a spec's network is checked against before a run (CIFAR-10's images and classes; the
#: run checks again with its store's)
INPUT_DIM, NUM_CLASSES = (3, 32, 32), 10

#: settings that do not change the numbers a run produces: they may differ on ``--resume``
RUNTIME_FIELDS = (
    "workers",
    "scheduler",
    "out",
    "resume",
    "transport",
    "threads_per_worker",
    "data",
    "stall_timeout",
    "tta",  # how the test split is scored at the end, not what is trained
    "test_each_epoch",  # scored off the run's clock; what is trained stays the same
)


def _opt(default, help: str, metavar: str | None = None, choices: tuple | None = None):
    meta = {"help": help}
    if metavar:
        meta["metavar"] = metavar
    if choices:
        meta["choices"] = choices
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Settings of ``convpipe train`` (one field per command-line option, same names)."""

    # data and cluster
    data: str = _opt("data/cifar10.zarr", "Zarr store made by `convpipe data prepare`", "STORE")
    workers: int | str | None = _opt(
        None,
        "worker processes of the embedded cluster (default: one per core); MIN:MAX starts MIN "
        "and lets Dask's adaptive scaling add and retire workers up to MAX while the run trains",
        "N|MIN:MAX",
    )
    scheduler: str | None = _opt(
        None, "address of a running Dask scheduler instead of the embedded cluster", "ADDR"
    )
    threads_per_worker: int = _opt(
        1, "threads per worker of the embedded cluster (Numba and BLAS)", "T"
    )
    transport: str = _opt(
        "auto",
        "parameter/gradient exchange: shared memory when all workers share this host (auto), or "
        "tcp",
        choices=TRANSPORTS,
    )
    # schedule
    epochs: int = _opt(1, "passes over the training split", "E")
    steps: int | None = _opt(None, "stop after this many steps in total (overrides --epochs)", "S")
    batch_size: int = _opt(256, "global batch: images per step, over all workers", "B")
    shard_size: int = _opt(128, "images per shard task; must divide the batch size", "S")
    train_limit: int | None = _opt(None, "train on the first N images of the train split only", "N")
    seed: int = _opt(0, "seed of the initial weights and of every epoch's data order", "SEED")
    # augmentation of the training images (pipeline.augment), drawn from (seed, epoch, image)
    flip: str = _opt(
        "none",
        "horizontal flips: none, random (each image, each epoch), or alternate (random in the "
        "first epoch, then the other way each epoch)",
        choices=FLIPS,
    )
    translate: int = _opt(
        0, "shift each image by up to N pixels each way (a crop of the image reflect-padded)", "N"
    )
    # optimizer (pipeline.training.update)
    optimizer: str = _opt("adam", "adam, or sgd (with momentum)", choices=OPTIMIZERS)
    lr: float = _opt(1e-3, "learning rate (the peak of a schedule)", "LR")
    momentum: float = _opt(0.9, "SGD's momentum", "M")
    nesterov: bool = _opt(True, "SGD's momentum is Nesterov's", "true|false")
    weight_decay: float = _opt(
        0.0, "decoupled weight decay: w -= lr_t * weight_decay * w each step (AdamW, SGDW)", "WD"
    )
    schedule: str = _opt(
        "constant",
        "learning-rate schedule: constant, triangular (up to lr at --warmup, down to "
        "--end-factor), cosine (the same with a cosine down), step (x0.1 at 1/2 and 3/4)",
        choices=SCHEDULES,
    )
    warmup: float = _opt(0.0, "fraction of the run rising from --start-factor * lr to lr", "P")
    start_factor: float = _opt(1.0, "lr multiplier at the first step of a warmup", "F")
    end_factor: float = _opt(0.0, "lr multiplier at the last step (triangular, cosine)", "F")
    norm_lr_factor: float = _opt(
        1.0, "learning-rate multiplier of the norms' gammas and betas (airbench: 64)", "F"
    )
    ema: float = _opt(
        0.0,
        "keep a moving average of the weights, avg = ema * avg + (1 - ema) * w after each step "
        "(--optimizer sgd; 0: none): the run is scored and saved with the average",
        "D",
    )
    lookahead: int = _opt(
        0,
        "every K steps pull the weights to a slow copy, airbench94's lookahead: avg = a * avg + "
        "(1 - a) * w, then w = avg, with a = 0.95**K * (t / steps)**3 after step t; the run ends "
        "on the slow copy (--optimizer sgd; 0: none)",
        "K",
    )
    muon_lr: float = _opt(
        0.0,
        "train the conv filters with Muon at this learning rate (the schedule's peak): each "
        "step the filter's momentum (Nesterov's with --nesterov), orthogonalized by a "
        "Newton-Schulz iteration, "
        "after the filter is scaled to norm sqrt(its filters) (airbench94_muon: 0.24); the "
        "other parameters take --optimizer sgd (0: off)",
        "LR",
    )
    muon_momentum: float = _opt(0.6, "Muon's momentum (airbench94_muon: 0.6)", "M")
    whiten_bias_epochs: int | None = _opt(
        None,
        "the whitening conv's bias trains for the first N epochs, then stays as it is, its "
        "backward pass no longer computed (airbench: 3; default: the whole run)",
        "N",
    )
    reg: float = _opt(
        1e-3, "L2 regularization strength (0.5 * reg * sum W**2, added once per step)", "REG"
    )
    # model
    model: str | None = _opt(
        None,
        "the network as a list of layers, e.g. 'conv 64 3, bn, relu, pool 2, gap, affine' "
        "(pipeline.netspec; default: ThreeLayerConvNet from --norm, --num-filters, "
        "--filter-size, --hidden-dim and --weight-scale, which a spec does not use)",
        "SPEC",
    )
    norm: str = _opt("none", "normalization after the conv layer", choices=NORMS)
    num_groups: int = _opt(4, "groups of group normalization", "G")
    num_filters: int = _opt(32, "conv filters", "F")
    filter_size: int = _opt(7, "conv filter size (odd)", "K")
    hidden_dim: int = _opt(500, "hidden units of the affine layer", "H")
    weight_scale: float = _opt(1e-3, "standard deviation of the initial weights", "STD")
    dtype: str = _opt("float32", "dtype of parameters and activations", choices=DTYPES)
    # outputs
    out: str | None = _opt(None, "run directory (default: runs/<date>-<time>)", "RUN_DIR")
    checkpoint_every: int = _opt(
        100, "write a checkpoint every K steps (and after each epoch)", "K"
    )
    resume: str | None = _opt(
        None, "continue the run in RUN_DIR from its last good checkpoint", "RUN_DIR"
    )
    train_acc_samples: int = _opt(
        1000, "training images scored for train accuracy after each epoch", "N"
    )
    eval_every: int | None = _opt(
        None,
        "score accuracy on a sample of val and train images every K steps "
        "(default: about 10 times a run)",
        "K",
    )
    eval_samples: int = _opt(250, "val and train images scored at each --eval-every point", "N")
    test_each_epoch: bool = _opt(
        False,
        "also score the whole test split after each epoch (no test-time augmentation), off the "
        "training clock: each epoch's test accuracy in metrics.jsonl and the curves",
        "true|false",
    )
    tta: str = _opt(
        "none",
        "test-time augmentation of the test split's score at the end: none, flip (the image and "
        "its mirror), flip-translate (and one-pixel shifts of both)",
        choices=TTAS,
    )
    stall_timeout: float = _opt(
        300.0,
        "stop with an error when a step makes no progress for this many seconds "
        "(every worker gone, a task that cannot be placed)",
        "SECONDS",
    )

    # ---- validation -------------------------------------------------------------------------
    def validate(self) -> TrainConfig:
        """Check types and ranges; raise :class:`TrainingError` naming the setting. Returns self."""
        for name, vtype in _field_types().items():
            value = getattr(self, name)
            if not vtype.accepts(value):
                raise TrainingError(
                    f"setting {name}: expected {vtype.name()}, got {value!r} "
                    f"({type(value).__name__})"
                )
        for name in (
            "epochs",
            "batch_size",
            "shard_size",
            "num_groups",
            "num_filters",
            "filter_size",
            "hidden_dim",
            "checkpoint_every",
            "threads_per_worker",
            "train_acc_samples",
            "eval_samples",
        ):
            if getattr(self, name) < 1:
                raise TrainingError(f"{name} must be >= 1, got {getattr(self, name)}")
        try:
            size = worker_range(self.workers)
        except ValueError as exc:
            raise TrainingError(f"workers: {exc}") from None
        if size is not None and size[1] is None:
            self.workers = size[0]  # "4" is 4
        for name in ("steps", "train_limit", "eval_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise TrainingError(f"{name} must be >= 1, got {value}")
        if self.batch_size % self.shard_size:
            raise TrainingError(
                f"shard_size {self.shard_size} does not divide batch_size {self.batch_size}"
                f" (the global batch is cut into equal shards)"
            )
        if not 0 <= self.translate <= 8:
            raise TrainingError(f"translate must be in [0, 8] pixels, got {self.translate}")
        for name, allowed in (
            ("norm", NORMS),
            ("dtype", DTYPES),
            ("transport", TRANSPORTS),
            ("flip", FLIPS),
            ("tta", TTAS),
        ):
            if getattr(self, name) not in allowed:
                raise TrainingError(
                    f"unknown {name} {getattr(self, name)!r}: expected one of {', '.join(allowed)}"
                )
        if self.norm == "groupnorm" and self.num_filters % self.num_groups:
            raise TrainingError(
                f"num_groups {self.num_groups} does not divide num_filters {self.num_filters}"
            )
        if self.filter_size % 2 == 0:
            raise TrainingError(
                f"filter_size must be odd (the conv keeps the image size), got {self.filter_size}"
            )
        if not self.lr > 0 or self.lr != self.lr:
            raise TrainingError(f"lr must be > 0, got {self.lr}")
        problem = UpdateRule.of(self, 1).problem()
        if problem:
            raise TrainingError(problem)
        if not self.norm_lr_factor > 0:
            raise TrainingError(f"norm_lr_factor must be > 0, got {self.norm_lr_factor}")
        if not self.stall_timeout > 0:
            raise TrainingError(f"stall_timeout must be > 0 seconds, got {self.stall_timeout}")
        if not self.reg >= 0:
            raise TrainingError(f"reg must be >= 0, got {self.reg}")
        if not self.weight_scale > 0:
            raise TrainingError(f"weight_scale must be > 0, got {self.weight_scale}")
        body = ()  # the spec network's layers (none: the three-layer net)
        if self.model is not None:
            if not self.model.strip():  # not the three-layer net: that is no model at all
                raise TrainingError(
                    "model: empty network spec (leave it out for the three-layer net, or list "
                    "the layers: 'conv 64 3, bn, relu, pool 2, gap, affine')"
                )
            try:
                net = NetSpec.from_text(self.model)
                net.shapes(INPUT_DIM, NUM_CLASSES)
            except NetSpecError as exc:
                raise TrainingError(str(exc)) from None
            self.model = net.to_text()  # one spelling: config.json and --resume compare it
            body = net.body
        if self.muon_lr and self.model is not None:
            if not any(layer.kind == "conv" and layer.init != "whiten" for layer in body):
                raise TrainingError(
                    "muon_lr: the model has no conv filters that train (Muon updates those)"
                )
        if self.whiten_bias_epochs is not None:
            if self.whiten_bias_epochs < 0:
                raise TrainingError(
                    f"whiten_bias_epochs must be >= 0, got {self.whiten_bias_epochs}"
                )
            if not any(layer.init == "whiten" for layer in body):
                raise TrainingError(
                    "whiten_bias_epochs: the model has no whitening conv (a first conv with "
                    "init=whiten)"
                )
            if self.ema:  # a frozen parameter's average stays where it was (update.py)
                raise TrainingError(
                    "whiten_bias_epochs and ema: the average would keep the bias's average from "
                    "before it froze; use lookahead"
                )
        if self.workers is not None and self.scheduler:
            raise TrainingError(
                "workers and scheduler exclude each other: the scheduler's cluster has its own "
                "workers"
            )
        return self

    # ---- conversions --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_job(cls, options: dict) -> TrainConfig:
        """The settings of a train job's options (a sweep trial's too): the job trains on the
        cluster it was sent to, so it has no scheduler of its own."""
        return cls.from_dict({**options, "scheduler": None})

    @classmethod
    def from_dict(cls, mapping: dict) -> TrainConfig:
        """Build and validate from a mapping (job spec, ``config.json``);
        unknown keys are errors."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(mapping) - names)
        if unknown:
            raise TrainingError(
                f"unknown training setting {unknown[0]!r} (known: {', '.join(sorted(names))})"
            )
        types_ = _field_types()
        values = {k: _coerce_number(types_[k], v) for k, v in mapping.items()}
        return cls(**values).validate()

    def replace(self, **changes) -> TrainConfig:
        """A validated copy with ``changes`` applied (unknown names are errors)."""
        return type(self).from_dict({**self.to_dict(), **changes})

    def save(self, path: str | Path) -> None:
        """Write ``config.json`` atomically
        (rewritten on every resume: never left torn or empty)."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        try:
            mapping = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise TrainingError(f"{path}: no such file (not a convpipe run directory?)") from None
        except (OSError, ValueError) as exc:
            raise TrainingError(f"{path}: unreadable run settings: {exc}") from None
        if not isinstance(mapping, dict):
            raise TrainingError(f"{path}: run settings must be a JSON object")
        return cls.from_dict(mapping)

    def train_limit_problem(self, n_train: int) -> str | None:
        """Why these settings cannot train on a store of ``n_train`` training images (train_limit
        larger than that), in one line; None if they can. :func:`pipeline.training.train` raises
        it, and a sweep refuses a plan whose every trial has one before any trial starts."""
        if self.train_limit is not None and self.train_limit > n_train:
            return (
                f"train_limit {self.train_limit} exceeds the {n_train} training images of "
                f"{self.data}"
            )
        return None

    def result_settings(self) -> dict:
        """The settings that determine the trained numbers
        (everything but where and how it runs)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}


def parse_value(name: str, text: str):
    """Parse ``text`` (from ``--set name=text``) into the type of field ``name``."""
    types_ = _field_types()
    if name not in types_:
        raise TrainingError(
            f"unknown training setting {name!r} (known: {', '.join(sorted(types_))})"
        )
    try:
        return types_[name].parse(text)
    except WrongType:
        raise TrainingError(
            f"setting {name}: expected {types_[name].name()}, got {text!r}"
        ) from None


# ---- helpers ------------------------------------------------------------------------------------


@functools.cache
def _field_types() -> dict[str, ValueType]:
    return field_types(TrainConfig)


def _coerce_number(vtype: ValueType, value):
    """Accept an int where a float is expected (``lr = 1`` in TOML); nothing else is converted."""
    try:
        return vtype.convert(value)
    except WrongType:
        return value  # validate() names the setting and the type


def in_user_words(message: str, spell=lambda key: key) -> str:
    """``message`` with each multi-word setting's field name (``batch_size``) spelt as the user
    types it: ``spell("batch-size")``, e.g. ``--batch-size`` on the command line, ``batch-size``
    in a job spec. One-word names (lr, seed) read the same either way and are left alone, but
    for the one a message starts with as its subject (``model: empty network spec``)."""
    for f in dataclasses.fields(TrainConfig):
        if "_" in f.name:
            message = re.sub(rf"\b{f.name}\b", spell(f.name.replace("_", "-")), message)
        elif message.startswith(f"{f.name}: "):
            message = spell(f.name) + message[len(f.name) :]
    return message
