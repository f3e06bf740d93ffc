"""A job kind whose work is trivial, for testing the job machinery on in-process clusters.

``count`` counts to ``steps``, one progress record per step (``step_s`` seconds each), writes
``counts.txt`` (one line per step, with its ``label``) into its run directory, and can be told to
fail at a step. It runs shard tasks on the cluster like training does (``client.submit``), so a
coordinator that did not secede from the worker's thread pool would deadlock a 1-thread worker.
"""

from __future__ import annotations

import os
import time

from pipeline.errors import TrainingError
from pipeline.jobs.spec import Option
from tests.helpers.wait import wait_until


def _square(i: int) -> int:
    return i * i


def wait_for(
    client, job_id: str, states=("done", "failed", "cancelled"), timeout: float = 30.0
) -> dict:
    """The job's status once it is in one of ``states`` (polled through the scheduler, within
    ``timeout`` seconds)."""
    from pipeline.jobs import client as job_client

    last = {}

    def in_states():
        status = job_client.job_status(client, job_id)
        last["state"] = status["state"]
        return status if status["state"] in states else None

    return wait_until(
        in_states,
        timeout,
        lambda: f"job {job_id} in {states} (still {last['state']})",
        interval=0.05,
    )


def state_times(client, job_id: str) -> dict[str, float]:
    """{state: when the scheduler received it} of a job's latest attempt: one clock,
    sub-millisecond."""
    from pipeline.jobs.records import job_topic

    return {
        m["state"]: t
        for t, m in client.get_events(job_topic(job_id))
        if isinstance(m, dict) and m.get("type") == "state"
    }


def ran_at_the_same_time(client, a: str, b: str) -> bool:
    """Whether jobs ``a`` and ``b`` overlapped: each started before the other ended, in the order
    the scheduler received their state events."""
    ta, tb = state_times(client, a), state_times(client, b)
    return ta["running"] < tb["done"] and tb["running"] < ta["done"]


def wait_gate(name: str) -> bool:
    """A task that holds its worker thread until the test sets the Dask Event ``name``."""
    from distributed import Event

    return Event(name).wait(120)


class Count:
    name = "count"

    @staticmethod
    def options():
        return {
            "steps": Option("steps", (int,), 5),
            "step_s": Option("step_s", (float,), 0.05),
            "label": Option("label", (str,), "x"),
            "out": Option("out", (str, type(None)), None),
            "fail_at": Option("fail_at", (int, type(None)), None),
            "resume": Option("resume", (str, type(None)), None),
        }

    @staticmethod
    def validate(spec):
        if spec.options["steps"] < 1:
            from pipeline.jobs.spec import SpecError

            raise SpecError(f"{spec.source}: steps must be >= 1")

    @staticmethod
    def preflight(options, root, job_id):
        o = dict(options)
        if o.get("resume"):
            o["out"] = o["resume"]
        o["out"] = os.path.abspath(o.get("out") or os.path.join(root, "runs", job_id))
        return o

    @staticmethod
    def run(options, client, report):
        out = options["out"]
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "counts.txt")
        done = 0
        if os.path.exists(path):
            done = len(open(path).read().splitlines())
        for step in range(done + 1, options["steps"] + 1):
            if options.get("fail_at") == step:
                raise TrainingError(f"loss is NaN at step {step}")
            value = client.submit(_square, step, pure=False).result()
            time.sleep(options["step_s"])
            with open(path, "a") as f:
                f.write(f"{options['label']} {step} {value}\n")
            report.progress(
                {"kind": "step", "step": step, "total_steps": options["steps"], "loss": 1.0 / step}
            )
        report.progress({"kind": "epoch", "epoch": 1, "val_acc": 0.5})
        return {"steps": options["steps"], "run_dir": out}

    @staticmethod
    def run_dir(options):
        return options["out"]

    @staticmethod
    def resume_options(options):
        return {**options, "resume": options["out"]}
