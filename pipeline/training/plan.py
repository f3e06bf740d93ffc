"""Who does what in one step: parts (workers' shard ranges), tree nodes, parameter slices.

The numbers of a step depend only on the fixed virtual shards, never on the workers. Summing the
k shard gradients follows one fixed pairwise tree over the shard index (see
:mod:`pipeline.training.reduce`): node ``(L, i)`` at level ``L`` covers shards
``[i * 2**L, min((i + 1) * 2**L, k))`` and is ``(L-1, 2i) + (L-1, 2i+1)``, or just
``(L-1, 2i)`` where the right child does not exist (an odd last node moves up unchanged).

A step is cut into ``W`` *parts*, one per worker. Part ``j`` computes a contiguous range of
shards and sums them into the largest tree nodes that lie inside its range (its *frontier*), so
it sends one or a few partial sums instead of one per shard. The parameter vector is cut into
``W`` *slices* (aligned to :data:`CHUNK` elements); part ``j`` also owns slice ``j``: it finishes
the tree for that slice from every part's frontier nodes (reduce-scatter), adds L2, applies Adam
(update) and the others fetch the new slice (all-gather). Whatever ``W`` is, every element's sum
is the same tree, so the bits are the same.

Everything here is pure: plans are small values passed with the tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: elements per block of the parameter vector: slices are whole blocks, and the L2 sum of
#: squares is formed per block (so its bits do not depend on how the vector is sliced)
CHUNK = 8192

Node = tuple[int, int]  # (level, index)


def levels(k: int) -> int:
    """Height of the tree over ``k`` leaves (the root is at this level)."""
    return max(0, (k - 1).bit_length())


def covers(node: Node, k: int) -> tuple[int, int]:
    """The shard range ``[a, b)`` of ``node``."""
    level, i = node
    return i << level, min((i + 1) << level, k)


def frontier(a: int, b: int, k: int) -> list[Node]:
    """The largest tree nodes that exactly tile shards ``[a, b)``, left to right."""
    nodes, pos, top = [], a, levels(k)
    while pos < b:
        level = 0
        while level < top and pos % (2 << level) == 0 and min(pos + (2 << level), k) <= b:
            level += 1
        nodes.append((level, pos >> level))
        pos = covers((level, pos >> level), k)[1]
    return nodes


def children(node: Node, k: int) -> list[Node]:
    """The one or two children of ``node`` (one where the right child does not exist)."""
    level, i = node
    left, right = (level - 1, 2 * i), (level - 1, 2 * i + 1)
    return [left, right] if covers(right, k)[0] < k else [left]


def program(nodes: list[Node], k: int) -> tuple[list[tuple[int, int, int]], int]:
    """How to finish the tree from ``nodes`` (a tiling of all k shards): a list of additions
    ``(dst, a, b)`` over registers, where registers ``0..len(nodes)-1`` hold the given nodes and
    each addition writes a new register; returns ``(ops, root register)``."""
    have = {node: r for r, node in enumerate(nodes)}
    ops: list[tuple[int, int, int]] = []

    def value(node: Node) -> int:
        if node in have:
            return have[node]
        kids = children(node, k)
        if node[0] == 0:
            raise ValueError(f"nodes do not tile the {k} shards: shard {node[1]} is missing")
        regs = [value(c) for c in kids]
        if len(regs) == 1:
            return regs[0]
        ops.append((len(nodes) + len(ops), regs[0], regs[1]))
        return ops[-1][0]

    return ops, value((levels(k), 0))


def split(
    n: int, parts: int, unit: int = 1, whole: tuple[tuple[int, int], ...] = ()
) -> list[tuple[int, int]]:
    """``[0, n)`` cut into ``parts`` contiguous ranges of whole ``unit``s, as equal as can be
    (empty ranges where there are more parts than units); no cut falls inside a range of
    ``whole`` (one moves on to the first multiple of ``unit`` that lies in none)."""
    units = -(-n // unit)
    bounds = [min(n, (units * j // parts) * unit) for j in range(parts + 1)]
    for j in range(1, parts):
        cut = max(bounds[j], bounds[j - 1])
        inside = [e for s, e in whole if s < cut < e]
        while inside:
            cut = min(n, -(-max(inside) // unit) * unit)
            inside = [e for s, e in whole if s < cut < e]
        bounds[j] = cut
    return list(zip(bounds[:-1], bounds[1:]))


def overlaps(slices, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """Where ``[lo, hi)`` lies in the ranges ``slices`` (a tiling of the vector): a list of
    ``(i, a, b)``, elements ``[a, b)`` of range i, left to right (re-slicing a state held in
    other slices, when the workers of a run changed)."""
    return [
        (i, max(lo, s) - s, min(hi, e) - s) for i, (s, e) in enumerate(slices) if s < hi and lo < e
    ]


@dataclass(frozen=True)
class StepPlan:
    """The plan of one step: ``k`` shards in ``width`` parts, the vector in ``width`` slices
    (a part may have no shards, when there are fewer shards than workers, or no slice, when
    ``whole`` ranges, the filters Muon updates, leave no cut near its share)."""

    k: int
    parts: tuple[tuple[int, int], ...]  # shard range of each part
    slices: tuple[tuple[int, int], ...]  # parameter range each part updates

    @classmethod
    def make(cls, k: int, workers: int, size: int, whole=()) -> StepPlan:
        w = max(1, workers)
        return cls(k, tuple(split(k, w)), tuple(split(size, w, CHUNK, tuple(whole))))

    @property
    def width(self) -> int:
        return len(self.parts)

    def frontier(self, part: int) -> list[Node]:
        return frontier(*self.parts[part], self.k)

    def nodes(self) -> list[Node]:
        """Every part's frontier, in shard order (a tiling of all k shards)."""
        return [node for j in range(self.width) for node in self.frontier(j)]

    def program(self) -> tuple[list[tuple[int, int, int]], int]:
        return program(self.nodes(), self.k)


@dataclass(frozen=True)
class Layout:
    """Names, shapes and offsets of the parameters inside the flat vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: str

    @classmethod
    def of(cls, params: dict[str, np.ndarray]) -> Layout:
        first = next(iter(params.values()))
        return cls(
            tuple(params),
            tuple(tuple(int(d) for d in p.shape) for p in params.values()),
            str(first.dtype),
        )

    @property
    def sizes(self) -> list[int]:
        return [int(np.prod(s, dtype=np.int64)) for s in self.shapes]

    @property
    def offsets(self) -> list[int]:
        return list(np.cumsum([0] + self.sizes)[:-1].astype(int))

    @property
    def size(self) -> int:
        return sum(self.sizes)

    def slices(self) -> dict[str, slice]:
        return {n: slice(o, o + s) for n, o, s in zip(self.names, self.offsets, self.sizes)}

    def views(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Views of ``flat`` shaped as the parameters (no copies)."""
        return {
            n: flat[sl].reshape(shape) for (n, sl), shape in zip(self.slices().items(), self.shapes)
        }

    def flatten(self, params: dict[str, np.ndarray], out: np.ndarray | None = None) -> np.ndarray:
        out = np.empty(self.size, dtype=self.dtype) if out is None else out
        for n, sl in self.slices().items():
            out[sl] = np.asarray(params[n]).reshape(-1)
        return out

    def to_dict(self) -> dict:
        return {
            "names": list(self.names),
            "shapes": [list(s) for s in self.shapes],
            "dtype": self.dtype,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Layout:
        return cls(tuple(d["names"]), tuple(tuple(s) for s in d["shapes"]), d["dtype"])
