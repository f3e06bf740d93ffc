"""Dask clusters for the tests: in-process ones (:func:`local_cluster`, the only place a
LocalCluster is built; tests/conftest.py's fixtures use it), and real ``dask scheduler`` and
``dask worker`` processes started with docker-compose.yml's commands (:class:`ProcessCluster`);
``convpipe`` run as a user would, against them."""

from __future__ import annotations

import contextlib
import json as _json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from distributed import LocalCluster

from tests.helpers.wait import wait_until


def local_cluster(
    n_workers: int = 2,
    *,
    threads_per_worker: int = 1,
    processes: bool = False,
    dashboard_address: str | None = "127.0.0.1:0",
    silence_logs: int = logging.ERROR,
    **kwargs,
) -> LocalCluster:
    """A LocalCluster of ``n_workers`` workers of ``threads_per_worker`` threads; a context manager.

    In-process workers by default (``processes=False``): they share this process's job kinds and
    monkeypatches. Its dashboard on a free port of 127.0.0.1 (``dashboard_address=None``: none);
    ``kwargs`` go to LocalCluster (``scheduler_kwargs``...)."""
    return LocalCluster(
        n_workers=n_workers,
        threads_per_worker=threads_per_worker,
        processes=processes,
        dashboard_address=dashboard_address,
        silence_logs=silence_logs,
        **kwargs,
    )


# ------------------------------------------------------------ real scheduler and worker processes

#: a tiny three-layer net: a step costs milliseconds
TINY_TRAIN = [
    "--batch-size",
    "32",
    "--shard-size",
    "16",
    "--num-filters",
    "4",
    "--filter-size",
    "3",
    "--hidden-dim",
    "16",
    "--weight-scale",
    "1e-2",
    "--lr",
    "1e-2",
    "--train-acc-samples",
    "32",
]
TINY_SETS = [f"{k[2:]}={v}" for k, v in zip(TINY_TRAIN[::2], TINY_TRAIN[1::2])]


def dask_exe() -> str:
    exe = Path(sys.executable).with_name("dask")
    return str(exe) if exe.exists() else "dask"


def convpipe_exe() -> list[str]:
    exe = Path(sys.executable).with_name("convpipe")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "pipeline.cli"]


def terminal_job() -> dict:
    """Popen keywords that start a command as a shell starts a foreground job: in a process
    group of its own (Ctrl-C is SIGINT to the group, os.killpg) and with SIGINT at its default
    action even when the tests themselves were started with it ignored (``nohup cmd &`` starts
    a background job so, and its children inherit that)."""
    return {
        "start_new_session": True,
        "preexec_fn": lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    }


REPO = Path(__file__).resolve().parents[2]


def compose_commands(path: Path = REPO / "docker-compose.yml") -> dict[str, list[str]]:
    """The scheduler's and the workers' commands in docker-compose.yml, as argument lists."""
    import shlex

    import yaml

    services = yaml.safe_load(path.read_text())["services"]
    out = {}
    for name in ("scheduler", "worker"):
        cmd = services[name]["command"]
        out[name] = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
    return out


def _set_option(args: list[str], option: str, value: str | None) -> list[str]:
    """``args`` with ``option``'s value replaced (appended if absent; removed if value is None)."""
    args = list(args)
    if option in args:
        i = args.index(option)
        del args[i : i + 2]
    if value is not None:
        args += [option, value]
    return args


def local_scheduler_args(compose: list[str], scheduler_file: Path) -> list[str]:
    """The compose scheduler's command, on 127.0.0.1 and free ports instead of the container's."""
    args = _set_option(compose, "--host", "127.0.0.1")
    args = _set_option(args, "--port", "0")
    args = _set_option(args, "--dashboard-address", "127.0.0.1:0")
    return _set_option(args, "--scheduler-file", str(scheduler_file))


def local_worker_args(compose: list[str], address: str, name: str, workdir: Path) -> list[str]:
    """The compose worker's command against ``address``, listening on 127.0.0.1 only."""
    args = [address if a.startswith(("tcp://scheduler", "tls://scheduler")) else a for a in compose]
    args = _set_option(args, "--host", "127.0.0.1")
    args = _set_option(args, "--dashboard-address", "127.0.0.1:0")
    args = _set_option(args, "--local-directory", str(workdir / "dask-worker"))
    return _set_option(args, "--name", name)


class ProcessCluster:
    """``dask scheduler`` and ``dask worker`` processes on 127.0.0.1 (random free ports), started
    with the commands of docker-compose.yml's services (one worker process of one thread each)."""

    def __init__(
        self,
        workdir: Path,
        n_workers: int = 2,
        *,
        tls: dict | None = None,
        nanny: bool = True,
        env: dict | None = None,
    ):
        self.commands = compose_commands()
        self.workdir = Path(workdir)
        self.n_workers, self.tls, self.nanny = n_workers, tls, nanny
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "NUMBA_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            **(env or {}),
        }
        self.scheduler = None
        self.workers: list[subprocess.Popen] = []
        self.address = None
        self.logs = self.workdir / "cluster-logs"

    def _tls_args(self, role: str) -> list[str]:
        if not self.tls:
            return []
        return [
            "--tls-ca-file",
            self.tls["ca"],
            "--tls-cert",
            self.tls[role],
            "--tls-key",
            self.tls[f"{role}-key"],
        ]

    def _popen(self, args: list[str], name: str) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "w")
        return subprocess.Popen(
            args,
            cwd=self.workdir,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def start(self) -> ProcessCluster:
        sched_file = self.workdir / "scheduler.json"
        host = "tls://127.0.0.1" if self.tls else "127.0.0.1"
        args = local_scheduler_args(self.commands["scheduler"], sched_file)
        args = _set_option(args, "--host", host)
        assert args[:2] == ["dask", "scheduler"], args
        self.scheduler = self._popen(
            [dask_exe(), *args[1:], *self._tls_args("scheduler")], "scheduler"
        )
        wait_until(
            lambda: sched_file.exists() or self.scheduler.poll() is not None,
            timeout=60,
            what=lambda: "the scheduler's start:\n" + self.log("scheduler"),
            interval=0.1,
        )
        if not sched_file.exists():
            raise RuntimeError("scheduler did not start:\n" + self.log("scheduler"))
        self.address = _json.loads(sched_file.read_text())["address"]
        for i in range(self.n_workers):
            self.add_worker(f"worker-{i}")
        self.wait_for_workers(self.n_workers)
        return self

    def add_worker(self, name: str) -> subprocess.Popen:
        args = local_worker_args(self.commands["worker"], self.address, name, self.workdir)
        assert args[:2] == ["dask", "worker"], args
        args = [dask_exe(), *args[1:], *self._tls_args("worker")]
        if not self.nanny:
            args.append("--no-nanny")
        p = self._popen(args, name)
        self.workers.append(p)
        return p

    def client(self, timeout: float = 30):
        from distributed import Client

        security = None
        if self.tls:
            from distributed.security import Security

            security = Security(
                tls_ca_file=self.tls["ca"],
                tls_client_cert=self.tls["client"],
                tls_client_key=self.tls["client-key"],
                require_encryption=True,
            )
        return Client(self.address, timeout=timeout, security=security)

    def wait_for_workers(self, n: int, timeout: float = 90) -> None:
        with self.client() as c:
            c.wait_for_workers(n, timeout=timeout)

    def log(self, name: str) -> str:
        p = self.logs / f"{name}.log"
        return p.read_text()[-4000:] if p.exists() else ""

    def kill_scheduler(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.scheduler.pid, signal.SIGKILL)
        self.scheduler.wait(10)

    def stop(self) -> None:
        for p in [*self.workers, self.scheduler]:
            if p is not None and p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in [*self.workers, self.scheduler]:
            if p is None:
                continue
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc):
        self.stop()


def convpipe(
    *args, cwd: Path, env: dict | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run the ``convpipe`` command as a user would."""
    return subprocess.run(
        [*convpipe_exe(), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def wait_status(
    job_id: str,
    address: str,
    cwd: Path,
    states=("done", "failed", "cancelled"),
    timeout: float = 90,
    env: dict | None = None,
) -> dict:
    last = {}

    def in_states():
        r = convpipe("status", job_id, "--json", "--scheduler", address, cwd=cwd, env=env)
        assert r.returncode == 0, r.stderr
        last["status"] = status = _json.loads(r.stdout)
        return status if status["state"] in states else None

    return wait_until(
        in_states,
        timeout,
        lambda: f"job {job_id} in {states} (still {last['status']['state']}: {last['status']})",
        interval=0.5,
    )
