"""PyTorch DDP (gloo) reference for bench_train: the same network, data-parallel, in its own
processes.

    python benchmarks/ddp_reference.py --data data/cifar10.zarr --ranks 2 --threads 1 \\
        --batch-size 256

``--ranks`` processes of ``--threads`` threads each train the seed's three-layer network (conv
32x7x7 - relu - pool - affine 500 - relu - affine 10, softmax loss + 0.5 * reg * sum W**2, Adam
1e-3) with DistributedDataParallel over gloo, each rank on ``batch / ranks`` images of every
global batch, the training split in memory (loading not timed). Prints one JSON line: images/s over
the timed steps (after warm-up), and the validation accuracy after them.

Run by bench_train.py as a separate process, so that torch never shares a process (nor an
OpenMP runtime) with convpipe's kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _load(data: str, limit: int | None):
    # pipeline sets thread-runtime defaults when imported: keep this process's environment as
    # torch sees it
    saved = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT")}
    import numpy as np

    from pipeline.data import open_store

    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    store = open_store(data)
    n = store.splits["train"] if limit is None else min(limit, store.splits["train"])
    X, y = store.read("train", np.arange(n))
    Xv, yv = store.read("val", np.arange(store.splits.get("val", 0)))
    return X, y, Xv, yv


def _rank(rank: int, args, port: int, out) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist

    X, y, Xv, yv = _load(
        args.data, args.train_limit
    )  # after torch: its OpenMP settings are its own

    sys.path.insert(0, os.path.dirname(__file__))
    from torch_reference import three_layer_net

    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.ranks
    )
    net, weights = three_layer_net(torch, seed=args.seed)
    model = torch.nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    X, y = torch.from_numpy(X), torch.from_numpy(y)
    per_rank = args.batch_size // args.ranks
    steps_per_epoch = len(y) // args.batch_size
    total = args.steps or steps_per_epoch * args.epochs
    order = np.random.default_rng(args.seed).permutation(len(y))

    def step(i):
        j = i % steps_per_epoch
        idx = torch.from_numpy(
            order[
                j * args.batch_size + rank * per_rank : j * args.batch_size + (rank + 1) * per_rank
            ]
        )
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(X[idx]), y[idx])
        loss = loss + 0.5 * args.reg * sum((w * w).sum() for w in weights)
        loss.backward()
        opt.step()

    for i in range(args.warmup):
        step(i)
    dist.barrier()
    t = time.perf_counter()
    for i in range(args.warmup, args.warmup + total):
        step(i)
    dist.barrier()
    seconds = time.perf_counter() - t
    if rank == 0:
        with torch.no_grad():
            net.eval()
            correct = sum(
                int(
                    (
                        net(torch.from_numpy(Xv[i : i + 500])).argmax(1)
                        == torch.from_numpy(yv[i : i + 500])
                    ).sum()
                )
                for i in range(0, len(yv), 500)
            )
        out.put(
            {
                "ranks": args.ranks,
                "threads": args.threads,
                "batch_size": args.batch_size,
                "steps": total,
                "seconds": seconds,
                "images_per_s": total * args.batch_size / seconds,
                "val_acc": correct / max(1, len(yv)),
            }
        )
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", default="data/cifar10.zarr")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: the epochs)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--reg", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, args, port, out)) for r in range(args.ranks)]
    for p in procs:
        p.start()
    result = out.get()
    for p in procs:
        p.join()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
