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

from edgeloop.kit.svg import bar_chart, line_chart
from edgeloop.monitor import drift
from edgeloop.monitor.aggregate import Reference, Window


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
            + bar_chart(labels, ref_sh, cur_sh, f"{name}: reference vs current")
            + line_chart(series, threshold, f"{name}: PSI per window")
            + "</section>"
        )
    if ref.prediction_categories:
        cats = ref.prediction_categories
        cur = [current.predictions.get(c, 0) for c in cats]
        out.append("<h2>Predictions</h2><section>")
        out.append(bar_chart(cats, _shares(ref.prediction_counts), _shares(cur), "predicted class"))
        out.append("</section>")
    out.append("</body></html>")
    return "".join(out)
