"""One training epoch in one process: convpipe's Solver vs the same network in PyTorch.

ThreeLayerConvNet(weight_scale=1e-3, hidden_dim=500, reg=1e-3), Adam 1e-3, float32, on the
train split of a store (49,000 CIFAR-10 images by default), 2 threads for both. Prints epoch
time, images/s, training and validation accuracy, and the ratio convpipe / PyTorch measured
in this same run (PyTorch only when installed: `pip install -e ".[bench]"`; it is never a
convpipe dependency). Each side runs in a fresh process of its own, PyTorch with its OpenMP
runtime's defaults. With PyTorch installed, convpipe's epoch also runs in a process that
imported torch before pipeline (a notebook's usual order): the line "torch imported first"
and the ratio of the two epochs show whether the import order matters (pipeline/_kernels/threads.py
is there so that it does not).

With ``--breakdown``, convpipe's process also times 200 more Solver steps phase by phase, in
place (timers around the model's layer calls, the L2 term and the update), with each layer's
rate in GFLOP/s beside NumPy's sgemm on large matrices in the same process: where a step's
time goes, and how far each phase is from the machine's GEMM rate.

    python benchmarks/bench_epoch.py [--store data/cifar10.zarr] [--batch-size 50]
                                     [--threads 2] [--breakdown]
"""

from __future__ import annotations

import argparse
import os
import time


def parse_args():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--store", default="data/cifar10.zarr")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--train-limit", type=int, default=None, help="use only the first N training images"
    )
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    p.add_argument(
        "--breakdown", action="store_true", help="also time a Solver step phase by phase"
    )
    p.add_argument(
        "--part", choices=("convpipe", "convpipe-after-torch", "torch"), help=argparse.SUPPRESS
    )
    return p.parse_args()


def main():
    args = parse_args()
    if args.part:
        return run_part(args)

    from pipeline.fast_layers import machine_text  # the CPU and the kernels' vector width

    print(machine_text())
    ours = run_in_subprocess(args, "convpipe")
    n = ours["n"]
    print(f"{n} training images, batch {args.batch_size}, {args.threads} threads, float32")
    report("convpipe (Numba)", n, ours)
    if args.breakdown:
        print_breakdown(ours["breakdown"], args.batch_size)
    if args.no_torch:
        return
    theirs = run_in_subprocess(args, "torch")
    if theirs is None:
        print("PyTorch not installed: no comparison (pip install torch==2.13.0)")
        return
    report(f"PyTorch {theirs['version']}", n, theirs)
    print(f"ratio convpipe / PyTorch epoch time: {ours['seconds'] / theirs['seconds']:.2f}x")
    after = run_in_subprocess(args, "convpipe-after-torch")
    report("torch imported first", n, after)
    print(
        "ratio convpipe after `import torch` / convpipe alone: "
        f"{after['seconds'] / ours['seconds']:.2f}x (Numba threading layer "
        f"{after['threading_layer']} / {ours['threading_layer']})"
    )


def run_in_subprocess(args, part):
    import json
    import subprocess
    import sys

    cmd = (
        [
            sys.executable,
            __file__,
            "--part",
            part,
            "--store",
            args.store,
            "--batch-size",
            str(args.batch_size),
            "--threads",
            str(args.threads),
        ]
        + (["--train-limit", str(args.train_limit)] if args.train_limit else [])
        + (["--breakdown"] if args.breakdown and part == "convpipe" else [])
    )
    out = (
        subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()
    )
    return json.loads(out[-1]) if out and out[-1] != "null" else None


def run_part(args):
    import json

    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    if args.part in ("torch", "convpipe-after-torch"):
        try:
            import torch  # before pipeline: PyTorch's runtimes load first, as in a notebook
        except ImportError:
            print("null")
            return
    from pipeline.data_utils import get_CIFAR10_data

    data = get_CIFAR10_data(num_training=args.train_limit or 49000, store=args.store, num_test=0)
    if args.part == "torch":
        result = {**run_torch(data, args.batch_size, args.threads), "version": torch.__version__}
    else:
        result = run_convpipe(data, args.batch_size)
        if args.breakdown:
            result["breakdown"] = step_breakdown(data, args.batch_size)
    print(json.dumps({**result, "n": int(data["X_train"].shape[0])}))


def report(name, n, r):
    print(
        f"{name:>22}: epoch {r['seconds']:6.1f} s  {n / r['seconds']:7.0f} images/s  "
        f"train acc {r['train_acc']:.3f}  val acc {r['val_acc']:.3f}"
    )


def notebook_solver(data, batch_size):
    """The notebook's network and Solver (seeded): (model, solver)."""
    import numpy as np

    from pipeline.cnn import ThreeLayerConvNet
    from pipeline.solver import Solver

    np.random.seed(0)
    model = ThreeLayerConvNet(weight_scale=1e-3, hidden_dim=500, reg=1e-3, dtype=np.float32)
    solver = Solver(
        model,
        data,
        num_epochs=1,
        batch_size=batch_size,
        update_rule="adam",
        optim_config={"learning_rate": 1e-3},
        verbose=False,
    )
    return model, solver


def run_convpipe(data, batch_size):
    model, solver = notebook_solver(data, batch_size)
    model.loss(data["X_train"][:2], data["y_train"][:2])  # JIT / cache load outside the timing
    start = time.perf_counter()
    solver.train()
    seconds = time.perf_counter() - start
    import numba

    return {
        "seconds": seconds,
        "train_acc": solver.train_acc_history[-1],
        "val_acc": solver.val_acc_history[-1],
        "threading_layer": numba.threading_layer(),
    }


#: the model's phases timed in place: (label, pipeline.cnn names wrapped, (layer, GEMMs) or None),
#: the layer whose FLOPs per image (taken from the model's shapes) the phase does, that many times
PHASES = (
    ("conv-relu-pool forward", "conv_relu_pool_forward", ("conv", 1)),
    ("affine-relu forward (Numba < 64 rows)", "affine_relu_forward", ("affine", 1)),
    ("scores, softmax, backward", ("affine_forward", "softmax_loss", "affine_backward"), None),
    ("affine-relu backward (dx+squares, dw+L2)", "affine_relu_backward", ("affine", 2)),
    # dw sums over the pixels the 2x2 pool routes a gradient to: a quarter of the conv's FLOPs
    ("conv-relu-pool backward (dw, pooled pixels)", "conv_relu_pool_backward", ("conv", 0.25)),
    ("L2 term of W1 and W3", "add_l2", None),
)


def step_breakdown(data, batch_size, steps=200):
    """ms per Solver step in each phase (timers around the calls, in place), each phase's FLOPs
    per image, and NumPy's sgemm rate on 2048x2048 matrices in this process."""
    import numpy as np

    import pipeline.cnn as cnn

    totals: dict[str, float] = {}

    def timed(label, fn):
        def call(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[label] = totals.get(label, 0.0) + time.perf_counter() - t

        return call

    for label, names, _ in PHASES:
        for name in (names,) if isinstance(names, str) else names:
            setattr(cnn, name, timed(label, getattr(cnn, name)))
    model, solver = notebook_solver(data, batch_size)
    H, W = data["X_train"].shape[2:]
    per_image = {
        "conv": 2 * model.params["W1"].size * H * W,  # the conv keeps H x W
        "affine": 2 * model.params["W2"].size,
    }
    flops = {label: per_image[work[0]] * work[1] for label, _, work in PHASES if work}
    solver.update_rule = timed("Adam (all parameters)", solver.update_rule)
    model.loss = timed("model.loss", model.loss)
    for _ in range(5):
        solver._step()
    totals.clear()
    start = time.perf_counter()
    for _ in range(steps):
        solver._step()
    step = time.perf_counter() - start
    a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
    a @ a
    t = time.perf_counter()
    for _ in range(5):
        a @ a
    sgemm = 5 * 2 * 2048**3 / (time.perf_counter() - t) / 1e9
    return {
        "steps": steps,
        "step_ms": 1e3 * step / steps,
        "ms": {k: 1e3 * v / steps for k, v in totals.items()},
        "flops_per_image": flops,
        "sgemm_gflops": sgemm,
    }


def print_breakdown(b, batch_size):
    ms = b["ms"]
    inside = sum(ms.get(label, 0.0) for label, _, _ in PHASES)
    rows = [(label, ms.get(label, 0.0), b["flops_per_image"].get(label)) for label, _, _ in PHASES]
    rows.insert(3, ("W1's and W3's squares, checks, the rest", ms["model.loss"] - inside, None))
    rows.append(("Adam (all parameters)", ms["Adam (all parameters)"], None))
    rows.append(
        (
            "the Solver's own (batch, bookkeeping)",
            b["step_ms"] - ms["model.loss"] - ms["Adam (all parameters)"],
            None,
        )
    )
    print(
        f"\none Solver step, batch {batch_size}, phase by phase (mean of {b['steps']} steps, timed "
        f"in place): {b['step_ms']:.1f} ms; NumPy sgemm 2048x2048 here: {b['sgemm_gflops']:.0f} "
        "GFLOP/s"
    )
    for label, t, flops in rows:
        rate = f"{flops * batch_size / t / 1e6:6.0f} GFLOP/s" if flops and t > 0 else ""
        print(f"  {label:>44}: {t:6.2f} ms  {100 * t / b['step_ms']:5.1f}%  {rate}")


def run_torch(data, batch_size, threads):
    import numpy as np
    import torch
    from torch import nn
    from torch_reference import three_layer_net

    torch.set_num_threads(threads)
    net, weights = three_layer_net(torch)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    X, y = torch.from_numpy(data["X_train"]), torch.from_numpy(data["y_train"])
    rng = np.random.default_rng(0)
    iterations = max(X.shape[0] // batch_size, 1)
    start = time.perf_counter()
    for _ in range(iterations):
        idx = torch.from_numpy(rng.choice(X.shape[0], batch_size))
        loss = nn.functional.cross_entropy(net(X[idx]), y[idx])
        loss = loss + 0.5 * 1e-3 * sum((w * w).sum() for w in weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def accuracy(Xa, ya, limit=1000):
        with torch.no_grad():
            Xa, ya = torch.from_numpy(Xa[:limit]), torch.from_numpy(ya[:limit])
            return float((net(Xa).argmax(1) == ya).float().mean())

    train_acc = accuracy(data["X_train"], data["y_train"])
    val_acc = accuracy(data["X_val"], data["y_val"])
    return {"seconds": time.perf_counter() - start, "train_acc": train_acc, "val_acc": val_acc}


if __name__ == "__main__":
    main()
