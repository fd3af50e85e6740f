"""A webhook receiver for tests and benchmarks: a real HTTP server (uvicorn) on a free
port, in the caller's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from edgeloop.contracts.events import AlarmKind, AlarmRaised
from edgeloop.contracts.webhooks import DELIVERY_HEADER
from edgeloop.devstack.servers import free_port
from edgeloop.devstack.testing import eventually
from edgeloop.kit.api import QuietServer
from edgeloop.notifier.config import NotifierSettings
from tests.edge_harness import TOKEN


def notifier_settings(nats_url: str, dsn: str, **extra: Any) -> NotifierSettings:
    """The notifier's settings on ``nats_url`` and ``dsn``, its API on a free port
    accepting :data:`TOKEN` (the operator's)."""
    return NotifierSettings(
        nats_url=nats_url, database_url=dsn, api_tokens=TOKEN, api_port=free_port(), **extra
    )


def alarm() -> AlarmRaised:
    """A fresh drift alarm (its own alarm and event ids)."""
    return AlarmRaised(
        model="iris",
        version="1.0.0",
        alarm_id=uuid.uuid4(),
        kind=AlarmKind.DRIFT,
        rule="psi",
        severity="critical",
        message="psi 0.4 > 0.2 on petal_length",
    )


@dataclass
class Receiver:
    """A webhook receiver: answers ``fail_first`` requests 500, holds requests while
    ``hold`` is set, then answers 204; keeps every request it got."""

    fail_first: int = 0
    hold: asyncio.Event | None = None
    got: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """The ASGI app."""
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.got.append((headers, body))
        self.arrived.set()
        if self.hold is not None:
            await self.hold.wait()
        status = 500 if len(self.got) <= self.fail_first else 204
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"no" if status == 500 else b""})

    def delivery_ids(self) -> set[str]:
        """The distinct ``X-Edgeloop-Delivery`` ids received."""
        return {h[DELIVERY_HEADER.lower()] for h, _ in self.got}


@contextlib.asynccontextmanager
async def receiving(receiver: Receiver, port: int | None = None) -> AsyncIterator[Receiver]:
    """Serve ``receiver`` on ``port`` (default: a free one; its ``url`` set) for the
    ``with`` block."""
    port = port or free_port()
    server = QuietServer(
        uvicorn.Config(receiver, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    await eventually(lambda: _started(server), within=10, what="the receiver")
    receiver.url = f"http://127.0.0.1:{port}/hook"
    try:
        yield receiver
    finally:
        if receiver.hold is not None:
            receiver.hold.set()
        server.should_exit = True
        await task


async def _started(server: uvicorn.Server) -> bool:
    return server.started
