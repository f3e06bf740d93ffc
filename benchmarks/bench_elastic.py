"""Workers joining and leaving a running job: how long each takes, and the tasks of a step.

    python benchmarks/bench_elastic.py [--data data/cifar10.zarr] [--widths 1,2,4,8]

1. Join (embedded cluster of worker processes, the three-layer net, shared memory): training
   starts on 1 worker; at step 5 a second worker process is started. Printed: seconds from the
   scale request to the worker's arrival at the scheduler, from its arrival to the end of its
   warm-up, and to the start of its first part (from the scheduler's task log).
2. Retire: at step 5 of a run on 2 worker processes, ``retire_workers`` of one; seconds until
   the call returns (its data handed over, the worker free) and the steps lost (none replayed).
3. Tasks per step, both transports, ``--widths`` in-process workers (no evaluation in the
   count): shared memory runs one step loop per worker for the whole run (W tasks in all, on
   a cluster that does not scale itself); tcp 5W a step.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _config(data: str, out: Path, **changes):
    from pipeline.training import TrainConfig

    settings = dict(
        data=data,
        out=str(out),
        train_limit=8192,
        batch_size=256,
        shard_size=64,
        epochs=1,
        eval_every=10**6,
        train_acc_samples=256,
        eval_samples=256,
        checkpoint_every=10**6,
    )
    settings.update(changes)
    return TrainConfig(**settings).validate()


def join(data: str, work: Path) -> None:
    from distributed import get_task_stream

    from pipeline.cluster import worker_addresses, worker_cluster
    from pipeline.training import train

    marks: dict = {}
    with worker_cluster(workers=1) as client, get_task_stream(client) as stream:
        cluster = client.cluster

        def progress(event):
            if event["event"] == "step" and event["step"] == 5 and "asked" not in marks:
                before = set(worker_addresses(client))
                marks["asked"] = time.time()
                cluster.scale(2)

                def arrival():  # off the coordinator's thread: the run goes on meanwhile
                    while len(worker_addresses(client)) < 2:
                        time.sleep(0.005)
                    marks["arrived"] = time.time()
                    marks["worker"] = (set(worker_addresses(client)) - before).pop()

                threading.Thread(target=arrival, daemon=True).start()
            if event["event"] == "workers" and event["change"] == "joined":
                marks["ready_step"] = event["step"]

        summary = train(
            _config(data, work / "join", transport="shm"), client=client, progress=progress
        )
        records = stream.data
    mine = [r for r in records if r["worker"] == marks.get("worker")]
    warm = [r for r in mine if str(r["key"]).startswith("warm-up-join")]
    parts = sorted(  # its part tasks, or its step loop (shared memory, a fixed-size cluster)
        r["startstops"][0]["start"] for r in mine if str(r["key"]).startswith(("part-", "steps-"))
    )
    print(
        f"join: arrival {marks['arrived'] - marks['asked']:.2f} s after the scale request; "
        f"warm-up done {warm[0]['startstops'][-1]['stop'] - marks['arrived']:.2f} s after "
        f"arrival; first part {parts[0] - marks['arrived']:.2f} s after arrival; "
        f"{summary['worker_changes']}"
        if warm and parts
        else f"join: the new worker took no part ({marks}, {summary['worker_changes']})"
    )


def retire(data: str, work: Path) -> None:
    from pipeline.cluster import worker_addresses, worker_cluster
    from pipeline.training import train

    for transport in ("shm", "tcp"):
        marks: dict = {}
        events = []
        with worker_cluster(workers=2) as client:

            def progress(event, client=client, marks=marks, events=events):
                events.append(event)
                if event["event"] == "step" and event["step"] == 5 and "asked" not in marks:
                    victim = worker_addresses(client)[-1]
                    t = time.time()
                    client.retire_workers([victim])
                    marks["asked"], marks["done"] = t, time.time()

            summary = train(
                _config(data, work / f"retire-{transport}", transport=transport),
                client=client,
                progress=progress,
            )
        replays = sum(e["event"] == "resumed" for e in events)
        print(
            f"retire ({transport}): retire_workers returned after "
            f"{marks['done'] - marks['asked']:.2f} s; replays {replays}; "
            f"{summary['worker_changes']}"
        )


def tasks_per_step(data: str, work: Path, widths: list[int]) -> None:
    from distributed import Client, LocalCluster, get_task_stream

    from pipeline.training import train

    steps = 12
    for transport in ("shm", "tcp"):
        row = []
        for w in widths:
            with (
                LocalCluster(
                    n_workers=w, threads_per_worker=1, processes=False, dashboard_address=None
                ) as cluster,
                Client(cluster) as client,
                get_task_stream(client) as stream,
            ):
                train(
                    _config(
                        data,
                        work / f"tasks-{transport}-{w}",
                        transport=transport,
                        steps=steps,
                        train_limit=4096,
                        shard_size=32,
                    ),
                    client=client,
                )
            keys = [str(r["key"]) for r in stream.data]  # filled as the stream closes
            counted = [k for k in keys if not k.startswith(("warm-up", "shard_predictions"))]
            row.append(f"{w}: {len(counted) / steps:.2f}")
        print(f"tasks per step ({transport}): " + ", ".join(row))


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", default="data/cifar10.zarr")
    ap.add_argument("--widths", default="1,2,4,8")
    args = ap.parse_args()
    from pipeline.fast_layers import machine_text

    print(machine_text())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        join(args.data, work)
        retire(args.data, work)
        tasks_per_step(args.data, work, [int(w) for w in args.widths.split(",")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
