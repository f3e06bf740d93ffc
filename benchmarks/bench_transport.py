"""Training throughput by transport, side by side on one machine: the embedded cluster with
shared memory, the embedded cluster with ``--transport tcp``, and the docker-compose cluster
(containers are separate hosts: tcp). Same settings for the three: 2 workers of one thread,
batch 256, the seed's three-layer net, ``--steps`` steps; each in a fresh process.

Prints images/s (training time: the step loop and checkpoints, accuracy evaluation not), the
ratio to shared memory, and the mean per-step breakdown from each run's summary.json
(``step_breakdown_s``: read, compute, reduce, sync, coordinator, checkpoint).

    python benchmarks/bench_transport.py [--store data/cifar10.zarr] [--steps 40] [--no-compose]

The compose run needs a Docker engine (../shared/docker/engine.sh start); it builds the image
(cached), brings up a project of its own (scheduler + 2 workers) on free ports with a
temporary data root holding a copy of the store, submits the train job from the host, and
takes the project down again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS = ("read", "compute", "reduce", "sync", "coordinator", "checkpoint")


def parse_args():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--store", default=str(REPO / "data" / "cifar10.zarr"))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-compose", action="store_true", help="only the two embedded runs")
    return p.parse_args()


def settings(args) -> list[str]:
    return [
        "--batch-size",
        str(args.batch_size),
        "--steps",
        str(args.steps),
        "--checkpoint-every",
        str(args.steps),
        "--eval-every",
        str(args.steps),
    ]


def convpipe(*argv, env=None, cwd=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipeline.cli", *map(str, argv)]
    r = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd
    )
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[2:])} failed:\n{r.stderr[-3000:]}")
    return r


def embedded(args, tmp: Path, transport: str) -> dict:
    out = tmp / f"embedded-{transport}"
    convpipe(
        "train",
        "--data",
        args.store,
        "--out",
        out,
        "--workers",
        args.workers,
        "--transport",
        transport,
        *settings(args),
    )
    return json.loads((out / "summary.json").read_text())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compose(args, tmp: Path) -> dict:
    root = tmp / "compose-data"
    root.mkdir()
    shutil.copytree(args.store, root / "cifar10.zarr")
    port = _free_port()
    env = {
        **os.environ,
        "CONVPIPE_DATA": str(root),
        "CONVPIPE_UID": str(os.getuid()),
        "CONVPIPE_GID": str(os.getgid()),
        "CONVPIPE_SCHEDULER_PORT": str(port),
        "CONVPIPE_DASHBOARD_PORT": str(_free_port()),
    }
    base = [
        "docker-compose",
        "-p",
        f"convpipe-bench-{uuid.uuid4().hex[:8]}",
        "-f",
        str(REPO / "docker-compose.yml"),
    ]

    def dc(*argv, check=True):
        r = subprocess.run([*base, *argv], cwd=REPO, env=env, capture_output=True, text=True)
        if check and r.returncode != 0:
            raise SystemExit(f"docker-compose {' '.join(argv)} failed:\n{r.stderr[-3000:]}")
        return r

    try:
        dc("build")
        dc("up", "-d", "--scale", f"worker={args.workers}", "scheduler", "worker")
        address = f"tcp://127.0.0.1:{port}"
        sets = [
            a
            for s in (
                f"batch-size={args.batch_size}",
                f"steps={args.steps}",
                f"checkpoint-every={args.steps}",
                f"eval-every={args.steps}",
            )
            for a in ("--set", s)
        ]
        r = convpipe(
            "submit",
            REPO / "jobs" / "train-three-layer.toml",
            "--scheduler",
            address,
            *sets,
            "--set",
            "name=bench-transport",
            "--follow",
            "--timeout",
            "300",
            env={"CONVPIPE_SCHEDULER": "", "CONVPIPE_TLS_CA_FILE": ""},
        )
        job = r.stdout.split()[0]
        return json.loads((root / "runs" / job / "summary.json").read_text())
    finally:
        dc("down", "-v", "--remove-orphans", "--timeout", "5", check=False)


def row(name: str, s: dict, ref: float | None) -> str:
    b = s.get("step_breakdown_s") or {}
    ratio = f"{s['images_per_s'] / ref:5.2f}x" if ref else "  -   "
    parts = "  ".join(f"{b.get(k, float('nan')) * 1e3:8.1f}" for k in PARTS)
    return f"{name:22} {s['transport']:>9} {s['images_per_s']:9.1f} {ratio}  {parts}"


def main():
    args = parse_args()
    from pipeline.fast_layers import machine_text  # the CPU and the kernels' vector width

    print(machine_text())
    with tempfile.TemporaryDirectory(prefix="bench-transport-") as tmp:
        tmp = Path(tmp)
        runs = [
            ("embedded, shm", embedded(args, tmp, "shm")),
            ("embedded, tcp", embedded(args, tmp, "tcp")),
        ]
        if not args.no_compose:
            t = time.perf_counter()
            runs.append(("compose (containers)", compose(args, tmp)))
            print(f"(compose: build, up, train, down in {time.perf_counter() - t:.0f} s)")
    print(
        f"{args.workers} workers x 1 thread, batch {args.batch_size}, {args.steps} steps; "
        f"per-step breakdown in ms"
    )
    print(
        f"{'run':22} {'transport':>9} {'images/s':>9} {'vs shm':>6}  "
        + "  ".join(f"{k:>8}" for k in PARTS)
    )
    ref = runs[0][1]["images_per_s"]
    for name, s in runs:
        print(row(name, s, ref))


if __name__ == "__main__":
    main()
