"""asyncpg pool and plain-SQL migrations, one PostgreSQL schema per service."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from edgeloop.contracts.stackfile import redact

log = logging.getLogger(__name__)

#: A connection as handlers see it: plain, or borrowed from a pool.
Conn = asyncpg.Connection | PoolConnectionProxy

_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

#: Errors that mean "PostgreSQL is (momentarily) not there": retry, don't crash.
TRANSIENT_DB_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.ConnectionFailureError,
    ConnectionError,
    TimeoutError,
)


def check_schema(schema: str) -> str:
    """Refuse a schema name that is not a plain identifier (it is put into SQL text)."""
    if not _SCHEMA_RE.match(schema):
        raise ValueError(f"invalid schema name {schema!r}: use [a-z_][a-z0-9_]*")
    return schema


async def create_pool(
    dsn: str,
    schema: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    connect_timeout: float = 60.0,
) -> asyncpg.Pool:
    """Create a pool whose connections use ``schema`` first on their search path.

    Waits (with backoff) up to ``connect_timeout`` for PostgreSQL to accept connections,
    so services can start before the database is up.
    """
    check_schema(schema)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + connect_timeout
    delay = 0.2
    while True:
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                server_settings={"search_path": f"{schema},public", "application_name": schema},
                command_timeout=60,
                reset=_keep_session,
            )
            assert pool is not None
            return pool
        except TRANSIENT_DB_ERRORS as exc:
            if loop.time() >= deadline:
                raise ConnectionError(
                    f"PostgreSQL at {redact(dsn)} is not reachable: {exc}"
                ) from exc
            log.warning("waiting for PostgreSQL at %s: %s", redact(dsn), exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Skip asyncpg's per-release reset query (RESET ALL, UNLISTEN *, …).

    It costs a round trip on every release, and the kit keeps no session state on pooled
    connections: transaction-scoped advisory locks only, no SET, and the relay removes
    its LISTEN before it gives its connection back.
    """


def _kit_migrations(folder: str = "sql") -> list[tuple[str, str]]:
    files = resources.files("edgeloop.kit").joinpath(folder)
    return sorted(
        (f"kit/{f.name}", f.read_text()) for f in files.iterdir() if f.name.endswith(".sql")
    )


def shared_migrations() -> list[tuple[str, str]]:
    """The kit's migrations of the platform's shared schemas (``audit``, ``auth``): applied
    once per database, recorded in ``kit.schema_migrations``."""
    return _kit_migrations("sql/shared")


def read_migrations(directory: Path | None) -> list[tuple[str, str]]:
    """The ``*.sql`` files of ``directory`` in name order, as (name, sql)."""
    if directory is None:
        return []
    return [(p.name, p.read_text()) for p in sorted(directory.glob("*.sql"))]


async def _applied(conn: Conn, table: str) -> dict[str, str]:
    rows = await conn.fetch(f"SELECT name, checksum FROM {table}")
    return {r["name"]: r["checksum"] for r in rows}


def _pending(
    migrations: Sequence[tuple[str, str]], done: dict[str, str], where: str
) -> list[tuple[str, str, str]]:
    """(name, sql, checksum) of the migrations not applied yet; an applied one whose text
    changed is refused (migrations are append-only)."""
    pending = []
    for name, sql in migrations:
        checksum = hashlib.sha256(sql.encode()).hexdigest()
        if name not in done:
            pending.append((name, sql, checksum))
        elif done[name] != checksum:
            raise RuntimeError(
                f"migration {name} of {where} changed after it was applied; "
                "add a new migration file instead of editing an applied one"
            )
    return pending


async def migrate_shared(conn: Conn) -> list[str]:
    """Apply the shared migrations not yet applied to this database; their names.

    Needs the rights of the database's owner (the bootstrap's admin DSN, or a superuser
    service as before roles existed) only when something is pending: a service role finds
    everything applied and changes nothing.

    Raises:
        RuntimeError: something is pending and this connection may not apply it.
    """
    table = "kit.schema_migrations"
    migrations = shared_migrations()
    exists = await conn.fetchval("SELECT to_regclass($1)", table) is not None
    if exists and not _pending(migrations, await _applied(conn, table), "the shared schemas"):
        return []
    applied: list[str] = []
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('edgeloop:shared-schemas'))")
            await conn.execute("CREATE SCHEMA IF NOT EXISTS kit")
            await conn.execute(
                f"""CREATE TABLE IF NOT EXISTS {table} (
                        name text PRIMARY KEY,
                        checksum text NOT NULL,
                        applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            for name, sql, checksum in _pending(
                migrations, await _applied(conn, table), "the shared schemas"
            ):
                await conn.execute(sql)
                await conn.execute(
                    f"INSERT INTO {table} (name, checksum) VALUES ($1, $2)", name, checksum
                )
                applied.append(name)
                log.info("applied shared migration %s", name)
    except asyncpg.exceptions.InsufficientPrivilegeError as exc:
        user = await conn.fetchval("SELECT current_user")
        raise RuntimeError(
            f"the shared schemas (audit, auth) need migrating and {user!r} may not do it: "
            "run the bootstrap with the admin DSN first (python -m edgeloop.kit.dbroles; "
            f"`make up` and Compose's db-init do): {exc}"
        ) from exc
    return applied


async def migrate(
    pool: asyncpg.Pool, schema: str, migrations: Sequence[tuple[str, str]] = ()
) -> list[str]:
    """Apply the shared migrations (:func:`migrate_shared`), create ``schema`` if missing,
    and apply the kit's and the service's migrations not yet applied to it.

    Idempotent and safe with replicas starting at once (a transaction-scoped advisory
    lock serialises them). An applied migration whose text changed is refused: migrations
    are append-only. A schema another role owns (the service's own role, given it by the
    bootstrap) is migrated as that role, so its objects stay the role's even when a
    superuser migrates. Returns the names applied now.
    """
    check_schema(schema)
    applied_now: list[str] = []
    all_migrations = [*_kit_migrations(), *migrations]
    async with pool.acquire() as conn:
        applied_now += await migrate_shared(conn)
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"migrate:{schema}")
            owner = await conn.fetchval(
                "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = $1", schema
            )
            if owner is None:  # a service role has no right to create schemas: it has its own
                await conn.execute(f"CREATE SCHEMA {schema}")
            elif await conn.fetchval(
                "SELECT $1 <> current_user AND pg_has_role($1, 'MEMBER')", owner
            ):
                await conn.execute(f"SET LOCAL ROLE {owner}")
            await conn.execute(
                f"""CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
                        name text PRIMARY KEY,
                        checksum text NOT NULL,
                        applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            done = await _applied(conn, f"{schema}.schema_migrations")
            for name, sql, checksum in _pending(all_migrations, done, f"schema {schema}"):
                await conn.execute(sql.replace("{schema}", schema))
                await conn.execute(
                    f"INSERT INTO {schema}.schema_migrations (name, checksum) VALUES ($1, $2)",
                    name,
                    checksum,
                )
                applied_now.append(name)
                log.info("applied migration %s to schema %s", name, schema)
    return applied_now
