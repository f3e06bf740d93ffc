"""The embedded cluster closes quietly: a closing worker whose heartbeat is still waiting for the
scheduler's reply does not print Dask's "Failed to communicate with scheduler during heartbeat"
CommClosedError traceback at the end of a run that went well
(pipeline.cluster.worker_logs.ClosingHeartbeatOffTheTerminal)."""

from __future__ import annotations

import logging
from pathlib import Path

from distributed.core import Status

from pipeline.cluster.worker_logs import HEARTBEAT_FAILED, ClosingHeartbeatOffTheTerminal
from tests.helpers import held_heartbeats
from tests.helpers.cluster import TINY_TRAIN, convpipe
from tests.helpers.training import make_store


def test_a_run_on_the_embedded_cluster_ends_without_a_heartbeat_traceback(tmp_path):
    """`convpipe train`, then `convpipe train --resume`, each on its own embedded cluster whose
    scheduler holds every heartbeat's reply (tests/helpers/held_heartbeats.py), so that each
    worker closes with a heartbeat in flight: rare in a real run, certain here."""
    store = make_store(tmp_path / "s.zarr")
    held = tmp_path / "held.log"
    env = {
        "DASK_DISTRIBUTED__SCHEDULER__PRELOAD": str(Path(held_heartbeats.__file__)),
        held_heartbeats.LOG_ENV: str(held),
    }
    run = tmp_path / "run"
    options = [*TINY_TRAIN, "--workers", "2", "--checkpoint-every", "2"]
    for args in (
        ["--data", store, "--out", run, "--steps", "2", *options],
        ["--resume", run, "--steps", "4"],
    ):
        held.write_text("")
        r = convpipe("train", *args, cwd=tmp_path, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "run directory" in r.stdout
        # the race did happen: the workers left while their heartbeats waited
        assert len(held.read_text().split()) == 2, held.read_text()
        assert "Traceback" not in r.stderr, r.stderr[-3000:]
        assert "CommClosedError" not in r.stderr and HEARTBEAT_FAILED not in r.stderr
    assert "resuming at step 2" in r.stderr


class _Worker:
    status = Status.running


def _shown(worker, msg: str) -> bool:
    record = logging.LogRecord("distributed.worker", logging.ERROR, __file__, 1, msg, (), None)
    return ClosingHeartbeatOffTheTerminal(worker).filter(record)


def test_only_a_closing_workers_heartbeat_failure_is_off_the_terminal():
    worker = _Worker()
    failed = HEARTBEAT_FAILED + "."
    assert _shown(worker, failed)  # running: the scheduler is gone, which the user must see
    assert _shown(worker, "Worker stream died during communication")
    worker.status = Status.closing
    assert not _shown(worker, failed)
    assert _shown(worker, "Worker stream died during communication")
    worker.status = Status.closed
    assert not _shown(worker, failed)
