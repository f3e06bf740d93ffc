"""Accuracy in time: a train job's network and recipe trained by convpipe and by PyTorch, side by
side in one run.

convpipe: the whole pipeline, ``convpipe train`` with the job's settings on the embedded cluster
(``--workers`` x 1 thread), from its own process. PyTorch: the same network layer for layer
(benchmarks/torch_reference.py ``spec_net``), the same recipe (optimizer, schedule, parameter
groups, L2, label smoothing), the same images and batch order (the store's train split,
pipeline.training.shards.Schedule) and the same augmentation draws (pipeline.augment), in one
process of ``--threads`` threads. Both score the val split (and 1,000 train images) after each
epoch, inside the timed loop; the whole test split after each epoch with their clocks stopped
(``test_each_epoch``), and once more at the end with the job's test-time augmentation. Prints,
per seed, each epoch's val and test accuracy against wall clock for both, then the test
accuracies with test-time augmentation and the training times, and their means over the seeds;
``--plot`` draws each epoch's test accuracy against wall clock (both sides, every seed).

    python benchmarks/bench_recipe.py [--job jobs/train-airbench-small.toml] [--epochs 8]
        [--seeds 0 1 2] [--store data/cifar10.zarr] [--workers 2] [--threads 2]
        [--set key=value ...] [--no-torch | --no-convpipe] [--json OUT] [--plot PNG]

Times: convpipe's is the training loop of ``convpipe train`` (its summary's ``seconds``: every
step, checkpoint and per-epoch val scoring; not the cluster's start nor the test scoring);
PyTorch's the same loop. PyTorch is only used here (``pip install torch==2.13.0``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--job", default=str(HERE.parent / "jobs" / "train-airbench-small.toml"))
    p.add_argument("--store", default="data/cifar10.zarr")
    p.add_argument("--epochs", type=int, default=None, help="default: the job's")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--workers", type=int, default=2, help="convpipe's workers (1 thread each)")
    p.add_argument("--threads", type=int, default=2, help="PyTorch's threads")
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--set", action="append", default=[], help="override a key of the job")
    p.add_argument("--no-torch", action="store_true", help="convpipe alone")
    p.add_argument("--no-convpipe", action="store_true", help="PyTorch alone")
    p.add_argument("--json", help="write the results there")
    p.add_argument("--plot", help="draw each epoch's test accuracy against wall clock there (PNG)")
    p.add_argument("--part", choices=("torch",), help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def job_config(args, seed):
    from pipeline.jobs.spec import load_spec
    from pipeline.training import TrainConfig

    # the curve: on, unless `--set test-each-epoch=false` (the spec's options hold every
    # setting, defaults included, so it goes in as the first override)
    options = dict(load_spec(args.job, ["test-each-epoch=true", *args.set]).options)
    options.update(data=args.store, seed=seed, out=None)
    if args.epochs:
        options["epochs"] = args.epochs
    if args.train_limit:
        options["train_limit"] = args.train_limit
    return TrainConfig.from_job(options)


# ---- convpipe: `convpipe train` in a process of its own -----------------------------------------


def run_convpipe(config, workers: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench-recipe-")) / "run"
    flags = []
    for key, value in config.to_dict().items():
        if value is None or key in ("out", "workers", "scheduler", "resume"):
            continue
        flags += [
            f"--{key.replace('_', '-')}",
            json.dumps(value) if isinstance(value, bool) else str(value),
        ]
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "train",
        *flags,
        "--workers",
        str(workers),
        "--out",
        str(out),
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    summary = json.loads((out / "summary.json").read_text())
    epochs = [
        json.loads(line)
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if '"kind": "epoch"' in line
    ]
    return {
        "epochs": [
            {k: e[k] for k in ("epoch", "seconds", "val_acc", "test_acc") if k in e} for e in epochs
        ],
        "seconds": summary["seconds"],  # the training loop, per-epoch val scoring included
        "test_acc": summary["test_acc"],
        "images_per_s": summary["images_per_s"],
        "process_wall_s": wall,
        "run_dir": str(out),
    }


# ---- PyTorch: the same recipe ------------------------------------------------------------------


def run_torch_part(config_json: str, threads: int) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(HERE))
    from torch_reference import spec_net, whiten_conv

    from pipeline.augment import Augment, tta_views
    from pipeline.convnet import ConvNet
    from pipeline.data import open_store
    from pipeline.netspec import NetSpec
    from pipeline.optim import NS_COEFFS, NS_STEPS
    from pipeline.training import TrainConfig
    from pipeline.training.shards import Schedule, subset
    from pipeline.training.update import UpdateRule

    config = TrainConfig.from_dict(json.loads(config_json))
    store = open_store(config.data)
    n_train = config.train_limit or store.splits["train"]
    X, y = store.read("train", np.arange(n_train))
    Xv, yv = store.read("val", None)
    Xt, yt = store.read("test", None)
    spec = NetSpec.from_text(config.model)
    net, loss_fn, weights, norm_params = spec_net(torch, spec, seed=config.seed)
    first = whiten_conv(torch, net)
    if first is not None:  # the filters convpipe starts from
        ours = ConvNet(spec, seed=config.seed)
        ours.whiten(X[:5000])
        with torch.no_grad():
            first.weight.copy_(torch.from_numpy(ours.params["W1"]))
    # --muon-lr: the conv filters that train step by Muon (as convpipe's: no L2, no decay)
    filters = [p for p in weights if p.requires_grad and p.dim() == 4] if config.muon_lr else []
    weights = [p for p in weights if all(p is not f for f in filters)]
    special = {id(p) for p in weights + norm_params + filters}
    others = [p for p in net.parameters() if p.requires_grad and id(p) not in special]
    groups = [
        {"params": weights, "weight_decay": config.reg, "factor": 1.0},
        {"params": norm_params, "weight_decay": 0.0, "factor": config.norm_lr_factor},
        {"params": others, "weight_decay": 0.0, "factor": 1.0},
    ]
    groups = [g for g in groups if g["params"]]
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(
            groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov
        )
    else:
        opt = torch.optim.Adam(groups, lr=config.lr, betas=(0.9, 0.999), eps=1e-8)
    schedule = Schedule(
        n_train, config.batch_size, config.shard_size, config.seed, config.epochs, config.steps
    )
    rule = UpdateRule.of(config, schedule.total_steps)
    if config.ema:
        raise SystemExit("torch: --ema is not in this reference (lookahead is)")
    trained = [p for p in net.parameters() if p.requires_grad]  # not the frozen ones
    slow = [p.detach().clone() for p in trained] if config.lookahead else []
    # BN's running statistics, averaged in the lookahead as convpipe's (and airbench's) are
    stats = [
        b
        for m in net.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
        for b in (m.running_mean, m.running_var)
    ]
    slow_stats = [b.clone() for b in stats] if config.lookahead else []
    momenta = [torch.zeros_like(p) for p in filters]
    muon_ids = {id(f) for f in filters}

    def orthogonalize(g):  # pipeline.optim.orthogonalize's iteration, in torch
        a, b, c = NS_COEFFS
        x = g.T if g.shape[0] > g.shape[1] else g
        x = x / (x.double().norm().float() + 1e-7)
        for _ in range(NS_STEPS):
            gram = x @ x.T
            x = a * x + (b * gram + c * (gram @ gram)) @ x
        return x.T if g.shape[0] > g.shape[1] else x

    augment = Augment(config.flip, config.translate, config.seed)
    train_idx = subset(config.seed, n_train, config.train_acc_samples, tag=1)

    def accuracy(images, labels, views="none"):
        net.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(labels), 500):
                scores = 0
                for weight, view in tta_views(images[i : i + 500], views):
                    scores = (
                        scores + weight * net(torch.from_numpy(np.ascontiguousarray(view))).double()
                    )
                correct += int((scores.argmax(1).numpy() == labels[i : i + 500]).sum())
        net.train()
        return correct / len(labels)

    bias_epochs = config.whiten_bias_epochs  # then the whitening bias stays, as convpipe's
    freeze_at = None if bias_epochs is None else bias_epochs * schedule.steps_per_epoch

    epochs, t0 = [], time.perf_counter()
    net.train()
    for t in range(schedule.total_steps):
        if t == freeze_at:  # no gradient (nor the backward below the next conv), step, decay
            first.bias.requires_grad_(False)  # or averaging from here on
            keep = [i for i, p in enumerate(trained) if p is not first.bias]
            trained, slow = [trained[i] for i in keep], [slow[i] for i in keep] if slow else []
        lr = rule.lr_at(t)
        for g in opt.param_groups:
            g["lr"] = lr * g["factor"]
        idx = schedule.batch(t)
        xb = augment.apply(X[idx], idx, schedule.epoch_of(t))
        loss = loss_fn(net(torch.from_numpy(xb)), torch.from_numpy(y[idx]))
        net.zero_grad(set_to_none=True)  # the Muon filters' too
        loss.backward()
        wd = config.weight_decay
        decayed = [p for p in trained if id(p) not in muon_ids] if wd else []
        decay = [(p, lr * wd * p.detach().clone()) for p in decayed]
        opt.step()
        with torch.no_grad():
            for p, d in decay:
                p.sub_(d)
            muon_lr, mu = rule.muon_at(t)
            for p, buf in zip(filters, momenta):  # Muon: pipeline.optim.muon_update
                buf.mul_(mu).add_(p.grad)
                d = p.grad + mu * buf if config.nesterov else buf
                p.mul_(p.shape[0] ** 0.5 / p.double().norm().float())
                p.sub_(muon_lr * orthogonalize(d.reshape(p.shape[0], -1)).reshape(p.shape))
            a, pull = rule.average(t)  # lookahead: slow = a * slow + (1 - a) * w; w = slow
            for p, s in [*zip(trained, slow), *zip(stats, slow_stats)]:
                if a:
                    s.mul_(a).add_(p, alpha=1.0 - a)
                if pull:
                    p.copy_(s)
        if not np.isfinite(loss.item()):
            raise SystemExit(f"torch: loss {loss.item()} at step {t + 1}")
        if schedule.ends_epoch(t):
            accuracy(X[train_idx], y[train_idx])
            val_acc = accuracy(Xv, yv)  # the clock read after it, as convpipe's epoch lines
            epochs.append(
                {
                    "epoch": schedule.epoch_of(t) + 1,
                    "seconds": time.perf_counter() - t0,
                    "val_acc": val_acc,
                }
            )
            if config.test_each_epoch:  # off the clock, as convpipe's
                paused = time.perf_counter()
                epochs[-1]["test_acc"] = accuracy(Xt, yt)
                t0 += time.perf_counter() - paused
    seconds = time.perf_counter() - t0
    return {
        "epochs": epochs,
        "seconds": seconds,
        "test_acc": accuracy(Xt, yt, config.tta),
        "images_per_s": schedule.total_steps * config.batch_size / seconds,
        "torch": torch.__version__,
    }


def run_torch(config, threads: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--part",
        "torch",
        "--config",
        json.dumps(config.to_dict()),
        "--threads",
        str(threads),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- the run -------------------------------------------------------------------------------------


def main():
    args = parse_args()
    if args.no_torch and args.no_convpipe:
        raise SystemExit("bench_recipe: --no-torch and --no-convpipe leave nothing to run")
    if args.part == "torch":
        print(json.dumps(run_torch_part(args.config, args.threads)))
        return
    from pipeline.fast_layers import machine_text

    print(machine_text())
    results = []
    for seed in args.seeds:
        config = job_config(args, seed)
        print(f"seed {seed}: {config.epochs} epochs of {args.job} on {args.store}", flush=True)
        ours = None if args.no_convpipe else run_convpipe(config, args.workers)
        theirs = None if args.no_torch else run_torch(config, args.threads)
        results.append({"seed": seed, "convpipe": ours, "torch": theirs})
        sides = [(name, r) for name, r in (("convpipe", ours), ("torch", theirs)) if r]
        nan = float("nan")
        print(
            "  epoch" + "".join(f" {name + ' s':>11} {'val':>7} {'test':>7}" for name, _ in sides)
        )
        for i in range(len(sides[0][1]["epochs"])):
            print(
                f"  {i + 1:>5}"
                + "".join(
                    f" {e['seconds']:>11.1f} {e['val_acc']:>7.4f} {e.get('test_acc', nan):>7.4f}"
                    for e in (r["epochs"][i] for _, r in sides)
                )
            )
        line = f"  test ({config.tta}): " + ", ".join(
            f"{name} {r['test_acc']:.4f} in {r['seconds']:.0f} s" for name, r in sides
        )
        if ours and theirs:
            line += f"; time ratio convpipe / torch {ours['seconds'] / theirs['seconds']:.2f}"
        print(line, flush=True)
    if len(results) > 1:
        mean = lambda side, key: sum(r[side][key] for r in results) / len(results)  # noqa: E731
        print(
            f"mean of {len(results)} seeds: "
            + ", ".join(
                f"{name} {mean(name, 'test_acc'):.4f} in {mean(name, 'seconds'):.0f} s"
                for name, _ in sides
            )
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"machine": machine_text(), "job": args.job, "results": results}, indent=1)
        )
    if args.plot:
        plot(
            results,
            args.plot,
            f"{Path(args.job).name}: test accuracy against wall clock\n"
            + machine_text().split(";")[0],
            tta=config.tta,
            workers=args.workers,
            threads=args.threads,
        )
        print(f"plot: {args.plot}")


def plot(
    results: list[dict], path: str, title: str, tta: str, workers: int = 2, threads: int = 2
) -> None:
    """Each epoch's test accuracy (whole split, no test-time augmentation) against training
    wall clock in minutes, a line per side and seed; a star at the end for the test accuracy
    with ``tta``."""
    from pipeline.figures import _figure

    fig = _figure(9, 5.5)
    ax = fig.subplots()
    colors = {"convpipe": "tab:blue", "torch": "tab:orange"}
    lowest = 0.4  # the y axis starts here, or below the lowest epoch scored
    names = {
        "convpipe": f"convpipe ({workers} workers x 1 thread)",
        "torch": f"PyTorch (1 process x {threads} threads)",
    }
    for r in results:
        for side, color in colors.items():
            run = r.get(side)
            if not run or not all("test_acc" in e for e in run["epochs"]):
                continue
            x = [0.0] + [e["seconds"] / 60 for e in run["epochs"]]
            y = [0.1] + [e["test_acc"] for e in run["epochs"]]  # chance before the first step
            ax.plot(x, y, "-o", ms=4, color=color, label=f"{names[side]}, seed {r['seed']}")
            lowest = min(lowest, min(y[1:]) - 0.05)
            ax.plot(
                [run["seconds"] / 60],
                [run["test_acc"]],
                "*",
                ms=13,
                color=color,
                label=f"  with test-time augmentation {tta}: {100 * run['test_acc']:.2f}%",
            )
    ax.axhline(0.9, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("training wall clock (minutes; scoring of the test split not counted)")
    ax.set_ylabel("test accuracy (10,000 images)")
    ax.set_title(title, fontsize=11)
    ax.set_ylim(lowest, 1.0)
    ax.set_xlim(0, None)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
