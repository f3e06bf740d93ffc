"""docker-compose.yml (and its TLS override) as docker-compose reads it.

With Debian's ``docker-compose`` installed (CI installs it), the files are read by
``docker-compose config``, which validates them and resolves anchors, variables and the
override; without it the YAML is read directly. No Docker engine is needed either way.
The same topology runs from real processes in tests/cluster/test_compose_topology.py.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
HAVE_COMPOSE = shutil.which("docker-compose") is not None


def compose_config(*files: str, env: dict | None = None) -> dict:
    if HAVE_COMPOSE:
        args = ["docker-compose"] + [a for f in files for a in ("-f", f)] + ["config"]
        r = subprocess.run(
            args,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **(env or {})},
        )
        assert r.returncode == 0, r.stderr
        return yaml.safe_load(r.stdout)
    # no docker-compose here: the YAML itself, ${VAR:-default} substituted and the override
    # merged by hand per service
    environ = {**os.environ, **(env or {})}

    def load(name: str) -> dict:
        text = re.sub(
            r"\$\{(\w+)(?::?-([^}]*))?\}",
            lambda m: environ.get(m.group(1)) or m.group(2) or "",
            (REPO / name).read_text().replace("$$", "\0"),
        )
        return yaml.safe_load(text.replace("\0", "$"))

    merged = load(files[0])
    for f in files[1:]:
        for name, svc in load(f)["services"].items():
            base = merged["services"][name]
            for key, value in svc.items():
                if key == "volumes":
                    base["volumes"] = list(base.get("volumes", [])) + list(value)
                elif key == "environment":
                    base["environment"] = {**base.get("environment", {}), **value}
                else:
                    base[key] = value
    return merged


def command(svc: dict) -> list[str]:
    cmd = svc["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def mounts(svc: dict) -> dict[str, str]:
    """{container path: source} of a service's volumes, in either notation."""
    out = {}
    for v in svc.get("volumes", []):
        if isinstance(v, dict):
            out[v["target"]] = v["source"]
        else:
            parts = v.split(":")
            out[parts[1]] = os.path.normpath(os.path.join(REPO, parts[0]))
    return out


def published(svc: dict) -> list[str]:
    out = []
    for p in svc.get("ports", []):
        out.append(
            f"{p['host_ip']}:{p['published']}:{p['target']}" if isinstance(p, dict) else str(p)
        )
    return out


@pytest.fixture(scope="module")
def config():
    return compose_config("docker-compose.yml")


def test_services(config):
    assert set(config["services"]) == {"scheduler", "worker", "job"}


def test_scheduler_and_dashboard_are_published_on_loopback_only(config):
    ports = published(config["services"]["scheduler"])
    assert sorted(p.split(":", 1)[1].split("/")[0] for p in ports) == ["8786:8786", "8787:8787"]
    for p in ports:
        assert p.startswith("127.0.0.1:"), p
    for name in ("worker", "job"):
        assert not published(config["services"][name]), name


def test_two_workers_by_default_each_one_process_one_thread_with_limits(config):
    w = config["services"]["worker"]
    assert w.get("scale", w.get("deploy", {}).get("replicas")) == 2
    args = command(w)
    assert args[:3] == ["dask", "worker", "tcp://scheduler:8786"]
    assert option(args, "--nworkers") == "1" and option(args, "--nthreads") == "1"
    assert option(args, "--memory-limit") == "auto"  # Dask reads the container's limit
    assert float(w["cpus"]) == 1.0
    assert str(w["mem_limit"]).lower() in ("4g", "4294967296")
    assert w["depends_on"]["scheduler"]["condition"] == "service_healthy"
    assert "container_name" not in w  # a fixed name would forbid --scale worker=N


def test_workers_thin_dasks_diagnostics_as_the_embedded_cluster_does(config):
    from pipeline.cluster import QUIET_DIAGNOSTICS

    env = config["services"]["worker"]["environment"]
    expected = {
        "DASK_" + key.upper().replace(".", "__").replace("-", "_"): str(value)
        for key, value in QUIET_DIAGNOSTICS.items()
    }
    assert {k: str(env.get(k)) for k in expected} == expected
    # Dask reads them as the settings themselves
    import dask.config

    parsed = dask.config.collect_env({k: str(v) for k, v in expected.items()})
    for (
        key,
        value,
    ) in QUIET_DIAGNOSTICS.items():  # hyphens in keys read back from the env's underscores
        assert dask.config.get(key, config=parsed) == value, key


def test_limits_follow_the_environment():
    cfg = compose_config(
        "docker-compose.yml", env={"CONVPIPE_WORKER_CPUS": "2", "CONVPIPE_WORKER_MEMORY": "6g"}
    )
    if not HAVE_COMPOSE:
        pytest.skip("variable substitution needs docker-compose")
    w = cfg["services"]["worker"]
    assert float(w["cpus"]) == 2.0 and str(w["mem_limit"]).lower() in ("6g", str(6 * 2**30))


def test_scheduler_command_and_health(config):
    s = config["services"]["scheduler"]
    args = command(s)
    assert args[:2] == ["dask", "scheduler"] and option(args, "--port") == "8786"
    assert "8787/health" in " ".join(s["healthcheck"]["test"])


def test_every_service_shares_the_data_root_at_the_specs_paths(config):
    roots = {
        name: mounts(svc).get("/srv/convpipe/data") for name, svc in config["services"].items()
    }
    assert len(set(roots.values())) == 1 and None not in roots.values(), roots
    for svc in config["services"].values():
        assert svc["working_dir"] == "/srv/convpipe"  # so data/cifar10.zarr is on the shared volume
        assert svc["environment"]["CONVPIPE_SCHEDULER"] == "tcp://scheduler:8786"


def test_the_one_shot_job_prepares_then_trains(config):
    job = config["services"]["job"]
    assert job.get("restart", "no") == "no"
    text = " ".join(command(job))
    prep, train = text.index("jobs/prepare-cifar10.toml"), text.index("CONVPIPE_TRAIN_SPEC")
    assert prep < train and "&&" in text[prep:train]
    assert job["environment"]["CONVPIPE_TRAIN_SPEC"] == "jobs/train-three-layer.toml"
    assert job["environment"]["CONVPIPE_PREPARE_SPEC"] == "jobs/prepare-cifar10.toml"
    assert (
        "$${CONVPIPE_PREPARE_SPEC:-jobs/prepare-cifar10.toml}" in text
        or "${CONVPIPE_PREPARE_SPEC:-jobs/prepare-cifar10.toml}" in text
    )
    for spec in ("prepare-cifar10", "train-three-layer"):
        assert (REPO / "jobs" / f"{spec}.toml").exists()


def test_tls_override_turns_every_connection_to_tls():
    cfg = compose_config("docker-compose.yml", "docker-compose.tls.yml")
    s, w, j = (cfg["services"][n] for n in ("scheduler", "worker", "job"))
    sargs, wargs = command(s), command(w)
    assert option(sargs, "--protocol") == "tls"
    assert (
        option(sargs, "--tls-cert") == "/certs/scheduler.pem"
        and option(sargs, "--tls-ca-file") == "/certs/ca.pem"
    )
    assert wargs[2] == "tls://scheduler:8786" and option(wargs, "--tls-cert") == "/certs/worker.pem"
    for svc in (s, w, j):
        m = mounts(svc)
        assert "/certs" in m and "/srv/convpipe/data" in m
        env = svc["environment"]
        assert env["CONVPIPE_SCHEDULER"] == "tls://scheduler:8786"
        assert (env["CONVPIPE_TLS_CA_FILE"], env["CONVPIPE_TLS_CERT"], env["CONVPIPE_TLS_KEY"]) == (
            "/certs/ca.pem",
            "/certs/client.pem",
            "/certs/client-key.pem",
        )
    assert all(p.startswith("127.0.0.1:") for p in published(s))


def test_dockerfile_installs_convpipe_and_warms_numbas_cache():
    text = (REPO / "Dockerfile").read_text()
    lines = [l.strip() for l in text.splitlines() if l.strip() and not l.strip().startswith("#")]
    for line in lines:
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (REPO / src).exists() or src == "README.md", (
                    f"Dockerfile copies missing {src}"
                )
    assert any(l.startswith("RUN pip install") for l in lines)
    warm = next(l for l in lines if "pipeline.warmup" in l)
    assert "python -m pipeline.warmup" in warm
    assert "NUMBA_CACHE_DIR" in text
    import pipeline.warmup  # the module the image runs exists and imports

    assert callable(pipeline.warmup.main)
    assert "data" in (REPO / ".dockerignore").read_text().split()


def test_both_schedulers_serve_the_convpipe_page():
    """The TLS override replaces the scheduler's command: it keeps the dashboard's preload."""
    for files in (("docker-compose.yml",), ("docker-compose.yml", "docker-compose.tls.yml")):
        scheduler = compose_config(*files)["services"]["scheduler"]
        text = " ".join(command(scheduler))
        assert "--preload pipeline.dashboard" in text, (files, text)


def test_both_compose_files_workers_hand_their_data_over_when_stopped():
    """The TLS override replaces the worker's command: it keeps the nanny's retire preload."""
    for files in (("docker-compose.yml",), ("docker-compose.yml", "docker-compose.tls.yml")):
        worker = compose_config(*files)["services"]["worker"]
        text = " ".join(command(worker))
        assert "--preload-nanny pipeline.jobs.retire" in text, (files, text)
