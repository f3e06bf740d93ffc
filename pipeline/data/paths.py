"""Where data lives: the data root, the default store in it, and finding a prepared store.

The data root is ``$CONVPIPE_DATA`` when set (the same folder docker-compose mounts as the
cluster's shared data root), else ``data`` under the current directory, like torchvision's
``./data``. It holds the CIFAR-10 source (found or downloaded there) and the store,
``cifar10.zarr``. ``CONVPIPE_DATA`` names the folder, never the store itself.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.errors import DataError

__all__ = [
    "DATA_ENV",
    "DEFAULT_DATA_ROOT",
    "STORE_NAME",
    "DEFAULT_STORE",
    "data_root",
    "default_store",
    "store_candidates",
    "find_store",
    "OFFLINE_HINT",
]

DATA_ENV = "CONVPIPE_DATA"
DEFAULT_DATA_ROOT = "data"
STORE_NAME = "cifar10.zarr"
#: the store ``convpipe data prepare`` writes when neither --out nor $CONVPIPE_DATA is given
DEFAULT_STORE = os.path.join(DEFAULT_DATA_ROOT, STORE_NAME)
#: how to build a store without network access (appended to errors)
OFFLINE_HINT = (
    "offline, prepare it from a local copy with `convpipe data prepare --source PATH` "
    "(PATH: cifar-10-python.tar.gz, a cifar-10-batches-py/ folder or an image folder)"
)


def data_root() -> Path:
    """``$CONVPIPE_DATA`` if set and not empty,
    else ``data`` (relative to the current directory)."""
    env = os.environ.get(DATA_ENV, "").strip()
    return Path(env).expanduser() if env else Path(DEFAULT_DATA_ROOT)


def default_store() -> Path:
    """The store in the data root: ``$CONVPIPE_DATA/cifar10.zarr`` or ``data/cifar10.zarr``."""
    return data_root() / STORE_NAME


def _checkout_root() -> Path | None:
    """The source checkout this package runs from (the folder with pyproject.toml), if any."""
    top = Path(__file__).resolve().parents[2]
    return top if (top / "pyproject.toml").is_file() and (top / "pipeline").is_dir() else None


def store_candidates() -> list[Path]:
    """Where :func:`find_store` looks, in order: ``$CONVPIPE_DATA/cifar10.zarr`` alone when
    the variable is set; else ``./data/cifar10.zarr``, then ``data/cifar10.zarr`` of the
    checkout this package runs from (so that a notebook in a subfolder finds it)."""
    if os.environ.get(DATA_ENV, "").strip():
        return [default_store()]
    out = [Path(DEFAULT_STORE)]
    top = _checkout_root()
    if top is not None and (top / DEFAULT_STORE).resolve() != Path(DEFAULT_STORE).resolve():
        out.append(top / DEFAULT_STORE)
    return out


def find_store() -> Path:
    """The first of :func:`store_candidates` that exists (complete or not: opening it says
    what is wrong); :class:`DataError` saying where it looked and how to make one otherwise."""
    tried = store_candidates()
    for p in tried:
        if p.exists():
            return p
    where = ", ".join(str(p) for p in tried)
    env = os.environ.get(DATA_ENV, "").strip()
    root = f"${DATA_ENV}={env}" if env else f"${DATA_ENV} is not set"
    raise DataError(
        f"no CIFAR-10 store found (looked for {where}; {root}); make one with "
        f"`convpipe data prepare` (downloads CIFAR-10) or, {OFFLINE_HINT}; "
        f"or set {DATA_ENV} to the folder that holds {STORE_NAME}"
    )
