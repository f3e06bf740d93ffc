"""The coordinator's side of a step's communication: start the parts of a step on the workers,
collect their small results, read the state for a checkpoint.

:class:`Exchange` is the interface both transports implement
(:class:`~pipeline.training.shm.SharedMemoryExchange`, :class:`~pipeline.training.tcp.TcpExchange`;
:func:`pipeline.training.transport.open_exchange` picks one):

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

from dask.sizeof import sizeof
from distributed import wait

from pipeline.cluster import cancelled_by_lost_scheduler, worker_addresses, worker_count
from pipeline.errors import TrainingError
from pipeline.training.plan import Layout, StepPlan
from pipeline.training.worker import (
    TaskSpec,
    warm_up,
)


class WorkerLost(TrainingError):
    """Data a step needs was on a worker that left (tcp: a slice's Adam state):
    replay from a checkpoint."""


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


class Exchange:
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
