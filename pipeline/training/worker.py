"""The tasks a Dask worker runs: one part of a step, one shard's predictions.

A part task (one per worker and step, :mod:`pipeline.training.plan`) reads the images of its
shards from the Zarr store (the coordinator never touches pixel data), runs the model forward
and backward on each shard with the step's parameters and sums the shards' gradient *sums*
(mean-loss gradient x n) into its tree nodes. Then it finishes the tree for its slice of the
parameters from every part's nodes, adds L2 and applies Adam. It returns each shard's loss
sum, count and spatial-BN batch moments, and its slice's L2 sums: small numbers only.

Shards stay the unit of determinism: each is computed alone, whatever part it falls in. A part
task is a pure function of (state of the step, shard indices): Dask may run it again after a
worker dies and it gives the same bits; with shared memory it also finds what its first run
already wrote. Per process, the model object and the store's decompressed chunks are cached.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import os
import sys
import threading
import time
import zlib
from dataclasses import dataclass

import numpy as np
from distributed import get_worker

from pipeline._kernels.threads import set_threads
from pipeline.cnn import ModelSpec
from pipeline.data import open_store
from pipeline.errors import TrainingError
from pipeline.training.plan import CHUNK, StepPlan, children, covers
from pipeline.training.reduce import adam_scalars, tree_adam, warm_kernels
from pipeline.training.transport import (
    SHARD_FIELDS,
    SHARD_HEAD,
    Layout,
    ShmRef,
    attach,
    record_is,
    write_record,
)


@dataclass(frozen=True)
class TaskSpec:
    """Per-run constants of every task (small; pickled with each task)."""

    model: ModelSpec
    store: str
    layout: Layout
    threads: int = 1
    segments: tuple[tuple[int, int, float], ...] = ()  # (start, stop, reg) of each parameter
    lr: float = 1e-3
    timeout: float = 600.0  # longest wait for other tasks, seconds


@dataclass(frozen=True)
class ShmParams:
    """The parameters of a step in shared memory: state copy ``parity`` of the run ``ref``."""

    ref: ShmRef
    parity: int


#: images per accuracy task (evaluation during training and ``convpipe evaluate``)
EVAL_SHARD = 500


# ---- per-process state -----------------------------------------------------------------------------

_NETWORKS: collections.OrderedDict = collections.OrderedDict()  # spec -> idle networks, newest last
_NETWORKS_LOCK = threading.Lock()
_SPECS_KEPT = 2  # runs whose networks stay built


@contextlib.contextmanager
def _network(spec: ModelSpec):
    """A network for ``spec`` for one task, reg 0 (the L2 term is added with the update). Built
    once per process and reused by later tasks, whatever thread runs them (a task that left the
    thread pool while it waited comes back on another); two tasks at once get two networks,
    since a model object holds per-call state."""
    with _NETWORKS_LOCK:
        idle = _NETWORKS.setdefault(spec, [])
        _NETWORKS.move_to_end(spec)
        while len(_NETWORKS) > _SPECS_KEPT:
            _NETWORKS.popitem(last=False)
        model = idle.pop() if idle else None
    if model is None:
        model = spec.build(reg=0.0, seed=0)
    model.reg = 0.0
    try:
        yield model
    finally:
        with _NETWORKS_LOCK:
            _NETWORKS.setdefault(spec, []).append(model)


# glibc's mallopt parameters (<malloc.h>)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOC_KEEP = 32 << 20  # the largest mmap threshold glibc accepts; above every per-step array


@functools.cache
def keep_freed_memory() -> bool:
    """Let this process's malloc reuse freed memory instead of returning it to the system at
    once; True when done (glibc), False elsewhere. Once per process.

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, and glibc then stops
    raising its mmap threshold as it would: every array above 128 kB (a step allocates its 16 MB
    gradients and activations afresh) is a new mapping whose pages fault in one by one, then
    unmapped when freed. A step of 128 images took 124 ms instead of 96 ms. Here arrays up to
    32 MB (glibc's largest mmap threshold) come from the heap, and up to 256 MB of freed memory
    per arena stays for the next step (more resident memory, as Dask's monitor sees it). Larger
    arrays (a float32 network past about 8M parameters) are still mapped afresh each time."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MALLOC_KEEP)) and bool(
        mallopt(_M_TRIM_THRESHOLD, 8 * _MALLOC_KEEP)
    )


def _task_setup(n: int) -> None:
    """What every task does first: keep freed memory (once per process), Numba threads = ``n``."""
    keep_freed_memory()
    set_threads(n)
    # the worker's event loop shares the GIL with this task thread: hand it over quickly so
    # a task waiting for parameters, or a finished task's result, is not held up for 5 ms
    if sys.getswitchinterval() > 5e-4:
        sys.setswitchinterval(5e-4)


def _params(spec: TaskSpec, params) -> dict[str, np.ndarray]:
    """Parameter views: from shared memory, the tcp transport's slices, or a flat vector."""
    if isinstance(params, ShmParams):
        return spec.layout.views(attach(params.ref).state[params.parity][0])
    if isinstance(params, (list, tuple)):
        params = np.concatenate(params)
    return spec.layout.views(params)


# ---- one part of a step ----------------------------------------------------------------------------


def _read_shards(
    spec: TaskSpec, shards: list[np.ndarray]
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    store, out = open_store(spec.store), []
    for idx in shards:
        t0 = time.perf_counter()
        X, y = store.read("train", idx, dtype=spec.model.dtype, cache=True)
        out.append((X, y, time.perf_counter() - t0))
    return out


def _compute_nodes(
    spec: TaskSpec, views: dict, plan: StepPlan, part: int, data: list, alloc, free
) -> tuple[list, list]:
    """The part's tree nodes: each shard's gradient sum computed alone, then summed along the
    tree (:func:`pipeline.training.plan.frontier`). ``alloc(node)`` gives the array (P,) a node
    is written to, ``free(array)`` takes back a temporary. Returns (nodes' arrays, shard stats)."""
    first = plan.parts[part][0]
    dt = np.dtype(spec.model.dtype).type
    stats: list[dict] = [None] * len(data)

    def leaf(i, out, add):
        """Shard i's (mean-loss gradient) x n written to out, or added to it when ``add``."""
        X, y, read_s = data[i - first]
        t0, begin = time.perf_counter(), time.time()
        n = len(y)
        loss, _ = model.loss(X, y, into=spec.layout.views(out), scale=dt(n), accumulate=add)
        bn = model.last_batch_stats if spec.model.norm == "spatial_batchnorm" else None
        stats[i - first] = {
            "n": n,
            "loss_sum": float(loss) * n,
            "read_s": read_s,
            "compute_s": time.perf_counter() - t0,
            "begin": begin,
            "end": time.time(),
            "bn_mean": None if bn is None else np.asarray(bn["mean"]),
            "bn_var": None if bn is None else np.asarray(bn["var"]),
        }

    def value(node, out):
        level, i = node
        if level == 0:
            leaf(i, out, add=False)
            return
        left, *right = children(node, plan.k)
        value(left, out)
        if not right:
            return
        if right[0][0] == 0:  # node = left + a leaf: added as the leaf is computed
            leaf(right[0][1], out, add=True)
        else:  # node = left + right, the fixed tree's addition
            tmp = alloc(right[0])
            value(right[0], tmp)
            np.add(out, tmp, out=out)
            free(tmp)

    nodes = []
    with _network(spec.model) as model:
        model.params = dict(views)
        if model.bn_param:
            model.bn_param["mode"] = "train"
        for node in plan.frontier(part):
            out = alloc(node)
            value(node, out)
            nodes.append(out)
    return nodes, stats


def _pack(st: dict, channels: int) -> np.ndarray:
    fields = np.zeros(SHARD_HEAD - 1 + 2 * channels)
    for i, name in enumerate(SHARD_FIELDS):
        if name == "worker":
            fields[i] = zlib.crc32(_worker_name().encode())
        elif name == "has_bn":
            fields[i] = st["bn_mean"] is not None
        else:
            fields[i] = st[name]
    if st["bn_mean"] is not None:
        fields[SHARD_HEAD - 1 : SHARD_HEAD - 1 + channels] = st["bn_mean"]
        fields[SHARD_HEAD - 1 + channels :] = st["bn_var"]
    return fields


def _unpack(record: np.ndarray, slot: int, channels: int, dtype) -> dict:
    r = {name: float(record[1 + i]) for i, name in enumerate(SHARD_FIELDS)}
    r["n"], r["slot"], r["worker"] = int(r["n"]), slot, int(r["worker"])
    has_bn = r.pop("has_bn")
    r["bn_mean"] = record[SHARD_HEAD : SHARD_HEAD + channels].astype(dtype) if has_bn else None
    r["bn_var"] = (
        record[SHARD_HEAD + channels : SHARD_HEAD + 2 * channels].astype(dtype) if has_bn else None
    )
    return r


def _scalars(spec: TaskSpec, adam_t: int) -> tuple:
    return adam_scalars({"learning_rate": spec.lr, "t": adam_t - 1}, spec.model.dtype)


def shm_part(
    spec: TaskSpec,
    ref: ShmRef,
    step: int,
    plan: StepPlan,
    part: int,
    shards: list[np.ndarray],
    batch: int,
    adam_t: int,
    prev_width: int,
) -> dict:
    """Part ``part`` of ``step`` over shared memory: compute its shards into its tree nodes (in
    their gradient slots), wait for every part's nodes, then reduce, L2 and Adam on its slice
    (state copy ``step % 2`` in, the other out). A second run of the same task (its worker died)
    skips what the first run's records show done, and returns the same numbers."""
    _task_setup(spec.threads)
    shm, par, t0 = attach(ref), step % 2, time.perf_counter()
    (a, b), (lo, hi) = plan.parts[part], plan.slices[part]
    records = shm.shards[par]
    timing = {"read_s": 0.0, "wait_s": 0.0, "compute_s": 0.0, "reduce_s": 0.0, "sync_s": 0.0}
    if not all(record_is(records[i], step) for i in range(a, b)):
        data = _read_shards(spec, shards)
        timing["read_s"] = sum(d[2] for d in data)
        timing["wait_s"] = shm.wait(
            lambda: all(record_is(shm.slices[1 - par][j], step - 1) for j in range(prev_width)),
            f"the parameters of step {step + 1}",
            spec.timeout,
        )
        if any(record_is(shm.slices[par][j], step) for j in range(plan.width)):
            raise TrainingError(f"part {part} of step {step + 1} ran after its step was reduced")
        tc = time.perf_counter()
        _, stats = _compute_nodes(
            spec,
            spec.layout.views(shm.state[par][0]),
            plan,
            part,
            data,
            alloc=lambda node: shm.slots[covers(node, plan.k)[0]],
            free=lambda tmp: None,
        )
        for i, st in zip(range(a, b), stats):
            write_record(records[i], step, _pack(st, ref.channels))
        timing["compute_s"] = time.perf_counter() - tc
    # reduce-scatter: this part's slice from every part's nodes, once all are written
    timing["sync_s"] = shm.wait(
        lambda: all(record_is(records[i], step) for i in range(plan.k)),
        f"the other workers' gradients of step {step + 1}",
        spec.timeout,
    )
    tr = time.perf_counter()
    if lo < hi and not record_is(shm.slices[par][part], step):
        shm.slices[par][part][0] = step  # begun: the state copy 1 - par is being written
        nodes = plan.nodes()
        ops, root = plan.program()
        partial = tree_adam(
            shm.slots,
            [covers(n, plan.k)[0] for n in nodes],
            ops,
            root,
            0,
            shm.state[par],
            shm.state[1 - par],
            0,
            lo,
            hi,
            spec.segments,
            CHUNK,
            batch,
            _scalars(spec, adam_t),
        )
        if not all(record_is(records[i], step) for i in range(plan.k)):
            raise TrainingError(
                f"a shard record of step {step + 1} changed while part {part} reduced it"
            )
        write_record(shm.slices[par][part], step, partial)
    elif lo >= hi:
        write_record(shm.slices[par][part], step, np.zeros(0))
    timing["reduce_s"] = time.perf_counter() - tr
    blocks = -(-(hi - lo) // CHUNK)
    result = {
        "part": part,
        "shards": [_unpack(records[i], i, ref.channels, spec.model.dtype) for i in range(a, b)],
        "partials": shm.slices[par][part][1 : 1 + blocks].copy(),
        "worker": _worker_name(),
        "seconds": time.perf_counter() - t0,
        **timing,
    }
    if not (
        record_is(shm.slices[par][part], step)
        and all(record_is(records[i], step) for i in range(a, b))
    ):
        raise TrainingError(
            f"the records of part {part} of step {step + 1} changed while they were read"
        )
    return result


# ---- the same over tcp: nodes and slices as Dask data ------------------------------------------------


def tcp_part(
    spec: TaskSpec, step: int, plan: StepPlan, part: int, shards: list[np.ndarray], weights: list
) -> dict:
    """Part ``part`` of ``step`` over tcp: its tree nodes (flat arrays, kept on this worker) and
    shard statistics. ``weights``: the step's parameter slices (fetched from their workers)."""
    _task_setup(spec.threads)
    t0 = time.perf_counter()
    data = _read_shards(spec, shards)
    tc = time.perf_counter()
    spare: list[np.ndarray] = []
    nodes, stats = _compute_nodes(
        spec,
        spec.layout.views(np.concatenate(weights)),
        plan,
        part,
        data,
        alloc=lambda node: (
            spare.pop() if spare else np.empty(spec.layout.size, dtype=spec.model.dtype)
        ),
        free=spare.append,
    )
    a = plan.parts[part][0]
    for i, st in enumerate(stats):
        st.update(slot=a + i, worker=zlib.crc32(_worker_name().encode()))
    return {
        "nodes": nodes,
        "shards": stats,
        "read_s": tc - t0,
        "compute_s": time.perf_counter() - tc,
        "worker": _worker_name(),
    }


def tcp_piece(part_result: dict, lo: int, hi: int) -> list[np.ndarray]:
    """This part's nodes cut to the slice ``[lo, hi)`` (runs where the nodes are)."""
    return [node[lo:hi].copy() for node in part_result["nodes"]]


def tcp_stats(part_result: dict) -> dict:
    return {k: v for k, v in part_result.items() if k != "nodes"}


def tcp_update(
    spec: TaskSpec,
    step: int,
    plan: StepPlan,
    part: int,
    prev: dict,
    pieces: list,
    batch: int,
    adam_t: int,
) -> dict:
    """Reduce, L2 and Adam of slice ``part`` from every part's pieces: the slice's state after
    ``step`` from ``prev`` (the update before it, kept on this worker)."""
    _task_setup(spec.threads)
    state = prev["state"]
    lo, hi = plan.slices[part]
    t0 = time.perf_counter()
    rows = [piece for got in pieces for piece in got]
    nodes = np.stack(rows) if rows else np.zeros((0, hi - lo), dtype=spec.model.dtype)
    new = tuple(np.empty_like(x) for x in state)
    ops, root = plan.program()
    partial = (
        tree_adam(
            nodes,
            list(range(len(rows))),
            ops,
            root,
            lo,
            state,
            new,
            lo,
            lo,
            hi,
            spec.segments,
            CHUNK,
            batch,
            _scalars(spec, adam_t),
        )
        if lo < hi
        else np.zeros(0)
    )
    return {"state": new, "partials": partial, "reduce_s": time.perf_counter() - t0}


def tcp_weights(update: dict) -> np.ndarray:
    return update["state"][0]


def tcp_partials(update: dict) -> dict:
    return {"partials": update["partials"], "reduce_s": update["reduce_s"]}


def tcp_start(state: tuple) -> dict:
    """A slice's state as an update result (the run's first step reads it)."""
    return {"state": state, "partials": np.zeros(0), "reduce_s": 0.0}


def _worker_name() -> str:
    try:
        return get_worker().address
    except ValueError:  # not in a Dask worker's task
        return f"pid-{os.getpid()}"


def warm_up(spec: TaskSpec, params, n_train: int) -> float:
    """Prepare a worker before the timed steps: decompress the training images it will read
    into the store's cache, build the network and run it once (loads Numba's compiled kernels)."""
    t0 = time.perf_counter()
    _task_setup(spec.threads)

    store = open_store(spec.store)
    chunk = store.chunks["train"]
    store.read_uint8(
        "train", np.unique(np.r_[np.arange(0, n_train, chunk), n_train - 1]), cache=True
    )
    X, y = store.read("train", np.arange(min(2, n_train)), dtype=spec.model.dtype)
    with _network(spec.model) as model:
        model.params = dict(_params(spec, params))
        if model.bn_param:
            model.bn_param["mode"] = "train"
        model.loss(X, y)
    warm_kernels(spec.model.dtype)
    return time.perf_counter() - t0


def shard_predictions(
    spec: TaskSpec, params, bn: dict | None, split: str, indices: np.ndarray
) -> dict:
    """Test-mode accuracy counts of one shard of ``split`` (BN uses the running statistics ``bn``)."""
    _task_setup(spec.threads)

    X, y = open_store(spec.store).read(split, indices, dtype=spec.model.dtype, cache=True)
    with _network(spec.model) as model:
        model.params = dict(_params(spec, params))
        if model.bn_param:
            model.set_state({"running_mean": bn["running_mean"], "running_var": bn["running_var"]})
        scores = model.loss(X)
    pred = np.argmax(scores, axis=1)
    return {"correct": int((pred == y).sum()), "n": int(len(y))}
