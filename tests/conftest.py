"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.edge_harness import EdgeStack, edge_stack


@pytest.fixture
async def edge(
    nats_url: str, pg_dsn: str, registry_url: str, tmp_path: Path
) -> AsyncIterator[EdgeStack]:
    """A gateway service with its PKI, on the session's NATS, PostgreSQL and registry."""
    async with edge_stack(nats_url, pg_dsn, registry_url, tmp_path / "edge") as stack:
        yield stack
