"""A worker's data loading vs its compute, for a shard of 64 images of the three-layer net.

    python benchmarks/bench_loader.py [--store data/cifar10.zarr] [--batch 64] [--repeat 200]

Measured side by side in one process, single-threaded (as one Dask worker thread runs):
- read: ``open_store(path).read("train", shuffled indices, float32)`` with the per-process
  chunk cache warm (what every read after a worker's first costs), median over --repeat
  reads of fresh random indices; also the first (cold) read and a read with cache=False;
- compute: ``pipeline.cnn.ThreeLayerConvNet(hidden_dim=500).loss(X, y)`` (forward and
  backward) on the same 64 images, median over rounds interleaved with the reads.
- checksum: what the crc32c of every chunk costs. The store's train images are copied into
  two arrays of the same layout, one with the checksum codec and one without (format 1);
  every chunk is read back from each (read and decompressed, as a worker's cache fills),
  the two alternating; the sum over chunks of each chunk's best of --checksum-repeat.
Prints the ratio read / compute (the target is at most 5%) and the ratio of the reads with
and without the checksum. Without pipeline.cnn it prints the read time alone, with a note.
Without a store at --store it builds a synthetic one (random pixels, 49,000/1,000/10,000
images) in a temporary folder first; random pixels do not compress, so the checksum's
share of the decode time is larger there than on CIFAR-10.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", default=os.path.join("data", "cifar10.zarr"))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeat", type=int, default=200, help="timed reads (default 200)")
    p.add_argument("--compute-repeat", type=int, default=15, help="timed loss calls (default 15)")
    p.add_argument(
        "--checksum-repeat",
        type=int,
        default=5,
        help="timed reads of each chunk with and without the checksum (default 5)",
    )
    return p.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(var, "1")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def synthetic_store(path: str) -> None:
    from pipeline.data.store import (
        FORMAT,
        FORMAT_VERSION,
        create_layout,
        finalize_store,
        write_block,
    )

    sizes = {"train": 49000, "val": 1000, "test": 10000}
    rng = np.random.default_rng(0)
    create_layout(path, sizes, 1000, 10)
    total = np.zeros((3, 32, 32))
    for split, n in sizes.items():
        for a in range(0, n, 1000):
            X = rng.integers(0, 256, (min(1000, n - a), 3, 32, 32), dtype=np.uint8)
            write_block(path, split, a, X, rng.integers(0, 10, len(X)))
            if split == "train":
                total += X.sum(axis=0)
    finalize_store(
        path,
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "splits": sizes,
            "class_names": [f"c{i}" for i in range(10)],
            "chunk": 1000,
        },
        (total / sizes["train"]).astype(np.float32),
    )


def checksum_cost(store, folder: str, repeat: int) -> tuple[float, float, int]:
    """(seconds with the checksum, seconds without, images): reading back every chunk of the
    store's train images from two copies that differ only in the crc32c codec, chunk by
    chunk as a worker's cache fills (the chunk file check included), the two copies
    alternating; each chunk's best of ``repeat``, summed over the chunks."""
    from pipeline.data.store import _Array, create_layout, write_block

    X, y = store.read_uint8("train", None, cache=False)
    chunk = store.chunks["train"]
    arrays = {}
    for checksum in (True, False):
        path = os.path.join(folder, f"train-{'crc32c' if checksum else 'plain'}.zarr")
        create_layout(path, {"train": len(X)}, chunk, len(store.class_names), checksum=checksum)
        for a in range(0, len(X), chunk):
            write_block(path, "train", a, X[a : a + chunk], y[a : a + chunk])
        arrays[checksum] = _Array(path, "train", "images")
        assert arrays[checksum].protected == checksum
    n = len(X)
    del X, y
    best = {
        True: np.full(arrays[True].n_chunks, np.inf),
        False: np.full(arrays[True].n_chunks, np.inf),
    }
    for r in range(repeat):
        for k in range(arrays[True].n_chunks):
            lo, hi = arrays[True].rows(k)
            for checksum in (True, False) if (r + k) % 2 == 0 else (False, True):
                t = time.perf_counter()
                arrays[checksum].read(lo, hi)
                best[checksum][k] = min(best[checksum][k], time.perf_counter() - t)
    return float(best[True].sum()), float(best[False].sum()), n


def main() -> int:
    from pipeline.fast_layers import machine_text  # the CPU and the kernels' vector width

    print(machine_text())
    from pipeline.data import open_store

    path = ARGS.store
    tmp = None
    if not os.path.exists(path):
        tmp = tempfile.TemporaryDirectory()
        path = os.path.join(tmp.name, "synthetic.zarr")
        print(f"no store at {ARGS.store}: building a synthetic one (random pixels) at {path}")
        synthetic_store(path)
    store = open_store(path)
    n = store.splits["train"]
    rng = np.random.default_rng(0)
    print(
        f"store {store.path}: train {n} images, chunks of {store.chunks['train']}; batch "
        f"{ARGS.batch}; 1 thread"
    )

    t = time.perf_counter()
    store.read("train", rng.integers(0, n, ARGS.batch))
    cold = time.perf_counter() - t
    nocache = []
    for _ in range(5):
        idx = rng.integers(0, n, ARGS.batch)
        t = time.perf_counter()
        store.read("train", idx, cache=False)
        nocache.append(time.perf_counter() - t)
    # the first read above filled the chunks its 64 indices touched; fill the rest as training would
    store.read("train", np.arange(n))

    try:
        from pipeline.cnn import ThreeLayerConvNet

        model = ThreeLayerConvNet(hidden_dim=500, dtype=np.float32, seed=0)
    except Exception as exc:  # noqa: BLE001 - the model is another issue's; say why it is missing
        model = None
        note = f"{type(exc).__name__}: {exc}"

    reads, computes = [], []
    X, y = store.read("train", rng.integers(0, n, ARGS.batch))
    if model is not None:
        model.loss(X, y)  # JIT compile
    per_round = max(1, ARGS.repeat // max(1, ARGS.compute_repeat))
    rounds = ARGS.compute_repeat if model is not None else 1
    for _ in range(rounds):
        for _ in range(per_round if model is not None else ARGS.repeat):
            idx = rng.permutation(n)[: ARGS.batch]
            t = time.perf_counter()
            X, y = store.read("train", idx)
            reads.append(time.perf_counter() - t)
        if model is not None:
            t = time.perf_counter()
            model.loss(X, y)
            computes.append(time.perf_counter() - t)

    read_ms = 1e3 * float(np.median(reads))
    print(f"read, cold (first, decompresses chunks) {1e3 * cold:8.2f} ms")
    print(f"read, cache=False                       {1e3 * float(np.median(nocache)):8.2f} ms")
    print(
        f"read, warm cache (median of {len(reads):4d})       {read_ms:8.3f} ms   (min "
        f"{1e3 * min(reads):.3f})"
    )
    if model is None:
        print(
            f"compute: pipeline.cnn.ThreeLayerConvNet not available ({note}); read time alone above"
        )
        _print_checksum_cost(store)
        return 0
    comp_ms = 1e3 * float(np.median(computes))
    print(
        "compute: ThreeLayerConvNet(hidden_dim=500).loss, forward+backward (median of "
        f"{len(computes)}) {comp_ms:8.2f} ms"
    )
    ratio = read_ms / comp_ms
    print(
        f"ratio read / compute = {100 * ratio:.2f}%  (target <= 5%: "
        f"{'met' if ratio <= 0.05 else 'NOT met'})"
    )
    _print_checksum_cost(store)
    if tmp is not None:
        tmp.cleanup()
    return 0


def _print_checksum_cost(store) -> None:
    with tempfile.TemporaryDirectory() as folder:
        crc, plain, n = checksum_cost(store, folder, ARGS.checksum_repeat)
    print(
        f"checksum: {n} train images read back chunk by chunk (decompressed), crc32c checked "
        f"{1e3 * crc:8.1f} ms vs no checksum {1e3 * plain:8.1f} ms; ratio {crc / plain:.3f} "
        f"(each chunk's best of {ARGS.checksum_repeat}, alternating)"
    )


if __name__ == "__main__":
    sys.exit(main())
