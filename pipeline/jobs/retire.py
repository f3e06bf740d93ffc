"""A worker told to end (``docker stop``, a scale-down, SIGTERM) hands over its data first.

Preloaded into the nanny (``dask worker ... --preload-nanny pipeline.jobs.retire``, as
docker-compose.yml's workers are): when the nanny closes, before it ends its worker process, it
asks the scheduler to retire that worker (Dask's ``retire_workers``: no new tasks, every piece
of data only it holds copied to another worker, then removed as expected). A run training on
it goes on without a replay (:mod:`pipeline.training.members` counts it as left); without
this, its tcp slices were lost with it and the run replayed from its last checkpoint.

Not when the worker runs a job's coordinator: that job stops between two steps and restarts on
another worker (:mod:`pipeline.jobs.interrupt`); retiring would start the second coordinator
while the first still holds the run. Nor past :data:`RETIRE_S`: docker's grace period (10 s)
must leave the worker time to close.
"""

from __future__ import annotations

import asyncio
import logging
import time

from pipeline.jobs.records import task_key

#: at most this long to hand the worker's data over (docker stop kills after 10 s)
RETIRE_S = 6.0
_JOB_KEY = task_key("ID", 0).split("ID")[0]  # "convpipe-job-": a job coordinator's task key

logger = logging.getLogger("distributed.nanny")  # where the nanny's own lines go


def runs_a_coordinator(keys) -> bool:
    return any(str(k).startswith(_JOB_KEY) for k in keys)


async def dask_teardown(nanny) -> None:
    address = getattr(nanny, "worker_address", None)
    if not address or nanny.scheduler is None:
        return
    try:
        processing = await asyncio.wait_for(nanny.scheduler.processing(workers=[address]), 2.0)
        if runs_a_coordinator(processing.get(address, ())):
            logger.info("%s runs a job's coordinator: not retired, the job restarts", address)
            return
        retired = await asyncio.wait_for(
            nanny.scheduler.retire_workers(
                workers=[address],
                close_workers=False,
                remove=True,
                stimulus_id=f"convpipe-nanny-close-{time.time()}",
            ),
            RETIRE_S,
        )
        logger.info("%s retired before closing: %s", address, bool(retired))
    except Exception as exc:  # noqa: BLE001 - the worker closes as before: a run replays
        logger.warning("%s not retired before closing: %s", address, exc)
