"""API tokens with a role (``auth.tokens``): a name, a role, an expiry; stored hashed.

Two kinds live there. Tokens issued to people (``edgeloop tokens issue``), shown once;
issuing and revoking are audited in the same transaction. And each platform service's
own token, ``service:<name>`` with the least role its calls need (:data:`SERVICE_ROLES`):
the service holds the token (its ``…_REGISTRY_TOKEN``/``…_GATEWAY_TOKEN`` setting), the
bootstrap installs its SHA-256 (:func:`install_service_tokens`, run by
``edgeloop.kit.dbroles``), every API then knows it. No service holds the admin token: the
configured ``*_API_TOKENS`` are the installation operator's. An admin revokes a
service's token like any other (``edgeloop tokens revoke service:validator``); the
bootstrap leaves it revoked until the service is given a new one.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from edgeloop.kit import audit
from edgeloop.kit.api import ROLES, token_hash
from edgeloop.kit.db import Conn

#: The platform's own API callers and the least role each one's calls need.
SERVICE_ROLES: dict[str, str] = {
    # reads the champion alias from the registry
    "validator": "viewer",
    # reads versions from the registry and devices from the gateway; deprecates and
    # retires versions at the registry (models.deprecate, models.retire)
    "deployer": "service",
    # reads reference profiles from the registry
    "monitor": "viewer",
    # the simulated fleet enrols its devices at the gateway (devices.write)
    "fleet": "operator",
}
#: The names of the services' own tokens start so (no issued token's may).
SERVICE_PREFIX = "service:"
#: Who the bootstrap records as the creator of a service's token.
BOOTSTRAP_ACTOR = "bootstrap"

_SHA256 = re.compile(r"[0-9a-f]{64}")


class TokenError(ValueError):
    """A request about tokens that cannot be done (the message says why)."""


@dataclass(frozen=True)
class ServiceToken:
    """A platform service's own API token, as the bootstrap installs it: its hash only."""

    service: str
    hash: str
    """SHA-256 (hex) of the token."""

    def __post_init__(self) -> None:
        if self.service not in SERVICE_ROLES:
            raise TokenError(
                f"no service {self.service!r} calls the APIs; services with a token of their "
                f"own: {', '.join(SERVICE_ROLES)}"
            )
        if not _SHA256.fullmatch(self.hash):
            raise TokenError(f"the hash of {self.service}'s token is not a hex SHA-256")

    @classmethod
    def of(cls, service: str, token: str) -> ServiceToken:
        """``service``'s token ``token`` (only its hash is kept)."""
        return cls(service, token_hash(token))

    @property
    def name(self) -> str:
        """``service:<service>``: the caller's name in audit records and events."""
        return SERVICE_PREFIX + self.service

    @property
    def role(self) -> str:
        """The least role the service's calls need."""
        return SERVICE_ROLES[self.service]


def service_token_hashes(tokens: Iterable[ServiceToken]) -> str:
    """The file the bootstrap reads (``EDGELOOP_SERVICE_TOKEN_HASHES``): a line
    ``<service> <sha256 of its token>`` each (what ``sha256sum`` prints, reversed)."""
    return "".join(f"{t.service} {t.hash}\n" for t in tokens)


def parse_service_token_hashes(text: str) -> list[ServiceToken]:
    """The lines of :func:`service_token_hashes` (blank lines and ``#`` comments
    skipped); :class:`TokenError` naming the line that is not one."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.split("#", 1)[0].split()
        if not parts:
            continue
        if len(parts) != 2:
            raise TokenError(
                f"line {number} of the service token hashes is not '<service> <sha256>'"
            )
        try:
            out.append(ServiceToken(parts[0], parts[1].lower()))
        except TokenError as exc:
            raise TokenError(f"line {number} of the service token hashes: {exc}") from None
    return out


async def install_service_tokens(conn: Conn, tokens: Iterable[ServiceToken]) -> None:
    """Install each service's token (the bootstrap, idempotent): name
    ``service:<service>``, its role, its hash. A changed hash is a new token (created now,
    not revoked); the same hash keeps the row as it is, revoked if an admin revoked it."""
    for token in tokens:
        await conn.execute(
            """INSERT INTO auth.tokens (name, role, hash, created_by)
               VALUES ($1, $2, $3, $4)
               ON CONFLICT (name) DO UPDATE SET
                 role = EXCLUDED.role, expires_at = NULL,
                 hash = EXCLUDED.hash,
                 created_by = EXCLUDED.created_by,
                 created_at = CASE WHEN auth.tokens.hash = EXCLUDED.hash
                                   THEN auth.tokens.created_at ELSE now() END,
                 revoked_at = CASE WHEN auth.tokens.hash = EXCLUDED.hash
                                   THEN auth.tokens.revoked_at END""",
            token.name,
            token.role,
            token.hash,
            BOOTSTRAP_ACTOR,
        )


async def issue_token(
    conn: Conn, *, name: str, role: str, actor: str, expires_in: timedelta | None, service: str
) -> dict[str, Any]:
    """A new token (its secret only in the answer), in the caller's transaction."""
    if role not in ROLES:
        raise TokenError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
    if not name or len(name) > 64 or name.startswith(("token:", SERVICE_PREFIX)):
        raise TokenError(
            "a token's name is 1 to 64 characters and does not start with 'token:' or "
            f"'{SERVICE_PREFIX}' (the services' own tokens, installed by the bootstrap)"
        )
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
