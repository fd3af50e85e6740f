"""What the gateway checks about a device's telemetry before the loop may act on it.

A device is authenticated (mTLS, enrolled, not revoked) but not trusted. At entry the
gateway knows what nobody downstream can: which device sent the batch, what that device
is desired and reported to run, when the batch arrived and how much the device has sent
lately. So it refuses a batch for a version the device neither is desired nor reported
to run, one whose window ends out of the clock-skew bound, one whose counts contradict
each other (``TelemetryBatch.inconsistency``, checked again by the monitor), one over
``max_count`` inferences, one whose samples claim ground-truth labels, one holding NaN or
Infinity (JSON has neither) or a NUL character (no consumer can store it); and it holds
back (``unavailable``: the agent sends it again later) a batch over the device's rate
budget. What needs the version's reference profile (feature count, bin edges) is the
monitor's. A status report's names must follow their rules and its error text is made
safe (``check_report``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from edgeloop.contracts.edge.v1 import edge_pb2 as pb
from edgeloop.contracts.events import DeviceStatusReported, Histogram, TelemetryBatch
from edgeloop.contracts.names import MAX_LABELS, check_labels, check_model, check_version
from edgeloop.contracts.signing import check_digest
from edgeloop.kit.consumer import unstorable

#: the longest error text of a status report that is passed on (the rest is cut)
MAX_ERROR = 4000
#: the longest batch id the gateway answers about (agents use UUIDs)
MAX_BATCH_ID = 256


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
    for name, number in _numbers(batch):
        if not math.isfinite(number):
            raise Refused("not_finite", f"{name} is {number} (NaN and Infinity are not JSON)")
    # what would reach the bus (NaN is checked above: serialised, it would be null)
    if (where := unstorable(batch.model_dump_json().encode())) is not None:
        raise Refused("unstorable", where)


def _numbers(batch: TelemetryBatch) -> Iterator[tuple[str, float]]:
    """Every float of a batch, with where it is (the wire takes any double)."""
    named: list[tuple[str, Histogram | None]] = [
        (f"feature_histograms.{i}", h) for i, h in enumerate(batch.feature_histograms)
    ]
    named += [("confidence_histogram", batch.confidence_histogram)]
    named += [("latency_ms_histogram", batch.latency_ms_histogram)]
    for name, h in named:
        for j, edge in enumerate(h.edges if h is not None else ()):
            yield f"{name}.edges.{j}", edge
    for i, sample in enumerate(batch.samples):
        for j, x in enumerate(sample.get("features", ())):
            yield f"samples.{i}.features.{j}", float(x)
        yield f"samples.{i}.confidence", float(sample.get("confidence", 0.0))


def check_hello(hello: pb.Hello) -> None:
    """What a device says about itself in Hello follows the rules of the names it uses:
    its labels (kept as reported attributes) those of enrolment, its model and version
    theirs, its digest is a digest (``ValueError`` otherwise, naming the rule)."""
    check_labels({_preview(k): _preview(v) for k, v in hello.labels.items()})
    if len(hello.labels) > MAX_LABELS:  # (a preview could have merged two keys)
        raise ValueError(f"{len(hello.labels)} labels; a device has at most {MAX_LABELS}")
    if hello.model:
        check_model(_preview(hello.model))
    if hello.version:
        check_version(_preview(hello.version))
    if hello.digest:
        check_digest(_preview(hello.digest))


def check_report(report: DeviceStatusReported) -> DeviceStatusReported:
    """A device's status report as the gateway passes it on: its model and version
    follow their rules and its digests are digests (``ValueError`` otherwise, naming the
    rule); its error text, free as it is, has no NUL and at most ``MAX_ERROR``
    characters; nothing else in it is what no consumer can store.
    """
    if report.model:
        check_model(_preview(report.model))
    if report.version:
        check_version(_preview(report.version))
    for what, digest in (("digest", report.digest), ("desired_digest", report.desired_digest)):
        if digest:
            try:
                check_digest(_preview(digest))
            except ValueError as exc:
                raise ValueError(f"{what}: {exc}") from None
    error = report.error
    if error is not None:
        error = error.replace("\x00", "\\x00")
        if len(error) > MAX_ERROR:
            error = error[:MAX_ERROR] + f" … ({len(error) - MAX_ERROR} characters cut)"
    safe = report.model_copy(update={"error": error})
    if (where := unstorable(safe.model_dump_json().encode())) is not None:
        raise ValueError(f"status report: {where}")
    return safe


def _preview(value: str) -> str:
    """``value``, or its head when it is far too long for any rule (messages quote it)."""
    return value if len(value) <= 200 else value[:200] + "…"


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
