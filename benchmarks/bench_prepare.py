"""Converting all 60,000 CIFAR-10 images from a local archive: the Dask job vs a serial loop.

    python benchmarks/bench_prepare.py [--archive PATH] [--workers N] [--images] [--no-serial]

The archive defaults to /tmp/convpipe-bench/cifar-10-python.tar.gz, built once with
../shared/data/make_cifar10_python.py if missing. Measured side by side in one run:
- ``prepare``: ``pipeline.data.prepare(archive, out, verify=False)`` on a new embedded
  LocalCluster, cluster start and shutdown included (what ``convpipe data prepare`` does);
- serial: the same steps in this one process without Dask (read the archive, unpickle each
  batch safely, write the same store layout), the baseline the job is compared with.
Prints wall time, CPU time (this process and its children), images/s, the ratio to the
serial loop and to the 15 s target. ``--images`` also times converting the JPEG image folder
archive ../shared/data/cifar10-jpeg.tar.gz. The machine's load average is printed: other
processes on a shared 2-core machine slow every figure.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archive", default="/tmp/convpipe-bench/cifar-10-python.tar.gz")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="workers of the local cluster (default: one per core)",
    )
    p.add_argument(
        "--images", action="store_true", help="also convert the JPEG image-folder archive"
    )
    p.add_argument("--no-serial", action="store_true", help="skip the serial baseline")
    return p.parse_args()


def _cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _ensure_archive(path: Path) -> Path:
    if path.exists():
        return path
    script = SHARED / "make_cifar10_python.py"
    print(f"building {path} with {script} (once)...", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, str(script), str(path.parent)], check=True, stdout=subprocess.DEVNULL
    )
    return path


def serial(archive: Path, out: Path) -> dict:
    """The conversion in one process, no Dask: the baseline."""
    import numpy as np

    from pipeline.data import sources as S
    from pipeline.data.store import (
        FORMAT,
        FORMAT_VERSION,
        create_layout,
        finalize_store,
        write_block,
    )

    stage = out.parent / (out.name + ".stage")
    _md5, staged = S.extract_cifar_archive(archive, stage)
    classes = S.read_meta(staged[S.META], S.META)
    xs, ys = zip(*(S.read_batch(staged[b], b, len(classes)) for b in S.TRAIN_BATCHES))
    X, y = np.concatenate(xs), np.concatenate(ys)
    Xt, yt = S.read_batch(staged[S.TEST_BATCH], S.TEST_BATCH, len(classes))
    from pipeline.data.shuffle import SHUFFLE_SEED, split_rows

    sizes = {"train": len(X) - 1000, "val": 1000, "test": len(Xt)}
    create_layout(out, sizes, 1000, len(classes))
    rows = split_rows(len(X), len(Xt), 1000, shuffle_pool=False)  # the job's stored order
    parts = {
        "train": (X[rows["train"]], y[rows["train"]]),
        "val": (X[rows["val"]], y[rows["val"]]),
        "test": (Xt[rows["test"]], yt[rows["test"]]),
    }
    for split, (a, b) in parts.items():
        write_block(out, split, 0, a, b)
    mean = parts["train"][0].mean(axis=0, dtype=np.float64).astype(np.float32)
    finalize_store(
        out,
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "splits": sizes,
            "class_names": classes,
            "chunk": 1000,
            "shuffle_seed": SHUFFLE_SEED,
        },
        mean,
    )
    shutil.rmtree(stage)
    return sizes


def _timed(label: str, fn):
    t, c = time.perf_counter(), _cpu()
    result = fn()
    wall, cpu = time.perf_counter() - t, _cpu() - c
    return result, wall, cpu


def main() -> int:
    args = _parse()
    from pipeline.fast_layers import machine_text  # the CPU and the kernels' vector width

    print(machine_text())
    archive = _ensure_archive(Path(args.archive))
    from pipeline.cluster import default_workers
    from pipeline.data import open_store, prepare
    from pipeline.data.convert import dir_size

    workers = args.workers or default_workers()
    print(
        f"archive {archive} ({archive.stat().st_size / 2**20:.0f} MiB); {os.cpu_count()} cores, "
        f"{workers} workers; load average before: {os.getloadavg()[0]:.2f}"
    )
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        out = Path(tmp) / "bench.zarr"
        r, wall, cpu = _timed(
            "prepare", lambda: prepare(archive, out, verify=False, workers=workers)
        )
        n = sum(r.splits.values())
        s = open_store(out)
        assert s.splits == r.splits
        print(
            f"prepare (Dask job, cluster start included): {n} images in {wall:6.2f} s wall, "
            f"{cpu:6.2f} s CPU, {n / wall:8.0f} images/s; store {dir_size(out) / 2**20:.1f} MiB; "
            f"{r.splits}"
        )
        print(
            f"  target <= 15 s: {'met' if wall <= 15 else 'NOT met'} ({wall / 15:.2f} of the "
            "target)"
        )
        if not args.no_serial:
            out2 = Path(tmp) / "serial.zarr"
            sizes, wall2, cpu2 = _timed("serial", lambda: serial(archive, out2))
            print(
                f"serial loop (one process, no Dask):         {sum(sizes.values())} images in "
                f"{wall2:6.2f} s wall, {cpu2:6.2f} s CPU"
            )
            print(f"  ratio prepare / serial (wall) = {wall / wall2:.2f}")
            a, b = open_store(out), open_store(out2)
            import numpy as np

            same = all(
                np.array_equal(
                    a.read_uint8(sp, None, cache=False)[0], b.read_uint8(sp, None, cache=False)[0]
                )
                for sp in ("train", "val", "test")
            )
            print(f"  stores identical pixel for pixel: {same}")
        if args.images:
            jpeg = SHARED / "cifar10-jpeg.tar.gz"
            out3 = Path(tmp) / "jpeg.zarr"
            r3, wall3, cpu3 = _timed("images", lambda: prepare(jpeg, out3, workers=workers))
            print(
                f"prepare from {jpeg.name} (JPEG decode): {sum(r3.splits.values())} images in "
                f"{wall3:6.2f} s wall, {cpu3:6.2f} s CPU; {r3.splits}"
            )
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
