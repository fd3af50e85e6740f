"""Wave planning and judging, as pure functions (no I/O), so they are easy to test.

The order of devices is a stable hash of their ids: a restarted deployer, or an operator
reading the plan, gets the same waves for the same devices.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from edgeloop.contracts.events import WavePlan

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


@dataclass
class Progress:
    """Where a wave's devices are with the rollout's image."""

    converged: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)


def progress(devices: Sequence[str], digest: str, reported: Mapping[str, Reported]) -> Progress:
    """Converged (running ``digest``), failed (its activation failed), or still pending."""
    out = Progress()
    for device in devices:
        r = reported.get(device)
        if r is None:
            out.pending.append(device)
        elif r.state == "running" and r.digest == digest:
            out.converged.append(device)
        elif r.state == "failed" and r.desired_digest == digest:
            out.failed[device] = r.error or "activation failed"
        else:
            out.pending.append(device)
    return out
