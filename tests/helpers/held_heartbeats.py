"""A scheduler preload for the tests (``DASK_DISTRIBUTED__SCHEDULER__PRELOAD=<this file>``): the
scheduler holds its reply to each worker heartbeat until that worker has left (or the scheduler
closes), so a worker always has a heartbeat in flight when it closes.

That is the race behind the "Failed to communicate with scheduler during heartbeat" traceback at
the end of a run on the embedded cluster, which otherwise needs a heartbeat (every 0.5 s) to be
waiting for its reply at the moment the worker closes its connections: rare, made certain here.
The heartbeat is recorded as usual; only its reply waits. Each worker whose held heartbeat was
still waiting when it left gets a line in the file named by ``$HELD_HEARTBEATS_LOG`` (if set),
so that a test can tell the race did happen.
"""

from __future__ import annotations

import asyncio
import os

from distributed.diagnostics.plugin import SchedulerPlugin

LOG_ENV = "HELD_HEARTBEATS_LOG"


class HeldHeartbeats(SchedulerPlugin):
    name = "held-heartbeats"

    def __init__(self):
        self.left: dict[str, asyncio.Event] = {}

    def event(self, worker: str) -> asyncio.Event:
        return self.left.setdefault(worker, asyncio.Event())

    def remove_worker(self, scheduler, worker, **kwargs) -> None:
        self.event(worker).set()

    async def close(self) -> None:
        for left in self.left.values():
            left.set()


def dask_setup(scheduler) -> None:
    plugin = HeldHeartbeats()
    scheduler.add_plugin(plugin)
    record = scheduler.handlers["heartbeat_worker"]

    async def heartbeat_worker(**kwargs):
        reply = record(**kwargs)
        await plugin.event(kwargs["address"]).wait()
        if os.environ.get(LOG_ENV):
            with open(os.environ[LOG_ENV], "a") as log:
                log.write(f"{kwargs['address']}\n")
        return reply

    scheduler.handlers["heartbeat_worker"] = heartbeat_worker
