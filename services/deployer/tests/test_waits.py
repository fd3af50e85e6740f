"""What a waiting rollout shows (pure functions of the API): each wait has a reason and
a deadline — its maintenance window, a disruption budget, a device's update lock."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from edgeloop.contracts.events import ValidationPassed, WavePlan
from edgeloop.deployer.api import _budget_wait, _window_wait, device_status
from edgeloop.deployer.plan import Reported
from edgeloop.deployer.policy import ReleasePolicy
from edgeloop.deployer.store import Rollout, Wave

NOW = datetime(2026, 12, 1, 23, 0, tzinfo=UTC)
NEW = "sha256:" + "a" * 64


def _rollout(**changes: Any) -> Rollout:
    fields: dict[str, Any] = {
        "rollout_id": uuid.uuid4(),
        "model": "m",
        "version": "2",
        "image": "r/m",
        "digest": NEW,
        "model_digest": NEW,
        "selector": {},
        "waves": [WavePlan(percent=100)],
        "bake_seconds": 0.0,
        "converge_timeout_seconds": 120.0,
        "max_failures": None,
        "max_failures_percent": None,
        "state": "running",
        "current_wave": 0,
        "reason": None,
        "requested_by": "op",
        "rollback_by": None,
        "trace_parent": None,
        "created_at": NOW,
        "updated_at": NOW,
        "finished_at": None,
    }
    return Rollout(**(fields | changes))


def _wave(state: str = "converging") -> Wave:
    return Wave(uuid.uuid4(), 0, 4, state, NOW, NOW, None, 0, 0, None, None, None, members=4)


def _row(device: str, written: datetime | None, **extra: Any) -> dict[str, Any]:
    return {"device_id": device, "wave": 0, "straggler": False, "written_at": written} | extra


def test_waiting_for_a_window_says_until_when() -> None:
    opens = NOW + timedelta(hours=3)
    r = _rollout(state="waiting_for_window", window_spec="daily 02:00-04:00 UTC",
                 window_opens_at=opens)  # fmt: skip
    wait = _window_wait(r)
    assert wait is not None
    assert wait["until"] == opens.isoformat()
    assert "outside its maintenance window (daily 02:00-04:00 UTC)" in wait["reason"]
    assert _window_wait(_rollout()) is None


def test_a_budget_wait_names_the_latest_a_slot_frees() -> None:
    r = _rollout(max_unavailable=2)
    plan = [
        _row("a", NOW - timedelta(seconds=100)),  # activating: times out in 20 s
        _row("b", NOW - timedelta(seconds=10)),  # activating: in 110 s
        _row("c", NOW - timedelta(seconds=50)),  # runs it: no slot
        _row("d", None),  # waits
    ]
    reported = {"c": Reported("running", digest=NEW)}
    wait = _budget_wait(r, plan, _wave(), 2, reported, NOW)
    assert wait is not None
    assert (wait["activating"], wait["waiting"]) == (2, 1)
    assert wait["until"] == (NOW + timedelta(seconds=20)).isoformat()
    assert (
        wait["reason"]
        == "1 device waiting for the disruption budget: 2 of at most 2 given the release and "
        "not running it yet"
    )
    assert _budget_wait(r, plan[:3], _wave(), 2, reported, NOW) is None  # nobody waits


def test_a_device_deferred_by_its_lock_and_one_waiting_for_the_budget() -> None:
    r = _rollout(max_unavailable=1)
    lock = Reported(
        "deferred",
        desired_digest=NEW,
        error="update lock /run/app.lock held",
        deferred_since=NOW,
        deferred_until=NOW + timedelta(hours=1),
    )
    status, text = device_status(r, _row("a", NOW), _wave(), lock, NOW)
    assert status == "deferred"
    assert text.startswith("deferred: update lock /run/app.lock held since 2026-12-01 23:00:00")
    assert text.endswith("activates by 2026-12-02 00:00:00 UTC at the latest")
    status, text = device_status(r, _row("b", None), _wave(), None, NOW)
    assert (status, text) == ("waiting", "waits for the disruption budget (wave 0)")
    # after the wave, a deferred device's status follows what it reports
    done = _wave("succeeded")
    row = _row("a", NOW, outcome="deferred", detail="deferred: …")
    assert device_status(r, row, done, lock, NOW)[0] == "deferred"
    assert device_status(r, row, done, Reported("running", digest=NEW), NOW)[0] == "converged"


def test_a_release_policy_gives_its_rollouts_its_window_and_budget() -> None:
    policy = ReleasePolicy(
        selector={"site": "a"}, window="Mon-Fri 02:00-04:00 Europe/Berlin", max_unavailable=3
    )
    passed = ValidationPassed(model="m", version="2", image="r/m", digest=NEW)
    req = policy.request(passed, [WavePlan(percent=100)])
    assert req.window == "Mon-Fri 02:00-04:00 Europe/Berlin"
    assert (req.max_unavailable, req.max_unavailable_percent) == (3, None)
    assert ReleasePolicy().request(passed, [WavePlan(percent=100)]).window is None
