"""A tiny asyncio HTTP endpoint for health, readiness and Prometheus metrics.

It depends on nothing but the standard library and prometheus_client, so every service
(and the gateway) can expose ``/healthz``, ``/readyz`` and ``/metrics`` the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

log = logging.getLogger(__name__)

Check = Callable[[], Awaitable[tuple[bool, str]]]


class HealthServer:
    """Serves ``/healthz`` (process alive), ``/readyz`` (every check passes), ``/metrics``."""

    def __init__(self, host: str, port: int, checks: dict[str, Check] | None = None) -> None:
        self.host = host
        self.port = port
        self.checks: dict[str, Check] = dict(checks or {})
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen; ``port`` 0 picks a free port (read ``self.port`` afterwards)."""
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def readiness(self) -> tuple[bool, dict[str, str]]:
        """Run every check (each at most 2 s)."""
        results: dict[str, str] = {}
        ok = True
        for name, check in self.checks.items():
            try:
                passed, detail = await asyncio.wait_for(check(), 2.0)
            except Exception as exc:
                passed, detail = False, f"{type(exc).__name__}: {exc}"
            ok = ok and passed
            results[name] = ("ok" if passed else "failing") + (f": {detail}" if detail else "")
        return ok, results

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request_line.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else "/"
            if path == "/healthz":
                status, ctype, body = 200, "application/json", b'{"status":"ok"}'
            elif path == "/readyz":
                ok, results = await self.readiness()
                status = 200 if ok else 503
                ctype = "application/json"
                body = json.dumps({"ready": ok, "checks": results}).encode()
            elif path == "/metrics":
                # in a thread: a collector may read something over the network
                # (edgeloop.kit.natsmetrics reads NATS's monitoring endpoint)
                body = await asyncio.to_thread(generate_latest, REGISTRY)
                status, ctype = 200, CONTENT_TYPE_LATEST
            else:
                status, ctype, body = 404, "text/plain", b"not found\n"
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError) as exc:
            log.debug("health endpoint: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
