"""A small sample of real CIFAR-10 training images for model tests.

Read from ../shared/data/cifar10-jpeg.tar.gz beside the checkout (CI has it). Without it,
``cifar_sample(..., real=True)`` skips the test, saying why; ``real=False`` falls back to a
synthetic stand-in of the same shapes whose classes are learnable, and says so with a
:class:`SyntheticSampleWarning` (listed in pytest's warnings summary) each time.
"""

from __future__ import annotations

import functools
import io
import tarfile
import warnings
from pathlib import Path

import numpy as np

SHARED_JPEG = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


class SyntheticSampleWarning(UserWarning):
    """The real CIFAR-10 sample is missing: a synthetic stand-in was used."""


def cifar_sample(
    num_train: int = 100, num_val: int = 100, *, real: bool = False
) -> dict[str, np.ndarray]:
    """X_train (num_train, 3, 32, 32) float32 mean-subtracted, y_train int64, X_val, y_val.

    ``real=True``: real images or a skipped test, never the synthetic stand-in.
    """
    if not SHARED_JPEG.is_file():
        if real:
            import pytest

            pytest.skip(f"needs real CIFAR-10 images: {SHARED_JPEG} is missing (CI has it)")
        warnings.warn(
            SyntheticSampleWarning(
                f"{SHARED_JPEG} is missing: synthetic stand-in images, not CIFAR-10"
            ),
            stacklevel=2,
        )
    return _sample(num_train, num_val, SHARED_JPEG if SHARED_JPEG.is_file() else None)


@functools.cache
def _sample(num_train: int, num_val: int, jpeg: Path | None) -> dict[str, np.ndarray]:
    total = num_train + num_val
    X, y = _read_jpegs(jpeg, total) if jpeg is not None else _synthetic(total)
    rng = np.random.default_rng(0)
    order = rng.permutation(total)
    X, y = X[order], y[order]
    X = X.astype(np.float32)
    X -= X[:num_train].mean(axis=0)
    return {
        "X_train": X[:num_train],
        "y_train": y[:num_train],
        "X_val": X[num_train:],
        "y_val": y[num_train:],
    }


def _read_jpegs(path: Path, total: int):
    from PIL import Image

    per_class = -(-total // 10)
    images, labels, seen = [], [], {}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[-3] != "train":
                continue
            cls = parts[-2]
            if seen.get(cls, 0) >= per_class:
                if len(seen) == 10 and all(n >= per_class for n in seen.values()):
                    break
                continue
            seen[cls] = seen.get(cls, 0) + 1
            img = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
            images.append(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))
            labels.append(cls)
    classes = sorted(set(labels))
    y = np.array([classes.index(c) for c in labels], dtype=np.int64)
    return np.stack(images)[:total], y[:total]


def _synthetic(total: int):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 10, size=total)
    prototypes = rng.integers(0, 256, size=(10, 3, 32, 32))
    noise = rng.integers(-60, 60, size=(total, 3, 32, 32))
    return np.clip(prototypes[y] + noise, 0, 255).astype(np.uint8), y.astype(np.int64)
