"""NATS: broker factory and idempotent declaration of streams, KV buckets and consumers."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from faststream.nats import NatsBroker
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    SubjectTransform,
)
from nats.js.errors import BadRequestError, NotFoundError
from opentelemetry.sdk.trace import TracerProvider

from edgeloop.contracts import subjects as s
from edgeloop.contracts.access import DECLARED_STREAMS, inbox_prefix
from edgeloop.kit.settings import TopologySettings

log = logging.getLogger(__name__)

DAY = 24 * 3600.0

#: The duplicate window must cover the relay's longest re-send (a relay killed between
#: publish and mark-sent re-publishes as soon as it is back, well within 2 minutes).
DUPLICATE_WINDOW_SECONDS = 120.0


@dataclass(frozen=True)
class Topology:
    """Streams and KV buckets of the platform (DESIGN §2)."""

    streams: tuple[StreamConfig, ...]
    kv: tuple[KeyValueConfig, ...] = field(default=())


def default_topology(
    *,
    replicas: int = 1,
    telemetry_max_bytes: int = 1 << 30,
    limits: TopologySettings | None = None,
) -> Topology:
    """The platform's streams and buckets, with the retention DESIGN §2 gives them, each
    stored on ``replicas`` nodes of the NATS cluster (consumers inherit it).

    ``limits``: the DLQ's (default: read from the environment, ``EDGELOOP_DLQ_MAX_BYTES``
    and ``EDGELOOP_DLQ_MAX_AGE_SECONDS``).
    """
    limits = limits or TopologySettings()
    topology = Topology(
        streams=(
            StreamConfig(
                name=s.STREAM_LIFECYCLE,
                subjects=list(s.LIFECYCLE_SUBJECTS),
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                max_age=365 * DAY,
                duplicate_window=DUPLICATE_WINDOW_SECONDS,
            ),
            StreamConfig(
                name=s.STREAM_TELEMETRY,
                subjects=list(s.TELEMETRY_SUBJECTS),
                subject_transform=SubjectTransform(*s.telemetry_partition_subjects()),
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                max_age=2 * DAY,
                max_bytes=telemetry_max_bytes,
                duplicate_window=DUPLICATE_WINDOW_SECONDS,
            ),
            StreamConfig(
                name=s.STREAM_DEVICE,
                subjects=list(s.DEVICE_SUBJECTS),
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                max_age=30 * DAY,
                max_msgs_per_subject=100,
                duplicate_window=DUPLICATE_WINDOW_SECONDS,
            ),
            StreamConfig(
                name=s.STREAM_DLQ,
                subjects=list(s.DLQ_SUBJECTS),
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                # the oldest go first; the registry counts what goes unreplayed
                max_age=limits.dlq_max_age_seconds,
                max_bytes=limits.dlq_max_bytes,
                duplicate_window=DUPLICATE_WINDOW_SECONDS,
            ),
        ),
        kv=(
            KeyValueConfig(bucket=s.KV_DESIRED, history=5, storage=StorageType.FILE),
            KeyValueConfig(bucket=s.KV_REPORTED, history=5, storage=StorageType.FILE),
        ),
    )
    return with_replicas(topology, replicas)


def with_replicas(topology: Topology, replicas: int) -> Topology:
    """``topology`` with every stream and bucket stored on ``replicas`` nodes."""
    return Topology(
        streams=tuple(replace(cfg, num_replicas=replicas) for cfg in topology.streams),
        kv=tuple(replace(kv, replicas=replicas) for kv in topology.kv),
    )


def configured_replicas() -> int:
    """``EDGELOOP_NATS_REPLICAS`` (the settings' ``nats_replicas``; 1 when unset)."""
    from edgeloop.kit.settings import ServiceSettings

    return ServiceSettings().nats_replicas


async def await_topology(js: JetStreamContext, within: float = 120.0) -> None:
    """Wait until every platform stream and bucket exists (the bootstrap declares them:
    a service's own NATS user may only look at the topology, not change it).

    Raises:
        RuntimeError: still missing after ``within`` seconds, naming what and the fix.
    """
    import asyncio
    import time

    deadline = time.monotonic() + within
    logged = False
    while True:
        missing = []
        for stream in DECLARED_STREAMS:
            try:
                await js.stream_info(stream)
            except NotFoundError:
                missing.append(stream)
        if not missing:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the NATS topology is not declared (missing {', '.join(missing)}): run the "
                "bootstrap first (`python -m edgeloop.kit.bootstrap` as the bootstrap user; "
                "make up and Compose do)"
            )
        if not logged:
            log.warning("waiting for the bootstrap to declare %s", ", ".join(missing))
            logged = True
        await asyncio.sleep(1.0)


async def declare_topology(
    js: JetStreamContext, topology: Topology | None = None, *, replicas: int | None = None
) -> None:
    """Create or update every stream and bucket; safe to call from every service at start.

    ``replicas`` (default: :func:`configured_replicas`) applies to the default topology;
    an existing stream or bucket with another replica count is scaled to it (JetStream
    moves the data; scaling down a cluster's streams to 1 keeps the leader's copy).
    """
    if topology is None:
        topology = default_topology(replicas=replicas or configured_replicas())
    for cfg in topology.streams:
        await declare_stream(js, cfg)
    for kv in topology.kv:
        await declare_bucket(js, kv)


async def declare_bucket(js: JetStreamContext, kv: KeyValueConfig) -> None:
    """Create ``kv``'s bucket, or bring an existing one to ``kv``'s replica count."""
    try:
        info = await js.stream_info(f"KV_{kv.bucket}")
    except NotFoundError:
        try:
            await js.create_key_value(config=kv)
            log.info("created KV bucket %s", kv.bucket)
            return
        except BadRequestError as exc:  # another replica created it in between
            if exc.err_code != 10058:
                raise
        info = await js.stream_info(f"KV_{kv.bucket}")
    if (info.config.num_replicas or 1) != kv.replicas:
        await js.update_stream(config=replace(info.config, num_replicas=kv.replicas))


async def declare_stream(js: JetStreamContext, cfg: StreamConfig) -> None:
    """Create ``cfg``'s stream, or bring an existing one to ``cfg``."""
    assert cfg.name is not None
    try:
        await js.stream_info(cfg.name)
    except NotFoundError:
        try:
            await js.add_stream(config=cfg)
            log.info("created stream %s", cfg.name)
            return
        except BadRequestError as exc:  # another replica created it in between
            if exc.err_code != 10058:
                raise
    await js.update_stream(config=cfg)


@dataclass(frozen=True)
class ConsumerSpec:
    """A durable pull consumer shared by every replica of a service.

    ``max_deliver`` is the application's budget (after it, the message is dead-lettered);
    the server's own limit is set a little higher so a crash on the last attempt still
    leads to a redelivery that the application can dead-letter instead of losing.
    """

    stream: str
    durable: str
    filter_subjects: tuple[str, ...]
    max_deliver: int = 5
    backoff: tuple[float, ...] = (0.5, 2.0, 5.0, 15.0)
    ack_wait: float = 30.0
    max_ack_pending: int = 1000
    deliver_new_only: bool = False
    batch_size: int = 64
    """Messages fetched and applied in one transaction (1 for heavy handlers)."""
    max_wait: float = 0.05
    """How long a fetch lingers to fill a batch once traffic is flowing (adds latency)."""

    def config(self) -> ConsumerConfig:
        """The JetStream consumer configuration."""
        multi = len(self.filter_subjects) > 1
        return ConsumerConfig(
            durable_name=self.durable,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            max_deliver=self.max_deliver + 3,
            max_ack_pending=self.max_ack_pending,
            deliver_policy=DeliverPolicy.NEW if self.deliver_new_only else DeliverPolicy.ALL,
            filter_subject=None if multi else self.filter_subjects[0],
            filter_subjects=list(self.filter_subjects) if multi else None,
        )

    def delay_after(self, deliveries: int) -> float:
        """Back-off before the next attempt, after ``deliveries`` failed ones."""
        if not self.backoff:
            return 0.0
        return self.backoff[min(max(deliveries, 1), len(self.backoff)) - 1]


async def declare_consumer(js: JetStreamContext, spec: ConsumerSpec) -> None:
    """Create or update a durable consumer (idempotent)."""
    await js.add_consumer(spec.stream, config=spec.config())


#: The logger FastStream's NATS broker writes to (its own stdout handler, no propagation).
FASTSTREAM_LOGGER = "faststream.access.nats"


class _NoTaskChatter(logging.Filter):
    """Drops FastStream's "callback for Task-N is being executed..." (its supervisor
    noting, at INFO, that a subscriber's task ended: a dozen lines at every stop, none
    of them news); the supervisor's real reports (a task that raised) pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (
            message.startswith("callback for ") and message.endswith(" is being executed...")
        )


def quiet_faststream() -> None:
    """Keep FastStream's bookkeeping out of the logs at INFO (idempotent): every process
    that makes a broker (services, benchmarks, tests) gets it through
    :func:`make_broker`."""
    logger = logging.getLogger(FASTSTREAM_LOGGER)
    if not any(isinstance(f, _NoTaskChatter) for f in logger.filters):
        logger.addFilter(_NoTaskChatter())


def make_broker(
    servers: str,
    *,
    tracer_provider: TracerProvider | None = None,
    graceful_timeout: float = 15.0,
    name: str = "edgeloop",
    user: str | None = None,
    password: str | None = None,
) -> NatsBroker:
    """A FastStream NATS broker that reconnects forever and propagates trace context.

    FastStream's telemetry middleware puts ``traceparent`` in every message's headers and
    continues the trace on the consumer side; the Prometheus middleware counts messages.
    ``user``/``password``: the service's own NATS user (see ``edgeloop.contracts.access``),
    whose replies come back on its own inbox prefix.
    """
    from faststream.nats.opentelemetry import NatsTelemetryMiddleware
    from faststream.nats.prometheus import NatsPrometheusMiddleware
    from faststream.security import SASLPlaintext
    from prometheus_client import REGISTRY

    quiet_faststream()
    middlewares = [
        NatsTelemetryMiddleware(tracer_provider=tracer_provider),
        NatsPrometheusMiddleware(registry=REGISTRY, app_name=name),
    ]
    # a user gets its replies on an inbox prefix of its own (the only one it may read)
    inbox = {"inbox_prefix": inbox_prefix(user)} if user else {}
    return NatsBroker(
        **inbox,  # type: ignore[arg-type]
        servers=[u.strip() for u in servers.split(",") if u.strip()],
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        graceful_timeout=graceful_timeout,
        middlewares=middlewares,
        security=SASLPlaintext(username=user, password=password or "") if user else None,
        # Per-message "Received/Processed" lines cost more than the handling itself at
        # thousands of events/s; they are logged at DEBUG, outcomes go to metrics.
        log_level=logging.DEBUG,
    )
