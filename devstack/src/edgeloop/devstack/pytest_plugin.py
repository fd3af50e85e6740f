"""Session fixtures every test in the repository can use (registered as a pytest11 plugin).

The servers are real and private to the test session: their own ports and directories,
started on first use and stopped at the end of the session. PostgreSQL is the server in
``DATABASE_URL`` when that is set and reachable (a fresh database per session, dropped at
the end), else an embedded one. The fixtures are synchronous (they start processes), so
they work under pytest-asyncio with any loop scope.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeloop.devstack.servers import NatsServer, OciRegistry, Postgres


@pytest.fixture(scope="session")
def stack_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory for the session's servers (their data and logs)."""
    return tmp_path_factory.mktemp("edgeloop-stack")


@pytest.fixture(scope="session")
def nats_server(stack_dir: Path) -> Iterator[NatsServer]:
    """nats-server with JetStream (the pinned wheel), ``sync_interval: always``."""
    server = NatsServer(stack_dir / "nats").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nats_url(nats_server: NatsServer) -> str:
    """``nats://127.0.0.1:PORT`` of the session's server."""
    return nats_server.url


@pytest.fixture(scope="session")
def postgres(stack_dir: Path) -> Iterator[Postgres]:
    """PostgreSQL: external from ``DATABASE_URL`` when reachable, else embedded."""
    server = Postgres.from_env(stack_dir / "pg").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pg_dsn(postgres: Postgres) -> Iterator[str]:
    """DSN of a database created for this test session."""
    name = f"edgeloop_test_{uuid.uuid4().hex[:10]}"
    yield postgres.create_database(name)
    if not postgres.can_restart:
        # an external server outlives the session: leave nothing behind on it
        try:
            postgres.drop_database(name)
        except Exception as exc:  # a courtesy; the tests themselves have passed or failed
            warnings.warn(f"could not drop test database {name}: {exc}", stacklevel=1)


@pytest.fixture(scope="session")
def oci_registry(stack_dir: Path) -> Iterator[OciRegistry]:
    """Debian's docker-registry (Distribution v2) on a free port."""
    server = OciRegistry(stack_dir / "registry").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def registry_url(oci_registry: OciRegistry) -> str:
    """``http://127.0.0.1:PORT`` of the session's OCI registry."""
    return oci_registry.url


@pytest.fixture
def unique() -> str:
    """A short random hex token for subjects, schemas and ids private to one test."""
    return uuid.uuid4().hex[:10]
