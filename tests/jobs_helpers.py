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


def _square(i: int) -> int:
    return i * i


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
            report.progress({"kind": "step", "step": step, "total_steps": options["steps"], "loss": 1.0 / step})
        report.progress({"kind": "epoch", "epoch": 1, "val_acc": 0.5})
        return {"steps": options["steps"], "run_dir": out}

    @staticmethod
    def run_dir(options):
        return options["out"]

    @staticmethod
    def resume_options(options):
        return {**options, "resume": options["out"]}
