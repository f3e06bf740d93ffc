"""Connecting to a Dask cluster: the embedded LocalCluster by default, or one by address.

Shared by data preparation and training; knows nothing of either. The embedded cluster
listens on 127.0.0.1 only (a Dask scheduler runs whatever a connected client sends it).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import signal
import threading
import warnings
from collections.abc import Iterator
from urllib.parse import urlsplit

import dask
import distributed
from distributed import Client, LocalCluster
from distributed.comm.core import CommClosedError
from distributed.security import Security

from pipeline.cluster.security import security_for
from pipeline.errors import ConvpipeError
from pipeline.options import worker_range

#: schemes whose connections are encrypted and authenticated, or never leave the process
SAFE_SCHEMES = ("tls", "wss", "inproc")


class ClusterError(ConvpipeError):
    """The scheduler cannot be reached or the cluster cannot be started."""


class InsecureSchedulerWarning(UserWarning):
    """A scheduler on another host reached without TLS:
    whoever reaches it runs code on the cluster."""


def plaintext_risk(address: str) -> str | None:
    """Why connecting to ``address`` without TLS is a risk (one line),
    or None (tls://, loopback)."""
    url = urlsplit(address if "://" in address else f"tcp://{address}")  # Dask's default protocol
    host = (url.hostname or "").lower()
    if url.scheme.lower() in SAFE_SCHEMES or host == "localhost" or host.endswith(".localhost"):
        return None
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).is_loopback:
            return None
    return (
        f"scheduler {address} is reached without TLS: anyone who can reach it can run code on the "
        "cluster (a Dask scheduler runs what its clients send); use TLS: `convpipe certs DIR` and "
        "a tls:// address"
    )


def default_workers() -> int:
    """Worker processes for the embedded cluster: one per core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


#: Dask's adaptive scaling asks for a worker per this much queued work: a training step's
#: parts last tens to hundreds of ms, and at Dask's default (5 s) a run never grew past MIN
#: (measured: `convpipe train --workers 1:2` stayed on 1 worker; at 100 ms it grew to 2)
ADAPT_TARGET = "100ms"


def grows_by_itself(client) -> bool:
    """Whether ``client``'s cluster may add workers on its own: Dask's adaptive scaling (it asks
    for workers by the work it sees waiting in tasks), or a scheduler this process does not
    manage (whose scaling it cannot see)."""
    cluster = getattr(client, "cluster", None)
    return cluster is None or getattr(cluster, "_adaptive", None) is not None


@contextlib.contextmanager
def connect(
    scheduler: str | None = None,
    *,
    workers: int | str | None = None,
    threads_per_worker: int = 1,
    processes: bool = True,
    security=None,
    timeout: float = 10.0,
    dashboard_address: str | None = "127.0.0.1:0",
    memory_limit: str | int | None = "auto",
) -> Iterator[distributed.Client]:  # noqa: F821
    """Yield a ``distributed.Client``: to ``scheduler`` if given, else to a new LocalCluster.

    The LocalCluster has ``workers`` processes (default: one per core; ``"MIN:MAX"``: MIN,
    and Dask's adaptive scaling between MIN and MAX, see :data:`ADAPT_TARGET`) of
    ``threads_per_worker`` threads, bound to 127.0.0.1 and speaking TLS with a certificate of
    its own (:func:`embedded_security`, unless ``security`` is given), and is closed on exit.
    An unreachable scheduler raises :class:`ClusterError` naming the address.

    A ``tls://`` scheduler address with ``security=None`` takes its client certificate from
    the environment or a config file (:func:`pipeline.cluster.security.security_for`); a
    ``tcp://`` one connects without TLS, with an :class:`InsecureSchedulerWarning` unless it
    is a loopback address.
    """
    if scheduler:
        risk = plaintext_risk(scheduler)
        if risk:
            warnings.warn(risk, InsecureSchedulerWarning, stacklevel=3)
        if security is None:
            security = security_for(scheduler)
        try:
            client = Client(scheduler, timeout=timeout, security=security)
        except (OSError, TimeoutError) as exc:
            raise ClusterError(
                f"cannot reach the Dask scheduler at {scheduler}: {_reason(exc)}"
            ) from None
        try:
            yield client
        finally:
            client.close()
        return

    try:
        n, most = worker_range(workers) or (default_workers(), None)
    except ValueError as exc:
        raise ClusterError(f"workers: {exc}") from None
    if processes and security is None:
        security = embedded_security()
    with _terminal_interrupt_ignored(processes):
        cluster = LocalCluster(
            n_workers=n,
            threads_per_worker=threads_per_worker,
            processes=processes,
            # worker processes talk TCP on loopback only; in-process clusters use inproc://
            **({"host": "127.0.0.1"} if processes else {}),
            dashboard_address=dashboard_address,
            memory_limit=memory_limit,
            security=security,
            silence_logs=40,
            scheduler_kwargs={
                "preload": _preloads()
            },  # convpipe's page on the dashboard (pipeline.dashboard)
            # a worker-side ConvpipeError once on the terminal, as convpipe's line, not again as
            # Dask's "Compute Failed" traceback (pipeline.cluster.worker_logs)
            **({"preload": ["pipeline.cluster.worker_logs"]} if processes else {}),
        )
    if most is not None:
        cluster.adapt(minimum=n, maximum=most, target_duration=ADAPT_TARGET)
    try:
        with Client(cluster, security=security) as client:
            yield client
    finally:
        cluster.close()


#: the errno values of a network that failed (an OSError with another, a full disk or a
#: permission, is not the scheduler's loss)
_NETWORK_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNREFUSED",
        "ECONNRESET",
        "ECONNABORTED",
        "ETIMEDOUT",
        "EPIPE",
        "ENOTCONN",
        "ENETUNREACH",
        "ENETDOWN",
        "ENETRESET",
        "EHOSTUNREACH",
        "EHOSTDOWN",
    )
    if hasattr(errno, name)
)


def connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says the connection to the cluster failed: Dask's CommClosedError, a
    timeout, a cancelled wait, or an OSError of the network (refused, reset, unreachable...),
    not one of files (a full disk, a permission), which is reported as what it is."""
    if isinstance(
        exc,
        (
            CommClosedError,
            ConnectionError,
            TimeoutError,
            asyncio.TimeoutError,
            asyncio.CancelledError,
        ),
    ):
        return True
    return isinstance(exc, OSError) and (exc.errno is None or exc.errno in _NETWORK_ERRNOS)


def embedded_security():
    """TLS for the embedded cluster's worker processes: a certificate made in memory for this
    cluster alone (Dask's ``Security.temporary``), handed to its worker processes as they start,
    never written to disk. Plain tcp on 127.0.0.1 let any other user of the machine connect and
    run code as you; now a connection needs the certificate."""
    return Security.temporary()


@contextlib.contextmanager
def _terminal_interrupt_ignored(processes: bool) -> Iterator[None]:
    """SIGINT ignored while the embedded cluster's worker processes start, so that they inherit
    that: a terminal's Ctrl-C goes to its whole process group, and each worker process printed
    a KeyboardInterrupt traceback and died mid-step. Now the Ctrl-C reaches this process alone,
    which stops the run after the step in flight (its checkpoint) and closes the cluster. A
    Python started with SIGINT ignored installs no KeyboardInterrupt handler of its own."""
    if not processes or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# BLAS/OpenMP threads of the worker processes, set in this process's environment while the
# embedded cluster lives (its worker processes inherit them). Not NUMBA_NUM_THREADS: Numba
# refuses a changed NUMBA_NUM_THREADS once its pool runs in this process; every task sets its
# Numba thread count to threads_per_worker instead.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

#: glibc's malloc in the worker processes convpipe starts (the embedded cluster's, set like
#: THREAD_ENV; the compose files' workers say the same): freed memory is kept for the next step.
#: A step allocates its activations, im2col columns and gradients afresh and the next step asks
#: for the same sizes; a freshly mapped array's pages fault in one by one, zeroed by the kernel
#: (the airbench-small network's 128-image step: 329 ms with Dask's default
#: ``MALLOC_TRIM_THRESHOLD_=65536``, 273 ms with these). One arena, so that the task thread's
#: large arrays come from the main heap, never mapped (``MALLOC_MMAP_MAX_=0``), and up to 1 GiB
#: of freed memory kept: a worker's resident memory stays at its largest step's.
#: pipeline.training.memory.keep_freed_memory does what it can of this for workers started
#: otherwise.
MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
}

#: Dask's diagnostics, thinned for an embedded cluster whose every core computes. By default
#: each worker's event loop wakes every 10 ms to sample its task thread's stack (the statistical
#: profiler behind the dashboard's Profile tab) and every 20 ms to measure its own latency, and
#: samples CPU every 500 ms; each wake-up takes the GIL from the task. Thinned, Dask's own loops
#: take less of the cores the tasks compute on (docs/scaling.md, "Dask's own time"). The Profile
#: tab stays empty; the System tab updates every 2 s instead of every 0.5 s. The memory monitor
#: keeps its 100 ms.
QUIET_DIAGNOSTICS = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "500ms",
    "distributed.admin.system-monitor.interval": "2s",
}


@contextlib.contextmanager
def worker_cluster(
    client=None,
    scheduler: str | None = None,
    workers: int | str | None = None,
    threads_per_worker: int = 1,
) -> Iterator:
    """``client`` if given; else a client of the scheduler at ``scheduler``; else an embedded
    LocalCluster of ``workers`` processes whose BLAS uses ``threads_per_worker`` threads, with
    Dask's diagnostics thinned (:data:`QUIET_DIAGNOSTICS`).

    The thread count holds whatever this process's environment says: Dask's nanny lets an
    ``OMP_NUM_THREADS``/``OPENBLAS_NUM_THREADS`` already set here override its pre-spawn setting
    (``distributed.nanny.pre-spawn-environ``: a caller's ``OPENBLAS_NUM_THREADS=2`` gave every
    worker a 2-thread OpenBLAS, whose products round differently: another run's bits), and
    writes the values it used into this process's environment. So the variables themselves are
    set here while the cluster lives (the nanny then spawns with them), and restored after; so
    are the workers' malloc settings (:data:`MALLOC_ENV`, read by glibc when a process starts).
    """
    if client is not None:
        yield client
        return

    embedded = not scheduler  # as connect() decides
    config = QUIET_DIAGNOSTICS if embedded else {}
    env = {**{k: str(threads_per_worker) for k in THREAD_ENV}, **MALLOC_ENV} if embedded else {}
    with dask.config.set(config), _environ(env):
        with connect(scheduler, workers=workers, threads_per_worker=threads_per_worker) as c:
            yield c


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set inside, each variable as it was (or unset) after."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _preloads() -> list[str]:
    """The scheduler's configured preloads, then convpipe's page (``dask scheduler --preload
    pipeline.dashboard`` for a scheduler started by hand)."""
    configured = dask.config.get("distributed.scheduler.preload", None) or []
    configured = [configured] if isinstance(configured, str) else list(configured)
    return list(dict.fromkeys([*configured, "pipeline.dashboard"]))


def worker_addresses(client) -> list[str]:
    """The addresses of the workers connected to the scheduler now, asked of the scheduler itself.

    Not ``Client.scheduler_info()``: that returns the client's cached identity, which the client's
    periodic refresh (every 2 s, fetched without per-worker entries) can overwrite between the
    fresh fetch and the return. Such a call can see no workers while all are alive (reproduced
    with a faster refresh, see docs/scaling.md), and once in CI a live job read as "the worker
    running its coordinator died or left the cluster".
    """
    return list(client.sync(client.scheduler.identity, n_workers=-1)["workers"])


def worker_statuses(client) -> dict[str, str]:
    """Each connected worker's address and status (``running``, ``closing_gracefully`` while it
    is retired, ``paused``...), asked of the scheduler itself (as :func:`worker_addresses`)."""
    workers = client.sync(client.scheduler.identity, n_workers=-1)["workers"]
    return {address: str(w.get("status", "running")) for address, w in workers.items()}


def removed_as_expected(client, address: str) -> bool:
    """Whether the scheduler removed the worker at ``address`` as planned (a retirement, a
    scale-down), from its event log; False for a worker that died or dropped its connection."""
    removals = [
        msg for _, msg in client.get_events(address) if msg.get("action") == "remove-worker"
    ]
    return bool(removals) and bool(removals[-1].get("expected"))


def worker_count(client) -> int:
    return len(worker_addresses(client))


def cancelled_by_lost_scheduler(exc: BaseException) -> bool:
    """Whether ``exc`` is futures the client cancelled because it lost its scheduler connection
    (Dask's reason "scheduler-connection-lost"). A FuturesCancelledError prints its reasons below
    its first line, and the client may have reconnected to a restarted scheduler since."""
    return "scheduler-connection-lost" in str(exc)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
