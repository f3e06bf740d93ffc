"""Data-parallel training speed and accuracy on the embedded cluster, against PyTorch DDP.

    # 2 workers x 1 thread, batch 256, one epoch, vs DDP 2x1
    python benchmarks/bench_train.py
    python benchmarks/bench_train.py --norms none --shard-sizes 128,64,32,16 --steps 40 --no-ddp
    # 8 shards of 32 against 2 of 128, alternating twice (each ratio from runs back to back)
    python benchmarks/bench_train.py --shard-sizes 128,32 --rounds 2
    # bytes per step
    python benchmarks/bench_train.py --workers 1,2,3 --transports tcp --steps 20 --no-ddp

For each setting it trains with ``pipeline.training.train`` (the same code path as ``convpipe
train``) and prints images/s of the training loop, the per-step breakdown (reading images,
compute and reduce+Adam on the busiest worker, a worker's wait for the others, the
coordinator's own time per step, checkpoints, which it counts and the reference does not write),
the bytes per step in and out of the coordinator and of each worker, and train/val accuracy,
scored at the end only unless ``--eval-every`` says more. Side by side in the same run, PyTorch
DDP (gloo) with as many processes as workers, one thread each, the same network and global batch
(``ddp_reference.py``, in its own processes: torch never shares a process with convpipe).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
NO_MID_RUN_SCORING = 10**9  # --eval-every past the run's end: it scores once, at the end


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", default="data/cifar10.zarr")
    ap.add_argument("--workers", default="2", help="comma-separated worker counts")
    ap.add_argument("--norms", default="none")
    ap.add_argument("--transports", default="auto")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--shard-sizes", default="128", help="comma-separated shard sizes")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="score val and train samples every K steps (default: only at the end, as the DDP "
        "reference does; scoring is off the clock, but each one drains the step pipeline)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-ddp", action="store_true", help="skip the PyTorch DDP reference")
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="train every shard size this many times, alternating (A B A B): each round's ratio "
        "to the first shard size is from two runs back to back, not minutes apart",
    )
    args = ap.parse_args()
    from pipeline.fast_layers import machine_text  # the CPU and the kernels' vector width

    print(machine_text())

    from pipeline.cluster import worker_cluster
    from pipeline.training import TrainConfig, train

    print(
        f"convpipe bench_train: {os.cpu_count()} CPUs, data {args.data}, "
        f"global batch {args.batch_size}, "
        f"{'%d steps' % args.steps if args.steps else '%d epoch(s)' % args.epochs}; "
        f"load average {_load()}"
    )
    rows, ddp = [], {}
    for workers in [int(w) for w in args.workers.split(",")]:
        if not args.no_ddp:
            ddp[workers] = _ddp(args, workers)
        t0 = time.perf_counter()
        with worker_cluster(workers=workers, threads_per_worker=1) as client:
            print(
                f"\n{workers} worker(s) x 1 thread: cluster up in {time.perf_counter() - t0:.1f} s"
            )
            for norm in args.norms.split(","):
                for transport in args.transports.split(","):
                    for rnd, shard in _alternating(args.shard_sizes, args.rounds):
                        out = tempfile.mkdtemp(prefix="bench-train-")
                        config = TrainConfig(
                            data=args.data,
                            batch_size=args.batch_size,
                            shard_size=shard,
                            epochs=args.epochs,
                            steps=args.steps,
                            norm=norm,
                            transport=transport,
                            checkpoint_every=args.checkpoint_every,
                            eval_every=args.eval_every or NO_MID_RUN_SCORING,
                            seed=args.seed,
                            out=os.path.join(out, "run"),
                        )
                        before = _worker_bytes(client)
                        t = time.perf_counter()
                        s = train(config, client=client)
                        wall = time.perf_counter() - t
                        moved = _per_step(before, _worker_bytes(client), s["steps_this_session"])
                        rows.append((workers, norm, shard, s, wall, rnd))
                        _report(workers, norm, shard, s, wall, moved)
    print("\nsummary")
    print(
        f"{'workers':>7} {'norm':>18} {'shard':>5} {'transport':>9} {'round':>5} {'images/s':>9} "
        f"{'coord ms':>8} {'train acc':>9} {'val acc':>8} {'vs DDP':>7} {'vs 1st shard':>12}"
    )
    first = {}  # (workers, norm, transport, round) -> images/s of the round's first shard size
    for workers, norm, shard, s, wall, rnd in rows:
        ref = ddp.get(workers)
        ratio = f"{s['images_per_s'] / ref['images_per_s']:.2f}x" if ref else "n/a"
        key = (workers, norm, s["transport"], rnd)
        base = first.setdefault(key, s["images_per_s"])
        print(
            f"{workers:>7} {norm:>18} {shard:>5} {s['transport']:>9} {rnd + 1:>5} "
            f"{s['images_per_s']:>9,.0f} "
            f"{1e3 * s['step_breakdown_s'].get('coordinator', 0):>8.2f} {_pct(s['train_acc']):>9} "
            f"{_pct(s['val_acc']):>8} {ratio:>7} {s['images_per_s'] / base:>11.2f}x"
        )
    for workers, ref in ddp.items():
        if ref:
            print(
                f"PyTorch DDP gloo {workers} x 1 thread, batch {args.batch_size}, {ref['steps']} "
                f"steps: {ref['images_per_s']:,.0f} images/s, val acc {_pct(ref['val_acc'])}"
            )
    print(f"load average at the end {_load()} (other processes on the machine slow every figure)")
    return 0


def _alternating(shard_sizes: str, rounds: int) -> list[tuple[int, int]]:
    """(round, shard size) in the order they train: every size once per round."""
    sizes = [int(x) for x in shard_sizes.split(",")]
    return [(r, shard) for r in range(max(1, rounds)) for shard in sizes]


def _ddp(args, ranks: int) -> dict | None:
    """PyTorch DDP's images/s with ``ranks`` processes x 1 thread (its own processes), or None."""
    cmd = [
        sys.executable,
        os.path.join(HERE, "ddp_reference.py"),
        "--data",
        args.data,
        "--ranks",
        str(ranks),
        "--threads",
        "1",
        "--batch-size",
        str(args.batch_size),
        "--epochs",
        str(args.epochs),
        "--seed",
        str(args.seed),
    ]
    if args.steps:
        cmd += ["--steps", str(args.steps)]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT")
    }
    got = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if got.returncode:
        print(
            f"PyTorch DDP reference skipped: {(got.stderr.strip().splitlines() or ['failed'])[-1]}"
        )
        return None
    return json.loads(got.stdout.strip().splitlines()[-1])


def _worker_bytes(client) -> dict:
    """Bytes each worker has sent to and received from other workers so far."""

    def counts(dask_worker):
        got = sum(e.get("total", 0) for e in dask_worker.transfer_incoming_log)
        return dask_worker.transfer_outgoing_bytes_total, got

    return client.run(counts)


def _per_step(before: dict, after: dict, steps: int) -> dict:
    return {
        w: (
            (after[w][0] - before.get(w, (0, 0))[0]) / max(1, steps),
            (after[w][1] - before.get(w, (0, 0))[1]) / max(1, steps),
        )
        for w in after
    }


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _pct(v):
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _report(workers, norm, shard, s, wall, moved):
    b = s["step_breakdown_s"]
    steps = s["steps_this_session"]
    step_ms = 1e3 * s["train_seconds"] / steps
    print(
        f"  norm={norm} shard={shard} transport={s['transport']}: {s['images']} images in {steps} "
        f"steps; training {s['train_seconds']:.1f} s (checkpoints included, accuracy evaluation "
        f"not) = {s['images_per_s']:,.0f} images/s; wall {wall:.1f} s (warm-up "
        f"{s.get('warmup_s', 0):.1f} s, evaluation, plots)"
    )
    print(
        f"    per step {step_ms:.1f} ms: read {1e3 * b['read']:.1f} (overlapped), compute "
        f"{1e3 * b['compute']:.1f}, reduce+L2+Adam of a slice {1e3 * b['reduce']:.1f} (busiest "
        f"worker), wait for the others {1e3 * b['sync']:.1f}, coordinator "
        f"{1e3 * b['coordinator']:.2f}, checkpoints {1e3 * b['checkpoint']:.1f}"
    )
    per = " ".join(f"{out / 1e6:.1f}/{got / 1e6:.1f}" for out, got in moved.values())
    print(
        f"    bytes per step: coordinator out {s.get('coordinator_bytes_out', 0) / 1e3:.1f} kB, "
        f"in {s.get('coordinator_bytes_in', 0) / 1e3:.1f} kB; workers out/in MB: {per}"
    )
    print(
        f"    train acc {_pct(s['train_acc'])}, val acc {_pct(s['val_acc'])}, final loss "
        f"{s['final_loss']:.3f}"
    )


if __name__ == "__main__":
    sys.exit(main())
