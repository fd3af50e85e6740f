"""The edge agent: one device's session with the gateway, safe model activation, and
inference with batched telemetry.

- **Connection**: mTLS (the device certificate from enrolment), exponential back-off
  with full jitter between attempts; every session starts with Hello and resends what
  the gateway has not acknowledged.
- **Activation** of a desired model: verify the signature over the manifest digest with
  a key pinned at enrolment (``trust.py``; rotated only by a rotation the pinned key
  signed), take model, version and release counter from the signed claims only (a
  desired state that names others is refused), refuse a lower signed release unless it
  is an explicit rollback to a release this device ran before, download the manifest
  and the model layer (resuming from the bytes already held), verify every digest, load
  an onnxruntime session, run a warm-up inference, then swap atomically. Any failure
  leaves the last known good model running and is reported ``FAILED`` with the reason.
- **Telemetry**: inferences are aggregated per window into one ``TelemetryBatch``
  (histograms, counts, a bounded sample of low-confidence rows); batches wait in a
  bounded buffer (on disk for a real device) until the gateway acknowledges them. A
  session sends them as a flow-controlled stream (``Drain``: live batches first, then
  the backlog oldest first, a bounded number awaiting acknowledgement), and its status
  reports and heartbeats go before any batch.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import signal
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from edgeloop.contracts.edge.v1 import edge_pb2 as pb
from edgeloop.contracts.edge.v1 import edge_pb2_grpc as pb_grpc
from edgeloop.contracts.signing import (
    SignatureError,
    SignedRelease,
    load_public_key,
    verify_manifest_signature,
)
from edgeloop.contracts.twin import image_repository
from edgeloop.edge.buffer import BatchBuffer, DiskBuffer, Drain, MemoryBuffer
from edgeloop.edge.bundle import normalise_fingerprint
from edgeloop.edge.durable import write_durably
from edgeloop.edge.lock import UpdateLock
from edgeloop.edge.runtime import ModelLoadError, OnnxModel
from edgeloop.edge.shadow import Challenger, output_labels
from edgeloop.edge.sources import Drift, InputSource, open_source
from edgeloop.edge.store import ActivationError, Installed, ModelStore, version_key
from edgeloop.edge.telemetry import TelemetryAggregator, edges_from_profile
from edgeloop.edge.trust import TrustAnchor

log = logging.getLogger("edgeloop.agent")

AGENT_VERSION = "0.1.0"
MAX_ATTEMPTS = 3
"""Tries of one desired state whose download fails (corrupt, cut) before it is failed."""
CAPABILITIES = ("onnxruntime", "resume-download", "telemetry-batch", "anti-rollback")


#: seconds before a batch the gateway could not put on the bus is sent again
RESEND_SECONDS = 1.0
#: telemetry batches a session sends ahead of the gateway's acknowledgements
SEND_WINDOW = 64
#: a full window without one answer for this long: the session is stuck, a new one starts
ACK_TIMEOUT_SECONDS = 60.0
#: seconds between two tries of a held update lock
LOCK_POLL_SECONDS = 0.5


@dataclass
class AgentConfig:
    """``agent.json`` of an enrolment bundle (paths relative to the file)."""

    device_id: str
    gateway: str
    ca_cert: Path
    cert: Path
    key: Path
    trusted_keys: list[Path]
    state_dir: Path
    trusted_key_fingerprints: list[str] = field(default_factory=list)
    """The enrolment's fingerprints of ``trusted_keys``: a key file that does not match
    one is refused (the bundle was altered)."""
    labels: dict[str, str] = field(default_factory=dict)
    source: str = "sim"
    server_name: str | None = None
    telemetry_seconds: float = 10.0
    infer_seconds: float = 1.0
    infer_batch: int = 16
    buffer_batches: int = 10_000
    buffer_bytes: int = 256 << 20
    drift: str | None = None
    update_lock: Path | None = None
    """A file an application on the device holds with ``flock`` while it must not be
    interrupted (``lock.py``): a new model is downloaded and verified, then waits to be
    activated until the lock is free (reported ``deferred`` with the reason)."""
    update_lock_max_deferral_seconds: float = 3600.0
    """How long a held update lock may defer an activation: then the agent activates
    anyway (and logs that it overrode the lock), so a forgotten lock cannot keep a device
    off a release for ever."""

    @classmethod
    def load(cls, path: Path) -> AgentConfig:
        """Read ``agent.json``; relative paths are taken from its directory."""
        raw = json.loads(path.read_text())
        base = path.parent

        def p(value: str) -> Path:
            q = Path(value)
            return q if q.is_absolute() else base / q

        known = set(cls.__dataclass_fields__)
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"{path}: unknown settings {sorted(unknown)}")
        raw["ca_cert"] = p(raw["ca_cert"])
        raw["cert"] = p(raw["cert"])
        raw["key"] = p(raw["key"])
        raw["trusted_keys"] = [p(k) for k in raw.get("trusted_keys", [])]
        raw["state_dir"] = p(raw.get("state_dir", "state"))
        if raw.get("update_lock"):
            raw["update_lock"] = p(raw["update_lock"])
        return cls(**raw)


@dataclass
class Faults:
    """Injected faults (the fleet simulator's and the tests')."""

    cut_download_after: int | None = None
    """End the link once this many bytes of one download arrived (then resume)."""
    corrupt_download: float = 0.0
    """Probability that a download's bytes are altered on the way."""
    slow_link_bytes_per_s: float | None = None
    """Throttle downloads."""


class ModelCache:
    """onnxruntime sessions by model digest, shared by the agents of one process."""

    def __init__(self) -> None:
        self._models: dict[str, OnnxModel] = {}
        self._lock = asyncio.Lock()

    async def load(self, installed: Installed) -> OnnxModel:
        """The session of ``installed`` (loaded once per digest)."""
        async with self._lock:
            model = self._models.get(installed.model_digest)
            if model is None:
                data = await asyncio.to_thread(installed.onnx.read_bytes)
                model = await asyncio.to_thread(OnnxModel, data)
                self._models[installed.model_digest] = model
            return model

    def forget(self, digest: str) -> None:
        """Drop a session (its model failed)."""
        self._models.pop(digest, None)


@dataclass
class Running:
    """The model in use."""

    installed: Installed
    model: OnnxModel
    aggregator: TelemetryAggregator
    labels: list[str]


class _Retry(Exception):
    """A transient failure: try again later."""


def _ts(t: float | None = None) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int((time.time() if t is None else t) * 1e9))
    return ts


class Agent:
    """One device."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        models: ModelCache | None = None,
        buffer: BatchBuffer | None = None,
        source: InputSource | None = None,
        faults: Faults | None = None,
        seed: int | None = None,
        channel_options: list[tuple[str, Any]] | None = None,
    ) -> None:
        self.config = config
        self.store = ModelStore(config.state_dir)
        self.models = models or ModelCache()
        self.buffer = buffer or DiskBuffer(
            config.state_dir / "telemetry", config.buffer_batches, config.buffer_bytes
        )
        self._injected = source
        self._source: InputSource | None = source
        self._source_for: str | None = None
        self._world: dict[str, Any] | None = None  # the first profile the inputs came from
        self.faults = faults or Faults()
        self.rng = random.Random(seed)
        self.channel_options = channel_options or []
        self.trust = TrustAnchor.open(
            config.state_dir,
            [load_public_key(path) for path in config.trusted_keys],
            [normalise_fingerprint(f) for f in config.trusted_key_fingerprints],
        )
        self.running: Running | None = None
        self.challenger: Challenger | None = None
        self.shadow_error = ""
        """Why the desired challenger does not run (its image refused, not loadable …)."""
        self.state = pb.DEVICE_STATE_IDLE
        self.error = ""
        self.deferred: tuple[float, float] | None = None
        """While ``DEFERRED``: since when the update lock is held, when to activate anyway."""
        self.update_lock = UpdateLock(config.update_lock) if config.update_lock else None
        self.desired: pb.DesiredState | None = None
        self.failed: dict[tuple[str, int], str] = {}
        self._attempts: dict[tuple[str, int], int] = {}
        self.connected = asyncio.Event()
        self.session_id = ""
        self.bytes_downloaded = 0
        self.activations = 0
        self.sessions = 0
        self.stats: dict[str, int] = {"batches_sent": 0, "batches_acked": 0, "refused": 0}
        self.last_error: pb.Error | None = None
        # the session's own messages (status, command results): before any telemetry; a
        # burst keeps the newest
        self._outbox: deque[pb.AgentMessage] = deque(maxlen=256)
        self._drain: Drain | None = None  # the telemetry of the session in progress
        self._wake = asyncio.Event()  # something for the writer: a message, an ack
        self._desired_changed = asyncio.Event()
        self._stub: pb_grpc.EdgeGatewayStub | None = None
        self._offline_until = 0.0
        self.on_status: Callable[[Agent], None] | None = None
        self.on_outputs: Callable[[Any, list[str]], None] | None = None
        """Called with each inference batch's rows and the champion's labels."""

    # --- running ------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set: resume the installed model, connect, infer."""
        await self._resume()
        tasks = [
            asyncio.create_task(self._connection_loop(stop), name="agent-connection"),
            asyncio.create_task(self._apply_loop(), name="agent-apply"),
            asyncio.create_task(self._inference_loop(stop), name="agent-inference"),
        ]
        for task in tasks:
            task.add_done_callback(self._task_done)
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "%s: %s stopped", self.config.device_id, task.get_name(), exc_info=task.exception()
            )

    def go_offline(self, seconds: float) -> None:
        """Drop the link for ``seconds`` (fault injection)."""
        self._offline_until = time.monotonic() + seconds
        self._outbox.append(pb.AgentMessage())  # the writer ends the call on it
        self._wake.set()

    async def _resume(self) -> None:
        installed = self.store.current
        if installed is None:
            return
        try:
            await self._start(installed)
            self.state = pb.DEVICE_STATE_RUNNING
        except Exception as exc:
            log.error("%s: installed model does not start: %s", self.config.device_id, exc)
            self.store.rolled_back()

    # --- connection ---------------------------------------------------------------------

    def _channel(self) -> grpc.aio.Channel:
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.config.ca_cert.read_bytes(),
            private_key=self.config.key.read_bytes(),
            certificate_chain=self.config.cert.read_bytes(),
        )
        options = list(self.channel_options)
        if self.config.server_name:
            options.append(("grpc.ssl_target_name_override", self.config.server_name))
        return grpc.aio.secure_channel(self.config.gateway, creds, options=options)

    async def _connection_loop(self, stop: asyncio.Event) -> None:
        attempt = 0
        async with self._channel() as channel:
            self._stub = pb_grpc.EdgeGatewayStub(channel)
            while not stop.is_set():
                wait = self._offline_until - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                started = time.monotonic()
                try:
                    await self._session(self._stub)
                except grpc.aio.AioRpcError as exc:
                    log.info(
                        "%s: session ended: %s %s",
                        self.config.device_id,
                        exc.code().name,
                        exc.details(),
                    )
                except (ConnectionError, _Retry) as exc:
                    log.info("%s: session ended: %s", self.config.device_id, exc)
                except Exception:
                    log.exception("%s: session failed", self.config.device_id)
                finally:
                    self.connected.clear()
                if time.monotonic() - started > 30:
                    attempt = 0  # it was a healthy session: reconnect quickly
                attempt += 1
                # exponential back-off with full jitter, capped at 30 s
                await asyncio.sleep(self.rng.uniform(0, min(30.0, 0.25 * 2 ** min(attempt, 8))))

    def _hello(self) -> pb.AgentMessage:
        current = self.running.installed if self.running else None
        return pb.AgentMessage(
            hello=pb.Hello(
                device_id=self.config.device_id,
                labels=self.config.labels,
                model=current.model if current else "",
                version=current.version if current else "",
                digest=current.manifest_digest if current else "",
                agent_version=AGENT_VERSION,
                capabilities=CAPABILITIES,
                desired_revision=self.store.desired_revision,
            )
        )

    async def _session(self, stub: pb_grpc.EdgeGatewayStub) -> None:
        call = stub.Connect()
        await call.write(self._hello())
        first = await call.read()
        if first is grpc.aio.EOF or first.WhichOneof("kind") != "welcome":
            if first is not grpc.aio.EOF and first.WhichOneof("kind") == "error":
                self.last_error = first.error
                raise ConnectionError(f"refused: {first.error.code}: {first.error.message}")
            raise ConnectionError("the gateway did not welcome the session")
        welcome = first.welcome
        self.session_id = welcome.session_id
        self.sessions += 1
        self._outbox.clear()  # reports of the last session: the state is resent
        self._outbox.append(self._status_message())
        drain = self._drain = Drain(self.buffer, SEND_WINDOW)
        self.connected.set()
        writer = asyncio.create_task(
            self._writer(
                call, drain, welcome.heartbeat_interval_seconds or 10, welcome.max_message_bytes
            )
        )
        try:
            while not writer.done():
                try:
                    message = await call.read()
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        raise
                    break  # our writer cancelled the call (the link was dropped on purpose)
                if message is grpc.aio.EOF:
                    break
                self._on_message(message)
        finally:
            self._drain = None
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer
            call.cancel()

    async def _writer(self, call: Any, drain: Drain, heartbeat: int, max_bytes: int) -> None:
        """Everything the session sends: a heartbeat when due, the session's own messages,
        then telemetry while the drain's window has room; never waiting on the backlog."""
        seq = 0
        beat_at = time.monotonic() + heartbeat
        while True:
            if time.monotonic() >= beat_at:
                seq += 1
                beat_at = time.monotonic() + heartbeat
                await call.write(
                    pb.AgentMessage(
                        heartbeat=pb.Heartbeat(
                            sent_at=_ts(), seq=seq, buffered_batches=len(self.buffer)
                        )
                    )
                )
            elif self._outbox:
                message = self._outbox.popleft()
                if message.WhichOneof("kind") is None:  # go_offline
                    call.cancel()
                    return
                await call.write(message)
            elif (batch := self._next_batch(drain, max_bytes)) is not None:
                await call.write(batch)
                self.stats["batches_sent"] += 1
            elif drain.stalled(ACK_TIMEOUT_SECONDS):
                log.warning(
                    "%s: no acknowledgement for %d batches in %.0f s; starting a new session",
                    self.config.device_id,
                    len(drain.in_flight),
                    ACK_TIMEOUT_SECONDS,
                )
                call.cancel()
                return
            else:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), beat_at - time.monotonic())

    def _next_batch(self, drain: Drain, max_bytes: int) -> pb.AgentMessage | None:
        """The drain's next batch as a message; one it can never send leaves the buffer."""
        while (taken := drain.next()) is not None:
            batch_id, data = taken
            try:
                message = pb.AgentMessage(telemetry=pb.TelemetryBatch.FromString(data))
            except DecodeError as exc:
                self.buffer.set_aside(batch_id, f"not a telemetry batch: {exc}")
                continue
            if max_bytes and message.ByteSize() > max_bytes:
                # the gateway would refuse it without naming it: nothing would free its slot
                log.warning(
                    "%s: telemetry batch %s of %d bytes is over the gateway's limit; dropped",
                    self.config.device_id,
                    batch_id,
                    message.ByteSize(),
                )
                self.buffer.ack(batch_id)
                self.stats["refused"] += 1
                continue
            drain.sent(batch_id)
            return message
        return None

    def _on_message(self, message: pb.GatewayMessage) -> None:
        kind = message.WhichOneof("kind")
        if kind == "desired":
            self.desired = message.desired
            self._desired_changed.set()
        elif kind == "ack":
            if self.buffer.ack(message.ack.batch_id):
                self.stats["batches_acked"] += 1
            self._answered(message.ack.batch_id)
        elif kind == "error":
            self.last_error = message.error
            log.warning(
                "%s: gateway error %s: %s",
                self.config.device_id,
                message.error.code,
                message.error.message,
            )
            batch_id = message.error.batch_id
            if batch_id and message.error.code == "unavailable":
                self._send_later(batch_id)
            elif batch_id:
                if self.buffer.ack(batch_id):
                    self.stats["refused"] += 1  # re-sending the same bytes cannot succeed
                self._answered(batch_id)
        elif kind == "command":
            self._command(message.command)

    def _answered(self, batch_id: str) -> None:
        if self._drain is not None:
            self._drain.answered(batch_id)
            self._wake.set()

    def _send_later(self, batch_id: str) -> None:
        """The platform could not take a batch now: keep it (and its slot in the window,
        so an unavailable bus is not flooded) and send it again shortly."""
        drain = self._drain
        if drain is None:
            return  # the next session sends it anyway
        self.stats["resent"] = self.stats.get("resent", 0) + 1
        drain.hold(batch_id)

        def again() -> None:
            drain.again(batch_id)
            self._wake.set()

        asyncio.get_running_loop().call_later(RESEND_SECONDS, again)

    def _command(self, command: pb.Command) -> None:
        ok, text = True, ""
        if command.kind == pb.COMMAND_KIND_REPORT_NOW:
            self._report()
        else:
            ok, text = False, f"command {pb.CommandKind.Name(command.kind)} is not supported"
        self._enqueue(
            pb.AgentMessage(
                command_result=pb.CommandResult(command_id=command.command_id, ok=ok, message=text)
            )
        )

    def _enqueue(self, message: pb.AgentMessage) -> None:
        if self.connected.is_set():
            self._outbox.append(message)
            self._wake.set()

    def _status_message(self) -> pb.AgentMessage:
        current = self.running.installed if self.running else None
        desired = self.desired
        return pb.AgentMessage(
            status=pb.StatusReport(
                state=self.state,
                model=current.model if current else "",
                version=current.version if current else "",
                digest=current.manifest_digest if current else "",
                desired_digest=desired.manifest_digest if desired else "",
                rollout_id=desired.rollout_id if desired else "",
                error=self.error,
                reported_at=_ts(),
                desired_revision=desired.revision if desired else self.store.desired_revision,
                trace_parent=desired.trace_parent if desired else "",
                deferred_since=_ts(self.deferred[0]) if self.deferred else None,
                deferred_until=_ts(self.deferred[1]) if self.deferred else None,
            )
        )

    def _report(self) -> None:
        self._enqueue(self._status_message())
        if self.on_status is not None:
            self.on_status(self)

    # --- activation ---------------------------------------------------------------------

    async def _apply_loop(self) -> None:
        while True:
            await self._desired_changed.wait()
            self._desired_changed.clear()
            desired = self.desired
            if desired is None:
                continue
            try:
                await self.apply(desired)
                await self.apply_shadow(desired)
            except _Retry as exc:
                log.info("%s: will retry %s: %s", self.config.device_id, desired.version, exc)
                await asyncio.sleep(self.rng.uniform(1, 3))
                if self.desired is desired:
                    self._desired_changed.set()

    async def apply(self, desired: pb.DesiredState) -> None:
        """Make ``desired`` run, or keep the last known good model and report why not."""
        current = self.running.installed if self.running else None
        if not desired.manifest_digest:
            if self.running is not None:
                self.running = None
                self.store.activated(None, desired.revision)
            self.state, self.error = pb.DEVICE_STATE_IDLE, ""
            self._report()
            return
        if current is not None and current.manifest_digest == desired.manifest_digest:
            self.store.applied(desired.revision)
            self.state, self.error = pb.DEVICE_STATE_RUNNING, ""
            self._report()
            return
        known = self.failed.get((desired.manifest_digest, desired.revision))
        if known is not None:
            self._fail(known)
            return
        try:
            installed = await self._prepare(desired)
            if not await self._await_update_lock(desired):
                return  # a newer desired state replaced this one while it waited
            self.state = pb.DEVICE_STATE_ACTIVATING
            self._report()
            await self._start(installed)
        except ActivationError as exc:
            key = (desired.manifest_digest, desired.revision)
            if not exc.permanent and not self.connected.is_set():
                # cut off from the gateway (it restarts, the link is down): not this
                # image's fault, so no attempt is spent; try again once back
                raise _Retry(str(exc)) from exc
            if not exc.permanent:
                self._attempts[key] = self._attempts.get(key, 0) + 1
                if self._attempts[key] < MAX_ATTEMPTS:
                    raise _Retry(str(exc)) from exc
            self.failed[key] = str(exc)
            self._fail(str(exc))
            return
        finally:
            if self.update_lock is not None:
                self.update_lock.release()
        self.store.activated(installed, desired.revision)
        self.activations += 1
        self.state, self.error = pb.DEVICE_STATE_RUNNING, ""
        log.info("%s: running %s@%s", self.config.device_id, installed.model, installed.version)
        self._report()

    async def _await_update_lock(self, desired: pb.DesiredState) -> bool:
        """Take the update lock before the swap, waiting while an application holds it
        (reported ``DEFERRED``: why, since when, until when) for at most the maximum
        deferral, then going on anyway. False when a newer desired state arrived meanwhile
        (the apply loop takes that one next)."""
        lock = self.update_lock
        if lock is None:
            return True
        max_deferral = self.config.update_lock_max_deferral_seconds
        while not await asyncio.to_thread(lock.try_take):
            now = time.time()
            if self.deferred is None:
                since = self._deferral_since(desired, now)
                self.deferred = (since, since + max_deferral)
                self.state = pb.DEVICE_STATE_DEFERRED
                self.error = f"update lock {lock.path} held"
                log.info(
                    "%s: %s@%s waits: %s", self.config.device_id, desired.model,
                    desired.version, self.error,
                )  # fmt: skip
                self._report()
            if self.desired is not desired:
                self.deferred = None
                return False
            if now >= self.deferred[1]:
                log.warning(
                    "%s: activating %s@%s although the update lock is still held, after "
                    "the maximum deferral of %g s",
                    self.config.device_id,
                    desired.model,
                    desired.version,
                    max_deferral,
                )
                break
            await asyncio.sleep(LOCK_POLL_SECONDS)
        self.deferred = None
        return True

    def _deferral_since(self, desired: pb.DesiredState, now: float) -> float:
        """Since when ``desired`` waits for the update lock: kept in the state directory
        (``deferral.json``), so a restarted agent does not start its maximum deferral
        again."""
        path = self.config.state_dir / "deferral.json"
        key = f"{desired.manifest_digest}@{desired.revision}"
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            kept = json.loads(path.read_text())
            if kept["desired"] == key:
                return min(float(kept["since"]), now)
        write_durably(path, json.dumps({"desired": key, "since": now}).encode())
        return now

    async def apply_shadow(self, desired: pb.DesiredState) -> None:
        """Run the desired state's challenger beside the running model, or none.

        Its image goes through the same checks as any desired one (signature, signed
        claims, anti-rollback, download, digests, warm-up) but is never activated: the
        floor stays, the status is the champion's. A refusal is kept in ``shadow_error``.
        """
        wanted = desired.shadow if desired.HasField("shadow") else None
        running = self.running
        if wanted is None or not wanted.manifest_digest or running is None:
            self.challenger, self.shadow_error = None, ""
            return
        current = self.challenger
        if current is not None and current.key[:2] == (wanted.manifest_digest, wanted.rollout_id):
            current.policy = desired.shadow_policy  # a new budget or end applies now
            return
        try:
            installed = await self._prepare(wanted, report=False)
            model, aggregator, labels = await self._load(installed)
        except ActivationError as exc:
            if not exc.permanent:
                raise _Retry(str(exc)) from exc
            self.challenger, self.shadow_error = None, f"challenger refused: {exc}"
            log.warning("%s: %s", self.config.device_id, self.shadow_error)
            return
        aggregator.max_samples = 0  # its inputs are the champion's: no samples twice
        self.challenger = Challenger(
            desired=wanted,
            policy=desired.shadow_policy,
            installed=installed,
            model=model,
            aggregator=aggregator,
            labels=labels,
            rng=random.Random(self.rng.randrange(1 << 30)),
        )
        self.shadow_error = ""
        log.info(
            "%s: challenger %s@%s runs beside %s (sample %g)",
            self.config.device_id,
            installed.model,
            installed.version,
            running.installed.version,
            desired.shadow_policy.sample,
        )

    def _fail(self, reason: str) -> None:
        log.warning("%s: %s", self.config.device_id, reason)
        self.state, self.error = pb.DEVICE_STATE_FAILED, reason
        self._report()

    async def _prepare(self, desired: pb.DesiredState, *, report: bool = True) -> Installed:
        """Verify and download; the installed (not yet running) model (``report``: say
        so in the device's state; not for a challenger)."""
        signed = self._verify_signature(desired)
        self._check_release(desired, signed)
        if report:
            self.state = pb.DEVICE_STATE_DOWNLOADING
            self._report()
        manifest_path = await self._download(
            desired.manifest_digest, desired.image, desired.trace_parent
        )
        try:
            manifest = json.loads(manifest_path.read_bytes())
            layer = manifest["layers"][-1]
            layer_digest = str(layer["digest"])
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            self.store.discard(desired.manifest_digest)
            raise ActivationError(f"the image manifest is not usable: {exc!r}") from exc
        annotated = (manifest.get("annotations") or {}).get("edgeloop.model_digest", "")
        if desired.model_digest and annotated and annotated != desired.model_digest:
            raise ActivationError(
                f"the image's model is {annotated}, the desired state names {desired.model_digest}"
            )
        layer_path = await self._download(layer_digest, desired.image, desired.trace_parent)
        return await asyncio.to_thread(
            self.store.install,
            desired.manifest_digest,
            layer_path,
            model=signed.model,
            version=signed.version,
            model_digest=annotated or desired.model_digest,
            release=signed.release,
        )

    def _rotate_keys(self, desired: pb.DesiredState) -> list[str]:
        """Apply the key rotations the desired state carries; the reasons of refused ones."""
        if not desired.key_rotations:
            return []
        _, refused = self.trust.rotate([(r.payload, r.signature) for r in desired.key_rotations])
        return refused

    def _verify_signature(self, desired: pb.DesiredState) -> SignedRelease:
        """The release the image's signature vouches for, verified with a pinned key."""
        if not desired.signature or not desired.signature_payload:
            raise ActivationError(
                f"refused {desired.model}@{desired.version}: the image is not signed"
            )
        if desired.signature_algorithm not in ("", "ed25519"):
            raise ActivationError(f"unsupported signature algorithm {desired.signature_algorithm}")
        refused = self._rotate_keys(desired)
        pinned = self.trust.keys
        # the key id is the gateway's hint: it orders the tries, it never adds a key
        keys = sorted(pinned.items(), key=lambda kv: kv[0] != desired.signature_key_id)
        if not keys:
            raise ActivationError("no trusted signing key is pinned on this device")
        reasons = []
        for _, key in keys:
            try:
                claims = verify_manifest_signature(
                    key,
                    desired.signature_payload,
                    desired.signature,
                    desired.manifest_digest,
                    repo=image_repository(desired.image),
                )
                return SignedRelease.from_claims(claims)
            except SignatureError as exc:
                reasons.append(str(exc))
        raise ActivationError(
            f"refused {desired.model}@{desired.version}: signature check failed: "
            + "; ".join(reasons + refused)
        )

    def _check_release(self, desired: pb.DesiredState, signed: SignedRelease) -> None:
        """Anti-rollback on the signed claims only.

        The desired state must name the release the signature vouches for. A lower signed
        release than the highest activated here runs only as an explicit rollback to a
        release this device itself ran before (same image digest): the platform may move
        a device back to what it ran, never to a release it never accepted. The floor
        itself never goes down.
        """
        named = f"{desired.model}@{desired.version}"
        if (signed.model, signed.version) != (desired.model, desired.version):
            raise ActivationError(
                f"refused {named}: the image's signed claims say {signed}, "
                f"the desired state names {named}"
            )
        floor = self.store.release_floor(signed.model)
        if floor is None:
            legacy = self.store.highest(signed.model)  # a floor from before signed releases
            older = legacy is not None and version_key(signed.version) < version_key(legacy)
            if older and not desired.explicit_rollback:
                raise ActivationError(
                    f"refused {signed}: older than version {legacy} already run here "
                    "(anti-rollback)"
                )
            return
        if signed.release > floor:
            return
        ran = self.store.ran(signed.model, signed.release)
        if ran is not None and ran != desired.manifest_digest:
            raise ActivationError(
                f"refused {signed}: release {signed.release} of {signed.model} ran here as "
                f"image {ran}, not {desired.manifest_digest}"
            )
        if signed.release == floor and ran is not None:
            return  # the newest release run here, again (e.g. after a local rollback)
        if not desired.explicit_rollback:
            raise ActivationError(
                f"refused {signed}: older than release {floor} already run here "
                "(anti-rollback); only an explicit rollback may go back"
            )
        if ran is None:
            raise ActivationError(
                f"refused the explicit rollback to {signed}: this device never ran that "
                f"release (anti-rollback: a rollback returns only to a release run here)"
            )

    async def _download(self, digest: str, image: str, trace_parent: str = "") -> Path:
        """A verified artifact, fetched from where an interrupted download stopped."""
        if self.store.have(digest):
            return self.store.blob(digest)
        if self._stub is None or not self.connected.is_set():
            raise ActivationError("offline: cannot download now", permanent=False)
        h, have = await asyncio.to_thread(self.store.partial_state, digest)
        received = 0
        corrupt = (
            self.faults.corrupt_download > 0 and self.rng.random() < self.faults.corrupt_download
        )
        call = self._stub.FetchArtifact(
            pb.FetchArtifactRequest(digest=digest, offset=have, image=image),
            # the rollout's trace context, so the gateway's fetch span joins it
            metadata=(("traceparent", trace_parent),) if trace_parent else None,
        )
        try:
            with self.store.partial(digest).open("ab") as out:
                async for chunk in call:
                    if chunk.offset != have:
                        raise ActivationError(
                            f"chunk of {digest} at offset {chunk.offset}, expected {have}",
                            permanent=False,
                        )
                    data = chunk.data
                    if corrupt and data:
                        data = bytes([data[0] ^ 0xFF]) + data[1:]
                        corrupt = False
                    out.write(data)
                    h.update(data)
                    have += len(data)
                    received += len(data)
                    self.bytes_downloaded += len(data)
                    if self.faults.slow_link_bytes_per_s:
                        await asyncio.sleep(len(data) / self.faults.slow_link_bytes_per_s)
                    cut = self.faults.cut_download_after
                    if cut is not None and received >= cut and not chunk.last:
                        self.faults.cut_download_after = None  # once
                        raise ActivationError(
                            f"link cut after {received} bytes of {digest}", permanent=False
                        )
                    if chunk.last:
                        break
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND):
                raise ActivationError(f"cannot fetch {digest}: {exc.details()}") from exc
            raise ActivationError(
                f"download of {digest} interrupted at byte {have}: {exc.code().name}",
                permanent=False,
            ) from exc
        finally:
            call.cancel()
        return self.store.complete(digest, h)

    async def _start(self, installed: Installed) -> None:
        """Load, warm up, swap. Raises ActivationError (the running model is untouched)."""
        model, aggregator, labels = await self._load(installed)
        old = self.running
        self.running = Running(installed, model, aggregator, labels)
        if old is not None and old.aggregator.count:
            self._flush(old)

    async def _load(self, installed: Installed) -> tuple[OnnxModel, TelemetryAggregator, list[str]]:
        """Load and warm up a model; its telemetry window and class names."""
        try:
            model = await self.models.load(installed)
        except ModelLoadError as exc:
            raise ActivationError(f"{installed.model}@{installed.version}: {exc}") from exc
        meta = installed.meta()
        profile = installed.profile()
        rows = _warmup_rows(model, profile)
        try:
            prediction = await asyncio.to_thread(model.predict, rows)
            values = prediction.labels if prediction.labels is not None else prediction.values
            if values is None or len(values) != len(rows):
                raise ValueError("the warm-up inference returned no result per row")
        except Exception as exc:
            self.models.forget(installed.model_digest)
            raise ActivationError(
                f"{installed.model}@{installed.version} failed its warm-up inference: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
                " (rolled back to the last known good model)"
            ) from exc
        names = _feature_names(model, meta, profile)
        aggregator = TelemetryAggregator(
            feature_names=names,
            feature_edges=edges_from_profile(profile, len(names)),
            low_confidence=float(meta.get("low_confidence", 0.6)),
            seed=self.rng.randrange(1 << 30),
        )
        return model, aggregator, [str(x) for x in meta.get("labels") or []]

    # --- inference and telemetry ----------------------------------------------------------

    def set_drift(self, drift: str | None) -> None:
        """Drift the simulated inputs from now on (``feature=F,shift=S[,fraction=…]``), or
        stop drifting (None); the input source is rebuilt on the next inference."""
        if drift is not None:
            Drift.parse(drift)  # refuse a bad spec here, not in the inference loop
        self.config.drift = drift
        self._source = None

    def _input(self, running: Running) -> InputSource:
        if self._injected is not None:
            return self._injected
        if self._source is None or self._source_for != running.installed.model_digest:
            # A new model may take other inputs: the source follows its profile. The
            # simulated world does not change with the model, though: a model with the
            # same features keeps drawing from the first profile (a retrained model's
            # profile may already hold the drifted inputs; drifting those again would
            # shift them twice).
            profile = running.installed.profile()
            names = [f.get("name") for f in (profile or {}).get("features", [])]
            world = self._world
            if world is not None and names == [f.get("name") for f in world["features"]]:
                profile = world
            elif profile:
                self._world = profile
            width = running.model.n_features or len(running.aggregator.feature_names) or 1
            self._source = open_source(
                self.config.source,
                profile=profile,
                # no profile in the image: standard-normal rows of the model's width
                reference=None
                if profile
                else np.random.default_rng(self.rng.randrange(1 << 30)).normal(size=(256, width)),
                seed=self.rng.randrange(1 << 30),
                drift=Drift.parse(self.config.drift) if self.config.drift else None,
            )
            self._source_for = running.installed.model_digest
        return self._source

    async def _inference_loop(self, stop: asyncio.Event) -> None:
        next_flush = time.monotonic() + self.config.telemetry_seconds
        while not stop.is_set():
            await asyncio.sleep(self.config.infer_seconds * self.rng.uniform(0.9, 1.1))
            running = self.running
            if running is not None:
                self.infer_once(running)
            if time.monotonic() >= next_flush:
                next_flush = time.monotonic() + self.config.telemetry_seconds
                if running is not None:
                    self._flush(running)

    def infer_once(self, running: Running | None = None) -> None:
        """One inference batch from the input source into the telemetry window."""
        running = running or self.running
        if running is None:
            return
        try:
            rows = self._input(running).read(self.config.infer_batch)
        except Exception as exc:
            log.warning("%s: input source failed: %s", self.config.device_id, exc)
            running.aggregator.add_errors(1)
            return
        if rows is None or len(rows) == 0:
            return
        started = time.perf_counter()
        try:
            prediction = running.model.predict(rows)
        except Exception:
            running.aggregator.add_errors(len(rows))
            return
        seconds = time.perf_counter() - started
        latency = seconds * 1000 / len(rows)
        labels = output_labels(prediction, running.labels, len(rows))
        confidence = prediction.confidence if prediction.labels is not None else None
        running.aggregator.add(rows, labels, confidence, latency)
        self.acted(rows, labels)
        challenger = self.challenger
        if challenger is not None and not challenger.expired():
            challenger.observe(rows, labels, seconds)

    def acted(self, rows: Any, labels: list[str]) -> None:
        """What the device does with the champion's outputs (only the champion's are
        acted on); a hook for the application (and the tests), nothing by default."""
        if self.on_outputs is not None:
            self.on_outputs(rows, labels)

    def _flush(self, running: Running) -> None:
        if not running.aggregator.count:
            return  # no batch: what was lost is told by the next one
        installed = running.installed
        lost = self.buffer.take_lost()
        batch = running.aggregator.flush(
            device_id=self.config.device_id,
            model=installed.model,
            version=installed.version,
            digest=installed.manifest_digest,
            dropped_batches=lost.dropped,
            corrupt_batches=lost.corrupt,
        )
        if batch is None:
            return
        self._send_batch(batch)
        challenger = self.challenger
        if challenger is not None:
            shadow = challenger.flush(self.config.device_id, installed)
            if shadow is not None:
                self._send_batch(shadow)

    def _send_batch(self, batch: pb.TelemetryBatch) -> None:
        self.buffer.append(batch.batch_id, batch.SerializeToString())
        if self._drain is not None:
            self._drain.add(batch.batch_id)
            self._wake.set()

    def flush_telemetry(self) -> None:
        """Close the current telemetry window now (tests, shutdown)."""
        if self.running is not None:
            self._flush(self.running)


def _warmup_rows(model: OnnxModel, profile: Mapping[str, Any] | None) -> Any:
    width = model.n_features or len((profile or {}).get("features", [])) or 1
    means = [float(f.get("mean", 0.0)) for f in (profile or {}).get("features", [])]
    row = means if len(means) == width else [0.0] * width
    return np.asarray([row, row], dtype=np.float32)


def _feature_names(
    model: OnnxModel, meta: Mapping[str, Any], profile: Mapping[str, Any] | None
) -> list[str]:
    names = [str(f.get("name")) for f in (profile or {}).get("features", [])]
    width = model.n_features or len(names)
    if len(names) == width and all(names):
        return names
    return [f"f{i}" for i in range(width or 0)]


def main(argv: list[str] | None = None) -> None:
    """``edgeloop-agent --config agent.json``."""
    parser = argparse.ArgumentParser(prog="edgeloop-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="agent.json of the bundle")
    parser.add_argument("--source", help="sim | file:PATH | stdin (overrides the config)")
    parser.add_argument("--drift", help="feature=F,shift=S,after=60s,fraction=0.3")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s"
    )
    config = AgentConfig.load(args.config)
    if args.source:
        config.source = args.source
    if args.drift:
        config.drift = args.drift

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await Agent(config).run(stop)

    asyncio.run(run())


__all__ = ["Agent", "AgentConfig", "Faults", "MemoryBuffer", "ModelCache", "main"]


if __name__ == "__main__":
    main()
