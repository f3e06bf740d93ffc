"""What the convpipe page will not do, whoever wrote the files and events it reads: follow a link
or leave its folders (the data root's jobs/ and runs/, the run folders), put a value in its HTML
unescaped, run an inline script or apply an inline style, grow its caches without bound, or go
through the scheduler's events on the scheduler's event loop. Real files, links and FIFOs in
tmp_path; HTTP where it is the page's answer that matters."""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
import urllib.request
from html import escape
from pathlib import Path
from urllib.parse import quote

import pytest

from pipeline.dashboard import render
from pipeline.dashboard.data import CACHED_RUNS, RUNS_TOPIC, Board, RunReader, SchedulerView
from pipeline.dashboard.files import Folders, NotServed
from pipeline.jobs.records import REGISTRY_TOPIC, job_topic
from pipeline.jobs.sweep import SweepState
from tests.web.test_page import get, html_showing, row, text, write_job, write_run
from tests.web.test_sweep_page import fake_sweep

SECRET = "BEGIN PRIVATE KEY scheduler-key-material"
XSS = "<img src=x onerror=alert(1)>"


@pytest.fixture
def secret(tmp_path) -> Path:
    """A private file outside the data root (the scheduler's TLS key, say)."""
    certs = tmp_path / "certs"
    certs.mkdir()
    key = certs / "scheduler-key.pem"
    key.write_text(f"-----{SECRET}-----\n")
    return key


def run_url(url: str, path) -> str:
    return f"{url}/run?dir={quote(str(path), safe='')}"


def registered(job: str, **fields) -> dict:
    """A job's submission event as pipeline.jobs.client.submit logs it."""
    return {
        "type": "submitted",
        "job": job,
        "attempt": 1,
        "kind": "train",
        "name": "from-events",
        "root": "/elsewhere",
        "options": {},
        "submitted": "2026-02-01T00:00:00Z",
        "by": "someone",
        "key": f"convpipe-job-{job}-1",
        **fields,
    }


# ---- links and folders ---------------------------------------------------------------------------


def test_a_jobs_log_linked_to_a_private_file_is_not_shown(root, page, secret):
    client, url = page
    files = write_job(root, "train-a", state="queued")
    files.log_path.unlink()
    files.log_path.symlink_to(secret)
    assert SECRET in files.log_path.read_text()  # what the page would show if it followed it

    status, _, html = get(f"{url}/job/train-a")
    assert status == 200 and 'id="log"' in html and SECRET not in html
    overview = get(url)[2]  # a queued job's row shows its last log line
    assert 'data-job="train-a"' in overview and SECRET not in overview


def test_a_job_directory_from_the_events_outside_the_data_root_is_not_read(page, secret):
    """A job_dir (and its spec.json) named by a scheduler event, which any client can post, is
    read only inside ROOT/jobs: the log comes from the job's events instead."""
    client, url = page
    (secret.parent / "job.log").write_text(f"{SECRET}\n")
    (secret.parent / "spec.json").write_text(
        json.dumps({"options": {"password": SECRET}, "job": "train-e"})
    )
    client.log_event(REGISTRY_TOPIC, registered("train-e", job_dir=str(secret.parent)))
    client.log_event(
        job_topic("train-e"),
        {"id": "1", "job": "train-e", "attempt": 1, "type": "log", "line": "from the events"},
    )
    html = html_showing(f"{url}/job/train-e", "from the events", "the job's log from its events")
    assert SECRET not in html


def test_a_linked_picture_or_settings_file_is_not_served(root, page, secret, tmp_path):
    client, url = page
    run = write_run(root / "runs" / "plain", 4, total=4, done=True)
    picture = tmp_path / "elsewhere.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n" + SECRET.encode())
    (run / "curves.png").symlink_to(picture)
    (run / "filters.png").write_bytes(b"\x89PNG\r\n\x1a\nreal")

    status, _, html = get(run_url(url, run))
    assert status == 200 and "run/filters.png?dir=" in html and "run/curves.png?dir=" not in html
    assert get(f"{url}/run/filters.png?dir={quote(str(run), safe='')}")[2].endswith(b"real")
    assert get(f"{url}/run/curves.png?dir={quote(str(run), safe='')}")[0] == 404

    linked = write_run(root / "runs" / "linked-config", 2)
    (tmp_path / "config.json").write_text(json.dumps({"password": SECRET}))
    (linked / "config.json").unlink()
    (linked / "config.json").symlink_to(tmp_path / "config.json")
    assert get(run_url(url, linked))[0] == 404  # no config.json of its own: not a run
    assert SECRET not in get(url)[2]


def test_a_run_directory_outside_the_folders_is_not_shown(root, page, tmp_path):
    """Not through a link in runs/, a path with .., a job's run_dir, nor an event of another
    client; and not a directory without config.json."""
    client, url = page
    outside = write_run(tmp_path / "outside", 3, name_settings={"password": SECRET})
    (root / "runs").mkdir()
    (root / "runs" / "evil").symlink_to(outside, target_is_directory=True)
    write_job(root, "train-x", state="running", run_dir=str(outside))
    (root / "runs" / "no-config").mkdir()
    (root / "runs" / "no-config" / "metrics.jsonl").write_text('{"kind": "step", "step": 1}\n')

    for path in (
        root / "runs" / "evil",
        f"{root}/runs/../../outside",
        outside,
        root / "runs" / "no-config",
    ):
        status, _, html = get(run_url(url, path))
        assert status == 404 and SECRET not in html, path
    assert SECRET not in get(f"{url}/job/train-x")[2]

    # announced by an event (a client of a remote scheduler: no add_run in this process)
    nested = write_run(root / "runs" / "group" / "nested", 2)
    client.log_event(RUNS_TOPIC, {"run_dir": str(outside)})
    client.log_event(RUNS_TOPIC, {"run_dir": str(nested)})
    html = html_showing(url, f'data-run="{nested}"', "the announced run inside the run folders")
    assert SECRET not in html and str(outside) not in html
    assert get(run_url(url, outside))[0] == 404


def test_a_fifo_in_place_of_a_file_does_not_block_the_page(tmp_path):
    """Opening a FIFO for reading waits for a writer: the page's threads would hang on one."""
    root = tmp_path / "data"
    job_dir = root / "jobs" / "train-f"
    job_dir.mkdir(parents=True)
    os.mkfifo(job_dir / "job.log")
    board = Board(root)
    out = []
    reader = threading.Thread(
        target=lambda: out.append(board.job_log({"job_dir": str(job_dir)}, SchedulerView())),
        daemon=True,
    )
    reader.start()
    reader.join(timeout=20)
    assert out == [[]], "reading a FIFO blocked"
    with pytest.raises(NotServed, match="not a regular file"):
        Folders([root]).read(job_dir / "job.log")


def test_files_are_read_only_inside_the_folders_and_not_through_links(tmp_path, secret):
    area = tmp_path / "area"
    (area / "run").mkdir(parents=True)
    (area / "run" / "a.txt").write_text("inside")
    (area / "link.txt").symlink_to(secret)
    (area / "dir-link").symlink_to(secret.parent, target_is_directory=True)
    files = Folders([area])
    assert files.read(area / "run" / ".." / "run" / "a.txt")[0] == b"inside"
    with pytest.raises(NotServed, match="a symbolic link"):
        files.read(area / "link.txt")
    with pytest.raises(NotServed, match="outside the folders"):
        files.read(area / "dir-link" / secret.name)
    with pytest.raises(NotServed, match="outside the folders"):
        files.read(area / ".." / "certs" / secret.name)
    with pytest.raises(FileNotFoundError):
        files.read(area / "run" / "missing.txt")
    assert files.stat(area / "run") is None  # a directory is no file to serve


# ---- escaping and the script ---------------------------------------------------------------------


def test_values_from_status_files_events_and_sweeps_are_escaped(root, page):
    client, url = page
    write_job(
        root,
        "prepare-p",
        kind="prepare",
        state="running",
        progress={"event": "convert", "done": XSS},  # without a total: shown as it was
    )
    client.log_event(REGISTRY_TOPIC, registered("prepare-q", kind="prepare"))
    client.log_event(
        job_topic("prepare-q"),
        {
            "id": "1",
            "job": "prepare-q",
            "attempt": 1,
            "type": "state",
            "state": "queued",
            "progress": {"done": 1, "total": XSS},
        },
    )
    sweep_dir = fake_sweep(_mkdir(root / "runs" / "sweep-s"))
    state = SweepState.load(sweep_dir)
    state.trials[0].steps = XSS
    state.save(sweep_dir)
    write_job(root, "sweep-s", kind="sweep", state="running", run_dir=str(sweep_dir))
    run = write_run(root / "runs" / "plain", 3, done=True)
    (run / "summary.json").write_text(json.dumps({"steps": XSS, "step_breakdown_s": [XSS]}))

    overview = html_showing(url, 'data-job="prepare-q"', "the scheduler's job on the page")
    for html in (
        overview,
        get(f"{url}/job/prepare-p")[2],
        get(f"{url}/job/prepare-q")[2],
        get(f"{url}/job/sweep-s")[2],
        get(run_url(url, run))[2],
    ):
        assert XSS not in html and "onerror" not in html.replace(escape(XSS), "")
    assert "&lt;img src=x onerror=alert(1)&gt;" in text(row(overview, "data-job", "prepare-p"))
    assert "&lt;img" in row(overview, "data-job", "prepare-q")
    assert "&lt;img" in get(f"{url}/job/sweep-s")[2]


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def test_the_page_runs_no_inline_script(root, page):
    """Its one script comes from its own handler, and the Content-Security-Policy allows no
    other: an injected inline script would not run."""
    client, url = page
    write_job(root, "train-a", state="queued")
    for path in ("", "/job/train-a", "/job/nope"):
        status, _, html = get(url + path)
        scripts = re.findall(r"<script[^>]*>", html)
        assert scripts and all(" src=" in s for s in scripts), scripts
        assert re.findall(r"<script[^>]*>(.*?)</script>", html, re.S) == [""]
    with urllib.request.urlopen(url, timeout=20) as r:
        csp = dict(d.strip().split(" ", 1) for d in r.headers["Content-Security-Policy"].split(";"))
    assert csp["script-src"] == "'self'" and "default-src" in csp
    src = re.search(r'<script src="([^"]+)"', get(f"{url}/job/train-a")[2]).group(1)
    assert src == "../../convpipe/static/page.js"
    status, ctype, js = get(f"{url}/static/page.js")
    assert status == 200 and ctype.startswith("text/javascript") and js == render.SCRIPT
    assert "fetch(src" in js


def test_the_page_has_no_inline_style(root, page):
    """Its one stylesheet comes from its own handler and the Content-Security-Policy allows no
    other: no <style> element, no style attribute (bars are SVG rectangles), no 'unsafe-inline'."""
    client, url = page
    write_job(root, "train-q", state="queued", progress={"step": 3, "total_steps": 10})
    run = write_run(root / "runs" / "plain", 3)  # a step/total bar and the step-time bars
    write_job(root, "train-r", state="running", run_dir=str(run))
    pages = {}
    for path in ("", ".json", "/job/train-q", "/job/train-r", "/job/train-r.json", "/job/nope"):
        pages[path] = get(url + path)[2]
    pages["run"] = get(run_url(url, run))[2]
    for path, html in pages.items():
        assert not re.search(r"<style", html, re.I), path
        assert not re.search(r"\sstyle\s*=", html, re.I), path
    assert row(pages[""], "data-job", "train-q").count('<svg class="bar"') == 1
    assert pages["/job/train-r"].count('<svg class="bar"') == 1 + 5  # step, and the 5 phases
    assert '<rect class="done" width="19.2"' in row(pages[""], "data-job", "train-q")  # 3/10
    with urllib.request.urlopen(url, timeout=20) as r:
        header = r.headers["Content-Security-Policy"]
    csp = dict(d.strip().split(" ", 1) for d in header.split(";"))
    assert "unsafe-inline" not in header and csp["style-src"] == "'self'", header
    links = re.findall(r"<link [^>]*>", pages["/job/train-q"])
    assert links == ['<link rel="stylesheet" href="../../convpipe/static/page.css">']
    status, ctype, css = get(f"{url}/static/page.css")
    assert status == 200 and ctype.startswith("text/css") and css == render.CSS
    assert "svg.bar .done{" in css


# ---- caches and the event loop -------------------------------------------------------------------


def test_the_run_cache_is_keyed_by_the_resolved_path_and_bounded(tmp_path):
    runs = tmp_path / "runs"
    run = write_run(runs / "x", 3)
    reader = RunReader(Folders([runs]))
    for i in range(CACHED_RUNS + 10):
        (runs / f"y{i}").mkdir()
        view = reader.read(f"{runs}/y{i}/../x")
        assert view.exists and view.path == str(run.resolve())
    assert reader.cached() == [str(run.resolve())]
    for i in range(CACHED_RUNS + 10):
        write_run(runs / f"r{i}", 1)
        reader.read(runs / f"r{i}")
    cached = reader.cached()
    assert len(cached) == CACHED_RUNS and cached[-1] == str(runs / f"r{CACHED_RUNS + 9}")


def test_the_jobs_are_worked_out_off_the_schedulers_event_loop(root, page, monkeypatch):
    """The page copies what it needs of the scheduler on its loop, then goes through every
    job's events in its own threads."""
    from pipeline.dashboard import data

    client, url = page
    calls = []

    def recording(real):
        def call(*args, **kwargs):
            try:
                asyncio.get_running_loop()
                calls.append((real.__name__, "on the event loop"))
            except RuntimeError:
                calls.append((real.__name__, "in a thread"))
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(data, "list_jobs", recording(data.list_jobs))
    monkeypatch.setattr(data, "job_status", recording(data.job_status))
    client.log_event(REGISTRY_TOPIC, registered("train-z", job_dir="/elsewhere/jobs/train-z"))
    html_showing(url, 'data-job="train-z"', "the scheduler's job on the page")
    assert get(f"{url}/job/train-z")[0] == 200
    assert {name for name, _ in calls} == {"list_jobs", "job_status"}
    assert {where for _, where in calls} == {"in a thread"}, calls


def test_a_job_page_adds_no_topic_to_the_schedulers_events(page):
    """The scheduler makes a topic for any name asked of it: a job page's URL, anyone's to
    choose, must not make one each."""
    client, url = page
    topics = client.cluster.scheduler._broker._topics  # the only place empty topics show
    for i in range(5):
        assert get(f"{url}/job/nope-{i}")[0] == 404
    assert not [t for t in topics if t.startswith(job_topic("nope-"))]
