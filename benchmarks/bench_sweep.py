"""Sweeps: successive halving against running every trial to the end, and a sweep's throughput
against a single training run's, side by side on one embedded cluster.

    # 27 trials of 81 steps, rungs 9, 27, 81; 2 workers, 2 trials at once
    python benchmarks/bench_sweep.py
    python benchmarks/bench_sweep.py --trials 9 --steps 9 --min-steps 1 --parallel 1

Measured (2-core shared machine, 2026-11-30): the same best trial (val_acc 0.362) at 25.9% of the
steps and 36% of the wall time; end to end 193 images/s with early stopping and 266 without,
against 168 for one run alone (1.15x and 1.58x). With min-steps 3 (rungs 3, 9, 27) the first
rung scores chance for every trial and the best is lost (0.235 against 0.289): choose min-steps
where learning shows. "loop" images/s sums per-step seconds, which overlap when trials train
at once: compare end to end then.

Both sweeps draw the same 27 trials (random search, lr and reg log-uniform) on a subset of the
real CIFAR-10 store; the early-stopping one keeps the best third at rungs of min-steps x 3^k.
Reported: the best trial of each and its val accuracy (the whole val split), the training steps
each used, and images/s: the training loop's (images over the seconds of every step line of
every trial, as a run's own images_per_s) and end to end (images over wall seconds, start-up,
scoring and bookkeeping included), against one run of a trial's length on the same cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def loop_rate(run_dirs) -> tuple[int, float]:
    """(images, seconds) of every step line of these run directories."""
    images = seconds = 0
    for d in run_dirs:
        for line in (Path(d) / "metrics.jsonl").read_text().splitlines():
            m = json.loads(line)
            if m.get("kind") == "step":
                images += m["n"]
                seconds += m["seconds"]
    return images, seconds


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", default="data/cifar10.zarr")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--trials", type=int, default=27)
    ap.add_argument("--steps", type=int, default=81, help="a trial's steps to the end")
    ap.add_argument("--min-steps", type=int, default=9)
    ap.add_argument("--reduction-factor", type=int, default=3)
    ap.add_argument("--train-limit", type=int, default=5000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--shard-size", type=int, default=32)
    ap.add_argument(
        "--parallel", type=int, default=2, help="trials training at once ([search] parallel)"
    )
    ap.add_argument(
        "--out", default=None, help="keep the sweeps here (default: a temporary directory)"
    )
    args = ap.parse_args()
    from pipeline.fast_layers import machine_text  # the CPU and the kernels' vector width

    print(machine_text())

    from distributed import Client, LocalCluster

    from pipeline.jobs.kinds import Sweep
    from pipeline.jobs.sweep import SweepPlan, SweepState, run_sweep
    from pipeline.training import train

    opts = {k: o.default for k, o in Sweep.options().items()}
    opts.update(
        data=os.path.abspath(args.data),
        steps=args.steps,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        num_filters=16,
        filter_size=5,
        hidden_dim=100,
        train_limit=args.train_limit,
        checkpoint_every=max(1, args.min_steps),
        train_acc_samples=256,
        eval_every=max(1, args.min_steps),
        eval_samples=250,
    )
    opts["search"] = {
        "method": "random",
        "trials": args.trials,
        "seed": 0,
        "parallel": args.parallel,
        "lr": {"log-uniform": [1e-4, 3e-2]},
        "reg": {"log-uniform": [1e-5, 1e-1]},
    }
    halving = SweepPlan.from_options(
        {
            **opts,
            "early_stopping": {
                "min-steps": args.min_steps,
                "reduction-factor": args.reduction_factor,
            },
        }
    )
    to_the_end = SweepPlan.from_options({**opts, "early_stopping": None})
    root = Path(args.out or tempfile.mkdtemp(prefix="bench-sweep-"))
    results = {}
    with (
        LocalCluster(
            n_workers=args.workers, threads_per_worker=1, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        # one run of a trial's length first (it also warms the workers up for both sweeps)
        single_cfg = to_the_end.trial_config(
            to_the_end.search.settings()[0], str(root / "warm"), args.steps
        )
        train(single_cfg, client=client)
        t0 = time.perf_counter()
        single = train(single_cfg.replace(out=str(root / "single")), client=client)
        single_wall = time.perf_counter() - t0
        img, sec = loop_rate([root / "single"])
        results["single"] = {
            "images": single["images"],
            "loop_images_per_s": img / sec,
            "end_to_end_images_per_s": single["images"] / single_wall,
            "val_acc": single["val_acc"],
        }
        for name, plan in (("early_stopping", halving), ("to_the_end", to_the_end)):
            t0 = time.perf_counter()
            summary = run_sweep(plan, root / name, client=client)
            wall = time.perf_counter() - t0
            state = SweepState.load(root / name)
            img, sec = loop_rate([root / name / "trials" / t.name for t in state.trials])
            results[name] = {
                "best": summary["best"]["trial"],
                "best_val_acc": summary["best"]["val_acc"],
                "steps": summary["steps"],
                "images": summary["images"],
                "wall_s": wall,
                "loop_images_per_s": img / sec,
                "end_to_end_images_per_s": summary["images"] / wall,
                "rungs": summary["rungs"],
                "failed": summary["failed"],
            }
    es, full, one = results["early_stopping"], results["to_the_end"], results["single"]
    print(
        f"{args.trials} trials of {args.steps} steps (batch {args.batch_size}, {args.workers} "
        f"workers, {args.parallel} at once, "
        f"train-limit {args.train_limit}); rungs {es['rungs']}"
    )
    for name in ("early_stopping", "to_the_end"):
        r = results[name]
        print(
            f"  {name:15} best {r['best']} val_acc {r['best_val_acc']:.4f}  steps {r['steps']:5d}  "
            f"wall {r['wall_s']:7.1f} s  loop {r['loop_images_per_s']:6.0f} img/s  "
            f"end-to-end {r['end_to_end_images_per_s']:6.0f} img/s  failed {r['failed']}"
        )
    print(
        f"  single run      val_acc {one['val_acc']:.4f}  loop {one['loop_images_per_s']:6.0f} "
        f"img/s  end-to-end {one['end_to_end_images_per_s']:6.0f} img/s"
    )
    print(
        f"early stopping: {es['steps'] / full['steps']:.1%} of the steps; best val_acc "
        f"{es['best_val_acc']:.4f} vs {full['best_val_acc']:.4f} (same trial: "
        f"{es['best'] == full['best']})"
    )
    print(
        "throughput vs a single run: loop "
        f"{es['loop_images_per_s'] / one['loop_images_per_s']:.2f}x (to the end "
        f"{full['loop_images_per_s'] / one['loop_images_per_s']:.2f}x), end to end "
        f"{es['end_to_end_images_per_s'] / one['end_to_end_images_per_s']:.2f}x (to the end "
        f"{full['end_to_end_images_per_s'] / one['end_to_end_images_per_s']:.2f}x)"
    )
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
