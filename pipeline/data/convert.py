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
others. Every split is then stored in a shuffled order (:func:`split_rows`), so that its
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
from pipeline.checkpoint import NPY_READ_LOCK
from pipeline.cluster import connect, worker_addresses
from pipeline.data import sources as S
from pipeline.data.download import download, is_url, url_basename
from pipeline.data.paths import DEFAULT_STORE, OFFLINE_HINT, default_store
from pipeline.data.paths import data_root as default_data_root
from pipeline.data.store import (
    FORMAT,
    FORMAT_VERSION,
    IMAGE_SHAPE,
    create_layout,
    finalize_store,
    labels_dtype,
    open_store,
    store_state,
    write_block,
)
from pipeline.errors import DataError
from pipeline.procs import Owner

__all__ = [
    "prepare",
    "PrepareResult",
    "DEFAULT_STORE",
    "DEFAULT_VAL",
    "DEFAULT_CHUNK",
    "SHUFFLE_SEED",
    "shuffle_order",
    "split_rows",
]

DEFAULT_VAL = 1000
DEFAULT_CHUNK = 1000  # images per chunk: 3 MB of uint8 pixels
TASK_ROWS = {"cifar": 10000, "image": 2500}  # rows per task (rounded to whole chunks)
SHUFFLE_SEED = 0
#: the stream of :func:`shuffle_order` each ordering draws from
STREAMS = {"pool": 0, "train": 1, "val": 2, "test": 3}

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


def _warm_up(worker: str) -> str:
    return worker


def _guarded(fn):
    """Run a worker task so that a user error comes back as a value, not as a failed task
    (which Dask would log with a traceback on the worker); skip it once the job is aborted."""

    def task(abort_flag: str, *args):
        if os.path.exists(abort_flag):
            return ("aborted", None)
        try:
            return ("ok", fn(*args))
        except DataError as exc:
            return ("error", exc)

    task.__name__ = task.__qualname__ = fn.__name__
    task.__module__ = fn.__module__
    return task


def _stage_batch(path: str, name: str, dest: str, remove_source: bool) -> tuple[int, np.ndarray]:
    """Unpickle one batch safely and check it; save its pixels as a raw (n, 3072) uint8 .npy
    at ``dest`` (read back by slices, no unpickling); return (n, labels int64)."""
    X, y = S.read_batch(Path(path), name, None)
    np.save(dest, X.reshape(len(X), -1), allow_pickle=False)
    if remove_source:
        os.unlink(path)
    return len(X), y


_stage_batch = _guarded(_stage_batch)


def _write_rows(
    store: str,
    split: str,
    start: int,
    files: list,
    rows: np.ndarray,
    labels: np.ndarray,
    want_sum: bool,
) -> tuple[int, np.ndarray | None]:
    """Rows ``start:start+n`` of ``split``: the source images ``rows`` (int64 (n,), in the
    stored order), gathered from the split source's staged files [(npy path, first row,
    end row)] of (rows, 3072) uint8 pixels."""
    X = np.empty((len(rows), S.PIXELS), np.uint8)
    for path, lo, hi in files:
        sel = np.flatnonzero((rows >= lo) & (rows < hi))
        if sel.size:
            with NPY_READ_LOCK:  # the header is parsed with ast (see the lock)
                part = np.load(path, mmap_mode="r", allow_pickle=False)
            X[sel] = part[rows[sel] - lo]
    X = X.reshape(-1, *IMAGE_SHAPE)
    write_block(store, split, start, X, labels)
    return len(X), (X.reshape(len(X), -1).sum(axis=0, dtype=np.int64) if want_sum else None)


_write_rows = _guarded(_write_rows)


def _write_images(
    store: str,
    split: str,
    start: int,
    names: list,
    labels: list,
    pack: str | None,
    offsets: list | None,
    paths: list | None,
    label: str,
    want_sum: bool,
) -> tuple[int, np.ndarray | None, list | None]:
    """Decode images (from a pack file of concatenated bytes, or from files) and write them."""
    n = len(names)
    X = np.empty((n, *IMAGE_SHAPE), np.uint8)
    md5s = None
    if pack is not None:
        with open(pack, "rb") as f:
            blob = f.read()
        for i, name in enumerate(names):
            X[i] = S.decode_image(blob[offsets[i] : offsets[i + 1]], f"{label}:{name}")
    else:
        md5s = []
        for i, path in enumerate(paths):
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as exc:
                raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
            md5s.append(hashlib.md5(data).hexdigest())
            X[i] = S.decode_image(data, path)
    write_block(store, split, start, X, np.asarray(labels, dtype=np.int64))
    return n, (X.reshape(n, -1).sum(axis=0, dtype=np.int64) if want_sum else None), md5s


_write_images = _guarded(_write_images)


# ------------------------------------------------------------------------------ planning


def _ranges(n: int, chunk: int, task_rows: int) -> list[tuple[int, int]]:
    c = max(1, min(chunk, n))
    step = c * max(1, task_rows // c)
    return [(a, min(a + step, n)) for a in range(0, n, step)]


_MASK = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15


def _mix64(x):
    """splitmix64's finalizer, on Python ints or uint64 arrays (wrapping)."""
    if isinstance(x, int):
        x ^= x >> 30
        x = (x * 0xBF58476D1CE4E5B9) & _MASK
        x ^= x >> 27
        x = (x * 0x94D049BB133111EB) & _MASK
        return x ^ (x >> 31)
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def shuffle_order(n: int, seed: int, stream: int) -> np.ndarray:
    """A permutation of ``range(n)`` (int64 (n,)) that depends on ``(n, seed, stream)``
    alone, with every NumPy version: the indices sorted by the splitmix64 sequence started
    from ``(seed, stream)``."""
    start = _mix64(((seed & _MASK) * _GAMMA + stream) & _MASK)
    with np.errstate(over="ignore"):
        steps = np.arange(1, n + 1, dtype=np.uint64) * np.uint64(_GAMMA)
        keys = _mix64(steps + np.uint64(start))
    return np.argsort(keys, kind="stable").astype(np.int64)


def split_rows(
    n_pool: int, n_test: int, val: int, seed: int = SHUFFLE_SEED, *, shuffle_pool: bool
) -> dict[str, np.ndarray]:
    """Source rows of each split in stored order: {"train", "val": rows of the train source
    (int64), "test": rows of the test source}.

    The pool is the train source in its order, shuffled first (stream 0) if ``shuffle_pool``
    (an image folder, listed by class); val is its last ``val`` rows, train the others. Each
    split is then stored in ``shuffle_order(n, seed, stream)`` order (train 1, val 2,
    test 3). Train and val are disjoint and together the whole pool.
    """
    pool = np.arange(n_pool, dtype=np.int64)
    if shuffle_pool:
        pool = pool[shuffle_order(n_pool, seed, STREAMS["pool"])]
    n_train = n_pool - val
    parts = {
        "train": pool[:n_train],
        "val": pool[n_train:],
        "test": np.arange(n_test, dtype=np.int64),
    }
    return {
        split: rows[shuffle_order(len(rows), seed, STREAMS[split])] for split, rows in parts.items()
    }


def _order_attrs(val_rule: str) -> dict:
    return {
        "val": val_rule,
        "rows": "every split stored shuffled: row i of a split is its image "
        "split_rows(...)[split][i] (pipeline.data.convert; splitmix64 order, seed "
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
            hint=f"no CIFAR-10 copy found in {data_root} or Keras's folder; {OFFLINE_HINT}",
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
    kept = _remove_stale(out)
    partial, staging = _leftover(out, "partial"), _leftover(out, "staging")
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
        _install(partial, out)
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


LEFTOVER_KINDS = ("partial", "staging", "old")


def _leftover(out: Path, kind: str) -> Path:
    """``STORE.<kind>.<pid>.<pid namespace>.<random id>.<host>``: a folder this process owns
    beside the store (the host last: it may hold dots)."""
    me = Owner.me()
    host = me.host.replace(os.sep, "_") or "unknown"
    return out.parent / f"{out.name}.{kind}.{me.pid}.{me.namespace}.{uuid.uuid4().hex[:8]}.{host}"


def leftover_owner(out: Path, path: Path) -> tuple[str, Owner | None] | None:
    """(kind, owner) of a folder left beside the store ``out``; owner None for the names
    of older versions (``STORE.<kind>-<pid>-<id>``, no host: nobody can tell whose it is);
    None for anything else."""
    rest = path.name[len(out.name) + 1 :] if path.name.startswith(out.name + ".") else ""
    for kind in LEFTOVER_KINDS:
        if rest.startswith(kind + "."):
            parts = rest[len(kind) + 1 :].split(".", 3)
            try:
                pid, ns = int(parts[0]), int(parts[1])
            except (ValueError, IndexError):
                return None
            return (kind, Owner(parts[3], ns, pid)) if len(parts) == 4 else None
        if rest.startswith(kind + "-"):
            return kind, None
    return None


def _remove_stale(out: Path) -> list[tuple[Path, str]]:
    """Remove partial/staging folders of conversions whose process is gone, and old stores
    left by a replacement that was cut short once the store is there again. Only owners of
    this host and pid namespace can be checked: other hosts', other containers' and
    unnamed (older versions') leftovers are kept; returns those [(path, why)]."""
    kinds = LEFTOVER_KINDS if store_state(out) == "complete" else ("partial", "staging")
    kept = []
    for p in sorted(out.parent.glob(f"{out.name}.*")):
        found = leftover_owner(out, p)
        if found is None or found[0] not in kinds:
            continue
        owner = found[1]
        if owner is None:
            kept.append((p, "left by an older convpipe, which did not record its host"))
        elif not owner.is_local():
            kept.append(
                (
                    p,
                    f"owned by pid {owner.pid} of host {owner.host} (pid namespace "
                    f"{owner.namespace}), which cannot be checked from here",
                )
            )
        elif not owner.alive():
            shutil.rmtree(p, ignore_errors=True)
    return kept


def _install(partial: Path, out: Path) -> None:
    """Move the complete store into place; an old one is removed only afterwards."""
    if out.exists():
        old = _leftover(out, "old")
        os.rename(out, old)
        try:
            os.rename(partial, out)
        except OSError:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(partial, out)


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
            warm = [cl.submit(_warm_up, w, workers=[w], pure=False) for w in worker_addresses(cl)]
            if src.kind == "image-folder":
                plan = planned.result()
                del warm
                return _run_images(cl, src, plan, out, partial, staging, val, chunk, progress)
            stage_futures: dict = {}

            def submit_stage(name, path, display, remove):
                if name in (*S.TRAIN_BATCHES, S.TEST_BATCH) and name not in stage_futures:
                    stage_futures[name] = cl.submit(
                        _stage_batch,
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
                    _write_rows,
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
                    _write_images,
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
