"""protobuf ↔ event converters: lossless both ways, strict on what an agent may not send."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from edgeloop.contracts.convert import (
    status_from_proto,
    status_to_proto,
    telemetry_from_proto,
    telemetry_to_proto,
)
from edgeloop.contracts.edge.v1 import edge_pb2 as pb
from edgeloop.contracts.events import (
    DeviceState,
    DeviceStatusReported,
    Histogram,
    ShadowComparison,
    ShadowFlip,
    TelemetryBatch,
)

NOW = datetime(2026, 11, 24, 12, 0, 0, 123456, tzinfo=UTC)
TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
RID = uuid.uuid4()


def _wire(msg: pb.TelemetryBatch) -> pb.TelemetryBatch:
    """Through bytes, as the gateway receives it."""
    return pb.TelemetryBatch.FromString(msg.SerializeToString())


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
        confidence_by_prediction={
            "0": Histogram(edges=[0.5, 0.9], counts=[0, 30, 170]),
            "1": Histogram(edges=[0.5, 0.9], counts=[7, 20, 29]),
        },
        latency_ms_histogram=Histogram(edges=[1.0, 5.0], counts=[200, 50, (1 << 63) + 1]),
        samples=[
            {"features": [0.1, 2.0], "prediction": "1", "confidence": 0.51, "at": NOW.isoformat()},
            {"features": [1e-300, -3.5], "prediction": "0", "confidence": 0.2, "label": "1"},
        ],
        dropped_batches=3,
        trace_parent=TRACE,
    )


def test_telemetry_event_to_proto_and_back_is_lossless() -> None:
    ev = _batch()
    back = telemetry_from_proto(_wire(telemetry_to_proto(ev)))
    # occurred_at is the gateway's receive time: the wire form has no such field
    assert back.model_dump(exclude={"occurred_at"}) == ev.model_dump(exclude={"occurred_at"})
    assert back.event_id == ev.event_id  # the batch id de-duplicates re-sends


def test_telemetry_proto_to_event_and_back_is_lossless() -> None:
    msg = telemetry_to_proto(_batch())
    assert telemetry_to_proto(telemetry_from_proto(_wire(msg))) == msg


def test_a_challenger_batch_keeps_its_comparison_both_ways() -> None:
    shadow = ShadowComparison(
        rollout_id=RID,
        champion_version="2",
        champion_digest="sha256:" + "d" * 64,
        compared=256,
        agreed=250,
        flips=[ShadowFlip(champion="0", challenger="1", count=6)],
        champion_prediction_counts={"0": 206, "1": 50},
        champion_latency_ms_histogram=Histogram(edges=[1.0], counts=[200, 56]),
        sampled_out=1000,
        skipped_budget=16,
        overhead=0.25,
    )
    ev = _batch().model_copy(update={"shadow": shadow})
    back = telemetry_from_proto(_wire(telemetry_to_proto(ev)))
    assert back.shadow == shadow
    assert telemetry_from_proto(_wire(telemetry_to_proto(_batch()))).shadow is None


def test_a_minimal_batch_keeps_its_absent_parts_absent() -> None:
    start = pb.TelemetryBatch(batch_id=str(uuid.uuid4()), device_id="d", model="m", version="1")
    start.window_start.FromDatetime(NOW)
    start.window_end.FromDatetime(NOW)
    ev = telemetry_from_proto(_wire(start))
    assert ev.confidence_histogram is None
    assert ev.latency_ms_histogram is None
    assert ev.digest is None
    assert ev.trace_parent is None
    assert ev.samples == []
    again = telemetry_to_proto(ev)
    assert not again.HasField("confidence_histogram")
    assert again == start


def test_per_class_confidences_cannot_count_more_than_their_class() -> None:
    ok = _batch().model_copy(update={"latency_ms_histogram": None})  # (its counts overflow)
    assert ok.inconsistency() is None
    h = Histogram(edges=[0.5, 0.9], counts=[0, 0, 57])
    bad = ok.model_copy(update={"confidence_by_prediction": {"1": h}})
    assert bad.inconsistency() == (
        "the confidence histogram of prediction '1' counts 57 of 56 such predictions"
    )


def test_a_batch_id_that_is_not_a_uuid_maps_to_a_stable_event_id() -> None:
    msg = telemetry_to_proto(_batch())
    msg.batch_id = "42"
    first = telemetry_from_proto(msg).event_id
    assert telemetry_from_proto(msg).event_id == first  # a re-send de-duplicates
    msg.device_id = "dev-2"
    assert telemetry_from_proto(msg).event_id != first  # another device's batch 42


@pytest.mark.parametrize("missing", ["batch_id", "window_start", "window_end"])
def test_a_batch_without_its_identity_or_window_is_refused(missing: str) -> None:
    msg = telemetry_to_proto(_batch())
    msg.ClearField(missing)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=missing):
        telemetry_from_proto(msg)


def test_a_sample_the_wire_cannot_carry_is_refused() -> None:
    ev = _batch().model_copy(update={"samples": [{"features": [1.0], "image": "…"}]})
    with pytest.raises(ValueError, match="image"):
        telemetry_to_proto(ev)


def test_a_sample_time_may_be_a_datetime() -> None:
    ev = _batch().model_copy(update={"samples": [{"features": [1.0], "at": NOW}]})
    sample = telemetry_to_proto(ev).samples[0]
    assert sample.at.ToDatetime(tzinfo=UTC) == NOW


def _status(state: DeviceState) -> DeviceStatusReported:
    return DeviceStatusReported(
        device_id="dev-1",
        state=state,
        model="iris",
        version="3",
        digest="sha256:" + "d" * 64,
        desired_digest="sha256:" + "e" * 64,
        rollout_id=RID,
        error="warm-up failed" if state is DeviceState.FAILED else None,
        occurred_at=NOW,
        labels={"site": "a"},
        trace_parent=TRACE,
        deferred_since=NOW if state is DeviceState.DEFERRED else None,
        deferred_until=NOW + timedelta(hours=1) if state is DeviceState.DEFERRED else None,
    )


AGENT_STATES = [s for s in DeviceState if s is not DeviceState.OFFLINE]


@pytest.mark.parametrize("state", AGENT_STATES, ids=lambda s: s.value)
def test_status_event_to_proto_and_back_is_lossless(state: DeviceState) -> None:
    ev = _status(state)
    wire = pb.StatusReport.FromString(status_to_proto(ev).SerializeToString())
    back = status_from_proto(wire, "dev-1", {"site": "a"})
    # a report is a new event each time: its id is the gateway's
    assert back.model_dump(exclude={"event_id"}) == ev.model_dump(exclude={"event_id"})


@pytest.mark.parametrize("state", AGENT_STATES, ids=lambda s: s.value)
def test_status_proto_to_event_and_back_is_lossless(state: DeviceState) -> None:
    msg = status_to_proto(_status(state))
    assert status_to_proto(status_from_proto(msg, "dev-1")) == msg


def test_an_idle_device_reports_nothing_running() -> None:
    ev = status_from_proto(pb.StatusReport(state=pb.DEVICE_STATE_IDLE), "dev-1")
    assert (ev.model, ev.digest, ev.rollout_id, ev.error) == (None, None, None, None)
    assert ev.occurred_at.tzinfo is not None  # no reported_at: the time it arrived


def test_offline_is_not_an_agent_state() -> None:
    with pytest.raises(ValueError, match="gateway"):
        status_to_proto(_status(DeviceState.OFFLINE))


def test_a_status_without_a_state_is_refused() -> None:
    with pytest.raises(ValueError, match="no valid state"):
        status_from_proto(pb.StatusReport(), "dev-1")
    with pytest.raises(ValueError, match="no valid state"):
        status_from_proto(pb.StatusReport(state=99), "dev-1")  # type: ignore[arg-type]


def test_a_malformed_rollout_id_is_refused_clearly() -> None:
    msg = pb.StatusReport(state=pb.DEVICE_STATE_RUNNING, rollout_id="not-a-uuid")
    with pytest.raises(ValueError, match="rollout_id 'not-a-uuid' is not a UUID"):
        status_from_proto(msg, "dev-1")
