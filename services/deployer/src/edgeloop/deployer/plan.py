"""Wave planning and judging, as pure functions (no I/O), so they are easy to test.

The order of devices is a stable hash of their ids: a restarted deployer, or an operator
reading the plan, gets the same waves for the same devices.

Waves are **online-first**: the plan made at admission says how many devices each wave
reaches; which ones is decided when the wave starts (:func:`draw_wave`), from the
devices no earlier wave took, online and healthy ones only, in the stable order. An
offline device is left for a later wave; the last wave gives everyone left the release,
and those still offline or unhealthy then are *stragglers*: not waited for, not judged,
shown ``pending`` until they run it (``converged``) or their deadline passed (``stale``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from edgeloop.contracts.events import WavePlan
from edgeloop.contracts.windows import WindowSpec

#: The waves of a rollout that names none: one canary device, 10 %, 50 %, everything.
DEFAULT_WAVES = [
    WavePlan(count=1),
    WavePlan(percent=10),
    WavePlan(percent=50),
    WavePlan(percent=100),
]


class RolloutKnobs(BaseModel):
    """How a rollout proceeds: its waves, bake time, convergence timeout and failure
    budget (the fields an API request may set)."""

    model_config = ConfigDict(extra="forbid")

    waves: list[WavePlan] = Field(default_factory=lambda: list(DEFAULT_WAVES), min_length=1)
    bake_seconds: float = Field(default=30.0, ge=0)
    converge_timeout_seconds: float = Field(default=120.0, gt=0)
    max_failures: int | None = Field(default=None, ge=0)
    max_failures_percent: float | None = Field(default=None, ge=0, le=100)
    device_deadline_seconds: float = Field(default=3600.0, gt=0)
    window: WindowSpec | None = None
    max_unavailable: int | None = Field(default=None, ge=1)
    max_unavailable_percent: float | None = Field(default=None, gt=0, le=100)

    def knobs(self) -> dict[str, Any]:
        """These fields alone, for a ``RolloutRequested``."""
        return {k: getattr(self, k) for k in RolloutKnobs.model_fields}


def device_order(device_ids: Iterable[str]) -> list[str]:
    """``device_ids`` in their stable rollout order (sha-256 of the id)."""
    return sorted(set(device_ids), key=lambda d: (hashlib.sha256(d.encode()).digest(), d))


def wave_sizes(total: int, waves: Sequence[WavePlan]) -> list[int]:
    """The size of each wave over ``total`` devices.

    Waves are cumulative, as in Flagger's and Argo Rollouts' steps: ``1,10%,50%,100%`` means
    one device, then up to 10 % of the devices, then half, then all. A percentage rounds
    up (10 % of 3 devices is one device). Waves that would add no device are dropped; a
    plan whose last wave stays under 100 % covers only that part of the group.
    """
    sizes: list[int] = []
    reached = 0
    for plan in waves:
        if plan.count is not None:
            target = plan.count
        elif plan.percent is not None:
            target = math.ceil(total * plan.percent / 100 - 1e-9)
        else:
            raise ValueError("a wave needs a device count or a percentage")
        target = min(max(target, reached), total)
        if target > reached:
            sizes.append(target - reached)
            reached = target
    return sizes


def plan_waves(device_ids: Iterable[str], waves: Sequence[WavePlan]) -> list[list[str]]:
    """Devices of each wave, in rollout order."""
    ordered = device_order(device_ids)
    out: list[list[str]] = []
    start = 0
    for size in wave_sizes(len(ordered), waves):
        out.append(ordered[start : start + size])
        start += size
    return out


def failure_budget(size: int, max_failures: int | None, max_failures_percent: float | None) -> int:
    """How many of a wave's ``size`` devices may fail (to activate or to converge).

    The stricter of the two limits when both are set; none set means no failure at all.
    """
    limits = []
    if max_failures is not None:
        limits.append(max_failures)
    if max_failures_percent is not None:
        limits.append(math.floor(size * max_failures_percent / 100 + 1e-9))
    return min(limits) if limits else 0


@dataclass(frozen=True)
class Reported:
    """What the deployer needs of a device's reported state."""

    state: str
    digest: str | None = None
    desired_digest: str | None = None
    error: str | None = None
    deferred_since: datetime | None = None
    """``deferred``: since when its update lock holds the activation back."""
    deferred_until: datetime | None = None
    """``deferred``: when the device activates anyway (its maximum deferral)."""


@dataclass
class Progress:
    """Where a wave's devices are with the rollout's image."""

    converged: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)
    deferred: dict[str, str] = field(default_factory=dict)
    """Devices that hold the image back while their update lock is held (the words shown)."""


def progress(devices: Sequence[str], digest: str, reported: Mapping[str, Reported]) -> Progress:
    """Converged (running ``digest``), failed (its activation failed), deferred (its
    update lock is held), or still pending."""
    out = Progress()
    for device in devices:
        r = reported.get(device)
        if r is None:
            out.pending.append(device)
        elif r.state == "running" and r.digest == digest:
            out.converged.append(device)
        elif r.state == "failed" and r.desired_digest == digest:
            out.failed[device] = r.error or "activation failed"
        elif r.state == "deferred" and r.desired_digest == digest:
            out.deferred[device] = deferral(r)
        else:
            out.pending.append(device)
    return out


def deferral(r: Reported) -> str:
    """``deferred: update lock held since …; activates by … at the latest``."""
    since = f" since {_at(r.deferred_since)}" if r.deferred_since else ""
    until = f"; activates by {_at(r.deferred_until)} at the latest" if r.deferred_until else ""
    return f"deferred: {r.error or 'update lock held'}{since}{until}"


def disruption_cap(size: int, count: int | None, percent: float | None) -> int | None:
    """How many of a wave's ``size`` devices may be activating at once (None: all).

    The stricter of the two limits when both are set; a percentage rounds up and never
    gives less than one device (a budget of nothing would wedge the rollout).
    """
    limits = []
    if count is not None:
        limits.append(count)
    if percent is not None:
        limits.append(math.ceil(size * percent / 100 - 1e-9))
    return max(1, min(limits)) if limits else None


# --- online-first draws ----------------------------------------------------------------


@dataclass(frozen=True)
class Presence:
    """What the gateway's device registry says of a device when a wave starts."""

    online: bool
    last_seen: datetime | None = None
    state: str | None = None
    """Its last reported state (``running``, ``failed``, …)."""
    error: str | None = None


@dataclass(frozen=True)
class Absence:
    """Why a device is not drawn into a wave: ``kind`` (``offline``, ``unhealthy``,
    ``unknown``), since when it is silent (``None``: never seen), and the words shown."""

    kind: str
    since: datetime | None
    text: str


def absence(presence: Presence | None, now: datetime, max_silence: float) -> Absence | None:
    """Why the device cannot be drawn into a wave now; None when it is online and healthy.

    Online means a session with a gateway (the registry's ``online``) whose last message
    is at most ``max_silence`` seconds old (a gateway that died leaves its sessions
    marked online). Healthy means its last report is not ``failed``: a device whose last
    activation failed is a poor canary; it still gets the release, as a straggler.
    """
    if presence is None:
        return Absence("unknown", None, "not enrolled any more (revoked?)")
    seen = presence.last_seen
    if seen is None:
        return Absence("offline", None, "never connected")
    if not presence.online:
        return Absence("offline", seen, f"offline since {_at(seen)}")
    if (now - seen).total_seconds() > max_silence:
        return Absence("offline", seen, f"silent since {_at(seen)}")
    if presence.state == "failed":
        why = f": {presence.error}" if presence.error else ""
        return Absence("unhealthy", None, f"unhealthy: its last activation failed{why}")
    return None


#: How many absent devices a message names (the rest are counted).
NAMED_ABSENT = 5


def no_canary(absent: Mapping[str, Absence], whose: str) -> str:
    """The reason a rollout cannot start a canary: every one of ``whose`` devices (the
    ``absent`` ones) is offline or unhealthy."""
    return (
        f"none of the {len(absent)} {whose} is online and healthy, so the release has no "
        f"device to run its canary on ({named_absent(absent)}); start them or wait until "
        "they connect, then start the rollout again"
    )


def named_absent(absent: Mapping[str, Absence]) -> str:
    """The first few absent devices with why (``d1: offline since …; …; and 3 more``)."""
    items = [f"{d}: {a.text}" for d, a in list(absent.items())[:NAMED_ABSENT]]
    more = len(absent) - NAMED_ABSENT
    if more > 0:
        items.append(f"and {more} more")
    return "; ".join(items)


def _at(when: datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S %Z").strip()


@dataclass(frozen=True)
class Draw:
    """The devices a starting wave takes (``members``: given the release and judged),
    and on the last wave the ``stragglers`` (given the release, not judged)."""

    members: list[str]
    stragglers: list[str] = field(default_factory=list)


def draw_wave(
    undrawn: Iterable[str], size: int, *, last: bool, ready: Callable[[str], bool]
) -> Draw:
    """Which of the devices no earlier wave took a wave of ``size`` draws.

    The first ``size`` devices that are ``ready`` (online and healthy), in the stable
    order: a device planned for this wave but offline is left for a later one, and an
    online device planned for a later wave moves up to take its place; a deferred device
    back online comes first again (it is early in the order). The last wave takes every
    ready device left, and gives the others the release as stragglers.
    """
    order = device_order(undrawn)
    ready_ones = [d for d in order if ready(d)]
    if last:
        taken = set(ready_ones)
        return Draw(ready_ones, [d for d in order if d not in taken])
    return Draw(ready_ones[: max(size, 0)])


def wave_target(planned: Sequence[int], drawn: Sequence[int], wave: int) -> int:
    """How many devices wave ``wave`` draws: up to the cumulative size the plan gives it
    (``planned`` sizes of every wave), less those earlier waves drew (``drawn``), so a
    wave short of online devices is made up by the next one."""
    return sum(planned[: wave + 1]) - sum(drawn[:wave])


def straggler_status(
    reported: Reported | None,
    digest: str,
    given_at: datetime,
    deadline_seconds: float,
    now: datetime,
) -> str:
    """Where a straggler is with the release: ``converged`` (runs ``digest``), ``failed``
    (its activation failed), ``stale`` (silent past its deadline, counted from when it
    was given the release) or ``pending``."""
    if reported is not None and reported.state == "running" and reported.digest == digest:
        return "converged"
    if reported is not None and reported.state == "failed" and reported.desired_digest == digest:
        return "failed"
    if now >= given_at + timedelta(seconds=deadline_seconds):
        return "stale"
    return "pending"
