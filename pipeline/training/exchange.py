"""The coordinator's side of a step's communication: start the parts of a step on the workers,
collect their small results, read the state for a checkpoint.

:class:`Exchange` is the interface both transports implement
(:class:`~pipeline.training.shm.SharedMemoryExchange`, :class:`~pipeline.training.tcp.TcpExchange`;
:func:`pipeline.training.transport.open_exchange` picks one):

    exchange.start(step, params, m, v)   the state the run continues from
    exchange.submit(step, plan, shards, batch, adam_t) -> pending   the parts of ``step``
    exchange.collect(pending[, timeout]) wait for them; -> part results (shard stats, L2 sums)
    exchange.state(step)                 (params, m, v) of ``step``, copies (checkpoints, the end)
    exchange.params_ref(step[, average]) what evaluation tasks take as the parameters of
                                         ``step`` (or their moving average: SGD with ema)
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

from pipeline.cluster import (
    cancelled_by_lost_scheduler,
    removed_as_expected,
    worker_addresses,
    worker_count,
    worker_statuses,
)
from pipeline.errors import TrainingError
from pipeline.training.members import Membership
from pipeline.training.plan import Layout, StepPlan
from pipeline.training.worker import (
    TaskSpec,
    warm_up,
)


class WorkerLost(TrainingError):
    """Data a step needs was on a worker that left (tcp: a slice's Adam state):
    replay from a checkpoint."""


def gather(client, futures: list, what: str, timeout: float, on_wait=None) -> list:
    """``client.gather(futures)``, but never forever: fails with one line naming ``what`` when
    none of them finished for ``timeout`` seconds, or a task failed; :class:`WorkerLost` when
    Dask gave up on a task because data it needed left with a worker. ``on_wait()`` is called
    about once a second while it waits (where a job's stop request is raised)."""
    try:
        return _gather(client, futures, what, timeout, wait, on_wait)
    except (asyncio.CancelledError, concurrent.futures.CancelledError) as exc:
        if client.status != "running" or cancelled_by_lost_scheduler(
            exc
        ):  # the scheduler, not a worker: no replay
            raise
        raise WorkerLost(
            f"{what}: a worker holding data of the run left the cluster ({type(exc).__name__})"
        ) from None


def raise_failed(client, futures: list, what: str) -> None:
    """Raise if one of ``futures`` failed: its task's own exception, or :class:`WorkerLost`
    when Dask gave up on it because data it needed left with a worker."""
    bad = [f for f in futures if f.status in ("error", "cancelled", "lost")]
    if bad:
        if bad[0].status == "error" or client.status != "running":
            client.gather(bad)  # raises the task's own exception (or the lost scheduler's)
        raise WorkerLost(
            f"{what}: task {bad[0].key} was {bad[0].status} (a worker holding its data left)"
        )


def stalled(client, futures: list, what: str, timeout: float) -> TrainingError:
    """The error of a wait for ``futures`` that saw no progress for ``timeout`` seconds."""
    workers = worker_count(client)
    unfinished = sum(f.status != "finished" for f in futures)
    return TrainingError(
        f"{what}: no progress for {timeout:.0f} s ({unfinished} of {len(futures)} tasks "
        f"unfinished, {workers} workers connected)"
    )


def _gather(client, futures: list, what: str, timeout: float, wait, on_wait=None) -> list:
    pending, last = list(futures), time.monotonic()

    while True:
        if pending:
            if on_wait is not None:
                on_wait()
            try:
                wait(pending, timeout=min(1.0, max(0.1, timeout)), return_when="FIRST_COMPLETED")
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
        raise_failed(client, pending, what)
        still = [f for f in pending if f.status != "finished"]
        if len(still) < len(pending):
            last = time.monotonic()
        if not still:
            # fetch the results; one whose worker died just now is computed again (or never, if
            # no worker is left), so this wait is bounded too
            try:  # in one round trip (Future.result: one each, 2-3 ms a step of the coordinator)
                return client.sync(
                    lambda: client.gather(futures, asynchronous=True),
                    callback_timeout=max(0.1, timeout - (time.monotonic() - last)),
                )
            except TimeoutError:
                still = [f for f in futures if f.status != "finished"] or list(futures)
        if time.monotonic() - last > timeout:
            raise stalled(client, futures, what, timeout)
        pending = still


#: how often a run asks the scheduler for its workers (each time a step is planned, at most
#: this often): the round trip cost the coordinator 1.5 ms a step when it was every step
POLL_S = 0.25


class WorkerPool:
    """The workers a run plans its steps over, as the scheduler sees them: asked when a step is
    planned (:meth:`poll`, at most every :data:`POLL_S` seconds), a worker that joined is warmed
    up by a task of its own, off the critical path, and is ready from the first poll after its
    warm-up finished; one that is retired or dies is dropped. The decisions are
    :class:`~pipeline.training.members.Membership`'s."""

    def __init__(self, client, spec: TaskSpec, n_train: int = 0):
        self.client, self.spec, self.n_train = client, spec, n_train
        self.params = None  # what a joiner's warm-up takes as parameters (shm: a handle to map)
        self.members = Membership()
        self.warming: dict[str, object] = {}  # address -> its warm-up future
        self.events: list[dict] = []  # what changed, for the run's progress events
        self._polled = -POLL_S  # when the scheduler was last asked
        if client is not None:
            self.members.start(worker_statuses(client))

    @property
    def ready(self) -> list[str]:
        return self.members.ready

    def poll(self, force: bool = False) -> list[str]:
        """Ask the scheduler which workers there are (at most every :data:`POLL_S` seconds: a
        round trip to the scheduler, unless ``force``), see which warm-ups ended; returns the
        ready ones."""
        if self.client is None:
            return self.ready
        now = time.monotonic()
        if force or now - self._polled >= POLL_S:
            self._polled = now
            self._observe()
        for address, future in list(self.warming.items()):
            if future.done():
                del self.warming[address]
                ok = future.status == "finished"
                if self.members.warmed(address, ok):
                    self.events.append({"worker": address, "change": "joined"})
                else:
                    self.events.append(
                        {"worker": address, "change": "refused", "error": _error_of(future)}
                    )
        return self.ready

    def _observe(self) -> None:
        new, gone = self.members.observe(worker_statuses(self.client))
        for address in gone:
            how = self.members.lost(address, removed_as_expected(self.client, address))
            self.events.append({"worker": address, "change": how})
            future = self.warming.pop(address, None)
            if future is not None:
                future.cancel()
        for address in new:
            self.warming[address] = self.client.submit(
                warm_up,
                self.spec,
                self.params,
                self.n_train,
                workers=[address],
                allow_other_workers=False,
                pure=False,
                key=f"warm-up-join-{time.time_ns()}",
            )

    def take_events(self) -> list[dict]:
        """The changes seen since the last call (each once)."""
        events, self.events = self.events, []
        return events

    def close(self) -> None:
        for future in self.warming.values():
            future.cancel()
        self.warming = {}


def _error_of(future) -> str:
    try:
        exc = future.exception(timeout=0)
    except Exception as err:  # noqa: BLE001 - cancelled, or gone with its worker
        return type(err).__name__
    return str(exc).splitlines()[0] if exc is not None and str(exc) else type(exc).__name__


class Exchange:
    #: the most parts a step is cut into (more workers than this take no parts)
    max_width = 1024

    def __init__(self, client, spec: TaskSpec, layout: Layout, width: int | None, timeout: float):
        self.client, self.spec, self.layout, self.width, self.timeout = (
            client,
            spec,
            layout,
            width,
            timeout,
        )
        self.pool = WorkerPool(client, spec)
        self.sent = self.received = 0  # bytes of task arguments and results, this coordinator
        self.on_wait = None  # called while a step is collected: gather's on_wait

    @property
    def addresses(self) -> list[str]:
        """The workers parts are pinned to: part j to the j-th (in the order they joined)."""
        return self.pool.ready

    def _count(self, sent=None, received=None) -> None:
        self.sent += sizeof(sent) if sent is not None else 0
        self.received += sizeof(received) if received is not None else 0

    def _refresh(self) -> None:
        """The workers connected now (a replay after one left), and a new tag for task keys (a
        replayed step's tasks must not meet its first run's)."""
        self.pool.poll(force=True)
        self.tag = uuid.uuid4().hex[:8]

    def _where(self, part: int) -> dict:
        """Part ``part`` prefers its own worker (its slice stays there); any other if it is gone."""
        if not self.addresses:
            return {}
        return {
            "workers": [self.addresses[part % len(self.addresses)]],
            "allow_other_workers": True,
        }

    def follow(self, schedule, adam_offset: int) -> None:
        """The steps to come are ``schedule``'s, step ``s``'s Adam step ``s + adam_offset``: a
        transport may then run the parts of many steps in one task (shm does)."""

    def plan(self, k: int) -> StepPlan:
        """The plan of a step of ``k`` shards: in ``width`` parts if the exchange was given one,
        else over the workers ready now (asked of the scheduler: those that joined and finished
        their warm-up take parts, those that left take none)."""
        ready = self.pool.poll()
        width = self.width or min(len(ready), self.max_width)
        return self.spec.plan(k, width)

    def close_pool(self) -> None:
        self.pool.close()


def warm_up_workers(client, exchange, n_train: int, step: int) -> float:
    """Run :func:`pipeline.training.worker.warm_up` once on every worker (in its task thread)."""
    t0 = time.perf_counter()
    exchange.pool.n_train = n_train
    addrs = exchange.addresses or worker_addresses(client)
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
