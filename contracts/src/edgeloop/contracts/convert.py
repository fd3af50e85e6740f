"""protobuf (edge wire) ↔ contract events (bus), so gRPC servicers stay thin.

The wire form is what an agent sends; the bus form is what the gateway publishes. Both
directions are lossless for every field the two forms share; what only one side has is
named in each function's docstring.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from edgeloop.contracts.edge.v1 import edge_pb2 as pb
from edgeloop.contracts.events import (
    DeviceState,
    DeviceStatusReported,
    Histogram,
    ShadowComparison,
    ShadowFlip,
    TelemetryBatch,
)

__all__ = [
    "BATCH_ID_NAMESPACE",
    "status_from_proto",
    "status_to_proto",
    "telemetry_from_proto",
    "telemetry_to_proto",
]

BATCH_ID_NAMESPACE = uuid.UUID("6f1c1b8e-5a57-4b0e-9d1e-6c2f3a0e7b41")
"""Namespace of the event ids derived from batch ids that are not UUIDs."""

_STATE_TO_PB: dict[DeviceState, pb.DeviceState.ValueType] = {
    DeviceState.IDLE: pb.DEVICE_STATE_IDLE,
    DeviceState.DOWNLOADING: pb.DEVICE_STATE_DOWNLOADING,
    DeviceState.ACTIVATING: pb.DEVICE_STATE_ACTIVATING,
    DeviceState.RUNNING: pb.DEVICE_STATE_RUNNING,
    DeviceState.FAILED: pb.DEVICE_STATE_FAILED,
    DeviceState.DEFERRED: pb.DEVICE_STATE_DEFERRED,
}
_STATE_FROM_PB = {v: k for k, v in _STATE_TO_PB.items()}

_SAMPLE_KEYS = frozenset({"features", "prediction", "confidence", "at", "label", "kind"})


def _ts(dt: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(dt.astimezone(UTC))
    return ts


def _dt(ts: Timestamp) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)


def _hist_to_pb(h: Histogram) -> pb.Histogram:
    return pb.Histogram(edges=h.edges, counts=h.counts)


def _hist_from_pb(h: pb.Histogram) -> Histogram:
    return Histogram(edges=list(h.edges), counts=list(h.counts))


def _sample_to_pb(sample: Mapping[str, Any], into: pb.Sample) -> None:
    unknown = set(sample) - _SAMPLE_KEYS
    if unknown:
        raise ValueError(
            f"telemetry sample has keys the wire form cannot carry: {sorted(unknown)} "
            f"(allowed: {sorted(_SAMPLE_KEYS)})"
        )
    into.features.extend(float(x) for x in sample.get("features", []))
    into.prediction = str(sample.get("prediction", ""))
    into.confidence = float(sample.get("confidence", 0.0))
    into.label = str(sample.get("label", ""))
    into.kind = str(sample.get("kind", ""))
    at = sample.get("at")
    if at is not None:
        when = at if isinstance(at, datetime) else datetime.fromisoformat(str(at))
        if when.tzinfo is None:
            raise ValueError(f"telemetry sample time {at!r} has no timezone")
        into.at.CopyFrom(_ts(when))


def _sample_from_pb(s: pb.Sample) -> dict[str, Any]:
    sample: dict[str, Any] = {
        "features": list(s.features),
        "prediction": s.prediction,
        "confidence": s.confidence,
    }
    if s.label:
        sample["label"] = s.label
    if s.kind:
        sample["kind"] = s.kind
    if s.HasField("at"):
        sample["at"] = _dt(s.at).isoformat()
    return sample


def _batch_event_id(device_id: str, batch_id: str) -> uuid.UUID:
    """The batch id is the event id, so a re-sent batch de-duplicates on the bus
    (``Nats-Msg-Id``); a batch id that is not a UUID maps to a stable UUID per device."""
    try:
        return uuid.UUID(batch_id)
    except ValueError:
        return uuid.uuid5(BATCH_ID_NAMESPACE, f"{device_id}/{batch_id}")


def telemetry_to_proto(ev: TelemetryBatch) -> pb.TelemetryBatch:
    """Bus form → wire form; ``event_id`` becomes ``batch_id``.

    Not carried: ``occurred_at`` (the gateway's receive time) and ``schema_version``.

    Raises:
        ValueError: a sample has a key the wire ``Sample`` has no field for.
    """
    msg = pb.TelemetryBatch(
        batch_id=str(ev.event_id),
        device_id=ev.device_id,
        model=ev.model,
        version=ev.version,
        digest=ev.digest or "",
        window_start=_ts(ev.window_start),
        window_end=_ts(ev.window_end),
        count=ev.count,
        errors=ev.errors,
        low_confidence=ev.low_confidence,
        feature_names=ev.feature_names,
        feature_histograms=[_hist_to_pb(h) for h in ev.feature_histograms],
        prediction_counts=ev.prediction_counts,
        dropped_batches=ev.dropped_batches,
        corrupt_batches=ev.corrupt_batches,
        trace_parent=ev.trace_parent or "",
    )
    if ev.confidence_histogram is not None:
        msg.confidence_histogram.CopyFrom(_hist_to_pb(ev.confidence_histogram))
    if ev.latency_ms_histogram is not None:
        msg.latency_ms_histogram.CopyFrom(_hist_to_pb(ev.latency_ms_histogram))
    for label, h in ev.confidence_by_prediction.items():
        msg.confidence_by_prediction[label].CopyFrom(_hist_to_pb(h))
    for sample in ev.samples:
        _sample_to_pb(sample, msg.samples.add())
    if ev.shadow is not None:
        msg.shadow.CopyFrom(_shadow_to_pb(ev.shadow))
    return msg


def _shadow_to_pb(c: ShadowComparison) -> pb.ShadowComparison:
    msg = pb.ShadowComparison(
        rollout_id=str(c.rollout_id) if c.rollout_id else "",
        champion_version=c.champion_version,
        champion_digest=c.champion_digest or "",
        compared=c.compared,
        agreed=c.agreed,
        flips=[
            pb.Flip(champion=f.champion, challenger=f.challenger, count=f.count) for f in c.flips
        ],
        champion_prediction_counts=c.champion_prediction_counts,
        sampled_out=c.sampled_out,
        skipped_budget=c.skipped_budget,
        overhead=c.overhead,
    )
    if c.champion_latency_ms_histogram is not None:
        msg.champion_latency_ms_histogram.CopyFrom(_hist_to_pb(c.champion_latency_ms_histogram))
    return msg


def _shadow_from_pb(msg: pb.ShadowComparison) -> ShadowComparison:
    return ShadowComparison(
        rollout_id=uuid.UUID(msg.rollout_id) if msg.rollout_id else None,
        champion_version=msg.champion_version,
        champion_digest=msg.champion_digest or None,
        compared=msg.compared,
        agreed=msg.agreed,
        flips=[
            ShadowFlip(champion=f.champion, challenger=f.challenger, count=f.count)
            for f in msg.flips
        ],
        champion_prediction_counts=dict(msg.champion_prediction_counts),
        champion_latency_ms_histogram=_hist_from_pb(msg.champion_latency_ms_histogram)
        if msg.HasField("champion_latency_ms_histogram")
        else None,
        sampled_out=msg.sampled_out,
        skipped_budget=msg.skipped_budget,
        overhead=msg.overhead,
    )


def telemetry_from_proto(msg: pb.TelemetryBatch, group: str | None = None) -> TelemetryBatch:
    """Wire form → bus form; the batch id becomes the event id (de-duplication).

    ``occurred_at`` is now (the wire form has no such field); ``group`` is the device's
    group as the gateway knows it from its labels.

    Raises:
        ValueError: ``batch_id`` or a window bound is missing.
        pydantic.ValidationError: the batch breaks the event's rules (e.g. no model).
    """
    if not msg.batch_id:
        raise ValueError("telemetry batch has no batch_id (needed to acknowledge it)")
    for bound in ("window_start", "window_end"):
        if not msg.HasField(bound):
            raise ValueError(f"telemetry batch {msg.batch_id} has no {bound}")
    return TelemetryBatch(
        event_id=_batch_event_id(msg.device_id, msg.batch_id),
        device_id=msg.device_id,
        model=msg.model,
        version=msg.version,
        digest=msg.digest or None,
        window_start=_dt(msg.window_start),
        window_end=_dt(msg.window_end),
        count=msg.count,
        errors=msg.errors,
        low_confidence=msg.low_confidence,
        feature_names=list(msg.feature_names),
        feature_histograms=[_hist_from_pb(h) for h in msg.feature_histograms],
        prediction_counts=dict(msg.prediction_counts),
        confidence_histogram=_hist_from_pb(msg.confidence_histogram)
        if msg.HasField("confidence_histogram")
        else None,
        latency_ms_histogram=_hist_from_pb(msg.latency_ms_histogram)
        if msg.HasField("latency_ms_histogram")
        else None,
        confidence_by_prediction={
            label: _hist_from_pb(h) for label, h in msg.confidence_by_prediction.items()
        },
        samples=[_sample_from_pb(s) for s in msg.samples],
        dropped_batches=msg.dropped_batches,
        corrupt_batches=msg.corrupt_batches,
        trace_parent=msg.trace_parent or None,
        group=group,
        shadow=_shadow_from_pb(msg.shadow) if msg.HasField("shadow") else None,
    )


def status_to_proto(ev: DeviceStatusReported) -> pb.StatusReport:
    """Bus form → wire form; ``occurred_at`` becomes ``reported_at``.

    Not carried: ``event_id``, ``device_id`` and ``labels`` (the session's identity and
    Hello give them) and ``schema_version``.

    Raises:
        ValueError: the state is ``offline``, which only the gateway reports.
    """
    if ev.state not in _STATE_TO_PB:
        raise ValueError(
            f"device state {ev.state.value!r} is the gateway's view of a device, "
            "not something an agent reports"
        )
    msg = pb.StatusReport(
        state=_STATE_TO_PB[ev.state],
        model=ev.model or "",
        version=ev.version or "",
        digest=ev.digest or "",
        desired_digest=ev.desired_digest or "",
        rollout_id=str(ev.rollout_id) if ev.rollout_id else "",
        error=ev.error or "",
        reported_at=_ts(ev.occurred_at),
        trace_parent=ev.trace_parent or "",
        desired_revision=ev.desired_revision or 0,
    )
    if ev.deferred_since is not None:
        msg.deferred_since.CopyFrom(_ts(ev.deferred_since))
    if ev.deferred_until is not None:
        msg.deferred_until.CopyFrom(_ts(ev.deferred_until))
    return msg


def status_from_proto(
    msg: pb.StatusReport, device_id: str, labels: Mapping[str, str] | None = None
) -> DeviceStatusReported:
    """Wire form → bus form.

    Args:
        msg: the agent's report.
        device_id: the session's authenticated identity (never a field the agent sends).
        labels: the labels of the session's Hello.

    Raises:
        ValueError: the state is unspecified or unknown, or ``rollout_id`` is not a UUID.
    """
    if msg.state not in _STATE_FROM_PB:
        raise ValueError(f"status report has no valid state ({msg.state})")
    try:
        rollout_id = uuid.UUID(msg.rollout_id) if msg.rollout_id else None
    except ValueError:
        raise ValueError(f"status report's rollout_id {msg.rollout_id!r} is not a UUID") from None
    return DeviceStatusReported(
        device_id=device_id,
        state=_STATE_FROM_PB[msg.state],
        model=msg.model or None,
        version=msg.version or None,
        digest=msg.digest or None,
        desired_digest=msg.desired_digest or None,
        rollout_id=rollout_id,
        labels=dict(labels or {}),
        error=msg.error or None,
        occurred_at=_dt(msg.reported_at) if msg.HasField("reported_at") else datetime.now(UTC),
        trace_parent=msg.trace_parent or None,
        desired_revision=msg.desired_revision or None,
        deferred_since=_dt(msg.deferred_since) if msg.HasField("deferred_since") else None,
        deferred_until=_dt(msg.deferred_until) if msg.HasField("deferred_until") else None,
    )
