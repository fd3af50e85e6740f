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


def _kit_migrations() -> list[tuple[str, str]]:
    files = resources.files("edgeloop.kit").joinpath("sql")
    return sorted(
        (f"kit/{f.name}", f.read_text()) for f in files.iterdir() if f.name.endswith(".sql")
    )


def read_migrations(directory: Path | None) -> list[tuple[str, str]]:
    """The ``*.sql`` files of ``directory`` in name order, as (name, sql)."""
    if directory is None:
        return []
    return [(p.name, p.read_text()) for p in sorted(directory.glob("*.sql"))]


async def migrate(
    pool: asyncpg.Pool, schema: str, migrations: Sequence[tuple[str, str]] = ()
) -> list[str]:
    """Create ``schema`` and apply the kit's and the service's migrations not yet applied.

    Idempotent and safe with replicas starting at once (a transaction-scoped advisory
    lock serialises them). An applied migration whose text changed is refused: migrations
    are append-only. Returns the names applied now.
    """
    check_schema(schema)
    applied_now: list[str] = []
    all_migrations = [*_kit_migrations(), *migrations]
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"migrate:{schema}")
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        await conn.execute(
            f"""CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
                    name text PRIMARY KEY,
                    checksum text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {
            r["name"]: r["checksum"]
            for r in await conn.fetch(f"SELECT name, checksum FROM {schema}.schema_migrations")
        }
        for name, sql in all_migrations:
            checksum = hashlib.sha256(sql.encode()).hexdigest()
            if name in done:
                if done[name] != checksum:
                    raise RuntimeError(
                        f"migration {name} of schema {schema} changed after it was applied; "
                        "add a new migration file instead of editing an applied one"
                    )
                continue
            await conn.execute(sql.replace("{schema}", schema))
            await conn.execute(
                f"INSERT INTO {schema}.schema_migrations (name, checksum) VALUES ($1, $2)",
                name,
                checksum,
            )
            applied_now.append(name)
            log.info("applied migration %s to schema %s", name, schema)
    return applied_now
