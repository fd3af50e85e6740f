"""Charts as inline SVG (no plotting library, nothing fetched; they render offline):
the monitor's drift report and the console draw with these."""

from __future__ import annotations

import html
from collections.abc import Sequence
from datetime import datetime

W, H = 360, 140


def bar_chart(labels: Sequence[str], ref: Sequence[float], cur: Sequence[float], title: str) -> str:
    """Side-by-side bars of two distributions (as shares), reference grey, current blue."""
    n = max(len(labels), 1)
    top = max([*ref, *cur, 1e-9])
    slot = (W - 40) / n
    parts = [f'<svg width="{W}" height="{H + 30}" role="img" aria-label="{html.escape(title)}">']
    for i, (r, c) in enumerate(zip(ref, cur, strict=True)):
        x = 30 + i * slot
        for j, (v, color) in enumerate(((r, "#999"), (c, "#2563eb"))):
            h = (H - 10) * v / top
            parts.append(
                f'<rect x="{x + j * slot / 2 + 1:.1f}" y="{H - h:.1f}" '
                f'width="{max(slot / 2 - 2, 1):.1f}" height="{h:.1f}" fill="{color}">'
                f"<title>{html.escape(labels[i])}: {'reference' if j == 0 else 'current'} "
                f"{v:.1%}</title></rect>"
            )
    parts.append(f'<line x1="30" y1="{H}" x2="{W - 10}" y2="{H}" stroke="#333"/>')
    parts.append(f'<text x="30" y="{H + 20}" font-size="11">{html.escape(title)}</text></svg>')
    return "".join(parts)


def line_chart(points: Sequence[tuple[datetime, float]], threshold: float, title: str) -> str:
    """A score over time with its alarm threshold."""
    if not points:
        return "<p>no judged window yet</p>"
    top = max([v for _, v in points] + [threshold * 1.2])
    t0, t1 = points[0][0].timestamp(), points[-1][0].timestamp()
    span = max(t1 - t0, 1.0)

    def xy(t: datetime, v: float) -> str:
        return f"{30 + (W - 40) * (t.timestamp() - t0) / span:.1f},{H - (H - 10) * v / top:.1f}"

    path = " ".join(xy(t, v) for t, v in points)
    y = H - (H - 10) * threshold / top
    return (
        f'<svg width="{W}" height="{H + 30}" role="img" aria-label="{html.escape(title)}">'
        f'<line x1="30" y1="{y:.1f}" x2="{W - 10}" y2="{y:.1f}" stroke="#dc2626" '
        f'stroke-dasharray="4"/><polyline points="{path}" fill="none" stroke="#2563eb" '
        f'stroke-width="2"/><line x1="30" y1="{H}" x2="{W - 10}" y2="{H}" stroke="#333"/>'
        f'<text x="30" y="{H + 20}" font-size="11">{html.escape(title)} '
        f"(max {top:.2f}; dashed: threshold {threshold:g})</text></svg>"
    )
