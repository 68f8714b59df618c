"""Inline SVG bar charts: an expert's benchmark results side by side with the base model's.

One group per (task, metric): a title line naming the metric and its better direction
("↑ higher is better" / "↓ lower is better"), then a base bar and an expert bar, each with its
name in a left column and its value after the bar; the better of the two is marked with ★.
Every label has its own space (titles above the bars, names left of them, values right of the
longest bar), so no text overlaps a bar; tests/test_browser.py checks that in Chromium.
"""

from __future__ import annotations

from html import escape

from marketplace.catalog import BenchmarkRow

BAR_H, BAR_GAP, GROUP_GAP, TITLE_H = 16, 4, 14, 18
NAME_W, CHART_W, VALUE_W = 64, 280, 120
CHAR_W = 7  # a generous width per character of 12px sans-serif, to size the title lines
COLOURS = {"base": "#a0aec0", "expert": "#2b6cb0"}


def better_of(row: BenchmarkRow) -> str | None:
    """ "expert" or "base", whichever scores better in the metric's direction; None on a tie or
    when the base was not recorded."""
    if row.base is None or row.base == row.expert:
        return None
    expert_wins = row.expert > row.base if row.higher_is_better else row.expert < row.base
    return "expert" if expert_wins else "base"


def _title(row: BenchmarkRow) -> str:
    name = f"{row.task} · {row.metric}" if row.metric else row.task
    return f"{name}  {'↑ higher' if row.higher_is_better else '↓ lower'} is better"


def benchmark_svg(rows: list[BenchmarkRow]) -> str:
    """The chart (see the module docstring). Each group is scaled to its own larger value,
    since tasks mix metrics (accuracy in [0, 1], perplexity in the tens)."""
    if not rows:
        return '<p class="muted">No benchmark results recorded.</p>'
    group_h = TITLE_H + 2 * BAR_H + BAR_GAP + GROUP_GAP
    width = max(NAME_W + CHART_W + VALUE_W, max(CHAR_W * len(_title(r)) for r in rows) + 8)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" class="bench" '
        f'width="{width}" height="{len(rows) * group_h}" '
        f'aria-label="benchmark results, base and expert side by side" '
        f'font-family="sans-serif">'
    ]
    for index, row in enumerate(rows):
        y = index * group_h
        parts.append(
            f'<text class="metric-title" x="0" y="{y + 13}" font-size="12" '
            f'font-weight="bold">{escape(_title(row))}</text>'
        )
        top = max(abs(row.expert), abs(row.base or 0.0)) or 1.0
        better = better_of(row)
        for offset, (who, value) in enumerate((("base", row.base), ("expert", row.expert))):
            bar_y = y + TITLE_H + offset * (BAR_H + BAR_GAP)
            text_y = bar_y + BAR_H - 4
            parts.append(f'<text class="bar-name" x="0" y="{text_y}" font-size="11">{who}</text>')
            if value is None:
                parts.append(
                    f'<text class="bar-value" x="{NAME_W}" y="{text_y}" font-size="11" '
                    f'fill="#718096">not recorded</text>'
                )
                continue
            bar_w = max(1.0, CHART_W * abs(value) / top)
            mark = " ★ better" if who == better else ""
            parts.append(
                f'<rect class="bar-{who}" x="{NAME_W}" y="{bar_y}" width="{bar_w:.1f}" '
                f'height="{BAR_H}" fill="{COLOURS[who]}"><title>{who} {value:.4g}</title></rect>'
                f'<text class="bar-value" x="{NAME_W + CHART_W + 6}" y="{text_y}" '
                f'font-size="11">{value:.4g}{mark}</text>'
            )
    parts.append("</svg>")
    return "".join(parts)
