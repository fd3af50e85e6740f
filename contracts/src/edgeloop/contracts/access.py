"""What each service may do on the bus: the subjects it publishes, the subjects it
consumes, the KV buckets it reads and writes.

One declaration, from which the NATS server's per-service users get their permissions
(``make up``, the test harness, ``make keys`` for Compose): a service connecting with its
own user can publish only its own events (and the dead letters of what it consumes),
create consumers only on the streams it reads, and touch only its buckets. Everything
else is refused by the server (``Permissions Violation``). Subjects may hold wildcards.

Reading is granted per durable consumer: a service may create, look up and pull from
its own durables only (JetStream's consumer API names the stream and the consumer), so
it cannot bind to another service's durable, nor delete or redefine one. KV buckets it
reads are watched through short-lived ordered consumers of its own on the bucket's
stream. Writing is granted per subject. The topology (streams and buckets) is declared
by one bootstrap step with its own user (:data:`BOOTSTRAP`); services may only look at
it. Replies come back on an inbox prefix of the user's own (:func:`inbox_prefix`), so no
user can subscribe to the replies of another.
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
    durables: tuple[str, ...] = ()
    """The durable consumers it binds to (each on the stream of what it consumes)."""


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
        durables=(
            "registry-image-built",
            "registry-image-build-failed",
            "registry-validation-passed",
            "registry-validation-failed",
            s.CONSUMER_REGISTRY_RETRAIN,
        ),
    ),
    "builder": Access(
        publishes=(s.IMAGE_BUILT, s.IMAGE_BUILD_FAILED),
        consumes=(s.MODEL_COMMITTED,),
        durables=(s.CONSUMER_BUILDER,),
    ),
    "validator": Access(
        publishes=(s.VALIDATION_PASSED, s.VALIDATION_FAILED),
        consumes=(s.IMAGE_BUILT,),
        durables=(s.CONSUMER_VALIDATOR,),
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
            s.ROLLOUT_SHADOW_STARTED,
            s.ROLLOUT_SHADOW_PASSED,
            s.ROLLOUT_SHADOW_FAILED,
        ),
        consumes=(s.ROLLOUT_REQUESTED, s.VALIDATION_PASSED, s.ROLLOUT_CANARY_VERDICT),
        kv_reads=(s.KV_REPORTED,),
        kv_writes=(s.KV_DESIRED,),
        durables=(s.CONSUMER_DEPLOYER, s.CONSUMER_DEPLOYER_RELEASES, s.CONSUMER_DEPLOYER_VERDICTS),
    ),
    "monitor": Access(
        publishes=(s.ALARM_RAISED, s.ALARM_RESOLVED, s.RETRAIN_REQUESTED, s.ROLLOUT_CANARY_VERDICT),
        consumes=(
            f"{s.TELEMETRY_PREFIX}.>",
            s.ROLLOUT_WAVE_STARTED,
            s.ROLLOUT_WAVE_SUCCEEDED,
            s.ROLLOUT_WAVE_FAILED,
        ),
        durables=(
            *(f"{s.CONSUMER_MONITOR_TELEMETRY}-{k}" for k in range(s.TELEMETRY_PARTITIONS)),
            "monitor-wave-started",
            "monitor-wave-succeeded",
            "monitor-wave-failed",
        ),
    ),
    # webhooks: reads every lifecycle event, publishes none (it only dead-letters)
    "notifier": Access(
        consumes=s.LIFECYCLE_SUBJECTS,
        durables=(s.CONSUMER_NOTIFIER,),
    ),
    "gateway": Access(
        publishes=(f"{s.TELEMETRY_PREFIX}.*.*", f"{s.DEVICE_STATUS_PREFIX}.*"),
        kv_reads=(s.KV_DESIRED,),
        kv_writes=(s.KV_REPORTED,),
    ),
}

#: The user that declares the topology (streams and buckets; ``edgeloop.kit.bootstrap``).
BOOTSTRAP: Final = "bootstrap"

#: Streams the bootstrap creates and brings up to date, and services may look at:
#: the platform's streams and the buckets' streams. Deleting or purging one is refused.
DECLARED_STREAMS: Final = (
    s.STREAM_LIFECYCLE,
    s.STREAM_TELEMETRY,
    s.STREAM_DEVICE,
    s.STREAM_DLQ,
    f"{KV_STREAM_PREFIX}{s.KV_DESIRED}",
    f"{KV_STREAM_PREFIX}{s.KV_REPORTED}",
)


def _own_durables(stream: str, durables: Iterable[str]) -> list[str]:
    """Rights to create (or update), look up, pull from and ack ``durables`` on
    ``stream``, and nothing else of its consumers."""
    api = "$JS.API.CONSUMER"
    allowed = []
    for durable in durables:
        allowed += [
            f"{api}.CREATE.{stream}.{durable}",
            f"{api}.CREATE.{stream}.{durable}.>",
            f"{api}.DURABLE.CREATE.{stream}.{durable}",
            f"{api}.INFO.{stream}.{durable}",
            f"{api}.MSG.NEXT.{stream}.{durable}",
            f"$JS.ACK.{stream}.{durable}.>",
        ]
    return allowed


def _watch_stream(stream: str) -> list[str]:
    """Rights to watch a bucket's stream: ordered (ephemeral, push) consumers, created
    and deleted by the client, with flow control."""
    api = "$JS.API.CONSUMER"
    return [
        f"{api}.CREATE.{stream}",
        f"{api}.CREATE.{stream}.>",
        f"{api}.INFO.{stream}.*",
        f"{api}.DELETE.{stream}.*",
        f"$JS.FC.{stream}.>",
    ]


def inbox_prefix(user: str) -> str:
    """The inbox prefix ``user`` gets its replies on (``_INBOX_<user>``): only it may
    subscribe there."""
    return f"_INBOX_{user}"


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def publish_allowed(access: Access) -> list[str]:
    """Every subject ``access`` may publish to, JetStream API calls included."""
    allowed = ["$JS.API.INFO"]
    allowed += [f"$JS.API.STREAM.INFO.{stream}" for stream in DECLARED_STREAMS]
    allowed += access.publishes
    allowed += [s.dlq_subject(subject) for subject in access.consumes]
    streams = _unique(stream_of(subject) for subject in access.consumes)
    for stream in streams:
        allowed += _own_durables(stream, access.durables)
    for bucket in _unique((*access.kv_reads, *access.kv_writes)):
        kv_stream = f"{KV_STREAM_PREFIX}{bucket}"
        allowed += [f"$JS.API.DIRECT.GET.{kv_stream}.>", f"$JS.API.STREAM.MSG.GET.{kv_stream}"]
        allowed += _watch_stream(kv_stream)
    for bucket in access.kv_writes:
        allowed.append(f"$KV.{bucket}.>")
    return _unique(allowed)


def bootstrap_permissions() -> dict[str, Any]:
    """The ``permissions`` block of the bootstrap user: create, update and look at the
    platform's streams and buckets; nothing else (no consumers, no events, no deletes)."""
    allowed = ["$JS.API.INFO"]
    for stream in DECLARED_STREAMS:
        allowed += [
            f"$JS.API.STREAM.INFO.{stream}",
            f"$JS.API.STREAM.CREATE.{stream}",
            f"$JS.API.STREAM.UPDATE.{stream}",
        ]
    return {
        "publish": {"allow": allowed},
        "subscribe": {"allow": [f"{inbox_prefix(BOOTSTRAP)}.>"]},
    }


def nats_permissions(access: Access, user: str) -> dict[str, Any]:
    """The ``permissions`` block of NATS user ``user`` with ``access``.

    Replies come back on the user's own inbox prefix; nothing else may be subscribed to
    (core NATS subscriptions to stream subjects would bypass the consumer rights).
    """
    return {
        "publish": {"allow": publish_allowed(access)},
        "subscribe": {"allow": [f"{inbox_prefix(user)}.>"]},
    }
