"""What the embedded training cluster sets in its worker processes, and what a cluster given by
address keeps: pipeline.cluster.worker_cluster."""

from __future__ import annotations

import contextlib
import os
import signal

import dask

import pipeline.cluster as cluster
from pipeline.cluster import MALLOC_ENV, QUIET_DIAGNOSTICS, THREAD_ENV, worker_cluster


def _worker_settings(dask_worker):
    return {
        "threads": {k: os.environ.get(k) for k in THREAD_ENV},
        "malloc": {k: os.environ.get(k) for k in MALLOC_ENV},
        "profiling": "profile" in dask_worker.periodic_callbacks,
        "monitor_ms": dask_worker.periodic_callbacks["monitor"].callback_time,
        "tick_ms": dask_worker.periodic_callbacks["tick"].callback_time,
    }


def test_the_embedded_clusters_workers_run_with_thinned_diagnostics():
    before = {k: os.environ.get(k) for k in (*THREAD_ENV, *MALLOC_ENV)}
    with worker_cluster(workers=1, threads_per_worker=2) as client:
        (settings,) = client.run(_worker_settings).values()
    assert settings == {
        "threads": {k: "2" for k in THREAD_ENV},
        "malloc": MALLOC_ENV,  # Dask's nanny would set MALLOC_TRIM_THRESHOLD_=65536
        "profiling": False,
        "monitor_ms": 2000,
        "tick_ms": 500,
    }
    assert {
        k: os.environ.get(k) for k in (*THREAD_ENV, *MALLOC_ENV)
    } == before  # the nanny's values did not stay here
    # outside the context Dask's defaults are back (a later cluster in this process is plain)
    assert dask.config.get("distributed.worker.profile.enabled") is True


def test_a_cluster_given_by_address_keeps_its_own_diagnostics(monkeypatch):
    seen = {}

    @contextlib.contextmanager
    def fake_connect(scheduler, **kwargs):
        seen.update({key: dask.config.get(key) for key in QUIET_DIAGNOSTICS})
        yield "client"

    monkeypatch.setattr(cluster, "connect", fake_connect)
    with worker_cluster(scheduler="tcp://127.0.0.1:8786") as client:
        assert client == "client"
    assert seen["distributed.worker.profile.enabled"] is True
    assert (
        seen["distributed.admin.system-monitor.interval"]
        != QUIET_DIAGNOSTICS["distributed.admin.system-monitor.interval"]
    )


def _thread_env():
    return {k: os.environ.get(k) for k in THREAD_ENV}


def test_the_callers_thread_variables_do_not_reach_the_workers(monkeypatch):
    """Dask's nanny lets this process's OMP/OPENBLAS_NUM_THREADS override its pre-spawn
    setting: a caller's 2 gave every worker a 2-thread OpenBLAS (read when NumPy loads, from the
    environment the worker starts with; its products round differently, so a run's bits followed
    the caller's shell). The workers start with threads_per_worker; the caller's values are back
    afterwards."""
    for k in THREAD_ENV:
        monkeypatch.setenv(k, "2")
    with worker_cluster(workers=1, threads_per_worker=1) as client:
        (env,) = client.run(_thread_env).values()
    assert env == {k: "1" for k in THREAD_ENV}
    assert _thread_env() == {k: "2" for k in THREAD_ENV}


def _sigint_ignored() -> bool:
    return signal.getsignal(signal.SIGINT) == signal.SIG_IGN


def test_the_embedded_workers_ignore_the_terminals_ctrl_c():
    """A terminal's Ctrl-C goes to its whole process group: each worker process printed a
    KeyboardInterrupt traceback and died mid-step. They start with SIGINT ignored, so the
    Ctrl-C reaches the CLI alone; this process's own handler is back once they have started."""
    before = signal.getsignal(signal.SIGINT)
    with worker_cluster(workers=1, threads_per_worker=1) as client:
        assert signal.getsignal(signal.SIGINT) is before
        ((address, pid),) = client.run(os.getpid).items()
        assert client.run(_sigint_ignored) == {address: True}
        os.kill(pid, signal.SIGINT)  # as the terminal's Ctrl-C would
        assert client.run(os.getpid) == {address: pid}  # the same process, still answering
        assert client.run(_sigint_ignored) == {address: True}


def test_a_cluster_grows_by_itself_under_adaptive_scaling_or_when_it_is_not_ours():
    # training runs each worker's part of every step in one task only where the cluster cannot
    # add workers on its own: Dask's adaptive scaling sizes a cluster by the tasks it sees
    from distributed import Client

    from tests.helpers.cluster import local_cluster

    with local_cluster(1, dashboard_address=None) as local:
        with Client(local) as client:
            assert not cluster.grows_by_itself(client)
            local.adapt(minimum=1, maximum=2)
            assert cluster.grows_by_itself(client)
        with Client(local.scheduler_address) as client:  # someone else's scheduler, say
            assert cluster.grows_by_itself(client)
