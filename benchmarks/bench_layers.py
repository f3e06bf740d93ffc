"""Fast layers vs PyTorch CPU and vs the naive layers, measured side by side in one run.

    python benchmarks/bench_layers.py [--threads 2] [--repeat 15] [--no-torch]

float32 at the model's shapes (N=50, 32 filters of 7x7 on 3x32x32 images, 2x2 max pool,
norms on 50x32x32x32); both libraries at the same thread count (Numba's pool, NumPy's BLAS
and torch.set_num_threads). PyTorch runs in a process of its own (loaded into convpipe's, its
OpenMP runtime slowed convpipe's epoch 2x), fed the same arrays. Case by case, ours then
PyTorch's (not call by call: GNU OpenMP's threads spin a while after each parallel region, on
the cores the next call of ours would use); the table gives the median and minimum per call and the
ratios ours / torch of the medians and of the minima (below 1.0: faster than PyTorch; on a
shared machine the minima are the less disturbed figures).
PyTorch is only used here, and the comparison is skipped with a message if it is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--threads", type=int, default=2, help="threads for Numba, BLAS and torch (default 2)"
    )
    p.add_argument("--repeat", type=int, default=15, help="timed rounds per case (default 15)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    p.add_argument(
        "--no-naive", action="store_true", help="skip the comparison with the naive layers"
    )
    p.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:
    # BLAS reads its thread count when NumPy loads: set it before the import
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(ARGS.threads))
    os.environ.setdefault("NUMBA_NUM_THREADS", str(ARGS.threads))
    # pipeline's default (pipeline/_kernels/threads.py), set before NumPy loads OpenBLAS so that the
    # naive layers' NumPy timings before pipeline's import run with it too; PyTorch uses MKL
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import numpy as np  # noqa: E402

FRESH_PROCESS = r"""
import time
t0 = time.perf_counter()
import numpy as np
import pipeline.fast_layers as fl
import pipeline.layer_utils as lu
t1 = time.perf_counter()
x = np.random.randn(4, 3, 32, 32).astype(np.float32)
w = np.random.randn(32, 3, 7, 7).astype(np.float32)
b = np.zeros(32, np.float32)
out, cache = lu.conv_relu_pool_forward(x, w, b, {'stride': 1, 'pad': 3},
                                       {'pool_height': 2, 'pool_width': 2, 'stride': 2})
lu.conv_relu_pool_backward(np.ones_like(out), cache, compute_dx=False)
t2 = time.perf_counter()
from pipeline._kernels import conv, norm, pool
hits = misses = 0
for mod in (conv, pool, norm):
    for f in vars(mod).values():
        st = getattr(f, 'stats', None)
        if st is not None and hasattr(st, 'cache_hits'):
            hits += sum(st.cache_hits.values())
            misses += sum(st.cache_misses.values())
print(f'{t1 - t0:.3f} {t2 - t1:.3f} {hits} {misses}')
"""


def fresh_process_report():
    """Import + first call in a new process; run twice so the second sees a warm on-disk cache."""
    lines = []
    for attempt in ("first run (may compile)", "fresh process, warm cache"):
        r = subprocess.run(
            [sys.executable, "-c", FRESH_PROCESS],
            capture_output=True,
            text=True,
            env=os.environ.copy(),
        )
        if r.returncode:
            raise SystemExit(r.stderr)
        imp, call, hits, misses = r.stdout.split()
        lines.append(
            f"  {attempt:28s} import {float(imp):6.2f} s   first conv_relu_pool fwd+bwd "
            f"{float(call):6.2f} s   numba cache hits {hits}, compilations {misses}"
        )
    return lines


def timeit(fn, repeat, warm=1):
    """Seconds of ``repeat`` calls of fn, after ``warm`` untimed ones."""
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return ts


def ms(ts):
    return f"{np.median(ts) * 1e3:8.2f} {np.min(ts) * 1e3:8.2f}"


def main():
    from pipeline.fast_layers import machine_text  # the CPU and the kernels' vector width

    print(machine_text())
    import numba

    numba.set_num_threads(ARGS.threads)
    from pipeline import fast_layers as fl
    from pipeline import layer_utils as lu
    from pipeline import layers as L

    print(
        f"numpy {np.__version__}, numba {numba.__version__}, threads {ARGS.threads} "
        f"(numba {numba.get_num_threads()}, "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}), {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f} (other processes share the machine)"
    )
    print("\nStart-up (subprocess):")
    for line in fresh_process_report():
        print(line)

    rng = np.random.default_rng(0)
    R = ARGS.repeat

    # ---------------------------------------------------------------- fast vs naive (notebook)
    if not ARGS.no_naive:
        naive_report(fl, L, rng, R)
    torch_report(fl, lu, R)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


def naive_report(fl, L, rng, R):
    print("\nFast vs naive at the notebook's shapes (float64, ms: median min):")
    x = rng.standard_normal((100, 3, 31, 31))
    w = rng.standard_normal((25, 3, 3, 3))
    b = rng.standard_normal(25)
    cp = {"stride": 2, "pad": 1}
    out, cn = L.conv_forward_naive(x, w, b, cp)
    _, cf = fl.conv_forward_fast(x, w, b, cp)
    dout = rng.standard_normal(out.shape)
    rows = [
        (
            "conv forward",
            lambda: L.conv_forward_naive(x, w, b, cp),
            lambda: fl.conv_forward_fast(x, w, b, cp),
        ),
        (
            "conv backward",
            lambda: L.conv_backward_naive(dout, cn),
            lambda: fl.conv_backward_fast(dout, cf),
        ),
    ]
    xp = rng.standard_normal((100, 3, 32, 32))
    pp = {"pool_height": 2, "pool_width": 2, "stride": 2}
    pout, pn = L.max_pool_forward_naive(xp, pp)
    _, pf = fl.max_pool_forward_fast(xp, pp)
    pdout = rng.standard_normal(pout.shape)
    rows += [
        (
            "max pool forward",
            lambda: L.max_pool_forward_naive(xp, pp),
            lambda: fl.max_pool_forward_fast(xp, pp),
        ),
        (
            "max pool backward",
            lambda: L.max_pool_backward_naive(pdout, pn),
            lambda: fl.max_pool_backward_fast(pdout, pf),
        ),
    ]
    print(f"  {'':22s} {'naive':>17s} {'fast':>17s} {'speedup':>9s}")
    for name, naive, fast in rows:
        tn, tf = timeit(naive, 3), timeit(fast, R)
        print(f"  {name:22s} {ms(tn)} {ms(tf)} {np.median(tn) / np.median(tf):8.1f}x")


# ---------------------------------------------------------------- vs PyTorch, in its own process

POOL = {"pool_height": 2, "pool_width": 2, "stride": 2}
GROUPS = 4


def comparison_inputs():
    """The arrays both processes time on (the same seed in each)."""
    rng = np.random.default_rng(1)
    f32 = np.float32
    return {
        "x": rng.standard_normal((50, 3, 32, 32)).astype(f32),
        "w": (rng.standard_normal((32, 3, 7, 7)) * 0.1).astype(f32),
        "b": rng.standard_normal(32).astype(f32),
        "dout": rng.standard_normal((50, 32, 32, 32)).astype(f32),
        "pdout": rng.standard_normal((50, 32, 16, 16)).astype(f32),
        "xpool": rng.standard_normal((50, 32, 32, 32)).astype(f32),
        "gamma": (1 + 0.1 * rng.standard_normal(32)).astype(f32),
        "beta": (0.1 * rng.standard_normal(32)).astype(f32),
    }


CASES = (
    "conv forward only (50x3x32x32, 32x3x7x7)",
    "conv fwd+bwd, no dx",
    "conv fwd+bwd, with dx",
    "max pool 2x2 fwd+bwd (50x32x32x32)",
    "conv_relu_pool fwd+bwd, no dx",
    "conv_relu_pool fwd+bwd, with dx",
    "spatial batch norm fwd+bwd (50x32x32x32)",
    f"group norm G={GROUPS} fwd+bwd (50x32x32x32)",
)


def ours_cases(fl, lu, d):
    """CASES in convpipe: name -> a call."""
    x, w, b, dout, pdout, xpool = (d[k] for k in ("x", "w", "b", "dout", "pdout", "xpool"))
    gamma, beta = d["gamma"], d["beta"]
    cp = {"stride": 1, "pad": 3}

    def conv(dx):
        def f():
            o, c = fl.conv_forward_fast(x, w, b, cp)
            fl.conv_backward_fast(dout, c, compute_dx=dx)

        return f

    def pool():
        o, c = fl.max_pool_forward_fast(xpool, POOL)
        fl.max_pool_backward_fast(pdout, c)

    def crp(dx):
        def f():
            o, c = lu.conv_relu_pool_forward(x, w, b, cp, POOL)
            lu.conv_relu_pool_backward(pdout, c, compute_dx=dx)

        return f

    def bn():
        o, c = fl.spatial_batchnorm_forward_fast(xpool, gamma, beta, {"mode": "train"})
        fl.spatial_batchnorm_backward_fast(dout, c)

    def gn():
        o, c = fl.spatial_groupnorm_forward_fast(xpool, gamma, beta, GROUPS, {})
        fl.spatial_groupnorm_backward_fast(dout, c)

    calls = (lambda: fl.conv_forward_fast(x, w, b, cp), conv(False), conv(True), pool)
    return dict(zip(CASES, calls + (crp(False), crp(True), bn, gn)))


def torch_cases(torch, d):
    """CASES in PyTorch: name -> a call."""
    F_ = torch.nn.functional
    t = {k: torch.from_numpy(v) for k, v in d.items()}
    tw, tb = t["w"].requires_grad_(True), t["b"].requires_grad_(True)
    tg, tbt = t["gamma"].requires_grad_(True), t["beta"].requires_grad_(True)
    txpool = t["xpool"].requires_grad_(True)

    def conv(dx):
        xin = t["x"].clone().requires_grad_(dx)

        def f():
            tw.grad = tb.grad = xin.grad = None
            F_.conv2d(xin, tw, tb, stride=1, padding=3).backward(t["dout"])

        return f

    def conv_fwd():
        with torch.no_grad():
            F_.conv2d(t["x"], tw, tb, stride=1, padding=3)

    def pool():
        txpool.grad = None
        F_.max_pool2d(txpool, 2, 2).backward(t["pdout"])

    def crp(dx):
        xin = t["x"].clone().requires_grad_(dx)

        def f():
            tw.grad = tb.grad = xin.grad = None
            out = F_.max_pool2d(F_.relu(F_.conv2d(xin, tw, tb, stride=1, padding=3)), 2, 2)
            out.backward(t["pdout"])

        return f

    def bn():
        txpool.grad = tg.grad = tbt.grad = None
        F_.batch_norm(txpool, None, None, tg, tbt, training=True).backward(t["dout"])

    def gn():
        txpool.grad = tg.grad = tbt.grad = None
        F_.group_norm(txpool, GROUPS, tg, tbt).backward(t["dout"])

    calls = (conv_fwd, conv(False), conv(True), pool, crp(False), crp(True), bn, gn)
    return dict(zip(CASES, calls))


def torch_child():
    """The PyTorch process: a line with its version and threads (or why it cannot run), then
    for each request read on stdin ([case name, rounds]) the seconds of that many calls, after
    two untimed ones."""
    try:
        import torch
    except ImportError as e:
        print(json.dumps({"error": str(e)}), flush=True)
        return
    torch.set_num_threads(ARGS.threads)
    cases = torch_cases(torch, comparison_inputs())
    print(
        json.dumps({"version": torch.__version__, "threads": torch.get_num_threads()}), flush=True
    )
    for line in sys.stdin:
        name, rounds = json.loads(line)
        print(json.dumps(timeit(cases[name], rounds, warm=2)), flush=True)


def torch_report(fl, lu, R):
    if ARGS.no_torch:
        print("\nPyTorch comparison skipped: --no-torch")
        return
    child = subprocess.Popen(
        [sys.executable, __file__, "--torch-child", "--threads", str(ARGS.threads)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        hello = json.loads(child.stdout.readline() or '{"error": "the PyTorch process failed"}')
        if "error" in hello:
            print(f"\nPyTorch comparison skipped: {hello['error']}")
            return

        def theirs(name, rounds):
            child.stdin.write(json.dumps([name, rounds]) + "\n")
            child.stdin.flush()
            line = child.stdout.readline()
            if not line:
                raise SystemExit(f"the PyTorch process ended during {name!r} (its error above)")
            return json.loads(line)

        print(
            f"\nvs PyTorch {hello['version']} CPU, in its own process (float32, "
            f"{hello['threads']} threads; ms: median min; ratio = ours / torch of the medians "
            "and of the minima):"
        )
        print(f"  {'':44s} {'ours':>17s} {'torch':>17s} {'ratio':>6s} {'(min)':>6s}")
        ours = ours_cases(fl, lu, comparison_inputs())
        for name in CASES:
            to = timeit(ours[name], R, warm=2)
            tt = theirs(name, R)
            print(
                f"  {name:44s} {ms(to)} {ms(tt)} {np.median(to) / np.median(tt):6.2f} "
                f"{np.min(to) / np.min(tt):6.2f}"
            )
    finally:
        child.stdin.close()
        child.wait()


if __name__ == "__main__":
    torch_child() if ARGS.torch_child else main()
