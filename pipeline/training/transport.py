"""How parameters reach the workers and gradient sums come back.

All parameters live in one flat vector (``Layout`` maps names to slices), so Adam, the
gradient tree and every transfer work on a single contiguous array.

Two transports, chosen once per run:

* ``shm`` — every worker runs on the coordinator's host: the parameters and one gradient
  slot per shard live in two files in ``/dev/shm``. Workers map them; the coordinator's Adam
  writes the parameters in place and a worker writes its shard's gradient sum into its slot.
  Nothing of size P crosses a socket; Dask carries only small task descriptions and results.
* ``tcp`` — anywhere: the parameters are scattered to every worker once per step
  (``broadcast=True``), shard gradients stay on their workers and are added along the fixed
  tree by Dask tasks where the data lives; only the root comes back to the coordinator.
"""

from __future__ import annotations

import mmap
import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import TrainingError

HEADER = 64  # bytes before the parameter vector: magic token (32) + version (int64)
ABORTED = -1  # the version a coordinator publishes when it stops: waiting tasks give up
_PREFIX = "convpipe-"


@dataclass(frozen=True)
class Layout:
    """Names, shapes and offsets of the parameters inside the flat vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: str

    @classmethod
    def of(cls, params: dict[str, np.ndarray]) -> "Layout":
        first = next(iter(params.values()))
        return cls(tuple(params), tuple(tuple(int(d) for d in p.shape) for p in params.values()), str(first.dtype))

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
        return {n: flat[sl].reshape(shape) for (n, sl), shape in zip(self.slices().items(), self.shapes)}

    def flatten(self, params: dict[str, np.ndarray], out: np.ndarray | None = None) -> np.ndarray:
        out = np.empty(self.size, dtype=self.dtype) if out is None else out
        for n, sl in self.slices().items():
            out[sl] = np.asarray(params[n]).reshape(-1)
        return out

    def to_dict(self) -> dict:
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes], "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: dict) -> "Layout":
        return cls(tuple(d["names"]), tuple(tuple(s) for s in d["shapes"]), d["dtype"])


# ---- shared memory ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShmRef:
    """What a worker needs to map the run's shared parameters and gradient slots (picklable)."""

    params_path: str
    grads_path: str
    token: str
    layout: Layout
    slots: int
    owner_pid: int = 0
    status_len: int = 0     # float64 fields per slot of the status table (after the gradients)

    @property
    def grads_bytes(self) -> int:
        return -(-self.slots * self.layout.size * np.dtype(self.layout.dtype).itemsize // 8) * 8

    @property
    def file_bytes(self) -> int:
        return max(1, self.grads_bytes + self.slots * self.status_len * 8)


# A slot's status record (float64): written by the worker after its gradient sum, ``done``
# last, so the coordinator learns of a finished shard from shared memory, not via Dask.
STATUS = ("done", "n", "loss_sum", "read_s", "wait_s", "compute_s", "write_s", "begin", "end",
          "arrived", "worker", "has_bn")
STATUS_FIELDS = 16   # then bn_mean (C), bn_var (C)


def status_len(layout: Layout) -> int:
    channels = layout.shapes[0][0] if layout.shapes else 0
    return STATUS_FIELDS + 2 * channels


def shm_root() -> Path:
    root = Path("/dev/shm")
    return root if root.is_dir() and os.access(root, os.W_OK) else Path(tempfile.gettempdir())


class SharedBuffers:
    """The coordinator's side: creates, owns and finally removes the two shared files."""

    def __init__(self, layout: Layout, slots: int):
        remove_stale()
        self.token = secrets.token_hex(16)
        root = shm_root()
        base = root / f"{_PREFIX}{os.getpid()}-{_pid_namespace()}-{self.token[:12]}"
        self.layout = layout
        itemsize = np.dtype(layout.dtype).itemsize
        self.ref = ShmRef(f"{base}-params", f"{base}-grads", self.token, layout, slots, os.getpid(),
                          status_len(layout))
        self._maps = []
        try:
            pmap = _create(self.ref.params_path, HEADER + layout.size * itemsize)
            gmap = _create(self.ref.grads_path, self.ref.file_bytes)
        except OSError as exc:
            self.close()
            raise TrainingError(f"cannot create shared memory in {root}: {exc.strerror or exc}") from None
        self._maps = [pmap, gmap]
        pmap[:32] = self.token.encode()
        self.version = np.frombuffer(pmap, dtype=np.int64, count=1, offset=32)
        self.params = np.frombuffer(pmap, dtype=layout.dtype, count=layout.size, offset=HEADER)
        self.grads = np.frombuffer(gmap, dtype=layout.dtype, count=slots * layout.size).reshape(slots, layout.size)
        self.status = _status_view(gmap, self.ref)
        self.status[:, 0] = -1

    def publish(self, version: int) -> None:
        """Mark the parameters in place as those of ``version`` (a step number)."""
        self.version[0] = version

    def close(self) -> None:
        if self.version is not None:
            self.version[0] = ABORTED
        self.params = self.grads = self.version = self.status = None
        self._maps = []  # the maps close when the last view is gone
        for p in (self.ref.params_path, self.ref.grads_path):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


def _status_view(gmap, ref: ShmRef) -> np.ndarray:
    return np.frombuffer(gmap, dtype=np.float64, count=ref.slots * ref.status_len,
                         offset=ref.grads_bytes).reshape(ref.slots, ref.status_len)


def _create(path: str, size: int) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def _pid_namespace() -> int:
    """This process's pid namespace (containers sharing /dev/shm can have equal pids)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def remove_stale() -> None:
    """Remove shared files left by killed coordinators of this pid namespace (pid gone)."""
    ns = str(_pid_namespace())
    for p in shm_root().glob(f"{_PREFIX}*-*-*"):
        fields = p.name[len(_PREFIX):].split("-")
        if len(fields) < 3 or fields[1] != ns or not fields[0].isdigit():
            continue
        try:
            os.kill(int(fields[0]), 0)
        except ProcessLookupError:
            try:
                p.unlink()
            except OSError:
                pass
        except PermissionError:
            pass


class Attached:
    """A worker's view of the shared files: read-only parameters, writable gradient slots."""

    def __init__(self, ref: ShmRef):
        itemsize = np.dtype(ref.layout.dtype).itemsize
        with open(ref.params_path, "rb") as f:
            pmap = mmap.mmap(f.fileno(), HEADER + ref.layout.size * itemsize, prot=mmap.PROT_READ)
        if pmap[:32] != ref.token.encode():
            raise TrainingError(f"shared parameters {ref.params_path} belong to another run")
        with open(ref.grads_path, "r+b") as f:
            gmap = mmap.mmap(f.fileno(), ref.file_bytes)
        self.version = np.frombuffer(pmap, dtype=np.int64, count=1, offset=32)
        self.params = np.frombuffer(pmap, dtype=ref.layout.dtype, count=ref.layout.size, offset=HEADER)
        self.grads = np.frombuffer(gmap, dtype=ref.layout.dtype, count=ref.slots * ref.layout.size).reshape(
            ref.slots, ref.layout.size
        )
        self.status = _status_view(gmap, ref)
        self.param_views = ref.layout.views(self.params)
        self.owner_pid = ref.owner_pid

    def wait_for(self, version: int, timeout: float = 600.0) -> None:
        """Wait until the coordinator has published ``version`` (tasks of the next step are
        submitted while it still updates the parameters). Raises if it stopped or died."""
        deadline = time.monotonic() + timeout
        pause = 5e-5
        while True:
            seen = int(self.version[0])
            if seen == version:
                return
            if seen == ABORTED or seen > version:
                state = "no step (the run stopped)" if seen == ABORTED else f"step {seen}"
                raise TrainingError(f"shared parameters are at {state}, task expected step {version}")
            # short pauses first (an update takes milliseconds), then at most 1 ms apart:
            # a waiting task must not take CPU from the coordinator's update
            time.sleep(pause)
            pause = min(pause * 1.5, 1e-3)
            if pause == 1e-3 and (time.monotonic() > deadline or not _alive(self.owner_pid)):
                raise TrainingError(f"the coordinator did not publish step {version}: it has stopped")


def _alive(pid: int) -> bool:
    if not pid:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


_ATTACHED: dict[str, Attached] = {}


def attach(ref: ShmRef) -> Attached:
    """Map the run's shared files in this process (once per run; older runs are dropped)."""
    got = _ATTACHED.get(ref.token)
    if got is None:
        _ATTACHED.clear()
        try:
            got = _ATTACHED[ref.token] = Attached(ref)
        except FileNotFoundError:
            raise TrainingError(
                f"worker on {os.uname().nodename} cannot see the coordinator's shared memory {ref.params_path}:"
                " use --transport tcp for clusters that span hosts"
            ) from None
    return got


def can_attach(ref: ShmRef) -> bool:
    """Run on a worker: whether it shares the coordinator's host (and /dev/shm)."""
    try:
        attach(ref)
        return True
    except (OSError, TrainingError, ValueError):
        return False
