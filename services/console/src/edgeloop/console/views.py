"""What the pages show, shaped from the APIs' answers (pure functions: no I/O)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

#: The verbs of a rollout's buttons and the states in which the deployer takes each.
ROLLOUT_ACTIONS: dict[str, tuple[str, ...]] = {
    "approve": ("awaiting_approval",),
    "pause": ("running", "pending"),
    "resume": ("paused",),
    "abort": ("pending", "running", "paused"),
    "rollback": ("pending", "running", "paused", "completed"),
}


def actions_for(state: str) -> list[str]:
    """The buttons a rollout in ``state`` has (for a role that may use them)."""
    return [verb for verb, states in ROLLOUT_ACTIONS.items() if state in states]


def wave_rows(rollout: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per wave: targeted, converged, failed, pending, budget, verdict."""
    rows = []
    for w in rollout.get("wave_status") or []:
        live = w.get("live") or {}
        targeted = w["members"] if w.get("members") is not None else w["size"]
        rows.append(
            {
                "wave": w["wave"],
                "state": w["state"],
                "targeted": targeted,
                "converged": live.get("converged", w.get("converged", 0)),
                "failed": live.get("failed", w.get("failed", 0)),
                "pending": live.get("pending"),
                "budget": w.get("budget"),
                "verdict": w.get("verdict"),
                "verdict_reasons": w.get("verdict_reasons") or [],
                "reason": w.get("reason"),
                "current": w["wave"] == rollout.get("current_wave"),
            }
        )
    return rows


def wave_progress(rollout: dict[str, Any]) -> str:
    """``wave 2 of 3`` (the list of rollouts has no per-wave detail)."""
    planned = rollout.get("waves_planned") or []
    if not planned:
        return "-"
    current = min(int(rollout.get("current_wave") or 0), len(planned) - 1)
    return f"wave {current + 1} of {len(planned)}"


@dataclass(frozen=True)
class Bar:
    """One span of a waterfall."""

    span_id: str
    name: str
    service: str
    depth: int
    start_ms: float
    duration_ms: float
    left: float
    """Start, as a fraction of the trace's length."""
    width: float
    """Duration, as a fraction of the trace's length."""


def waterfall(trace: dict[str, Any]) -> tuple[list[Bar], float]:
    """The trace's spans in tree order (children under their parent, by start), each
    placed on the trace's time line; and the trace's length in ms."""
    spans = trace.get("spans") or []
    if not spans:
        return [], 0.0
    services = {pid: p.get("serviceName", "?") for pid, p in (trace.get("processes") or {}).items()}
    ids = {s["spanID"] for s in spans}
    children: dict[str | None, list[dict[str, Any]]] = defaultdict(list)
    for s in spans:
        parents = [r["spanID"] for r in s.get("references", []) if r.get("refType") == "CHILD_OF"]
        children[parents[0] if parents and parents[0] in ids else None].append(s)
    t0 = min(s["startTime"] for s in spans)
    t1 = max(s["startTime"] + s["duration"] for s in spans)
    length = max(t1 - t0, 1)
    bars: list[Bar] = []

    def walk(parent: str | None, depth: int) -> None:
        for s in sorted(children.get(parent, []), key=lambda x: x["startTime"]):
            bars.append(
                Bar(
                    span_id=s["spanID"],
                    name=s["operationName"],
                    service=services.get(s["processID"], "?"),
                    depth=depth,
                    start_ms=(s["startTime"] - t0) / 1000,
                    duration_ms=s["duration"] / 1000,
                    left=(s["startTime"] - t0) / length,
                    width=max(s["duration"] / length, 0.002),
                )
            )
            walk(s["spanID"], depth + 1)

    walk(None, 0)
    return bars, length / 1000


#: Colours of the services in a waterfall (others get grey).
SERVICE_COLOURS = {
    "registry": "#4e79a7",
    "builder": "#f28e2b",
    "validator": "#59a14f",
    "deployer": "#e15759",
    "gateway": "#76b7b2",
    "monitor": "#edc948",
    "edge-agent": "#b07aa1",
}


def colour(service: str) -> str:
    """The waterfall colour of ``service``."""
    return SERVICE_COLOURS.get(service, "#9c9c9c")


def psi_series(
    windows: list[dict[str, Any]], group: str | None
) -> tuple[list[str], dict[str, list[tuple[datetime, float]]]]:
    """The groups of the windows, and per feature the PSI of each judged window of
    ``group`` (the first group when None), oldest first."""
    groups = sorted({str(w.get("group")) for w in windows})
    chosen = group if group in groups else (groups[0] if groups else None)
    series: dict[str, list[tuple[datetime, float]]] = defaultdict(list)
    for w in sorted(windows, key=lambda x: str(x["window_start"])):
        if str(w.get("group")) != chosen or not w.get("evaluated"):
            continue
        scores = w.get("scores") or {}
        for name, feature in (scores.get("features") or {}).items():
            series[name].append((datetime.fromisoformat(w["window_end"]), float(feature["psi"])))
    return groups, dict(series)


def latest_kpis(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """The KPIs of the newest judged window."""
    for w in sorted(windows, key=lambda x: str(x["window_start"]), reverse=True):
        kpis = (w.get("scores") or {}).get("kpis")
        if w.get("evaluated") and kpis:
            return dict(kpis)
    return {}
