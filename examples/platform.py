"""HTTP clients of the platform's APIs for the examples, that ride out an outage.

A service restarting (``make up`` restarts a crashed one) refuses connections for a few
seconds, and a service whose database is down answers ``503`` with ``Retry-After``
(nothing was applied). A training pipeline should wait and try again in both cases, as
these clients do; any other answer is the caller's to handle.
"""

from __future__ import annotations

import asyncio
import logging
import time

import httpx

log = logging.getLogger(__name__)

RIDE_OUT_SECONDS = 180.0
"""How long a request keeps being retried before the last answer or error is returned."""


class _RideOut(httpx.AsyncBaseTransport):
    """Retries a request refused by an outage (connection refused, 503) with back-off."""

    def __init__(self, seconds: float) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self._seconds = seconds

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        deadline = time.monotonic() + self._seconds
        delay = 0.5
        while True:
            try:
                response = await self._inner.handle_async_request(request)
            except (httpx.ConnectError, httpx.RemoteProtocolError):
                if time.monotonic() + delay > deadline:
                    raise
                wait = delay
            else:
                if response.status_code != 503 or time.monotonic() + delay > deadline:
                    return response
                await response.aread()
                await response.aclose()
                try:
                    wait = max(delay, float(response.headers.get("Retry-After", delay)))
                except ValueError:
                    wait = delay
            log.info("%s %s: the platform is unavailable; again in %.1f s",
                     request.method, request.url.path, wait)  # fmt: skip
            await asyncio.sleep(wait)
            delay = min(delay * 2, 10.0)

    async def aclose(self) -> None:
        await self._inner.aclose()


def client(url: str, token: str, *, ride_out: float = RIDE_OUT_SECONDS) -> httpx.AsyncClient:
    """A client of one API (``url``) bearing ``token``."""
    return httpx.AsyncClient(
        base_url=url,
        headers={"Authorization": f"Bearer {token}"},
        timeout=120,
        transport=_RideOut(ride_out),
    )
