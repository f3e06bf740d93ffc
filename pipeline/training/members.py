"""Which workers a step is planned over, while workers join and leave a running job.

:class:`Membership` is the state machine, pure: it is told what the scheduler says (each
worker's address and status) and which warm-ups finished, and answers which workers to warm
up and which ones the next step's parts go to. The coordinator's side that asks the scheduler
and submits the warm-ups is :class:`pipeline.training.exchange.WorkerPool`.

    present, running   ->  warming  (a warm-up task loads its kernels and caches its images)
    warming, warmed    ->  ready    (parts are planned over the ready workers, in join order)
    ready or warming, no longer running (closing gracefully, paused, gone)  ->  dropped

A worker that goes is counted once: ``left`` when it was retired gracefully (the scheduler
marked it ``closing_gracefully``, or removed it as expected), ``died`` otherwise. Which worker
runs which part never changes the numbers (:mod:`pipeline.training.plan`), so none of this
touches the bits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

RUNNING = "running"
CLOSING = "closing_gracefully"


@dataclass
class Membership:
    ready: list[str] = field(default_factory=list)  # parts go to these, in the order they came
    warming: list[str] = field(default_factory=list)
    unusable: set[str] = field(default_factory=set)  # their warm-up failed: never planned
    joined: int = 0  # workers that came after the start and took parts
    left: int = 0  # retired gracefully
    died: int = 0  # gone without a retirement
    known: list[str] = field(default_factory=list)  # every worker of ours still in the cluster
    _closing: set[str] = field(default_factory=set)

    def start(self, workers: Mapping[str, str]) -> None:
        """The workers the run starts with (warmed up before its first step)."""
        self.ready = [a for a, status in workers.items() if status == RUNNING]
        self.warming = []
        self.known = list(workers)

    def observe(self, workers: Mapping[str, str]) -> tuple[list[str], list[str]]:
        """What the scheduler says now (address -> status); returns ``(new, gone)``: workers
        to warm up, and workers of ours that are gone from it (to be classified by
        :meth:`lost`). A worker not running (closing gracefully, paused) takes no new parts."""
        self._closing |= {a for a, status in workers.items() if status == CLOSING}
        usable = {a for a, s in workers.items() if s == RUNNING and a not in self.unusable}
        gone = [a for a in self.known if a not in workers]
        self.known = [a for a in self.known if a in workers]
        self.ready = [a for a in self.ready if a in usable]
        self.warming = [a for a in self.warming if a in workers]  # its warm-up goes on
        new = [a for a in workers if a in usable and a not in self.ready + self.warming]
        new = [a for a in new if a not in self.known]  # paused and back: it was warmed once
        self.ready += [
            a
            for a in workers
            if a in usable and a in self.known and a not in self.ready and a not in self.warming
        ]
        self.warming += new
        self.known += new
        return new, gone

    def warmed(self, address: str, ok: bool = True) -> bool:
        """A warm-up finished (``ok``: without an error); whether ``address`` is now ready."""
        if address not in self.warming:
            return False
        self.warming.remove(address)
        if not ok:
            self.unusable.add(address)
            return False
        self.ready.append(address)
        self.joined += 1
        return True

    def lost(self, address: str, expected: bool) -> str:
        """Count a worker gone from the scheduler: ``expected`` when the scheduler removed it
        as planned (a retirement). Returns how it went: ``left`` or ``died``."""
        if expected or address in self._closing:
            self.left += 1
            self._closing.discard(address)
            return "left"
        self.died += 1
        return "died"

    def counts(self) -> dict[str, int]:
        return {"joined": self.joined, "left": self.left, "died": self.died}
