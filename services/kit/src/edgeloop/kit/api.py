"""What every service's HTTP API shares: bearer-token authentication, and a uvicorn
server that leaves signal handling to the kit's ``Service``.

An app stores its configured tokens in ``app.state.tokens`` (role admin) and, to accept
issued tokens with roles, a pool getter in ``app.state.pool``; a route takes ``who:
Actor`` (any role) or the role it needs (``who: Operator`` …: 403 naming the role).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

import uvicorn
from fastapi import Depends, FastAPI, Header, HTTPException, Request, Response
from fastapi.responses import JSONResponse

from edgeloop.kit.db import TRANSIENT_DB_ERRORS
from edgeloop.kit.faults import CONNECTION_LOST, NATS_OUTAGE_ERRORS, looks_like_outage

log = logging.getLogger(__name__)

#: Roles, and what each may change (every valid token may read).
ROLES = ("viewer", "data-scientist", "operator", "admin")
CAPABILITIES: dict[str, tuple[str, ...]] = {
    "models.write": ("data-scientist", "admin"),  # register versions, move aliases
    "data.write": ("data-scientist", "operator", "admin"),  # label samples
    "rollouts.write": ("operator", "admin"),  # start, pause … approve; release policies
    "monitor.write": ("operator", "admin"),  # rules, acknowledge alarms
    "devices.write": ("operator", "admin"),  # enrol, revoke devices
    "tokens.admin": ("admin",),  # issue and revoke tokens
    "dlq.replay": ("operator", "admin"),  # replay dead letters to their consumers
    # set a version retired directly, without the deployer's check that no device runs
    # it (the deployer's own token; people retire through the deployer: rollouts.write)
    "models.retire": ("admin",),
}


@dataclass(frozen=True)
class Caller:
    """Who called: the token's name (``token:<hash prefix>`` for a configured one) and
    its role."""

    name: str
    role: str


def token_hash(token: str) -> str:
    """What is stored of a token."""
    return hashlib.sha256(token.encode()).hexdigest()


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status_code=401, detail=detail, headers={"WWW-Authenticate": "Bearer"})


async def _caller(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> Caller:
    """The caller, from ``Authorization: Bearer <token>``: a token from the service's
    settings (the installation's own, role admin) or one issued with a role
    (``auth.tokens``, not revoked, not expired); 401 otherwise."""
    tokens: frozenset[str] = request.app.state.tokens
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise _unauthorized("missing API token: send 'Authorization: Bearer <token>'")
    if any(hmac.compare_digest(token.encode(), t.encode()) for t in tokens):
        return Caller("token:" + token_hash(token)[:12], "admin")
    pool = getattr(request.app.state, "pool", None)
    row = None
    if pool is not None:
        row = await pool().fetchrow(
            "SELECT name, role, expires_at, revoked_at FROM auth.tokens WHERE hash = $1",
            token_hash(token),
        )
    if row is None:
        raise _unauthorized("invalid API token: send 'Authorization: Bearer <token>'")
    if row["revoked_at"] is not None:
        raise _unauthorized(f"the token {row['name']!r} was revoked")
    if row["expires_at"] is not None and row["expires_at"] <= datetime.now(UTC):
        raise _unauthorized(
            f"the token {row['name']!r} expired at {row['expires_at']:%Y-%m-%d %H:%M} UTC"
        )
    return Caller(row["name"], row["role"])


async def _actor(caller: Annotated[Caller, Depends(_caller)]) -> str:
    return caller.name


def requires(capability: str) -> Any:
    """A route dependency: the caller's name, or 403 naming the role it would need."""
    allowed = CAPABILITIES[capability]

    async def check(caller: Annotated[Caller, Depends(_caller)]) -> str:
        if caller.role not in allowed:
            raise HTTPException(
                status_code=403,
                detail=f"this needs the role {' or '.join(allowed)} ({capability}); "
                f"{caller.name} has the role {caller.role}",
            )
        return caller.name

    return Depends(check)


Actor = Annotated[str, Depends(_actor)]
"""Any authenticated caller (every role may read)."""
ModelWriter = Annotated[str, requires("models.write")]
DataWriter = Annotated[str, requires("data.write")]
Operator = Annotated[str, requires("rollouts.write")]
MonitorWriter = Annotated[str, requires("monitor.write")]
DeviceWriter = Annotated[str, requires("devices.write")]
Admin = Annotated[str, requires("tokens.admin")]
Retirer = Annotated[str, requires("models.retire")]
DlqReplayer = Annotated[str, requires("dlq.replay")]


class QuietServer(uvicorn.Server):
    """uvicorn without its own signal handlers (the kit's Service owns SIGTERM)."""

    def install_signal_handlers(self) -> None:
        """Leave signal handling to the Service."""


#: seconds a client is asked to wait before it retries during an outage
OUTAGE_RETRY_AFTER = 5


def answer_outages_with_503(app: FastAPI) -> None:
    """A request that meets an outage of PostgreSQL or NATS gets a 503 with a
    ``Retry-After`` and a sentence saying so, not a 500 with a stack trace."""

    async def outage(request: Request, exc: Exception) -> Response:
        if not looks_like_outage(exc):
            raise exc
        log.warning("%s %s: dependency unavailable: %s", request.method, request.url.path, exc)
        return JSONResponse(
            {
                "detail": "a platform dependency (PostgreSQL or NATS) is not reachable "
                f"right now ({type(exc).__name__}); nothing was changed, retry in a few "
                "seconds"
            },
            status_code=503,
            headers={"Retry-After": str(OUTAGE_RETRY_AFTER)},
        )

    for cls in {*TRANSIENT_DB_ERRORS, *NATS_OUTAGE_ERRORS, *CONNECTION_LOST}:
        if issubclass(cls, Exception):
            app.add_exception_handler(cls, outage)


async def serve_api(app: FastAPI, host: str, port: int) -> None:
    """Serve ``app`` until cancelled (the kit's Service owns SIGTERM, not uvicorn).
    Outages of PostgreSQL or NATS are answered 503 (:func:`answer_outages_with_503`)."""
    answer_outages_with_503(app)
    server = QuietServer(
        uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
    )
    task = asyncio.create_task(server.serve(), name=f"api-{port}")
    try:
        await asyncio.shield(task)
    finally:
        server.should_exit = True  # uvicorn closes its sockets and connections
        with contextlib.suppress(BaseException):
            await task
