"""A spec's network, forward and backward, convpipe vs PyTorch, each in a process of its own.

The whole network (ConvNet.loss with labels: forward, softmax loss, backward) at one batch, and
each of its convolutions alone (forward, then backward with dx except for the first) at its
input's shape: minimum and median of ``--repeat`` rounds, images/s and the ratio convpipe /
PyTorch (below 1.0: faster than PyTorch). Both at ``--threads`` threads (Numba and OpenBLAS;
torch.set_num_threads). PyTorch is used only here. ``--paths`` also times each convolution on
every path convpipe has for its shape (direct kernels, im2col + GEMM, Winograd), whichever
``pipeline.fast_layers`` would pick: the figures behind its choice. ``--frozen-whiten-bias``
times the network's step once its whitening conv's bias no longer trains (``--whiten-bias-epochs``
spent: convpipe's backward stops above it, PyTorch's autograd likewise).

    python benchmarks/bench_network.py [--job jobs/train-airbench.toml] [--batch 512]
        [--threads 2] [--repeat 5] [--paths] [--frozen-whiten-bias]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_args():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--job", default=str(HERE.parent / "jobs" / "train-airbench.toml"))
    p.add_argument("--model", help="a model spec's text instead of the job's")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--paths", action="store_true", help="time every convolution path too")
    p.add_argument(
        "--frozen-whiten-bias", action="store_true", help="the whitening conv's bias frozen"
    )
    p.add_argument("--part", choices=("convpipe", "torch"), help=argparse.SUPPRESS)
    return p.parse_args()


def times(fn, repeat):
    fn()
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return min(out), sorted(out)[len(out) // 2]


def conv_layers(spec):
    """(input shape, layer) of each conv of the spec, for one image."""
    shapes = [(3, 32, 32), *spec.shapes((3, 32, 32), 10)]
    return [(x, layer) for layer, x in zip(spec.body, shapes) if layer.kind == "conv"]


PATHS = ("direct", "im2col", "winograd")


@contextlib.contextmanager
def conv_path(fl, path):
    """Make pipeline.fast_layers take ``path`` for every convolution (None: its own choice)."""
    saved = fl.winograd, fl.direct_images_per_row
    if path == "winograd":
        fl.winograd = lambda HH, WW, stride, *a: stride == 1 and HH == WW == 3
    elif path is not None:
        fl.winograd = lambda *a: False
        if path == "im2col":
            fl.direct_images_per_row = lambda *a: 0
    try:
        yield
    finally:
        fl.winograd, fl.direct_images_per_row = saved


def available_paths(fl, x, layer):
    """The paths a convolution of ``layer`` on input x (C, H, W) can take."""
    C, H, W = x
    W_out = (W + 2 * layer.pad - layer.size) // layer.stride + 1
    size, stride = layer.size, layer.stride
    direct = fl.direct_images_per_row(size, size, stride, W, W_out, layer.pad, layer.filters)
    return [p for p, ok in zip(PATHS, (direct, True, stride == 1 and size == 3), strict=True) if ok]


def part_convpipe(model_text, batch, repeat, paths=False, frozen_bias=False):
    import numpy as np

    from pipeline import fast_layers as fl
    from pipeline.convnet import ConvNet
    from pipeline.training.memory import keep_freed_memory

    keep_freed_memory()  # as a worker does: large arrays reuse freed memory
    net = ConvNet(model_text, seed=0)
    rng = np.random.default_rng(0)
    X = (60 * rng.standard_normal((batch, 3, 32, 32))).astype(np.float32)
    y = rng.integers(0, 10, batch)
    frozen = set(net.whiten_biases) if frozen_bias else set()
    result = {"network": times(lambda: net.loss(X, y, frozen=frozen), repeat), "convs": []}
    for i, (x, layer) in enumerate(conv_layers(net.spec)):
        xi = rng.standard_normal((batch, *x)).astype(np.float32)
        w = (0.1 * rng.standard_normal((layer.filters, x[0], layer.size, layer.size))).astype(
            np.float32
        )
        b = np.zeros(layer.filters, np.float32)
        cp = {"stride": layer.stride, "pad": layer.pad}

        def step(xi=xi, w=w, b=b, cp=cp, first=i == 0):
            out, cache = fl.conv_forward_fast(xi, w, b, cp)
            fl.conv_backward_fast(out, cache, compute_dx=not first)

        result["convs"].append(times(step, repeat))
        if paths:
            row = {}
            for path in available_paths(fl, x, layer):
                with conv_path(fl, path):
                    row[path] = times(step, repeat)[0]
            result.setdefault("paths", []).append(row)
    return result


def part_torch(model_text, batch, threads, repeat, frozen_bias=False):
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(HERE))
    from torch_reference import spec_net, whiten_conv

    from pipeline.netspec import NetSpec

    spec = NetSpec.from_text(model_text)
    net, loss_fn, _, _ = spec_net(torch, spec)
    conv = whiten_conv(torch, net) if frozen_bias else None
    if conv is not None:
        conv.bias.requires_grad_(False)
    X = 60 * torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))

    def step():
        net.zero_grad(set_to_none=True)
        loss_fn(net(X), y).backward()

    result = {"network": times(step, repeat), "convs": [], "torch": torch.__version__}
    for i, (x, layer) in enumerate(conv_layers(spec)):
        conv = torch.nn.Conv2d(x[0], layer.filters, layer.size, layer.stride, layer.pad)
        xi = torch.randn(batch, *x, requires_grad=i > 0)

        def conv_step(conv=conv, xi=xi):
            conv.zero_grad(set_to_none=True)
            out = conv(xi)
            out.backward(out.detach())

        result["convs"].append(times(conv_step, repeat))
    return result


def main():
    args = parse_args()
    if args.part:
        sys.path.insert(0, str(HERE.parent))
        if args.part == "convpipe":
            frozen = args.frozen_whiten_bias
            print(
                json.dumps(part_convpipe(args.model, args.batch, args.repeat, args.paths, frozen))
            )
        else:
            part = part_torch(
                args.model, args.batch, args.threads, args.repeat, args.frozen_whiten_bias
            )
            print(json.dumps(part))
        return
    from pipeline.fast_layers import machine_text
    from pipeline.jobs.spec import load_spec
    from pipeline.netspec import NetSpec

    model = args.model or load_spec(args.job).options["model"]
    spec = NetSpec.from_text(model)
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[var] = str(args.threads)
    results = {}
    for part in ("convpipe", "torch"):
        cmd = [sys.executable, __file__, "--part", part, "--model", model]
        cmd += ["--batch", str(args.batch), "--threads", str(args.threads)]
        cmd += ["--repeat", str(args.repeat)] + (["--paths"] if args.paths else [])
        cmd += ["--frozen-whiten-bias"] if args.frozen_whiten_bias else []
        done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        results[part] = json.loads(done.stdout.strip().splitlines()[-1])
    ours, theirs = results["convpipe"], results["torch"]
    print(machine_text())
    print(
        f"{args.job if not args.model else 'model'}: batch {args.batch}, {args.threads} threads, "
        f"torch {theirs['torch']}; min and median of {args.repeat} rounds"
        + ("; the whitening bias frozen" if args.frozen_whiten_bias else "")
    )
    o, t = ours["network"], theirs["network"]
    print(
        f"network forward+backward: convpipe {args.batch / o[0]:,.0f} images/s "
        f"({o[0] * 1e3:.0f} / {o[1] * 1e3:.0f} ms), torch {args.batch / t[0]:,.0f} images/s "
        f"({t[0] * 1e3:.0f} / {t[1] * 1e3:.0f} ms); time ratio {o[0] / t[0]:.2f} (min), "
        f"{o[1] / t[1]:.2f} (median)"
    )
    print(f"  {'conv (input, layer)':44s} {'convpipe ms':>12s} {'torch ms':>9s} {'ratio':>6s}")
    total_o = total_t = 0.0
    for (x, layer), a, b in zip(conv_layers(spec), ours["convs"], theirs["convs"]):
        total_o, total_t = total_o + a[0], total_t + b[0]
        name = f"{x} {layer.to_text()}"
        print(f"  {name:44s} {a[0] * 1e3:12.1f} {b[0] * 1e3:9.1f} {a[0] / b[0]:6.2f}")
    print(f"  {'all convolutions':44s} {total_o * 1e3:12.1f} {total_t * 1e3:9.1f} "
          f"{total_o / total_t:6.2f}")  # fmt: skip
    if args.paths:
        print(f"  each path, ms (min):{'':25s}" + "".join(f"{p:>10s}" for p in PATHS))
        for (x, layer), row in zip(conv_layers(spec), ours["paths"], strict=True):
            cells = "".join(f"{row[p] * 1e3:10.1f}" if p in row else f"{'-':>10s}" for p in PATHS)
            print(f"  {f'{x} {layer.to_text()}':44s}{cells}")


if __name__ == "__main__":
    main()
