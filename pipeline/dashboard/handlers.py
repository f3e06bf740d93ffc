"""The page's HTTP handlers on the scheduler's web server (tornado, the dashboard's port).

GET only: tornado answers any other method with 405. Each request copies what it needs of the
scheduler on its event loop (references to events, the workers, a few task states:
:class:`SchedulerCopy`), then works out the jobs from that copy and reads files in a small
thread pool of its own, so the scheduler's loop neither goes through the events nor waits on
a disk.

    {prefix}convpipe                     jobs and runs          {prefix}convpipe.json
    {prefix}convpipe/job/<id>            one job                {prefix}convpipe/job/<id>.json
    {prefix}convpipe/run?dir=<path>      one run directory      {prefix}convpipe/run.json?dir=<path>
    {prefix}convpipe/static/page.js      the pages' script (the only script they run)
    {prefix}convpipe/static/page.css     the pages' stylesheet (the only style they use)

Every value from a file or an event is HTML-escaped where it is put in a page (render.py), and
the Content-Security-Policy lets a page run no script and apply no style but those two, from
this server (no inline script, no inline style: an injected one would not apply).
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from html import escape
from pathlib import Path

from tornado import web

from pipeline.dashboard import render
from pipeline.dashboard.data import Board, SchedulerCopy, SchedulerView

JOB_ID = r"[A-Za-z0-9][A-Za-z0-9_.-]*?"
#: Content-Security-Policy: its stylesheet and script from this server (nothing inline),
#: fetches to itself, nothing else
CSP = (
    "default-src 'none'; style-src 'self'; script-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'self'"
)


class Page:
    """The page's state on one scheduler: where it reads, its thread pool, its URL prefix."""

    def __init__(self, scheduler, board: Board, prefix: str = "/"):
        self.scheduler = scheduler
        self.board = board
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="convpipe-page")

    def routes(self) -> list[tuple]:
        p = self.prefix
        kw = {"page": self}
        return [
            (rf"{p}convpipe(\.json)?", Overview, kw),
            (rf"{p}convpipe/", web.RedirectHandler, {"url": "../convpipe"}),
            (rf"{p}convpipe/job/({JOB_ID})(\.json)?", Job, kw),
            (rf"{p}convpipe/run(\.json)?", Run, kw),
            (rf"{p}convpipe/run/(curves|filters)\.png", Picture, kw),
            (rf"{p}convpipe/{render.SCRIPT_PATH}", Script, kw),
            (rf"{p}convpipe/{render.STYLE_PATH}", Stylesheet, kw),
        ]

    async def off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def teardown(self) -> None:
        """Called by the scheduler as it closes (it tears down its extensions)."""
        self.pool.shutdown(wait=False, cancel_futures=True)


class _Handler(web.RequestHandler):
    def initialize(self, page: Page):
        self.page = page

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Content-Security-Policy", CSP)
        self.set_header("Referrer-Policy", "no-referrer")

    @property
    def base(self) -> str:
        """From this page to the dashboard's root: "" for convpipe, "../" for convpipe/run, ..."""
        rest = self.request.path[len(self.page.prefix) :]
        return "../" * rest.count("/")

    def scheduler_copy(self) -> SchedulerCopy | None:
        """What the page needs of the scheduler, copied now (on its event loop)."""
        scheduler = self.page.scheduler
        return None if scheduler is None else SchedulerCopy(scheduler)

    def answer(
        self, as_json: bool, title: str, fragments: dict[str, str], body: str, final: bool
    ) -> None:
        if as_json:
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps({"html": fragments, "final": final}))
        else:
            poll = None if final else self._json_twin()
            self.set_header("Content-Type", "text/html; charset=utf-8")
            self.finish(render.page(title, self.base, body, str(self.page.board.root), poll))

    def _json_twin(self) -> str:
        """The relative URL of this page's .json twin (same depth: the same ``base``)."""
        last = self.request.path.rsplit("/", 1)[-1]
        return f"{last}.json" + (f"?{self.request.query}" if self.request.query else "")

    def not_found(self, text: str, status: int = 404) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        body = (
            f"<h1>Not found</h1><p>{escape(text)}</p><p>"
            f'<a href="{self.base}convpipe">All jobs and runs</a></p>'
        )
        self.finish(
            render.page("convpipe: not found", self.base, body, str(self.page.board.root), None)
        )


class Overview(_Handler):
    async def get(self, as_json: str | None = None) -> None:
        copy = self.scheduler_copy()
        board = self.page.board
        listing = await self.page.off_loop(lambda: board.listing(SchedulerView.of(copy)))
        fragments = render.overview_fragments(listing, self.base)
        self.answer(
            bool(as_json),
            "convpipe: jobs and runs",
            fragments,
            render.overview_body(fragments),
            False,
        )


class Job(_Handler):
    async def get(self, job_id: str, as_json: str | None = None) -> None:
        copy = self.scheduler_copy()
        board = self.page.board

        def read():
            view = SchedulerView.of(copy, job_id)
            status = board.job(job_id, view)
            if not status:
                return None
            sweep = render.sweep_section(board.sweep(status))
            return status, board.run_of(status), board.job_log(status, view), sweep

        found = await self.page.off_loop(read)
        if found is None:
            return self.not_found(f"no job {job_id} under {board.root}/jobs or on this scheduler")
        status, run, log, sweep = found
        fragments = render.job_fragments(status, run, log, self.base, sweep)
        title = f"job {job_id}"
        self.answer(
            bool(as_json),
            f"convpipe: {title}",
            fragments,
            render.detail_body(title, fragments, self.base),
            status.get("state") in render.TERMINAL,
        )


class Run(_Handler):
    async def get(self, as_json: str | None = None) -> None:
        path = self.get_query_argument("dir", "")
        if not path or not Path(path).is_absolute():
            return self.not_found(
                f"give the run directory as ?dir=ABSOLUTE_PATH, got {path!r}", 400
            )
        board = self.page.board
        run = await self.page.off_loop(board.reader.read, path)
        if not run.exists:
            return self.not_found(
                f"{path} is not a run directory this page shows (one holding config.json under "
                f"{', '.join(map(str, board.run_folders))}, or one `convpipe train` ran on "
                "this cluster)"
            )
        fragments = render.run_fragments(run, self.base)
        title = f"run {run.name}"
        self.answer(
            bool(as_json),
            f"convpipe: {title}",
            fragments,
            render.detail_body(title, fragments, self.base),
            run.finished,
        )


class Picture(_Handler):
    """curves.png or filters.png of a run the page shows (nothing else is served from disk)."""

    async def get(self, name: str) -> None:
        path = self.get_query_argument("dir", "")
        data = None
        if path and Path(path).is_absolute():
            data = await self.page.off_loop(self.page.board.picture, path, f"{name}.png")
        if data is None:
            return self.not_found(f"no {name}.png of a run this page shows at {path!r}")
        self.set_header("Content-Type", "image/png")
        self.finish(data)


class Script(_Handler):
    """The pages' script (:data:`render.SCRIPT`): it polls a page's JSON twin."""

    def get(self) -> None:
        self.set_header("Content-Type", "text/javascript; charset=utf-8")
        self.finish(render.SCRIPT)


class Stylesheet(_Handler):
    """The pages' stylesheet (:data:`render.CSS`)."""

    def get(self) -> None:
        self.set_header("Content-Type", "text/css; charset=utf-8")
        self.finish(render.CSS)
