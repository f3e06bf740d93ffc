"""How parameters reach the workers and gradient sums come back: the transport of a run.

All parameters live in one flat vector (:class:`~pipeline.training.plan.Layout` maps names to
slices), so Adam, the gradient tree and every transfer work on a single contiguous array.
Two transports, chosen once per run (the work is the same, see :mod:`pipeline.training.plan`):

* ``shm`` (:mod:`pipeline.training.shm`) — every worker runs on the coordinator's host.
  Parameters, Adam moments, gradient slots and self-validating records live in ``/dev/shm``;
  nothing of size P crosses a socket, and the coordinator touches none of it.
* ``tcp`` (:mod:`pipeline.training.tcp`) — anywhere: tree nodes and parameter slices move
  between workers as Dask data; each worker keeps its slice's parameters and moments.

Both sides of each transport (the worker's tasks and the coordinator's exchange) live in its
module; the interface they share is :class:`pipeline.training.exchange.Exchange`.
"""

from __future__ import annotations

from pipeline.errors import TrainingError
from pipeline.training.plan import Layout
from pipeline.training.shm import SharedMemoryExchange, ordered_stores
from pipeline.training.tcp import TcpExchange
from pipeline.training.worker import TaskSpec


def open_exchange(
    client,
    transport: str,
    spec: TaskSpec,
    layout: Layout,
    slots: int,
    width: int | None,
    timeout: float = 600.0,
):
    """The transport asked for; ``auto``: shared memory when every worker shares this host.
    ``width``: the parts of every step; None: as many as workers are ready when it is planned.

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
