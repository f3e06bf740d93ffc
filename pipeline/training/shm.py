"""The shared-memory transport, both sides: every worker runs on the coordinator's host.

Parameters and Adam moments (twice: step ``s`` reads copy ``s % 2`` and writes the other, so a
task run again after its worker died finds its inputs intact), one gradient slot per shard, and
a self-validating record per shard and per slice live in two files in ``/dev/shm``. Workers map
them, write their tree nodes into their slots, update their slice, and learn from the records
when the others are done. Nothing of size P crosses a socket, and the coordinator touches none
of it.

Here: the files and their records (``SharedState`` on the coordinator, ``Attached`` on a
worker), the worker's task (``shm_part``) and the coordinator's :class:`SharedMemoryExchange`.
"""

from __future__ import annotations

import math
import mmap
import os
import platform
import secrets
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from distributed import rejoin, secede, wait

from pipeline.errors import TrainingError
from pipeline.procs import Owner
from pipeline.training.exchange import Exchange, gather, raise_failed, stalled
from pipeline.training.plan import CHUNK, Layout, StepPlan, covers
from pipeline.training.reduce import tree_update
from pipeline.training.shards import Schedule
from pipeline.training.worker import (
    TaskSpec,
    compute_nodes,
    muon_args,
    read_shards,
    step_scalars,
    task_setup,
    worker_name,
)

#: slice records per parity: the most parts a step is cut into (workers may join mid-run)
MAX_PARTS = 64
HEADER = 64  # bytes before the state: magic token (32), the abort flag, the gate (int64 each)
NEVER = -9  # the step of a record not yet written
_PREFIX = "convpipe-"


# ---- shared memory -------------------------------------------------------------------------------

#: where stores become visible to other processes in program order (the records rely on it)
TSO_MACHINES = ("x86_64", "amd64", "i386", "i686")


def ordered_stores() -> bool:
    """Whether this processor shows stores to other processes in program order (x86-TSO)."""
    return platform.machine().lower() in TSO_MACHINES


# A shard record (float64): [step, n, loss_sum, read_s, compute_s, begin, end, worker, has_bn,
# pad.., bn_mean (C), bn_var (C), step]. A slice record: [step, sumsq of each of its blocks..,
# step]. Seqlock: the writer puts the step first, then the fields, the step last; a reader
# accepts a record whose first and last entries both equal the step it expects, and checks again
# after it has used the data the record vouches for (the gradient slots).
SHARD_FIELDS = ("n", "loss_sum", "read_s", "compute_s", "begin", "end", "worker", "has_bn")
SHARD_HEAD = 1 + 15  # step + fields (room to grow), then the BN moments
# A part record: [step, its timings (PART_FIELDS), step], written when the part is done.
PART_FIELDS = ("read_s", "wait_s", "compute_s", "reduce_s", "sync_s", "seconds", "worker")
PART_LEN = 1 + len(PART_FIELDS) + 1
#: the gate: generation * GATE_STEPS + the last step the coordinator lets a step loop start
GATE_STEPS = 1 << 40
#: how long closing waits for step loops to end (after their step) before it cancels them
LOOP_END_S = 5.0


@dataclass(frozen=True)
class ShmRef:
    """What a worker needs to map the run's shared files (picklable)."""

    state_path: str
    grads_path: str
    token: str
    layout: Layout
    slots: int  # gradient slots: shards per step
    max_slices: int  # slice records per parity
    blocks: int  # CHUNK blocks of the parameter vector
    owner: Owner
    channels: int = 0  # spatial-BN channels of the model: the moments a shard record holds

    @property
    def shard_len(self) -> int:
        return SHARD_HEAD + 2 * self.channels + 1

    @property
    def slice_len(self) -> int:
        return 1 + self.blocks + 1

    @property
    def state_bytes(self) -> int:
        return HEADER + 2 * 3 * self.layout.size * np.dtype(self.layout.dtype).itemsize

    @property
    def grads_bytes(self) -> int:
        return -(-self.slots * self.layout.size * np.dtype(self.layout.dtype).itemsize // 8) * 8

    @property
    def records_len(self) -> int:
        return 2 * (self.slots * self.shard_len + self.max_slices * (self.slice_len + PART_LEN))

    @property
    def file_bytes(self) -> int:
        return self.grads_bytes + 8 * self.records_len


def shm_root() -> Path:
    root = Path("/dev/shm")
    return root if root.is_dir() and os.access(root, os.W_OK) else Path(tempfile.gettempdir())


class Mapped:
    """Views of the two shared files: ``state[parity]`` = (w, m, v) flat vectors, ``slots``
    (k, P) gradient slots, ``shards[parity]`` (k, shard_len), ``slices[parity]``
    (max_slices, slice_len) and ``parts[parity]`` (max_slices, PART_LEN) records, ``abort``
    (the coordinator stopped), ``gate`` (how far step loops may go, :func:`gate_value`)."""

    def __init__(self, ref: ShmRef, smap, gmap):
        n, dt = ref.layout.size, ref.layout.dtype
        self.ref, self._maps = ref, (smap, gmap)
        self.abort = np.frombuffer(smap, dtype=np.int64, count=1, offset=32)
        self.gate = np.frombuffer(smap, dtype=np.int64, count=1, offset=40)
        vectors = np.frombuffer(smap, dtype=dt, count=6 * n, offset=HEADER).reshape(2, 3, n)
        self.state = [tuple(vectors[p]) for p in range(2)]
        self.slots = np.frombuffer(gmap, dtype=dt, count=ref.slots * n).reshape(ref.slots, n)
        records = np.frombuffer(
            gmap, dtype=np.float64, count=ref.records_len, offset=ref.grads_bytes
        )
        half = ref.records_len // 2
        cut = ref.slots * ref.shard_len
        cut2 = cut + ref.max_slices * ref.slice_len
        self.shards = [
            records[p * half : p * half + cut].reshape(ref.slots, ref.shard_len) for p in range(2)
        ]
        self.slices = [
            records[p * half + cut : p * half + cut2].reshape(ref.max_slices, ref.slice_len)
            for p in range(2)
        ]
        self.parts = [
            records[p * half + cut2 : (p + 1) * half].reshape(ref.max_slices, PART_LEN)
            for p in range(2)
        ]

    def release(self) -> None:
        self.state = self.slots = self.shards = self.slices = self.parts = None
        self.abort = self.gate = None
        for m in self._maps:
            try:
                m.close()
            except BufferError:  # a view handed out is still alive; freed with it
                pass
        self._maps = ()


class SharedState(Mapped):
    """The coordinator's side: creates, owns and finally removes the two shared files."""

    def __init__(self, layout: Layout, slots: int, max_slices: int, blocks: int, channels: int = 0):
        if not ordered_stores():
            raise TrainingError(
                f"transport shm: this {platform.machine()} processor does not keep stores in "
                "order; use --transport tcp (or auto)"
            )
        remove_stale()
        owner = Owner.me()
        token = secrets.token_hex(16)
        root = shm_root()
        base = root / f"{_PREFIX}{owner.pid}-{owner.namespace}-{token[:12]}"
        ref = ShmRef(
            f"{base}-state",
            f"{base}-grads",
            token,
            layout,
            slots,
            max_slices,
            blocks,
            owner,
            channels,
        )
        self.paths = (ref.state_path, ref.grads_path)
        made = []
        try:
            for path, size in ((ref.state_path, ref.state_bytes), (ref.grads_path, ref.file_bytes)):
                made.append(_create(path, size))
        except OSError as exc:
            self._unlink()
            raise TrainingError(
                f"cannot create shared memory in {root} ({ref.state_bytes + ref.file_bytes} "
                f"bytes): {exc.strerror or exc}"
            ) from None
        made[0][:32] = token.encode()
        super().__init__(ref, *made)
        for p in range(2):
            self.shards[p][:] = NEVER
            self.slices[p][:] = NEVER
            self.parts[p][:] = NEVER

    def start(self, step: int, params: np.ndarray, m: np.ndarray, v: np.ndarray) -> None:
        """The state the run continues from: that of ``step`` (one slice, done at ``step - 1``)."""
        for dst, src in zip(self.state[step % 2], (params, m, v)):
            dst[:] = src
        record = self.slices[(step - 1) % 2][0]
        record[0] = record[-1] = step - 1

    def close(self) -> None:
        if self.abort is not None:
            self.abort[0] = 1  # tasks still waiting give up
        self.release()
        self._unlink()

    def _unlink(self) -> None:
        for p in self.paths:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


def _create(path: str, size: int) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def remove_stale() -> None:
    """Remove shared files left by killed coordinators (only of this host's pid namespace)."""
    me = Owner.me()
    for p in shm_root().glob(f"{_PREFIX}*-*-*"):
        fields = p.name[len(_PREFIX) :].split("-")
        if len(fields) < 3 or not fields[0].isdigit() or not fields[1].isdigit():
            continue
        if not Owner(me.host, int(fields[1]), int(fields[0])).alive():
            try:
                p.unlink()
            except OSError:
                pass


class Attached(Mapped):
    """A worker's view of the shared files."""

    def __init__(self, ref: ShmRef):
        with open(ref.state_path, "r+b") as f:
            smap = mmap.mmap(f.fileno(), ref.state_bytes)
        if smap[:32] != ref.token.encode():
            raise TrainingError(f"shared state {ref.state_path} belongs to another run")
        with open(ref.grads_path, "r+b") as f:
            gmap = mmap.mmap(f.fileno(), ref.file_bytes)
        super().__init__(ref, smap, gmap)

    def wait(self, ready: Callable[[], bool], what: str, timeout: float) -> float:
        """Wait until ``ready()``; returns the seconds waited. Short pauses first; past a few
        milliseconds the task leaves its worker's thread pool, so that a waiting task never
        holds a thread another task needs. Raises when the run stopped or ``timeout`` passed."""
        if ready():
            return 0.0
        t0 = time.monotonic()
        pause, seceded = 2e-5, False
        try:
            while not ready():
                if self.abort is None or self.abort[0]:  # unmapped, or the coordinator stopped
                    raise TrainingError(f"the run stopped while a task waited for {what}")
                waited = time.monotonic() - t0
                if waited > 5e-3 and not seceded:
                    seceded = _secede()
                if waited > timeout or (pause >= 1e-3 and not self.ref.owner.alive()):
                    raise TrainingError(
                        f"waited {waited:.0f} s for {what}: the coordinator or a worker stopped"
                    )
                time.sleep(pause)
                pause = min(
                    pause * 1.5, 1e-3
                )  # a waiting task must not take the CPU its worker computes on
        finally:
            if seceded:
                rejoin()
        return time.monotonic() - t0


def _secede() -> bool:
    try:
        secede()
        return True
    except ValueError:  # not in a Dask worker's task
        return False


def record_is(record: np.ndarray, step: int) -> bool:
    """Whether ``record`` holds a complete write for ``step`` (first and last entries agree)."""
    return record[-1] == step and record[0] == step


def write_record(record: np.ndarray, step: int, fields: np.ndarray) -> None:
    """Seqlock write: the step first, the fields, the step last."""
    record[0] = step
    record[1 : 1 + len(fields)] = fields
    record[-1] = step


_ATTACHED: dict[str, Attached] = {}


def attach(ref: ShmRef) -> Attached:
    """Map the run's shared files in this process (once per run; several runs may be mapped at
    once: two jobs on one cluster). Runs whose files are gone are unmapped on the way."""
    got = _ATTACHED.get(ref.token)
    if got is None:
        for token, shm in list(_ATTACHED.items()):
            if not os.path.exists(shm.ref.state_path):  # that run ended or its coordinator died
                release(token)
        try:
            got = _ATTACHED[ref.token] = Attached(ref)
        except FileNotFoundError:
            raise TrainingError(
                f"worker on {os.uname().nodename} cannot see the coordinator's shared memory "
                f"{ref.state_path}: use --transport tcp for clusters that span hosts"
            ) from None
    return got


def release(token: str) -> None:
    """Unmap the shared files of the run ``token`` from this process (the run ended)."""
    shm = _ATTACHED.pop(token, None)
    if shm is not None:
        shm.release()


def can_attach(ref: ShmRef) -> bool:
    """Run on a worker: whether it shares the coordinator's host (and /dev/shm)."""
    try:
        attach(ref)
        return True
    except (OSError, TrainingError, ValueError):
        return False


@dataclass(frozen=True)
class ShmParams:
    """The parameters of a step in shared memory: state copy ``parity`` of the run ``ref``
    (``part`` 2: the weights' moving average, SGD with ema)."""

    ref: ShmRef
    parity: int
    part: int = 0

    def vector(self) -> np.ndarray:
        """The flat parameter vector, mapped from shared memory (what a task computes with)."""
        return attach(self.ref).state[self.parity][self.part]


def _pack(st: dict, channels: int) -> np.ndarray:
    fields = np.zeros(SHARD_HEAD - 1 + 2 * channels)
    for i, name in enumerate(SHARD_FIELDS):
        if name == "worker":
            fields[i] = zlib.crc32(worker_name().encode())
        elif name == "has_bn":
            fields[i] = st["bn_mean"] is not None
        else:
            fields[i] = st[name]
    if st["bn_mean"] is not None:
        fields[SHARD_HEAD - 1 : SHARD_HEAD - 1 + channels] = st["bn_mean"]
        fields[SHARD_HEAD - 1 + channels :] = st["bn_var"]
    return fields


def _unpack(record: np.ndarray, slot: int, channels: int, dtype) -> dict:
    r = {name: float(record[1 + i]) for i, name in enumerate(SHARD_FIELDS)}
    r["n"], r["slot"], r["worker"] = int(r["n"]), slot, int(r["worker"])
    has_bn = r.pop("has_bn")
    r["bn_mean"] = record[SHARD_HEAD : SHARD_HEAD + channels].astype(dtype) if has_bn else None
    r["bn_var"] = (
        record[SHARD_HEAD + channels : SHARD_HEAD + 2 * channels].astype(dtype) if has_bn else None
    )
    return r


def shm_part(spec: TaskSpec, ref: ShmRef, step: int, plan: StepPlan, part: int, *args) -> dict:
    """A part of a step over shared memory, as a task of its own: ``run_part(spec, attach(ref),
    step, plan, part, shards, batch, adam_t, prev_width)`` (:func:`run_part`), then its result
    as its records hold it."""
    task_setup(spec.threads)
    shm = attach(ref)
    run_part(spec, shm, step, plan, part, *args)
    result = part_result(shm, step, plan, part)
    if result is None:
        raise TrainingError(
            f"the records of part {part} of step {step + 1} changed while they were read"
        )
    return result


def shm_steps(
    spec: TaskSpec,
    ref: ShmRef,
    gen: int,
    first: int,
    width: int,
    part: int,
    schedule: Schedule,
    adam_offset: int,
    prev_width: int,
) -> int:
    """Part ``part`` of steps ``first``, ``first + 1``, ... in one task (a step loop): each step
    starts once the coordinator's gate lets it (:func:`gate_value`), until the gate names another
    generation (the coordinator planned another width, or the run ended). Each step is computed
    as :func:`shm_part` computes it, its shards from ``schedule`` and its Adam step
    ``step + adam_offset``; the coordinator reads the results from the records. A second run of
    the task (its worker died) starts where the run is: the step before the gate's, which shows
    in its records what the first run had done. Returns the steps it ran."""
    task_setup(spec.threads)
    shm = attach(ref)
    gate = int(shm.gate[0])
    if gate // GATE_STEPS != gen:
        return 0
    step, ran = max(first, gate % GATE_STEPS - 1), 0
    while True:
        shm.wait(  # for as long as the coordinator lives: its scoring or checkpoint may take long
            lambda s=step: _gate_moved(shm, gen, s),
            f"the coordinator to start step {step + 1}",
            math.inf,
        )
        if int(shm.gate[0]) // GATE_STEPS != gen:
            return ran
        shards = schedule.shards(step)
        plan = spec.plan(len(shards), width)
        batch = sum(len(x) for x in shards)
        mine = shards[plan.parts[part][0] : plan.parts[part][1]]
        if step > first:  # the step before ran in this loop (a second run starts later)
            prev_width = width
        run_part(spec, shm, step, plan, part, mine, batch, step + adam_offset, prev_width)
        step, ran = step + 1, ran + 1


def _gate_moved(shm: Mapped, gen: int, step: int) -> bool:
    """Whether the gate lets generation ``gen`` start ``step``, or names another generation."""
    gate = int(shm.gate[0])
    return gate // GATE_STEPS != gen or gate % GATE_STEPS >= step


def gate_value(gen: int, step: int) -> int:
    """The gate letting step loops of generation ``gen`` start steps up to ``step``."""
    return gen * GATE_STEPS + step


def run_part(
    spec: TaskSpec,
    shm: Mapped,
    step: int,
    plan: StepPlan,
    part: int,
    shards: list[np.ndarray],
    batch: int,
    adam_t: int,
    prev_width: int,
) -> None:
    """Part ``part`` of ``step``: compute its shards into its tree nodes (in their gradient
    slots), wait for every part's nodes, then reduce, L2 and Adam on its slice (state copy
    ``step % 2`` in, the other out), and write its part record. A second run of the same part
    (its worker died) skips what the first run's records show done, and leaves the same
    numbers."""
    par, t0 = step % 2, time.perf_counter()
    ref = shm.ref
    (a, b), (lo, hi) = plan.parts[part], plan.slices[part]
    records = shm.shards[par]
    timing = {"read_s": 0.0, "wait_s": 0.0, "compute_s": 0.0, "reduce_s": 0.0, "sync_s": 0.0}
    if not all(record_is(records[i], step) for i in range(a, b)):
        data = read_shards(spec, shards, step)
        timing["read_s"] = sum(d[2] for d in data)
        timing["wait_s"] = shm.wait(
            lambda: all(record_is(shm.slices[1 - par][j], step - 1) for j in range(prev_width)),
            f"the parameters of step {step + 1}",
            spec.timeout,
        )
        if any(record_is(shm.slices[par][j], step) for j in range(plan.width)):
            raise TrainingError(f"part {part} of step {step + 1} ran after its step was reduced")
        tc = time.perf_counter()
        _, stats = compute_nodes(
            spec,
            spec.layout.views(shm.state[par][0]),
            step,
            plan,
            part,
            data,
            alloc=lambda node: shm.slots[covers(node, plan.k)[0]],
            free=lambda tmp: None,
        )
        for i, st in zip(range(a, b), stats):
            write_record(records[i], step, _pack(st, ref.channels))
        timing["compute_s"] = time.perf_counter() - tc
    # reduce-scatter: this part's slice from every part's nodes, once all are written
    timing["sync_s"] = shm.wait(
        lambda: all(record_is(records[i], step) for i in range(plan.k)),
        f"the other workers' gradients of step {step + 1}",
        spec.timeout,
    )
    tr = time.perf_counter()
    if lo < hi and not record_is(shm.slices[par][part], step):
        shm.slices[par][part][0] = step  # begun: the state copy 1 - par is being written
        nodes = plan.nodes()
        ops, root = plan.program()
        partial = tree_update(
            shm.slots,
            [covers(n, plan.k)[0] for n in nodes],
            ops,
            root,
            0,
            shm.state[par],
            shm.state[1 - par],
            0,
            lo,
            hi,
            spec.segments_at(step),
            CHUNK,
            batch,
            step_scalars(spec, adam_t),
            muon_args(spec, adam_t),
        )
        if not all(record_is(records[i], step) for i in range(plan.k)):
            raise TrainingError(
                f"a shard record of step {step + 1} changed while part {part} reduced it"
            )
        write_record(shm.slices[par][part], step, partial)
    elif lo >= hi:
        write_record(shm.slices[par][part], step, np.zeros(0))
    timing["reduce_s"] = time.perf_counter() - tr
    timing["seconds"] = time.perf_counter() - t0
    if not record_is(shm.parts[par][part], step):  # (a second run keeps the first's)
        timing["worker"] = zlib.crc32(worker_name().encode())
        write_record(shm.parts[par][part], step, np.array([timing[k] for k in PART_FIELDS]))


def part_result(shm: Mapped, step: int, plan: StepPlan, part: int) -> dict | None:
    """Part ``part`` of ``step`` as its records hold it (shard stats, its slice's L2 sums, its
    timings), or None if they do not all hold ``step`` (not done, or overwritten)."""
    par, (a, b), (lo, hi) = step % 2, plan.parts[part], plan.slices[part]
    records, ref = shm.shards[par], shm.ref
    blocks = -(-(hi - lo) // CHUNK)
    result = {
        "part": part,
        "shards": [_unpack(records[i], i, ref.channels, ref.layout.dtype) for i in range(a, b)],
        "partials": shm.slices[par][part][1 : 1 + blocks].copy(),
        **{k: float(v) for k, v in zip(PART_FIELDS, shm.parts[par][part][1:-1])},
    }
    result["worker"] = int(result["worker"])
    if not (
        record_is(shm.slices[par][part], step)
        and record_is(shm.parts[par][part], step)
        and all(record_is(records[i], step) for i in range(a, b))
    ):
        return None
    return result


@dataclass(eq=False)
class StepLoop:
    """The step loops of one generation: their tasks, their width, the step the gate lets in
    next."""

    gen: int
    width: int
    futures: list
    next: int
    plan: StepPlan | None = None  # the plan of the last step let in (next - 1)

    def ended(self) -> bool:
        return any(f.done() for f in self.futures)


class SharedMemoryExchange(Exchange):
    kind = "shm"

    def __init__(
        self, client, spec: TaskSpec, layout: Layout, slots: int, width: int | None, timeout: float
    ):
        super().__init__(client, spec, layout, width, timeout)
        blocks = -(-layout.size // CHUNK)
        self.max_width = max(width or 0, MAX_PARTS)
        self.shared = SharedState(layout, slots, self.max_width, blocks, spec.model.bn_channels)
        self.ref: ShmRef = self.shared.ref
        self.pool.params = ShmParams(self.ref, 0)  # a joiner's warm-up maps the files
        self.prev_width = 1
        self.schedule: Schedule | None = None  # set by follow(): parts then run as step loops
        self.adam_offset = 0
        self.loop: StepLoop | None = None  # the step loops of the current generation
        self.gen = 0  # the gate's generation
        self.ending: list = []  # futures of loops of past generations (finishing a step)
        self.names: dict[int, str] = {}  # a worker's CRC in the records -> its address

    def usable(self) -> bool:
        """Whether every worker now connected can map the shared files (same host)."""
        try:
            seen = self.client.run(can_attach, self.ref)
        except Exception:  # noqa: BLE001 - a worker that cannot even run the probe
            return False
        return bool(seen) and all(seen.values())

    def start(self, step: int, params, m, v) -> None:
        self._end_loop()
        self._refresh()
        self.shared.start(step, params, m, v)
        self.prev_width = 1

    def follow(self, schedule: Schedule, adam_offset: int) -> None:
        """Run the parts of the steps to come as step loops (:func:`shm_steps`): one task per
        part for as long as the plan's width stays, each step let in by the gate, its results
        read from the records. Step ``s``'s shards are ``schedule.shards(s)``, its Adam step
        ``s + adam_offset``. Per step the coordinator then sends no task and receives no
        result: that cost it 15-20 ms of CPU a step (the scheduler's share included), taken
        from the workers' cores."""
        self.schedule, self.adam_offset = schedule, adam_offset

    def submit(self, step: int, plan: StepPlan, shards: list[np.ndarray], batch: int, adam_t: int):
        if self.schedule is not None:
            if adam_t != step + self.adam_offset or batch != len(self.schedule.batch(step)):
                raise TrainingError(f"step {step + 1} is not the step its step loop would run")
            return self._let_in(step, plan)
        futures = [
            self.client.submit(
                shm_part,
                self.spec,
                self.ref,
                step,
                plan,
                j,
                shards[plan.parts[j][0] : plan.parts[j][1]],
                batch,
                adam_t,
                self.prev_width,
                key=f"part-{step}-{j}-{self.tag}",
                pure=False,
                **self._where(j),
            )
            for j in range(plan.width)
        ]
        self.prev_width = plan.width
        self._count(sent=(shards, plan))
        return step, futures

    def _let_in(self, step: int, plan: StepPlan):
        """Open the gate to ``step``, in the running step loops if they run its width and step
        ``step`` is their next, else in new ones (the old ones end after their step)."""
        loop = self.loop
        if loop is not None:
            raise_failed(self.client, loop.futures, f"step {step + 1}")
        if loop is None or loop.width != plan.width or loop.next != step or loop.ended():
            if loop is not None and loop.plan is not None:  # its last step done first: a loop
                # ends at the gate, and one still to start the step let in would skip it
                self._read_step(loop.next - 1, loop.plan, loop, self.timeout)
            self._end_loop()
            self._start_loop(step, plan.width)
        else:
            self.shared.gate[0] = gate_value(loop.gen, step)
        self.loop.next, self.loop.plan = step + 1, plan
        self.prev_width = plan.width
        return step, plan, self.loop

    def _start_loop(self, step: int, width: int) -> None:
        self.gen += 1
        self.shared.gate[0] = gate_value(self.gen, step)
        args = (self.schedule, self.adam_offset, self.prev_width)
        futures = [
            self.client.submit(
                shm_steps,
                self.spec,
                self.ref,
                self.gen,
                step,
                width,
                j,
                *args,
                key=f"steps-{step}-{j}-{self.tag}-{self.gen}",
                pure=False,
                **self._where(j),
            )
            for j in range(width)
        ]
        self._count(sent=args)
        self.loop = StepLoop(self.gen, width, futures, step)

    def _end_loop(self) -> None:
        """Close the gate on the current step loops: each ends after the step it computes."""
        self.ending = [f for f in self.ending if not f.done()]
        if self.loop is not None:
            self.ending += self.loop.futures
            self.loop = None
        self.gen += 1
        if self.shared.gate is not None:
            self.shared.gate[0] = gate_value(self.gen, 0)

    def collect(self, pending, timeout: float | None = None) -> list[dict]:
        if len(pending) == 3:
            return self._read_step(*pending, timeout or self.timeout)
        step, futures = pending
        results = gather(
            self.client, futures, f"step {step + 1}", timeout or self.timeout, self.on_wait
        )
        for f in futures:
            f.release()
        self._count(received=results)
        return self._named(results)

    def _named(self, results: list[dict]) -> list[dict]:
        """The results with each part's worker named by its address (records hold a CRC)."""
        for address in self.addresses:
            self.names.setdefault(zlib.crc32(address.encode()), address)
        for r in results:
            r["worker"] = self.names.get(r["worker"], r["worker"])
        return results

    def _read_step(self, step: int, plan: StepPlan, loop: StepLoop, timeout: float) -> list:
        """The results of ``step``, run by step loops, from its records once all are written:
        polled (the step takes tens of milliseconds; the next one is let in already), the
        loops' tasks checked as ``gather`` checks its futures."""
        what = f"step {step + 1}"
        par, last, progress, pause = step % 2, time.monotonic(), -1, 1e-4
        asked = told = last
        shared = self.shared
        shards, slices, parts = shared.shards[par], shared.slices[par], shared.parts[par]
        while True:
            done = sum(bool(record_is(shards[i], step)) for i in range(plan.k)) + sum(
                bool(record_is(slices[j], step)) + bool(record_is(parts[j], step))
                for j in range(plan.width)
            )
            if done == plan.k + 2 * plan.width:
                results = [part_result(self.shared, step, plan, j) for j in range(plan.width)]
                if all(r is not None for r in results):
                    return self._named(results)
            now = time.monotonic()
            if done != progress:
                last, progress = now, done
            if self.on_wait is not None and now - told >= 1.0:  # a job's stop request, say
                told = now
                self.on_wait()
            if now - asked >= 0.05:  # the loops' tasks: the step's, and any started since
                asked = now
                newer = self.loop is not None and self.loop is not loop
                watched = loop.futures + (self.loop.futures if newer else [])
                raise_failed(self.client, watched, what)
                if loop is self.loop and loop.ended():  # (only a new generation ends a loop)
                    raise TrainingError(f"{what}: its step loops ended before it")
            if now - last > timeout:
                raise stalled(self.client, loop.futures, what, timeout)
            time.sleep(pause)
            pause = min(pause * 1.5, 2e-3)

    def state(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Copies of the state of ``step`` (all its slices done). Step ``step + 1``'s update
        overwrites that copy: refused if it has begun, before or while the copy is read."""
        records = self.shared.slices[(step + 1) % 2]
        begun = lambda: (records[:, 0] == step + 1).any()  # noqa: E731
        if not begun():
            got = tuple(x.copy() for x in self.shared.state[step % 2])
            if not begun():
                return got
        raise TrainingError(
            f"the state of step {step} was overwritten by step {step + 1} while it was read"
        )

    def params_ref(self, step: int, average: bool = False):
        return ShmParams(self.ref, step % 2, 2 if average else 0)

    def close(self) -> None:
        try:
            self._end_loop()
            if not any(f.status == "error" for f in self.ending):  # (else the others wait
                # for its gradients: the abort flag below ends them)
                try:  # each ends after the step it computes, if any (well under a second)
                    wait(self.ending, timeout=LOOP_END_S)
                except Exception:  # noqa: BLE001 - a closed client, a lost scheduler
                    pass
            for f in self.ending:
                f.cancel()
            self.ending = []
        finally:
            self.close_pool()
            self.shared.close()
            try:
                self.client.run(release, self.ref.token)
            except Exception:  # noqa: BLE001 - workers that left hold nothing of ours any more
                pass
