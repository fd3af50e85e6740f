"""Issued API tokens (``auth.tokens``): a name, a role, an expiry; stored hashed, shown
once. Issuing and revoking are audited in the same transaction."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

from edgeloop.kit import audit
from edgeloop.kit.api import ROLES, token_hash
from edgeloop.kit.db import Conn


class TokenError(ValueError):
    """A request about tokens that cannot be done (the message says why)."""


async def issue_token(
    conn: Conn, *, name: str, role: str, actor: str, expires_in: timedelta | None, service: str
) -> dict[str, Any]:
    """A new token (its secret only in the answer), in the caller's transaction."""
    if role not in ROLES:
        raise TokenError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
    if not name or len(name) > 64 or name.startswith("token:"):
        raise TokenError("a token's name is 1 to 64 characters and does not start with 'token:'")
    if await conn.fetchval("SELECT 1 FROM auth.tokens WHERE name = $1", name):
        raise TokenError(f"a token named {name!r} exists; revoke it or choose another name")
    secret = "elt_" + secrets.token_urlsafe(32)
    expires_at = datetime.now(UTC) + expires_in if expires_in else None
    await conn.execute(
        "INSERT INTO auth.tokens (name, role, hash, created_by, expires_at) "
        "VALUES ($1, $2, $3, $4, $5)",
        name,
        role,
        token_hash(secret),
        actor,
        expires_at,
    )
    await audit.record(
        conn,
        service=service,
        actor=actor,
        action="token.issue",
        subject=f"token {name}",
        after={"role": role, "expires_at": expires_at},
    )
    return {"name": name, "role": role, "token": secret, "expires_at": expires_at}


async def revoke_token(conn: Conn, *, name: str, actor: str, service: str) -> dict[str, Any]:
    """Revoke ``name`` (KeyError when there is no such token)."""
    row = await conn.fetchrow(
        "UPDATE auth.tokens SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL "
        "RETURNING name, role, revoked_at",
        name,
    )
    if row is None:
        raise KeyError(name)
    await audit.record(
        conn,
        service=service,
        actor=actor,
        action="token.revoke",
        subject=f"token {name}",
        before={"role": row["role"]},
        after={"revoked": True},
    )
    return dict(row)


async def list_tokens(conn: Conn) -> list[dict[str, Any]]:
    """Every token (never a secret), newest first."""
    rows = await conn.fetch(
        "SELECT name, role, created_at, created_by, expires_at, revoked_at FROM auth.tokens "
        "ORDER BY created_at DESC"
    )
    return [dict(r) for r in rows]
