"""What every service's HTTP API shares: bearer-token authentication, and a uvicorn
server that leaves signal handling to the kit's ``Service``.

An app stores its accepted tokens in ``app.state.tokens``; a route takes ``who: Actor``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
from typing import Annotated

import uvicorn
from fastapi import Depends, FastAPI, Header, HTTPException, Request


async def _actor(request: Request, authorization: Annotated[str | None, Header()] = None) -> str:
    """The caller, from ``Authorization: Bearer <token>``; 401 without a valid token."""
    tokens: frozenset[str] = request.app.state.tokens
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not any(
        hmac.compare_digest(token.encode(), t.encode()) for t in tokens
    ):
        raise HTTPException(
            status_code=401,
            detail="missing or invalid API token: send 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    # Identify the caller without keeping the secret (audit needs more: issue 8).
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:12]


Actor = Annotated[str, Depends(_actor)]
"""The authenticated caller of a route."""


class QuietServer(uvicorn.Server):
    """uvicorn without its own signal handlers (the kit's Service owns SIGTERM)."""

    def install_signal_handlers(self) -> None:
        """Leave signal handling to the Service."""


async def serve_api(app: FastAPI, host: str, port: int) -> None:
    """Serve ``app`` until cancelled (the kit's Service owns SIGTERM, not uvicorn)."""
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
