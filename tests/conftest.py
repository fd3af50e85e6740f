"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser

from edgeloop.devstack.servers import NatsServer, Postgres
from tests.browser import chromium
from tests.deploy_harness import DeployStack, deploy_stack
from tests.edge_harness import EdgeStack, edge_stack


@pytest.fixture
async def edge(
    nats_url: str, pg_dsn: str, registry_url: str, tmp_path: Path
) -> AsyncIterator[EdgeStack]:
    """A gateway service with its PKI, on the session's NATS, PostgreSQL and registry."""
    async with edge_stack(nats_url, pg_dsn, registry_url, tmp_path / "edge") as stack:
        yield stack


@pytest.fixture
async def private_dsn(postgres: Postgres, unique: str) -> str:
    """A database of this test's own on the session's PostgreSQL."""
    return await asyncio.to_thread(postgres.create_database, f"t_{unique}")


@pytest.fixture
async def deploy(
    nats_private: NatsServer, private_dsn: str, registry_url: str, tmp_path: Path, unique: str
) -> AsyncIterator[DeployStack]:
    """Registry, gateway, deployer process and agents on private NATS and database."""
    async with deploy_stack(nats_private.url, private_dsn, registry_url, tmp_path, unique) as st:
        yield st


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Headless Chromium (skipped where no Chromium is installed)."""
    async with chromium() as launched:
        yield launched
