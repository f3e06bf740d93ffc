"""`convpipe data`: prepare a store from CIFAR-10 or an image folder, describe and verify one."""

from __future__ import annotations

import argparse
import os
import sys

from pipeline.data.paths import DATA_ENV, STORE_NAME
from pipeline.errors import DataError

STORE_DEFAULT_HELP = f"${DATA_ENV}/{STORE_NAME} if {DATA_ENV} is set, else data/{STORE_NAME}"


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default unless it is None or False (those say theirs in words)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def register(subparsers) -> None:
    """Add ``convpipe data prepare``, ``convpipe data info`` and ``convpipe data verify``."""
    data = subparsers.add_parser(
        "data",
        help="prepare, inspect and verify data stores",
        description="Convert CIFAR-10 (or an image folder) into a chunked Zarr store, describe "
        "one, and check its chunks against their checksums.",
    )
    sub = data.add_subparsers(dest="data_command", metavar="COMMAND")
    data.set_defaults(func=lambda args: (data.print_help(), 2)[1])

    p = sub.add_parser(
        "prepare",
        help="convert a data set into a Zarr store (a Dask job)",
        description=(
            "Convert CIFAR-10 or an image folder into a chunked Zarr v3 store, as a Dask job "
            "(the embedded local cluster, or --scheduler). Without --source, CIFAR-10 is looked "
            "for in the data root (also torchvision's and Keras's usual places) and downloaded "
            "from its official URL if absent; offline, give a local copy with --source PATH. "
            "Every split is stored in a fixed shuffled order and every chunk with a crc32c "
            "checksum. Re-running over a complete store does nothing unless --force."
        ),
        formatter_class=_DefaultsFormatter,
    )
    p.add_argument(
        "--source",
        metavar="PATH|URL",
        default=None,
        help="cifar-10-python.tar.gz, a cifar-10-batches-py/ folder, an image folder "
        "(train/<class>/*, test/<class>/*; directory or tar) or a URL of one "
        "(default: found or downloaded CIFAR-10)",
    )
    p.add_argument(
        "--out",
        metavar="STORE",
        default=None,
        help=f"the store to write (default: {STORE_DEFAULT_HELP})",
    )
    p.add_argument(
        "--val",
        metavar="N",
        type=int,
        default=1000,
        help="images taken from the end of the training images (CIFAR-10: of "
        "data_batch_5, as cs231n) for the val split",
    )
    p.add_argument(
        "--chunk", metavar="N", type=int, default=None, help="images per chunk (default 1000, 3 MB)"
    )
    p.add_argument(
        "--scheduler",
        metavar="ADDR",
        default=None,
        help="Dask scheduler address (default: start a local cluster); its workers "
        "must see the store's folder at the same path",
    )
    p.add_argument(
        "--workers",
        metavar="N",
        type=int,
        default=None,
        help="workers of the local cluster (default: one per core)",
    )
    p.add_argument(
        "--processes",
        action="store_true",
        help="run the local cluster's workers as processes (default: threads in this "
        "process, faster here since the work releases the GIL)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="rebuild a complete store (the old one is replaced only once the new one is complete)",
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="accept a CIFAR-10 copy whose md5 is not the official one (it is recorded in the "
        "store)",
    )
    p.add_argument(
        "--data-root",
        metavar="DIR",
        default=None,
        help=f"where CIFAR-10 is looked for and downloaded to (default: ${DATA_ENV} "
        "if set, else data)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_prepare)

    i = sub.add_parser(
        "info",
        help="describe a store",
        description="Splits, shapes, chunking, codec, whether chunks carry checksums, "
        "stored order, classes, source checksum and size on disk of a store.",
    )
    i.add_argument(
        "store",
        metavar="STORE",
        nargs="?",
        default=None,
        help=f"the store (default: {STORE_DEFAULT_HELP}, or data/{STORE_NAME} of this checkout)",
    )
    i.set_defaults(func=_info)

    v = sub.add_parser(
        "verify",
        help="check every chunk of a store",
        description="Read back every chunk of a store and check its crc32c checksum "
        "(and that its file is there). Prints one line per damaged chunk "
        "and exits 1 if there is any; 0 otherwise. A store written "
        "without checksums (format 1) is only checked for chunks that "
        "cannot be decoded, and said to be unprotected.",
    )
    v.add_argument(
        "store",
        metavar="STORE",
        nargs="?",
        default=None,
        help=f"the store (default: {STORE_DEFAULT_HELP}, or data/{STORE_NAME} of this checkout)",
    )
    v.set_defaults(func=_verify)


class _Bars:
    """tqdm bars, one per stage, created when the stage first reports."""

    UNITS = {
        "download": ("download", "B"),
        "read": ("read source", "B"),
        "convert": ("convert", "img"),
    }

    def __init__(self, enabled: bool):
        self.enabled, self.bars = enabled, {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        bar = self.bars.get(stage)
        if bar is None:
            from tqdm import tqdm

            desc, unit = self.UNITS.get(stage, (stage, "it"))
            for other in self.bars.values():
                other.close()
            bar = self.bars[stage] = tqdm(
                total=total or None,
                desc=desc,
                unit=unit,
                unit_scale=unit == "B",
                unit_divisor=1024 if unit == "B" else 1000,
                file=sys.stderr,
                leave=True,
                dynamic_ncols=True,
            )
        if total and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _prepare(args) -> int:
    from pipeline.data.convert import prepare

    if args.workers is not None and args.workers < 1:
        raise DataError(f"--workers must be >= 1, got {args.workers}")
    bars = _Bars(
        not args.quiet and (sys.stderr.isatty() or os.environ.get("CONVPIPE_PROGRESS") == "1")
    )
    try:
        r = prepare(
            args.source,
            args.out,
            val=args.val,
            chunk=args.chunk,
            force=args.force,
            verify=not args.no_verify,
            scheduler=args.scheduler,
            workers=args.workers,
            processes=args.processes,
            data_root=args.data_root,
            progress=bars,
        )
    finally:
        bars.close()
    for path, why in r.kept:
        print(
            f"convpipe: note: kept {path}: {why}; remove it by hand once no conversion "
            "writes there",
            file=sys.stderr,
        )
    sizes = ", ".join(f"{k} {v}" for k, v in r.splits.items())
    if r.skipped:
        print(
            f"{r.path}: complete store already there ({sizes}); nothing to do (--force rebuilds it"
            + ("" if r.protected else ", with checksums: this one has none")
            + ")"
        )
    else:
        print(
            f"wrote {r.path}: {sizes} images, {len(r.class_names)} classes, "
            f"{_size(r.nbytes)} on disk, in {r.seconds:.1f} s"
        )
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _store_arg(store: str | None):
    from pipeline.data import find_store

    return find_store() if store is None else store


def _info(args) -> int:
    import zarr

    from pipeline.data import open_store
    from pipeline.data.convert import dir_size

    s = open_store(_store_arg(args.store))
    a = s.attrs
    print(f"store      {s.path}")
    print(
        f"format     {a.get('format')} v{a.get('format_version')}, Zarr v3, created "
        f"{a.get('created', '?')}"
    )
    for split, _n in s.splits.items():
        img = zarr.open_array(store=os.path.join(s.path, split, "images"), mode="r")
        lab = zarr.open_array(store=os.path.join(s.path, split, "labels"), mode="r")
        codecs = ", ".join(_codec_name(c) for c in img.compressors) or "none"
        print(
            f"{split:<10} images {img.dtype} {tuple(img.shape)} chunks {tuple(img.chunks)} "
            f"[{codecs}]; labels {lab.dtype} {tuple(lab.shape)}"
        )
    if s.protected:
        print(
            "integrity  protected: crc32c checksum on every chunk (`convpipe data verify` checks "
            "them all)"
        )
    else:
        print(
            f"integrity  UNPROTECTED: no checksums (format {a.get('format_version')}); a damaged "
            "chunk can read as wrong pixels; `convpipe data prepare --force` rebuilds it with "
            "checksums"
        )
    print(f"order      {_order(a)}")
    print(f"classes    {len(s.class_names)}: {', '.join(s.class_names)}")
    src = a.get("source", {})
    official = "official" if src.get("official") else "not the official CIFAR-10"
    verified = ", verified" if src.get("verified") else ""
    print(f"source     {src.get('kind')} {src.get('path')}")
    print(f"checksum   md5 {src.get('md5')} ({src.get('md5_of')}; {official}{verified})")
    print(f"mean image float32 (3, 32, 32), mean pixel {float(s.mean_image.mean()):.2f}")
    print(f"size       {_size(dir_size(s.path))} on disk")
    return 0


def _order(attrs: dict) -> str:
    order = attrs.get("order") or {}
    if "shuffle_seed" in attrs:
        return f"every split shuffled, seed {attrs['shuffle_seed']}; val: {order.get('val', '?')}"
    text = (
        "; ".join(f"{k}: {v}" for k, v in order.items()) if isinstance(order, dict) else str(order)
    )
    return f"not shuffled (format {attrs.get('format_version')}){': ' + text if text else ''}"


def _verify(args) -> int:
    from pipeline.data import verify_store

    r = verify_store(_store_arg(args.store))
    for d in r.damaged:
        print(f"{r.path}: damaged chunk: {d.describe()}")
    if r.damaged:
        print(
            f"convpipe: error: {r.path}: {len(r.damaged)} of {r.n_chunks} chunks damaged; "
            "rebuild the store with `convpipe data prepare --force`",
            file=sys.stderr,
        )
        return 1
    if r.protected:
        print(f"{r.path}: all {r.n_chunks} chunks intact (crc32c checksums match)")
    else:
        print(
            f"{r.path}: all {r.n_chunks} chunks decode, but the store is UNPROTECTED (format "
            f"{r.version}, no checksums): damage that still decodes cannot be found; "
            "`convpipe data prepare --force` rebuilds it with checksums"
        )
    return 0


def _codec_name(c) -> str:
    d = c.to_dict() if hasattr(c, "to_dict") else {"name": type(c).__name__}
    conf = d.get("configuration", {})
    if d.get("name") == "blosc":
        return f"blosc {conf.get('cname')} level {conf.get('clevel')} {conf.get('shuffle')}"
    return str(d.get("name"))
