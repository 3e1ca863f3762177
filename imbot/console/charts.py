"""Time series as pictures: small server-rendered SVG line charts, no JavaScript.

Each series gets a colour of a fixed palette (distinguishable for the common colour
blindnesses) and a legend entry; the axes say the range and the unit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from html import escape

from markupsafe import Markup

PALETTE = (
    "#0072b2",
    "#e69f00",
    "#009e73",
    "#cc79a7",
    "#56b4e9",
    "#d55e00",
    "#7f7f7f",
    "#f0e442",
    "#000000",
)

Series = Mapping[str, Sequence[tuple[float, float]]]  # name → (epoch seconds, value)


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    magnitude = 10.0 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * magnitude:
            return step * magnitude
    return value


def _label(value: float) -> str:
    if value >= 100 or value == int(value):
        return f"{value:,.0f}"
    return f"{value:.2g}" if value < 1 else f"{value:.1f}"


def _time(epoch: float, span: float) -> str:
    at = datetime.fromtimestamp(epoch, UTC)
    return at.strftime("%m-%d %H:%M" if span > 86400 else "%H:%M:%S" if span < 600 else "%H:%M")


def line_chart(
    series: Series,
    *,
    unit: str,
    title: str,
    span: tuple[float, float] | None = None,
    y_max: float | None = None,
    width: int = 640,
    height: int = 220,
) -> Markup:
    """An SVG line chart of ``series`` with a legend; "no data yet" when every one is empty.
    ``span``: the time range to show (epoch seconds), else the data's own; ``y_max``: the
    top of the scale (a share's 100), else a round number above the data."""
    points = [p for values in series.values() for p in values]
    head = (
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img"'
        f' aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">'
        f"<title>{escape(title)}</title>"
    )
    if not points:
        empty = (
            f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle"'
            ' class="muted">no data yet</text>'
        )
        return Markup(head + empty + "</svg>")
    left, right, top_px, bottom = 56, 12, 22, 28
    x0, x1 = span or (min(p[0] for p in points), max(p[0] for p in points))
    width_s = max(x1 - x0, 1.0)
    top = y_max if y_max is not None else _nice_max(max(p[1] for p in points))
    plot_w, plot_h = width - left - right, height - top_px - bottom

    def x(t: float) -> float:
        return left + (t - x0) / width_s * plot_w if x1 > x0 else left + plot_w / 2

    def y(v: float) -> float:
        return top_px + plot_h - v / top * plot_h

    parts = [head]
    for i in range(5):
        value = top * i / 4
        parts.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y(value):.1f}" y2="{y(value):.1f}"'
            ' class="grid"/>'
            f'<text x="{left - 6}" y="{y(value) + 4:.1f}" text-anchor="end">{_label(value)}</text>'
        )
    ticks = (
        ((x0, "start"), ((x0 + x1) / 2, "middle"), (x1, "end")) if x1 > x0 else ((x0, "middle"),)
    )
    for t, anchor in ticks:
        parts.append(
            f'<text x="{x(t):.1f}" y="{height - 8}" text-anchor="{anchor}">{_time(t, width_s)}</text>'
        )
    parts.append(f'<text x="4" y="12" class="unit">{escape(unit)}</text>')
    for i, (name, values) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        ordered = sorted(values)
        path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in ordered)
        parts.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}">'
            f"<title>{escape(name)}</title></polyline>"
        )
        if len(ordered) == 1:
            t, v = ordered[0]
            parts.append(f'<circle cx="{x(t):.1f}" cy="{y(v):.1f}" r="3" fill="{colour}"/>')
    parts.append("</svg>")
    legend = "".join(
        f'<li><svg class="swatch" viewBox="0 0 10 10" aria-hidden="true">'
        f'<rect width="10" height="10" fill="{PALETTE[i % len(PALETTE)]}"/></svg>'
        f"{escape(name)}</li>"
        for i, name in enumerate(series)
    )
    return Markup("".join(parts) + f'<ul class="legend">{legend}</ul>')
