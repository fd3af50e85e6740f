"""What the gateway checks about a device's telemetry before the loop may act on it.

A device is authenticated (mTLS, enrolled, not revoked) but not trusted. At entry the
gateway knows what nobody downstream can: which device sent the batch, what that device
is desired and reported to run, when the batch arrived and how much the device has sent
lately. So it refuses a batch for a version the device neither is desired nor reported
to run, one whose window ends out of the clock-skew bound, one whose counts contradict
each other (``TelemetryBatch.inconsistency``, checked again by the monitor), one over
``max_count`` inferences, one whose samples claim ground-truth labels; and it holds back
(``unavailable``: the agent sends it again later) a batch over the device's rate budget.
What needs the version's reference profile (feature count, bin edges) is the monitor's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from edgeloop.contracts.events import TelemetryBatch


class Refused(ValueError):
    """A telemetry batch the loop must not act on; ``code`` names the kind of fault."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class TelemetryPolicy:
    """The bounds a batch must keep (gateway settings)."""

    max_count: int = 100_000
    max_clock_skew: timedelta = timedelta(minutes=5)
    max_age: timedelta = timedelta(days=7)


def check_batch(
    batch: TelemetryBatch,
    *,
    runs: set[tuple[str, str]],
    now: datetime,
    policy: TelemetryPolicy,
) -> None:
    """Refuse (``Refused``) a batch the device cannot honestly have sent.

    ``runs``: the (model, version) pairs the device is desired or reported to run.
    """
    if (batch.model, batch.version) not in runs:
        known = ", ".join(sorted(f"{m}@{v}" for m, v in runs)) or "nothing"
        raise Refused(
            "wrong_version",
            f"telemetry for {batch.model}@{batch.version}; this device is desired or "
            f"reported to run {known}",
        )
    if batch.window_end > now + policy.max_clock_skew:
        raise Refused(
            "clock_skew",
            f"the window ends at {batch.window_end.isoformat()}, more than "
            f"{policy.max_clock_skew.total_seconds():g} s after the gateway's clock "
            f"({now.isoformat()})",
        )
    if batch.window_end < now - policy.max_age:
        raise Refused(
            "clock_skew",
            f"the window ended at {batch.window_end.isoformat()}, longer ago than "
            f"{policy.max_age} (the gateway's clock: {now.isoformat()})",
        )
    if batch.window_start > batch.window_end:
        raise Refused("clock_skew", "the window starts after it ends")
    if batch.count > policy.max_count:
        raise Refused(
            "too_large", f"{batch.count} inferences in one batch (at most {policy.max_count})"
        )
    if (why := batch.inconsistency()) is not None:
        raise Refused("inconsistent", why)
    if any("label" in sample for sample in batch.samples):
        raise Refused(
            "labelled_samples",
            "samples from devices carry no labels (ground truth is given with "
            "`edgeloop data label`)",
        )


@dataclass
class Bucket:
    """A token bucket: ``rate`` per second, at most ``capacity`` saved up."""

    rate: float
    capacity: float
    tokens: float = -1.0
    at: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = self.capacity

    def refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now


@dataclass(frozen=True)
class BudgetLimits:
    """A device's telemetry budget per second (settings), with bursts of ``burst``
    seconds' worth (at least one largest batch)."""

    batches_per_second: float = 1000.0
    records_per_second: float = 50_000.0
    bytes_per_second: float = 4 << 20
    burst_seconds: float = 2.0


class Budget:
    """One device's rate and size budget: batches, inferences and bytes per second."""

    def __init__(self, limits: BudgetLimits, *, max_count: int, max_bytes: int) -> None:
        burst = limits.burst_seconds
        self._buckets = (
            Bucket(limits.batches_per_second, max(1.0, limits.batches_per_second * burst)),
            Bucket(limits.records_per_second, max(max_count, limits.records_per_second * burst)),
            Bucket(limits.bytes_per_second, max(max_bytes, limits.bytes_per_second * burst)),
        )

    def take(self, records: int, size: int) -> str | None:
        """Spend a batch's cost; None when within budget, else what is exhausted (nothing
        is spent then)."""
        now = time.monotonic()
        costs = (1, records, size)
        for bucket in self._buckets:
            bucket.refill(now)
        for name, bucket, cost in zip(
            ("batches", "inferences", "bytes"), self._buckets, costs, strict=True
        ):
            if bucket.tokens < cost:
                return f"{name} per second (at most {bucket.rate:g}/s)"
        for bucket, cost in zip(self._buckets, costs, strict=True):
            bucket.tokens -= cost
        return None
