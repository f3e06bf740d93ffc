"""Data augmentation drawn from a counter-based generator: random translate and horizontal flip.

What happens to an image is a pure function of (seed, epoch, image index): a 64-bit hash
(splitmix64's finalizer, chained over the three numbers) gives its flip bit and its shift. So
the augmented batch has the same bits whichever worker reads which shard, on any number of
workers, either transport, after a worker dies and after ``--resume``.

    flip = "random"      each image is mirrored left-right with probability 1/2, drawn anew
                         every epoch
    flip = "alternate"   airbench's alternating flip: epoch 0 draws as "random"; every later
                         epoch mirrors exactly the images epoch 0 did not, then did, ...
                         (each image is seen both ways in any two consecutive epochs)
    translate = t        the image shifted by (dy, dx), each uniform in [-t, t]: a 32x32 crop
                         of the image reflect-padded by t pixels on every side
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FLIPS = ("none", "random", "alternate")

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64: x (uint64 array) -> well-mixed uint64 array."""
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def draws(seed: int, epoch: int, indices) -> np.ndarray:
    """One uint64 per image of ``indices``, a pure function of (seed, epoch, index)."""
    idx = np.asarray(indices, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        head = _mix(_mix(np.array([seed], dtype=np.uint64)) ^ np.uint64(epoch))
        return _mix(head ^ idx)


@dataclass(frozen=True)
class Augment:
    """The augmentation of a run's training images (no change when flip is "none" and
    translate 0)."""

    flip: str = "none"
    translate: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.flip not in FLIPS:
            raise ValueError(f"flip must be one of {', '.join(FLIPS)}, got {self.flip!r}")
        if not isinstance(self.translate, int) or not 0 <= self.translate <= 8:
            raise ValueError(
                f"translate must be a whole number of pixels in [0, 8], got {self.translate!r}"
            )

    @property
    def active(self) -> bool:
        return self.flip != "none" or self.translate > 0

    def choices(self, epoch: int, indices) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(flip (n,) bool, dy (n,), dx (n,)) of the images ``indices`` in ``epoch``."""
        h = draws(self.seed, epoch, indices)
        n = len(h)
        if self.flip == "random":
            flip = (h & np.uint64(1)).astype(bool)
        elif self.flip == "alternate":
            first = (draws(self.seed, 0, indices) & np.uint64(1)).astype(bool)
            flip = first ^ bool(epoch % 2)
        else:
            flip = np.zeros(n, dtype=bool)
        t = self.translate
        if t:
            span = np.uint64(2 * t + 1)
            dy = ((h >> np.uint64(8)) % span).astype(np.int64) - t
            dx = ((h >> np.uint64(32)) % span).astype(np.int64) - t
        else:
            dy = dx = np.zeros(n, dtype=np.int64)
        return flip, dy, dx

    def apply(self, X: np.ndarray, indices, epoch: int) -> np.ndarray:
        """The augmented images: X (n, C, H, W) of the training images ``indices`` in
        ``epoch``, a new array of X's dtype (X unchanged)."""
        if not self.active:
            return X
        flip, dy, dx = self.choices(epoch, indices)
        t = self.translate
        N, C, H, W = X.shape
        src = np.pad(X, ((0, 0), (0, 0), (t, t), (t, t)), mode="reflect") if t else X
        out = np.empty_like(X)
        for i in range(N):
            # the crop starting at (t + dy, t + dx): the image moved by (-dy, -dx)
            y0, x0 = t + dy[i], t + dx[i]
            crop = src[i, :, y0 : y0 + H, x0 : x0 + W]
            out[i] = crop[:, :, ::-1] if flip[i] else crop
        return out


#: test-time augmentation: the views whose scores are averaged (airbench's levels 0, 1 and 2)
TTAS = ("none", "flip", "flip-translate")


def tta_views(X: np.ndarray, mode: str) -> list[tuple[float, np.ndarray]]:
    """(weight, images) of each view of X (n, C, H, W) that ``mode`` scores; weights sum to 1.

    none: X. flip: X and X mirrored, 1/2 each. flip-translate: those two at 1/4 each, and the
    image moved by one pixel up-left and down-right (reflect-padded), each with its mirror, at
    1/8 each (airbench's ``infer_mirror_translate``).
    """
    if mode not in TTAS:
        raise ValueError(f"tta must be one of {', '.join(TTAS)}, got {mode!r}")
    if mode == "none":
        return [(1.0, X)]
    mirror = X[..., ::-1]
    if mode == "flip":
        return [(0.5, X), (0.5, mirror)]
    H, W = X.shape[2:]
    padded = np.pad(X, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    views = [(0.25, X), (0.25, mirror)]
    for crop in (padded[:, :, 0:H, 0:W], padded[:, :, 2 : H + 2, 2 : W + 2]):
        views += [(0.125, crop), (0.125, crop[..., ::-1])]
    return views


def tta_scores(score, X: np.ndarray, mode: str) -> np.ndarray:
    """The weighted mean of ``score(view)`` (n, classes) over :func:`tta_views`, in float64."""
    total = None
    for weight, view in tta_views(X, mode):
        s = weight * np.asarray(score(np.ascontiguousarray(view)), dtype=np.float64)
        total = s if total is None else total + s
    return total
