"""Wave planning and judging (pure functions)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from edgeloop.contracts.events import WavePlan
from edgeloop.contracts.parsing import parse_waves
from edgeloop.deployer.plan import (
    Absence,
    Presence,
    Reported,
    absence,
    device_order,
    disruption_cap,
    draw_wave,
    failure_budget,
    no_canary,
    plan_waves,
    progress,
    straggler_status,
    wave_sizes,
    wave_target,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def test_waves_are_cumulative_and_round_up() -> None:
    waves = parse_waves("1,10%,50%,100%")
    assert wave_sizes(1000, waves) == [1, 99, 400, 500]
    assert wave_sizes(3, waves) == [1, 1, 1]  # 10 % of 3 is one device: nothing new, dropped
    assert wave_sizes(1, waves) == [1]
    assert wave_sizes(10, parse_waves("2,5")) == [2, 3]  # stops where the plan stops
    assert wave_sizes(4, parse_waves("10")) == [4]  # more than there are: all of them


def test_plan_is_stable_and_independent_of_input_order() -> None:
    devices = [f"dev-{i}" for i in range(50)]
    plan = plan_waves(devices, parse_waves("1,10%,100%"))
    assert plan == plan_waves(list(reversed(devices)), parse_waves("1,10%,100%"))
    assert sorted(d for wave in plan for d in wave) == sorted(devices)
    assert [len(w) for w in plan] == [1, 4, 45]
    # adding a device does not reshuffle the others
    more = device_order([*devices, "dev-new"])
    assert [d for d in more if d != "dev-new"] == device_order(devices)
    assert device_order(devices) != sorted(devices)  # a hash, not the name, decides


def test_failure_budget_takes_the_stricter_limit() -> None:
    assert failure_budget(100, None, None) == 0
    assert failure_budget(100, 3, None) == 3
    assert failure_budget(100, None, 10) == 10
    assert failure_budget(100, 3, 10) == 3
    assert failure_budget(7, None, 10) == 0  # 10 % of 7 rounds down


def test_progress_sorts_devices_by_what_they_report() -> None:
    digest, other = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    reported = {
        "ok": Reported("running", digest, digest),
        "old": Reported("running", other, digest),
        "bad": Reported("failed", other, digest, "warm-up failed"),
        "bad-before": Reported("failed", other, other, "an earlier failure"),
    }
    p = progress(["ok", "old", "bad", "bad-before", "silent"], digest, reported)
    assert p.converged == ["ok"]
    assert p.failed == {"bad": "warm-up failed"}
    assert p.pending == ["old", "bad-before", "silent"]


@pytest.mark.parametrize("text", ["", "1,x", "0%", "150%", "-1"])
def test_bad_wave_text_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="wave"):
        parse_waves(text)


def test_wave_plan_needs_a_size() -> None:
    with pytest.raises(ValueError, match="count or a percentage"):
        wave_sizes(10, [WavePlan()])


def _drive(devices: list[str], waves: str, offline: set[str]) -> list[tuple[list[str], list[str]]]:
    """Every wave's draw of a rollout whose ``offline`` devices stay offline throughout,
    as the engine does it (the undrawn devices, the cumulative target)."""
    planned = [len(w) for w in plan_waves(devices, parse_waves(waves))]
    undrawn, drawn, out = set(devices), [], []
    for i in range(len(planned)):
        target = wave_target(planned, drawn, i)
        draw = draw_wave(
            undrawn, target, last=i == len(planned) - 1, ready=lambda d: d not in offline
        )
        undrawn -= {*draw.members, *draw.stragglers}
        drawn.append(len(draw.members))
        out.append((draw.members, draw.stragglers))
    return out


def test_waves_draw_online_devices_first_and_leave_the_offline_ones_to_the_last() -> None:
    devices = [f"dev-{i}" for i in range(9)]
    order = device_order(devices)
    offline = {order[0], order[3], order[6]}  # the canary the plan would have taken, and two
    waves = _drive(devices, "1,50%,100%", offline)
    online = [d for d in order if d not in offline]
    # the plan's sizes stay (1, 5, 9 cumulative); the online devices fill them in order
    assert [m for m, _ in waves] == [online[:1], online[1:5], online[5:]]
    assert [s for _, s in waves] == [[], [], [d for d in order if d in offline]]
    # every device is reached exactly once; the same devices give the same draws
    reached = [d for m, s in waves for d in m + s]
    assert sorted(reached) == sorted(devices)
    assert _drive(list(reversed(devices)), "1,50%,100%", offline) == waves


def test_a_deferred_device_back_online_is_drawn_first_and_nobody_is_lost() -> None:
    order = device_order(f"dev-{i}" for i in range(6))
    first = draw_wave(order, 1, last=False, ready=lambda d: d != order[0])
    assert first.members == [order[1]]  # its canary offline: the next online one instead
    # at the next wave the deferred device is back: it comes first (early in the order)
    second = draw_wave(order[2:] + order[:1], 2, last=False, ready=lambda d: True)
    assert second.members == [order[0], order[2]]
    assert draw_wave(order, 3, last=False, ready=lambda d: False).members == []
    everyone = draw_wave(order, 1, last=True, ready=lambda d: d in order[:2])
    assert (everyone.members, everyone.stragglers) == (order[:2], order[2:])


def test_a_wave_short_of_online_devices_is_made_up_by_the_next() -> None:
    assert wave_target([1, 4, 4], [1], 1) == 4
    assert wave_target([1, 4, 4], [1, 2], 2) == 6  # wave 1 drew 2 of 4: wave 2 takes 6
    waves = _drive([f"dev-{i}" for i in range(10)], "1,50%,80%,100%", offline=set())
    assert [len(m) for m, _ in waves] == [1, 4, 3, 2]  # all online: the plan's sizes


def test_online_and_healthy_is_what_the_gateway_says_recently() -> None:
    seen = NOW - timedelta(seconds=5)
    assert absence(Presence(online=True, last_seen=seen, state="running"), NOW, 60) is None
    assert absence(Presence(online=True, last_seen=seen, state=None), NOW, 60) is None
    off = absence(Presence(online=False, last_seen=seen), NOW, 60)
    assert off == Absence("offline", seen, "offline since 2026-03-01 11:59:55 UTC")
    assert absence(Presence(online=False), NOW, 60) == Absence("offline", None, "never connected")
    ghost = absence(Presence(online=True, last_seen=NOW - timedelta(minutes=5)), NOW, 60)
    # a session its gateway never closed (the gateway died): offline after all
    assert ghost == Absence(
        "offline", NOW - timedelta(minutes=5), "silent since 2026-03-01 11:55:00 UTC"
    )
    sick = absence(Presence(True, seen, "failed", "warm-up failed"), NOW, 60)
    assert sick == Absence(
        "unhealthy", None, "unhealthy: its last activation failed: warm-up failed"
    )
    assert absence(None, NOW, 60) == Absence("unknown", None, "not enrolled any more (revoked?)")
    never = Absence("offline", None, "never connected")
    said = no_canary({f"d{i}": never for i in range(7)}, "devices matching fleet=a")
    assert said.startswith("none of the 7 devices matching fleet=a is online and healthy")
    assert "d0: never connected" in said
    assert said.count("never connected") == 5
    assert "and 2 more" in said


def test_a_straggler_is_pending_until_it_converges_or_its_deadline_passes() -> None:
    digest, old = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    given = NOW - timedelta(seconds=30)
    assert straggler_status(None, digest, given, 60, NOW) == "pending"
    assert straggler_status(None, digest, given, 10, NOW) == "stale"
    assert straggler_status(Reported("running", old, old), digest, given, 10, NOW) == "stale"
    back = Reported("running", digest, digest)
    assert straggler_status(back, digest, given, 10, NOW) == "converged"
    broke = Reported("failed", old, digest, "signature")
    assert straggler_status(broke, digest, given, 10, NOW) == "failed"


def test_disruption_cap_counts_or_shares_the_stricter_never_nothing() -> None:
    assert disruption_cap(10, None, None) is None
    assert disruption_cap(10, 2, None) == 2
    assert disruption_cap(10, None, 25) == 3  # 2.5 rounds up
    assert disruption_cap(10, 4, 25) == 3  # the stricter
    assert disruption_cap(3, None, 10) == 1  # never less than one device: no wedge
    assert disruption_cap(0, None, 10) == 1


def test_a_device_deferred_by_its_update_lock_is_neither_pending_nor_failed() -> None:
    since = datetime(2026, 12, 1, 22, 0, tzinfo=UTC)
    reported = {
        "a": Reported("running", digest="sha256:new"),
        "b": Reported(
            "deferred",
            digest="sha256:old",
            desired_digest="sha256:new",
            error="update lock /run/app.lock held",
            deferred_since=since,
            deferred_until=since + timedelta(hours=1),
        ),
        "c": Reported("deferred", digest="sha256:old", desired_digest="sha256:other"),
    }
    p = progress(["a", "b", "c"], "sha256:new", reported)
    assert p.converged == ["a"]
    assert p.pending == ["c"]  # deferred for another image: still pending for this one
    assert p.deferred == {
        "b": "deferred: update lock /run/app.lock held since 2026-12-01 22:00:00 UTC; "
        "activates by 2026-12-01 23:00:00 UTC at the latest"
    }
