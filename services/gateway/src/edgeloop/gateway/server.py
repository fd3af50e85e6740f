"""The device-facing gRPC service: one ``Connect`` session per device, artifact chunks.

A session starts with Hello; the device id it claims must be the common name of the
client certificate the TLS handshake verified, and that certificate must be the one the
device registry holds for it (not revoked, not replaced). The gateway then answers
Welcome, pushes the device's current desired state, and every change of it the
``desired`` KV watch brings. Inbound messages are read as raw bytes and parsed here, so
a malformed or oversized message costs that device an ``Error`` and nobody else
anything. Each session has a bounded outbound queue: a device that does not read its
acknowledgements stops being read (gRPC flow control pushes back on it alone).

A device is authenticated, not trusted (DESIGN §6a): its Hello is size-checked and its
labels are kept as reported attributes (only enrolment labels target rollouts and name
groups); its telemetry is checked at entry (``edgeloop.gateway.trust``) and refusals are
counted per device; a revoked or re-enrolled certificate ends its live sessions within a
second and its artifact fetches at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import nats.errors
import nats.js.errors
from google.protobuf.message import DecodeError
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from prometheus_client import Counter, Gauge
from pydantic import ValidationError

from edgeloop.contracts import subjects as s
from edgeloop.contracts.convert import status_from_proto, telemetry_from_proto
from edgeloop.contracts.edge.v1 import edge_pb2 as pb
from edgeloop.contracts.events import DeviceState, DeviceStatusReported
from edgeloop.contracts.twin import DesiredModel, image_repository
from edgeloop.gateway.artifacts import ArtifactCache, NotAllowed
from edgeloop.gateway.devices import DeviceStore
from edgeloop.gateway.pki import check_device_id, fingerprint
from edgeloop.gateway.trust import (
    MAX_BATCH_ID,
    Budget,
    BudgetLimits,
    Refused,
    TelemetryPolicy,
    check_batch,
    check_hello,
    check_report,
)
from edgeloop.kit.consumer import printable
from edgeloop.kit.faults import looks_like_outage
from edgeloop.kit.kv import KvMirror
from edgeloop.kit.supervise import cancel_and_wait
from edgeloop.kit.tracing import parent_context

log = logging.getLogger(__name__)

SERVICE = "edgeloop.edge.v1.EdgeGateway"

SESSIONS = Gauge("edgeloop_gateway_sessions", "Open device sessions")
BATCHES = Counter("edgeloop_gateway_telemetry_batches", "Telemetry batches put on the bus")
RECORDS = Counter("edgeloop_gateway_telemetry_records", "Inferences in those batches")
BUS_REFUSED = Counter(
    "edgeloop_gateway_bus_unavailable_total",
    "Telemetry batches the bus did not acknowledge (the device resends them)",
)
#: Errors of a publish that say "not now", not "never": the device resends.
BUS_UNAVAILABLE = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.NoStreamResponseError,
)
#: How long a device's status report waits for the bus to answer again.
REPORT_PATIENCE = 30.0
#: How long a device's disconnection is recorded again while PostgreSQL or the bus is down.
OFFLINE_PATIENCE = 300.0
REJECTED = Counter("edgeloop_gateway_rejected_messages", "Agent messages refused", ["code"])
REFUSED = Counter("edgeloop_gateway_refused_sessions", "Sessions refused", ["reason"])
TELEMETRY_REFUSED = Counter(
    "edgeloop_gateway_refused_batches_total",
    "Telemetry batches refused or held back at entry (per device in the device registry)",
    ["code"],
)
#: The (model, version) pairs a session remembers its device was desired or reported to run.
MAX_RUNS = 8
#: How far back the look for revoked or re-enrolled devices reaches (commit delays).
IDENTITY_MARGIN = timedelta(seconds=5)


@dataclass
class Session:
    """One device's open stream."""

    device_id: str
    session_id: str
    labels: dict[str, str]
    """Enrolment labels (what the device said in Hello is only stored, as reported)."""
    outbound: asyncio.Queue[pb.GatewayMessage]
    fingerprint: str = ""
    """Of the certificate the session was opened with (a re-enrolment ends it)."""
    runs: dict[tuple[str, str], None] = field(default_factory=dict)
    """(model, version) the device was desired or reported to run during the session, the
    latest ``MAX_RUNS`` (in order): telemetry for anything else is refused."""
    budget: Budget | None = None
    last_seen: float = field(default_factory=time.monotonic)
    desired: tuple[int, DesiredModel | None] | None = None
    """The latest desired state not yet sent (only the newest matters)."""
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    closed: str | None = None
    """Why the gateway ends the session (set → the writer stops)."""
    final: bool = False
    """The device may not come back (revoked, replaced): its fetches are refused, not
    told to try again."""
    delivered: dict[str, tuple[int, str]] = field(default_factory=dict)
    """Manifest digest → (when it was sent, its trace parent): the start of the device's
    activation span."""

    def push_desired(self, revision: int, doc: DesiredModel | None) -> None:
        """Replace any unsent desired state with this one."""
        for model, version in doc.versions() if doc is not None else []:
            self.ran(model, version)  # a challenger's too: its last batches come after it
        if self.desired is None or self.desired[0] < revision:
            self.desired = (revision, doc)
            self.wake.set()

    def ran(self, model: str, version: str) -> None:
        """The device was desired or reported to run ``model@version`` (a device that
        reports ever new versions is remembered for its latest ``MAX_RUNS`` only)."""
        self.runs.pop((model, version), None)
        self.runs[(model, version)] = None
        while len(self.runs) > MAX_RUNS:
            del self.runs[next(iter(self.runs))]

    def heard_within(self, seconds: float) -> bool:
        """Whether the device sent anything in the last ``seconds``."""
        return time.monotonic() - self.last_seen < seconds

    def close(self, reason: str, *, final: bool = False) -> None:
        """End the session (the stream finishes after what is queued); ``final`` when
        the device's identity no longer holds."""
        self.closed = reason
        self.final = self.final or final
        self.wake.set()


class SessionRefused(Exception):
    """A session is not accepted; the message says why (sent to the device)."""

    def __init__(self, code: str, message: str, status: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code
        self.status = status

    @property
    def fatal(self) -> bool:
        """Whether trying again cannot help (a full gateway or one whose database is
        down will take the device later)."""
        return self.status not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


#: What a device is told while the gateway's database does not answer (its certificate
#: cannot be checked, its session not recorded): not its fault, and not for long.
DATABASE_DOWN = "the gateway cannot reach its database just now; the device should retry"


@contextlib.asynccontextmanager
async def _database_answers() -> AsyncIterator[None]:
    """An outage of the gateway's PostgreSQL, met checking or recording a device, as a
    refusal with ``UNAVAILABLE`` (the agent retries) instead of an error out of the RPC
    (``UNKNOWN``, an internal error to the device)."""
    try:
        yield
    except SessionRefused:
        raise
    except Exception as exc:
        if not looks_like_outage(exc):
            raise
        log.warning("device refused for now: %s: %s", type(exc).__name__, exc)
        raise SessionRefused("unavailable", DATABASE_DOWN, grpc.StatusCode.UNAVAILABLE) from exc


class EdgeGateway:
    """Device sessions, desired-state fan-out, telemetry and status onto the bus."""

    def __init__(
        self,
        *,
        js: JetStreamContext,
        desired_kv: KeyValue,
        reported_kv: KeyValue,
        store: DeviceStore,
        artifacts: ArtifactCache,
        gateway_id: str,
        heartbeat_seconds: int = 10,
        max_message_bytes: int = 1 << 20,
        outbound_queue: int = 64,
        chunk_bytes: int = 256 * 1024,
        max_sessions: int = 50_000,
        group_label: str = "group",
        max_hello_bytes: int = 16 * 1024,
        telemetry_policy: TelemetryPolicy | None = None,
        budget: BudgetLimits | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self.tracer = tracer or trace.get_tracer("edgeloop.gateway")
        self.js = js
        self.desired_kv = desired_kv
        self.reported_kv = reported_kv
        self.store = store
        self.artifacts = artifacts
        self.gateway_id = gateway_id
        self.heartbeat_seconds = heartbeat_seconds
        self.max_message_bytes = max_message_bytes
        self.outbound_queue = outbound_queue
        self.chunk_bytes = chunk_bytes
        self.max_sessions = max_sessions
        self.group_label = group_label
        self.max_hello_bytes = max_hello_bytes
        self.policy = telemetry_policy or TelemetryPolicy()
        self.budget_limits = budget or BudgetLimits()
        self._refusals: dict[str, tuple[dict[str, int], str, datetime]] = {}
        self._identity_since: datetime | None = None
        self.sessions: dict[str, Session] = {}
        self.desired: dict[str, tuple[int, DesiredModel | None]] = {}
        self._desired_mirror = KvMirror(desired_kv, self._desired_changed, name=s.KV_DESIRED)
        self._seen: dict[str, datetime] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._offline_writes: set[asyncio.Task[None]] = set()
        """Disconnections being recorded (a reference keeps each task alive)."""

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Start watching desired state (returns once the current state is loaded)."""
        await self.store.mark_gateway_offline(self.gateway_id)
        await self._desired_mirror.start()
        self._tasks = [asyncio.create_task(self._housekeeping(), name="gateway-housekeeping")]

    async def stop(self) -> None:
        """End every session and the background tasks."""
        for session in list(self.sessions.values()):
            session.close("the gateway is shutting down")
        await self._desired_mirror.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._offline_writes:  # the last disconnections, briefly
            await asyncio.wait(set(self._offline_writes), timeout=5)
        await cancel_and_wait(list(self._offline_writes))
        with contextlib.suppress(Exception):
            await self._flush_seen()

    def handlers(self) -> grpc.GenericRpcHandler:
        """The EdgeGateway service; Connect reads raw bytes so it can refuse them itself."""
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Connect": grpc.stream_stream_rpc_method_handler(
                    self.connect,
                    request_deserializer=None,
                    response_serializer=pb.GatewayMessage.SerializeToString,
                ),
                "FetchArtifact": grpc.unary_stream_rpc_method_handler(
                    self.fetch_artifact,
                    request_deserializer=pb.FetchArtifactRequest.FromString,
                    response_serializer=pb.ArtifactChunk.SerializeToString,
                ),
            },
        )

    # --- desired state ------------------------------------------------------------------

    def _desired_changed(self, key: str, revision: int, value: bytes | None) -> None:
        doc: DesiredModel | None = None
        if value:
            try:
                doc = DesiredModel.from_bytes(value)
            except ValidationError as exc:
                log.error("desired state of %s (revision %d) is invalid: %s", key, revision, exc)
                return
        self.desired[key] = (revision, doc)
        session = self.sessions.get(key)
        if session is not None:
            session.push_desired(revision, doc)

    async def desired_message(self, revision: int, doc: DesiredModel | None) -> pb.DesiredState:
        """The wire form of a desired-state document, with its image's signature (and its
        challenger's, signed the same way, when it has one)."""
        if doc is None or doc.manifest_digest is None or doc.image is None:
            return pb.DesiredState(revision=revision)
        msg = await self._signed(revision, doc)
        if doc.shadow is not None:
            msg.shadow.CopyFrom(await self._signed(revision, doc.shadow))
            msg.shadow_policy.sample = doc.shadow.sample
            msg.shadow_policy.max_overhead = doc.shadow.max_overhead
            if doc.shadow.until is not None:
                msg.shadow_policy.until.FromDatetime(doc.shadow.until)
        return msg

    async def _signed(self, revision: int, doc: DesiredModel) -> pb.DesiredState:
        """One image of a desired state with its signature and the key rotations."""
        assert doc.manifest_digest is not None
        assert doc.image is not None
        msg = pb.DesiredState(
            model=doc.model or "",
            version=doc.version or "",
            image=doc.image,
            manifest_digest=doc.manifest_digest,
            model_digest=doc.model_digest or "",
            rollout_id=str(doc.rollout_id) if doc.rollout_id else "",
            explicit_rollback=doc.explicit_rollback,
            revision=revision,
            trace_parent=doc.trace_parent or "",
        )
        for payload, signature in self.artifacts.key_rotations():
            msg.key_rotations.add(payload=payload, signature=signature)
        try:
            info = await self.artifacts.image(image_repository(doc.image), doc.manifest_digest)
        except Exception as exc:  # the agent will fail to fetch it and report why
            log.warning("image %s@%s: %s", doc.image, doc.manifest_digest, exc)
            return msg
        if not msg.model_digest and info.model_digest:
            msg.model_digest = info.model_digest
        if info.signature is not None:
            msg.signature = info.signature.signature
            msg.signature_payload = info.signature.payload
            msg.signature_algorithm = "ed25519"
            msg.signature_key_id = info.signature.key_id
        return msg

    # --- sessions -----------------------------------------------------------------------

    async def connect(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GatewayMessage]:
        """``Connect``: authenticate the Hello, then serve the session."""
        try:
            async with asyncio.timeout(30):
                first = await anext(requests)
            session = await self._open(first, context)
        except SessionRefused as exc:
            REFUSED.labels(exc.code).inc()
            log.info("session refused (%s): %s", exc.code, exc)
            yield pb.GatewayMessage(
                error=pb.Error(code=exc.code, message=str(exc), fatal=exc.fatal)
            )
            await context.abort(exc.status, str(exc))
            return
        except (TimeoutError, StopAsyncIteration):
            return
        reader = asyncio.create_task(
            self._read(session, requests), name=f"read-{session.device_id}"
        )
        reader.add_done_callback(lambda task: self._reader_done(session, task))
        try:
            yield pb.GatewayMessage(
                welcome=pb.Welcome(
                    session_id=session.session_id,
                    server_time=_now_ts(),
                    heartbeat_interval_seconds=self.heartbeat_seconds,
                    device_id=session.device_id,
                    max_message_bytes=self.max_message_bytes,
                )
            )
            async for message in self._outbound(session):
                yield message
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            await self._closed(session)

    @staticmethod
    def _reader_done(session: Session, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            session.close("the device ended the session")
        elif isinstance(exc, grpc.aio.AioRpcError | asyncio.CancelledError):
            session.close(f"the stream broke: {exc}")
        else:
            log.error("session of %s failed", session.device_id, exc_info=exc)
            session.close(f"internal error: {type(exc).__name__}")

    async def _open(self, first: bytes, context: grpc.aio.ServicerContext) -> Session:
        if len(first) > self.max_hello_bytes:
            raise SessionRefused(
                "too_large",
                f"Hello of {len(first)} bytes is over the limit of {self.max_hello_bytes}",
                grpc.StatusCode.INVALID_ARGUMENT,
            )
        try:
            msg = pb.AgentMessage.FromString(first)
        except DecodeError as exc:
            raise SessionRefused(
                "invalid_message",
                f"the first message is not an AgentMessage: {exc}",
                grpc.StatusCode.INVALID_ARGUMENT,
            ) from None
        if msg.WhichOneof("kind") != "hello":
            raise SessionRefused(
                "invalid_message",
                "a session must start with Hello",
                grpc.StatusCode.INVALID_ARGUMENT,
            )
        hello = msg.hello
        identity, pem = _peer_identity(context)
        if identity is None or pem is None:
            raise SessionRefused(
                "unauthenticated",
                "no client certificate (enrol the device first)",
                grpc.StatusCode.UNAUTHENTICATED,
            )
        if hello.device_id != identity:
            raise SessionRefused(
                "permission_denied",
                f"the certificate is for device {identity!r}, not {hello.device_id!r}",
                grpc.StatusCode.PERMISSION_DENIED,
            )
        try:
            check_device_id(identity)
        except ValueError as exc:
            raise SessionRefused(
                "permission_denied", str(exc), grpc.StatusCode.PERMISSION_DENIED
            ) from None
        try:
            check_hello(hello)
        except ValueError as exc:
            raise SessionRefused(
                "invalid_message", f"Hello: {_short(exc)}", grpc.StatusCode.INVALID_ARGUMENT
            ) from None
        cert_fingerprint = fingerprint(pem)
        async with _database_answers():
            reason = await self.store.check_certificate(identity, cert_fingerprint)
        if reason is not None:
            raise SessionRefused("permission_denied", reason, grpc.StatusCode.PERMISSION_DENIED)
        if len(self.sessions) >= self.max_sessions:
            raise SessionRefused(
                "unavailable",
                "this gateway is full; retry later",
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            )
        key = s.kv_key(identity)
        live = self.sessions.get(key)
        patience = 1.5 * self.heartbeat_seconds
        if live is not None and live.closed is None and live.heard_within(patience):
            # two agents with one identity (a copied bundle, a simulator reusing ids): the
            # one holding the session keeps it; one whose link died goes silent, and after
            # 1.5 heartbeat intervals the device's new session takes its place
            raise SessionRefused(
                "already_connected",
                f"device {identity} already has a live session on this gateway (heard from "
                f"{time.monotonic() - live.last_seen:.0f} s ago): a second agent with the "
                "same identity is refused; stop the other agent, or enrol this one as a "
                "device of its own",
                grpc.StatusCode.ALREADY_EXISTS,
            )
        session = Session(
            device_id=identity,
            session_id=uuid.uuid4().hex,
            labels={},
            outbound=asyncio.Queue(self.outbound_queue),
            fingerprint=cert_fingerprint,
            budget=Budget(
                self.budget_limits,
                max_count=self.policy.max_count,
                max_bytes=self.max_message_bytes,
            ),
        )
        if hello.model and hello.version:
            session.ran(hello.model, hello.version)
        now = datetime.now(UTC)
        # recorded before the session counts: a Hello the registry refuses leaves nothing
        # behind (and the device's older session, if any, goes on)
        async with _database_answers():
            session.labels = await self.store.connected(
                identity,
                session_id=session.session_id,
                gateway_id=self.gateway_id,
                labels=dict(hello.labels),
                model=hello.model or None,
                version=hello.version or None,
                digest=hello.digest or None,
                at=now,
            )
        old = self.sessions.get(key)
        if old is not None:
            old.close("a newer session of the same device replaced this one")
        self.sessions[key] = session
        SESSIONS.set(len(self.sessions))
        current = self.desired.get(key)
        if current is not None:
            session.push_desired(*current)
        log.info("device %s connected (session %s)", identity, session.session_id)
        return session

    async def _outbound(self, session: Session) -> AsyncIterator[pb.GatewayMessage]:
        while True:
            if not session.outbound.empty():
                yield session.outbound.get_nowait()
                continue
            if session.desired is not None:
                revision, doc = session.desired
                session.desired = None
                if doc is not None and doc.manifest_digest and doc.trace_parent:
                    session.delivered[doc.manifest_digest] = (time.time_ns(), doc.trace_parent)
                yield pb.GatewayMessage(desired=await self.desired_message(revision, doc))
                continue
            if session.closed is not None:
                return
            session.wake.clear()
            if session.outbound.empty() and session.desired is None and session.closed is None:
                await session.wake.wait()

    async def _send_later(self, session: Session, batch_id: str, why: str) -> None:
        """Tell the device to keep batch ``batch_id`` and send it again later."""
        message = f"{why}; send it again later"
        error = pb.Error(code="unavailable", message=message, batch_id=batch_id)
        await self._send(session, pb.GatewayMessage(error=error))

    async def _send(self, session: Session, message: pb.GatewayMessage) -> None:
        await session.outbound.put(message)
        session.wake.set()

    async def _read(self, session: Session, requests: AsyncIterator[bytes]) -> None:
        async for raw in requests:
            session.last_seen = time.monotonic()
            self._seen[session.device_id] = datetime.now(UTC)
            if len(raw) > self.max_message_bytes:
                await self._reject(
                    session,
                    "too_large",
                    f"message of {len(raw)} bytes is over the limit of {self.max_message_bytes}",
                )
                continue
            try:
                msg = pb.AgentMessage.FromString(raw)
            except DecodeError as exc:
                await self._reject(session, "invalid_message", f"not an AgentMessage: {exc}")
                continue
            kind = msg.WhichOneof("kind")
            try:
                if kind == "telemetry":
                    await self._telemetry(session, msg.telemetry, len(raw))
                elif kind == "status":
                    await self._status(session, msg.status)
                elif kind in ("heartbeat", "command_result"):
                    pass
                elif kind == "hello":
                    await self._reject(session, "invalid_message", "Hello was already received")
                else:
                    await self._reject(session, "invalid_message", "empty AgentMessage")
            except Refused as exc:
                self._count_refusal(session, exc.code, str(exc))
                batch = msg.telemetry.batch_id[:MAX_BATCH_ID]
                await self._reject(session, exc.code, _short(exc), batch_id=batch)
            except (ValueError, ValidationError) as exc:
                batch = msg.telemetry.batch_id[:MAX_BATCH_ID] if kind == "telemetry" else ""
                await self._reject(session, "invalid_message", _short(exc), batch_id=batch)

    async def _reject(
        self, session: Session, code: str, message: str, *, batch_id: str = ""
    ) -> None:
        REJECTED.labels(code).inc()
        log.info("device %s: %s: %s", session.device_id, code, message)
        await self._send(
            session,
            pb.GatewayMessage(error=pb.Error(code=code, message=message, batch_id=batch_id)),
        )

    def _count_refusal(self, session: Session, code: str, reason: str) -> None:
        """Counted per device in the registry (written once a second) and in metrics."""
        TELEMETRY_REFUSED.labels(code).inc()
        counts = self._refusals.get(session.device_id, ({}, "", datetime.now(UTC)))[0]
        counts[code] = counts.get(code, 0) + 1
        last = printable(f"{code}: {reason}")[:1000]
        self._refusals[session.device_id] = (counts, last, datetime.now(UTC))

    async def _telemetry(self, session: Session, batch: pb.TelemetryBatch, size: int) -> None:
        if batch.device_id and batch.device_id != session.device_id:
            raise ValueError(
                f"telemetry batch names device {batch.device_id!r}; this session is "
                f"{session.device_id!r}"
            )
        batch.device_id = session.device_id
        if len(batch.batch_id) > MAX_BATCH_ID:
            raise ValueError(
                f"a batch id of {len(batch.batch_id)} characters (at most {MAX_BATCH_ID})"
            )
        if len(batch.feature_histograms) != len(batch.feature_names):
            raise ValueError(
                f"{len(batch.feature_histograms)} feature histograms for "
                f"{len(batch.feature_names)} feature names"
            )
        for h in batch.feature_histograms:
            if len(h.counts) != len(h.edges) + 1:
                raise ValueError("a histogram with n edges must have n+1 counts")
        event = telemetry_from_proto(batch, session.labels.get(self.group_label))
        runs = set(session.runs)
        current = self.desired.get(s.kv_key(session.device_id))
        doc = current[1] if current is not None else None
        if doc is not None:
            runs.update(doc.versions())  # the model and its challenger, if any
        check_batch(event, runs=runs, now=datetime.now(UTC), policy=self.policy)
        assert session.budget is not None
        over = session.budget.take(event.count, size)
        if over is not None:
            # held back, not dropped: the agent sends it again (after a second)
            self._count_refusal(session, "over_budget", f"over the device's budget of {over}")
            await self._send_later(
                session, batch.batch_id, f"over this device's telemetry budget of {over}"
            )
            return
        try:
            await self.js.publish(
                event.bus_subject(),
                event.model_dump_json().encode(),
                headers={"Nats-Msg-Id": str(event.event_id)},
            )
        except BUS_UNAVAILABLE as exc:
            # the bus did not take it (slow, restarting, no stream): the device keeps the
            # batch and sends it again; its session goes on
            BUS_REFUSED.inc()
            await self._send_later(
                session, batch.batch_id, f"the bus did not take the batch ({type(exc).__name__})"
            )
            return
        BATCHES.inc()
        RECORDS.inc(event.count)
        await self._send(session, pb.GatewayMessage(ack=pb.Ack(batch_id=batch.batch_id)))

    async def _status(self, session: Session, report: pb.StatusReport) -> None:
        event = check_report(status_from_proto(report, session.device_id, session.labels))
        if event.model and event.version:
            session.ran(event.model, event.version)
        self._activation_span(session, report)
        await self._report_retried(session, event)
        await self.store.reported(
            session.device_id,
            state=event.state.value,
            model=event.model,
            version=event.version,
            digest=event.digest,
            error=event.error,
            at=event.occurred_at,
        )

    def _activation_span(self, session: Session, report: pb.StatusReport) -> None:
        """A device finished activating what it was sent (running, or failed): one span
        in the rollout's trace, from the desired state's delivery to the report. The
        agent stays free of OpenTelemetry; its report carries the trace parent."""
        done = {pb.DEVICE_STATE_RUNNING: "running", pb.DEVICE_STATE_FAILED: "failed"}
        state = done.get(report.state)
        key = report.desired_digest or report.digest
        if state is None or key not in session.delivered:
            return
        started, trace_parent = session.delivered.pop(key)
        span = self.tracer.start_span(
            f"activate on {session.device_id}",
            context=parent_context(report.trace_parent or trace_parent),
            kind=SpanKind.CLIENT,
            start_time=started,
            attributes={
                "edgeloop.device_id": session.device_id,
                "edgeloop.model": report.model,
                "edgeloop.version": report.version,
                "edgeloop.state": state,
            },
        )
        if state == "failed":
            span.set_status(Status(StatusCode.ERROR, report.error[:500]))
        span.end()

    async def _report_retried(self, session: Session, event: DeviceStatusReported) -> None:
        """Publish a device's status, again while the bus answers "not now" (a stream
        leader being elected, a node restarting: seconds), for up to ``REPORT_PATIENCE``
        seconds; then end the session as the bus's fault, so the device reconnects and
        reports again (the same event id: the stream drops a repeat)."""
        delay = 0.2
        deadline = time.monotonic() + REPORT_PATIENCE
        while True:
            try:
                await self._report(event)
                return
            except BUS_UNAVAILABLE as exc:
                if time.monotonic() + delay > deadline:
                    session.close(f"the bus did not take the device's status ({exc!r})")
                    return
                log.info("status of %s: bus unavailable (%r); again in %.1f s",
                         session.device_id, exc, delay)  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _report(self, event: DeviceStatusReported) -> None:
        data = event.model_dump_json().encode()
        await self.js.publish(
            event.bus_subject(), data, headers={"Nats-Msg-Id": str(event.event_id)}
        )
        if event.state is not DeviceState.OFFLINE:
            await self.reported_kv.put(s.kv_key(event.device_id), data)

    async def _closed(self, session: Session) -> None:
        key = s.kv_key(session.device_id)
        if self.sessions.get(key) is session:
            del self.sessions[key]
        SESSIONS.set(len(self.sessions))
        log.info("device %s disconnected (%s)", session.device_id, session.closed)
        # Recorded by a task of its own: the RPC's own task may be cancelled at any await
        # (the device went away), and a write it started would be lost with it.
        task = asyncio.create_task(
            self._record_offline(session, datetime.now(UTC)),
            name=f"offline-{session.device_id}",
        )
        self._offline_writes.add(task)
        task.add_done_callback(self._offline_writes.discard)

    async def _record_offline(self, session: Session, at: datetime) -> None:
        """Mark the device offline in the registry and report it, again while PostgreSQL
        or the bus does not answer (for up to ``OFFLINE_PATIENCE`` seconds): a lost write
        would show the device online until it connects again, for ever if it never does."""
        delay = 0.2
        deadline = time.monotonic() + OFFLINE_PATIENCE
        recorded = False
        while True:
            try:
                if not recorded:
                    await self.store.disconnected(session.device_id, session.session_id, at)
                    recorded = True
                await self._report(
                    DeviceStatusReported(
                        device_id=session.device_id,
                        state=DeviceState.OFFLINE,
                        labels=session.labels,
                    )
                )
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if time.monotonic() >= deadline or not looks_like_outage(exc):
                    log.error(
                        "device %s: its disconnection could not be recorded: %s: %s",
                        session.device_id,
                        type(exc).__name__,
                        exc,
                    )
                    return
                log.warning(
                    "device %s: recording its disconnection: %s; again in %.1f s",
                    session.device_id,
                    type(exc).__name__,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    # --- artifacts ----------------------------------------------------------------------

    async def fetch_artifact(
        self, request: pb.FetchArtifactRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ArtifactChunk]:
        """Chunks of an artifact of the device's desired image, from ``offset``."""
        identity, pem = _peer_identity(context)
        session = self.sessions.get(s.kv_key(identity)) if identity else None
        if identity is None or pem is None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no client certificate")
            return
        # asked of the registry on every fetch: a revocation refuses the next one at once
        try:
            async with _database_answers():
                reason = await self.store.check_certificate(identity, fingerprint(pem))
        except SessionRefused as exc:
            await context.abort(exc.status, str(exc))
            return
        if reason is not None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)
            return
        if session is None:  # (re)connecting: not refused, try again once the session is up
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "open a session (Connect) before fetching"
            )
            return
        current = self.desired.get(s.kv_key(session.device_id))
        doc = current[1] if current else None
        if doc is None or doc.manifest_digest is None or doc.image is None:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, "this device has no desired image to fetch"
            )
            return
        # the desired image or its challenger; the digest must belong to the one named
        images = doc.images()
        if request.image:
            wanted = image_repository(request.image)
            images = [i for i in images if image_repository(i[0]) == wanted]
        if not images:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{request.image} is not this device's desired image ({doc.image})",
            )
            return
        chunk = min(request.max_chunk_bytes or self.chunk_bytes, 4 << 20)
        try:
            media_type, size, chunks = await self._open_artifact(images, request, chunk)
        except NotAllowed as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
            return
        except ValueError as exc:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, str(exc))
            return
        offset = request.offset
        trace_parent = dict(context.invocation_metadata() or ()).get("traceparent")
        span = (
            self.tracer.start_span(
                f"fetch artifact for {session.device_id}",
                context=parent_context(str(trace_parent)),
                kind=SpanKind.SERVER,
                attributes={"edgeloop.digest": request.digest, "edgeloop.offset": offset},
            )
            if trace_parent
            else None
        )
        try:
            async for data in chunks:
                if session.closed is not None:  # revoked, replaced or ended mid-download
                    await context.abort(
                        grpc.StatusCode.PERMISSION_DENIED
                        if session.final
                        else grpc.StatusCode.UNAVAILABLE,  # resumed once reconnected
                        f"the device's session ended ({session.closed})",
                    )
                    return
                end = offset + len(data)
                yield pb.ArtifactChunk(
                    digest=request.digest,
                    offset=offset,
                    data=data,
                    total_size=size,
                    last=end >= size,
                    media_type=media_type,
                )
                offset = end
        finally:
            if span is not None:
                span.set_attribute("edgeloop.bytes", offset - request.offset)
                span.end()
        if offset == size and size == request.offset:  # nothing left: say so once
            yield pb.ArtifactChunk(
                digest=request.digest,
                offset=offset,
                total_size=size,
                last=True,
                media_type=media_type,
            )

    async def _open_artifact(
        self, images: list[tuple[str, str]], request: pb.FetchArtifactRequest, chunk: int
    ) -> tuple[str, int, AsyncIterator[bytes]]:
        """The artifact from the first of ``images`` (image, manifest digest) it belongs to
        (``NotAllowed`` when it belongs to none)."""
        refused = NotAllowed(f"{request.digest} is not part of this device's desired image")
        for image, manifest in images:
            try:
                return await self.artifacts.open(
                    image_repository(image), manifest, request.digest, request.offset, chunk
                )
            except NotAllowed as exc:
                refused = exc
        raise refused

    # --- housekeeping -------------------------------------------------------------------

    async def _housekeeping(self) -> None:
        """Every second: last-seen times and refused telemetry to the registry; sessions
        of revoked or re-enrolled devices and silent sessions ended."""
        while True:
            await asyncio.sleep(1)
            try:
                await self._flush_seen()
            except Exception:
                log.exception("could not record last-seen times")
            try:
                await self._end_revoked()
            except Exception:
                log.exception("could not look for revoked devices")
            limit = time.monotonic() - 3 * self.heartbeat_seconds
            for session in list(self.sessions.values()):
                if session.last_seen < limit:
                    session.close("no heartbeat for 3 intervals")

    async def _flush_seen(self) -> None:
        if self._seen:
            seen, self._seen = self._seen, {}
            await self.store.touch(seen)
        if self._refusals:
            refusals, self._refusals = self._refusals, {}
            try:
                await self.store.refused(refusals)
            except BaseException:
                # kept for the next flush (merged with what came meanwhile), not lost
                for device, (counts, last, at) in refusals.items():
                    newer = self._refusals.get(device)
                    if newer is not None:
                        for code, n in newer[0].items():
                            counts[code] = counts.get(code, 0) + n
                        last, at = newer[1], newer[2]
                    self._refusals[device] = (counts, last, at)
                raise

    async def _end_revoked(self) -> None:
        """End the sessions whose certificate was revoked or replaced by a re-enrolment
        since the last look (the registry is shared by every gateway)."""
        since = self._identity_since - IDENTITY_MARGIN if self._identity_since else None
        self._identity_since, changed = await self.store.identity_changes(since)
        for device_id, current, revoked in changed:
            session = self.sessions.get(s.kv_key(device_id))
            if session is None or (not revoked and session.fingerprint == current):
                continue
            why = "revoked" if revoked else "replaced by a newer enrolment"
            message = f"the certificate of device {device_id} was {why}"
            with contextlib.suppress(asyncio.QueueFull):
                session.outbound.put_nowait(
                    pb.GatewayMessage(
                        error=pb.Error(code="permission_denied", message=message, fatal=True)
                    )
                )
            session.close(message, final=True)
            log.warning("session of %s ended: %s", device_id, message)


def _peer_identity(context: grpc.aio.ServicerContext) -> tuple[str | None, bytes | None]:
    auth: Mapping[str, list[bytes]] = context.auth_context()
    names = auth.get("x509_common_name") or []
    pems = auth.get("x509_pem_cert") or []
    name = names[0].decode() if names else None
    return name, (pems[0] if pems else None)


def _now_ts() -> Any:
    from google.protobuf.timestamp_pb2 import Timestamp

    ts = Timestamp()
    ts.GetCurrentTime()
    return ts


def _short(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'batch'}: {e['msg']}" for e in exc.errors()
        )[:500]
    return str(exc)[:500]
