"""The Dask dashboard and the convpipe page where users are pointed to them: the link `convpipe
train` prints on the embedded cluster, and the compose file's scheduler command (`--preload
pipeline.dashboard`) run as a local process."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request

from tests.helpers.cluster import (
    TINY_TRAIN,
    compose_commands,
    convpipe_exe,
    dask_exe,
    local_scheduler_args,
)
from tests.helpers.training import make_store
from tests.helpers.wait import wait_until


def fetch(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, r.read().decode()


def test_the_embedded_clusters_dashboard_link_serves_the_dask_dashboard():
    """bokeh is installed: /status is Dask's dashboard, not "Dask needs bokeh>=... for the
    dashboard"."""
    from pipeline.cluster import connect
    from pipeline.dashboard import page_link

    with connect(workers=1) as client:
        link = client.dashboard_link
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/status", link), link
        status, html = fetch(link)
        assert status == 200 and "needs bokeh" not in html
        assert "<title>Dask Diagnostic UI</title>" in html and "Bokeh" in html
        status, html = fetch(page_link(link))
        assert status == 200 and "<title>convpipe: jobs and runs</title>" in html


def test_the_compose_scheduler_command_preloads_the_page(tmp_path):
    """docker-compose.yml's scheduler command, run here as a process in a folder laid out like the
    container (data/ holds the job records): its dashboard serves /convpipe with the job."""
    args = compose_commands()["scheduler"]
    assert args[args.index("--preload") + 1] == "pipeline.dashboard"
    jobs = tmp_path / "data" / "jobs" / "train-from-compose"
    jobs.mkdir(parents=True)
    (jobs / "status.json").write_text(
        json.dumps(
            {
                "job": "train-from-compose",
                "kind": "train",
                "name": "tiny",
                "state": "queued",
                "attempt": 1,
            }
        )
    )
    sched_file = tmp_path / "scheduler.json"
    log = open(tmp_path / "scheduler.log", "w")
    scheduler = subprocess.Popen(
        [dask_exe(), *local_scheduler_args(args, sched_file)[1:]],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(
            lambda: sched_file.exists() or scheduler.poll() is not None,
            timeout=60,
            what=lambda: "the scheduler's file:\n" + (tmp_path / "scheduler.log").read_text(),
            interval=0.1,
        )
        assert sched_file.exists(), (tmp_path / "scheduler.log").read_text()
        port = json.loads(sched_file.read_text())["services"]["dashboard"]
        status, html = fetch(f"http://127.0.0.1:{port}/convpipe")
        assert status == 200 and 'data-job="train-from-compose"' in html
        assert f"data root {tmp_path / 'data'}" in html
    finally:
        scheduler.terminate()
        scheduler.wait(30)
        log.close()


def test_convpipe_train_prints_the_runs_page_beside_the_dashboard(tmp_path):
    store = make_store(tmp_path / "store")
    r = subprocess.run(
        [
            *convpipe_exe(),
            "train",
            "--data",
            str(store),
            "--steps",
            "2",
            "--workers",
            "1",
            "--out",
            str(tmp_path / "run"),
            *TINY_TRAIN,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stderr.splitlines() if x.startswith("training on"))
    m = re.search(
        r"dashboard (http://127\.0\.0\.1:(\d+))/status; this run on the convpipe page (\S+)$", line
    )
    assert m, line
    assert m.group(3) == f"{m.group(1)}/convpipe/run?dir=" + urllib.request.quote(
        str(tmp_path / "run"), safe=""
    )
