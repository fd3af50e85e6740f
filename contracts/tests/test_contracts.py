"""Every contract: JSON round trip, frozen, strict, identified; proto converters lossless."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from edgeloop.contracts import subjects as s
from edgeloop.contracts.convert import (
    status_from_proto,
    status_to_proto,
    telemetry_from_proto,
    telemetry_to_proto,
)
from edgeloop.contracts.edge.v1 import edge_pb2 as pb
from edgeloop.contracts.events import (
    EVENTS_BY_SUBJECT,
    LIFECYCLE_EVENTS,
    ArtifactRef,
    DatasetSelection,
    DeviceState,
    DeviceStatusReported,
    Event,
    Histogram,
    ImageBuildFailed,
    TelemetryBatch,
    WavePlan,
)

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
ART = ArtifactRef(digest="sha256:" + "a" * 64, size=10, media_type="application/x")
RID = uuid.uuid4()

# The fields each event requires, beyond the common ones.
REQUIRED: dict[str, dict[str, Any]] = {
    "ModelCommitted": {"repository": "r", "model_artifact": ART},
    "ImageBuilt": {"image": "h/m", "digest": "sha256:" + "b" * 64, "size": 1},
    "ImageBuildFailed": {"reason": "x"},
    "ValidationPassed": {"image": "h/m", "digest": "sha256:" + "b" * 64},
    "ValidationFailed": {"reasons": ["x"]},
    "RolloutRequested": {"rollout_id": RID, "selector": {"a": "b"}, "waves": [WavePlan(count=1)]},
    "RolloutWaveStarted": {"rollout_id": RID, "wave": 0},
    "RolloutWaveSucceeded": {"rollout_id": RID, "wave": 0},
    "RolloutWaveFailed": {"rollout_id": RID, "wave": 0, "reason": "x"},
    "RolloutCompleted": {"rollout_id": RID},
    "RolloutRolledBack": {"rollout_id": RID, "reason": "x"},
    "RolloutPaused": {"rollout_id": RID},
    "RolloutResumed": {"rollout_id": RID},
    "RolloutAborted": {"rollout_id": RID},
    "CanaryVerdict": {"rollout_id": RID, "wave": 1, "verdict": "fail"},
    "AlarmRaised": {"alarm_id": RID, "kind": "drift", "rule": "psi"},
    "AlarmResolved": {"alarm_id": RID, "rule": "psi"},
    "RetrainRequested": {
        "request_id": RID,
        "reason": "drift",
        "dataset": DatasetSelection(kinds=["low-confidence"]),
    },
}


def make(cls: type[Event]) -> Event:
    return cls(model="iris", version="3", **REQUIRED[cls.__name__])  # type: ignore[call-arg]


@pytest.mark.parametrize("cls", LIFECYCLE_EVENTS, ids=lambda c: c.__name__)
def test_event_round_trips_and_is_strict(cls: type[Event]) -> None:
    ev = make(cls)
    assert cls.from_json(ev.to_json()) == ev
    assert isinstance(ev.event_id, uuid.UUID)
    assert ev.occurred_at.tzinfo is not None
    assert ev.schema_version == 1
    assert cls.subject in EVENTS_BY_SUBJECT
    assert EVENTS_BY_SUBJECT[cls.subject] is cls
    with pytest.raises(ValidationError):
        ev.model = "other"  # type: ignore[misc]  # frozen
    data = ev.model_dump(mode="json")
    data["unexpected"] = 1
    with pytest.raises(ValidationError, match="unexpected"):
        cls.model_validate(data)


def test_every_lifecycle_subject_is_in_the_lifecycle_stream() -> None:
    roots = {p.removesuffix(".>") for p in s.LIFECYCLE_SUBJECTS}
    for subject in EVENTS_BY_SUBJECT:
        assert subject.split(".")[0] in roots, subject


def test_subject_tokens_are_sanitised() -> None:
    assert s.telemetry_subject("my.model", "dev 1*") == "device.telemetry.my_model.dev_1_"
    assert s.dlq_subject("model.committed") == "dlq.model.committed"
    assert s.kv_key("dev:1/a") == "dev_1/a"
    with pytest.raises(ValueError, match="empty"):
        s.device_status_subject("")


def test_naive_timestamps_are_refused() -> None:
    with pytest.raises(ValidationError, match="timezone"):
        ImageBuildFailed(model="m", version="1", reason="x", occurred_at=datetime(2026, 1, 1))


def _batch() -> TelemetryBatch:
    return TelemetryBatch(
        model="iris",
        version="3",
        device_id="dev-1",
        digest="sha256:" + "c" * 64,
        window_start=NOW,
        window_end=NOW + timedelta(seconds=10),
        count=256,
        errors=2,
        low_confidence=7,
        feature_names=["a", "b"],
        feature_histograms=[
            Histogram(edges=[0.0, 1.0], counts=[1, 250, 5]),
            Histogram(edges=[2.5], counts=[128, 128]),
        ],
        prediction_counts={"0": 200, "1": 56},
        confidence_histogram=Histogram(edges=[0.5, 0.9], counts=[7, 50, 199]),
        latency_ms_histogram=Histogram(edges=[1.0, 5.0], counts=[200, 50, 6]),
        samples=[
            {"features": [0.1, 2.0], "prediction": "1", "confidence": 0.51, "at": NOW.isoformat()},
        ],
        dropped_batches=3,
    )


def test_telemetry_converts_both_ways_without_loss() -> None:
    ev = _batch()
    wire = pb.TelemetryBatch.FromString(telemetry_to_proto(ev).SerializeToString())
    back = telemetry_from_proto(wire)
    assert back.model_dump(exclude={"occurred_at"}) == ev.model_dump(exclude={"occurred_at"})
    assert back.event_id == ev.event_id  # the batch id de-duplicates re-sends


def test_status_converts_both_ways() -> None:
    ev = DeviceStatusReported(
        device_id="dev-1",
        state=DeviceState.FAILED,
        model="iris",
        version="3",
        digest="sha256:" + "d" * 64,
        desired_digest="sha256:" + "e" * 64,
        rollout_id=RID,
        error="warm-up failed",
        occurred_at=NOW,
        labels={"site": "a"},
    )
    back = status_from_proto(status_to_proto(ev), "dev-1", {"site": "a"})
    assert back.model_dump(exclude={"event_id"}) == ev.model_dump(exclude={"event_id"})


def test_status_without_state_is_refused() -> None:
    with pytest.raises(ValueError, match="no valid state"):
        status_from_proto(pb.StatusReport(), "dev-1")


def test_proto_messages_round_trip() -> None:
    msg = pb.GatewayMessage(
        desired=pb.DesiredState(
            model="iris",
            version="3",
            manifest_digest="sha256:" + "f" * 64,
            signature=b"\x01\x02",
            explicit_rollback=True,
            revision=7,
        )
    )
    back = pb.GatewayMessage.FromString(msg.SerializeToString())
    assert back.WhichOneof("kind") == "desired"
    assert back.desired.revision == 7
    assert back.desired.explicit_rollback
    chunk = pb.ArtifactChunk(digest="sha256:x", offset=1 << 33, data=b"abc", last=True)
    assert pb.ArtifactChunk.FromString(chunk.SerializeToString()).offset == 1 << 33
