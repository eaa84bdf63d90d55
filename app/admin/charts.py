"""Small charts as inline SVG, drawn on the server: no script, no network, readable at phone width.

Every text that goes into a chart is escaped here (the result is marked safe for the templates).
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from markupsafe import Markup

from app.services.overview import HourBucket, StageStats
from likeness.contract.plan import JobState

#: One colour per job state (also used by the legend and the state badges' CSS).
STATE_COLOURS = {
    JobState.SUCCEEDED: "#2e9d5b",
    JobState.RUNNING: "#2f6fdb",
    JobState.QUEUED: "#9aa5b1",
    JobState.FAILED: "#d64545",
    JobState.CANCELED: "#e0a030",
}


def _svg(width: int, height: int, label: str, body: list[str]) -> Markup:
    return Markup(f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}" '
                  f'xmlns="http://www.w3.org/2000/svg" preserveAspectRatio="xMinYMin meet">'
                  f"<title>{escape(label)}</title>{''.join(body)}</svg>")


def _nice_max(value: float) -> float:
    """A round axis maximum at or above ``value``."""
    if value <= 0:
        return 1.0
    magnitude = 10 ** len(str(int(value))) / 10
    for step in (1, 2, 2.5, 5, 10):
        if step * magnitude >= value:
            return step * magnitude
    return value


def seconds_label(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def jobs_per_hour(buckets: Sequence[HourBucket]) -> Markup:
    """Stacked bars: jobs created in each hour, coloured by their state now."""
    width, height, left, bottom, top = 720, 200, 34, 24, 10
    plot_w, plot_h = width - left - 6, height - bottom - top
    peak = _nice_max(max((b.total for b in buckets), default=0))
    slot = plot_w / max(len(buckets), 1)
    body = [f'<line x1="{left}" y1="{top + plot_h}" x2="{width - 6}" y2="{top + plot_h}" class="axis"/>',
            f'<text x="{left - 4}" y="{top + 8}" text-anchor="end" class="tick">{peak:g}</text>',
            f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end" class="tick">0</text>']
    for i, bucket in enumerate(buckets):
        x = left + i * slot + 1
        y = top + plot_h
        for state in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED, JobState.RUNNING, JobState.QUEUED):
            count = bucket.counts.get(state, 0)
            if not count:
                continue
            h = plot_h * count / peak
            y -= h
            tip = f"{bucket.start:%H:00} UTC: {count} {state.value}"
            body.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(slot - 2, 1):.1f}" height="{h:.1f}" '
                        f'fill="{STATE_COLOURS[state]}"><title>{escape(tip)}</title></rect>')
        if i % 3 == 0:
            body.append(f'<text x="{x + slot / 2:.1f}" y="{height - 6}" text-anchor="middle" class="tick">'
                        f"{bucket.start:%H}h</text>")
    total = sum(b.total for b in buckets)
    return _svg(width, height, f"Jobs created per hour, last {len(buckets)} hours: {total} in all", body)


def stage_durations(stats: Sequence[StageStats]) -> Markup:
    """Horizontal bars per stage: p50 (dark) over p95 (light), on one time axis."""
    rows = [s for s in stats if s.runs]
    if not rows:
        return Markup('<p class="muted">No stage finished in this window.</p>')
    width, row_h, left, right = 720, 26, 190, 90
    height = row_h * len(rows) + 8
    peak = max(s.p95 or 0 for s in rows) or 1.0
    scale = (width - left - right) / peak
    body = []
    for i, s in enumerate(rows):
        y = 4 + i * row_h
        label = f"{s.kind} · {s.stage}"
        body.append(f'<text x="{left - 6}" y="{y + 16}" text-anchor="end" class="label">{escape(label)}</text>')
        body.append(f'<rect x="{left}" y="{y + 3}" width="{max((s.p95 or 0) * scale, 1):.1f}" height="{row_h - 8}" '
                    f'class="p95"><title>{escape(label)} p95 {seconds_label(s.p95)}</title></rect>')
        body.append(f'<rect x="{left}" y="{y + 7}" width="{max((s.p50 or 0) * scale, 1):.1f}" height="{row_h - 16}" '
                    f'class="p50"><title>{escape(label)} p50 {seconds_label(s.p50)}</title></rect>')
        body.append(f'<text x="{left + (s.p95 or 0) * scale + 6:.1f}" y="{y + 16}" class="tick">'
                    f"{seconds_label(s.p50)} / {seconds_label(s.p95)}</text>")
    return _svg(width, height, "Stage durations, p50 and p95", body)


def class_word_fit(chosen: str | None, scores: Sequence[tuple[str, float]]) -> Markup:
    """Horizontal bars, one per candidate class word, longest for the best fit (the lowest CLIP distance):
    the chosen word's bar is drawn apart and labelled; every bar carries its distance."""
    if not scores:
        return Markup('<p class="muted">No class-word scores recorded.</p>')
    width, row_h, left, right = 480, 24, 110, 150
    best, worst = min(d for _, d in scores), max(d for _, d in scores)
    spread = worst - best
    body = []
    for i, (word, distance) in enumerate(scores):
        y = 4 + i * row_h
        fit = 1.0 if spread <= 0 else 0.08 + 0.92 * (worst - distance) / spread  # the worst keeps a stub
        picked = word == chosen
        css = "chosen" if picked else "other"
        body.append(f'<text x="{left - 6}" y="{y + 15}" text-anchor="end" class="label {css}">{escape(word)}</text>')
        body.append(f'<rect x="{left}" y="{y + 4}" width="{fit * (width - left - right):.1f}" height="{row_h - 8}" '
                    f'class="fit {css}"><title>{escape(word)}: distance {distance:.4g}</title></rect>')
        body.append(f'<text x="{left + fit * (width - left - right) + 6:.1f}" y="{y + 15}" class="tick {css}">'
                    f"{distance:.4g}{' · chosen' if picked else ''}</text>")
    label = "How well each class word fits the photos: longer is better (CLIP distance, lower fits better)"
    return _svg(width, row_h * len(scores) + 8, label, body)


def line_chart(points: Sequence[tuple[float, float]], label: str, x_name: str = "step",
               y_name: str = "loss") -> Markup:
    """A line through ``(x, y)`` points with its ranges written on the axes."""
    if len(points) < 2:
        return Markup('<p class="muted">Not enough points for a curve.</p>')
    width, height, left, bottom, top, right = 560, 200, 54, 26, 10, 10
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: float, y: float) -> str:
        return f"{left + (x - x0) / (x1 - x0) * plot_w:.1f},{top + (1 - (y - y0) / (y1 - y0)) * plot_h:.1f}"

    body = [f'<line x1="{left}" y1="{top + plot_h}" x2="{width - right}" y2="{top + plot_h}" class="axis"/>',
            f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" class="axis"/>',
            f'<polyline points="{" ".join(px(x, y) for x, y in points)}" class="line"/>',
            f'<text x="{left - 4}" y="{top + 8}" text-anchor="end" class="tick">{y1:.4g}</text>',
            f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end" class="tick">{y0:.4g}</text>',
            f'<text x="{left}" y="{height - 8}" class="tick">{escape(x_name)} {x0:g}</text>',
            f'<text x="{width - right}" y="{height - 8}" text-anchor="end" class="tick">{x1:g}</text>',
            f'<text x="{left + 8}" y="{top + 12}" class="tick">{escape(y_name)}</text>']
    return _svg(width, height, label, body)
