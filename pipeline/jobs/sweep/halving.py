"""Successive halving, pure: the rungs a sweep's trials train to and which trials go on."""

from __future__ import annotations

from pipeline.jobs.sweep.space import EarlyStopping


def rungs(total_steps: int, stopping: EarlyStopping | None) -> list[int]:
    """Steps at which trials are scored: ``min_steps * factor**k`` below the end, then the end."""
    out = []
    if stopping is not None:
        r = stopping.min_steps
        while r < total_steps:
            out.append(r)
            r *= stopping.reduction_factor
    return out + [total_steps]


def promote(scores: dict[int, float | None], factor: int) -> list[int]:
    """Trial ids going on from a rung: the best ``max(1, n // factor)`` of the ``n`` scored ones
    (failed ones, None, never), higher score first, ties to the lower id. A pure function."""
    ranked = sorted((i for i, s in scores.items() if s is not None), key=lambda i: (-scores[i], i))
    keep = max(1, len(scores) // factor)
    return sorted(ranked[:keep])
