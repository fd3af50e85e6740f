"""Wave planning and judging (pure functions)."""

from __future__ import annotations

import pytest

from edgeloop.contracts.events import WavePlan
from edgeloop.contracts.parsing import parse_waves
from edgeloop.deployer.plan import (
    Reported,
    device_order,
    failure_budget,
    plan_waves,
    progress,
    wave_sizes,
)


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
