"""``convpipe evaluate``: the accuracy of a finished run on a split, as a Dask job.

The run's final parameters (``params.npz``, BN running statistics included) are scattered
to every worker once; each shard of the split is a task that reads its own images from the
store and counts correct test-mode predictions.
"""

from __future__ import annotations

import time

import numpy as np
from distributed import as_completed

from pipeline.augment import TTAS
from pipeline.cluster import worker_cluster, worker_count
from pipeline.cnn import ModelSpec
from pipeline.data import open_store
from pipeline.errors import DataError, TrainingError
from pipeline.training.config import TrainConfig
from pipeline.training.plan import Layout
from pipeline.training.rundir import RunDir
from pipeline.training.shards import cut
from pipeline.training.worker import EVAL_SHARD, TaskSpec, shard_predictions


def evaluate(
    run_dir: str,
    data: str | None = None,
    split: str = "test",
    client=None,
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    shard_size: int = EVAL_SHARD,
    progress=None,
    tta: str = "none",
) -> dict:
    """Accuracy of the run in ``run_dir`` on ``split`` of ``data`` (default: the run's store),
    scoring the views of test-time augmentation ``tta`` (none, flip, flip-translate).

    Returns ``{"split", "accuracy", "correct", "n", "tta", "seconds", "workers", "run_dir",
    "data"}``.
    """
    if tta not in TTAS:
        raise TrainingError(f"unknown tta {tta!r}: expected one of {', '.join(TTAS)}")
    emit = progress or (lambda event: None)
    run = RunDir(run_dir).require_existing()
    config = TrainConfig.load(run.config_path)
    params, bn = run.read_params()
    store = open_store(data or config.data)
    if split not in store.splits:
        raise DataError(f"{store.path}: no split {split!r} (it has {', '.join(store.splits)})")
    size = store.splits[split]
    if size < 1:
        raise DataError(f"{store.path}: split {split!r} is empty")

    mspec = ModelSpec.of(config, len(store.class_names))
    expected = Layout.of(mspec.build(weight_scale=config.weight_scale, seed=0).params)
    if set(params) != set(expected.names):
        raise TrainingError(
            f"{run.params_path}: parameters {sorted(params)} do not match the run's model "
            f"({sorted(expected.names)})"
        )
    for name, shape in zip(expected.names, expected.shapes):
        if params[name].shape != shape:
            raise TrainingError(
                f"{run.params_path}: {name} has shape {params[name].shape}, the model needs {shape}"
            )
    flat = expected.flatten(params)
    bn_state = (
        {"running_mean": bn["bn_running_mean"], "running_var": bn["bn_running_var"]} if bn else None
    )
    if mspec.bn_channels and bn_state is None:
        raise TrainingError(
            f"{run.params_path}: no BN running statistics for a spatial-batchnorm model"
        )
    spec = TaskSpec(mspec, store.path, expected, 1)

    t0 = time.perf_counter()
    with worker_cluster(client, scheduler, workers) as client:
        emit(
            {
                "event": "start",
                "split": split,
                "n": size,
                "workers": worker_count(client),
                "dashboard": getattr(client, "dashboard_link", None),
            }
        )
        params_future = client.scatter(flat, broadcast=True, hash=False)
        shards = cut(np.arange(size, dtype=np.int64), shard_size)
        futures = [
            client.submit(
                shard_predictions, spec, params_future, bn_state, split, idx, tta, pure=False
            )
            for idx in shards
        ]
        correct = n = 0

        for fut in as_completed(futures):
            r = fut.result()
            correct += r["correct"]
            n += r["n"]
            emit({"event": "shard", "n": r["n"], "done": n, "total": size})
        nworkers = worker_count(client)
    return {
        "split": split,
        "accuracy": correct / n,
        "correct": correct,
        "n": n,
        "tta": tta,
        "seconds": time.perf_counter() - t0,
        "workers": nworkers,
        "run_dir": str(run.path),
        "data": store.path,
    }
