"""A job kind whose work is trivial, for testing the job machinery on in-process clusters.

``count`` counts to ``steps``, one progress record per step (``step_s`` seconds each), writes
``counts.txt`` (one line per step, with its ``label``) into its run directory, and can be told to
fail at a step. It runs shard tasks on the cluster like training does (``client.submit``), so a
coordinator that did not secede from the worker's thread pool would deadlock a 1-thread worker.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pipeline.errors import TrainingError
from pipeline.jobs.spec import Option


def _square(i: int) -> int:
    return i * i


def until(condition, timeout: float = 30.0, what: str = "the condition") -> None:
    """Poll ``condition()`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.01)


def wait_for(client, job_id: str, states=("done", "failed", "cancelled"), timeout: float = 30.0) -> dict:
    """The job's status once it is in one of ``states`` (polled through the scheduler, with a deadline)."""
    from pipeline.jobs import client as job_client

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = job_client.job_status(client, job_id)
        if status["state"] in states:
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {status['state']} after {timeout} s")


def state_times(client, job_id: str) -> dict[str, float]:
    """{state: when the scheduler received it} of a job's latest attempt: one clock, sub-millisecond."""
    from pipeline.jobs.records import job_topic

    return {m["state"]: t for t, m in client.get_events(job_topic(job_id))
            if isinstance(m, dict) and m.get("type") == "state"}


def ran_at_the_same_time(client, a: str, b: str) -> bool:
    """Whether jobs ``a`` and ``b`` overlapped: each started before the other ended, in the order
    the scheduler received their state events."""
    ta, tb = state_times(client, a), state_times(client, b)
    return ta["running"] < tb["done"] and tb["running"] < ta["done"]


def wait_gate(name: str) -> bool:
    """A task that holds its worker thread until the test sets the Dask Event ``name``."""
    from distributed import Event

    return Event(name).wait(120)


class Count:
    name = "count"

    @staticmethod
    def options():
        return {
            "steps": Option("steps", (int,), 5),
            "step_s": Option("step_s", (float,), 0.05),
            "label": Option("label", (str,), "x"),
            "out": Option("out", (str, type(None)), None),
            "fail_at": Option("fail_at", (int, type(None)), None),
            "resume": Option("resume", (str, type(None)), None),
        }

    @staticmethod
    def validate(spec):
        if spec.options["steps"] < 1:
            from pipeline.jobs.spec import SpecError

            raise SpecError(f"{spec.source}: steps must be >= 1")

    @staticmethod
    def preflight(options, root, job_id):
        o = dict(options)
        if o.get("resume"):
            o["out"] = o["resume"]
        o["out"] = os.path.abspath(o.get("out") or os.path.join(root, "runs", job_id))
        return o

    @staticmethod
    def run(options, client, report):
        out = options["out"]
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "counts.txt")
        done = 0
        if os.path.exists(path):
            done = len(open(path).read().splitlines())
        for step in range(done + 1, options["steps"] + 1):
            if options.get("fail_at") == step:
                raise TrainingError(f"loss is NaN at step {step}")
            value = client.submit(_square, step, pure=False).result()
            time.sleep(options["step_s"])
            with open(path, "a") as f:
                f.write(f"{options['label']} {step} {value}\n")
            report.progress({"kind": "step", "step": step, "total_steps": options["steps"], "loss": 1.0 / step})
        report.progress({"kind": "epoch", "epoch": 1, "val_acc": 0.5})
        return {"steps": options["steps"], "run_dir": out}

    @staticmethod
    def run_dir(options):
        return options["out"]

    @staticmethod
    def resume_options(options):
        return {**options, "resume": options["out"]}


# ---------------------------------------------------------------- real scheduler and worker processes

import contextlib  # noqa: E402
import json as _json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

#: a tiny three-layer net: a step costs milliseconds
TINY_TRAIN = ["--batch-size", "32", "--shard-size", "16", "--num-filters", "4", "--filter-size", "3",
              "--hidden-dim", "16", "--weight-scale", "1e-2", "--lr", "1e-2", "--train-acc-samples", "32"]
TINY_SETS = [f"{k[2:]}={v}" for k, v in zip(TINY_TRAIN[::2], TINY_TRAIN[1::2])]


def dask_exe() -> str:
    exe = Path(sys.executable).with_name("dask")
    return str(exe) if exe.exists() else "dask"


def convpipe_exe() -> list[str]:
    exe = Path(sys.executable).with_name("convpipe")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "pipeline.cli"]


REPO = Path(__file__).resolve().parents[1]


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
        del args[i:i + 2]
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

    def __init__(self, workdir: Path, n_workers: int = 2, *, tls: dict | None = None, nanny: bool = True,
                 env: dict | None = None):
        self.commands = compose_commands()
        self.workdir = Path(workdir)
        self.n_workers, self.tls, self.nanny = n_workers, tls, nanny
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
                    "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
        self.scheduler = None
        self.workers: list[subprocess.Popen] = []
        self.address = None
        self.logs = self.workdir / "cluster-logs"

    def _tls_args(self, role: str) -> list[str]:
        if not self.tls:
            return []
        return ["--tls-ca-file", self.tls["ca"], "--tls-cert", self.tls[role], "--tls-key", self.tls[f"{role}-key"]]

    def _popen(self, args: list[str], name: str) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "w")
        return subprocess.Popen(args, cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def start(self) -> "ProcessCluster":
        sched_file = self.workdir / "scheduler.json"
        host = "tls://127.0.0.1" if self.tls else "127.0.0.1"
        args = local_scheduler_args(self.commands["scheduler"], sched_file)
        args = _set_option(args, "--host", host)
        assert args[:2] == ["dask", "scheduler"], args
        self.scheduler = self._popen([dask_exe(), *args[1:], *self._tls_args("scheduler")], "scheduler")
        deadline = time.monotonic() + 60
        while not sched_file.exists():
            if self.scheduler.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("scheduler did not start:\n" + self.log("scheduler"))
            time.sleep(0.1)
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

            security = Security(tls_ca_file=self.tls["ca"], tls_client_cert=self.tls["client"],
                                tls_client_key=self.tls["client-key"], require_encryption=True)
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


def convpipe(*args, cwd: Path, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the ``convpipe`` command as a user would."""
    return subprocess.run([*convpipe_exe(), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def wait_status(job_id: str, address: str, cwd: Path, states=("done", "failed", "cancelled"), timeout: float = 90,
                env: dict | None = None) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = convpipe("status", job_id, "--json", "--scheduler", address, cwd=cwd, env=env)
        assert r.returncode == 0, r.stderr
        status = _json.loads(r.stdout)
        if status["state"] in states:
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {status['state']} after {timeout} s: {status}")
        time.sleep(0.5)
