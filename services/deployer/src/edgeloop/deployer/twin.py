"""The device twin as the deployer uses it: writes to ``desired``, follows ``reported``."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime
from typing import TypeVar

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from edgeloop.contracts import subjects as s
from edgeloop.contracts.twin import DesiredModel
from edgeloop.deployer.plan import Reported
from edgeloop.kit import failpoints
from edgeloop.kit.kv import KvMirror

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class Twin:
    """Desired state written many devices at a time; reported state mirrored in memory."""

    def __init__(self, js: JetStreamContext, *, concurrency: int = 256) -> None:
        self.js = js
        self.concurrency = concurrency
        self.reported: dict[str, Reported] = {}
        """Latest reported state by device id."""
        self.changed = asyncio.Event()
        """Set on every change of reported state (the engine clears it)."""
        self._desired: KeyValue | None = None
        self._mirror: KvMirror | None = None

    async def start(self) -> None:
        """Open the buckets and load the reported state."""
        self._desired = await self.js.key_value(s.KV_DESIRED)
        self._mirror = KvMirror(
            await self.js.key_value(s.KV_REPORTED), self._on_reported, name=s.KV_REPORTED
        )
        await self._mirror.start()

    async def stop(self) -> None:
        """Stop following reported state."""
        if self._mirror is not None:
            await self._mirror.stop()

    @property
    def desired(self) -> KeyValue:
        if self._desired is None:
            raise RuntimeError("the twin is not started")
        return self._desired

    def _on_reported(self, key: str, revision: int, value: bytes | None) -> None:
        if value is None:
            return
        try:
            doc = json.loads(value)
            device = doc["device_id"]
            self.reported[device] = Reported(
                state=doc["state"],
                digest=doc.get("digest"),
                desired_digest=doc.get("desired_digest"),
                error=doc.get("error"),
                deferred_since=_when(doc.get("deferred_since")),
                deferred_until=_when(doc.get("deferred_until")),
            )
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("reported state %s (revision %d) is unreadable: %s", key, revision, exc)
            return
        self.changed.set()

    async def get_desired(self, devices: Iterable[str]) -> dict[str, bytes | None]:
        """The current desired document (raw) of each device; None where there is none."""

        async def one(device: str) -> bytes | None:
            try:
                entry = await self.desired.get(s.kv_key(device))
            except KeyNotFoundError:
                return None
            return entry.value or None

        return await self._many(devices, one)

    async def put_desired(self, docs: Mapping[str, DesiredModel | None]) -> None:
        """Write each device's document (None deletes it: the device runs nothing); a
        device whose document is already the same is not written again, so a step retried
        after a partial failure doubles no write."""

        async def one(device: str) -> None:
            doc = docs[device]
            key = s.kv_key(device)
            try:  # a step retried after some writes failed: what is there already stays
                current = (await self.desired.get(key)).value or None
            except KeyNotFoundError:
                current = None
            wanted = doc.to_bytes() if doc is not None else None
            if _same_document(current, wanted):
                return
            failpoints.hit("kv.write")
            if wanted is None:
                await self.desired.delete(key)
            else:
                await self.desired.put(key, wanted)

        await self._many(docs, one)

    async def _many(self, keys: Iterable[T], fn: Callable[[T], Awaitable[R]]) -> dict[T, R]:
        sem = asyncio.Semaphore(self.concurrency)

        async def bounded(key: T) -> R:
            async with sem:
                return await fn(key)

        keys = list(keys)
        results = await asyncio.gather(*(bounded(k) for k in keys))
        return dict(zip(keys, results, strict=True))


def _when(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _same_document(current: bytes | None, wanted: bytes | None) -> bool:
    """Whether two desired documents say the same (``set_at``, when it was written,
    aside)."""
    if current is None or wanted is None:
        return current == wanted
    try:
        a, b = json.loads(current), json.loads(wanted)
    except ValueError:
        return False
    a.pop("set_at", None)
    b.pop("set_at", None)
    return bool(a == b)
