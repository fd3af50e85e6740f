"""Every event in ``edgeloop.contracts.events``: JSON round trip, frozen, strict, identified,
and published on a subject constant from ``edgeloop.contracts.subjects``.

The events are discovered from the ``Event`` class tree, so a new event is covered as soon
as it gets an example in ``EXAMPLES`` (and fails here until it does).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from edgeloop.contracts import events as ev
from edgeloop.contracts import subjects as s

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
DIGEST = "sha256:" + "b" * 64
ART = ev.ArtifactRef(digest="sha256:" + "a" * 64, size=10, media_type="application/x")
RID = uuid.uuid4()
REF = {"model": "iris", "version": "3"}

# A valid instance of each event, with its required fields (and a few optional ones).
EXAMPLES: dict[type[ev.Event], Callable[[], ev.Event]] = {
    ev.ModelCommitted: lambda: ev.ModelCommitted(
        **REF, repository="models/iris", model_artifact=ART, parent=ev.ModelRef(**REF)
    ),
    ev.ImageBuilt: lambda: ev.ImageBuilt(**REF, image="h/m", digest=DIGEST, size=1),
    ev.ImageBuildFailed: lambda: ev.ImageBuildFailed(**REF, reason="x", attempts=3),
    ev.ValidationPassed: lambda: ev.ValidationPassed(
        **REF, image="h/m", digest=DIGEST, metrics={"accuracy": 0.97}
    ),
    ev.ValidationFailed: lambda: ev.ValidationFailed(**REF, reasons=["accuracy 0.5 < 0.9"]),
    ev.RolloutRequested: lambda: ev.RolloutRequested(
        **REF,
        rollout_id=RID,
        selector={"site": "a"},
        waves=[ev.WavePlan(count=1), ev.WavePlan(percent=50.0)],
    ),
    ev.RolloutWaveStarted: lambda: ev.RolloutWaveStarted(
        **REF, rollout_id=RID, wave=2, devices=["d1"], stragglers=["d2"]
    ),
    ev.RolloutWaveSucceeded: lambda: ev.RolloutWaveSucceeded(
        **REF, rollout_id=RID, wave=0, converged=1
    ),
    ev.RolloutWaveFailed: lambda: ev.RolloutWaveFailed(
        **REF, rollout_id=RID, wave=0, reason="budget"
    ),
    ev.RolloutCompleted: lambda: ev.RolloutCompleted(**REF, rollout_id=RID, stragglers=["d2"]),
    ev.RolloutRolledBack: lambda: ev.RolloutRolledBack(**REF, rollout_id=RID, reason="x"),
    ev.RolloutPaused: lambda: ev.RolloutPaused(**REF, rollout_id=RID, actor="ops"),
    ev.RolloutResumed: lambda: ev.RolloutResumed(**REF, rollout_id=RID),
    ev.RolloutAborted: lambda: ev.RolloutAborted(**REF, rollout_id=RID, reason="x"),
    ev.RolloutRefused: lambda: ev.RolloutRefused(**REF, rollout_id=RID, reason="not validated"),
    ev.RolloutApprovalRequested: lambda: ev.RolloutApprovalRequested(
        **REF, rollout_id=RID, wave=1, requested_by="policy"
    ),
    ev.RolloutApproved: lambda: ev.RolloutApproved(
        **REF, rollout_id=RID, wave=1, actor="token:abc", reason="canary fine"
    ),
    ev.RolloutShadowStarted: lambda: ev.RolloutShadowStarted(
        **REF, rollout_id=RID, devices=["d1"], spec=ev.ShadowSpec(sample=0.2, then_waves=True)
    ),
    ev.RolloutShadowPassed: lambda: ev.RolloutShadowPassed(
        **REF, rollout_id=RID, agreement=0.97, compared=400
    ),
    ev.RolloutShadowFailed: lambda: ev.RolloutShadowFailed(
        **REF, rollout_id=RID, agreement=0.1, compared=400, reason="agreement 0.1 < 0.9"
    ),
    ev.CanaryVerdict: lambda: ev.CanaryVerdict(
        **REF, rollout_id=RID, wave=1, verdict=ev.Verdict.FAIL, reasons=["p95"]
    ),
    ev.AlarmRaised: lambda: ev.AlarmRaised(
        **REF, alarm_id=RID, kind=ev.AlarmKind.DRIFT, rule="psi", scores={"psi": 0.4}
    ),
    ev.AlarmResolved: lambda: ev.AlarmResolved(**REF, alarm_id=RID, rule="psi"),
    ev.RetrainRequested: lambda: ev.RetrainRequested(
        **REF,
        request_id=RID,
        reason="drift",
        dataset=ev.DatasetSelection(kinds=["low-confidence"], since=NOW),
    ),
    ev.DeviceStatusReported: lambda: ev.DeviceStatusReported(
        device_id="dev-1", state=ev.DeviceState.RUNNING, model="iris", labels={"site": "a"}
    ),
    ev.TelemetryBatch: lambda: ev.TelemetryBatch(
        **REF,
        device_id="dev-1",
        window_start=NOW,
        window_end=NOW + timedelta(seconds=10),
        count=3,
        feature_histograms=[ev.Histogram(edges=[0.0], counts=[1, 2])],
        samples=[{"features": [1.0], "prediction": "1", "confidence": 0.4}],
    ),
}


def _concrete_events() -> list[type[ev.Event]]:
    """Every public subclass of ``Event`` (private ones are shared bases)."""
    found: list[type[ev.Event]] = []
    todo = list(ev.Event.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if not cls.__name__.startswith("_") and cls.__module__ == ev.__name__:
            found.append(cls)
    return sorted(set(found), key=lambda c: c.__name__)


ALL_EVENTS = _concrete_events()
SUBJECT_CONSTANTS = {
    value
    for name, value in vars(s).items()
    if name.isupper() and isinstance(value, str) and "." in value
}


def test_every_event_has_an_example() -> None:
    missing = [c.__name__ for c in ALL_EVENTS if c not in EXAMPLES]
    assert not missing, f"add an example to EXAMPLES for {missing}"
    assert set(ev.LIFECYCLE_EVENTS) <= set(ALL_EVENTS)


@pytest.fixture(params=ALL_EVENTS, ids=lambda c: c.__name__)
def event(request: pytest.FixtureRequest) -> ev.Event:
    cls: type[ev.Event] = request.param
    return EXAMPLES[cls]()


def test_round_trips_through_json(event: ev.Event) -> None:
    cls = type(event)
    wire = event.to_json()
    assert isinstance(wire, bytes)
    assert cls.from_json(wire) == event
    assert cls.from_json(wire.decode()) == event
    # a second pass gives the same bytes: nothing drifts through serialisation
    assert cls.from_json(wire).to_json() == wire


def test_is_identified(event: ev.Event) -> None:
    assert isinstance(event.event_id, uuid.UUID)
    assert event.event_id != EXAMPLES[type(event)]().event_id
    assert event.occurred_at.tzinfo is not None
    assert event.occurred_at.utcoffset() == timedelta(0)
    assert isinstance(event.schema_version, int)
    assert event.schema_version >= 1
    assert "trace_parent" in type(event).model_fields


def test_is_frozen(event: ev.Event) -> None:
    with pytest.raises(ValidationError, match="frozen"):
        event.event_id = uuid.uuid4()  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        event.schema_version = 2  # type: ignore[misc]


def test_forbids_extra_fields(event: ev.Event) -> None:
    data = event.model_dump(mode="json")
    data["unexpected"] = 1
    with pytest.raises(ValidationError, match="unexpected"):
        type(event).model_validate(data)
    with pytest.raises(ValidationError, match="unexpected"):
        type(event).from_json(event.to_json()[:-1] + b',"unexpected":1}')


def test_refuses_naive_timestamps(event: ev.Event) -> None:
    data = event.model_dump()
    data["occurred_at"] = datetime(2026, 1, 1)
    with pytest.raises(ValidationError, match="timezone"):
        type(event).model_validate(data)


def test_has_a_subject_constant(event: ev.Event) -> None:
    cls = type(event)
    assert "subject" not in cls.model_fields, "the subject is a class constant, not a field"
    assert cls.subject in SUBJECT_CONSTANTS, f"{cls.__name__}.subject is not from subjects"
    if cls in ev.LIFECYCLE_EVENTS:
        assert ev.EVENTS_BY_SUBJECT[cls.subject] is cls
        assert cls.subject.split(".")[0] in {p.removesuffix(".>") for p in s.LIFECYCLE_SUBJECTS}
    else:
        # device events: the constant is a prefix, the instance names its own subject
        bus_subject: str = getattr(event, "bus_subject")()  # noqa: B009
        assert bus_subject.startswith(cls.subject + ".")


def test_lifecycle_subjects_are_one_to_one() -> None:
    subjects = [c.subject for c in ev.LIFECYCLE_EVENTS]
    assert len(subjects) == len(set(subjects)), "two events share a subject"
    device = {s.TELEMETRY_PREFIX, s.DEVICE_STATUS_PREFIX}
    orphans = SUBJECT_CONSTANTS - set(subjects) - device
    assert not orphans, f"subject constants without an event: {sorted(orphans)}"


def test_device_subjects() -> None:
    batch = EXAMPLES[ev.TelemetryBatch]()
    assert isinstance(batch, ev.TelemetryBatch)
    assert batch.bus_subject() == "device.telemetry.iris.dev-1"
    status = EXAMPLES[ev.DeviceStatusReported]()
    assert isinstance(status, ev.DeviceStatusReported)
    assert status.bus_subject() == "device.status.dev-1"


def test_subject_tokens_are_sanitised() -> None:
    assert s.telemetry_subject("my.model", "dev 1*") == "device.telemetry.my_model.dev_1_"
    assert s.dlq_subject("model.committed") == "dlq.model.committed"
    assert s.kv_key("dev:1/a") == "dev_1/a"
    with pytest.raises(ValueError, match="empty"):
        s.device_status_subject("")


def test_a_shadow_batch_must_compare_what_it_counts() -> None:
    base = EXAMPLES[ev.TelemetryBatch]()
    assert isinstance(base, ev.TelemetryBatch)
    flips = [ev.ShadowFlip(champion="a", challenger="b", count=1)]
    good = ev.ShadowComparison(champion_version="2", compared=3, agreed=2, flips=flips)
    assert base.model_copy(update={"shadow": good}).inconsistency() is None
    bad = base.model_copy(update={"shadow": good.model_copy(update={"agreed": 3})})
    assert "3 agreed and 1 flipped of 3 compared" in str(bad.inconsistency())
    short = base.model_copy(update={"shadow": good.model_copy(update={"compared": 2})})
    assert "compares 2 inputs but counts 3" in str(short.inconsistency())
