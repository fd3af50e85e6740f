"""Maintenance windows, device update locks and disruption budgets against real
components (registry, gateway with real agents, the deployer as its own process, NATS,
PostgreSQL): a rollout outside its window writes nothing and starts at the opening (the
deployer's clock moved by the test); a device whose application holds its update lock
defers its activation while the release goes on with the others; ``max_unavailable``
caps the devices activating at once."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from nats.js.errors import KeyNotFoundError
from typer.testing import CliRunner, Result

from edgeloop.cli.main import app
from edgeloop.contracts import subjects as s
from edgeloop.devstack.testing import eventually
from edgeloop.edge.agent import Faults
from tests.deploy_harness import DeployStack, lifecycle_events
from tests.edge_harness import TOKEN
from tests.modelzoo import classifier

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # several phases each, on a busy machine

BERLIN = ZoneInfo("Europe/Berlin")


def _cli(deploy: DeployStack, *args: str) -> Result:
    env = {
        "EDGELOOP_DEPLOYER_API": str(deploy.api.base_url),
        "EDGELOOP_GATEWAY_API": str(deploy.edge.api.base_url),
        "EDGELOOP_MONITOR_API": "http://127.0.0.1:9",
        "EDGELOOP_API_TOKEN": TOKEN,
    }
    return CliRunner().invoke(app, list(args), env=env)


def _next_weekday_two_am_berlin(after: datetime) -> datetime:
    """The next Monday-to-Friday 02:00 in Berlin after ``after`` (worked out by hand from
    zoneinfo, not by the code under test)."""
    day: date = after.astimezone(BERLIN).date()
    while True:
        at = datetime.combine(day, time(2, 0), tzinfo=BERLIN).astimezone(UTC)
        if day.weekday() < 5 and at > after:
            return at
        day += timedelta(days=1)


async def _desired(deploy: DeployStack, device: str) -> bytes | None:
    kv = await deploy.edge.js.key_value(s.KV_DESIRED)
    try:
        return (await kv.get(s.kv_key(device))).value
    except KeyNotFoundError:
        return None


async def test_a_rollout_outside_its_window_waits_and_starts_at_the_opening(
    deploy: DeployStack,
) -> None:
    """The deployer's clock reads an hour before a weekday's 02:00 in Berlin: a rollout
    with the window ``Mon-Fri 02:00-04:00 Europe/Berlin`` is admitted, waits in
    ``waiting_for_window`` with the opening shown (API and ``rollout status``) and writes
    no desired state; moved to a second before the opening, it starts and completes. A
    window that does not parse is a 422 from the API and an error from the CLI."""
    sel = {"fleet": deploy.unique}
    model = f"iris{deploy.unique}"
    devices = await deploy.devices(2, sel)
    v1 = await deploy.validated(model, "1", classifier("iris").onnx)
    opening = _next_weekday_two_am_berlin(datetime.now(UTC) + timedelta(days=1))
    deploy.set_clock(opening - timedelta(hours=1))

    code, body = await deploy.start(
        model, "1", sel, window="Mon-Fri 02:00-04:00 Nowhere/City", bake_seconds=0.5
    )
    assert code == 422, body
    assert "unknown time zone 'Nowhere/City'" in str(body)
    bad = await asyncio.to_thread(
        _cli, deploy, "rollout", "start", f"{model}@1", "-l", f"fleet={deploy.unique}",
        "--window", "Mon-Fri 2-4",
    )  # fmt: skip
    assert bad.exit_code == 2, bad.output
    assert "invalid maintenance window 'Mon-Fri 2-4'" in bad.output

    # a release policy carries both to its rollouts (stored, shown, checked)
    policy = await asyncio.to_thread(
        _cli, deploy, "rollout", "policy", "set", model, "--window",
        "Sat,Sun 01:00-05:00 America/New_York", "--max-unavailable", "10%",
    )  # fmt: skip
    assert policy.exit_code == 0, policy.output
    assert "maintenance window: Sat,Sun 01:00-05:00 America/New_York" in policy.output
    assert "max unavailable: 10% devices of a wave activating at once" in policy.output
    shown = (await deploy.api.get(f"/v1/policies/{model}")).json()
    assert (shown["window"], shown["max_unavailable_percent"]) == (
        "Sat,Sun 01:00-05:00 America/New_York",
        10,
    )
    resp = await deploy.api.put(f"/v1/policies/{model}", json={"window": "Sat 25:00-26:00"})
    assert resp.status_code == 422, resp.text
    assert "invalid time '25:00'" in resp.text
    resp = await deploy.api.put(f"/v1/policies/{model}", json={})
    assert resp.status_code == 200, resp.text

    code, body = await deploy.start(
        model,
        "1",
        sel,
        waves=[{"count": 1}, {"percent": 100}],
        window="Mon-Fri 02:00-04:00 Europe/Berlin",
        bake_seconds=0.5,
    )
    assert code == 201, body
    rid = body["rollout_id"]
    waiting = await deploy.wait_rollout(rid, "waiting_for_window", within=30)
    assert waiting["window"] == "Mon-Fri 02:00-04:00 Europe/Berlin"
    assert waiting["window_opens_at"] == opening.isoformat()
    assert waiting["waiting"]["for"] == "window"
    assert waiting["waiting"]["until"] == opening.isoformat()
    assert "outside its maintenance window" in waiting["waiting"]["reason"]
    assert [w["state"] for w in waiting["wave_status"]] == ["pending", "pending"]
    for device in devices:
        assert await _desired(deploy, device) is None  # nothing written outside the window
    status = await asyncio.to_thread(_cli, deploy, "rollout", "status", rid)
    assert status.exit_code == 0, status.output
    assert "WAITING_FOR_WINDOW" in status.output
    assert "maintenance window: Mon-Fri 02:00-04:00 Europe/Berlin" in status.output
    assert "waiting: outside its maintenance window" in status.output
    assert "opens" in status.output
    assert not await lifecycle_events(deploy.edge.js, "rollout.wave.started")

    deploy.set_clock(opening - timedelta(seconds=1))
    done = await deploy.wait_rollout(rid, "completed", "rolled_back", within=90)
    assert done["state"] == "completed", done["reason"]
    assert done["waiting"] is None
    assert done["window_opens_at"] is None
    await deploy.running(devices, v1)
    started = await lifecycle_events(deploy.edge.js, "rollout.wave.started")
    assert sorted(e["wave"] for e in started if e["rollout_id"] == rid) == [0, 1]


@contextlib.contextmanager
def _held(path: Path) -> Iterator[None]:
    """An application on the device holding its update lock (``flock``)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


async def test_an_update_lock_defers_one_device_while_the_release_goes_on(
    deploy: DeployStack, tmp_path: Path
) -> None:
    """Four devices, one wave, no failure budget. One device's application holds its update
    lock: the device downloads the release but reports ``deferred`` (the reason, since,
    until), the other devices activate and the rollout completes without waiting for it;
    ``rollout status`` and the API show ``deferred: update lock … held since …``. Once the
    lock is let go it activates (an agent restarted meanwhile keeps counting its deferral
    from when it began). A second locked device with a short maximum deferral activates
    anyway when it has passed."""
    sel = {"fleet": deploy.unique}
    model = f"iris{deploy.unique}"
    lock = tmp_path / "busy.lock"
    short = tmp_path / "forgotten.lock"
    free = await deploy.devices(2, sel)
    with _held(lock), _held(short):
        locked = (await deploy.devices(1, sel, prefix="l", update_lock=lock))[0]
        overridden = (
            await deploy.devices(
                1, sel, prefix="o", update_lock=short, update_lock_max_deferral_seconds=3
            )
        )[0]
        v1 = await deploy.validated(model, "1", classifier("iris").onnx)
        code, body = await deploy.start(
            model, "1", sel, waves=[{"percent": 100}], bake_seconds=0.5, converge_timeout_seconds=60
        )
        assert code == 201, body
        rid = body["rollout_id"]
        done = await deploy.wait_rollout(rid, "completed", "rolled_back", within=60)
        assert done["state"] == "completed", done["reason"]
        await deploy.running([*free, overridden], v1)  # the short deferral passed: anyway

        report = await deploy.edge.reported(locked)
        assert report is not None
        assert report["state"] == "deferred"
        assert report["desired_digest"] == v1.digest
        assert report["error"] == f"update lock {lock} held"
        since = datetime.fromisoformat(report["deferred_since"])
        until = datetime.fromisoformat(report["deferred_until"])
        assert until - since == timedelta(hours=1)  # the default maximum deferral

        r = await deploy.rollout(rid)
        plan = {d["device_id"]: d for d in r["device_plan"]}
        assert plan[locked]["status"] == "deferred"
        assert plan[locked]["outcome"] == "deferred"
        assert plan[locked]["status_text"].startswith(f"deferred: update lock {lock} held since ")
        assert [d["device_id"] for d in r["deferred"]] == [locked]
        assert r["deferred"][0]["deadline_at"] == until.isoformat()
        for device in free:
            assert plan[device]["status"] == "converged"
        completed = [e for e in await deploy.events("rollout.completed") if e["rollout_id"] == rid]
        assert len(completed) == 1
        # listed as not on the release yet (the other deferred device, if it still was)
        assert locked in completed[0]["stragglers"]
        assert set(completed[0]["stragglers"]) <= {locked, overridden}
        status = await asyncio.to_thread(_cli, deploy, "rollout", "status", rid)
        assert status.exit_code == 0, status.output
        assert f"{locked:24} deferred: update lock {lock} held since " in status.output
        assert "at the latest" in status.output

        # the agent restarts while it waits: its deferral goes on from when it began
        await deploy.stop_device(locked)
        await deploy.start_device(locked)

        async def deferred_again() -> dict[str, Any] | None:
            again = await deploy.edge.reported(locked)
            return again if again and again["state"] == "deferred" else None

        again = await eventually(deferred_again, within=60, what="deferred after a restart")
        assert datetime.fromisoformat(again["deferred_since"]) == since
        assert datetime.fromisoformat(again["deferred_until"]) == until

    # the application let go of the lock: the device activates what it was given
    await deploy.running([locked], v1)
    r = await deploy.rollout(rid)
    assert {d["device_id"]: d["status"] for d in r["device_plan"]}[locked] == "converged"
    assert r["deferred"] == []


async def test_max_unavailable_caps_the_devices_activating_at_once(deploy: DeployStack) -> None:
    """Six devices on slow links, one wave, ``max_unavailable`` 2: in the order the
    devices' status reports reached the bus, never more than two devices were between
    being given the release and running it — and two were, so the budget was used — and
    the rollout completes with all six."""
    sel = {"fleet": deploy.unique}
    model = f"iris{deploy.unique}"
    devices = await deploy.devices(6, sel, faults=Faults(slow_link_bytes_per_s=40_000))
    v1 = await deploy.validated(model, "1", classifier("iris").onnx)
    code, body = await deploy.start(
        model, "1", sel, waves=[{"percent": 100}], bake_seconds=0.5, max_unavailable=2
    )
    assert code == 201, body
    assert body["max_unavailable"] == 2
    rid = body["rollout_id"]
    done = await deploy.wait_rollout(rid, "completed", "rolled_back", within=120)
    assert done["state"] == "completed", done["reason"]
    await deploy.running(devices, v1)

    reports = await lifecycle_events(
        deploy.edge.js, f"{s.DEVICE_STATUS_PREFIX}.>", stream=s.STREAM_DEVICE
    )
    mine = set(devices)
    activating: set[str] = set()
    most = 0
    for report in reports:
        device = report["device_id"]
        if device not in mine:
            continue
        if report["state"] in ("downloading", "activating") and (
            report.get("desired_digest") == v1.digest
        ):
            activating.add(device)
        else:
            activating.discard(device)
        most = max(most, len(activating))
    assert most == 2, _timeline(reports, mine)
    assert not activating


def _timeline(reports: list[dict[str, Any]], devices: set[str]) -> str:
    return "\n".join(f"{r['device_id']} {r['state']}" for r in reports if r["device_id"] in devices)


async def test_a_budget_holds_across_a_deployer_restart_with_its_wait_shown(
    deploy: DeployStack, tmp_path: Path
) -> None:
    """Four devices whose applications hold their update locks, ``max_unavailable`` 2:
    two are given the release and defer it (holding their slots), the other two wait —
    the API and ``rollout status`` say so, with the latest a slot frees. The deployer is
    SIGKILLed and restarted: still only those two were given it. The locks go, one pair
    after the other, and the rollout completes with never more than two devices between
    being given the release and running it."""
    sel = {"fleet": deploy.unique}
    model = f"iris{deploy.unique}"
    locks = [tmp_path / f"app{i}.lock" for i in range(4)]
    with contextlib.ExitStack() as held:
        holds = {}
        for lock in locks:
            holds[lock] = held.enter_context(contextlib.ExitStack())
            holds[lock].enter_context(_held(lock))
        devices = []
        for i, lock in enumerate(locks):
            devices += await deploy.devices(1, sel, prefix=f"b{i}", update_lock=lock)
        lock_of = dict(zip(devices, locks, strict=True))
        v1 = await deploy.validated(model, "1", classifier("iris").onnx)
        code, body = await deploy.start(
            model, "1", sel, waves=[{"percent": 100}], bake_seconds=0.5, max_unavailable=2,
            converge_timeout_seconds=300,
        )  # fmt: skip
        assert code == 201, body
        rid = body["rollout_id"]

        async def two_deferred_two_waiting() -> dict[str, Any] | None:
            r = await deploy.rollout(rid)
            statuses = sorted(d["status"] for d in r["device_plan"])
            return r if statuses == ["deferred", "deferred", "waiting", "waiting"] else None

        r = await eventually(two_deferred_two_waiting, within=60, what="2 deferred, 2 waiting")
        wait = r["wave_status"][0]["waiting"]
        assert wait["for"] == "disruption budget"
        assert wait["reason"] == (
            "2 devices waiting for the disruption budget: 2 of at most 2 given the release "
            "and not running it yet"
        )
        assert wait["until"] is not None  # the latest a slot frees: the first one's timeout
        status = await asyncio.to_thread(_cli, deploy, "rollout", "status", rid)
        assert "max unavailable: 2 devices of a wave activating at once" in status.output
        assert "wave 0 waiting: 2 devices waiting for the disruption budget" in status.output
        first = [d["device_id"] for d in r["device_plan"] if d["status"] == "deferred"]
        rest = [d for d in devices if d not in first]

        await deploy.restart_deployer(kill=True)
        r = await eventually(two_deferred_two_waiting, within=60, what="the same after restart")
        assert sorted(d["device_id"] for d in r["device_plan"] if d["status"] == "deferred") == (
            sorted(first)
        )
        for device in rest:
            assert await _desired(deploy, device) is None

        for device in first:
            holds[lock_of[device]].close()  # their applications are done
        await deploy.running(first, v1)

        async def rest_deferred() -> bool:
            plan = (await deploy.rollout(rid))["device_plan"]
            return {d["device_id"]: d["status"] for d in plan if d["device_id"] in rest} == (
                dict.fromkeys(rest, "deferred")
            )

        await eventually(rest_deferred, within=60, what="the second pair given it")
    done = await deploy.wait_rollout(rid, "completed", "rolled_back", within=90)
    assert done["state"] == "completed", done["reason"]
    await deploy.running(devices, v1)

    reports = await lifecycle_events(
        deploy.edge.js, f"{s.DEVICE_STATUS_PREFIX}.>", stream=s.STREAM_DEVICE
    )
    given: set[str] = set()
    most = 0
    for report in reports:
        if report["device_id"] not in lock_of:
            continue
        if report["state"] != "running" and report.get("desired_digest") == v1.digest:
            given.add(report["device_id"])
        else:
            given.discard(report["device_id"])
        most = max(most, len(given))
    assert most == 2, _timeline(reports, set(devices))
