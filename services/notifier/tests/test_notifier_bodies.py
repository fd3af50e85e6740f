"""What a delivery's body says and when the next attempt comes (pure logic)."""

from __future__ import annotations

import json
import uuid

from edgeloop.contracts.events import AlarmKind, AlarmRaised, AlarmResolved, RolloutCompleted
from edgeloop.notifier.service import NO_END, backoff, render

IDS = {"delivery_id": uuid.uuid4(), "subscription_id": uuid.uuid4()}


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [backoff(n, 2.0, 30.0) for n in range(1, 7)] == [2, 4, 8, 16, 30, 30]


def test_json_body_carries_the_event_as_on_the_bus() -> None:
    event = RolloutCompleted(model="iris", version="2", rollout_id=uuid.uuid4())
    doc = json.loads(render("json", event.subject, event, **IDS))
    assert doc["event"] == "rollout.completed"
    assert doc["delivery_id"] == str(IDS["delivery_id"])
    assert doc["data"] == json.loads(event.to_json())


def test_alertmanager_body_raised_then_resolved_is_one_alert() -> None:
    alarm_id = uuid.uuid4()
    raised = AlarmRaised(
        model="iris",
        version="1",
        alarm_id=alarm_id,
        kind=AlarmKind.KPI,
        rule="latency_p95",
        severity="critical",
        message="p95 80 ms > 50 ms",
    )
    resolved = AlarmResolved(model="iris", version="1", alarm_id=alarm_id, rule="latency_p95")
    first = json.loads(render("alertmanager", raised.subject, raised, **IDS))
    second = json.loads(render("alertmanager", resolved.subject, resolved, **IDS))
    assert first["version"] == "4"
    assert {first["status"], second["status"]} == {"firing", "resolved"}
    (a,), (b,) = first["alerts"], second["alerts"]
    assert a["fingerprint"] == b["fingerprint"]
    assert a["labels"]["alertname"] == b["labels"]["alertname"] == "EdgeloopAlarm"
    assert a["labels"]["severity"] == "critical"
    assert a["labels"]["rule"] == "latency_p95"
    assert a["annotations"]["description"] == "p95 80 ms > 50 ms"
    assert a["endsAt"] == NO_END
    assert b["endsAt"] == b["startsAt"] != NO_END
    for doc in (first, second):
        assert set(doc) >= {
            "version",
            "groupKey",
            "status",
            "receiver",
            "groupLabels",
            "commonLabels",
            "commonAnnotations",
            "externalURL",
            "alerts",
            "truncatedAlerts",
        }
