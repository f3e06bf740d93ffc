"""The inputs of docs/scaling.md's cost model, measured on this machine, and what it predicts.

    python benchmarks/bench_costs.py [--data data/cifar10.zarr]

Measures, one process, one thread each (a worker's view): the model's forward+backward per
image at shard sizes 128, 64, 32 and 16, its gradient sum going into a tree node as a worker's
does it (``loss(X, y, into=..., scale=n)``); adding two tree nodes (per parameter); reduce +
L2 + Adam of a slice (tree_update, per parameter and frontier node); Dask's cost per task on the
embedded cluster. Then prints the model's step time and images/s for W workers on one host
(shared memory) and for hosts x workers over a network.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def best(fn, repeat: int = 7) -> float:
    """Best of ``repeat`` timings (s): the machine is shared, the minimum is the cost."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", default="data/cifar10.zarr")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument(
        "--link-gbit", type=float, default=10.0, help="network of the multi-host prediction"
    )
    args = ap.parse_args()
    from pipeline.fast_layers import machine_text  # the CPU and the kernels' vector width

    print(machine_text())

    import numba
    import numpy as np

    from pipeline.cnn import ThreeLayerConvNet
    from pipeline.data import open_store
    from pipeline.training.plan import CHUNK, StepPlan, covers
    from pipeline.training.reduce import tree_update
    from pipeline.training.update import adam_scalars

    numba.set_num_threads(1)
    store = open_store(args.data)
    model = ThreeLayerConvNet(
        hidden_dim=500, weight_scale=1e-3, reg=0.0, dtype=np.float32
    )  # the seed network
    P = sum(p.size for p in model.params.values())
    print(
        f"convpipe bench_costs: P = {P:,} parameters, float32, one thread; load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )

    per_image = {}
    for shard in (128, 64, 32, 16):
        X, y = store.read("train", np.arange(shard))
        node = {name: np.zeros_like(p) for name, p in model.params.items()}
        model.loss(X, y, into=node, scale=np.float32(shard))
        per_image[shard] = (
            best(lambda: model.loss(X, y, into=node, scale=np.float32(shard))) / shard
        )
        print(
            f"  compute, shard {shard:>3}: {1e3 * per_image[shard]:.3f} ms per image (forward + "
            "backward, its gradient sum into its tree node)"
        )

    slot, other = np.zeros(P, np.float32), np.ones(P, np.float32)
    add = best(lambda: np.add(slot, other, out=slot)) / P
    print(f"  one tree addition (two nodes of a worker's part): {1e9 * add:.2f} ns per parameter")

    update = {}
    for nodes in (1, 2, 4):
        plan = StepPlan.make(nodes, nodes, P)
        rows = [covers(n, nodes)[0] for n in plan.nodes()]
        ops, root = plan.program()
        slots = np.random.default_rng(1).standard_normal((nodes, P)).astype(np.float32)
        state = tuple(np.zeros(P, np.float32) for _ in range(3))
        out = tuple(np.zeros(P, np.float32) for _ in range(3))
        scal = adam_scalars({}, np.float32)
        run = lambda: tree_update(  # noqa: E731
            slots, rows, ops, root, 0, state, out, 0, 0, P, [(0, P, 1e-3)], CHUNK, 256, scal
        )
        run()
        update[nodes] = best(run, 5) / P
        print(
            f"  reduce + L2 + Adam from {nodes} node(s): {1e9 * update[nodes]:.2f} ns per parameter"
        )

    task = _task_cost()
    print(
        f"  Dask: {1e3 * task:.2f} ms per task (200 tasks submitted at once, until all results are "
        "back; embedded cluster, 2 workers)"
    )

    print(
        "\nmodel: a worker's step = its shards' compute (their gradient sums into tree nodes) + "
        "the additions"
        "\n       of two nodes (a leaf is added into its left sibling as it is computed: m "
        "shards, m/2 - 1 of them)"
        "\n       + reduce/L2/Adam of P/W parameters from W nodes + (tcp) 2 P (W-1)/W x 4 bytes "
        "over the link;"
        "\n       the coordinator's step = (W tasks shm, 5W tasks tcp) x Dask's cost per "
        "task, in parallel"
        "\n       with the workers (parts are submitted a step ahead): step time = the larger of "
        "the two"
    )
    B = args.batch_size
    link = args.link_gbit * 1e9 / 8
    per_node = update[2] - update[1]
    print(f"\n{'where':>24} {'W':>3} {'shard':>5} {'worker ms':>9} {'coord ms':>8} {'images/s':>9}")
    for label, W, hosts in [
        ("one host, shm", 1, 1),
        ("one host, shm", 2, 1),
        ("one host, shm", 4, 1),
        ("one host, shm", 8, 1),
        ("one host, shm", 16, 1),
        (f"4 hosts x 4, {args.link_gbit:g} Gb/s", 16, 4),
        (f"16 hosts x 4, {args.link_gbit:g} Gb/s", 64, 16),
    ]:
        k = max(W, B // 128)  # shards per step: at least one per worker
        shard = B // k
        c = per_image[min(per_image, key=lambda s: abs(s - shard))]
        mine = -(-k // W)  # shards of the busiest worker
        compute = mine * shard * c + max(0, mine // 2 - 1) * P * add
        reduce = (update[1] + (W - 1) * per_node) * P / W
        net = 2 * P * (W - 1) / W * 4 / link if hosts > 1 else 0.0
        worker = compute + reduce + net
        coordinator = (W if hosts == 1 else 5 * W) * task  # tcp: part, update, 3 small ones
        step = max(worker, coordinator)
        print(
            f"{label:>24} {W:>3} {shard:>5} {1e3 * worker:>9.1f} {1e3 * coordinator:>8.1f} "
            f"{B / step:>9,.0f}"
        )
    return 0


def _task_cost() -> float:
    """Seconds of the coordinator and scheduler per task, when many are in flight (throughput)."""
    from pipeline.cluster import worker_cluster

    def nothing(x):
        return x

    with worker_cluster(workers=2, threads_per_worker=1) as client:
        client.gather([client.submit(nothing, i, pure=False) for i in range(20)])

        def batch():
            client.gather([client.submit(nothing, i, pure=False) for i in range(200)])

        return best(batch, 3) / 200


if __name__ == "__main__":
    sys.exit(main())
