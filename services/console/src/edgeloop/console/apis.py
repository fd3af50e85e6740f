"""The platform's HTTP APIs, as the console calls them: always with the signed-in
person's own token, so every answer (and every refusal) is the service's own."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from edgeloop.console.config import ConsoleSettings
from edgeloop.contracts.subjects import STREAM_DLQ


class ApiError(Exception):
    """An API refused or failed a call: its status and its message (``detail``)."""

    def __init__(self, service: str, status: int, detail: str) -> None:
        super().__init__(f"{service}: {detail}")
        self.service = service
        self.status = status
        self.detail = detail


def _detail(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:500]
    detail = body.get("detail", body) if isinstance(body, dict) else body
    return detail if isinstance(detail, str) else str(detail)


def q(part: str) -> str:
    """A path segment, escaped."""
    return quote(part, safe="")


@dataclass
class Apis:
    """Clients of the registry, deployer, monitor and gateway APIs, the trace query API
    and NATS's monitoring endpoint."""

    settings: ConsoleSettings
    http: httpx.AsyncClient

    @classmethod
    def open(cls, settings: ConsoleSettings) -> Apis:
        """Clients for ``settings`` (close with :meth:`aclose`)."""
        limits = httpx.Limits(max_connections=50, max_keepalive_connections=20)
        http = httpx.AsyncClient(timeout=settings.api_timeout_seconds, limits=limits)
        return cls(settings, http)

    async def aclose(self) -> None:
        """Close the connections."""
        await self.http.aclose()

    def base(self, service: str) -> str:
        """The base URL of ``service``'s API."""
        url: str = getattr(self.settings, f"{service}_api")
        return url.rstrip("/")

    async def call(self, service: str, method: str, path: str, token: str, **kwargs: Any) -> Any:
        """The JSON answer of ``method path`` on ``service``'s API (see :meth:`send`)."""
        return (await self.send(service, method, path, token, **kwargs)).json()

    async def send(
        self, service: str, method: str, path: str, token: str, **kwargs: Any
    ) -> httpx.Response:
        """The answer of ``method path`` on ``service``'s API with ``token``;
        :class:`ApiError` with the service's status and message otherwise (503 when it
        cannot be reached)."""
        try:
            resp = await self.http.request(
                method,
                self.base(service) + path,
                headers={"Authorization": f"Bearer {token}"},
                **kwargs,
            )
        except httpx.TransportError as exc:
            raise ApiError(service, 503, f"the {service} API is not reachable ({exc})") from exc
        if resp.status_code >= 400:
            raise ApiError(service, resp.status_code, _detail(resp))
        return resp

    async def get(self, service: str, path: str, token: str, **params: Any) -> Any:
        """``GET`` (``params`` that are None are left out)."""
        clean = {k: v for k, v in params.items() if v is not None}
        return await self.call(service, "GET", path, token, params=clean)

    async def post(self, service: str, path: str, token: str, json: Any = None) -> Any:
        """``POST`` with a JSON body."""
        return await self.call(service, "POST", path, token, json=json)

    # --- who --------------------------------------------------------------------------

    async def whoami(self, token: str) -> dict[str, str]:
        """The token's name and role, as the registry knows it (401 if it is none)."""
        body = await self.get("registry", "/api/v1/whoami", token)
        return {"name": str(body["name"]), "role": str(body["role"])}

    # --- health -----------------------------------------------------------------------

    async def health(self) -> list[dict[str, Any]]:
        """Whether each API (and the trace API and NATS, when configured) answers."""
        targets = {
            name: f"{self.base(name)}/docs"
            for name in ("registry", "deployer", "monitor", "gateway")
        }
        if self.settings.traces_api:
            targets["traces"] = f"{self.settings.traces_api.rstrip('/')}/healthz"
        if self.settings.nats_monitor_url:
            targets["nats"] = f"{self.settings.nats_monitor_url.rstrip('/')}/healthz"

        async def one(name: str, url: str) -> dict[str, Any]:
            try:
                resp = await self.http.get(url)
            except httpx.TransportError as exc:
                return {
                    "name": name,
                    "ok": False,
                    "detail": f"not reachable ({type(exc).__name__})",
                }
            return {"name": name, "ok": resp.status_code == 200, "detail": str(resp.status_code)}

        return list(await asyncio.gather(*(one(n, u) for n, u in targets.items())))

    async def dlq_depth(self) -> int | None:
        """Messages in the DLQ stream (NATS ``/jsz``); None when unknown."""
        if not self.settings.nats_monitor_url:
            return None
        url = f"{self.settings.nats_monitor_url.rstrip('/')}/jsz"
        try:
            resp = await self.http.get(url, params={"streams": "true"})
            resp.raise_for_status()
            body = resp.json()
        except (httpx.HTTPError, ValueError):
            return None
        for account in body.get("account_details") or []:
            for stream in account.get("stream_detail") or []:
                if stream.get("name") == STREAM_DLQ:
                    return int(stream.get("state", {}).get("messages", 0))
        return 0

    # --- traces -----------------------------------------------------------------------

    async def trace(self, trace_id: str) -> dict[str, Any] | None:
        """The trace (Jaeger's shape: spans and processes); None when there is no trace
        API or it has no such trace."""
        if not self.settings.traces_api:
            return None
        url = f"{self.settings.traces_api.rstrip('/')}/api/traces/{q(trace_id)}"
        try:
            resp = await self.http.get(url)
        except httpx.TransportError as exc:
            raise ApiError("traces", 503, f"the trace API is not reachable ({exc})") from exc
        if resp.status_code == 404:
            return None
        if resp.status_code >= 400:
            raise ApiError("traces", resp.status_code, _detail(resp))
        data = resp.json().get("data") or []
        return dict(data[0]) if data else None
