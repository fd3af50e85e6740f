"""Health checks of the platform's parts (the logic behind ``edgeloop status``).

Each check is bounded (``TIMEOUT_SECONDS`` per step) and never raises: a failure is a
``Check`` whose detail says what was tried and why it failed, e.g.
``NATS at nats://127.0.0.1:4222: connection refused``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import socket
from collections.abc import Awaitable
from dataclasses import asdict, dataclass, replace
from typing import Any

import asyncpg
import httpx
import nats
from nats.errors import NoRespondersError
from nats.js.errors import ServiceUnavailableError

from edgeloop.cli.config import (
    ENV_DATABASE_URL,
    ENV_NATS_URL,
    ENV_OCI_REGISTRY_URL,
    Endpoints,
    ServiceEndpoint,
    Supervision,
)
from edgeloop.contracts.stackfile import redact

TIMEOUT_SECONDS = 2.0
"""Budget of each step of a check (connect, then one request)."""


@dataclass(frozen=True)
class Check:
    """The outcome of one health check."""

    component: str
    endpoint: str
    healthy: bool
    detail: str
    restarts: int | None = None
    """How often ``make up`` restarted it (None: not a process ``make up`` runs)."""
    last_exit: int | None = None
    """The exit status of its latest death, if ``make up`` restarted it."""

    @property
    def status(self) -> str:
        """``ok`` or ``fail``."""
        return "ok" if self.healthy else "fail"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (``--json``)."""
        return {**asdict(self), "status": self.status}


def describe(exc: BaseException) -> str:
    """A short reason for ``exc``, from the most telling error in its chain."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, TimeoutError | httpx.TimeoutException):
            return f"no answer within {TIMEOUT_SECONDS:g} s"
        if isinstance(cause, socket.gaierror):
            return f"cannot resolve host ({cause.strerror})"
        if isinstance(cause, ConnectionRefusedError) or (
            isinstance(cause, OSError) and cause.errno == errno.ECONNREFUSED
        ):
            return "connection refused"
        if isinstance(cause, ConnectionResetError):
            return "connection reset by peer"
        cause = cause.__cause__ or cause.__context__
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


def _bounded(
    component: str, label: str, endpoint: str, check: Awaitable[Check], steps: int = 2
) -> Awaitable[Check]:
    """``check``, failed with a clear message if it overruns or raises."""

    async def run() -> Check:
        try:
            return await asyncio.wait_for(check, TIMEOUT_SECONDS * steps + 0.5)
        # a health check reports every failure as a result: nothing may escape it
        except Exception as exc:
            return Check(component, endpoint, False, f"{label} at {endpoint}: {describe(exc)}")

    return run()


async def nats_connect(url: str) -> Any:
    """Connect once, failing on the first error: nats-py retries the initial connection
    for a while even when told not to reconnect, and reports each failure only to
    ``error_cb``."""
    errors: list[Exception] = []
    failed = asyncio.Event()

    async def on_error(exc: Exception) -> None:
        errors.append(exc)
        failed.set()

    connecting = asyncio.ensure_future(
        nats.connect(
            url,
            connect_timeout=TIMEOUT_SECONDS,
            allow_reconnect=False,
            max_reconnect_attempts=0,
            error_cb=on_error,
        )
    )
    watching = asyncio.ensure_future(failed.wait())
    try:
        await asyncio.wait(
            {connecting, watching}, timeout=TIMEOUT_SECONDS, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        watching.cancel()
    if connecting.done() and not connecting.cancelled() and connecting.exception() is None:
        return connecting.result()
    connecting.cancel()
    with contextlib.suppress(BaseException):
        await connecting
    if errors:
        raise errors[0]
    raise TimeoutError


async def check_nats(url: str) -> Check:
    """Connect to NATS and ask JetStream for the account's info."""
    shown = redact(url)
    label = f"NATS at {shown}"
    try:
        nc = await nats_connect(url)
    except Exception as exc:
        return Check("nats", shown, False, f"{label}: {describe(exc)}")
    try:
        info = await asyncio.wait_for(nc.jetstream().account_info(), TIMEOUT_SECONDS)
    except (NoRespondersError, ServiceUnavailableError):
        return Check("nats", shown, False, f"{label}: JetStream is not enabled on the server")
    except Exception as exc:
        return Check("nats", shown, False, f"{label}: JetStream: {describe(exc)}")
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), TIMEOUT_SECONDS)
    return Check(
        "nats",
        shown,
        True,
        f"nats-server {_nats_version(nc)}, JetStream: "
        f"{info.streams} streams, {info.consumers} consumers",
    )


def _nats_version(nc: Any) -> str:
    version = nc.connected_server_version
    try:
        return f"{version.major}.{version.minor}.{version.patch}"
    except ValueError:  # not semver: nats-py cannot parse it
        return "(unknown version)"


async def check_postgres(dsn: str) -> Check:
    """Connect to PostgreSQL and run ``SELECT 1``."""
    shown = redact(dsn)
    label = f"PostgreSQL at {shown}"
    try:
        conn = await asyncpg.connect(dsn, timeout=TIMEOUT_SECONDS)
    except Exception as exc:
        return Check("postgres", shown, False, f"{label}: {describe(exc)}")
    try:
        one = await conn.fetchval("SELECT 1", timeout=TIMEOUT_SECONDS)
        if one != 1:
            return Check("postgres", shown, False, f"{label}: SELECT 1 returned {one!r}")
        version = conn.get_server_version()
    except Exception as exc:
        return Check("postgres", shown, False, f"{label}: SELECT 1: {describe(exc)}")
    finally:
        with contextlib.suppress(Exception):
            await conn.close(timeout=TIMEOUT_SECONDS)
    return Check("postgres", shown, True, f"PostgreSQL {version.major}.{version.minor}")


def _http_failure(resp: httpx.Response) -> str:
    """``HTTP 503: db: failing: …`` — the failing readiness checks when the body lists them."""
    reason = f"HTTP {resp.status_code}"
    try:
        body = resp.json()
    except (ValueError, UnicodeDecodeError):
        text = " ".join(resp.text.split())[:160]
        return f"{reason}: {text}" if text else reason
    checks = body.get("checks") if isinstance(body, dict) else None
    if isinstance(checks, dict):
        failing = [f"{k}: {v}" for k, v in checks.items() if not str(v).startswith("ok")]
        if failing:
            return f"{reason}: not ready ({'; '.join(failing)})"
    return f"{reason}: {json.dumps(body)[:160]}"


async def _get(client: httpx.AsyncClient, url: str) -> str | None:
    """GET ``url``: ``None`` on 200, else why not."""
    try:
        resp = await client.get(url)
    except httpx.HTTPError as exc:
        return describe(exc)
    return None if resp.status_code == 200 else _http_failure(resp)


async def check_registry(client: httpx.AsyncClient, url: str) -> Check:
    """The OCI registry answers ``GET /v2/`` with 200 (Distribution API v2)."""
    v2 = url.rstrip("/") + "/v2/"
    why = await _get(client, v2)
    if why is not None:
        return Check("oci-registry", v2, False, f"OCI registry at {v2}: {why}")
    return Check("oci-registry", v2, True, "Distribution API v2")


def _pid_gone(pid: int | None) -> bool:
    """``pid`` names no process on this machine (``make up`` ran here)."""
    if pid is None or os.name != "posix":  # os.kill(pid, 0) only probes on POSIX
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


async def check_service(client: httpx.AsyncClient, service: ServiceEndpoint) -> Check:
    """A service is healthy when ``/healthz`` and ``/readyz`` both answer 200."""
    component = service.name
    label = f"service {service.name}"
    if not service.health_url:
        return Check(component, "-", False, f"{label}: stack.json gives no health_url")
    for url in (service.health_url, service.ready_url):
        why = await _get(client, url)
        if why is not None:
            if _pid_gone(service.pid):
                why += f" (process {service.pid} is not running)"
            return Check(component, service.health_url, False, f"{label} at {url}: {why}")
    return Check(component, service.health_url, True, "alive and ready")


def _exit_text(code: int | None) -> str:
    """``SIGKILL`` for -9 (a signal killed it), ``status 1`` for 1."""
    if code is None:
        return "unknown"
    if code < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-code).name
    return f"status {code}"


def with_supervision(check: Check, record: Supervision | None) -> Check:
    """``check`` with what ``make up``'s supervisor recorded about the component: its
    restarts, and in the detail how often and why it died, when it did."""
    if record is None:
        return check
    detail = check.detail
    if record.restarts or record.state != "running":
        detail += f"; restarts: {record.restarts}"
        if record.last_exit is not None:
            detail += f" (last exit: {_exit_text(record.last_exit)})"
        if record.state != "running":
            detail += "; make up is restarting it"
    return replace(check, detail=detail, restarts=record.restarts, last_exit=record.last_exit)


def _missing(component: str, label: str, env: str) -> Check:
    return Check(component, "-", False, f"{label}: no endpoint (set {env} or run `make up`)")


async def run_checks(endpoints: Endpoints) -> list[Check]:
    """Every check, concurrently: NATS, PostgreSQL, the OCI registry, then each service;
    each with ``make up``'s restarts of it (:func:`with_supervision`)."""
    async with httpx.AsyncClient(timeout=TIMEOUT_SECONDS) as client:
        pending: list[Awaitable[Check]] = []
        if endpoints.nats_url:
            url = endpoints.nats_url
            pending.append(_bounded("nats", "NATS", redact(url), check_nats(url)))
        else:
            pending.append(_done(_missing("nats", "NATS", ENV_NATS_URL)))
        if endpoints.database_url:
            dsn = endpoints.database_url
            pending.append(_bounded("postgres", "PostgreSQL", redact(dsn), check_postgres(dsn)))
        else:
            pending.append(_done(_missing("postgres", "PostgreSQL", ENV_DATABASE_URL)))
        if endpoints.registry_url:
            reg = endpoints.registry_url
            pending.append(
                _bounded("oci-registry", "OCI registry", reg, check_registry(client, reg), 1)
            )
        else:
            pending.append(_done(_missing("oci-registry", "OCI registry", ENV_OCI_REGISTRY_URL)))
        for svc in endpoints.services:
            label = f"service {svc.name}"
            pending.append(
                _bounded(svc.name, label, svc.health_url or "-", check_service(client, svc))
            )
        checks = await asyncio.gather(*pending)
    return [with_supervision(c, endpoints.supervision.get(c.component)) for c in checks]


async def _done(check: Check) -> Check:
    return check
