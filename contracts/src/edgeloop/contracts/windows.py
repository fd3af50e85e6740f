"""Maintenance windows: when a rollout may give devices a new desired state.

The form (the CLI's ``--window``, a release policy's ``window``, the API's ``window``)::

    DAYS HH:MM-HH:MM [ZONE] [; DAYS HH:MM-HH:MM [ZONE] …]

``DAYS`` is ``daily`` (or ``*``), or day names and ranges separated by commas
(``Mon-Fri``, ``Sat,Sun``, ``Fri-Mon``); ``ZONE`` an IANA time zone (``Europe/Berlin``;
default ``UTC``). A window whose end is not after its start ends the next day
(``Fri 22:00-02:00`` closes Saturday at 02:00); ``24:00`` is the end of the day. The day
names the window's opening.

Times are local wall-clock times, turned into instants with :mod:`zoneinfo` on each
day, so a window follows daylight saving time: ``02:00-04:00 Europe/Berlin`` is 00:00 to 02:00
UTC in July and 01:00 to 03:00 UTC in January. On the day the clocks go forward, a local time
that does not exist (02:00 to 02:59 in Berlin on the last Sunday of March) is moved forward by
the gap (PEP 495's ``fold=0``: the offset from before the change; 02:00 is 03:00 CEST), so
``02:00-04:00`` is 03:00 to 04:00 CEST, one hour; on the day they go back, an ambiguous local
time is its first occurrence, so the same window lasts three hours.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, Field

__all__ = ["Schedule", "Window", "WindowSpec", "parse_window"]

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_PART = re.compile(
    r"^(?P<days>\S+)\s+(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2})(?:\s+(?P<zone>\S+))?$"
)
_FORM = "e.g. 'Mon-Fri 02:00-04:00 Europe/Berlin' or 'daily 22:00-02:00 UTC'"


@dataclass(frozen=True)
class Window:
    """One recurring window: on ``days`` (0 = Monday), from ``start`` for ``length`` of
    local time in ``zone``."""

    days: frozenset[int]
    start: time
    end: time
    """Local end time; at or before ``start``: the next day (``24:00`` is midnight next)."""
    zone: str

    def openings(self, around: datetime, *, before: int = 2, after: int = 9) -> list[Interval]:
        """The window's instants (UTC) that open on the local days around ``around``."""
        tz = ZoneInfo(self.zone)
        today = around.astimezone(tz).date()
        out = []
        for offset in range(-before, after):
            day = today + timedelta(days=offset)
            if day.weekday() not in self.days:
                continue
            opens = _instant(day, self.start, tz)
            end_day = day if self.end > self.start else day + timedelta(days=1)
            closes = _instant(end_day, self.end, tz)
            if closes > opens:
                out.append(Interval(opens, closes))
        return out


@dataclass(frozen=True)
class Interval:
    """One opening of a window, in UTC."""

    opens: datetime
    closes: datetime


@dataclass(frozen=True)
class Schedule:
    """A rollout's maintenance windows (any one of them open: the rollout may write)."""

    text: str
    windows: tuple[Window, ...]

    def current(self, now: datetime) -> Interval | None:
        """The opening ``now`` falls in (the latest closing one), or None."""
        inside = [i for w in self.windows for i in w.openings(now) if i.opens <= now < i.closes]
        return max(inside, key=lambda i: i.closes) if inside else None

    def is_open(self, now: datetime) -> bool:
        """Whether a window is open at ``now`` (an aware datetime)."""
        return self.current(now) is not None

    def next_opening(self, now: datetime) -> datetime:
        """When a window next opens after ``now`` (``now`` itself when one is open)."""
        if self.is_open(now):
            return now
        later = [i.opens for w in self.windows for i in w.openings(now) if i.opens > now]
        return min(later)  # every window has at least one day a week: never empty


def parse_window(text: str) -> Schedule:
    """Parse a window spec (module docstring); ``ValueError`` saying what is wrong."""
    parts = [p.strip() for p in text.split(";") if p.strip()]
    if not parts:
        raise ValueError(f"empty maintenance window: {_FORM}")
    return Schedule(text.strip(), tuple(_one(part) for part in parts))


def _checked(text: str) -> str:
    parse_window(text)  # ValueError saying what is wrong: a 422 from an API
    return text


WindowSpec = Annotated[str, Field(max_length=500), AfterValidator(_checked)]
"""A maintenance window spec as a pydantic field type (checked by :func:`parse_window`)."""


def _one(part: str) -> Window:
    m = _PART.match(part)
    if not m:
        raise ValueError(f"invalid maintenance window {part!r}: use DAYS HH:MM-HH:MM ZONE, {_FORM}")
    zone = m["zone"] or "UTC"
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {zone!r} in maintenance window {part!r}: use an IANA name "
            "such as Europe/Berlin, America/New_York or UTC"
        ) from None
    start = _clock(m["start"], part, end=False)
    end = _clock(m["end"], part, end=True)
    if start == end:
        raise ValueError(f"maintenance window {part!r} opens and closes at the same time")
    return Window(_days(m["days"], part), start, end, zone)


def _clock(text: str, part: str, *, end: bool) -> time:
    hours, minutes = (int(x) for x in text.split(":"))
    if end and (hours, minutes) == (24, 0):
        return time(0, 0)
    if hours > 23 or minutes > 59:
        raise ValueError(
            f"invalid time {text!r} in maintenance window {part!r} "
            "(00:00 to 23:59, or 24:00 as an end)"
        )
    return time(hours, minutes)


def _days(text: str, part: str) -> frozenset[int]:
    if text.lower() in ("daily", "*"):
        return frozenset(range(7))
    days: set[int] = set()
    for item in text.lower().split(","):
        first, _, last = item.partition("-")
        try:
            a = _day(first)
            b = _day(last) if last else a
        except ValueError:
            raise ValueError(
                f"invalid days {item!r} in maintenance window {part!r}: use Mon … Sun, "
                f"ranges like Mon-Fri, lists like Sat,Sun, or daily"
            ) from None
        days.update((a + i) % 7 for i in range((b - a) % 7 + 1))
    return frozenset(days)


def _day(name: str) -> int:
    name = name.strip()
    for i, day in enumerate(DAYS):
        full = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")[i]
        if name in (day, full):
            return i
    raise ValueError(name)


def _instant(day: date, at: time, tz: ZoneInfo) -> datetime:
    """The UTC instant of local ``day`` ``at`` in ``tz`` (``fold=0``: a local time in a
    spring-forward gap maps past the gap, an ambiguous one to its first occurrence)."""
    return datetime.combine(day, at, tzinfo=tz).astimezone(UTC)
