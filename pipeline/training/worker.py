"""What a Dask worker computes, whatever the transport: a part's shards' gradients into its
tree nodes (:func:`compute_nodes`, called by the part tasks of :mod:`pipeline.training.shm`
and :mod:`pipeline.training.tcp`), one shard's predictions, the warm-up.

A part task (one per worker and step, :mod:`pipeline.training.plan`) reads the images of its
shards from the Zarr store (the coordinator never touches pixel data), runs the model forward
and backward on each shard with the step's parameters and sums the shards' gradient *sums*
(mean-loss gradient x n) into its tree nodes. Then it finishes the tree for its slice of the
parameters from every part's nodes, adds L2 and applies Adam. It returns each shard's loss
sum, count and spatial-BN batch moments, and its slice's L2 sums: small numbers only.

Shards stay the unit of determinism: each has the bits it has alone, whatever part it falls in.
A model with ``loss_sum`` (the three-layer net) computes a node's shards together, its hidden
layer passing its 16 MB of weights once for all of them, with the bits of its ``loss`` shard
by shard summed along the tree (tests/layers/test_cnn.py). A part task is a pure function of
(state of the step, shard indices): Dask may run it again after a worker dies and it gives the
same bits; with shared memory it also finds what its first run already wrote. Per process, the
model object and the store's decompressed chunks are cached.
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
from distributed import get_worker

from pipeline._kernels.threads import set_threads
from pipeline.augment import Augment, tta_scores
from pipeline.cnn import ModelSpec
from pipeline.data import open_store
from pipeline.training.memory import keep_freed_memory
from pipeline.training.plan import Layout, StepPlan, children, covers
from pipeline.training.reduce import warm_kernels
from pipeline.training.update import UpdateRule


@dataclass(frozen=True)
class TaskSpec:
    """Per-run constants of every task (small; pickled with each task)."""

    model: ModelSpec
    store: str
    layout: Layout
    threads: int = 1
    # (start, stop, reg, lr factor) of each parameter
    segments: tuple[tuple[int, int, float, float], ...] = ()
    update: UpdateRule = UpdateRule()
    timeout: float = 600.0  # longest wait for other tasks, seconds
    augment: Augment = Augment()  # of the training images, keyed by (seed, epoch, index)
    steps_per_epoch: int = 1
    # (parameter name, step from which it no longer trains): a whitening conv's bias
    freeze: tuple[tuple[str, int], ...] = ()
    # (start, stop, filters) of each conv's filters that Muon updates (update.muon_lr)
    muon: tuple[tuple[int, int, int], ...] = ()

    def plan(self, k: int, width: int) -> StepPlan:
        """The plan of a step of ``k`` shards in ``width`` parts (no slice cuts a Muon filter
        block): the coordinator's and a step loop's, the same."""
        return StepPlan.make(k, width, self.layout.size, [(a, b) for a, b, _ in self.muon])

    def frozen_at(self, step: int) -> frozenset[str]:
        """The parameters ``freeze`` holds still at ``step`` (from 0): no gradient is computed
        for them (:meth:`pipeline.convnet.ConvNet.loss`'s ``frozen``)."""
        return frozenset(name for name, first in self.freeze if step >= first)

    def segments_at(self, step: int) -> tuple[tuple[int, int, float, float], ...]:
        """``segments`` at ``step``: a parameter ``freeze`` holds still gets lr factor 0, which
        the update treats as frozen (no step, no decay, no averaging: it stays)."""
        frozen = self.frozen_at(step)
        if not frozen:
            return self.segments
        slices = self.layout.slices()
        starts = {slices[name].start for name in frozen}
        return tuple((a, b, reg, 0.0 if a in starts else f) for a, b, reg, f in self.segments)


#: the most images a node's shards are computed together with (``loss_sum``): a larger node
#: sums its children (each together, up to this) as before; its stacked rows, caches and
#: kernels' scratch stay near one 256-image shard's (the few-row dx kernel's most rows)
TOGETHER_MAX_IMAGES = 256

#: images per accuracy task (evaluation during training and ``convpipe evaluate``)
EVAL_SHARD = 500


# ---- per-process state ---------------------------------------------------------------------------

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


def task_setup(n: int) -> None:
    """What every task does first: keep freed memory (once per process), Numba threads = ``n``."""
    keep_freed_memory()
    set_threads(n)
    # the worker's event loop shares the GIL with this task thread: hand it over quickly so
    # a task waiting for parameters, or a finished task's result, is not held up for 5 ms
    if sys.getswitchinterval() > 5e-4:
        sys.setswitchinterval(5e-4)


def task_params(spec: TaskSpec, params) -> dict[str, np.ndarray]:
    """Parameter views of ``params``: a flat vector, the tcp transport's slices, or a
    transport's handle that gives the flat vector (``vector()``: shared memory)."""
    if hasattr(params, "vector"):
        params = params.vector()
    if isinstance(params, (list, tuple)):
        params = np.concatenate(params)
    return spec.layout.views(params)


# ---- one part of a step --------------------------------------------------------------------------


def read_shards(
    spec: TaskSpec, shards: list[np.ndarray], step: int
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Each shard's images (augmented as the run says, for the epoch of ``step``), labels and
    seconds spent."""
    store, out = open_store(spec.store), []
    epoch = step // spec.steps_per_epoch
    for idx in shards:
        t0 = time.perf_counter()
        X, y = store.read("train", idx, dtype=spec.model.dtype, cache=True)
        X = spec.augment.apply(X, idx, epoch)
        out.append((X, y, time.perf_counter() - t0))
    return out


def compute_nodes(
    spec: TaskSpec, views: dict, step: int, plan: StepPlan, part: int, data: list, alloc, free
) -> tuple[list, list]:
    """The part's tree nodes of ``step``: each shard's gradient sum with the bits it has alone,
    summed along the tree (:func:`pipeline.training.plan.frontier`); a node's shards computed
    together where the model has ``loss_sum`` (up to TOGETHER_MAX_IMAGES). ``alloc(node)``
    gives the array (P,) a node is written to, ``free(array)`` takes back a temporary (a right
    child of several shards summed apart, shard by shard). Returns (nodes' arrays, shard
    stats)."""
    first = plan.parts[part][0]
    dt = np.dtype(spec.model.dtype).type
    stats: list[dict] = [None] * len(data)
    frozen = spec.frozen_at(step)

    def leaf(i, out, add):
        """Shard i's (mean-loss gradient) x n written to out, or added to it when ``add``."""
        X, y, read_s = data[i - first]
        t0, begin = time.perf_counter(), time.time()
        n = len(y)
        more = {"frozen": frozen} if frozen else {}  # only spec networks freeze (a ConvNet)
        loss, _ = model.loss(X, y, into=spec.layout.views(out), scale=dt(n), accumulate=add, **more)
        bn = model.last_batch_stats if model.bn_param else None  # spatial BN's moments
        seconds = time.perf_counter() - t0
        stats[i - first] = _shard_stats(n, loss, read_s, seconds, begin, time.time(), bn)

    def together(node, a, b, out):
        """The node's shards a..b-1 computed together (``loss_sum``: the bits of ``value``'s
        shard by shard, the hidden layer passing its weights once for all of them), their
        compute time shared out by image count."""
        batches = [data[i - first][:2] for i in range(a, b)]
        t0, begin = time.perf_counter(), time.time()
        counts = [len(y) for _, y in batches]
        got = model.loss_sum(
            batches, spec.layout.views(out), [dt(n) for n in counts], sum_order(node, plan.k, a)
        )
        seconds, end = time.perf_counter() - t0, time.time()
        for i, n, (loss, bn) in zip(range(a, b), counts, got):
            share = seconds * n / sum(counts)
            stats[i - first] = _shard_stats(n, loss, data[i - first][2], share, begin, end, bn)

    def value(node, out):
        level, i = node
        if level == 0:
            leaf(i, out, add=False)
            return
        a, b = covers(node, plan.k)
        images = sum(len(data[j - first][1]) for j in range(a, b))
        if hasattr(model, "loss_sum") and not frozen and images <= TOGETHER_MAX_IMAGES:
            together(node, a, b, out)
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


def _shard_stats(n, loss, read_s, compute_s, begin, end, bn) -> dict:
    """What a part reports of one shard: its image count, loss sum, seconds, spatial BN's
    batch moments (bn: the model's ``last_batch_stats``, or None)."""
    return {
        "n": n,
        "loss_sum": float(loss) * n,
        "read_s": read_s,
        "compute_s": compute_s,
        "begin": begin,
        "end": end,
        "bn_mean": None if bn is None else np.asarray(bn["mean"]),
        "bn_var": None if bn is None else np.asarray(bn["var"]),
    }


def sum_order(node, k: int, first: int):
    """The sum ``node`` stands for in :func:`pipeline.fast_layers.sum_in_order`'s terms: its
    shards numbered from ``first``, nested as the tree adds them (an odd last node moves up)."""
    level, i = node
    if level == 0:
        return i - first
    kids = children(node, k)
    if len(kids) == 1:
        return sum_order(kids[0], k, first)
    return (sum_order(kids[0], k, first), sum_order(kids[1], k, first))


def step_scalars(spec: TaskSpec, adam_t: int) -> tuple:
    """The update's scalars of the run's ``adam_t``-th step (from 1)."""
    return spec.update.scalars(adam_t - 1, spec.model.dtype)


def muon_args(spec: TaskSpec, adam_t: int) -> tuple | None:
    """:func:`pipeline.training.reduce.tree_update`'s ``muon`` at the run's ``adam_t``-th step
    (from 1): the filters, Muon's rate and momentum; None without Muon."""
    return (spec.muon, *spec.update.muon_at(adam_t - 1)) if spec.muon else None


def worker_name() -> str:
    try:
        return get_worker().address
    except ValueError:  # not in a Dask worker's task
        return f"pid-{os.getpid()}"


def warm_up(spec: TaskSpec, params, n_train: int) -> float:
    """Prepare a worker before the timed steps: decompress the training images it will read
    into the store's cache, build the network and run it once (loads Numba's compiled kernels).
    ``params``: the run's, or None (a worker that joins mid-run: its own initial weights do)."""
    t0 = time.perf_counter()
    task_setup(spec.threads)

    store = open_store(spec.store)
    chunk = store.chunks["train"]
    store.read_uint8(
        "train", np.unique(np.r_[np.arange(0, n_train, chunk), n_train - 1]), cache=True
    )
    X, y = store.read("train", np.arange(min(2, n_train)), dtype=spec.model.dtype)
    with _network(spec.model) as model:
        if params is not None:
            model.params = dict(task_params(spec, params))
        if model.bn_param:
            model.bn_param["mode"] = "train"
        model.loss(X, y)
    warm_kernels(spec.model.dtype)
    return time.perf_counter() - t0


def shard_predictions(
    spec: TaskSpec, params, bn: dict | None, split: str, indices: np.ndarray, tta: str = "none"
) -> dict:
    """Test-mode accuracy counts of one shard of ``split`` (BN uses the running statistics
    ``bn``), scoring the views of test-time augmentation ``tta`` (pipeline.augment)."""
    task_setup(spec.threads)

    X, y = open_store(spec.store).read(split, indices, dtype=spec.model.dtype, cache=True)
    with _network(spec.model) as model:
        model.params = dict(task_params(spec, params))
        if model.bn_param:
            model.set_state({"running_mean": bn["running_mean"], "running_var": bn["running_var"]})
        scores = tta_scores(model.loss, X, tta)
    pred = np.argmax(scores, axis=1)
    return {"correct": int((pred == y).sum()), "n": int(len(y))}
