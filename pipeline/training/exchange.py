"""The coordinator's side of a step's communication: start the parts of a step on the workers,
collect their small results, read the state for a checkpoint.

``SharedMemoryExchange`` and ``TcpExchange`` (see :mod:`pipeline.training.transport`) have one
interface:

    exchange.start(step, params, m, v)   the state the run continues from
    exchange.submit(step, plan, shards, batch, adam_t) -> pending   the parts of ``step``
    exchange.collect(pending)            wait for them; -> part results (shard stats, L2 sums)
    exchange.state(step)                 (params, m, v) of ``step``, copies (checkpoints, the end)
    exchange.params_ref(step)            what evaluation tasks take as the parameters of ``step``
    exchange.close()

Neither moves or computes anything of size P in the coordinator per step: the workers reduce
and update (reduce-scatter, update, all-gather); ``state`` reads P-sized data at checkpoints only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
import uuid

import numpy as np
from dask.sizeof import sizeof
from distributed import wait

from pipeline.cluster import cancelled_by_lost_scheduler, worker_addresses, worker_count
from pipeline.errors import TrainingError
from pipeline.training.plan import CHUNK, StepPlan
from pipeline.training.transport import (
    Layout,
    SharedState,
    ShmRef,
    can_attach,
    ordered_stores,
    release,
)
from pipeline.training.worker import (
    ShmParams,
    TaskSpec,
    shm_part,
    tcp_part,
    tcp_partials,
    tcp_piece,
    tcp_start,
    tcp_stats,
    tcp_update,
    tcp_weights,
    warm_up,
)


class WorkerLost(TrainingError):
    """Data a step needs was on a worker that left (tcp: a slice's Adam state): replay from a checkpoint."""


def gather(client, futures: list, what: str, timeout: float) -> list:
    """``client.gather(futures)``, but never forever: fails with one line naming ``what`` when
    none of them finished for ``timeout`` seconds, or a task failed; :class:`WorkerLost` when
    Dask gave up on a task because data it needed left with a worker."""
    try:
        return _gather(client, futures, what, timeout, wait)
    except (asyncio.CancelledError, concurrent.futures.CancelledError) as exc:
        if client.status != "running" or cancelled_by_lost_scheduler(
            exc
        ):  # the scheduler, not a worker: no replay
            raise
        raise WorkerLost(
            f"{what}: a worker holding data of the run left the cluster ({type(exc).__name__})"
        ) from None


def _gather(client, futures: list, what: str, timeout: float, wait) -> list:
    pending, last = list(futures), time.monotonic()

    def stalled() -> TrainingError:
        workers = worker_count(client)
        unfinished = sum(f.status != "finished" for f in futures)
        return TrainingError(
            f"{what}: no progress for {timeout:.0f} s ({unfinished} of {len(futures)} tasks "
            f"unfinished, {workers} workers connected)"
        )

    while True:
        if pending:
            try:
                wait(pending, timeout=min(2.0, max(0.1, timeout)), return_when="FIRST_COMPLETED")
            except TimeoutError:
                pass
            except (
                ValueError
            ):  # "No clients found": Dask closed our client when the scheduler went away
                if client.status == "running":
                    raise
                raise ConnectionError(
                    f"{what}: the connection to the Dask scheduler is {client.status}"
                ) from None
        bad = [f for f in pending if f.status in ("error", "cancelled", "lost")]
        if bad:
            if bad[0].status == "error" or client.status != "running":
                client.gather(bad)  # raises the task's own exception (or the lost scheduler's)
            raise WorkerLost(
                f"{what}: task {bad[0].key} was {bad[0].status} (a worker holding its data left)"
            )
        still = [f for f in pending if f.status != "finished"]
        if len(still) < len(pending):
            last = time.monotonic()
        if not still:
            # fetch the results; one whose worker died just now is computed again (or never, if
            # no worker is left), so this wait is bounded too
            try:
                return [
                    f.result(timeout=max(0.1, timeout - (time.monotonic() - last))) for f in futures
                ]
            except TimeoutError:
                still = [f for f in futures if f.status != "finished"] or list(futures)
        if time.monotonic() - last > timeout:
            raise stalled()
        pending = still


class _Exchange:
    def __init__(self, client, spec: TaskSpec, layout: Layout, width: int, timeout: float):
        self.client, self.spec, self.layout, self.width, self.timeout = (
            client,
            spec,
            layout,
            width,
            timeout,
        )
        self.addresses = worker_addresses(client) if client is not None else []
        self.sent = self.received = 0  # bytes of task arguments and results, this coordinator

    def _count(self, sent=None, received=None) -> None:
        self.sent += sizeof(sent) if sent is not None else 0
        self.received += sizeof(received) if received is not None else 0

    def _refresh(self) -> None:
        """The workers parts are pinned to: those connected now (a replay after one left), and a
        new tag for task keys (a replayed step's tasks must not meet its first run's)."""
        self.addresses = worker_addresses(self.client)
        self.tag = uuid.uuid4().hex[:8]

    def _where(self, part: int) -> dict:
        """Part ``part`` prefers its own worker (its slice stays there); any other if it is gone."""
        if not self.addresses:
            return {}
        return {
            "workers": [self.addresses[part % len(self.addresses)]],
            "allow_other_workers": True,
        }

    def plan(self, k: int) -> StepPlan:
        return StepPlan.make(k, self.width, self.layout.size)


class SharedMemoryExchange(_Exchange):
    kind = "shm"

    def __init__(
        self, client, spec: TaskSpec, layout: Layout, slots: int, width: int, timeout: float
    ):
        super().__init__(client, spec, layout, width, timeout)
        blocks = -(-layout.size // CHUNK)
        self.shared = SharedState(layout, slots, max(width, 1), blocks)
        self.ref: ShmRef = self.shared.ref
        self.prev_width = 1

    def usable(self) -> bool:
        """Whether every worker now connected can map the shared files (same host)."""
        try:
            seen = self.client.run(can_attach, self.ref)
        except Exception:  # noqa: BLE001 - a worker that cannot even run the probe
            return False
        return bool(seen) and all(seen.values())

    def start(self, step: int, params, m, v) -> None:
        self._refresh()
        self.shared.start(step, params, m, v)
        self.prev_width = 1

    def submit(self, step: int, plan: StepPlan, shards: list[np.ndarray], batch: int, adam_t: int):
        futures = [
            self.client.submit(
                shm_part,
                self.spec,
                self.ref,
                step,
                plan,
                j,
                shards[plan.parts[j][0] : plan.parts[j][1]],
                batch,
                adam_t,
                self.prev_width,
                key=f"part-{step}-{j}-{self.tag}",
                pure=False,
                **self._where(j),
            )
            for j in range(plan.width)
        ]
        self.prev_width = plan.width
        self._count(sent=(shards, plan))
        return step, futures

    def collect(self, pending) -> list[dict]:
        step, futures = pending
        results = gather(self.client, futures, f"step {step + 1}", self.timeout)
        for f in futures:
            f.release()
        self._count(received=results)
        return results

    def state(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Copies of the state of ``step`` (all its slices done). Step ``step + 1``'s update
        overwrites that copy: refused if it has begun, before or while the copy is read."""
        records = self.shared.slices[(step + 1) % 2]
        begun = lambda: (records[:, 0] == step + 1).any()  # noqa: E731
        if not begun():
            got = tuple(x.copy() for x in self.shared.state[step % 2])
            if not begun():
                return got
        raise TrainingError(
            f"the state of step {step} was overwritten by step {step + 1} while it was read"
        )

    def params_ref(self, step: int):
        return ShmParams(self.ref, step % 2)

    def close(self) -> None:
        self.shared.close()
        try:
            self.client.run(release, self.ref.token)
        except Exception:  # noqa: BLE001 - workers that left hold nothing of ours any more
            pass


class TcpExchange(_Exchange):
    kind = "tcp"

    def start(self, step: int, params, m, v) -> None:
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
        self._keep(step, updates)

    def _keep(self, step: int, updates: list) -> None:
        """The slices' states after ``step - 1`` (the state of ``step``) and their weights; the
        last two steps' are kept (checkpoints and evaluation read the one before the newest)."""
        weights = [
            self.client.submit(tcp_weights, u, pure=False, **self._where(j))
            for j, u in enumerate(updates)
        ]
        self.history = {s: h for s, h in getattr(self, "history", {}).items() if s >= step - 1}
        self.history[step] = (updates, weights)

    def submit(self, step: int, plan: StepPlan, shards: list[np.ndarray], batch: int, adam_t: int):
        if step not in self.history:
            raise TrainingError(f"tcp: parts of step {step + 1} submitted before step {step} was")
        c, tag = self.client, f"{step}-{self.tag}"
        prev, weights = self.history[step]
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
        # reduce-scatter: slice j of every part's nodes goes to worker j, which updates its slice
        updates = []
        for j, (lo, hi) in enumerate(plan.slices):
            pieces = [
                c.submit(tcp_piece, p, lo, hi, key=f"piece-{tag}-{i}-{j}", pure=False)
                for i, p in enumerate(parts)
            ]
            updates.append(
                c.submit(
                    tcp_update,
                    self.spec,
                    step,
                    plan,
                    j,
                    prev[j],
                    pieces,
                    batch,
                    adam_t,
                    key=f"update-{tag}-{j}",
                    pure=False,
                    **self._where(j),
                )
            )
        stats = [c.submit(tcp_stats, p, pure=False) for p in parts]
        partials = [c.submit(tcp_partials, u, pure=False) for u in updates]
        self._keep(step + 1, updates)  # all-gather: the next step's parts fetch these slices
        self._count(sent=(shards, plan))
        return step, stats, partials

    def collect(self, pending) -> list[dict]:
        step, stats, partials = pending
        got = gather(self.client, stats + partials, f"step {step + 1}", self.timeout)
        self._count(received=got)
        n = len(stats)
        return [{**s, "part": j, **p} for j, (s, p) in enumerate(zip(got[:n], got[n:]))]

    def state(self, step: int):
        slices = gather(
            self.client, self.history[step][0], f"the state of step {step}", self.timeout
        )
        return tuple(np.concatenate([s["state"][i] for s in slices]) for i in range(3))

    def params_ref(self, step: int):
        return self.history[step][1]

    def close(self) -> None:
        self.history = {}


def warm_up_workers(client, exchange, n_train: int, step: int) -> float:
    """Run :func:`pipeline.training.worker.warm_up` once on every worker (in its task thread)."""
    t0 = time.perf_counter()
    addrs = worker_addresses(client)
    futures = [
        client.submit(
            warm_up,
            exchange.spec,
            exchange.params_ref(step),
            n_train,
            workers=[a],
            allow_other_workers=False,
            pure=False,
            key=f"warm-up-{i}-{time.time_ns()}",
        )
        for i, a in enumerate(addrs)
    ]
    client.gather(futures)
    return time.perf_counter() - t0


def open_exchange(
    client,
    transport: str,
    spec: TaskSpec,
    layout: Layout,
    slots: int,
    width: int,
    timeout: float = 600.0,
):
    """The transport asked for; ``auto``: shared memory when every worker shares this host.

    The shared-memory records rely on stores becoming visible in program order (x86); ``auto``
    picks tcp on other processors, and ``shm`` is refused there.
    """
    if transport == "shm" and not ordered_stores():
        raise TrainingError(
            "transport shm needs an x86-64 processor (its records rely on x86's store order); "
            "use --transport tcp or auto"
        )
    if transport == "auto" and not ordered_stores():
        transport = "tcp"
    if transport in ("auto", "shm"):
        shm = SharedMemoryExchange(client, spec, layout, slots, width, timeout)
        if shm.usable():
            return shm
        shm.close()
        if transport == "shm":
            raise TrainingError(
                "transport shm: some workers cannot map this host's shared memory "
                "(they run on another host); use --transport tcp or auto"
            )
    return TcpExchange(client, spec, layout, width, timeout)
