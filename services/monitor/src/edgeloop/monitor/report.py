"""The drift report: one self-contained HTML page per version, with its pictures drawn as
inline SVG (no plotting library, nothing fetched): per feature, the reference histogram
against the current one (the latest windows merged) and the PSI of each window over
time; the prediction distribution; the alarms."""

from __future__ import annotations

import html
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import numpy as np

from edgeloop.monitor import drift
from edgeloop.monitor.aggregate import Reference, Window

W, H = 360, 140


def _bars(labels: Sequence[str], ref: Sequence[float], cur: Sequence[float], title: str) -> str:
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


def _line(points: Sequence[tuple[datetime, float]], threshold: float, title: str) -> str:
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


def _shares(counts: Any) -> list[float]:
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    return (c / total).tolist() if total else [0.0] * len(c)


def render(
    ref: Reference,
    windows: Sequence[tuple[datetime, Window, dict[str, Any]]],
    alarms: Sequence[dict[str, Any]],
    *,
    threshold: float,
    recent: int = 5,
) -> str:
    """The report of ``ref``'s version from its judged ``windows`` (oldest first)."""
    current = Window()
    for _, w, _ in windows[-recent:]:
        current.merge(w)
    title = f"Drift report: {ref.model}@{ref.version}"
    out = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}section{display:inline-block;"
        "margin:0 1em 1em 0;vertical-align:top}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{len(windows)} judged windows; current = the last {min(recent, len(windows))} "
        f"({current.count} inferences from {len(current.devices)} devices). Grey: reference "
        "profile; blue: current.</p>",
        "<h2>Alarms</h2>",
    ]
    if alarms:
        out.append("<table><tr><th>raised</th><th>rule</th><th>state</th><th>message</th></tr>")
        for a in alarms:
            out.append(
                f"<tr><td>{html.escape(str(a['raised_at']))}</td><td>{html.escape(a['rule'])}</td>"
                f"<td>{html.escape(a['state'])}</td><td>{html.escape(a['message'])}</td></tr>"
            )
        out.append("</table>")
    else:
        out.append("<p>none</p>")
    out.append("<h2>Features</h2>")
    for i, name in enumerate(ref.names):
        n_bins = len(ref.edges[i]) + 1
        labels = [f"bin {b}" for b in range(n_bins)]
        ref_sh = _shares(ref.counts[i, :n_bins])
        cur_sh = (
            _shares(current.features[i, :n_bins])
            if current.features is not None
            else [0.0] * n_bins
        )
        psi = float(drift.psi(ref.counts[i, :n_bins], np.asarray(cur_sh))) if current.count else 0.0
        series = [
            (t, float(s["features"][name]["psi"]))
            for t, _, s in windows
            if s.get("features") and name in s["features"]
        ]
        out.append(
            f"<section><h3>{html.escape(name)} — PSI {psi:.3f}</h3>"
            + _bars(labels, ref_sh, cur_sh, f"{name}: reference vs current")
            + _line(series, threshold, f"{name}: PSI per window")
            + "</section>"
        )
    if ref.prediction_categories:
        cats = ref.prediction_categories
        cur = [current.predictions.get(c, 0) for c in cats]
        out.append("<h2>Predictions</h2><section>")
        out.append(_bars(cats, _shares(ref.prediction_counts), _shares(cur), "predicted class"))
        out.append("</section>")
    out.append("</body></html>")
    return "".join(out)
