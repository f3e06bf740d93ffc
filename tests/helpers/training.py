"""Small synthetic CIFAR stores and tiny training settings for the distributed-training tests.

The store is written with ``pipeline.data.store``'s writer (the same layout ``convpipe data
prepare`` produces). Its images are learnable: each class is a fixed random colour pattern
plus noise, so a few steps of training move the accuracy well above chance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.store import FORMAT, FORMAT_VERSION, create_layout, finalize_store, write_block
from pipeline.training import TrainConfig

CLASSES = ["c0", "c1", "c2", "c3"]


def make_store(
    path,
    n_train: int = 256,
    n_val: int = 64,
    n_test: int = 64,
    *,
    chunk: int = 64,
    seed: int = 0,
    classes=CLASSES,
) -> Path:
    path = Path(path)
    rng = np.random.default_rng(seed)
    patterns = rng.integers(40, 216, (len(classes), 3, 32, 32)).astype(np.float64)
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    create_layout(path, sizes, chunk, len(classes))
    mean = None
    for split, n in sizes.items():
        y = rng.integers(0, len(classes), n)
        X = np.clip(patterns[y] + rng.normal(0, 50, (n, 3, 32, 32)), 0, 255).astype(np.uint8)
        if n:
            write_block(path, split, 0, X, y)
        if split == "train":
            mean = X.mean(axis=0).astype(np.float32)
    attrs = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "class_names": list(classes),
        "splits": sizes,
        "chunk": chunk,
        "image_shape": [3, 32, 32],
        "source": {"kind": "synthetic"},
    }
    finalize_store(path, attrs, mean)
    return path


#: a model small enough that a step costs milliseconds: 4 filters of 3x3, 16 hidden units
TINY_MODEL = dict(
    batch_size=64,
    shard_size=16,
    num_filters=4,
    filter_size=3,
    hidden_dim=16,
    weight_scale=1e-2,
    lr=1e-2,
    checkpoint_every=2,
    train_acc_samples=64,
)


def tiny_config(store, out, **changes) -> TrainConfig:
    """The :data:`TINY_MODEL` on ``store`` for one epoch, written to ``out``."""
    settings = dict(data=str(store), out=str(out), epochs=1, **TINY_MODEL)
    settings.update(changes)
    return TrainConfig(**settings).validate()


def final_params(run_dir) -> dict[str, np.ndarray]:
    with np.load(Path(run_dir) / "params.npz", allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert np.array_equal(a[k], b[k]), f"{k} differs: max |diff| {np.abs(a[k] - b[k]).max()}"


class Crash(Exception):
    """Stands for the coordinator dying after a step."""


def stop_at(step, exc):
    """A progress callback that raises ``exc`` once step ``step`` is reported."""

    def progress(event):
        if event["event"] == "step" and event["step"] == step:
            raise exc

    return progress


def crash_after(step):
    """The coordinator dies once step ``step`` is reported."""
    return stop_at(step, Crash(step))
