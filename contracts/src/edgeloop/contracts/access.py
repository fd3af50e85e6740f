"""What each service may do on the bus: the subjects it publishes, the subjects it
consumes, the KV buckets it reads and writes.

One declaration, from which the NATS server's per-service users get their permissions
(``make up``, the test harness, ``make keys`` for Compose): a service connecting with its
own user can publish only its own events (and the dead letters of what it consumes),
create consumers only on the streams it reads, and touch only its buckets. Everything
else is refused by the server (``Permissions Violation``). Subjects may hold wildcards.

Reading is granted per stream (JetStream's consumer API names the stream, not the
filter), so a service that reads LIFECYCLE could read all of it; writing is granted
per subject.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from edgeloop.contracts import subjects as s

#: The streams behind the KV buckets (JetStream names a bucket's stream ``KV_<bucket>``).
KV_STREAM_PREFIX: Final = "KV_"


@dataclass(frozen=True)
class Access:
    """One service's rights on the bus."""

    publishes: tuple[str, ...] = ()
    """Subjects it publishes (its events)."""
    consumes: tuple[str, ...] = ()
    """Subjects it consumes from a stream (it dead-letters what it cannot process)."""
    kv_reads: tuple[str, ...] = ()
    """KV buckets it reads or watches."""
    kv_writes: tuple[str, ...] = ()
    """KV buckets it writes (and reads: a compare-and-set reads first)."""


def stream_of(subject: str) -> str:
    """The stream that captures ``subject`` (a published or a filter subject).

    Raises:
        ValueError: no platform stream captures it.
    """
    head = subject.split(".", 1)[0]
    if f"{head}.>" in s.LIFECYCLE_SUBJECTS:
        return s.STREAM_LIFECYCLE
    if subject.startswith(f"{s.TELEMETRY_PREFIX}."):
        return s.STREAM_TELEMETRY
    if subject.startswith(f"{s.DEVICE_STATUS_PREFIX}."):
        return s.STREAM_DEVICE
    if head == s.DLQ_PREFIX:
        return s.STREAM_DLQ
    raise ValueError(f"no stream captures {subject!r}")


#: Every platform service's rights (the names are the services' own: ``make up``'s).
SERVICES: Final[Mapping[str, Access]] = {
    "registry": Access(
        publishes=(s.MODEL_COMMITTED,),
        consumes=(
            s.IMAGE_BUILT,
            s.IMAGE_BUILD_FAILED,
            s.VALIDATION_PASSED,
            s.VALIDATION_FAILED,
            s.RETRAIN_REQUESTED,
        ),
    ),
    "builder": Access(
        publishes=(s.IMAGE_BUILT, s.IMAGE_BUILD_FAILED),
        consumes=(s.MODEL_COMMITTED,),
    ),
    "validator": Access(
        publishes=(s.VALIDATION_PASSED, s.VALIDATION_FAILED),
        consumes=(s.IMAGE_BUILT,),
    ),
    "deployer": Access(
        publishes=(
            s.ROLLOUT_REQUESTED,
            s.ROLLOUT_REFUSED,
            s.ROLLOUT_WAVE_STARTED,
            s.ROLLOUT_WAVE_SUCCEEDED,
            s.ROLLOUT_WAVE_FAILED,
            s.ROLLOUT_COMPLETED,
            s.ROLLOUT_ROLLED_BACK,
            s.ROLLOUT_PAUSED,
            s.ROLLOUT_RESUMED,
            s.ROLLOUT_ABORTED,
            s.ROLLOUT_APPROVAL_REQUESTED,
            s.ROLLOUT_APPROVED,
        ),
        consumes=(s.ROLLOUT_REQUESTED, s.VALIDATION_PASSED, s.ROLLOUT_CANARY_VERDICT),
        kv_reads=(s.KV_REPORTED,),
        kv_writes=(s.KV_DESIRED,),
    ),
    "monitor": Access(
        publishes=(s.ALARM_RAISED, s.ALARM_RESOLVED, s.RETRAIN_REQUESTED, s.ROLLOUT_CANARY_VERDICT),
        consumes=(
            f"{s.TELEMETRY_PREFIX}.>",
            s.ROLLOUT_WAVE_STARTED,
            s.ROLLOUT_WAVE_SUCCEEDED,
            s.ROLLOUT_WAVE_FAILED,
        ),
    ),
    "gateway": Access(
        publishes=(f"{s.TELEMETRY_PREFIX}.*.*", f"{s.DEVICE_STATUS_PREFIX}.*"),
        kv_reads=(s.KV_DESIRED,),
        kv_writes=(s.KV_REPORTED,),
    ),
}

#: Streams every service may create and bring up to date at start (``declare_topology``):
#: the platform's streams and the buckets' streams. Deleting or purging one is refused.
DECLARED_STREAMS: Final = (
    s.STREAM_LIFECYCLE,
    s.STREAM_TELEMETRY,
    s.STREAM_DEVICE,
    s.STREAM_DLQ,
    f"{KV_STREAM_PREFIX}{s.KV_DESIRED}",
    f"{KV_STREAM_PREFIX}{s.KV_REPORTED}",
)


def _read_stream(stream: str) -> list[str]:
    """Publish rights to create and pull from consumers on ``stream`` and ack them."""
    api = "$JS.API.CONSUMER"
    return [
        f"{api}.CREATE.{stream}",
        f"{api}.CREATE.{stream}.>",
        f"{api}.DURABLE.CREATE.{stream}.*",
        f"{api}.INFO.{stream}.*",
        f"{api}.DELETE.{stream}.*",
        f"{api}.MSG.NEXT.{stream}.*",
        f"$JS.ACK.{stream}.>",
        f"$JS.FC.{stream}.>",
    ]


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def publish_allowed(access: Access) -> list[str]:
    """Every subject ``access`` may publish to, JetStream API calls included."""
    allowed = ["$JS.API.INFO"]
    for stream in DECLARED_STREAMS:
        allowed += [
            f"$JS.API.STREAM.INFO.{stream}",
            f"$JS.API.STREAM.CREATE.{stream}",
            f"$JS.API.STREAM.UPDATE.{stream}",
        ]
    allowed += access.publishes
    allowed += [s.dlq_subject(subject) for subject in access.consumes]
    streams = [stream_of(subject) for subject in access.consumes]
    for bucket in (*access.kv_reads, *access.kv_writes):
        kv_stream = f"{KV_STREAM_PREFIX}{bucket}"
        streams.append(kv_stream)
        allowed += [f"$JS.API.DIRECT.GET.{kv_stream}.>", f"$JS.API.STREAM.MSG.GET.{kv_stream}"]
    for bucket in access.kv_writes:
        allowed.append(f"$KV.{bucket}.>")
    for stream in _unique(streams):
        allowed += _read_stream(stream)
    return _unique(allowed)


def nats_permissions(access: Access) -> dict[str, Any]:
    """The ``permissions`` block of a NATS user with ``access``.

    Replies come back on the client's inbox; nothing else may be subscribed to (core
    NATS subscriptions to stream subjects would bypass the consumer rights).
    """
    return {
        "publish": {"allow": publish_allowed(access)},
        "subscribe": {"allow": ["_INBOX.>"]},
    }
