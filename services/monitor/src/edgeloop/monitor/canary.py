"""Canary verdicts: a rollout wave's cohort (the devices on the new version) against the
baseline (devices of the same model still on another version), over the same window.

The monitor follows waves from the deployer's events (``rollout.wave.started`` opens a
cohort, ``…succeeded``/``…failed`` closes it); each judged window of the cohort's
version is compared with the other versions' windows of the same period, and a
``CanaryVerdict`` is published when the verdict changes:

- **fail** when the canary's error rate exceeds the baseline's by more than
  ``canary_error_rate_delta``, its latency p95 is over ``canary_latency_ratio`` times the
  baseline's (and more than ``canary_latency_margin_ms`` slower), or its prediction
  distribution differs from the baseline's on the same inputs (PSI over
  ``canary_prediction_psi``);
- **inconclusive** while either side has fewer than ``min_count`` inferences or
  ``min_devices`` devices;
- **pass** otherwise.

A fail must hold without any single device of either side (``compare_robust``): a device
it rests on alone is trimmed, named in the verdict and counted as ``implausible``.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeloop.contracts import subjects as s
from edgeloop.contracts.events import (
    CanaryVerdict,
    RolloutWaveFailed,
    RolloutWaveStarted,
    RolloutWaveSucceeded,
    Verdict,
)
from edgeloop.kit.bus import ConsumerSpec
from edgeloop.kit.consumer import Tx
from edgeloop.kit.db import Conn
from edgeloop.kit.outbox import add_event
from edgeloop.kit.service import Service
from edgeloop.monitor import drift
from edgeloop.monitor.aggregate import Window, quantile
from edgeloop.monitor.robust import record_rejection
from edgeloop.monitor.rules import DEFAULT_RULES

if TYPE_CHECKING:
    from edgeloop.monitor.evaluate import Slot

log = logging.getLogger(__name__)


def compare(
    canary: Window, baseline: Window, rules: dict[str, Any]
) -> tuple[Verdict, list[str], dict[str, float]]:
    """The verdict of one window's canary against its baseline."""
    r = {**DEFAULT_RULES, **rules}
    if canary.count < r["min_count"] or baseline.count < r["min_count"]:
        return (
            Verdict.INCONCLUSIVE,
            [f"too few inferences (canary {canary.count}, baseline {baseline.count})"],
            {"canary_count": canary.count, "baseline_count": baseline.count},
        )
    reasons: list[str] = []
    c_err, b_err = canary.errors / canary.count, baseline.errors / baseline.count
    metrics = {
        "canary_count": float(canary.count),
        "baseline_count": float(baseline.count),
        "canary_error_rate": c_err,
        "baseline_error_rate": b_err,
    }
    if c_err - b_err > r["canary_error_rate_delta"]:
        reasons.append(f"error rate {c_err:.1%} against {b_err:.1%} in the baseline")
    c_p95 = quantile(canary.latency_edges, canary.latency, 0.95)
    b_p95 = quantile(baseline.latency_edges, baseline.latency, 0.95)
    if c_p95 is not None and b_p95 is not None:
        metrics |= {"canary_latency_p95_ms": c_p95, "baseline_latency_p95_ms": b_p95}
        # a ratio of sub-millisecond bin edges means nothing: the margin must be real too
        slower = c_p95 - b_p95 > r["canary_latency_margin_ms"]
        if b_p95 > 0 and c_p95 > b_p95 * r["canary_latency_ratio"] and slower:
            reasons.append(f"latency p95 {c_p95:g} ms against {b_p95:g} ms in the baseline")
    labels = sorted(set(canary.predictions) | set(baseline.predictions))
    if labels:
        c = np.asarray([canary.predictions.get(k, 0) for k in labels])
        b = np.asarray([baseline.predictions.get(k, 0) for k in labels])
        psi = float(drift.psi(b, c))
        metrics["prediction_psi"] = psi
        if psi > r["canary_prediction_psi"]:
            reasons.append(
                f"predictions differ from the baseline's on the same inputs (PSI {psi:.2f})"
            )
    return (Verdict.FAIL if reasons else Verdict.PASS), reasons, metrics


def compare_robust(
    canary: Window, baseline: Window, rules: dict[str, Any]
) -> tuple[Verdict, list[str], dict[str, float], dict[str, str]]:
    """The verdict of a canary against its baseline, robust to one bad device: reasons,
    metrics and the trimmed devices (device → why)."""
    r = {**DEFAULT_RULES, **rules}
    k = r["min_devices"]
    nc, nb = len(canary.devices), len(baseline.devices)
    sizes = {"canary_devices": float(nc), "baseline_devices": float(nb)}
    if nc < k or nb < k:
        why = f"evidence from {nc} canary and {nb} baseline devices; {k:g} needed on each side"
        return Verdict.INCONCLUSIVE, [why], sizes, {}
    verdict, reasons, metrics = compare(canary, baseline, r)
    metrics |= sizes
    if verdict is not Verdict.FAIL:
        return verdict, reasons, metrics, {}
    # a device is left out of both sides at once (it may claim to run both versions)
    trimmed: dict[str, str] = {}
    for device in sorted(set(canary.by_device) | set(baseline.by_device)):
        without = {device}
        if compare(canary.without(without), baseline.without(without), r)[0] is not Verdict.FAIL:
            trimmed[device] = "the canary fails only with this device"
    if not trimmed:
        return verdict, reasons, metrics, {}
    c, b = canary.without(set(trimmed)), baseline.without(set(trimmed))
    if len(c.devices) < k or len(b.devices) < k:
        verdict, reasons = (
            Verdict.INCONCLUSIVE,
            [f"fewer than {k:g} devices on a side once outliers are trimmed"],
        )
    else:
        verdict, reasons, metrics = compare(c, b, r)
        metrics |= sizes
    metrics["trimmed_devices"] = float(len(trimmed))
    named = [f"device {d} trimmed: {why}" for d, why in sorted(trimmed.items())]
    return verdict, [*reasons, *named], metrics, trimmed


async def judge_cohorts(
    conn: Conn, schema: str, at: Slot, window: Window, rules: dict[str, Any]
) -> None:
    """After a window of a version (and device group) was judged: the verdict of each
    open cohort of that version against the same group's other versions, published when
    it changed."""
    model, version, start = at.model, at.version, at.start
    cohorts = await conn.fetch(
        """SELECT rollout_id, wave, last_verdict FROM cohorts
           WHERE model = $1 AND version = $2 AND ended_at IS NULL AND started_at <= $3
           FOR UPDATE""",
        model,
        version,
        start,
    )
    if not cohorts:
        return
    rows = await conn.fetch(
        "SELECT aggregate FROM windows WHERE model = $1 AND version <> $2 AND grp = $3 "
        "AND window_start = $4",
        model,
        version,
        at.group,
        start,
    )
    baseline = Window()
    for row in rows:
        baseline.merge(Window.from_json(json.loads(row["aggregate"])))
    verdict, reasons, metrics, trimmed = compare_robust(window, baseline, rules)
    for device, why in trimmed.items():
        await record_rejection(
            conn, device, "implausible", f"{model}@{version} canary {start.isoformat()}: {why}"
        )
    # published again when the verdict or the devices it trimmed change
    state = " ".join([verdict.value, *sorted(trimmed)])
    for cohort in cohorts:
        if cohort["last_verdict"] == state:
            continue
        await conn.execute(
            "UPDATE cohorts SET last_verdict = $3 WHERE rollout_id = $1 AND wave = $2",
            cohort["rollout_id"],
            cohort["wave"],
            state,
        )
        await add_event(
            conn,
            schema,
            CanaryVerdict(
                rollout_id=cohort["rollout_id"],
                model=model,
                version=version,
                wave=cohort["wave"],
                verdict=verdict,
                reasons=reasons,
                metrics=metrics,
                trimmed_devices=trimmed,
            ),
        )
        log.info(
            "canary verdict for rollout %s wave %d: %s %s",
            cohort["rollout_id"],
            cohort["wave"],
            verdict.value,
            reasons,
        )


def register_cohort_handlers(svc: Service) -> None:
    """Follow rollout waves."""

    def spec(durable: str, subject: str) -> ConsumerSpec:
        return ConsumerSpec(stream=s.STREAM_LIFECYCLE, durable=durable, filter_subjects=(subject,))

    @svc.consume(RolloutWaveStarted, spec("monitor-wave-started", s.ROLLOUT_WAVE_STARTED))
    async def on_wave_started(event: RolloutWaveStarted, tx: Tx) -> None:
        await tx.conn.execute(
            """INSERT INTO cohorts (rollout_id, wave, model, version, devices, started_at)
               VALUES ($1, $2, $3, $4, $5::jsonb, $6) ON CONFLICT DO NOTHING""",
            event.rollout_id,
            event.wave,
            event.model,
            event.version,
            json.dumps(event.devices),
            event.occurred_at,
        )

    async def close(event: Any, tx: Tx) -> None:
        await tx.conn.execute(
            "UPDATE cohorts SET ended_at = $3 WHERE rollout_id = $1 AND wave = $2",
            event.rollout_id,
            event.wave,
            event.occurred_at,
        )

    @svc.consume(RolloutWaveSucceeded, spec("monitor-wave-succeeded", s.ROLLOUT_WAVE_SUCCEEDED))
    async def on_wave_succeeded(event: RolloutWaveSucceeded, tx: Tx) -> None:
        await close(event, tx)

    @svc.consume(RolloutWaveFailed, spec("monitor-wave-failed", s.ROLLOUT_WAVE_FAILED))
    async def on_wave_failed(event: RolloutWaveFailed, tx: Tx) -> None:
        await close(event, tx)
