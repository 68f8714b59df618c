"""Inline SVG bar charts: an expert's benchmark results next to the base model's."""

from __future__ import annotations

from html import escape

from marketplace.catalog import BenchmarkRow

BAR_H, GAP, LABEL_W, CHART_W = 14, 10, 300, 300


def benchmark_svg(rows: list[BenchmarkRow]) -> str:
    """Two bars per task (expert, base); each task is scaled to its own larger value, since
    tasks mix metrics (accuracy in [0, 1], perplexity in the tens)."""
    if not rows:
        return '<p class="muted">No benchmark results recorded.</p>'
    height = len(rows) * (2 * BAR_H + GAP) + 24
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" class="bench" '
        f'width="{LABEL_W + CHART_W + 80}" height="{height}" '
        f'aria-label="benchmark results, expert versus base">'
    ]
    y = 4
    for row in rows:
        top = max(abs(row.expert), abs(row.base or 0.0)) or 1.0
        label = escape(f"{row.task} ({row.metric})" if row.metric else row.task)
        if not row.higher_is_better:
            label += " (lower is better)"
        parts.append(f'<text x="0" y="{y + BAR_H + 4}" font-size="11">{label}</text>')
        for offset, (who, value, colour) in enumerate(
            (("expert", row.expert, "#2b6cb0"), ("base", row.base, "#a0aec0"))
        ):
            if value is None:
                continue
            width = CHART_W * abs(value) / top
            bar_y = y + offset * BAR_H
            parts.append(
                f'<rect class="bar-{who}" x="{LABEL_W}" y="{bar_y}" width="{width:.1f}" '
                f'height="{BAR_H - 2}" fill="{colour}"><title>{who} {value:.4g}</title></rect>'
                f'<text x="{LABEL_W + width + 4:.1f}" y="{bar_y + BAR_H - 3}" '
                f'font-size="10">{who} {value:.4g}</text>'
            )
        y += 2 * BAR_H + GAP
    parts.append("</svg>")
    return "".join(parts)
