"""The tcp transport, both sides: tree nodes and parameter slices move between workers
(worker to worker), and each worker keeps its slice's parameters and Adam moments. Works
wherever the workers run. The worker's tasks (``tcp_*``) and the coordinator's
:class:`TcpExchange` that submits them.

A step is 5W tasks: W parts, W updates, and W each of the small stats, partial sums and
weights. Part j's tree nodes stay on its worker as Dask data; the update of slice j fetches
slice j of every part's nodes from the workers that hold them, through a handler every worker
serves (:class:`PieceServer`), not as W² tasks of the graph (a piece task per part and slice:
W² + 5W tasks a step, ~1 s of scheduler time at 16 workers).

A worker lost with a slice's state makes ``train`` replay from its last checkpoint
(bit-identical): the exchange raises :class:`~pipeline.training.exchange.WorkerLost`.
"""

from __future__ import annotations

import time
import zlib

import numpy as np
from distributed import get_worker, rejoin, secede
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.protocol.serialize import to_serialize
from distributed.utils import sync

from pipeline.errors import TrainingError
from pipeline.training.exchange import Exchange, WorkerLost, gather
from pipeline.training.plan import CHUNK, StepPlan, overlaps
from pipeline.training.reduce import tree_update
from pipeline.training.worker import (
    TaskSpec,
    compute_nodes,
    muon_args,
    read_shards,
    step_scalars,
    task_setup,
    worker_name,
)


def tcp_part(
    spec: TaskSpec, step: int, plan: StepPlan, part: int, shards: list[np.ndarray], weights: list
) -> dict:
    """Part ``part`` of ``step`` over tcp: its tree nodes (flat arrays, kept on this worker) and
    shard statistics. ``weights``: the step's parameter slices (fetched from their workers)."""
    task_setup(spec.threads)
    t0 = time.perf_counter()
    data = read_shards(spec, shards, step)
    tc = time.perf_counter()
    spare: list[np.ndarray] = []
    nodes, stats = compute_nodes(
        spec,
        spec.layout.views(np.concatenate(weights)),
        step,
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
        st.update(slot=a + i, worker=zlib.crc32(worker_name().encode()))
    return {
        "nodes": nodes,
        "shards": stats,
        "read_s": tc - t0,
        "compute_s": time.perf_counter() - tc,
        "worker": worker_name(),
    }


def tcp_stats(part_result: dict) -> dict:
    return {k: v for k, v in part_result.items() if k != "nodes"}


# ---- the reduce-scatter's pieces, worker to worker -----------------------------------------------

PIECE_OP = "convpipe_piece"
#: how often an update asks again for a part's nodes that no worker holds (being recomputed)
PIECE_RETRY_S = 0.05


class PieceServer(WorkerPlugin):
    """Every worker serves slices of the part results it holds: the op :data:`PIECE_OP`
    answers ``rows`` (each node of part ``key`` cut to ``[lo, hi)``), or ``missing``."""

    name = "convpipe-pieces"

    def setup(self, worker) -> None:
        async def piece(comm=None, key=None, lo=0, hi=0):
            try:
                result = worker.data[key]
            except KeyError:
                return {"status": "missing"}
            return {
                "status": "OK",
                "rows": [to_serialize(n[lo:hi].copy()) for n in result["nodes"]],
            }

        worker.handlers[PIECE_OP] = piece


def _pieces(keys: list[str], lo: int, hi: int, timeout: float) -> list[np.ndarray]:
    """Slice ``[lo, hi)`` of every node of the parts ``keys``, in order: read here if this
    worker holds the part, else fetched from a worker that does. A part no worker holds (its
    worker died and Dask computes it again) is asked for again until ``timeout``; an update
    cancelled meanwhile (the run replays) gives up."""
    worker = get_worker()
    me = worker.get_current_task()
    rows: list[np.ndarray] = []
    seceded = False
    try:
        for key in keys:
            deadline = time.monotonic() + timeout
            while True:
                got = _piece(worker, key, lo, hi)
                if got is not None:
                    rows += got
                    break
                ts = worker.state.tasks.get(me)
                if ts is None or ts.state in ("cancelled", "released", "forgotten"):
                    raise WorkerLost(f"{me}: cancelled while it waited for part {key}")
                if time.monotonic() > deadline:
                    raise WorkerLost(f"{me}: no worker holds part {key} ({timeout:.0f} s)")
                if not seceded:  # waiting: give the thread to other tasks
                    secede()
                    seceded = True
                time.sleep(PIECE_RETRY_S)
    finally:
        if seceded:
            rejoin()
    return rows


def _piece(worker, key: str, lo: int, hi: int) -> list[np.ndarray] | None:
    if key in worker.data:
        return [n[lo:hi].copy() for n in worker.data[key]["nodes"]]
    holders = sync(worker.loop, worker.scheduler.who_has, keys=[key]).get(key) or []
    for address in holders:
        try:
            got = sync(worker.loop, _ask, worker, address, key, lo, hi)
        except OSError:  # that worker left meanwhile: another holder, or ask again
            continue
        if got.get("status") == "OK":
            return list(got["rows"])
    return None


async def _ask(worker, address: str, key: str, lo: int, hi: int) -> dict:
    return await getattr(worker.rpc(address), PIECE_OP)(key=key, lo=lo, hi=hi)


def tcp_update(
    spec: TaskSpec,
    step: int,
    plan: StepPlan,
    part: int,
    prev: dict,
    done: list[dict],
    part_keys: list[str],
    batch: int,
    adam_t: int,
) -> dict:
    """Reduce, L2 and Adam of slice ``part`` from every part's nodes (``part_keys``, each done:
    ``done`` are their stats): the slice's state after ``step`` from ``prev`` (the update
    before it, kept on this worker)."""
    task_setup(spec.threads)
    state = prev["state"]
    lo, hi = plan.slices[part]
    t0 = time.perf_counter()
    rows = _pieces(part_keys, lo, hi, spec.timeout) if lo < hi else []
    nodes = np.stack(rows) if rows else np.zeros((0, hi - lo), dtype=spec.model.dtype)
    new = tuple(np.empty_like(x) for x in state)
    ops, root = plan.program()
    partial = (
        tree_update(
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
            spec.segments_at(step),
            CHUNK,
            batch,
            step_scalars(spec, adam_t),
            muon_args(spec, adam_t),
        )
        if lo < hi
        else np.zeros(0)
    )
    return {"state": new, "partials": partial, "reduce_s": time.perf_counter() - t0}


def tcp_weights(update: dict) -> np.ndarray:
    return update["state"][0]


def tcp_average(update: dict) -> np.ndarray:
    return update["state"][2]  # v: SGD's moving average of the weights


def tcp_partials(update: dict) -> dict:
    return {"partials": update["partials"], "reduce_s": update["reduce_s"]}


def tcp_start(state: tuple) -> dict:
    """A slice's state as an update result (the run's first step reads it)."""
    return {"state": state, "partials": np.zeros(0), "reduce_s": 0.0}


def tcp_reslice(updates: list[dict], cuts: list[tuple[int, int]], dtype: str) -> dict:
    """A slice's state put together from pieces ``[a, b)`` of other slices' (the run's workers
    changed, and the vector is cut in another number of slices)."""
    return tcp_start(
        tuple(
            np.concatenate([u["state"][i][a:b] for u, (a, b) in zip(updates, cuts)])
            if updates
            else np.zeros(0, dtype=dtype)
            for i in range(3)
        )
    )


class TcpExchange(Exchange):
    kind = "tcp"

    def start(self, step: int, params, m, v) -> None:
        self.client.register_plugin(PieceServer())  # every worker, those that join later too
        self._refresh()
        plan = self.plan(1)
        updates = []
        for j, (lo, hi) in enumerate(plan.slices):
            state = tuple(np.ascontiguousarray(x[lo:hi]) for x in (params, m, v))
            data = self.client.scatter(state, hash=False, workers=self._where(j).get("workers"))
            updates.append(
                self.client.submit(
                    tcp_start,
                    data,
                    key=f"state-{step}-{j}-{self.tag}",
                    pure=False,
                    **self._where(j),
                )
            )
        self._keep(step, updates, plan.slices)

    def _keep(self, step: int, updates: list, slices) -> None:
        """The slices' states after ``step - 1`` (the state of ``step``) and their weights; the
        last two steps' are kept (checkpoints and evaluation read the one before the newest)."""
        weights = [
            self.client.submit(tcp_weights, u, pure=False, **self._where(j))
            for j, u in enumerate(updates)
        ]
        self.history = {s: h for s, h in getattr(self, "history", {}).items() if s >= step - 1}
        self.history[step] = (updates, weights, slices)

    def _resliced(self, step: int, prev: list, old, plan: StepPlan) -> list:
        """The state of ``step`` cut as ``plan`` cuts the vector (``old``: as it is cut now):
        unchanged while the workers are, else one small task per new slice, on its worker."""
        if tuple(old) == plan.slices:
            return prev
        out = []
        for j, (lo, hi) in enumerate(plan.slices):
            pieces = overlaps(old, lo, hi)
            out.append(
                self.client.submit(
                    tcp_reslice,
                    [prev[i] for i, _, _ in pieces],
                    [(a, b) for _, a, b in pieces],
                    self.layout.dtype,
                    key=f"reslice-{step}-{self.tag}-{j}",
                    pure=False,
                    **self._where(j),
                )
            )
        return out

    def submit(self, step: int, plan: StepPlan, shards: list[np.ndarray], batch: int, adam_t: int):
        if step not in self.history:
            raise TrainingError(f"tcp: parts of step {step + 1} submitted before step {step} was")
        c, tag = self.client, f"{step}-{self.tag}"
        prev, weights, old = self.history[step]
        prev = self._resliced(step, prev, old, plan)
        parts = [
            c.submit(
                tcp_part,
                self.spec,
                step,
                plan,
                j,
                shards[plan.parts[j][0] : plan.parts[j][1]],
                weights,
                key=f"part-{tag}-{j}",
                pure=False,
                **self._where(j),
            )
            for j in range(plan.width)
        ]
        stats = [c.submit(tcp_stats, p, pure=False) for p in parts]
        # reduce-scatter: worker j fetches slice j of every part's nodes and updates its slice
        # (after every part is done: each update waits on the parts' small stats)
        keys = [p.key for p in parts]
        updates = [
            c.submit(
                tcp_update,
                self.spec,
                step,
                plan,
                j,
                prev[j],
                stats,
                keys,
                batch,
                adam_t,
                key=f"update-{tag}-{j}",
                pure=False,
                **self._where(j),
            )
            for j in range(plan.width)
        ]
        partials = [c.submit(tcp_partials, u, pure=False) for u in updates]
        self._keep(step + 1, updates, plan.slices)  # all-gather: the next parts fetch these
        self._count(sent=(shards, plan))
        # the parts' futures are held until the step is collected: their nodes stay (and move
        # with a retired worker) until every update has fetched its pieces
        return step, stats, partials, parts

    def collect(self, pending, timeout: float | None = None) -> list[dict]:
        step, stats, partials, _parts = pending
        got = gather(
            self.client, stats + partials, f"step {step + 1}", timeout or self.timeout, self.on_wait
        )
        self._count(received=got)
        n = len(stats)
        return [{**s, "part": j, **p} for j, (s, p) in enumerate(zip(got[:n], got[n:]))]

    def state(self, step: int):
        slices = gather(
            self.client, self.history[step][0], f"the state of step {step}", self.timeout
        )
        return tuple(np.concatenate([s["state"][i] for s in slices]) for i in range(3))

    def params_ref(self, step: int, average: bool = False):
        if not average:
            return self.history[step][1]
        return [  # the weights' moving average: each slice's, where it is kept
            self.client.submit(tcp_average, u, pure=False, **self._where(j))
            for j, u in enumerate(self.history[step][0])
        ]

    def close(self) -> None:
        self.close_pool()
        self.history = {}
