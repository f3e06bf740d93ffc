"""How parameters reach the workers and gradient sums come back.

All parameters live in one flat vector (``Layout`` maps names to slices), so Adam, the
gradient tree and every transfer work on a single contiguous array.

Two transports, chosen once per run (the work is the same, see :mod:`pipeline.training.plan`):

* ``shm`` — every worker runs on the coordinator's host. Parameters and Adam moments (twice:
  step ``s`` reads copy ``s % 2`` and writes the other, so a task run again after its worker
  died finds its inputs intact), one gradient slot per shard, and a self-validating record per
  shard and per slice live in two files in ``/dev/shm``. Workers map them, write their tree
  nodes into their slots, update their slice, and learn from the records when the others are
  done. Nothing of size P crosses a socket, and the coordinator touches none of it.
* ``tcp`` — anywhere: tree nodes and parameter slices move between workers as Dask data
  (worker to worker); each worker keeps its slice's parameters and moments.
"""

from __future__ import annotations

import mmap
import os
import platform
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from distributed import rejoin, secede

from pipeline.errors import TrainingError
from pipeline.procs import Owner

HEADER = 64  # bytes before the state: magic token (32), then the abort flag (int64)
NEVER = -9  # the step of a record not yet written
_PREFIX = "convpipe-"


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


# ---- shared memory ---------------------------------------------------------------------------------

#: where stores become visible to other processes in program order (the records rely on it)
TSO_MACHINES = ("x86_64", "amd64", "i386", "i686")


def ordered_stores() -> bool:
    """Whether this processor shows stores to other processes in program order (x86-TSO)."""
    return platform.machine().lower() in TSO_MACHINES


# A shard record (float64): [step, n, loss_sum, read_s, compute_s, begin, end, worker, has_bn,
# pad.., bn_mean (C), bn_var (C), step]. A slice record: [step, sumsq of each of its blocks.., step].
# Seqlock: the writer puts the step first, then the fields, the step last; a reader accepts a
# record whose first and last entries both equal the step it expects, and checks again after it
# has used the data the record vouches for (the gradient slots).
SHARD_FIELDS = ("n", "loss_sum", "read_s", "compute_s", "begin", "end", "worker", "has_bn")
SHARD_HEAD = 1 + 15  # step + fields (room to grow), then the BN moments


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

    @property
    def channels(self) -> int:
        return self.layout.shapes[0][0] if self.layout.shapes else 0

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
        return 2 * (self.slots * self.shard_len + self.max_slices * self.slice_len)

    @property
    def file_bytes(self) -> int:
        return self.grads_bytes + 8 * self.records_len


def shm_root() -> Path:
    root = Path("/dev/shm")
    return root if root.is_dir() and os.access(root, os.W_OK) else Path(tempfile.gettempdir())


class Mapped:
    """Views of the two shared files: ``state[parity]`` = (w, m, v) flat vectors, ``slots``
    (k, P) gradient slots, ``shards[parity]`` (k, shard_len) and ``slices[parity]``
    (max_slices, slice_len) records, ``abort`` (the coordinator stopped)."""

    def __init__(self, ref: ShmRef, smap, gmap):
        n, dt = ref.layout.size, ref.layout.dtype
        self.ref, self._maps = ref, (smap, gmap)
        self.abort = np.frombuffer(smap, dtype=np.int64, count=1, offset=32)
        vectors = np.frombuffer(smap, dtype=dt, count=6 * n, offset=HEADER).reshape(2, 3, n)
        self.state = [tuple(vectors[p]) for p in range(2)]
        self.slots = np.frombuffer(gmap, dtype=dt, count=ref.slots * n).reshape(ref.slots, n)
        records = np.frombuffer(
            gmap, dtype=np.float64, count=ref.records_len, offset=ref.grads_bytes
        )
        half = ref.records_len // 2
        cut = ref.slots * ref.shard_len
        self.shards = [
            records[p * half : p * half + cut].reshape(ref.slots, ref.shard_len) for p in range(2)
        ]
        self.slices = [
            records[p * half + cut : (p + 1) * half].reshape(ref.max_slices, ref.slice_len)
            for p in range(2)
        ]

    def release(self) -> None:
        self.state = self.slots = self.shards = self.slices = self.abort = None
        for m in self._maps:
            try:
                m.close()
            except BufferError:  # a view handed out is still alive; freed with it
                pass
        self._maps = ()


class SharedState(Mapped):
    """The coordinator's side: creates, owns and finally removes the two shared files."""

    def __init__(self, layout: Layout, slots: int, max_slices: int, blocks: int):
        if not ordered_stores():
            raise TrainingError(
                f"transport shm: this {platform.machine()} processor does not keep stores in order; "
                "use --transport tcp (or auto)"
            )
        remove_stale()
        owner = Owner.me()
        token = secrets.token_hex(16)
        root = shm_root()
        base = root / f"{_PREFIX}{owner.pid}-{owner.namespace}-{token[:12]}"
        ref = ShmRef(
            f"{base}-state", f"{base}-grads", token, layout, slots, max_slices, blocks, owner
        )
        self.paths = (ref.state_path, ref.grads_path)
        made = []
        try:
            for path, size in ((ref.state_path, ref.state_bytes), (ref.grads_path, ref.file_bytes)):
                made.append(_create(path, size))
        except OSError as exc:
            self._unlink()
            raise TrainingError(
                f"cannot create shared memory in {root} ({ref.state_bytes + ref.file_bytes} bytes): "
                f"{exc.strerror or exc}"
            ) from None
        made[0][:32] = token.encode()
        super().__init__(ref, *made)
        for p in range(2):
            self.shards[p][:] = NEVER
            self.slices[p][:] = NEVER

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
                f"worker on {os.uname().nodename} cannot see the coordinator's shared memory {ref.state_path}:"
                " use --transport tcp for clusters that span hosts"
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
