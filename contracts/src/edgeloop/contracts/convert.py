"""protobuf ↔ contract models, for the gateway (thin servicers, converters here)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from edgeloop.contracts.edge.v1 import edge_pb2 as pb
from edgeloop.contracts.events import DeviceState, DeviceStatusReported, Histogram, TelemetryBatch

_STATE_TO_PB = {
    DeviceState.IDLE: pb.DEVICE_STATE_IDLE,
    DeviceState.DOWNLOADING: pb.DEVICE_STATE_DOWNLOADING,
    DeviceState.ACTIVATING: pb.DEVICE_STATE_ACTIVATING,
    DeviceState.RUNNING: pb.DEVICE_STATE_RUNNING,
    DeviceState.FAILED: pb.DEVICE_STATE_FAILED,
}
_STATE_FROM_PB = {v: k for k, v in _STATE_TO_PB.items()}


def _ts(dt: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(dt.astimezone(UTC))
    return ts


def _dt(ts: Timestamp) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)


def _hist_to_pb(h: Histogram | None) -> pb.Histogram | None:
    return None if h is None else pb.Histogram(edges=h.edges, counts=h.counts)


def _hist_from_pb(h: pb.Histogram) -> Histogram:
    return Histogram(edges=list(h.edges), counts=list(h.counts))


def telemetry_to_proto(ev: TelemetryBatch) -> pb.TelemetryBatch:
    """Bus form → wire form (samples keep features, prediction, confidence)."""
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
        feature_histograms=[
            pb.Histogram(edges=h.edges, counts=h.counts) for h in ev.feature_histograms
        ],
        prediction_counts=ev.prediction_counts,
        dropped_batches=ev.dropped_batches,
    )
    for field, hist in (
        ("confidence_histogram", ev.confidence_histogram),
        ("latency_ms_histogram", ev.latency_ms_histogram),
    ):
        converted = _hist_to_pb(hist)
        if converted is not None:
            getattr(msg, field).CopyFrom(converted)
    for s in ev.samples:
        sample = msg.samples.add(
            features=s.get("features", []),
            prediction=str(s.get("prediction", "")),
            confidence=float(s.get("confidence", 0.0)),
        )
        if "at" in s:
            sample.at.CopyFrom(_ts(datetime.fromisoformat(str(s["at"]))))
    return msg


def telemetry_from_proto(msg: pb.TelemetryBatch) -> TelemetryBatch:
    """Wire form → bus form; the batch id becomes the event id (de-duplication)."""
    samples = []
    for s in msg.samples:
        sample: dict[str, object] = {
            "features": list(s.features),
            "prediction": s.prediction,
            "confidence": s.confidence,
        }
        if s.HasField("at"):
            sample["at"] = _dt(s.at).isoformat()
        samples.append(sample)
    return TelemetryBatch(
        event_id=uuid.UUID(msg.batch_id) if msg.batch_id else uuid.uuid4(),
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
        samples=samples,
        dropped_batches=msg.dropped_batches,
    )


def status_to_proto(ev: DeviceStatusReported) -> pb.StatusReport:
    """Bus form → wire form."""
    return pb.StatusReport(
        state=_STATE_TO_PB.get(ev.state, pb.DEVICE_STATE_UNSPECIFIED),
        model=ev.model or "",
        version=ev.version or "",
        digest=ev.digest or "",
        desired_digest=ev.desired_digest or "",
        rollout_id=str(ev.rollout_id) if ev.rollout_id else "",
        error=ev.error or "",
        reported_at=_ts(ev.occurred_at),
    )


def status_from_proto(
    msg: pb.StatusReport, device_id: str, labels: dict[str, str] | None = None
) -> DeviceStatusReported:
    """Wire form → bus form; ``device_id`` comes from the authenticated session."""
    if msg.state not in _STATE_FROM_PB:
        raise ValueError(f"status report has no valid state ({msg.state})")
    return DeviceStatusReported(
        device_id=device_id,
        state=_STATE_FROM_PB[msg.state],
        model=msg.model or None,
        version=msg.version or None,
        digest=msg.digest or None,
        desired_digest=msg.desired_digest or None,
        rollout_id=uuid.UUID(msg.rollout_id) if msg.rollout_id else None,
        labels=labels or {},
        error=msg.error or None,
        occurred_at=_dt(msg.reported_at) if msg.HasField("reported_at") else datetime.now(UTC),
    )
