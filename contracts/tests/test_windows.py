"""Maintenance window specs: parsing, and when a window is open across days, midnight and
daylight-saving changes (``edgeloop.contracts.windows``)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from edgeloop.contracts.events import RolloutRequested, WavePlan
from edgeloop.contracts.windows import parse_window


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_weekdays_in_a_zone_follow_its_offset() -> None:
    """Mon-Fri 02:00-04:00 Berlin: 01:00-03:00 UTC in winter, 00:00-02:00 UTC in summer;
    shut at the weekend; the next opening of a Friday evening is Monday's."""
    w = parse_window("Mon-Fri 02:00-04:00 Europe/Berlin")
    assert w.is_open(utc(2026, 12, 1, 1, 0))  # Tuesday, 02:00 CET
    assert w.is_open(utc(2026, 12, 1, 2, 59))
    assert not w.is_open(utc(2026, 12, 1, 3, 0))  # 04:00 CET: closed
    assert not w.is_open(utc(2026, 12, 1, 0, 59))
    assert w.is_open(utc(2026, 7, 7, 0, 0))  # Tuesday, 02:00 CEST
    assert not w.is_open(utc(2026, 7, 7, 2, 0))
    assert not w.is_open(utc(2026, 12, 5, 1, 30))  # Saturday
    assert w.next_opening(utc(2026, 12, 4, 18, 0)) == utc(2026, 12, 7, 1, 0)  # Fri → Mon
    assert w.next_opening(utc(2026, 12, 1, 1, 30)) == utc(2026, 12, 1, 1, 30)  # open now


def test_spring_forward_gap_shortens_the_window() -> None:
    """On 2026-03-29 Berlin skips 02:00-03:00: the window opens when the gap ends
    (03:00 CEST = 01:00 UTC) and lasts one hour, not two."""
    w = parse_window("Sun 02:00-04:00 Europe/Berlin")
    assert w.next_opening(utc(2026, 3, 28, 12, 0)) == utc(2026, 3, 29, 1, 0)
    assert not w.is_open(utc(2026, 3, 29, 0, 59))
    assert w.is_open(utc(2026, 3, 29, 1, 0))
    assert w.is_open(utc(2026, 3, 29, 1, 59))
    assert not w.is_open(utc(2026, 3, 29, 2, 0))  # 04:00 CEST


def test_fall_back_repeats_an_hour_and_lengthens_the_window() -> None:
    """On 2026-10-25 Berlin lives 02:00-03:00 twice: the window opens at the first 02:00
    (CEST, 00:00 UTC) and closes at 04:00 CET (03:00 UTC): three hours."""
    w = parse_window("Sun 02:00-04:00 Europe/Berlin")
    assert w.next_opening(utc(2026, 10, 24, 12, 0)) == utc(2026, 10, 25, 0, 0)
    for hour in (0, 1, 2):
        assert w.is_open(utc(2026, 10, 25, hour, 30))
    assert not w.is_open(utc(2026, 10, 25, 3, 0))


def test_a_window_over_midnight_belongs_to_its_opening_day() -> None:
    """Fri 22:00-02:00 UTC: open Friday night into Saturday, not Thursday night."""
    w = parse_window("Fri 22:00-02:00")
    assert w.is_open(utc(2026, 12, 4, 23, 0))  # Friday
    assert w.is_open(utc(2026, 12, 5, 1, 59))  # Saturday morning
    assert not w.is_open(utc(2026, 12, 5, 2, 0))
    assert not w.is_open(utc(2026, 12, 4, 1, 0))  # Friday morning: Thursday's night
    assert w.next_opening(utc(2026, 12, 5, 2, 0)) == utc(2026, 12, 11, 22, 0)


def test_a_window_across_a_dst_midnight_in_new_york() -> None:
    """daily 23:00-24:00 America/New_York across the spring change (2026-03-08)."""
    w = parse_window("daily 23:00-24:00 America/New_York")
    assert w.next_opening(utc(2026, 3, 7, 12, 0)) == utc(2026, 3, 8, 4, 0)  # EST
    assert w.next_opening(utc(2026, 3, 8, 12, 0)) == utc(2026, 3, 9, 3, 0)  # EDT
    assert w.is_open(utc(2026, 3, 9, 3, 59))


def test_several_windows_and_day_lists() -> None:
    w = parse_window("Sat,Sun 10:00-12:00 UTC; Wed-Mon 00:00-01:00 Asia/Tokyo")
    assert w.is_open(utc(2026, 12, 5, 11, 0))  # Saturday
    assert w.is_open(utc(2026, 12, 6, 15, 30))  # Monday 00:30 in Tokyo
    assert not w.is_open(utc(2026, 12, 7, 15, 30))  # Tuesday 00:30 in Tokyo
    assert len(w.windows) == 2


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("Mon-Fri 02:00-04:00 Mars/Olympus", "unknown time zone 'Mars/Olympus'"),
        ("Mon-Fry 02:00-04:00 UTC", "invalid days 'mon-fry'"),
        ("Mon-Fri 2-4 UTC", "use DAYS HH:MM-HH:MM ZONE"),
        ("Mon-Fri 02:00-25:00 UTC", "invalid time '25:00'"),
        ("Mon 03:00-03:00", "opens and closes at the same time"),
        ("", "empty maintenance window"),
    ],
)
def test_a_bad_spec_says_what_is_wrong(spec: str, says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        parse_window(spec)


def test_a_rollout_request_refuses_a_bad_window() -> None:
    """The contract checks the spec, so the API answers 422 and the bus dead-letters."""
    fields = {
        "rollout_id": "00000000-0000-0000-0000-000000000001",
        "model": "m",
        "version": "1",
        "selector": {},
        "waves": [WavePlan(count=1)],
    }
    ok = RolloutRequested.model_validate({**fields, "window": "daily 02:00-03:00"})
    assert ok.window == "daily 02:00-03:00"
    with pytest.raises(ValueError, match="unknown time zone"):
        RolloutRequested.model_validate({**fields, "window": "daily 02:00-03:00 Nowhere"})


def test_the_next_opening_is_always_within_a_week() -> None:
    w = parse_window("Wed 12:00-12:01 Pacific/Chatham")
    start = utc(2026, 1, 1, 0, 0)
    for hours in range(0, 24 * 30, 7):
        now = start + timedelta(hours=hours)
        opens = w.next_opening(now)
        assert now <= opens < now + timedelta(days=8)
        assert w.is_open(opens)
