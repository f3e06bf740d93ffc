"""`prepare`: convert a CIFAR-10 source or an image folder into a store, as a Dask job.

CIFAR-10: the coordinator (this process) finds or downloads the source and reads the archive
once, in a thread, while the cluster starts (the embedded LocalCluster by default, or the
scheduler at an address). Each batch is handed to a worker as soon as it is out of the
archive: the worker unpickles it with the restricted unpickler, checks it, and keeps its
pixels as a raw .npy beside the store. Then, for each split, chunk-aligned row ranges are
tasks: the worker slices the rows it needs and writes its chunks of ``images`` and
``labels`` itself; no two tasks write one chunk. Image folders: the coordinator lists the
folder (or reads the tar once, in memory) and each task decodes and writes a range of
images. Tasks of the train split return pixel sums, from which the coordinator computes
the mean image.

Order: val is the last ``val`` images of the train pool (CIFAR-10: data_batch_1..5 in file
order, so val holds the images cs231n's ``get_CIFAR10_data`` validates on; an image folder:
its files sorted by (class, name), then shuffled, since that order is by class), train the
others. Every split is then stored in a shuffled order (:mod:`pipeline.data.shuffle`), so its
first images are a sample of all classes. The order depends on the seed alone
(``SHUFFLE_SEED``, recorded in the store), not on the NumPy version.

Everything is written to ``STORE.partial.<tag>`` (and ``STORE.staging.<tag>``), the tag
naming the owner (pid, pid namespace, a random id, host), and renamed to ``STORE`` only
once complete (attributes with ``complete: true`` last), so an interrupted conversion never
leaves a store that looks complete. A later run removes such leftovers only when their
owner is a process of its own host and pid namespace that is gone. A complete store is
left alone unless ``force``; with ``force`` the old store is removed only after the new one
is complete.

With a remote scheduler, the workers must see the store's folder (and the source, for a
folder source) at the same paths as this process.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as _dt
import hashlib
import os
import queue
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from distributed import as_completed, wait

from pipeline import __version__
from pipeline.cluster import connect, worker_addresses
from pipeline.data import sources as S
from pipeline.data.download import download, is_url, url_basename
from pipeline.data.leftovers import install, leftover_path, remove_stale
from pipeline.data.paths import DEFAULT_STORE, OFFLINE_HINT, default_store
from pipeline.data.paths import data_root as default_data_root
from pipeline.data.shuffle import SHUFFLE_SEED, split_rows
from pipeline.data.store import (
    FORMAT,
    FORMAT_VERSION,
    IMAGE_SHAPE,
    create_layout,
    finalize_store,
    labels_dtype,
    open_store,
    store_state,
)
from pipeline.data.tasks import stage_batch, warm_up, write_images, write_rows
from pipeline.errors import DataError

__all__ = [
    "prepare",
    "PrepareResult",
    "DEFAULT_STORE",
    "DEFAULT_VAL",
    "DEFAULT_CHUNK",
]

DEFAULT_VAL = 1000
DEFAULT_CHUNK = 1000  # images per chunk: 3 MB of uint8 pixels
TASK_ROWS = {"cifar": 10000, "image": 2500}  # rows per task (rounded to whole chunks)

Progress = Callable[[str, int, int], None]


@dataclass
class PrepareResult:
    path: Path
    skipped: bool  # True: a complete store was already there
    splits: dict[str, int]
    class_names: list[str]
    source: dict = field(default_factory=dict)
    seconds: float = 0.0
    nbytes: int = 0  # size of the store on disk
    protected: bool = True  # False: a complete store of format 1 (no checksums) was kept
    kept: list = field(
        default_factory=list
    )  # leftovers of other conversions not removed: [(path, why)]


def dir_size(path: str | os.PathLike) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


# ------------------------------------------------------------------------------ worker tasks


# ------------------------------------------------------------------------------ planning


def _ranges(n: int, chunk: int, task_rows: int) -> list[tuple[int, int]]:
    c = max(1, min(chunk, n))
    step = c * max(1, task_rows // c)
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def _order_attrs(val_rule: str) -> dict:
    return {
        "val": val_rule,
        "rows": "every split stored shuffled: row i of a split is its image "
        "split_rows(...)[split][i] (pipeline.data.shuffle; splitmix64 order, seed "
        "shuffle_seed; streams train 1, val 2, test 3)",
    }


# ------------------------------------------------------------------------------ sources


def _resolve(source, data_root: Path, verify: bool, progress: Progress | None) -> S.Source:
    if source is None:
        found = S.find_cifar10(data_root)
        if found is not None:
            return S.classify(found)
        dest = data_root / S.ARCHIVE_NAME
        download(
            S.OFFICIAL_URL,
            dest,
            md5=S.OFFICIAL_MD5 if verify else None,
            progress=progress,
            hint=f"no CIFAR-10 copy found ({S.ARCHIVE_NAME} or {S.BATCHES_DIR}/ in {data_root} "
            f"or {data_root / 'cifar10'}, torchvision's places with root={data_root}, nor in "
            f"Keras's {S.keras_datasets_dir()}); put the official {S.ARCHIVE_NAME} in "
            f"{data_root}, or {OFFLINE_HINT}",
        )
        return S.classify(dest)
    text = os.fspath(source)
    if is_url(text):
        dest = data_root / url_basename(text)

        def check(tmp: Path, md5: str) -> None:
            src = S.classify(tmp)
            if src.kind == "cifar-archive" and verify and md5 != S.OFFICIAL_MD5:
                raise DataError(
                    f"{text}: md5 {md5} is not the official CIFAR-10 archive's "
                    f"{S.OFFICIAL_MD5}; nothing was saved (--no-verify accepts it)"
                )

        download(text, dest, check=check, progress=progress, hint=OFFLINE_HINT)
        return S.classify(dest)
    return S.classify(Path(text).expanduser())


def _source_attrs(
    src: S.Source, md5: str, md5_of: str, official: bool, verified: bool, **extra
) -> dict:
    return {
        "kind": src.kind,
        "path": str(src.path.resolve()),
        "md5": md5,
        "md5_of": md5_of,
        "official": official,
        "verified": verified,
        **extra,
    }


def _verify_archive(path: Path) -> None:
    md5 = S.file_md5(path)
    if md5 != S.OFFICIAL_MD5:
        raise DataError(
            f"{path}: md5 {md5} is not the official CIFAR-10 archive's "
            f"{S.OFFICIAL_MD5} (--no-verify accepts a non-official copy)"
        )


def _plan_cifar(
    src: S.Source, staging: Path, verify: bool, progress: Progress | None, on_file=None
):
    """Coordinator side of a CIFAR source: stage/verify files; return (files, display names,
    source attrs). ``on_file(name, path)`` is called as each file of an archive is staged."""
    if src.kind == "cifar-archive":
        md5, staged = S.extract_cifar_archive(src.path, staging, progress, on_file)
        if verify and md5 != S.OFFICIAL_MD5:
            raise DataError(
                f"{src.path}: md5 {md5} is not the official CIFAR-10 archive's "
                f"{S.OFFICIAL_MD5} (--no-verify accepts a non-official copy)"
            )
        files = S.batch_files(staging, staged, label=str(src.path))
        attrs = _source_attrs(src, md5, "archive file", md5 == S.OFFICIAL_MD5, verify)
        names = {n: f"{src.path}:{S.BATCHES_DIR}/{n}" for n in files}
    else:
        files = S.batch_files(src.path)
        md5s = {n: S.file_md5(p) for n, p in files.items()}
        official = all(md5s[n] == S.BATCH_MD5[n] for n in S.BATCH_MD5)
        if verify and not official:
            bad = next(n for n in S.BATCH_MD5 if md5s[n] != S.BATCH_MD5[n])
            raise DataError(
                f"{files[bad]}: md5 {md5s[bad]} is not the official {S.BATCH_MD5[bad]} "
                "(--no-verify accepts a non-official copy)"
            )
        listing = "".join(f"{md5s[n]}  {n}\n" for n in sorted(md5s))
        attrs = _source_attrs(
            src,
            hashlib.md5(listing.encode()).hexdigest(),
            "md5sum listing of the batch files",
            official,
            verify,
            files=md5s,
        )
        names = {n: str(p) for n, p in files.items()}
    return files, names, attrs


# ------------------------------------------------------------------------------ the job


def prepare(
    source: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    *,
    val: int = DEFAULT_VAL,
    chunk: int | None = None,
    force: bool = False,
    verify: bool = True,
    scheduler: str | None = None,
    workers: int | None = None,
    processes: bool = False,
    client=None,
    data_root: str | os.PathLike | None = None,
    progress: Progress | None = None,
) -> PrepareResult:
    """Convert ``source`` (path or URL; None: find or download CIFAR-10) into the store ``out``.

    ``out`` defaults to ``cifar10.zarr`` in the data root, ``data_root`` (where CIFAR-10 is
    looked for and downloaded to) to ``$CONVPIPE_DATA`` or ``data`` (pipeline.data.paths).
    ``val``: images of the train pool held out as the val split (its last ones; see the
    module's "Order"). ``chunk``: images per chunk (default 1000). ``verify=False`` accepts
    a non-official CIFAR-10 copy (its md5 is recorded either way). The job runs on
    ``client`` if given, else on the cluster at ``scheduler``, else on a new embedded
    LocalCluster of ``workers`` single-threaded workers (default: one per core), in this
    process by default: the work (zlib, Blosc, Pillow decoding, file I/O) runs outside the
    GIL, and on few cores worker processes cost more to start, import and shut down than
    they save (``processes=True`` for those). ``progress(stage, done, total)`` is called
    with stages "download" and "read" (bytes) and "convert" (images). Returns a
    :class:`PrepareResult`; raises :class:`DataError`.
    """
    t0 = time.perf_counter()
    out = Path(out).expanduser() if out is not None else default_store()
    data_root = Path(data_root).expanduser() if data_root is not None else default_data_root()
    if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 0:
        raise DataError(f"val must be an integer >= 0, got {val!r}")
    if chunk is not None and (
        isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1
    ):
        raise DataError(f"chunk must be an integer >= 1, got {chunk!r}")

    state = store_state(out)
    if state == "foreign":
        raise DataError(
            f"{out}: exists and is not a convpipe store; remove it or choose another --out"
        )
    if state == "complete" and not force:
        s = open_store(out)
        have_val = s.splits.get("val")
        if have_val != val or (chunk is not None and s.attrs.get("chunk") != chunk):
            raise DataError(
                f"{out}: a complete store with val={have_val}, chunk={s.attrs.get('chunk')} "
                f"is already there; --force rebuilds it with val={val}"
                + (f", chunk={chunk}" if chunk is not None else "")
            )
        return PrepareResult(
            out,
            True,
            dict(s.splits),
            list(s.class_names),
            dict(s.attrs.get("source", {})),
            time.perf_counter() - t0,
            dir_size(out),
            protected=s.protected,
        )
    chunk = DEFAULT_CHUNK if chunk is None else int(chunk)
    val = int(val)

    out.parent.mkdir(parents=True, exist_ok=True)
    kept = remove_stale(out)
    partial, staging = leftover_path(out, "partial"), leftover_path(out, "staging")
    try:
        src = _resolve(source, data_root, verify, progress)
        result = _run(
            src,
            out,
            partial,
            staging,
            val=val,
            chunk=chunk,
            verify=verify,
            scheduler=scheduler,
            workers=workers,
            processes=processes,
            client=client,
            progress=progress,
        )
        install(partial, out)
    except OSError as exc:
        raise DataError(f"{out}: writing the store failed ({exc.strerror or exc})") from None
    finally:
        for p in (staging, partial):
            if p.exists():
                shutil.rmtree(p, ignore_errors=True)
    result.seconds = time.perf_counter() - t0
    result.nbytes = dir_size(out)
    result.kept = kept
    return result


def _connect(client, scheduler, workers, processes):
    if client is not None:
        return contextlib.nullcontext(client)

    return connect(scheduler, workers=workers, processes=processes)


def _run(
    src: S.Source,
    out: Path,
    partial: Path,
    staging: Path,
    *,
    val,
    chunk,
    verify,
    scheduler,
    workers,
    processes,
    client,
    progress,
) -> PrepareResult:
    staging.mkdir(parents=True)
    if src.kind == "cifar-archive" and verify:
        _verify_archive(src.path)  # before starting a cluster: hashing is quicker than reading
    # read the source (one pass over an archive) while the cluster starts; each CIFAR batch
    # is handed to the workers as soon as it is out of the archive
    staged: queue.Queue = queue.Queue()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        if src.kind == "image-folder":
            planned = pool.submit(S.list_image_folder, src, progress)
        else:
            planned = pool.submit(
                _plan_cifar,
                src,
                staging,
                verify,
                progress,
                lambda name, path: staged.put((name, path)),
            )
        with _connect(client, scheduler, workers, processes) as cl:
            abort = staging / "ABORT"
            # workers import zarr and Pillow while the source is read
            warm = [cl.submit(warm_up, w, workers=[w], pure=False) for w in worker_addresses(cl)]
            if src.kind == "image-folder":
                plan = planned.result()
                del warm
                return _run_images(cl, src, plan, out, partial, staging, val, chunk, progress)
            stage_futures: dict = {}

            def submit_stage(name, path, display, remove):
                if name in (*S.TRAIN_BATCHES, S.TEST_BATCH) and name not in stage_futures:
                    stage_futures[name] = cl.submit(
                        stage_batch,
                        str(abort),
                        str(path),
                        display,
                        str(staging / f"{name}.npy"),
                        remove,
                        pure=False,
                    )

            while not (planned.done() and staged.empty()):
                try:
                    name, path = staged.get(timeout=0.05)
                except queue.Empty:
                    continue
                submit_stage(name, path, f"{src.path}:{S.BATCHES_DIR}/{name}", True)
            try:
                plan = planned.result()
            except BaseException:
                abort.touch()

                wait(list(stage_futures.values()), timeout=60)  # no task writes after we return
                raise
            files, names, _ = plan
            for name in (*S.TRAIN_BATCHES, S.TEST_BATCH):  # a folder source: nothing staged yet
                submit_stage(name, files[name], names[name], False)
            del warm
            return _run_cifar(
                cl, src, plan, stage_futures, out, partial, staging, val, chunk, progress
            )


def _collect(futures, abort_flag: Path, on_done=None) -> list:
    """Results of guarded tasks in submission order, calling ``on_done(result)`` as each
    finishes. On the first error the job is aborted (queued tasks return at once) and, once
    no task is still running, that error is raised: nothing writes to the store after this."""
    error: BaseException | None = None
    try:
        for fut in as_completed(futures):
            try:
                status, value = fut.result()
            except Exception as exc:  # noqa: BLE001 - a bug or an OSError inside a task
                status, value = "error", exc
            if status == "error" and error is None:
                error = value
                abort_flag.touch()
            elif status == "ok" and error is None and on_done is not None:
                on_done(value)
    except BaseException:
        abort_flag.touch()
        wait(futures, timeout=60)
        raise
    if error is not None:
        raise error
    return [fut.result()[1] for fut in futures]


def _base_attrs(out: Path, class_names, sizes, chunk, source_attrs, order) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "class_names": list(class_names),
        "splits": dict(sizes),
        "chunk": chunk,
        "image_shape": list(IMAGE_SHAPE),
        "layout": "NCHW",
        "labels_dtype": str(labels_dtype(len(class_names))),
        "source": source_attrs,
        "order": order,
        "shuffle_seed": SHUFFLE_SEED,
        "store_id": uuid.uuid4().hex,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "convpipe_version": __version__,
    }


def _split_sizes(n_train_all: int, n_test: int, val: int, label: str) -> dict[str, int]:
    if val >= n_train_all:
        raise DataError(f"{label}: val={val} leaves no training images ({n_train_all} in all)")
    return {"train": n_train_all - val, "val": val, "test": n_test}


def _run_cifar(
    client, src, plan, stage_futures, out, partial, staging, val, chunk, progress
) -> PrepareResult:
    files, names, source_attrs = plan
    abort = staging / "ABORT"
    order = [*S.TRAIN_BATCHES, S.TEST_BATCH]
    staged = dict(zip(order, _collect([stage_futures[b] for b in order], abort)))
    class_names = S.read_meta(files[S.META], names[S.META])
    n_classes = len(class_names)
    for b in order:
        S.check_labels(staged[b][1], names[b], n_classes)
    counts = {b: staged[b][0] for b in order}
    npy = {b: str(staging / f"{b}.npy") for b in order}
    offsets = np.concatenate([[0], np.cumsum([counts[b] for b in S.TRAIN_BATCHES])]).tolist()
    sizes = _split_sizes(offsets[-1], counts[S.TEST_BATCH], val, str(src.path))
    create_layout(partial, sizes, chunk, n_classes)

    # the staged files of each split's source [(npy, first row, end row)], and its labels
    train_files = [(npy[b], offsets[i], offsets[i + 1]) for i, b in enumerate(S.TRAIN_BATCHES)]
    source = {
        "train": (train_files, np.concatenate([staged[b][1] for b in S.TRAIN_BATCHES])),
        "test": ([(npy[S.TEST_BATCH], 0, counts[S.TEST_BATCH])], staged[S.TEST_BATCH][1]),
    }
    rows = split_rows(offsets[-1], counts[S.TEST_BATCH], val, shuffle_pool=False)
    futures = []
    for split, r in rows.items():
        files, labels = source["test" if split == "test" else "train"]
        for a, b in _ranges(sizes[split], chunk, TASK_ROWS["cifar"]):
            futures.append(
                client.submit(
                    write_rows,
                    str(abort),
                    str(partial),
                    split,
                    a,
                    files,
                    r[a:b],
                    labels[r[a:b]],
                    split == "train",
                    pure=False,
                )
            )
    total = sum(sizes.values())
    state = {"done": 0, "sum": np.zeros(int(np.prod(IMAGE_SHAPE)), np.int64)}
    if progress:
        progress("convert", 0, total)

    def on_done(res):
        n, s = res
        state["done"] += n
        if s is not None:
            state["sum"] += s
        if progress:
            progress("convert", state["done"], total)

    _collect(futures, abort, on_done)
    mean = (state["sum"] / sizes["train"]).reshape(IMAGE_SHAPE)
    order_attrs = _order_attrs(
        "the last images of the pool data_batch_1..5 in file order (the end of data_batch_5)"
    )
    finalize_store(
        partial, _base_attrs(out, class_names, sizes, chunk, source_attrs, order_attrs), mean
    )
    return PrepareResult(out, False, sizes, class_names, source_attrs)


def _run_images(
    client, src, listing: S.ImageListing, out, partial, staging, val, chunk, progress
) -> PrepareResult:
    label = str(src.path)
    pool, test = listing.items["train"], listing.items["test"]
    sizes = _split_sizes(len(pool), len(test), val, label)
    create_layout(partial, sizes, chunk, len(listing.classes))
    order = split_rows(len(pool), len(test), val, shuffle_pool=True)
    rows = {
        split: [(test if split == "test" else pool)[i] for i in r] for split, r in order.items()
    }

    abort = staging / "ABORT"
    futures = []
    for split, items in rows.items():
        for a, b in _ranges(len(items), chunk, TASK_ROWS["image"]):
            part = items[a:b]
            names = [r for r, _ in part]
            labels = [c for _, c in part]
            if src.container == "tar":
                pack = staging / f"pack-{split}-{a}.bin"
                offsets = [0]
                with open(pack, "wb") as f:
                    for r in names:
                        data = listing.blobs[r]
                        f.write(data)
                        offsets.append(offsets[-1] + len(data))
                args = (str(pack), offsets, None)
            else:
                args = (None, None, [str((src.path / r).resolve()) for r in names])
            futures.append(
                client.submit(
                    write_images,
                    str(abort),
                    str(partial),
                    split,
                    a,
                    names,
                    labels,
                    *args,
                    label,
                    split == "train",
                    pure=False,
                )
            )
    listing.blobs.clear()
    total = sum(sizes.values())
    state = {"done": 0, "sum": np.zeros(int(np.prod(IMAGE_SHAPE)), np.int64)}
    if progress:
        progress("convert", 0, total)

    def on_done(res):
        n, s, _md5s = res
        state["done"] += n
        if s is not None:
            state["sum"] += s
        if progress:
            progress("convert", state["done"], total)

    results = _collect(futures, abort, on_done)
    if src.container == "tar":
        md5, md5_of = listing.md5, "archive file"
    else:
        # each task's md5 list follows its names; futures are in submission order
        all_names = [r for split in rows for r, _ in rows[split]]
        all_md5s = [m for res in results for m in res[2]]
        text = "".join(f"{m}  {n}\n" for n, m in sorted(zip(all_names, all_md5s)))
        md5, md5_of = hashlib.md5(text.encode()).hexdigest(), "md5sum listing of the image files"
    source_attrs = _source_attrs(src, md5, md5_of, False, False)
    mean = (state["sum"] / sizes["train"]).reshape(IMAGE_SHAPE)
    order_attrs = _order_attrs(
        "the last images of the pool: train/ files sorted by (class, name), shuffled (stream 0)"
    )
    finalize_store(
        partial, _base_attrs(out, listing.classes, sizes, chunk, source_attrs, order_attrs), mean
    )
    return PrepareResult(out, False, sizes, listing.classes, source_attrs)
