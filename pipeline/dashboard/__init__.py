"""convpipe's page on the Dask dashboard: jobs and runs as they train, read-only.

Served by the scheduler's own web server, on the dashboard's port and behind its TLS when the
dashboard has TLS (``distributed.scheduler.dashboard.tls.*``)::

    http://HOST:8787/convpipe                  every job (kind, name, state, step/total, loss,
                                               images/s, ETA, accuracies, why it failed, the
                                               command that resumes it) and every run
    http://HOST:8787/convpipe/job/<id>         one job: its curves as it trains, settings,
                                               step-time breakdown, log
    http://HOST:8787/convpipe/run?dir=<path>   one run directory of `convpipe train`

Where it is registered:

- the embedded cluster (:func:`pipeline.cluster.connect`) preloads this module into its
  scheduler;
- any other scheduler with Dask's standard extension point::

      dask scheduler --preload pipeline.dashboard          (docker-compose.yml does)

It reads the data root ``$CONVPIPE_DATA``, else ``data`` in the scheduler's working directory
(the jobs' records ``ROOT/jobs/<id>/`` and runs ``ROOT/runs/<id>/``), the ``runs/`` folder
there (where `convpipe train` writes by default), the scheduler's job events, and the run
directories `convpipe train` announces to the scheduler (:func:`announce_run`). It changes
nothing: GET only.

What it serves from disk: regular files inside ``ROOT/jobs``, ``ROOT/runs`` and the run
folders (and the run directories of `convpipe train` runs in the scheduler's own process),
opened without following a link; a run directory only if it holds ``config.json``. A path in
a status file or a scheduler event (any Dask client can post one) outside those folders is not
read (:mod:`pipeline.dashboard.files`).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from urllib.parse import quote

from pipeline.dashboard.data import RUNS_TOPIC, Board
from pipeline.dashboard.handlers import Page
from pipeline.data.paths import data_root

logger = logging.getLogger("pipeline.dashboard")

#: the key of the page in ``scheduler.extensions`` (also how a client tells the page is there)
EXTENSION = "convpipe-page"
#: the page's path under the dashboard's prefix
PATH = "convpipe"


def dask_setup(scheduler) -> None:
    """Dask's preload hook: ``dask scheduler --preload pipeline.dashboard``."""
    install(scheduler)


def install(scheduler, root: str | Path | None = None, run_folders: list[str | Path] | None = None):
    """Add the page's handlers to ``scheduler``'s web server; returns the page (the one there
    if it was installed already), or None when the scheduler serves no HTTP.

    ``root``: the data root (default ``$CONVPIPE_DATA`` or ``data``); ``run_folders``: folders
    of run directories besides ``ROOT/runs`` (default ``runs``, `convpipe train`'s default),
    both relative to the scheduler's working directory.
    """
    page = scheduler.extensions.get(EXTENSION)
    if page is not None:
        return page
    app = getattr(scheduler, "http_application", None)
    if app is None:
        logger.warning(
            "convpipe page not installed: the scheduler serves no HTTP (no dashboard port)"
        )
        return None

    board = Board(
        Path(root) if root is not None else data_root(),
        ["runs"] if run_folders is None else run_folders,
    )
    page = Page(scheduler, board, http_prefix(app))
    app.add_handlers(r".*$", page.routes())
    scheduler.extensions[EXTENSION] = page
    server = getattr(scheduler, "http_server", None)
    if server is not None and getattr(server, "port", None):
        logger.info(
            "convpipe page at: :%s%s%s (data root %s)", server.port, page.prefix, PATH, board.root
        )
    return page


def http_prefix(app) -> str:
    """The dashboard's URL prefix (``dask scheduler --dashboard-prefix``), found from the
    route of its ``health`` handler; "/" when there is none."""
    for rule in getattr(getattr(app, "wildcard_router", None), "rules", []):
        pattern = getattr(getattr(rule, "matcher", None), "regex", None)
        m = re.fullmatch(r"(/(?:.*/)?)health\$?", pattern.pattern) if pattern is not None else None
        if m:
            return m.group(1)
    return "/"


def page_link(dashboard_link: str, *, job: str | None = None, run_dir: str | None = None) -> str:
    """The page's URL from the dashboard's (``client.dashboard_link``, ``.../status``): the
    overview, or one job's or one run's page."""
    root = (
        dashboard_link[: -len("status")]
        if dashboard_link.endswith("/status")
        else dashboard_link.rstrip("/") + "/"
    )
    if job is not None:
        return f"{root}{PATH}/job/{quote(job, safe='')}"
    if run_dir is not None:
        return f"{root}{PATH}/run?dir={quote(str(run_dir), safe='')}"
    return root + PATH


def has_page(client) -> bool:
    """Whether the scheduler of ``client`` serves the page (an embedded one: checked in this
    process; another: asked, which fails, hence False, where convpipe is not installed)."""
    scheduler = getattr(getattr(client, "cluster", None), "scheduler", None)
    if scheduler is not None and hasattr(scheduler, "extensions"):
        return EXTENSION in scheduler.extensions
    try:
        return bool(client.run_on_scheduler(_scheduler_has_page))
    except Exception:  # noqa: BLE001 - whatever the reason (no convpipe there, old Dask), no page to link
        return False


def _scheduler_has_page(dask_scheduler=None) -> bool:
    return EXTENSION in dask_scheduler.extensions


def announce_run(client, run_dir: str | Path) -> str | None:
    """Tell the scheduler of ``client`` that a run trains in ``run_dir`` (an event on the topic
    :data:`pipeline.dashboard.data.RUNS_TOPIC`), so that its page lists it; returns the run's
    page URL, or None when that scheduler has no page or no dashboard.

    A scheduler in this process (the embedded cluster) shows the run wherever it is; another
    one only if ``run_dir`` lies in its page's folders (an event could come from any client)."""
    link = getattr(client, "dashboard_link", None)
    if not link or not has_page(client):
        return None
    path = str(Path(run_dir).absolute())
    scheduler = getattr(getattr(client, "cluster", None), "scheduler", None)
    page = getattr(scheduler, "extensions", {}).get(EXTENSION)
    if page is not None:  # in this process: this process's own run
        page.board.add_run(path)
    client.log_event(RUNS_TOPIC, {"run_dir": path})
    return page_link(link, run_dir=path)
