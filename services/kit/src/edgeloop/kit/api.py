"""What every service's HTTP API shares: the app itself (:func:`new_api`: its ``/docs``
served with no CDN), bearer-token authentication checked before a body is read, a body
limit per route enforced while the body streams in, and a uvicorn server that leaves
signal handling to the kit's ``Service``.

An app stores its configured tokens in ``app.state.tokens`` (role admin: the
installation's operator, a person) and, to accept tokens with roles — issued to people,
and each platform service's own (``service:<name>``, :mod:`edgeloop.kit.tokens`) — a pool
getter in ``app.state.pool``; a route takes ``who: Actor`` (any role) or the role it needs
(``who: Operator`` …: 403 naming the role).
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
from fastapi_offline import FastAPIOffline
from starlette.datastructures import Headers
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgeloop.contracts.names import InvalidName
from edgeloop.kit.db import TRANSIENT_DB_ERRORS
from edgeloop.kit.faults import CONNECTION_LOST, NATS_OUTAGE_ERRORS, looks_like_outage

log = logging.getLogger(__name__)

#: Roles, and what each may change (every valid token may read). ``service`` is the role
#: of a platform service whose calls change something without a person (the deployer's:
#: deprecate and retire versions); services that only read hold ``viewer``
#: (``edgeloop.kit.tokens.SERVICE_ROLES``).
ROLES = ("viewer", "data-scientist", "operator", "service", "admin")
CAPABILITIES: dict[str, tuple[str, ...]] = {
    "models.write": ("data-scientist", "admin"),  # register versions, move aliases
    # deprecate a version (a person, or the deployer while it retires one)
    "models.deprecate": ("data-scientist", "service", "admin"),
    "data.write": ("data-scientist", "operator", "admin"),  # label samples
    "rollouts.write": ("operator", "admin"),  # start, pause … approve; release policies
    "monitor.write": ("operator", "admin"),  # rules, acknowledge alarms
    "devices.write": ("operator", "admin"),  # enrol, revoke devices
    "tokens.admin": ("admin",),  # issue and revoke tokens
    "dlq.replay": ("operator", "admin"),  # replay dead letters to their consumers
    # set a version retired directly, without the deployer's check that no device runs
    # it (the deployer's own token; people retire through the deployer: rollouts.write)
    "models.retire": ("service", "admin"),
    # register a version with a threshold looser than the platform's minimum
    "thresholds.loosen": ("admin",),
    "notify.write": ("operator", "admin"),  # add, remove and test webhook subscriptions
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


class Unauthorized(Exception):
    """No valid API token (the message says what is wrong with it)."""


async def authenticate(app: Any, authorization: str | None) -> Caller:
    """The caller of ``app``, from an ``Authorization: Bearer <token>`` header: a token
    from the service's settings (``app.state.tokens``: the installation's operator, role
    admin) or one with a role in ``auth.tokens`` (through ``app.state.pool``; issued, or a
    service's own installed by the bootstrap; not revoked, not expired);
    :class:`Unauthorized` otherwise."""
    tokens: frozenset[str] = app.state.tokens
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("missing API token: send 'Authorization: Bearer <token>'")
    if any(hmac.compare_digest(token.encode(), t.encode()) for t in tokens):
        return Caller("token:" + token_hash(token)[:12], "admin")
    pool = getattr(app.state, "pool", None)
    row = None
    if pool is not None:
        row = await pool().fetchrow(
            "SELECT name, role, expires_at, revoked_at FROM auth.tokens WHERE hash = $1",
            token_hash(token),
        )
    if row is None:
        raise Unauthorized("invalid API token: send 'Authorization: Bearer <token>'")
    if row["revoked_at"] is not None:
        raise Unauthorized(f"the token {row['name']!r} was revoked")
    if row["expires_at"] is not None and row["expires_at"] <= datetime.now(UTC):
        raise Unauthorized(
            f"the token {row['name']!r} expired at {row['expires_at']:%Y-%m-%d %H:%M} UTC"
        )
    return Caller(row["name"], row["role"])


#: Where :class:`Guard` leaves the authenticated caller in the ASGI scope.
CALLER_SCOPE_KEY = "edgeloop.caller"


async def _caller(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> Caller:
    """The caller :class:`Guard` authenticated before the body was read (or, for an app
    served without it, authenticated now); 401 without a valid token."""
    caller = request.scope.get(CALLER_SCOPE_KEY)
    if isinstance(caller, Caller):
        return caller
    try:
        return await authenticate(request.app, authorization)
    except Unauthorized as exc:
        raise HTTPException(
            status_code=401, detail=str(exc), headers={"WWW-Authenticate": "Bearer"}
        ) from None


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


def may(caller: Caller, capability: str) -> bool:
    """Whether ``caller``'s role has ``capability`` (for a route that decides itself)."""
    return caller.role in CAPABILITIES[capability]


Who = Annotated[Caller, Depends(_caller)]
"""The authenticated caller, with its role."""
Actor = Annotated[str, Depends(_actor)]
"""Any authenticated caller (every role may read)."""
ModelWriter = Annotated[str, requires("models.write")]
DataWriter = Annotated[str, requires("data.write")]
Operator = Annotated[str, requires("rollouts.write")]
MonitorWriter = Annotated[str, requires("monitor.write")]
DeviceWriter = Annotated[str, requires("devices.write")]
Admin = Annotated[str, requires("tokens.admin")]
Deprecator = Annotated[str, requires("models.deprecate")]
Retirer = Annotated[str, requires("models.retire")]
DlqReplayer = Annotated[str, requires("dlq.replay")]
NotifyWriter = Annotated[str, requires("notify.write")]


#: Where an API serves the scripts, styles and icon of its ``/docs`` (Swagger UI) and
#: ``/redoc`` pages: the copies the ``fastapi-offline`` distribution installs.
DOCS_ASSETS = "/docs/assets"


def new_api(*, title: str, version: str, description: str) -> FastAPI:
    """A service's FastAPI app, whose ``/docs`` and ``/redoc`` pages load their scripts
    and styles from the app itself (:data:`DOCS_ASSETS`), not from a CDN: they render on
    a machine with no route to the internet (an edge site, an air-gapped plant). The
    pages and their assets need no token; the OpenAPI document is at ``/openapi.json``
    as FastAPI serves it."""
    app = FastAPIOffline(
        title=title, version=version, description=description, static_url=DOCS_ASSETS
    )
    # FastAPIOffline adds its own pages after FastAPI's are turned off (docs_url None):
    # the app says again where they are, for what reads it (Guard keeps them public)
    app.docs_url, app.redoc_url = "/docs", "/redoc"
    return app


class QuietServer(uvicorn.Server):
    """uvicorn without its own signal handlers (the kit's Service owns SIGTERM)."""

    def install_signal_handlers(self) -> None:
        """Leave signal handling to the Service."""


#: seconds a client is asked to wait before it retries during an outage
OUTAGE_RETRY_AFTER = 5


def _outage_response(method: str, path: str, exc: Exception) -> JSONResponse:
    log.warning("%s %s: dependency unavailable: %s", method, path, exc)
    return JSONResponse(
        {
            "detail": "a platform dependency (PostgreSQL or NATS) is not reachable "
            f"right now ({type(exc).__name__}); nothing was changed, retry in a few "
            "seconds"
        },
        status_code=503,
        headers={"Retry-After": str(OUTAGE_RETRY_AFTER)},
    )


def answer_outages_with_503(app: FastAPI) -> None:
    """A request that meets an outage of PostgreSQL or NATS gets a 503 with a
    ``Retry-After`` and a sentence saying so, not a 500 with a stack trace."""

    async def outage(request: Request, exc: Exception) -> Response:
        if not looks_like_outage(exc):
            raise exc
        return _outage_response(request.method, request.url.path, exc)

    for cls in {*TRANSIENT_DB_ERRORS, *NATS_OUTAGE_ERRORS, *CONNECTION_LOST}:
        if issubclass(cls, Exception):
            app.add_exception_handler(cls, outage)


#: The body limit of a route that declares none (its JSON body): 1 MiB. A route that
#: takes more declares it: ``@api.post(..., max_body_size=N)``.
DEFAULT_BODY_LIMIT = 1 << 20

#: After a refusal sent before the body was read, how long and how much of the body the
#: server still reads (and drops) before it closes the connection: a client still
#: sending would otherwise get a reset instead of the answer (nginx's lingering close).
LINGER_SECONDS = 2.0
LINGER_BYTES = 16 << 20


class BodyTooLarge(HTTPException):
    """413: the body is over its route's limit (the message names the limit)."""

    def __init__(self, method: str, path: str, limit: int) -> None:
        super().__init__(
            status_code=413,
            detail=f"the request body is larger than the limit of {method} {path}: "
            f"{limit} bytes ({limit / (1 << 20):g} MiB)",
            headers={"Connection": "close"},
        )


class Guard:
    """ASGI middleware in front of every API (:func:`guard`): the bearer token is checked
    from the headers before anything reads the body (401 without reading it), and the
    body is held to its route's limit (the route's ``max_body_size``, else
    :data:`DEFAULT_BODY_LIMIT`): a ``Content-Length`` over it is refused before a byte of
    the body is read, a chunked body as soon as it passes it (413 naming the limit). A
    refusal closes the connection. OpenAPI's pages (and their assets) stay public."""

    def __init__(self, app: ASGIApp, *, api: FastAPI, default_limit: int) -> None:
        self.app = app
        self.api = api
        self.default_limit = default_limit
        pages = (api.docs_url, api.redoc_url, api.openapi_url, api.swagger_ui_oauth2_redirect_url)
        self.public = {p for p in pages if p}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Authenticate, then let the app read a limited body."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = _lingering(send, receive)
        path = scope["path"]
        if path not in self.public and not path.startswith(DOCS_ASSETS + "/"):
            try:
                authorization = Headers(scope=scope).get("authorization")
                scope[CALLER_SCOPE_KEY] = await authenticate(self.api, authorization)
            except Unauthorized as exc:
                headers = {"WWW-Authenticate": "Bearer", "Connection": "close"}
                await JSONResponse({"detail": str(exc)}, 401, headers)(scope, receive, send)
                return
            except Exception as exc:
                if not looks_like_outage(exc):
                    raise
                await _outage_response(scope["method"], scope["path"], exc)(scope, receive, send)
                return
        limit = self._limit(scope)
        too_large = BodyTooLarge(scope["method"], scope["path"], limit)
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > limit:
            refusal = JSONResponse({"detail": too_large.detail}, 413, too_large.headers)
            await refusal(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise too_large
            return message

        await self.app(scope, limited, send)

    def _limit(self, scope: Scope) -> int:
        for route in self.api.router.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return getattr(route, "max_body_size", None) or self.default_limit
        return self.default_limit


def _lingering(send: Send, receive: Receive) -> Send:
    """``send`` that, for an answer closing the connection, reads and drops what the
    client is still sending (bounded) before it completes the answer, so the client
    reads the answer rather than a connection reset."""
    closing = False

    async def linger(message: Message) -> None:
        nonlocal closing
        if message["type"] == "http.response.start":
            closing = (b"connection", b"close") in message.get("headers", [])
        last = message["type"] == "http.response.body" and not message.get("more_body")
        if not (closing and last):
            await send(message)
            return
        await send({**message, "more_body": True})
        with contextlib.suppress(TimeoutError, OSError, RuntimeError):
            async with asyncio.timeout(LINGER_SECONDS):
                dropped = 0
                while dropped < LINGER_BYTES:
                    got = await receive()
                    if got["type"] != "http.request" or not got.get("more_body"):
                        break
                    dropped += len(got.get("body", b""))
        await send({"type": "http.response.body", "body": b""})

    return linger


async def _invalid_name(_: Request, exc: Exception) -> Response:
    """422 stating the rule the name breaks."""
    return JSONResponse({"detail": str(exc)}, status_code=422)


def guard(app: FastAPI, default_limit: int = DEFAULT_BODY_LIMIT) -> None:
    """Put ``app`` behind :class:`Guard` and answer a name that breaks its rule 422
    stating the rule."""
    app.add_middleware(Guard, api=app, default_limit=default_limit)
    app.add_exception_handler(InvalidName, _invalid_name)


async def serve_api(app: FastAPI, host: str, port: int) -> None:
    """Serve ``app`` until cancelled (the kit's Service owns SIGTERM, not uvicorn).
    Outages of PostgreSQL or NATS are answered 503 (:func:`answer_outages_with_503`);
    tokens and body limits are checked before a body is read (:func:`guard`)."""
    answer_outages_with_503(app)
    guard(app)
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
