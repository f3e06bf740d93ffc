"""The convpipe page on the embedded cluster's dashboard (pipeline.dashboard), fetched over HTTP:
jobs from their records and from the scheduler's events, runs, one job's page and its JSON twin,
read-only, only the run directories it lists. The fixtures ``root`` and ``page`` are in
tests/web/conftest.py."""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest

from pipeline.jobs.records import REGISTRY_TOPIC, JobFiles, job_topic
from tests.helpers.cluster import local_cluster
from tests.helpers.wait import wait_until

# ---- fixtures ------------------------------------------------------------------------------------


def write_run(
    path: Path,
    steps: int,
    *,
    total: int = 40,
    spe: int = 8,
    evals=(),
    done: bool = False,
    name_settings: dict | None = None,
    summary: dict | None = None,
) -> Path:
    """A run directory as the coordinator writes it: config.json, ``steps`` step lines, eval lines
    at ``evals``, summary.json when ``done`` (with ``summary``'s keys as well)."""
    path.mkdir(parents=True, exist_ok=True)
    settings = {
        "data": str(path / "no-store"),
        "batch_size": 64,
        "train_limit": 64 * spe,
        "epochs": 1,
        "steps": total,
        "lr": 0.01,
        **(name_settings or {}),
    }
    (path / "config.json").write_text(json.dumps(settings))
    lines = []
    for s in range(1, steps + 1):
        lines.append(
            {
                "kind": "step",
                "step": s,
                "epoch": (s - 1) // spe + 1,
                "loss": 2.3 - 0.01 * s,
                "n": 64,
                "seconds": 0.5,
                "images_per_s": 128.0,
                "read_s": 0.01,
                "compute_s": 0.3,
                "reduce_s": 0.05,
                "sync_s": 0.1,
                "coordinator_s": 0.02,
            }
        )
        if s in evals:
            lines.append(
                {
                    "kind": "eval",
                    "step": s,
                    "epoch": s / spe,
                    "train_acc": 0.3,
                    "val_acc": 0.25 + s / 1000,
                }
            )
    (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    if done:
        summary = {"steps": steps, "images_per_s": 120.0, **(summary or {})}
        (path / "summary.json").write_text(json.dumps(summary))
    return path


def write_job(root: Path, job_id: str, **status) -> JobFiles:
    files = JobFiles.of(root, job_id)
    files.dir.mkdir(parents=True)
    base = {
        "job": job_id,
        "kind": "train",
        "name": "tiny",
        "attempt": 1,
        "root": str(root),
        "job_dir": str(files.dir),
        "submitted": "2026-01-01T00:00:00Z",
        "by": "me@here",
    }
    files.write_status({**base, **status})
    files.append_log(f"2026-01-01T00:00:00Z submitted {job_id}")
    return files


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=20) as r:
            return r.status, r.headers.get("Content-Type", ""), _text(r.read(), r.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), _text(exc.read(), exc.headers)


def _text(body: bytes, headers) -> str | bytes:
    return body if headers.get("Content-Type", "").startswith("image/") else body.decode()


def html_showing(url: str, shows: str, what: str) -> str:
    """The page at ``url`` once its HTML holds ``shows`` (the scheduler's events arrive in time)."""

    def showing():
        html = get(url)[2]
        return html if shows in html else None

    return wait_until(showing, timeout=20, what=what)


def row(html: str, attr: str, value: str) -> str:
    m = re.search(rf'<tr class="\w+" {attr}="{re.escape(value)}">(.*?)</tr>', html, re.S)
    assert m, f"no row {attr}={value!r} in the page"
    return m.group(1)


def text(fragment: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", fragment)).strip()


# ---- the overview --------------------------------------------------------------------------------


def test_overview_lists_jobs_with_progress_failure_and_resume_and_runs(root, page):
    client, url = page
    run = write_run(root / "runs" / "train-a", 10, total=40, evals=(8,))
    write_job(root, "train-a", state="running", run_dir=str(run))
    write_job(
        root,
        "train-b",
        state="failed",
        resumable=True,
        run_dir=str(root / "runs" / "train-b"),
        reason="the worker running its coordinator (tcp://w:1) died or left the cluster",
    )
    write_job(
        root,
        "prepare-c",
        kind="prepare",
        name="<script>alert(1)</script>",
        state="done",
        result={"store": "/x/cifar10.zarr", "seconds": 1.5},
    )
    write_run(root / "runs" / "plain", 5, total=5, done=True)
    stale = write_run(Path("runs") / "old", 3)
    os.utime(stale / "metrics.jsonl", (time.time() - 3600, time.time() - 3600))

    status, ctype, html = get(url)
    assert status == 200 and ctype.startswith("text/html")
    a = text(row(html, "data-job", "train-a"))
    assert (
        "running" in a and "10/40" in a and "2.2000" in a and "128" in a
    )  # step/total, loss, images/s
    assert "15s" in a and "25.8%" in a and "30.0%" in a  # ETA 30 steps x 0.5 s, accuracies
    b = text(row(html, "data-job", "train-b"))
    assert "failed" in b and "died or left the cluster" in b and "convpipe resume train-b" in b
    c = row(html, "data-job", "prepare-c")
    assert "&lt;script&gt;" in c and "<script>alert" not in html and "seconds 1.5" in c
    assert "data-run" not in row(html, "data-job", "train-a")
    plain = text(row(html, "data-run", str(root / "runs" / "plain")))
    assert "done" in plain and "5/5" in plain
    old = text(row(html, "data-run", str(stale.resolve())))
    assert "stopped" in old and f"convpipe train --resume {stale.resolve()}" in old
    assert html.count('data-job="train-a"') == 1 and str(run) not in re.findall(
        r'data-run="([^"]*)"', html
    )


def test_jobs_known_only_to_the_scheduler_and_a_vanished_worker(page):
    """A job whose files this data root does not hold is listed from the scheduler's events;
    one recorded running on a worker the scheduler no longer has is failed, as `convpipe status`
    says."""
    client, url = page
    sub = {
        "type": "submitted",
        "job": "train-z",
        "attempt": 1,
        "kind": "train",
        "name": "remote",
        "root": "/elsewhere",
        "job_dir": "/elsewhere/jobs/train-z",
        "run_dir": "/elsewhere/runs/train-z",
        "options": {},
        "submitted": "2026-02-01T00:00:00Z",
        "by": "me@there",
        "key": "convpipe-job-train-z-1",
    }
    client.log_event(REGISTRY_TOPIC, sub)
    client.log_event(
        job_topic("train-z"),
        {
            "id": "1",
            "job": "train-z",
            "attempt": 1,
            "type": "state",
            "state": "running",
            "worker": "tcp://10.9.9.9:1234",
        },
    )
    client.log_event(
        job_topic("train-z"),
        {
            "id": "2",
            "job": "train-z",
            "attempt": 1,
            "type": "log",
            "line": "2026-02-01T00:00:01Z running on worker tcp://10.9.9.9:1234",
        },
    )
    html = html_showing(url, 'data-job="train-z"', "the scheduler's job on the page")
    z = text(row(html, "data-job", "train-z"))
    assert "remote" in z and "failed" in z and "died or left the cluster" in z
    status, _, job = get(f"{url}/job/train-z")
    assert (
        status == 200 and "running on worker tcp://10.9.9.9:1234" in job
    )  # its log, from the events


def test_a_job_running_on_a_live_worker_reads_running(page):
    """The page asks the scheduler's own state which workers are connected (SchedulerAsClient):
    a job whose coordinator task runs on a live worker is running, not failed."""
    from distributed import Event

    from pipeline.cluster import worker_addresses
    from pipeline.jobs.records import task_key
    from tests.helpers.jobs import wait_gate

    client, url = page
    worker = worker_addresses(client)[0]
    task = client.submit(wait_gate, "train-y-gate", key=task_key("train-y", 1), workers=[worker])
    try:

        def state(dask_scheduler, key=task.key):  # None until the scheduler has the task
            return getattr(dask_scheduler.tasks.get(key), "state", None)

        wait_until(
            lambda: client.run_on_scheduler(state) == "processing",
            timeout=20,
            what="the coordinator task started",
        )
        sub = {
            "type": "submitted",
            "job": "train-y",
            "attempt": 1,
            "kind": "train",
            "name": "live",
            "root": "/elsewhere",
            "job_dir": "/elsewhere/jobs/train-y",
            "run_dir": "/elsewhere/runs/train-y",
            "options": {},
            "submitted": "2026-02-01T00:00:00Z",
            "by": "me@there",
            "key": task.key,
        }
        client.log_event(REGISTRY_TOPIC, sub)
        client.log_event(
            job_topic("train-y"),
            {
                "id": "1",
                "job": "train-y",
                "attempt": 1,
                "type": "state",
                "state": "running",
                "worker": worker,
            },
        )
        html = html_showing(url, 'data-job="train-y"', "the scheduler's job on the page")
        y = text(row(html, "data-job", "train-y"))
        assert "live" in y and "running" in y and "failed" not in y, y
    finally:
        Event("train-y-gate", client=client).set()
        task.result(timeout=30)


# ---- one job -------------------------------------------------------------------------------------


def test_job_page_curves_settings_breakdown_links_and_json_twin(root, page):
    client, url = page
    run = write_run(root / "runs" / "train-a", 12, total=40, spe=8, evals=(6, 12))
    files = write_job(root, "train-a", state="running", run_dir=str(run))
    status, _, html = get(f"{url}/job/train-a")
    assert status == 200
    loss = re.search(r'<path [^>]*data-series="loss of each step" data-points="(\d+)"', html)
    assert loss and loss.group(1) == "12"
    assert re.search(r'data-series="val accuracy" data-points="2"', html)
    assert "epoch (step / steps per epoch)" in html  # fractional epochs, 8 steps each
    x_ticks = re.findall(r'class="tick" text-anchor="middle">([\d.]+)<', html)
    assert x_ticks[-1] == "1.5" and "1" in x_ticks  # 12 steps so far = 1.5 epochs
    assert "<td>batch_size</td>" in html and "compute gradients" in html and "300.0 ms" in html
    assert 'href="../../tasks"' in html and 'href="../../status"' in html
    assert 'data-poll="train-a.json"' in html and "submitted train-a" in html  # its log

    status, ctype, body = get(f"{url}/job/train-a.json")
    twin = json.loads(body)
    assert status == 200 and ctype.startswith("application/json") and twin["final"] is False
    assert set(twin["html"]) >= {"facts", "progress", "charts", "breakdown", "settings", "log"}
    with open(run / "metrics.jsonl", "a") as f:  # one more step: the curve grows
        f.write(
            json.dumps(
                {"kind": "step", "step": 13, "epoch": 2, "loss": 2.0, "n": 64, "seconds": 0.5}
            )
            + "\n"
        )
    assert 'data-points="13"' in json.loads(get(f"{url}/job/train-a.json")[2])["html"]["charts"]
    charts = json.loads(get(f"{url}/job/train-a.json")[2])["html"]["charts"]
    assert "test accuracy" not in charts  # a run without test_each_epoch
    with open(run / "metrics.jsonl", "a") as f:  # with it: the test split at an epoch's end
        record = {"kind": "epoch", "epoch": 1, "step": 8, "train_acc": 0.5, "val_acc": 0.4}
        f.write(json.dumps({**record, "test_acc": 0.45}) + "\n")
    charts = json.loads(get(f"{url}/job/train-a.json")[2])["html"]["charts"]
    assert 'data-series="test accuracy (whole split)" data-points="1"' in charts
    files.write_status({**files.read_status(), "state": "done", "result": {"val_acc": 0.5}})
    assert (
        json.loads(get(f"{url}/job/train-a.json")[2])["final"] is True
    )  # the script stops polling
    assert get(f"{url}/job/nope")[0] == 404
    prep = write_job(
        root,
        "prepare-b",
        kind="prepare",
        state="running",
        progress={"event": "convert", "done": 3, "total": 6},
    )
    prep.write_record(
        {
            "job": "prepare-b",
            "attempt": 1,
            "kind": "prepare",
            "name": "p",
            "root": str(root),
            "job_dir": str(prep.dir),
            "options": {"out": "/x/cifar10.zarr", "val": 1000},
        },
        "",
    )
    status, _, html = get(f"{url}/job/prepare-b")
    assert (
        status == 200
        and "3/6" in html
        and "convert" in html
        and "<code>/x/cifar10.zarr</code>" in html
    )


def test_run_pages_only_for_runs_it_lists_and_their_pictures(root, page, tmp_path):
    client, url = page
    run = write_run(
        root / "runs" / "plain",
        4,
        total=4,
        done=True,
        summary={"test_acc": 0.9067, "tta": "flip-translate"},
    )
    (run / "filters.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    status, _, html = get(f"{url}/run?dir={quote(str(run), safe='')}")
    assert status == 200 and 'data-points="4"' in html and "run/filters.png?dir=" in html
    # the test split's accuracy, scored once at the end, with its test-time augmentation
    assert "90.7% (flip-translate) test accuracy" in text(html)
    status, ctype, _ = get(f"{url}/run/filters.png?dir={quote(str(run), safe='')}")
    assert status == 200 and ctype == "image/png"
    secret = write_run(tmp_path / "elsewhere" / "run", 2)
    assert get(f"{url}/run?dir={quote(str(secret), safe='')}")[0] == 404
    assert get(f"{url}/run/filters.png?dir=%2Fetc")[0] == 404
    assert get(f"{url}/run?dir=relative/path")[0] == 400
    # announced by `convpipe train` (pipeline.dashboard.announce_run): listed and shown
    from pipeline.dashboard import announce_run

    link = announce_run(client, secret)
    assert link is not None and link.endswith(f"/convpipe/run?dir={quote(str(secret), safe='')}")
    wait_until(
        lambda: get(f"{url}/run?dir={quote(str(secret), safe='')}")[0] == 200,
        timeout=20,
        what="the announced run's page",
    )
    assert f'data-run="{secret}"' in get(url)[2]


def test_the_page_is_read_only(root, page):
    client, url = page
    run = write_run(root / "runs" / "train-a", 3)
    write_job(root, "train-a", state="failed", resumable=True, run_dir=str(run), reason="x")

    def tree():
        return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")}

    before = tree()
    for path in (
        "",
        ".json",
        "/job/train-a",
        "/job/train-a.json",
        f"/run?dir={quote(str(run), safe='')}",
    ):
        assert get(url + path)[0] == 200
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        req = urllib.request.Request(f"{url}/job/train-a", data=b"{}", method=method)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=20)
        assert err.value.code == 405, method
    assert tree() == before
    assert (
        "default-src 'none'"
        in urllib.request.urlopen(url, timeout=20).headers["Content-Security-Policy"]
    )


def test_under_a_dashboard_prefix(root):
    """`dask scheduler --dashboard-prefix /dask`: the page is under the prefix, its links
    relative."""
    with local_cluster(
        0, scheduler_kwargs={"http_prefix": "/dask", "preload": ["pipeline.dashboard"]}
    ) as cluster:
        port = cluster.scheduler.http_server.port
        status, _, html = get(f"http://127.0.0.1:{port}/dask/convpipe")
        assert status == 200 and 'href="status"' in html and 'data-poll="convpipe.json"' in html
        assert get(f"http://127.0.0.1:{port}/dask/convpipe.json")[0] == 200
        assert get(f"http://127.0.0.1:{port}/convpipe")[0] == 404


def test_behind_the_dashboards_tls(root, tmp_path):
    """With TLS on the dashboard (distributed.scheduler.dashboard.tls.*), the page is served over
    the same TLS only: https with the cluster's CA gets it, plain http gets nothing."""
    pytest.importorskip("cryptography")
    import ssl

    import dask

    from pipeline.cluster.security import make_certificates

    certs = make_certificates(tmp_path / "certs")
    tls = {
        "distributed.scheduler.dashboard.tls.cert": str(certs["scheduler"]),
        "distributed.scheduler.dashboard.tls.key": str(certs["scheduler-key"]),
        "distributed.scheduler.dashboard.tls.ca-file": str(certs["ca"]),
    }
    with (
        dask.config.set(tls),
        local_cluster(0, scheduler_kwargs={"preload": ["pipeline.dashboard"]}) as cluster,
    ):
        port = cluster.scheduler.http_server.port
        context = ssl.create_default_context(cafile=str(certs["ca"]))
        with urllib.request.urlopen(
            f"https://127.0.0.1:{port}/convpipe", timeout=20, context=context
        ) as r:
            assert r.status == 200 and b"<title>convpipe: jobs and runs</title>" in r.read()
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/convpipe", timeout=20)


def test_a_done_jobs_result_is_rounded_as_people_read_it():
    from pipeline.dashboard.render import job_detail

    status = {
        "job": "train-1",
        "state": "done",
        "result": {"train_acc": 0.51234567, "images_per_s": 1496.4468, "steps": 20, "run_dir": "x"},
    }
    assert job_detail(status) == "train_acc 0.5123, images_per_s 1,496, steps 20"
