"""The convpipe page as HTML: whole pages, and the fragments the page's script swaps in.

Every page is complete on its own (server-rendered tables and SVG charts: it reads fine with
scripts off and in ``chromium --dump-dom``); a few lines of script (:data:`SCRIPT`, served at
``convpipe/static/page.js``) fetch the page's ``.json`` twin every :data:`POLL_MS` and replace
the fragments whose ids it names, until the job or run has ended. The stylesheet (:data:`CSS`)
is served at ``convpipe/static/page.css``: the pages hold no inline script and no inline style,
not even a ``style`` attribute (a bar is an SVG rectangle of a width). ``base`` is the relative
path from a page to the dashboard's root (``""``, ``"../"``, ``"../../"``), so links work under
any ``--dashboard-prefix`` and behind a proxy.

Every value that comes from a file or a scheduler event goes through :func:`html.escape` where
it is put in the HTML (numbers are formatted as numbers, anything else escaped as text).
"""

from __future__ import annotations

import datetime as _dt
import time
from html import escape
from urllib.parse import quote

from pipeline.dashboard.data import Listing, RunView, SweepView
from pipeline.dashboard.svg import Series, line_chart
from pipeline.jobs.records import result_text

POLL_MS = 2000
TERMINAL = ("done", "failed", "cancelled")

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1f2328;\
background:#f6f8fa}
header{background:#fff;border-bottom:1px solid #d0d7de;padding:10px 24px;display:flex;gap:18px;\
align-items:center;flex-wrap:wrap}
header .brand{font-weight:700;font-size:18px;color:#ec5c25;text-decoration:none}
header nav a{margin-right:14px;color:#0969da;text-decoration:none}
header .root{margin-left:auto;color:#57606a;font-size:12px}
main{padding:16px 24px;max-width:1400px}
h1{font-size:20px;margin:6px 0 12px}h2{font-size:16px;margin:22px 0 8px}
table{border-collapse:collapse;background:#fff;border:1px solid #d0d7de;width:100%}
th,td{padding:6px 10px;border-bottom:1px solid #eaeef2;text-align:left;vertical-align:top;\
white-space:nowrap}
th{background:#f6f8fa;font-weight:600;font-size:12px;color:#57606a}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.detail{white-space:normal;min-width:180px;max-width:520px;font-size:12px;overflow-wrap:anywhere}
dl.facts{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:6px 18px;\
margin:0 0 10px;
background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:10px 14px}
dl.facts div{min-width:0}dl.facts div.wide{grid-column:1/-1}
dl.facts dt{font-size:11px;color:#57606a;text-transform:uppercase;letter-spacing:.03em}
dl.facts dd{margin:0;overflow-wrap:anywhere}
a{color:#0969da}code{background:#eff1f3;padding:1px 5px;border-radius:4px;font-size:12px}
.state{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600;\
color:#fff;background:#6e7781}
.state.running{background:#0969da}.state.done{background:#1a7f37}.state.failed{background:#cf222e}
.state.cancelled{background:#bc4c00}.state.queued,.state.stopped{background:#6e7781}
svg.bar{margin-left:6px;vertical-align:middle}svg.bar .track{fill:#eaeef2}\
svg.bar .done{fill:#0969da}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:8px 0}
.card{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:8px 14px;min-width:110px}
.card b{display:block;font-size:18px}.card span{font-size:12px;color:#57606a}
.charts{display:flex;gap:16px;flex-wrap:wrap}
svg.chart{background:#fff;border:1px solid #d0d7de;border-radius:6px}
svg .plot-area{fill:#fff;stroke:#8c959f}svg .grid{stroke:#eaeef2}\
svg .tick{font-size:11px;fill:#57606a}
svg .axis-label{font-size:12px;fill:#1f2328}\
svg .chart-title{font-size:13px;font-weight:600;fill:#1f2328}
svg .legend{font-size:12px;fill:#1f2328}svg .legend-box{fill:#fff;fill-opacity:.85;stroke:#eaeef2}
.pictures img{background:#fff;border:1px solid #d0d7de;border-radius:6px;max-width:100%;\
margin-right:12px}svg .empty{font-size:13px;fill:#8c959f}
.cols{display:flex;gap:24px;flex-wrap:wrap}.cols>div{flex:1;min-width:320px}
table.settings td:last-child{white-space:normal;overflow-wrap:anywhere}
pre.log{background:#fff;border:1px solid #d0d7de;padding:10px;font-size:12px;overflow:auto;\
max-height:360px}
.problems li{color:#cf222e}.muted{color:#57606a;font-size:12px}
"""

#: where the pages load :data:`CSS` and :data:`SCRIPT` from, under ``{prefix}convpipe/``
STYLE_PATH = "static/page.css"
SCRIPT_PATH = "static/page.js"
SCRIPT = """
(function(){const src=document.body.dataset.poll;if(!src)return;
async function poll(){let again=true;try{const r=await fetch(src,{cache:"no-store"});\
if(r.ok){const j=await r.json();
for(const [id,html] of Object.entries(j.html)){const el=document.getElementById(id);\
if(el)el.innerHTML=html;}
document.body.dataset.polls=1+(+document.body.dataset.polls||0);again=!j.final;}}catch(e){}
if(again)setTimeout(poll,%d);}
setTimeout(poll,%d);})();
""" % (POLL_MS, POLL_MS)  # noqa: UP031 (%-formatting: the script's braces stay single)


# ---- formatting ----------------------------------------------------------------------------------


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _num(v, fmt: str = "{:.4f}") -> str:
    return fmt.format(v) if _is_num(v) else "–"


def _pct(v) -> str:
    return _num(None if v is None else 100 * v, "{:.1f}%")


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def _state(state) -> str:
    state = escape(str(state or "unknown"))
    return f'<span class="state {state}">{state}</span>'


def _steps(step, total) -> str:
    """``step/total`` and a bar (``step`` alone without a total); values that are not numbers
    (a job's progress record says anything) shown as escaped text, without a bar."""
    if not step and not total:
        return "–"
    if not total:
        return escape(str(step))
    shown = f"{escape(str(step or 0))}/{escape(str(total))}"
    if not _is_num(step or 0) or not _is_num(total) or total <= 0:
        return shown
    return shown + bar((step or 0) / total)


#: a bar's size in pixels
BAR_WIDTH, BAR_HEIGHT = 64, 8


def bar(fraction: float) -> str:
    """A small bar filled to ``fraction`` (clipped to 0..1): an SVG rectangle of that width, so
    the page needs no ``style`` attribute."""
    fraction = min(1.0, max(0.0, fraction))
    return (
        f'<svg class="bar" width="{BAR_WIDTH}" height="{BAR_HEIGHT}" role="img" '
        f'aria-label="{100 * fraction:.0f}%"><rect class="track" width="{BAR_WIDTH}" '
        f'height="{BAR_HEIGHT}" rx="4"/><rect class="done" width="{BAR_WIDTH * fraction:.1f}" '
        f'height="{BAR_HEIGHT}" rx="4"/></svg>'
    )


def job_link(base: str, job_id: str) -> str:
    return f"{base}convpipe/job/{quote(job_id, safe='')}"


def run_link(base: str, path: str) -> str:
    return f"{base}convpipe/run?dir={quote(path, safe='')}"


# ---- page frame ----------------------------------------------------------------------------------


def page(title: str, base: str, body: str, root: str, poll: str | None) -> str:
    nav = (
        f'<nav><a href="{base}convpipe">Jobs and runs</a><a href="{base}status">Dask dashboard</a>'
        f'<a href="{base}tasks">Task stream</a><a href="{base}workers">Workers</a></nav>'
    )
    poll_attr = f' data-poll="{escape(poll)}"' if poll else ""
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<link rel="stylesheet" href="{base}convpipe/{STYLE_PATH}"></head>'
        f'<body{poll_attr}><header><a class="brand" href="{base}convpipe">convpipe</a>{nav}'
        f'<span class="root">data root {escape(root)} · read-only</span></header>'
        f'<main>{body}</main><script src="{base}convpipe/{SCRIPT_PATH}"></script></body></html>'
    )


def stamp() -> str:
    return f"updated {_dt.datetime.now().strftime('%H:%M:%S')}"


# ---- the overview --------------------------------------------------------------------------------


def overview_fragments(listing: Listing, base: str) -> dict[str, str]:
    return {
        "jobs": jobs_table(listing.jobs, base),
        "runs": runs_table(listing.runs, base),
        "problems": problems(listing.problems),
        "updated": stamp(),
    }


def overview_body(fragments: dict[str, str]) -> str:
    return (
        f'<h1>Jobs and runs <span class="muted" id="updated">{fragments["updated"]}</span></h1>'
        f'<h2>Jobs</h2><div id="jobs">{fragments["jobs"]}</div>'
        f'<h2>Runs of <code>convpipe train</code></h2><div id="runs">{fragments["runs"]}</div>'
        f'<div id="problems">{fragments["problems"]}</div>'
    )


_COLUMNS = ("Step", "Loss", "Images/s", "ETA", "Train acc", "Val acc")


def _progress_cells(run: RunView | None, status: dict | None = None) -> str:
    """Step, loss, images/s, ETA, train and val accuracy of a run (or a job's progress record)."""
    if run is None or not run.exists:
        p = _progress(status)
        step = p.get("done", p.get("step"))
        total = p.get("total", p.get("total_steps"))
        return (
            f'<td>{_steps(step, total)}</td><td class="num">{_num(p.get("loss"))}</td>'
            f'<td class="num">{_num(p.get("images_per_s"), "{:,.0f}")}</td><td>–</td>'
            f'<td class="num">{_pct(p.get("train_acc"))}</td>'
            f'<td class="num">{_pct(p.get("val_acc"))}</td>'
        )
    active = status is None or status.get("state") in ("running", None)
    eta = duration(run.eta_s()) if active else "–"
    return (
        f'<td>{_steps(run.step, run.total_steps)}</td><td class="num">{_num(run.loss)}</td>'
        f'<td class="num">{_num(run.images_per_s, "{:,.0f}")}</td><td class="num">{eta}</td>'
        f'<td class="num">{_pct(run.train_acc)}</td><td class="num">{_pct(run.val_acc)}</td>'
    )


def _progress(status: dict | None) -> dict:
    """A job's progress record (status.json, its events), {} when it has none or no object."""
    p = (status or {}).get("progress")
    return p if isinstance(p, dict) else {}


def resume_command(status: dict) -> str | None:
    if (
        status.get("state") in ("failed", "cancelled")
        and status.get("resumable")
        and status.get("kind") == "train"
    ):
        return f"convpipe resume {status.get('job')}"
    return None


def job_detail(status: dict) -> str:
    parts = []
    if status.get("state") in ("failed", "cancelled") and status.get("reason"):
        parts.append(escape(str(status["reason"])))
    resume = resume_command(status)
    if resume:
        parts.append(f"resume: <code>{escape(resume)}</code>")
    if status.get("state") == "done" and isinstance(status.get("result"), dict):
        parts.append(escape(result_text(status["result"], skip=("run_dir",))))
    shown = (
        isinstance(status.get("run"), RunView) and status["run"].exists
    )  # its numbers are in the row
    if status.get("state") in ("running", "queued") and status.get("last_line") and not shown:
        line = str(status["last_line"])
        parts.append(f'<span class="muted">{escape(line.split(" ", 1)[-1])}</span>')
    if status.get("cancel_requested") and status.get("state") not in TERMINAL:
        parts.append("cancel requested")
    return "<br>".join(parts)


def jobs_table(jobs: list[dict], base: str) -> str:
    if not jobs:
        return (
            '<p class="muted">No jobs yet: <code>convpipe submit '
            "jobs/train-three-layer.toml</code></p>"
        )
    head = "".join(f"<th>{c}</th>" for c in ("Job", "Kind", "Name", "State", *_COLUMNS, "Detail"))
    rows = []
    for s in jobs:
        jid = str(s.get("job", "?"))
        rows.append(
            f'<tr class="job" data-job="{escape(jid)}">'
            f'<td><a href="{job_link(base, jid)}">{escape(jid)}</a></td>'
            f"<td>{escape(str(s.get('kind', '?')))}</td><td>{escape(str(s.get('name', '')))}</td>"
            f"<td>{_state(s.get('state'))}</td>{_progress_cells(s.get('run'), s)}"
            f'<td class="detail">{job_detail(s)}</td></tr>'
        )
    return (
        f'<table id="jobs-table"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def run_detail(run: RunView, state: str) -> str:
    parts = [f'<span class="muted">{escape(run.path)}</span>']
    if state == "stopped":
        parts.append(
            f"no new step for {duration(time.time() - (run.updated or 0))}; continue it: "
            f"<code>convpipe train --resume {escape(run.path)}</code>"
        )
    return "<br>".join(parts)


def runs_table(runs: list[RunView], base: str) -> str:
    if not runs:
        return '<p class="muted">No runs outside jobs.</p>'
    head = "".join(f"<th>{c}</th>" for c in ("Run", "State", *_COLUMNS, "Detail"))
    rows = []
    now = time.time()
    for r in runs:
        state = r.state(now)
        rows.append(
            f'<tr class="run" data-run="{escape(r.path)}"><td><a href="{run_link(base, r.path)}">'
            f"{escape(r.name)}</a></td><td>{_state(state)}</td>"
            f"{_progress_cells(r, {'state': state})}"
            f'<td class="detail">{run_detail(r, state)}</td></tr>'
        )
    return (
        f'<table id="runs-table"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def problems(lines: list[str]) -> str:
    if not lines:
        return ""
    return (
        '<h2>Problems</h2><ul class="problems">'
        + "".join(f"<li>{escape(x)}</li>" for x in lines)
        + "</ul>"
    )


# ---- one job or run ------------------------------------------------------------------------------


def charts(run: RunView) -> str:
    c = run.curves
    if c is None:
        return '<p class="muted">No metrics yet.</p>'
    loss = tuple((p.x, p.y) for p in c.loss)
    series = [Series("loss of each step", loss, "#0969da", width=1.2, opacity=0.45, slug="loss")]
    k = max(2, min(50, len(loss) // 10))
    if len(loss) >= 5:
        series.append(
            Series(
                f"mean of {k} steps",
                _moving_average(loss, k),
                "#0550ae",
                width=2.5,
                slug="loss-mean",
            )
        )
    x_max = max(
        [p[0] for p in loss] + [p.x for p in c.val_acc + c.train_acc + c.test_acc], default=0.0
    )
    x_range = (0.0, x_max * 1.02 or 1.0)  # the steps so far: the curve fills the frame as it grows
    x_label = c.x_label + (" (step / steps per epoch)" if c.steps_per_epoch else "")
    acc = [
        Series(name, tuple((p.x, p.y) for p in points), color, markers=True, slug=slug)
        for name, points, color, slug in (
            ("val accuracy", c.val_acc, "#bc4c00", "val-acc"),
            ("train accuracy (sample)", c.train_acc, "#1a7f37", "train-acc"),
            ("test accuracy (whole split)", c.test_acc, "#8250df", "test-acc"),
        )
        if points or slug != "test-acc"  # the test line only for a run with test_each_epoch
    ]
    return (
        '<div class="charts">'
        + line_chart(
            series,
            title="Training loss",
            x_label=x_label,
            y_label="loss",
            chart_id="loss-chart",
            x_range=x_range,
        )
        + line_chart(
            acc,
            title="Accuracy",
            x_label=x_label,
            y_label="accuracy",
            chart_id="accuracy-chart",
            x_range=x_range,
            y_range=(0.0, 1.0),
            empty="no accuracy scored yet",
            legend="bottom",
        )
        + "</div>"
    )


def _moving_average(
    points: tuple[tuple[float, float], ...], k: int
) -> tuple[tuple[float, float], ...]:
    out, total = [], 0.0
    for i, (x, y) in enumerate(points):
        total += y
        if i >= k:
            total -= points[i - k][1]
        if i >= k - 1:
            out.append((x, total / k))
    return tuple(out)


def _workers(run: RunView) -> str:
    """The last step's workers, and who joined, left or died (a finished run's summary)."""
    if run.workers is None:
        return "–"
    changes = ", ".join(f"{n} {how}" for how, n in run.worker_changes.items())
    return escape(str(run.workers)) + (f" <small>({escape(changes)})</small>" if changes else "")


def _test(run: RunView) -> str:
    """The test split's accuracy, scored once at the end, with its test-time augmentation."""
    if run.test_acc is None:
        return "–"
    views = f" <small>({escape(run.tta)})</small>" if run.tta and run.tta != "none" else ""
    return _pct(run.test_acc) + views


def cards(run: RunView, active: bool) -> str:
    items = [
        (_steps(run.step, run.total_steps), "step"),
        (_num(run.loss), "loss"),
        (_num(run.images_per_s, "{:,.0f}"), "images/s"),
        (_workers(run), "workers"),
        (duration(run.eta_s()) if active else "–", "ETA"),
        (_pct(run.train_acc), "train accuracy"),
        (_pct(run.val_acc), "val accuracy"),
        (_test(run), "test accuracy"),
    ]
    return (
        '<div class="cards">'
        + "".join(f"<div class=card><b>{v}</b><span>{k}</span></div>" for v, k in items)
        + "</div>"
    )


_PHASES = (
    ("read", "read images"),
    ("compute", "compute gradients"),
    ("reduce", "reduce + update"),
    ("sync", "wait for the others"),
    ("coordinator", "coordinator"),
    ("checkpoint", "checkpoints"),
)


def breakdown(run: RunView) -> str:
    b = run.breakdown if isinstance(run.breakdown, dict) else {}
    parts = [(label, b[key]) for key, label in _PHASES if _is_num(b.get(key))]
    if not parts:
        return '<p class="muted">No steps yet.</p>'
    if not _is_num(b.get("step")):
        b = {**b, "step": None}
    total = b.get("step") or sum(v for _, v in parts) or 1.0
    rows = "".join(
        f'<tr><td>{escape(label)}</td><td class="num">{1000 * v:.1f} ms</td>'
        f"<td>{bar(v / total)}</td>"
        "</tr>"
        for label, v in parts
    )
    what = "mean over the run" if run.finished else "mean of the last steps"
    step = (
        f'<tr><th>one step</th><th class="num">{1000 * b["step"]:.1f} ms</th><th></th></tr>'
        if b.get("step")
        else ""
    )
    return (
        f'<table class="breakdown"><thead><tr><th>phase ({what})</th><th>per step</th><th></th>'
        f"</tr></thead><tbody>{rows}{step}</tbody></table>"
        '<p class="muted">read, compute, reduce and wait are the busiest worker\'s; they overlap '
        "with the coordinator's work on the next step.</p>"
    )


def pictures(run: RunView, base: str) -> str:
    """The run's PNGs (written when it finished), served read-only by the page."""
    if not run.pictures:
        return ""
    imgs = "".join(
        f'<a href="{picture_link(base, run.path, n)}"><img src="{picture_link(base, run.path, n)}" '
        f'alt="{escape(n)}" height="360"></a>'
        for n in run.pictures
    )
    return f'<h2>Pictures</h2><div class="pictures">{imgs}</div>'


def picture_link(base: str, path: str, name: str) -> str:
    return f"{base}convpipe/run/{quote(name)}?dir={quote(path, safe='')}"


def settings_table(settings: dict | None) -> str:
    if not settings or not isinstance(settings, dict):
        return '<p class="muted">No settings (config.json) readable.</p>'
    rows = "".join(
        f"<tr><td>{escape(str(k))}</td><td><code>{escape(str(v))}</code></td></tr>"
        for k, v in sorted(settings.items())
    )
    return f'<table class="settings"><tbody>{rows}</tbody></table>'


def log_block(lines: list[str]) -> str:
    if not lines:
        return '<p class="muted">No log lines yet.</p>'
    return '<pre class="log">' + escape("\n".join(lines)) + "</pre>"


_WIDE = ("run directory", "job directory", "detail")


def _facts(pairs: list[tuple[str, str | None]]) -> str:
    """Key facts as a grid of labelled values (paths and details on a line of their own)."""
    items = "".join(
        f"<div{' class=wide' if k in _WIDE else ''}><dt>{escape(k)}</dt><dd>{v}</dd></div>"
        for k, v in pairs
        if v not in (None, "")
    )
    return f'<dl class="facts">{items}</dl>'


def job_fragments(
    status: dict, run: RunView | None, log: list[str], base: str, sweep: str = ""
) -> dict[str, str]:
    state = status.get("state")
    e = lambda k: escape(str(status[k])) if status.get(k) not in (None, "") else None  # noqa: E731
    facts = _facts(
        [
            ("state", _state(state)),
            ("kind", e("kind")),
            ("name", e("name")),
            ("attempt", e("attempt")),
            ("worker", e("worker")),
            ("submitted", f"{e('submitted')} by {e('by')}" if status.get("by") else e("submitted")),
            ("started", e("started")),
            ("finished", e("finished")),
            ("run directory", f"<code>{e('run_dir')}</code>" if status.get("run_dir") else None),
            ("job directory", f"<code>{e('job_dir')}</code>" if status.get("job_dir") else None),
            ("detail", job_detail(status)),
        ]
    )
    out = {"facts": facts, "log": log_block(log), "updated": stamp()}
    if run is not None and run.exists:
        out.update(
            progress=cards(run, state == "running"),
            charts=charts(run) + pictures(run, base),
            breakdown=breakdown(run),
            settings=settings_table(run.settings),
        )
    else:
        out.update(
            progress=_job_progress(status),
            charts="",
            breakdown='<p class="muted">–</p>',
            settings=settings_table(status.get("options") or None),
        )
    if sweep:  # a sweep job: its leaderboard and overlaid curves
        out["charts"] = sweep + out["charts"]
    return out


def sweep_section(sweep: SweepView | None) -> str:
    """A sweep's leaderboard (top 10 by best-so-far val accuracy, the settings that differ) and
    its trials' validation curves overlaid (the best one highlighted); "" without a sweep
    (:func:`pipeline.dashboard.data.read_sweep` reads it)."""
    if sweep is None:
        return ""
    if sweep.state is None:
        return f'<p class="problems">{escape(str(sweep.problem))}</p>'
    state = sweep.state
    names = [d["name"] for d in state.plan["search"]["dims"]]
    differ = [n for n in names if len({repr(t.settings[n]) for t in state.trials}) > 1]
    head = "".join(
        f"<th>{escape(c)}</th>"
        for c in (
            "Trial",
            "State",
            "Steps",
            "Best val acc",
            "At step",
            *(n.replace("_", "-") for n in differ),
        )
    )
    rows = []
    for t in state.leaderboard()[:10]:
        best, step = t.best()
        cells = [
            escape(t.name),
            _state(t.state),
            escape(str(t.steps)),
            _num(best),
            "–" if step is None else escape(str(step)),
            *(
                escape(
                    f"{t.settings[n]:.4g}"
                    if isinstance(t.settings[n], float)
                    else str(t.settings[n])
                )
                for n in differ
            ),
        ]
        rows.append(
            f'<tr class="trial" data-trial="{escape(t.name)}">'
            + "".join(f"<td>{c}</td>" for c in cells)
            + "</tr>"
        )
    top = state.best()
    series = []
    for t in sorted(
        state.trials, key=lambda t: top is not None and t.id == top.id
    ):  # the best drawn last
        steps, acc = sweep.curves.get(t.name, ([], []))
        is_best = top is not None and t.id == top.id
        series.append(
            Series(
                f"best: {t.name}" if is_best else t.name,
                tuple(zip(map(float, steps), acc)),
                "#cf222e" if is_best else "#8c959f",
                width=2.5 if is_best else 1.0,
                markers=len(steps) < 3,
                opacity=1.0 if is_best else 0.5,
                slug=f"trial-{t.name}",
                legend=is_best,
            )
        )
    done = sum(not t.live for t in state.trials)
    chart = line_chart(
        series,
        title=f"Validation accuracy of {len(state.trials)} trials",
        x_label="step",
        y_label="val accuracy",
        chart_id="sweep-chart",
        y_range=(0.0, 1.0),
        empty="no trial scored yet",
        legend="bottom",
    )
    return (
        f"<h2>Sweep: {done}/{len(state.trials)} trials done, rungs {escape(str(state.rungs))}</h2>"
        f'<table id="leaderboard"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
        f'<div class="charts">{chart}</div>'
    )


def _job_progress(status: dict) -> str:
    p = _progress(status)
    if not p:
        return ""
    step = p.get("done", p.get("step"))
    total = p.get("total", p.get("total_steps"))
    what = escape(str(p.get("event") or "progress"))
    return (
        f'<div class="cards"><div class=card><b>{_steps(step, total)}</b><span>{what}</span>'
        "</div></div>"
    )


def detail_body(title: str, fragments: dict[str, str], base: str) -> str:
    return (
        f'<h1>{escape(title)} <span class="muted" id="updated">{fragments["updated"]}</span></h1>'
        f'<div id="facts">{fragments.get("facts", "")}</div>'
        f'<div id="progress">{fragments["progress"]}</div>'
        f'<div id="charts">{fragments["charts"]}</div>'
        '<div class="cols"><div><h2>Step time</h2>'
        f'<div id="breakdown">{fragments["breakdown"]}</div>'
        f'<p><a href="{base}tasks">Dask task stream</a> · '
        f'<a href="{base}status">Dask status</a></p></div>'
        f'<div><h2>Settings</h2><div id="settings">{fragments["settings"]}</div></div></div>'
        + (f'<h2>Log</h2><div id="log">{fragments["log"]}</div>' if "log" in fragments else "")
    )


def run_fragments(run: RunView, base: str) -> dict[str, str]:
    state = run.state()
    facts = _facts(
        [
            ("state", _state(state)),
            ("run directory", f"<code>{escape(run.path)}</code>"),
            ("detail", run_detail(run, state) if state == "stopped" else None),
        ]
    )
    return {
        "facts": facts,
        "progress": cards(run, state == "running"),
        "charts": charts(run) + pictures(run, base),
        "breakdown": breakdown(run),
        "settings": settings_table(run.settings),
        "updated": stamp(),
    }
