"""The coordinator's side of a step's communication: publish parameters, run shard tasks,
bring back the shard gradient sums.

``SharedMemoryExchange`` and ``TcpExchange`` (see :mod:`pipeline.training.transport`) have one
interface:

    exchange.params                  the flat parameter vector the coordinator updates in place
    exchange.publish(step)           make ``params`` the workers' parameters of ``step``
    exchange.submit(step, shards)    start the shard tasks of ``step``; -> pending
    exchange.collect(pending)        wait for them; -> (per-shard stats, gradient slots (k, P))
    exchange.early                   whether ``submit(step + 1)`` may come before ``publish(step + 1)``
                                     (the tasks then wait on the workers for the parameters)
    exchange.params_ref()            what evaluation tasks take as their parameters
    exchange.close()
"""

from __future__ import annotations

import platform
import time

import numpy as np

from pipeline.training.reduce import pairwise
from pipeline.training.transport import Layout, SharedBuffers, can_attach
from pipeline.training.worker import TaskSpec, add_results, read_status, shard_gradient, strip_gradient, warm_up
from pipeline.errors import TrainingError

class SharedMemoryExchange:
    kind = "shm"
    early = True  # a task waits for its step's version in shared memory (reading its images meanwhile)

    def __init__(self, client, spec: TaskSpec, layout: Layout, slots: int):
        self.client, self.spec = client, spec
        self.buffers = SharedBuffers(layout, slots)
        self.params = self.buffers.params
        self.ref = self.buffers.ref

    def usable(self) -> bool:
        """Whether every worker now connected can map the shared files (same host)."""
        try:
            seen = self.client.run(can_attach, self.ref)
        except Exception:  # noqa: BLE001 - a worker that cannot even run the probe
            return False
        return bool(seen) and all(seen.values())

    def publish(self, step: int) -> None:
        self.buffers.publish(step)

    def submit(self, step: int, shards: list[np.ndarray]) -> tuple[int, list]:
        return step, [
            self.client.submit(shard_gradient, self.spec, self.ref, step, i, idx,
                               key=f"shard-{step}-{i}-{self.ref.token[:8]}", pure=False)
            for i, idx in enumerate(shards)
        ]

    def collect(self, pending: tuple[int, list]) -> tuple[list[dict], np.ndarray]:
        """Wait until every shard of the step has marked its status record done (shared
        memory: no round trip through the scheduler). Dask still runs, places and, after a
        worker dies, reruns the tasks; a task that fails raises here."""
        step, futures = pending
        done = self.buffers.status[:len(futures), 0]
        pause = 2e-5
        while not (done == step).all():
            bad = [f for f in futures if f.status in ("error", "cancelled", "lost")]
            if bad:
                self.client.gather(bad)            # raises the task's exception
                raise TrainingError(f"shard task {bad[0].key} of step {step + 1} was {bad[0].status}")
            time.sleep(pause)
            pause = min(pause * 1.5, 1e-3)
        stats = [read_status(self.buffers.status[i], i, self.params.dtype) for i in range(len(futures))]
        return stats, self.buffers.grads[:len(futures)]


    def params_ref(self):
        return self.ref

    def close(self) -> None:
        self.buffers.close()


class TcpExchange:
    kind = "tcp"
    early = False  # the parameters travel with the tasks: submit after publish

    def __init__(self, client, spec: TaskSpec, layout: Layout):
        self.client, self.spec = client, spec
        self.params = np.zeros(layout.size, dtype=layout.dtype)
        self._future = None
        self._step = None

    def publish(self, step: int) -> None:
        # once per step to every worker; a copy, so that the in-place Adam of the next step
        # cannot reach data an in-process worker still holds
        self._future = self.client.scatter(self.params.copy(), broadcast=True, hash=False)
        self._step = step

    def submit(self, step: int, shards: list[np.ndarray]) -> list:
        if self._step != step:
            raise TrainingError(f"parameters of step {step} were not published")
        client = self.client
        leaves = [
            client.submit(shard_gradient, self.spec, self._future, step, i, idx,
                          key=f"shard-{step}-{i}-{self._future.key}", pure=False)
            for i, idx in enumerate(shards)
        ]
        counter = iter(range(len(leaves)))
        root = pairwise(leaves, lambda a, b: client.submit(
            add_results, a, b, key=f"sum-{step}-{next(counter)}-{self._future.key}", pure=False))
        return [client.submit(strip_gradient, root, pure=False), client.submit(_gradient_of, root, pure=False)]

    def collect(self, pending: list) -> tuple[list[dict], np.ndarray]:
        stats, grad = self.client.gather(pending)
        return sorted(stats, key=lambda r: r["slot"]), grad[None, :]


    def params_ref(self):
        return self._future

    def close(self) -> None:
        self._future = None


def _gradient_of(result: dict) -> np.ndarray:
    return result["grad"]


def warm_up_workers(client, exchange, n_train: int) -> float:
    """Run :func:`pipeline.training.worker.warm_up` once on every worker (in its task thread)."""
    t0 = time.perf_counter()
    addrs = list(client.scheduler_info(n_workers=-1)["workers"])
    futures = [client.submit(warm_up, exchange.spec, exchange.params_ref(), n_train, workers=[a],
                             allow_other_workers=False, pure=False, key=f"warm-up-{i}-{time.time_ns()}")
               for i, a in enumerate(addrs)]
    client.gather(futures)
    return time.perf_counter() - t0


def open_exchange(client, transport: str, spec: TaskSpec, layout: Layout, slots: int):
    """The transport asked for; ``auto``: shared memory when every worker shares this host.

    The shared-memory protocol (write the data, then the version or done flag) relies on
    x86's store order; ``auto`` picks tcp on other processors.
    """
    if transport == "auto" and platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        transport = "tcp"
    if transport in ("auto", "shm"):
        shm = SharedMemoryExchange(client, spec, layout, slots)
        if shm.usable():
            return shm
        shm.close()
        if transport == "shm":
            raise TrainingError("transport shm: some workers cannot map this host's shared memory "
                                "(they run on another host); use --transport tcp or auto")
    return TcpExchange(client, spec, layout)
