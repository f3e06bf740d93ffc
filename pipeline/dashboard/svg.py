"""Line charts as inline SVG, rendered on the server: no chart library, no front-end build.

A chart is a frame with nice ticks, grid lines, axis labels, a legend and one ``<path>`` per
series. Every series path carries ``data-series`` (its name) and ``data-points`` (how many
points it was given), so a test or a reader of the DOM can tell a curve grew.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

from pipeline.curves import number_text

#: the most vertices one path gets; longer series are averaged in equal buckets
MAX_VERTICES = 800


@dataclass(frozen=True)
class Series:
    """``points``: (x, y) pairs in x order. ``markers``: circles at the points (few points).
    ``legend``: whether the legend lists it."""

    name: str
    points: tuple[tuple[float, float], ...]
    color: str
    width: float = 2.0
    markers: bool = False
    opacity: float = 1.0
    slug: str = ""
    legend: bool = True  # False: drawn, not listed (many overlaid curves)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values (1, 2, 2.5 or 5 times a power of ten) covering lo..hi."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    t = first
    while t <= hi + 1e-9 * step:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _thin(points: tuple[tuple[float, float], ...]) -> list[tuple[float, float]]:
    """At most :data:`MAX_VERTICES` points: the means of equal buckets (the last point kept)."""
    if len(points) <= MAX_VERTICES:
        return list(points)
    size = len(points) / MAX_VERTICES
    out = []
    for i in range(MAX_VERTICES):
        bucket = points[int(i * size) : max(int(i * size) + 1, int((i + 1) * size))]
        out.append(
            (sum(p[0] for p in bucket) / len(bucket), sum(p[1] for p in bucket) / len(bucket))
        )
    out[-1] = points[-1]
    return out


def line_chart(
    series: list[Series],
    *,
    title: str,
    x_label: str,
    y_label: str,
    chart_id: str,
    x_range: tuple[float, float] | None = None,
    y_range: tuple[float, float] | None = None,
    width: int = 560,
    height: int = 290,
    empty: str = "no points yet",
    legend: str = "top",
) -> str:
    """An ``<svg>`` line chart of ``series`` (x from ``x_range`` or 0..max x; y from ``y_range``
    or the data's range with a margin); the legend in the ``legend`` ("top" or "bottom") right
    corner, where the curves are not (a loss falls, an accuracy rises)."""
    left, right, top, bottom = 58, 16, 30, 44
    pw, ph = width - left - right, height - top - bottom
    xs = [p[0] for s in series for p in s.points]
    ys = [p[1] for s in series for p in s.points]
    x0, x1 = x_range or (0.0, max(xs, default=1.0) or 1.0)
    if y_range:
        y0, y1 = y_range
    elif ys:
        lo, hi = min(ys), max(ys)
        pad = (hi - lo) * 0.08 or abs(hi) * 0.1 or 1.0
        y0, y1 = lo - pad, hi + pad
    else:
        y0, y1 = 0.0, 1.0
    if x1 <= x0:
        x1 = x0 + 1.0

    def X(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * pw

    def Y(v: float) -> float:
        return top + (1 - (v - y0) / (y1 - y0)) * ph

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" id="{escape(chart_id)}" '
        f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{escape(title)}">',
        f'<text x="{left}" y="18" class="chart-title">{escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="plot-area"/>',
    ]
    for t in nice_ticks(y0, y1, 6):
        out.append(
            f'<line x1="{left}" x2="{left + pw}" y1="{Y(t):.1f}" y2="{Y(t):.1f}" class="grid"/>'
            f'<text x="{left - 6}" y="{Y(t) + 4:.1f}" class="tick" '
            f'text-anchor="end">{number_text(float(t))}</text>'
        )
    for t in nice_ticks(x0, x1, 6):
        out.append(
            f'<line y1="{top}" y2="{top + ph}" x1="{X(t):.1f}" x2="{X(t):.1f}" class="grid"/>'
            f'<text x="{X(t):.1f}" y="{top + ph + 16}" class="tick" '
            f'text-anchor="middle">{number_text(float(t))}</text>'
        )
    out.append(
        f'<text x="{left + pw / 2:.1f}" y="{height - 6}" class="axis-label" '
        f'text-anchor="middle">{escape(x_label)}</text>'
    )
    out.append(
        f'<text transform="translate(14 {top + ph / 2:.1f}) rotate(-90)" class="axis-label" '
        f'text-anchor="middle">{escape(y_label)}</text>'
    )
    if not xs:
        out.append(
            f'<text x="{left + pw / 2:.1f}" y="{top + ph / 2:.1f}" class="empty" '
            f'text-anchor="middle">{escape(empty)}</text>'
        )
    for s in series:
        if not s.points:
            continue
        pts = _thin(s.points)
        d = "M" + " L".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in pts)
        out.append(
            f'<path d="{d}" fill="none" stroke="{s.color}" stroke-width="{s.width}" '
            f'stroke-opacity="{s.opacity}" stroke-linejoin="round" class="series {escape(s.slug)}" '
            f'data-series="{escape(s.name)}" data-points="{len(s.points)}"/>'
        )
        if s.markers:
            out.extend(
                f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="3" fill="{s.color}"/>' for x, y in pts
            )
    shown = [s for s in series if s.points and s.legend]
    box_y = top + 3 if legend == "top" else top + ph - 9 - 16 * len(shown)
    if shown:
        out.append(
            f'<rect x="{left + pw - 198}" y="{box_y}" width="194" height="{16 * len(shown) + 6}" '
            f'class="legend-box"/>'
        )
    for i, s in enumerate(shown):
        lx, ly = left + pw - 190, box_y + 15 + 16 * i
        out.append(
            f'<line x1="{lx}" x2="{lx + 18}" y1="{ly - 4}" y2="{ly - 4}" stroke="{s.color}" '
            f'stroke-width="3"/><text x="{lx + 24}" y="{ly}" class="legend">{escape(s.name)}</text>'
        )
    out.append("</svg>")
    return "".join(out)
