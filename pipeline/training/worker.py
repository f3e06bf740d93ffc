"""The tasks a Dask worker runs: one shard's gradient, one shard's predictions.

A shard task reads its own images from the Zarr store (the coordinator never touches pixel
data), runs the model forward and backward with the current parameters and returns the
shard's *sums*: gradient sum (mean-loss gradient x n), loss sum and count, plus the batch
mean/variance of spatial BN. Sums add up across shards to the global batch's sums in any
grouping, which is what lets the batch be cut into shards independent of the worker count.

The task is a pure function of (parameters, shard indices): Dask may rerun it after a worker
dies and gets the same bits, so a lost shard is recomputed, never dropped or counted twice.
Per process, the model object and the store's decompressed chunks are cached across tasks.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import zlib
from dataclasses import dataclass

import numpy as np

from pipeline.training.transport import STATUS, STATUS_FIELDS, Layout, ShmRef, attach
from pipeline.errors import TrainingError


@dataclass(frozen=True)
class ModelSpec:
    """What a worker needs to build the network (the weights come separately)."""

    num_filters: int
    filter_size: int
    hidden_dim: int
    num_classes: int
    norm: str
    num_groups: int
    dtype: str
    input_dim: tuple[int, int, int] = (3, 32, 32)

    @property
    def normalization(self) -> str | None:
        return None if self.norm == "none" else self.norm

    def build(self, weight_scale: float = 1e-3, reg: float = 0.0, seed: int | None = 0):
        """The network with weights drawn cs231n's way from ``np.random`` seeded with ``seed``
        (the global random state is restored afterwards)."""
        from pipeline.cnn import ThreeLayerConvNet

        saved = np.random.get_state()
        try:
            np.random.seed(seed)
            return ThreeLayerConvNet(
                input_dim=self.input_dim, num_filters=self.num_filters, filter_size=self.filter_size,
                hidden_dim=self.hidden_dim, num_classes=self.num_classes, weight_scale=weight_scale,
                reg=reg, dtype=np.dtype(self.dtype), normalization=self.normalization,
                num_groups=self.num_groups,
            )
        finally:
            np.random.set_state(saved)


@dataclass(frozen=True)
class TaskSpec:
    """Per-run constants of every task (small; pickled with each task)."""

    model: ModelSpec
    store: str
    layout: Layout
    threads: int = 1


# ---- per-process state -----------------------------------------------------------------------------

_LOCAL = threading.local()  # one network per worker thread: a model object holds per-call state


def _model(spec: ModelSpec):
    """This thread's network for ``spec``, built once; reg is 0 (the coordinator adds L2)."""
    models = getattr(_LOCAL, "models", None)
    if models is None:
        models = _LOCAL.models = {}
    model = models.get(spec)
    if model is None:
        models.clear()
        model = models[spec] = spec.build(reg=0.0, seed=0)
    model.reg = 0.0
    return model


def _threads(n: int) -> None:
    import numba

    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    # the worker's event loop shares the GIL with this task thread: hand it over quickly so
    # a task waiting for parameters, or a finished task's result, is not held up for 5 ms
    if sys.getswitchinterval() > 5e-4:
        sys.setswitchinterval(5e-4)


def _params(spec: TaskSpec, params, version: int | None):
    """The parameter views for this task: from shared memory (checking the version) or an array."""
    if isinstance(params, ShmRef):
        shm = attach(params)
        if version is not None:
            shm.wait_for(version)
        return shm, shm.param_views
    return None, spec.layout.views(params)


# ---- tasks ------------------------------------------------------------------------------------------

def shard_gradient(spec: TaskSpec, params, version: int, slot: int, indices: np.ndarray) -> dict:
    """Gradient sums of one shard of a step.

    ``params`` is a :class:`ShmRef` (the gradient sum is written into shared slot ``slot``
    and the result carries only statistics) or the flat parameter vector (the result carries
    the flat gradient sum under ``"grad"``).
    """
    _threads(spec.threads)
    from pipeline.data import open_store

    t0, arrived = time.perf_counter(), time.time()
    X, y = open_store(spec.store).read("train", indices, dtype=spec.model.dtype, cache=True)
    tw = time.perf_counter()
    shm, views = _params(spec, params, version)     # may wait for the coordinator's update
    t1 = time.perf_counter()
    model = _model(spec.model)
    model.params = dict(views)
    if model.bn_param:
        model.bn_param["mode"] = "train"
    loss, grads = model.loss(X, y)
    t2 = time.perf_counter()

    n = len(y)
    dt = np.dtype(spec.model.dtype).type
    if shm is not None and int(shm.version[0]) != version:
        # a duplicate run of a task whose step is over (the coordinator has moved on): the
        # slot belongs to a newer step now, so write nothing
        raise TrainingError(f"shard {slot} of step {version} finished after its step was reduced")
    out = shm.grads[slot] if shm is not None else np.empty(spec.layout.size, dtype=spec.model.dtype)
    for name, view in spec.layout.views(out).items():
        np.multiply(grads[name], dt(n), out=view)
    t3 = time.perf_counter()

    stats = model.last_batch_stats if spec.model.norm == "spatial_batchnorm" else None
    result = {
        "slot": slot,
        "n": n,
        "loss_sum": float(loss) * n,
        "bn_mean": None if stats is None else np.asarray(stats["mean"]),
        "bn_var": None if stats is None else np.asarray(stats["var"]),
        "read_s": tw - t0,
        "wait_s": t1 - tw,
        "compute_s": t2 - t1,
        "write_s": t3 - t2,
        "begin": time.time() - (t3 - t1),   # wall clock (same host: comparable with the coordinator's)
        "end": time.time(),
        "arrived": arrived,
        "worker": _worker_name(),
    }
    if shm is None:
        result["grad"] = out
    else:
        _write_status(shm.status[slot], result, version)
    return result


def _write_status(record: np.ndarray, result: dict, version: int) -> None:
    """The shard's statistics into its shared status record, ``done = version`` last."""
    for i, name in enumerate(STATUS[1:], start=1):
        if name == "worker":
            record[i] = zlib.crc32(result["worker"].encode())
        elif name == "has_bn":
            record[i] = result["bn_mean"] is not None
        else:
            record[i] = result[name]
    if result["bn_mean"] is not None:
        c = len(result["bn_mean"])
        record[STATUS_FIELDS:STATUS_FIELDS + c] = result["bn_mean"]
        record[STATUS_FIELDS + c:STATUS_FIELDS + 2 * c] = result["bn_var"]
    record[0] = version


def read_status(record: np.ndarray, slot: int, dtype) -> dict:
    """The coordinator's side of :func:`_write_status`."""
    r = {name: float(record[i]) for i, name in enumerate(STATUS)}
    r["n"], r["slot"], r["worker"] = int(r["n"]), slot, int(r["worker"])
    if r.pop("has_bn"):
        c = (len(record) - STATUS_FIELDS) // 2
        r["bn_mean"] = record[STATUS_FIELDS:STATUS_FIELDS + c].astype(dtype)
        r["bn_var"] = record[STATUS_FIELDS + c:STATUS_FIELDS + 2 * c].astype(dtype)
    else:
        r["bn_mean"] = r["bn_var"] = None
    return r


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return f"pid-{os.getpid()}"


def warm_up(spec: TaskSpec, params, n_train: int) -> float:
    """Prepare a worker before the timed steps: decompress the training images it will read
    into the store's cache, build the network and run it once (loads Numba's compiled kernels)."""
    t0 = time.perf_counter()
    _threads(spec.threads)
    from pipeline.data import open_store

    store = open_store(spec.store)
    chunk = store.chunks["train"]
    store.read_uint8("train", np.unique(np.r_[np.arange(0, n_train, chunk), n_train - 1]), cache=True)
    X, y = store.read("train", np.arange(min(2, n_train)), dtype=spec.model.dtype)
    _, views = _params(spec, params, None)
    model = _model(spec.model)
    model.params = dict(views)
    if model.bn_param:
        model.bn_param["mode"] = "train"
    model.loss(X, y)
    return time.perf_counter() - t0


def add_results(a: dict, b: dict) -> dict:
    """One node of the fixed gradient tree over TCP: adds the flat gradient sums, keeps the stats."""
    merged = {"grad": np.add(a["grad"], b["grad"])}
    merged["stats"] = _stats(a) + _stats(b)
    return merged


def strip_gradient(result: dict) -> list[dict]:
    """The statistics of a (tree of) shard results, without the gradient (runs on the worker)."""
    return _stats(result)


def _stats(r: dict) -> list[dict]:
    if "stats" in r:
        return list(r["stats"])
    return [{k: v for k, v in r.items() if k != "grad"}]


def shard_predictions(spec: TaskSpec, params, bn: dict | None, split: str, indices: np.ndarray) -> dict:
    """Test-mode accuracy counts of one shard of ``split`` (BN uses the running statistics ``bn``)."""
    _threads(spec.threads)
    from pipeline.data import open_store

    X, y = open_store(spec.store).read(split, indices, dtype=spec.model.dtype, cache=True)
    _, views = _params(spec, params, None)
    model = _model(spec.model)
    model.params = dict(views)
    if model.bn_param:
        model.set_state({"running_mean": bn["running_mean"], "running_var": bn["running_var"]})
    scores = model.loss(X)
    pred = np.argmax(scores, axis=1)
    return {"correct": int((pred == y).sum()), "n": int(len(y))}
