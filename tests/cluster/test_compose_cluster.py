"""The compose cluster for real: docker-compose.yml and the Dockerfile, unchanged, built and
brought up on a Docker engine, then used as a user uses them.

One cluster per module (a unique compose project, ports picked free, a temporary data root
through ``CONVPIPE_DATA``); the tests run in order on it:

- data as a user provides it (an official-layout ``cifar-10-python.tar.gz`` in the data
  root, no network), ``docker-compose run --rm job`` prepares and trains; the parameters equal
  an embedded cluster's run with shared memory on the host (same settings -> same bits);
- the host's ``convpipe submit/status/logs/cancel/resume`` against ``tcp://127.0.0.1:PORT``;
- ``--scale worker=3``, then ``docker kill`` of a worker and of the worker running the job's
  coordinator: the job restarts itself and ends with the same parameters;
- the scheduler container restarted mid-job: a one-line failure, then ``resume`` finishes it;
- the dashboard's ``/status`` and ``/convpipe`` pages;
- the TLS override with certificates from ``convpipe certs``.

Teardown leaves no container, network or volume of the project. Without a Docker engine
(``docker info`` fails) the module is skipped with that reason; CI (``.ci/run``) starts one
and sets ``CONVPIPE_COMPOSE_TESTS=required``, which turns the skip into a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.cluster import TINY_SETS, TINY_TRAIN, convpipe
from tests.helpers.wait import wait_until

REPO = Path(__file__).resolve().parents[2]
#: the undisturbed run's length: long enough to kill two workers during it
STEPS = 150
CHECKPOINT_EVERY = 10
SETS = [
    a
    for s in [*TINY_SETS, f"steps={STEPS}", f"checkpoint-every={CHECKPOINT_EVERY}"]
    for a in ("--set", s)
]

pytestmark = [pytest.mark.compose, pytest.mark.timeout(900)]


def _engine_problem() -> str | None:
    for exe in ("docker", "docker-compose"):
        if shutil.which(exe) is None:
            return f"no {exe} on PATH (../shared/docker/engine.sh start installs it)"
    r = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        return (
            "no Docker engine: `docker info` failed "
            "(start one with ../shared/docker/engine.sh start)"
        )
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Compose:
    """``docker-compose -p PROJECT -f docker-compose.yml [...]`` with this test's settings."""

    def __init__(self, work: Path):
        self.work = work
        self.project = f"convpipe-test-{uuid.uuid4().hex[:8]}"
        self.port, self.dashboard = _free_port(), _free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "CONVPIPE_DATA": str(work / "data"),
            "CONVPIPE_CERTS": str(work / "certs"),
            "CONVPIPE_UID": str(os.getuid()),
            "CONVPIPE_GID": str(os.getgid()),
            "CONVPIPE_SCHEDULER_PORT": str(self.port),
            "CONVPIPE_DASHBOARD_PORT": str(self.dashboard),
            "CONVPIPE_WORKER_MEMORY": "2g",
        }
        self.files = ["docker-compose.yml"]

    def __call__(self, *args, timeout: float = 300, check: bool = True, env: dict | None = None):
        cmd = [
            "docker-compose",
            "-p",
            self.project,
            *[a for f in self.files for a in ("-f", str(REPO / f))],
            *args,
        ]
        r = subprocess.run(
            cmd,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**self.env, **(env or {})},
        )
        if check:
            assert r.returncode == 0, (
                f"{' '.join(cmd[3:])}: rc {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
            )
        return r

    def containers(self, service: str) -> list[str]:
        return self("ps", "-q", service).stdout.split()

    def leftovers(self) -> dict[str, list[str]]:
        label = f"label=com.docker.compose.project={self.project}"
        out = {}
        for what, cmd in (
            ("containers", ["docker", "ps", "-aq"]),
            ("networks", ["docker", "network", "ls", "-q"]),
            ("volumes", ["docker", "volume", "ls", "-q"]),
        ):
            out[what] = subprocess.run(
                [*cmd, "--filter", label], capture_output=True, text=True
            ).stdout.split()
        return out

    def up(self, workers: int = 2) -> None:
        self("up", "-d", "--scale", f"worker={workers}", "scheduler", "worker", timeout=600)
        self.wait_for_workers(workers)

    def wait_for_workers(self, n: int, timeout: float = 120) -> None:
        def enough():
            try:
                return self.n_workers() >= n
            except OSError:  # the scheduler is not up yet
                return False

        wait_until(enough, timeout=timeout, what=f"{n} workers on the compose scheduler")

    def n_workers(self) -> int:
        from distributed import Client

        from pipeline.cluster import worker_count

        with Client(self.address, timeout=10, **self.client_kwargs()) as c:
            return worker_count(c)

    def client_kwargs(self) -> dict:
        return {}


def host(
    *args,
    check: bool = True,
    env: dict | None = None,
    timeout: float = 300,
    cwd: Path | None = None,
):
    """The host's ``convpipe`` (this venv: the same package the image installed)."""
    clean = {
        k: ""
        for k in (
            "CONVPIPE_SCHEDULER",
            "CONVPIPE_TLS_CA_FILE",
            "CONVPIPE_TLS_CERT",
            "CONVPIPE_TLS_KEY",
        )
    }
    r = convpipe(*args, cwd=cwd or REPO, env={**clean, **(env or {})}, timeout=timeout)
    if check:
        assert r.returncode == 0, (
            f"convpipe {' '.join(map(str, args))}: rc {r.returncode}\n"
            f"{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        )
    return r


def status(job: str, address: str, env: dict | None = None) -> dict:
    return json.loads(host("status", job, "--json", "--scheduler", address, env=env).stdout)


def wait_state(
    job: str,
    address: str,
    states=("done", "failed", "cancelled"),
    timeout: float = 240,
    env: dict | None = None,
) -> dict:
    found: dict = {}

    def reached():
        found.update(status(job, address, env))
        return found["state"] in states

    wait_until(reached, timeout=timeout, what=f"job {job} in {states}")
    return found


def errors(stderr: str) -> list[str]:
    """The CLI's error lines (Dask's VersionMismatchWarning about the Python patch release of
    the host and the image may precede them)."""
    return [ln for ln in stderr.splitlines() if ln.startswith("convpipe: error")]


def params(run_dir: Path) -> dict:
    with np.load(run_dir / "params.npz", allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def same_params(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def checkpoints(run_dir: Path) -> list[Path]:
    d = run_dir / "checkpoints"
    return sorted(d.glob("step-*.npz")) if d.is_dir() else []


def toml_spec(path: Path, table: dict) -> Path:
    lines = [
        f"{k} = {json.dumps(v) if isinstance(v, (str, bool)) else v}" for k, v in table.items()
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    problem = _engine_problem()
    if problem:
        if os.environ.get("CONVPIPE_COMPOSE_TESTS") == "required":
            pytest.fail(f"CONVPIPE_COMPOSE_TESTS=required but {problem}")
        pytest.skip(problem)
    work = tmp_path_factory.mktemp("compose-cluster")
    (work / "data").mkdir()
    c = Compose(work)
    try:
        # the three services share one image (convpipe:latest): build it once
        c("build", "scheduler", timeout=900)
        c.up(2)
        yield c
    finally:
        c("down", "-v", "--remove-orphans", "--timeout", "5", check=False, timeout=300)
        left = c.leftovers()
        assert left == {"containers": [], "networks": [], "volumes": []}, left


@pytest.fixture(scope="module")
def reference(cluster):
    """The undisturbed run: the embedded cluster on the host, shared memory, 2 workers."""
    from tests.helpers.data import write_cifar_archive

    data = cluster.work / "data"
    archive, _ = write_cifar_archive(cluster.work / "src", per_batch=200, n_test=40)
    shutil.copy(archive, data / "cifar-10-python.tar.gz")  # as a user puts it there
    return data


def test_job_service_prepares_and_trains_like_the_embedded_cluster(cluster, reference):
    data = reference
    toml_spec(
        data / "prepare-small.toml",
        {
            "job": "prepare",
            "name": "prepare-small",
            "root": "data",
            "out": "data/cifar10.zarr",
            "val": 20,
            "chunk": 40,
            "no-verify": True,
        },
    )
    tiny = {k: (float(v) if "e-" in v else int(v)) for k, v in (s.split("=") for s in TINY_SETS)}
    toml_spec(
        data / "train-small.toml",
        {
            "job": "train",
            "name": "train-small",
            "root": "data",
            "data": "data/cifar10.zarr",
            "out": "data/runs/service",
            **tiny,
            "steps": STEPS,
            "checkpoint-every": CHECKPOINT_EVERY,
        },
    )
    r = cluster(
        "run",
        "--rm",
        "job",
        timeout=600,
        env={
            "CONVPIPE_PREPARE_SPEC": "data/prepare-small.toml",
            "CONVPIPE_TRAIN_SPEC": "data/train-small.toml",
        },
    )
    assert "done: store" in r.stdout and "done: train_acc" in r.stdout, r.stdout[-3000:]
    assert (data / "cifar10.zarr" / "zarr.json").exists()
    service = data / "runs" / "service"
    assert json.loads((service / "summary.json").read_text())["steps"] == STEPS
    assert json.loads((service / "config.json").read_text())["transport"] in ("auto", "tcp")

    host(
        "train",
        "--data",
        data / "cifar10.zarr",
        "--out",
        cluster.work / "embedded",
        "--workers",
        "2",
        "--transport",
        "shm",
        *TINY_TRAIN,
        "--steps",
        str(STEPS),
        "--checkpoint-every",
        str(CHECKPOINT_EVERY),
        timeout=600,
    )
    assert same_params(params(service), params(cluster.work / "embedded"))


def test_host_client_submits_follows_cancels_and_resumes(cluster, reference):
    job = host(
        "submit",
        REPO / "jobs" / "train-three-layer.toml",
        "--scheduler",
        cluster.address,
        *SETS,
        "--set",
        "name=host-job",
    ).stdout.split()[0]
    run = reference / "runs" / job
    wait_until(lambda: checkpoints(run), timeout=120, what="a checkpoint")
    s = host("status", job, "--scheduler", cluster.address).stdout
    assert "state:     running" in s or "state:     done" in s, s
    assert f"start: step 0/{STEPS}" in host("logs", job, "--scheduler", cluster.address).stdout
    r = host("cancel", job, "--scheduler", cluster.address, check=False)
    if r.returncode == 0:  # it may have finished already on a fast machine: nothing to cancel then
        cancelled = wait_state(job, cluster.address)
        assert cancelled["state"] == "cancelled", cancelled
        host("resume", job, "--scheduler", cluster.address)
        done = wait_state(job, cluster.address)
        assert done["state"] == "done" and done["attempt"] == 2, done
        assert "resumed at step" in host("logs", job, "--scheduler", cluster.address).stdout
    assert same_params(params(run), params(cluster.work / "embedded"))
    listing = host("status", "--scheduler", cluster.address).stdout
    assert job in listing


def test_killed_workers_coordinator_included_leave_the_run_unchanged(cluster, reference):
    cluster.up(3)
    job = host(
        "submit",
        REPO / "jobs" / "train-three-layer.toml",
        "--scheduler",
        cluster.address,
        *SETS,
        "--set",
        "name=killed",
    ).stdout.split()[0]
    run = reference / "runs" / job
    job_file = reference / "jobs" / job / "status.json"
    wait_until(lambda: checkpoints(run), timeout=120, what="a first checkpoint")
    coordinator = json.loads(job_file.read_text())["host"]  # the container's hostname: its short id
    workers = cluster.containers("worker")
    other = next(w for w in workers if not w.startswith(coordinator))
    before = checkpoints(run)[-1].name  # the newest: old ones are pruned, so count names
    subprocess.run(["docker", "kill", other], check=True, capture_output=True)
    wait_until(
        lambda: checkpoints(run)[-1].name > before,
        timeout=120,
        what="a checkpoint after the first kill",
    )
    victim = next(w for w in workers if w.startswith(coordinator))
    subprocess.run(["docker", "kill", victim], check=True, capture_output=True)

    done = wait_state(job, cluster.address, timeout=300)
    assert done["state"] == "done" and done["attempt"] == 1, done
    assert done["restarts"] == 1 and done["worker"] != coordinator
    log = host("logs", job, "--scheduler", cluster.address).stdout
    assert "died; restarting on worker" in log and "resumed at step" in log
    assert "restarts:" in host("status", job, "--scheduler", cluster.address).stdout
    assert same_params(params(run), params(reference / "runs" / "service"))
    assert same_params(params(run), params(cluster.work / "embedded"))


#: the scaled job's length: long enough for a third container to start and warm up mid-job
SCALED_STEPS = 800


def _step_widths(run: Path) -> list[int]:
    """The workers of each step of ``run`` so far (whole lines only: the run is writing)."""
    path = run / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    lines = text[: text.rfind("\n") + 1].splitlines()
    return [m.get("workers") for m in map(json.loads, lines) if m.get("kind") == "step"]


def test_workers_scaled_up_and_down_mid_job_are_used_and_the_bits_stay(cluster, reference):
    # docker-compose up --scale worker=3 mid-job: the job takes the third worker from a step
    # after its warm-up; --scale worker=2 stops one (docker stop: its nanny retires it first)
    cluster.up(2)
    data = reference
    given = [*TINY_SETS, f"steps={SCALED_STEPS}", f"checkpoint-every={CHECKPOINT_EVERY}"]
    sets = [a for s in [*given, "name=scaled"] for a in ("--set", s)]
    job = host(
        "submit", REPO / "jobs" / "train-three-layer.toml", "--scheduler", cluster.address, *sets
    ).stdout.split()[0]
    run = data / "runs" / job
    wait_until(lambda: checkpoints(run), timeout=120, what="a first checkpoint")
    cluster.up(3)
    wait_until(lambda: 3 in _step_widths(run), timeout=120, what="a step planned over 3 workers")
    coordinator = json.loads((data / "jobs" / job / "status.json").read_text())["host"]
    cluster("up", "-d", "--scale", "worker=2", "--no-recreate", "worker", timeout=300)
    done = wait_state(job, cluster.address, timeout=300)
    assert done["state"] == "done", done
    widths = _step_widths(run)
    assert widths[0] == 2 and 3 in widths and widths[-1] == 2, widths
    log = host("logs", job, "--scheduler", cluster.address).stdout
    assert "joined: it takes parts from the next step" in log, log[-3000:]
    if done["attempt"] == 1 and not done.get("restarts"):  # the stopped one was not the job's
        assert "was retired: it takes no more parts" in log and "resumed at step" not in log, (
            coordinator,
            log[-3000:],
        )
    host(
        "train",
        "--data",
        data / "cifar10.zarr",
        "--out",
        cluster.work / "embedded-scaled",
        "--workers",
        "2",
        "--transport",
        "shm",
        *TINY_TRAIN,
        "--steps",
        str(SCALED_STEPS),
        "--checkpoint-every",
        str(CHECKPOINT_EVERY),
        timeout=600,
    )
    assert same_params(params(run), params(cluster.work / "embedded-scaled"))


def test_dashboard_pages(cluster, reference):
    base = f"http://127.0.0.1:{cluster.dashboard}"
    with urllib.request.urlopen(f"{base}/status", timeout=30) as r:
        page = r.read().decode()
    assert "Dask" in page and "bokeh" in page.lower(), page[:500]
    with urllib.request.urlopen(f"{base}/convpipe", timeout=30) as r:
        page = r.read().decode()
    assert "killed" in page and "host-job" in page, page[:500]


def test_scheduler_restart_mid_job_then_resume(cluster, reference):
    job = host(
        "submit",
        REPO / "jobs" / "train-three-layer.toml",
        "--scheduler",
        cluster.address,
        *SETS,
        "--set",
        "name=orphan",
    ).stdout.split()[0]
    run = reference / "runs" / job
    wait_until(lambda: checkpoints(run), timeout=120, what="a checkpoint")
    cluster("restart", "-t", "5", "scheduler", timeout=120)
    job_file = reference / "jobs" / job / "status.json"
    wait_until(
        lambda: json.loads(job_file.read_text())["state"] != "running",
        timeout=120,
        what="the coordinator recording the lost scheduler",
    )
    # workers that lost their scheduler close (a nanny may hang there): new worker containers
    cluster(
        "up", "-d", "--no-deps", "--force-recreate", "--scale", "worker=2", "worker", timeout=300
    )
    cluster.wait_for_workers(2)
    # the new scheduler does not know the job: one line saying where its files are
    r = host("status", job, "--scheduler", cluster.address, check=False)
    assert r.returncode != 0 and len(errors(r.stderr)) == 1, r.stderr
    assert f"convpipe status {job} --root" in errors(r.stderr)[0]
    # the job's files do: failed, one line of reason (a worker whose scheduler went away closes
    # itself, and the job stops between two steps), and the resume command
    r = host("status", job, "--root", reference)
    assert "state:     failed" in r.stdout and f"convpipe resume {job}" in r.stdout, r.stdout
    reason = [ln for ln in r.stdout.splitlines() if ln.startswith("reason:")]
    assert len(reason) == 1 and (
        "lost the connection to the Dask scheduler" in reason[0] or "is closing" in reason[0]
    ), r.stdout
    host("resume", job, "--scheduler", cluster.address, "--root", reference)
    done = wait_state(job, cluster.address, timeout=300)
    assert done["state"] == "done" and done["attempt"] == 2, done
    assert same_params(params(run), params(cluster.work / "embedded"))


def test_tls_override_refuses_strangers_and_trains_with_the_certificate(cluster, reference):
    work = cluster.work
    host(
        "certs", work / "certs", "--host", "scheduler", "--host", "localhost", "--host", "127.0.0.1"
    )
    host("certs", work / "stranger", "--host", "localhost", "--host", "127.0.0.1")
    cluster.files = ["docker-compose.yml", "docker-compose.tls.yml"]
    tls_address = f"tls://127.0.0.1:{cluster.port}"
    certs = work / "certs"
    good = {
        "CONVPIPE_TLS_CA_FILE": str(certs / "ca.pem"),
        "CONVPIPE_TLS_CERT": str(certs / "client.pem"),
        "CONVPIPE_TLS_KEY": str(certs / "client-key.pem"),
    }
    stranger = {
        **good,
        "CONVPIPE_TLS_CERT": str(work / "stranger" / "client.pem"),
        "CONVPIPE_TLS_KEY": str(work / "stranger" / "client-key.pem"),
    }
    cluster.address = tls_address
    cluster.client_kwargs = lambda: {"security": _security(certs)}
    cluster.up(2)
    for env in ({}, stranger):
        r = host(
            "status",
            "--scheduler",
            tls_address,
            "--timeout",
            "10",
            check=False,
            env=env,
            timeout=120,
        )
        assert r.returncode != 0 and len(errors(r.stderr)) == 1, (r.stdout, r.stderr)
    r = host(
        "submit",
        REPO / "jobs" / "train-three-layer.toml",
        "--scheduler",
        tls_address,
        *TINY_SETS_ARGS,
        "--set",
        "name=tls-job",
        "--follow",
        env=good,
        timeout=300,
    )
    assert "done: train_acc" in r.stdout, r.stdout[-2000:]


TINY_SETS_ARGS = [a for s in [*TINY_SETS, "steps=8"] for a in ("--set", s)]


def _security(certs: Path):
    from distributed.security import Security

    return Security(
        tls_ca_file=str(certs / "ca.pem"),
        tls_client_cert=str(certs / "client.pem"),
        tls_client_key=str(certs / "client-key.pem"),
        require_encryption=True,
    )


def test_the_host_client_has_the_image_s_versions(cluster):
    """``convpipe submit`` from the host pickles tasks for the containers' Python: the same
    package versions on both sides (the image installs the same pyproject.toml)."""
    code = (
        "import importlib.metadata as m; print(' '.join(f'{p}=={m.version(p)}' for p in "
        "('convpipe', 'dask', 'distributed', 'numpy', 'cloudpickle', 'msgpack', 'zarr', 'numba')))"
    )
    r = subprocess.run(
        ["docker", "run", "--rm", "convpipe:latest", "python", "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    import importlib.metadata as m

    mine = " ".join(
        f"{p}=={m.version(p)}"
        for p in (
            "convpipe",
            "dask",
            "distributed",
            "numpy",
            "cloudpickle",
            "msgpack",
            "zarr",
            "numba",
        )
    )
    assert r.stdout.strip() == mine, (
        f"image: {r.stdout.strip()}; host: {mine} (docker-compose build again)"
    )


def test_each_container_user_gets_a_private_copy_of_the_prebuilt_kernel_cache(cluster):
    """Numba loads its cache with pickle: the image's (compiled at build time) is root's and
    read-only; a container, whatever uid it runs as, gets a 0700 copy of its own, from which the
    model's kernels load without compiling."""
    code = (
        "import os, stat; from pipeline.warmup import cold_kernels, model_kernels; "
        "d = os.environ['NUMBA_CACHE_DIR']; s = os.stat(d); o = os.stat('/opt/numba-cache'); "
        "print(d.startswith('/tmp/numba-cache.'), oct(stat.S_IMODE(s.st_mode)), "
        "s.st_uid == os.getuid(), o.st_uid, oct(stat.S_IMODE(o.st_mode) & 0o022), "
        "cold_kernels(model_kernels(), 'float32'))"
    )
    for user in ("1000:1000", "4242:4242"):
        r = subprocess.run(
            ["docker", "run", "--rm", "--user", user, "convpipe:latest", "python", "-c", code],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["True", "0o700", "True", "0", "0o0", "[]"], (user, r.stdout)
