"""The convpipe page in a real browser: headless Chromium loads it from the embedded cluster's
dashboard while a training job runs there, and the rendered DOM shows the job and a loss
curve that grew between two loads. The page's script polls its JSON twin and swaps fragments
in (Chromium's virtual time runs its timers), and the console shows no Content-Security-Policy
violation (no inline style or script, before or after the swaps). A screenshot of the job page
is saved (to $CONVPIPE_SCREENSHOTS too when set, e.g. for docs/convpipe-page.png).

Needs Debian's ``chromium`` (.ci/run installs it); skipped without it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers.training import make_store
from tests.helpers.wait import wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium is not installed "
    "(apt-get install chromium; CI's .ci/run installs it)",
)


def chromium(tmp_path: Path, *args: str, timeout: float = 120) -> str:
    return _run(tmp_path, *args, timeout=timeout).stdout


def _run(tmp_path: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"
    r = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def csp_violations(tmp_path: Path, url: str) -> list[str]:
    """The console messages about the Content-Security-Policy of ``url``, loaded with its script
    run for 7 virtual seconds (its polls swap fragments in)."""
    logging = ("--enable-logging=stderr", "--v=0")
    r = _run(tmp_path, *logging, "--virtual-time-budget=7000", "--dump-dom", url)
    return [
        line
        for line in r.stderr.splitlines()
        if ":CONSOLE" in line and "Content Security Policy" in line
    ]


def test_the_console_check_sees_an_inline_style_refused(tmp_path):
    """What the check below looks for is there when a page breaks its policy."""
    page = tmp_path / "inline.html"
    page.write_text(
        '<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; style-src 'self'\"></head>"
        '<body><p style="color:red">x</p></body></html>'
    )
    (found,) = csp_violations(tmp_path, page.as_uri())
    assert "inline style" in found


def dump_dom(tmp_path: Path, url: str, *extra: str) -> str:
    return chromium(tmp_path, *extra, "--dump-dom", url)


def loss_points(dom: str) -> int:
    m = re.search(r'<path [^>]*data-series="loss of each step" data-points="(\d+)"', dom)
    assert m, "no loss curve in the rendered page"
    return int(m.group(1))


def steps_written(run_dir: Path) -> int:
    try:
        return sum(
            1
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"kind": "step"' in line
        )
    except FileNotFoundError:
        return 0


@pytest.fixture
def training_job(tmp_path, monkeypatch):
    """A train job running on an embedded cluster of 2 worker processes (as `convpipe submit`
    without a scheduler makes it), long enough to outlast the test; cancelled at the end.
    Yields (client, page URL, job id, run directory)."""
    from pipeline.cluster import worker_cluster
    from pipeline.dashboard import page_link
    from pipeline.jobs import client as job_client
    from pipeline.jobs.spec import spec_from_table

    root = tmp_path / "data"
    monkeypatch.setenv("CONVPIPE_DATA", str(root))
    monkeypatch.chdir(tmp_path)
    store = make_store(tmp_path / "store")
    spec = spec_from_table(
        {
            "job": "train",
            "name": "browser-test",
            "root": str(root),
            "data": str(store),
            "steps": 20000,
            "batch-size": 64,
            "shard-size": 16,
            "num-filters": 4,
            "filter-size": 3,
            "hidden-dim": 16,
            "weight-scale": 1e-2,
            "lr": 1e-2,
            "checkpoint-every": 5000,
            "train-acc-samples": 64,
            "eval-every": 10,
            "eval-samples": 64,
        },
        default_name="x",
    )
    with worker_cluster(None, None, 2, 1) as client:
        record = job_client.submit(client, spec)
        try:
            yield client, page_link(client.dashboard_link), record["job"], Path(record["run_dir"])
        finally:
            if job_client.job_status(client, record["job"])["state"] not in (
                "cancelled",
                "done",
                "failed",
            ):
                job_client.cancel(client, record["job"])
            wait_until(
                lambda: (
                    job_client.job_status(client, record["job"])["state"]
                    in ("cancelled", "done", "failed")
                ),
                timeout=120,
                what="the job's end after cancel",
            )


def test_chromium_shows_the_running_job_and_its_growing_curve(training_job, tmp_path):
    client, url, job, run_dir = training_job
    wait_until(lambda: steps_written(run_dir) >= 5, timeout=180, what="5 training steps")

    overview = dump_dom(tmp_path, url)
    row = re.search(rf'<tr class="job" data-job="{re.escape(job)}">(.*?)</tr>', overview, re.S)
    assert row, "the job's row is not in the rendered overview"
    assert "running" in row.group(1) and "browser-test" in row.group(1) and "/20000" in row.group(1)

    page = f"{url}/job/{job}"
    first = loss_points(dump_dom(tmp_path, page))
    assert first >= 5
    wait_until(lambda: steps_written(run_dir) >= first + 5, timeout=180, what="5 more steps")
    second_dom = dump_dom(tmp_path, page)
    second = loss_points(second_dom)
    assert second >= first + 5, (first, second)
    assert 'data-series="val accuracy"' in second_dom and 'href="../../tasks"' in second_dom

    # the page's script: it fetched the JSON twin and swapped the fragments in, more than once
    live = dump_dom(tmp_path, page, "--virtual-time-budget=7000")
    polls = re.search(r'<body[^>]*data-polls="(\d+)"', live)
    assert polls and int(polls.group(1)) >= 2, re.search(r"<body[^>]*>", live).group(0)
    assert loss_points(live) >= second
    for address in (url, page):  # no inline style or script refused, before or after the polls
        assert csp_violations(tmp_path, address) == [], address

    shot = tmp_path / "convpipe-page.png"
    chromium(tmp_path, "--window-size=1280,1100", "--hide-scrollbars", f"--screenshot={shot}", page)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    if os.environ.get("CONVPIPE_SCREENSHOTS"):
        out = Path(os.environ["CONVPIPE_SCREENSHOTS"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, out / "convpipe-page.png")
        overview_shot = out / "convpipe-overview.png"
        chromium(
            tmp_path,
            "--window-size=1280,500",
            "--hide-scrollbars",
            f"--screenshot={overview_shot}",
            url,
        )
    print(f"screenshot: {shot}")
