"""PostgreSQL least privilege against a real server: each service's role owns its schema
and nothing else, appends to the audit trail but cannot change it, and only the registry
writes tokens; the audit chain's MACs catch a history rewritten by the database's owner;
the bootstrap installs each calling service's own API token from its hash."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import uuid
from types import SimpleNamespace

import asyncpg
import pytest
from pydantic_settings import SettingsConfigDict

from edgeloop.contracts.access import SERVICES
from edgeloop.contracts.stackfile import with_credentials
from edgeloop.devstack.servers import Postgres
from edgeloop.kit import audit
from edgeloop.kit.api import Unauthorized, authenticate, token_hash
from edgeloop.kit.db import create_pool, migrate
from edgeloop.kit.dbroles import TOKEN_ISSUERS, DbRole, bootstrap, tokens_from_env
from edgeloop.kit.settings import ServiceSettings
from edgeloop.kit.tokens import (
    SERVICE_ROLES,
    ServiceToken,
    TokenError,
    issue_token,
    service_token_hashes,
)


@pytest.fixture
async def roles_db(postgres: Postgres, unique: str) -> str:
    """The admin DSN of a database of this test's own, bootstrapped for the roles."""
    return await asyncio.to_thread(postgres.create_database, f"roles_{unique}")


def _as(role: DbRole, admin_dsn: str) -> str:
    return with_credentials(admin_dsn, role.user, role.password)


def _role(roles: tuple[DbRole, ...], service: str) -> DbRole:
    return next(r for r in roles if r.service == service)


@pytest.mark.parametrize("service", list(SERVICES))
async def test_a_service_role_has_its_schema_appends_to_the_audit_and_nothing_else(
    roles_db: str, pg_roles: tuple[DbRole, ...], service: str
) -> None:
    role = _role(pg_roles, service)
    other = next(r for r in pg_roles if r.service != service)
    for r in (role, other):  # each migrates its own schema as itself
        pool = await create_pool(_as(r, roles_db), r.schema)
        try:
            await migrate(pool, r.schema)
        finally:
            await pool.close()
    conn = await asyncpg.connect(_as(role, roles_db))
    try:
        assert await conn.fetchval("SELECT current_user") == role.user
        assert not await conn.fetchval(
            "SELECT rolsuper FROM pg_roles WHERE rolname = $1", role.user
        )
        # its own schema: the kit's outbox works
        await conn.execute(
            f"INSERT INTO {role.schema}.outbox (event_id, subject, payload) VALUES ($1, 'x', '')",
            uuid.uuid4(),
        )
        # the audit trail: append (the chain's lock and head) and read, never change
        async with conn.transaction():
            seq = await audit.record(
                conn, service=service, actor="test", action="test.append", subject="roles"
            )
        refused = (
            ("UPDATE audit.records SET reason = 'rewritten' WHERE seq = $1", seq),
            ("DELETE FROM audit.records WHERE seq = $1", seq),
            ("TRUNCATE audit.records",),
            ("ALTER TABLE audit.records DROP COLUMN mac",),
        )
        for statement, *args in refused:
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
                await conn.execute(statement, *args)
        # another service's schema: its outbox, its tables, a new table
        for statement in (
            f"INSERT INTO {other.schema}.outbox (event_id, subject, payload) "
            "VALUES (gen_random_uuid(), 'forged', '')",
            f"SELECT count(*) FROM {other.schema}.outbox",
            f"CREATE TABLE {other.schema}.planted (x int)",
            "CREATE SCHEMA planted",
            "CREATE TABLE public.planted (x int)",
        ):
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
                await conn.execute(statement)
        # tokens: every service reads them (to authenticate callers), only the registry
        # issues (and revokes) them
        await conn.fetch("SELECT name, role FROM auth.tokens")
        insert = "INSERT INTO auth.tokens (name, role, hash) VALUES ($1, 'admin', $2)"
        if service in TOKEN_ISSUERS:
            await conn.execute(insert, f"by-{service}", uuid.uuid4().hex)
            await conn.execute("UPDATE auth.tokens SET revoked_at = now() WHERE name = $1", "x")
        else:
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
                await conn.execute(insert, f"by-{service}", uuid.uuid4().hex)
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
                await conn.execute("UPDATE auth.tokens SET role = 'admin'")
        with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
            await conn.execute("DELETE FROM auth.tokens")
    finally:
        await conn.close()


async def test_the_bootstrap_is_idempotent_and_adopts_what_a_superuser_made(
    roles_db: str, pg_roles: tuple[DbRole, ...]
) -> None:
    """A schema migrated by a superuser before roles existed becomes the role's: a second
    bootstrap (every `make up` runs one) hands its tables over, and a superuser migrating
    a role's schema creates the objects as the role."""
    role = _role(pg_roles, "builder")
    admin = await asyncpg.connect(roles_db)
    try:
        await admin.execute(f"CREATE TABLE {role.schema}.legacy (id bigserial PRIMARY KEY)")
        await bootstrap(roles_db, pg_roles)
        pool = await create_pool(roles_db, role.schema)  # the superuser
        try:
            await migrate(pool, role.schema)
        finally:
            await pool.close()
        owners = await admin.fetch(
            "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = $1", role.schema
        )
        assert [r["tableowner"] for r in owners] == [role.user]
    finally:
        await admin.close()
    conn = await asyncpg.connect(_as(role, roles_db))
    try:
        await conn.execute(f"INSERT INTO {role.schema}.legacy DEFAULT VALUES")
    finally:
        await conn.close()


async def test_a_history_rewritten_by_the_database_owner_fails_on_its_mac(
    roles_db: str,
) -> None:
    """The owner changes record 2 and recomputes every hash after it: the unkeyed chain
    checks out, the MAC (its key outside the database) names record 2."""
    audit.configure(os.environ["EDGELOOP_AUDIT_KEY"])  # the session's, as services have it
    conn = await asyncpg.connect(roles_db)
    try:
        for i in range(3):
            async with conn.transaction():
                await audit.record(conn, service="t", actor="a", action=f"act.{i}", subject="s")
        assert (await audit.verify(conn)).ok
        rows = [
            dict(r)
            for r in await conn.fetch(
                "SELECT seq, at, service, actor, action, subject, model, version, "
                "before::text, after::text, reason, trace_id, prev_hash FROM audit.records "
                "ORDER BY seq"
            )
        ]
        rows[1]["reason"] = "nothing happened"
        prev = rows[0]["prev_hash"]
        for row in rows:
            row["before"] = row["before"] and json.loads(row["before"])
            row["after"] = row["after"] and json.loads(row["after"])
            row["prev_hash"] = prev
            prev = audit.record_hash(row)
            await conn.execute(
                "UPDATE audit.records SET reason = $2, prev_hash = $3, hash = $4 WHERE seq = $1",
                row["seq"],
                row["reason"],
                row["prev_hash"],
                prev,
            )
        audit.configure(None)  # a verifier without the key: the hashes alone check out
        assert (await audit.verify(conn)).ok
        audit.configure(os.environ["EDGELOOP_AUDIT_KEY"])
        verdict = await audit.verify(conn)
        assert (verdict.broken_at, verdict.keyed) == (2, True)
        assert "MAC does not match" in str(verdict.problem)
        await conn.execute("UPDATE audit.records SET mac = NULL WHERE seq = 1")
        verdict = await audit.verify(conn)
        assert verdict.broken_at == 1
        assert "no MAC" in str(verdict.problem)
    finally:
        audit.configure(os.environ["EDGELOOP_AUDIT_KEY"])
        await conn.close()


def test_services_a_test_builds_connect_as_their_role(pg_roles: tuple[DbRole, ...]) -> None:
    """The harness puts each service's role in the environment: settings built with the
    session's admin DSN still connect as the service's role."""

    class MonitorLike(ServiceSettings):
        model_config = SettingsConfigDict(env_prefix="EDGELOOP_MONITOR_")

    settings = MonitorLike(database_url="postgresql://postgres@127.0.0.1:5432/db")
    role = _role(pg_roles, "monitor")
    assert settings.database_dsn() == with_credentials(
        settings.database_url, role.user, role.password
    )
    assert settings.audit_key is not None


async def test_the_bootstrap_installs_each_services_own_token_from_its_hash(
    roles_db: str, pg_roles: tuple[DbRole, ...]
) -> None:
    """Each calling service gets ``service:<name>`` with its least role, from the hashes
    file ``make keys`` writes (the bootstrap never sees a token); every API then knows the
    caller by that name. A revoked one stays revoked at the next bootstrap (every start
    runs one) until the service is given a new token."""
    tokens = {name: secrets.token_urlsafe(24) for name in SERVICE_ROLES}
    hashes = service_token_hashes(ServiceToken.of(n, t) for n, t in tokens.items())
    assert not [t for t in tokens.values() if t in hashes]
    installed = tokens_from_env({"EDGELOOP_SERVICE_TOKEN_HASHES": f"# make keys\n{hashes}"})
    await bootstrap(roles_db, pg_roles, installed)
    pool = await create_pool(roles_db, "public")
    api = SimpleNamespace(state=SimpleNamespace(tokens=frozenset(), pool=lambda: pool))

    async def caller(token: str) -> tuple[str, str]:
        who = await authenticate(api, f"Bearer {token}")
        return who.name, who.role

    try:
        rows = await pool.fetch(
            "SELECT name, role, hash, created_by FROM auth.tokens WHERE name LIKE 'service:%'"
        )
        assert {r["name"]: r["role"] for r in rows} == {
            "service:validator": "viewer",
            "service:deployer": "service",
            "service:monitor": "viewer",
            "service:fleet": "operator",
        }
        assert {r["hash"] for r in rows} == {token_hash(t) for t in tokens.values()}
        assert {r["created_by"] for r in rows} == {"bootstrap"}
        assert await caller(tokens["deployer"]) == ("service:deployer", "service")
        assert await caller(tokens["validator"]) == ("service:validator", "viewer")

        await pool.execute(
            "UPDATE auth.tokens SET revoked_at = now() WHERE name = 'service:validator'"
        )
        await bootstrap(roles_db, pg_roles, installed)
        with pytest.raises(Unauthorized, match="'service:validator' was revoked"):
            await caller(tokens["validator"])
        fresh = secrets.token_urlsafe(24)
        await bootstrap(roles_db, pg_roles, [ServiceToken.of("validator", fresh)])
        assert await caller(fresh) == ("service:validator", "viewer")
        with pytest.raises(Unauthorized, match="invalid API token"):
            await caller(tokens["validator"])

        # a person's token cannot take a service's name
        async with pool.acquire() as conn, conn.transaction():
            with pytest.raises(TokenError, match="'service:'"):
                await issue_token(
                    conn,
                    name="service:deployer",
                    role="admin",
                    actor="token:test",
                    expires_in=None,
                    service="registry",
                )
    finally:
        await pool.close()


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("deployer", "line 1 .* not '<service> <sha256>'"),
        ("builder " + "0" * 64, "line 1 .* no service 'builder' calls the APIs"),
        ("\nmonitor abc", "line 2 .* not a hex SHA-256"),
    ],
)
def test_a_bad_line_of_token_hashes_is_refused(text: str, why: str) -> None:
    with pytest.raises(TokenError, match=why):
        tokens_from_env({"EDGELOOP_SERVICE_TOKEN_HASHES": text})
