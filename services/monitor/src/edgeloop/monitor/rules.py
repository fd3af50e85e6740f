"""Scores of a closed window, and the rules that turn them into alarms.

Rules are per model (``edgeloop monitor rules set NAME --file rules.yaml``), falling back
to :data:`DEFAULT_RULES`. A rule **fires** on a window above its threshold and is
**clean** on a window below ``threshold * hysteresis``; an open alarm resolves after
``clear_windows`` clean windows in a row (so a score hovering at the threshold does not
flap), and a rule has at most one open alarm per version (de-duplication).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import asyncpg
import numpy as np

from edgeloop.kit.db import Conn
from edgeloop.monitor import cbpe, drift
from edgeloop.monitor.aggregate import Reference, Window, quantile

DEFAULT_RULES: dict[str, float] = {
    "min_count": 200,
    "min_devices": 2,
    "drift_psi": 0.25,
    "prediction_psi": 0.25,
    "error_rate": 0.05,
    "low_confidence_rate": 0.5,
    "latency_p95_ms": 250.0,
    "clear_windows": 2,
    "hysteresis": 0.8,
    "canary_error_rate_delta": 0.02,
    "canary_latency_ratio": 1.5,
    "canary_latency_margin_ms": 5.0,
    "canary_prediction_psi": 0.25,
    "estimated_accuracy": 0.0,
    "estimated_f1": 0.0,
}
"""Thresholds; ``min_count``: windows with fewer inferences are not judged;
``min_devices``: an alarm or a canary verdict needs evidence from at least this many
devices (on each side of a canary comparison), and must still hold without any single
one of them (``edgeloop.monitor.robust``); ``estimated_accuracy``, ``estimated_f1``:
the least label-free estimate a window may have (``edgeloop.monitor.cbpe``; 0: off)."""

KPI_RULES = ("error_rate", "low_confidence_rate", "latency_p95_ms")
MIN_KPI_RULES = (cbpe.ACCURACY, cbpe.F1)
"""KPIs that fire *below* their rule; clean once their complement (the estimated error)
is under ``(1 - rule) * hysteresis``."""


async def load_rules(conn: Conn | asyncpg.Pool, model: str) -> dict[str, Any]:
    """The model's own rules (without the defaults), as stored by ``rules set``."""
    raw = await conn.fetchval("SELECT rules FROM rules WHERE model = $1", model)
    return dict(json.loads(raw)) if raw else {}


def validate_kpis(kpis: Any) -> dict[str, dict[str, Any]]:
    """Custom KPIs: ``name: {predictions: [labels], min: x, max: y}`` — the share of a
    window's inferences predicted as one of ``labels`` must stay within the bounds (a
    business KPI such as the share of transactions flagged)."""
    if not isinstance(kpis, dict):
        raise ValueError("kpis must map a KPI name to {predictions: [...], min/max: share}")
    out: dict[str, dict[str, Any]] = {}
    for name, spec in kpis.items():
        if not isinstance(name, str) or not name.replace("_", "").isalnum():
            raise ValueError(f"KPI name {name!r} must be letters, digits and _")
        if not isinstance(spec, dict) or set(spec) - {"predictions", "min", "max"}:
            raise ValueError(f"KPI {name}: give predictions and min and/or max, nothing else")
        labels = spec.get("predictions")
        if not isinstance(labels, list) or not labels:
            raise ValueError(f"KPI {name}: predictions must be a non-empty list of labels")
        bounds = {}
        for bound in ("min", "max"):
            if spec.get(bound) is not None:
                value = float(spec[bound])
                if not 0 <= value <= 1:
                    raise ValueError(f"KPI {name}: {bound} is a share between 0 and 1")
                bounds[bound] = value
        if not bounds:
            raise ValueError(f"KPI {name}: give min, max or both")
        out[name] = {"predictions": [str(x) for x in labels], **bounds}
    return out


def validate_rules(rules: dict[str, Any]) -> dict[str, Any]:
    """Known keys with non-negative numbers, and custom ``kpis`` (``ValueError`` naming
    the bad one)."""
    out: dict[str, Any] = {}
    for key, value in rules.items():
        if key == "kpis":
            out["kpis"] = validate_kpis(value)
            continue
        if key not in DEFAULT_RULES:
            raise ValueError(f"unknown rule {key!r}; known: {', '.join(sorted(DEFAULT_RULES))}")
        try:
            number = float(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"rule {key} must be a number, got {value!r}") from exc
        if number < 0 or (key in ("hysteresis", *MIN_KPI_RULES) and number > 1):
            raise ValueError(f"rule {key} out of range: {number}")
        out[key] = number
    return out


def score(window: Window, ref: Reference) -> dict[str, Any]:
    """Drift per feature and of the predictions, and the KPIs, of one window."""
    out: dict[str, Any] = {"count": window.count, "devices": len(window.devices)}
    if window.features is not None and window.count:
        r, c = ref.counts, window.features
        psi = drift.psi(r, c)
        js = drift.jensen_shannon(r, c)
        ks = drift.ks_binned(r, c)
        chi = drift.chi_square(r, c)
        out["features"] = {
            name: {
                "psi": float(psi[i]),
                "js": float(js[i]),
                "ks": float(ks.statistic[i]),
                "ks_p": float(ks.pvalue[i]),
                **(
                    {"chi2": float(chi.statistic[i]), "chi2_p": float(chi.pvalue[i])}
                    if ref.kinds[i] == "categorical"
                    else {}
                ),
            }
            for i, name in enumerate(ref.names)
        }
    if ref.prediction_categories and window.predictions:
        cur = np.asarray([window.predictions.get(c, 0) for c in ref.prediction_categories])
        chi = drift.chi_square(ref.prediction_counts, cur)
        out["prediction"] = {
            "psi": float(drift.psi(ref.prediction_counts, cur)),
            "js": float(drift.jensen_shannon(ref.prediction_counts, cur)),
            "chi2": float(chi.statistic[0]),
            "chi2_p": float(chi.pvalue[0]),
            "unknown_labels": sorted(set(window.predictions) - set(ref.prediction_categories)),
        }
    out["prediction_counts"] = dict(window.predictions)
    kpis: dict[str, float] = {}
    if window.count:
        kpis["error_rate"] = window.errors / window.count
        kpis["low_confidence_rate"] = window.low_confidence / window.count
    p95 = quantile(window.latency_edges, window.latency, 0.95)
    if p95 is not None:
        kpis["latency_p95_ms"] = p95
    kpis.update(cbpe.estimate(window, ref.calibration))
    out["kpis"] = kpis
    return out


@dataclass(frozen=True)
class Judgement:
    """One rule on one window."""

    rule: str
    kind: str  # drift | kpi
    fired: bool
    clean: bool
    scores: dict[str, float]
    message: str


def judge(scores: dict[str, Any], rules: dict[str, Any]) -> list[Judgement]:
    """Every rule's judgement of a window (none when it has too few inferences)."""
    r = {**DEFAULT_RULES, **rules}
    if scores.get("count", 0) < r["min_count"]:
        return []
    h = r["hysteresis"]
    out: list[Judgement] = []
    features = scores.get("features") or {}
    if features:
        psis = {name: f["psi"] for name, f in features.items()}
        worst = max(psis, key=lambda n: psis[n])
        drifted = {n: v for n, v in psis.items() if v > r["drift_psi"]}
        out.append(
            Judgement(
                "drift_psi",
                "drift",
                bool(drifted),
                psis[worst] < r["drift_psi"] * h,
                {f"psi.{n}": v for n, v in sorted(psis.items())},
                _drift_message(drifted) if drifted else f"no feature drift (worst {worst})",
            )
        )
    pred = scores.get("prediction")
    if pred:
        v = pred["psi"]
        out.append(
            Judgement(
                "prediction_psi",
                "drift",
                v > r["prediction_psi"],
                v < r["prediction_psi"] * h,
                {"psi.prediction": v, "chi2_p.prediction": pred["chi2_p"]},
                f"prediction drift: PSI {v:.2f} (threshold {r['prediction_psi']:g})",
            )
        )
    for name, value in (scores.get("kpis") or {}).items():
        if name not in KPI_RULES:
            continue
        limit = r[name]
        out.append(
            Judgement(
                name,
                "kpi",
                value > limit,
                value < limit * h,
                {name: value},
                f"{name} {value:.4g} above {limit:g}",
            )
        )
    for name, value in (scores.get("kpis") or {}).items():
        if name not in MIN_KPI_RULES or not r[name]:
            continue
        least = r[name]
        out.append(
            Judgement(
                name,
                "kpi",
                value < least,
                1 - value < (1 - least) * h,
                {name: value},
                f"{name} {value:.3f} below {least:g} (label-free estimate, CBPE)",
            )
        )
    out.extend(_custom_kpis(scores, r.get("kpis") or {}, h))
    return out


def _custom_kpis(
    scores: dict[str, Any], kpis: dict[str, dict[str, Any]], h: float
) -> list[Judgement]:
    counts: dict[str, int] = scores.get("prediction_counts") or {}
    total = sum(counts.values())
    if not total:
        return []
    out = []
    for name, spec in sorted(kpis.items()):
        share = sum(counts.get(label, 0) for label in spec["predictions"]) / total
        high, low = spec.get("max"), spec.get("min")
        fired = (high is not None and share > high) or (low is not None and share < low)
        clean = (high is None or share < high * h) and (low is None or share * h > low)
        if high is not None and share > high:
            message = f"{name} {share:.1%} above {high:g}"
        elif low is not None and share < low:
            message = f"{name} {share:.1%} below {low:g}"
        else:
            message = f"{name} {share:.1%}"
        out.append(
            Judgement(
                f"kpi.{name}",
                "kpi",
                fired,
                clean,
                {f"kpi.{name}": share},
                message,
            )
        )
    return out


def _drift_message(drifted: dict[str, float]) -> str:
    worst_first = sorted(drifted.items(), key=lambda item: -item[1])
    return "feature drift: " + ", ".join(f"{n} PSI {v:.2f}" for n, v in worst_first)
