"""Migrations against a real PostgreSQL: idempotent, append-only, safe with replicas."""

from __future__ import annotations

import asyncio
from importlib import resources

import pytest

from edgeloop.contracts.stackfile import redact
from edgeloop.kit.db import check_schema, create_pool, migrate


async def test_migrations_apply_once_and_refuse_edits(pg_dsn: str, unique: str) -> None:
    schema = f"m_{unique}"
    pool = await create_pool(pg_dsn, schema)
    try:
        first = [("0001_t.sql", "CREATE TABLE {schema}.t (x int)")]
        applied = await migrate(pool, schema, first)
        assert "0001_t.sql" in applied
        assert "kit/0001_outbox_inbox.sql" in applied
        assert await migrate(pool, schema, first) == []  # idempotent
        # Unqualified names resolve to the service's schema (search_path).
        await pool.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(RuntimeError, match="changed after it was applied"):
            await migrate(pool, schema, [("0001_t.sql", "CREATE TABLE {schema}.t (y int)")])
    finally:
        await pool.close()


async def test_replicas_migrating_at_once_apply_each_migration_once(
    pg_dsn: str, unique: str
) -> None:
    schema = f"r_{unique}"
    pools = [await create_pool(pg_dsn, schema) for _ in range(3)]
    try:
        migrations = [("0001_t.sql", "CREATE TABLE {schema}.t (x int)")]
        results = await asyncio.gather(*(migrate(p, schema, migrations) for p in pools))
        sql = resources.files("edgeloop.kit").joinpath("sql").iterdir()
        kit = len([f for f in sql if f.name.endswith(".sql")])
        assert sorted(len(r) for r in results) == [0, 0, kit + 1]
    finally:
        for p in pools:
            await p.close()


def test_schema_names_are_checked() -> None:
    assert check_schema("builder") == "builder"
    with pytest.raises(ValueError, match="invalid schema name"):
        check_schema("x; DROP TABLE y")


def test_redact_hides_the_password() -> None:
    assert redact("postgresql://u:hunter2@h:5432/db") == "postgresql://u:***@h:5432/db"


async def test_unreachable_database_is_a_clear_error() -> None:
    with pytest.raises(ConnectionError, match="not reachable"):
        await create_pool("postgresql://u@127.0.0.1:1/db", "x", connect_timeout=0.5)
