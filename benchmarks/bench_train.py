"""Data-parallel training speed and accuracy: one epoch of CIFAR-10 on the embedded cluster.

    python benchmarks/bench_train.py                       # 2 workers x 1 thread, batch 256, no norm + spatial BN
    python benchmarks/bench_train.py --norms none --workers 1,2 --transports shm,tcp --steps 60

For each setting it trains with ``pipeline.training.train`` (the same code path as ``convpipe
train``) and prints images/s of the training loop, the wall time, the per-step breakdown
(read, compute on the busiest worker, transfer/scheduling, reduce, Adam, BN sync, plus
checkpoint and evaluation averaged per step) and train/val accuracy after the epoch.
The issue's reference figures (PyTorch, measured on this 2-core machine by the issue's
author, not here): DDP gloo 2x1 2,029 images/s; one process with 2 threads 2,421 images/s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

# PyTorch's OpenMP runtime reads OMP_WAIT_POLICY when torch loads: load it before pipeline
# (which sets PASSIVE for its own kernels), so the reference runs with torch's default policy.
try:  # noqa: SIM105
    import torch  # noqa: F401
except ImportError:
    pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/cifar10.zarr")
    ap.add_argument("--workers", default="2", help="comma-separated worker counts")
    ap.add_argument("--norms", default="none,spatial_batchnorm")
    ap.add_argument("--transports", default="auto")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--shard-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--torch-steps", type=int, default=40,
                    help="steps of the same network in PyTorch, one process x 2 threads, side by side (0: skip)")
    args = ap.parse_args()

    from pipeline.training import TrainConfig, train
    from pipeline.cluster import worker_cluster

    print(f"convpipe bench_train: {os.cpu_count()} CPUs, data {args.data}, global batch {args.batch_size}, "
          f"shard {args.shard_size}, {'%d steps' % args.steps if args.steps else '%d epoch(s)' % args.epochs}; "
          f"load average {_load()}")
    torch_rate = _torch_reference(args.data, args.batch_size, args.torch_steps) if args.torch_steps else None
    rows = []
    for workers in [int(w) for w in args.workers.split(",")]:
        t0 = time.perf_counter()
        with worker_cluster(workers=workers, threads_per_worker=1) as client:
            start = time.perf_counter() - t0
            print(f"\n{workers} worker(s) x 1 thread: cluster up in {start:.1f} s")
            for norm in args.norms.split(","):
                for transport in args.transports.split(","):
                    out = tempfile.mkdtemp(prefix="bench-train-")
                    config = TrainConfig(data=args.data, batch_size=args.batch_size, shard_size=args.shard_size,
                                         epochs=args.epochs, steps=args.steps, norm=norm, transport=transport,
                                         checkpoint_every=args.checkpoint_every, seed=args.seed,
                                         out=os.path.join(out, "run"))
                    t = time.perf_counter()
                    s = train(config, client=client)
                    wall = time.perf_counter() - t
                    rows.append((workers, norm, s, wall))
                    _report(workers, norm, s, wall)
    print("\nsummary")
    print(f"{'workers':>7} {'norm':>18} {'transport':>9} {'images/s':>9} {'wall s':>7} {'train acc':>9} {'val acc':>8}")
    for workers, norm, s, wall in rows:
        print(f"{workers:>7} {norm:>18} {s['transport']:>9} {s['images_per_s']:>9,.0f} {wall:>7.1f} "
              f"{_pct(s['train_acc']):>9} {_pct(s['val_acc']):>8}")
    if torch_rate:
        print(f"PyTorch side by side (same net, Adam, batch {args.batch_size}, 1 process x 2 threads, "
              f"{args.torch_steps} steps, data in memory): {torch_rate:,.0f} images/s; ratios: "
              + ", ".join(f"{w}w {n}: {s['images_per_s'] / torch_rate:.2f}x" for w, n, s, _ in rows))
    print(f"load average at the end {_load()} (other processes on the machine slow every figure)")
    print("reference (issue, PyTorch on this machine): DDP gloo 2x1 2,029 images/s; 1 process x 2 threads 2,421")
    return 0


def _torch_reference(data: str, batch: int, steps: int) -> float | None:
    """images/s of the same training step in PyTorch (2 threads), or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    import numpy as np

    from pipeline.data import open_store

    from torch_reference import three_layer_net

    torch.set_num_threads(2)
    store = open_store(data)
    X, y = store.read("train", np.arange(min(store.splits["train"], batch * 8)))
    X, y = torch.from_numpy(X), torch.from_numpy(y)
    net, _ = three_layer_net(torch)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def step(i):
        lo = (i * batch) % (len(y) - batch + 1)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(X[lo:lo + batch]), y[lo:lo + batch])
        loss.backward()
        opt.step()

    for i in range(3):
        step(i)
    t = time.perf_counter()
    for i in range(steps):
        step(i)
    return steps * batch / (time.perf_counter() - t)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _pct(v):
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _report(workers, norm, s, wall):
    b = s["step_breakdown_s"]
    steps = s["steps_this_session"]
    step_ms = 1e3 * s["train_seconds"] / steps
    print(f"  norm={norm} transport={s['transport']}: {s['images']} images in {steps} steps; "
          f"training {s['train_seconds']:.1f} s (checkpoints included, accuracy evaluation not) = "
          f"{s['images_per_s']:,.0f} images/s; wall {wall:.1f} s (everything: run directory, worker warm-up "
          f"{s.get('warmup_s', 0):.1f} s, evaluation, plots)")
    print(f"    per step {step_ms:.1f} ms: read {1e3 * b['read']:.1f}, compute {1e3 * b['compute']:.1f} "
          f"(busiest worker, incl. writing its gradient sum), transfer+scheduling {1e3 * b['transfer']:.1f}, "
          + (f"L2 sum of squares + loss check {1e3 * b['reduce']:.1f}, reduce+L2+Adam fused {1e3 * b['adam']:.1f}, "
             if s.get("fused_update") else f"reduce {1e3 * b['reduce']:.1f}, Adam {1e3 * b['adam']:.1f}, ")
          + f"BN sync {1e3 * b['bn_sync']:.2f}; "
          f"checkpoints {1e3 * b['checkpoint']:.1f}, evaluation {1e3 * b['eval']:.1f} (per step)")
    print(f"    train acc {_pct(s['train_acc'])}, val acc {_pct(s['val_acc'])}, final loss {s['final_loss']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
