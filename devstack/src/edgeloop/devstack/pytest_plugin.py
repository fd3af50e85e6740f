"""Session fixtures every test in the repository can use (registered as a pytest11 plugin).

The servers are real and private to the test session: their own ports and directories,
started on first use and stopped at the end of the session. NATS servers have the
platform's users (``nats_auth``): every service a test builds connects as itself, with
only its own rights, while the tests' own clients connect without credentials as the
admin. PostgreSQL is the server in
``DATABASE_URL`` when that is set and reachable (a fresh database per session, dropped at
the end), else an embedded one; every database the session creates on it is bootstrapped
with the services' roles (``pg_roles``), and each service connects as its own role, while
``pg_dsn`` stays the admin's. The fixtures are synchronous (they start processes), so
they work under pytest-asyncio with any loop scope.
"""

from __future__ import annotations

import secrets
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
import pytest_asyncio
from nats.js import JetStreamContext

from edgeloop.devstack.nats_auth import ADMIN, NatsAuth
from edgeloop.devstack.servers import NatsCluster, NatsServer, OciRegistry, Postgres
from edgeloop.kit.dbroles import DbRole, platform_roles, roles_env


@pytest.fixture(scope="session")
def stack_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory for the session's servers (their data and logs)."""
    return tmp_path_factory.mktemp("edgeloop-stack")


@pytest.fixture(scope="session", autouse=True)
def nats_auth() -> Iterator[NatsAuth]:
    """The platform's NATS users for this session; every service's user and password are
    in the environment (``EDGELOOP_<SERVICE>_NATS_USER``/``_PASSWORD``) while it runs, so
    the settings of any service a test starts pick them up. Give it to a test's own
    ``NatsServer(..., auth=nats_auth)``."""
    auth = NatsAuth.platform(anonymous=ADMIN)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in auth.every_service_env().items():
            patch.setenv(name, value)
        yield auth


@pytest.fixture(scope="session", autouse=True)
def pg_roles() -> Iterator[tuple[DbRole, ...]]:
    """The services' PostgreSQL roles for this session (names with a prefix of the
    session's own: roles belong to the whole server); each service's user and password
    are in the environment (``EDGELOOP_<SERVICE>_DATABASE_USER``/``_PASSWORD``) while it
    runs, and the audit key (``EDGELOOP_AUDIT_KEY``). Give them to a test's own
    ``Postgres(..., roles=pg_roles)``."""
    prefix = f"el{uuid.uuid4().hex[:8]}_"
    roles = platform_roles(lambda _name: secrets.token_urlsafe(24), prefix)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in roles_env(roles).items():
            patch.setenv(name, value)
        patch.setenv("EDGELOOP_AUDIT_KEY", secrets.token_urlsafe(32))
        yield roles


@pytest.fixture(scope="session")
def nats_server(stack_dir: Path, nats_auth: NatsAuth) -> Iterator[NatsServer]:
    """nats-server with JetStream (the pinned wheel), ``sync_interval: always``, and the
    platform's users."""
    server = NatsServer(stack_dir / "nats", auth=nats_auth).start()
    nats_auth.bootstrap(server.url)
    yield server
    server.stop()


@pytest_asyncio.fixture
async def admin_js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    """JetStream on the session's server as the admin: what a test publishes as if it
    were another service (a service's own connection may publish only its events)."""
    nc = await nats.connect(nats_url)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


@pytest.fixture
def nats_private(tmp_path: Path, nats_auth: NatsAuth) -> Iterator[NatsServer]:
    """A nats-server of the test's own (the platform's streams and buckets, empty; no
    consumers), with the platform's users; for tests that restart or kill it."""
    server = NatsServer(tmp_path / "nats", auth=nats_auth).start()
    nats_auth.bootstrap(server.url)
    yield server
    server.stop()


@pytest.fixture
def postgres_private(tmp_path: Path, pg_roles: tuple[DbRole, ...]) -> Iterator[Postgres]:
    """An embedded PostgreSQL of the test's own, for tests that kill or restart it (the
    session's server is not disturbed); its databases have the services' roles."""
    server = Postgres(tmp_path / "pg", roles=pg_roles).start()
    yield server
    server.stop()


@pytest.fixture
def nats_cluster(tmp_path: Path, nats_auth: NatsAuth) -> Iterator[NatsCluster]:
    """A 3-node NATS cluster of the test's own (JetStream clustered, every node with
    ``sync_interval: always`` and the platform's users), healthy when the test starts;
    its nodes can be killed and restarted (``cluster.nodes[i].kill()`` / ``.start()``).
    Clients connect with ``cluster.urls`` (nats-py) or ``cluster.url`` (the settings)."""
    cluster = NatsCluster(tmp_path / "nats-cluster", auth=nats_auth).start()
    nats_auth.bootstrap(cluster.url, replicas=3)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def nats_url(nats_server: NatsServer) -> str:
    """``nats://127.0.0.1:PORT`` of the session's server."""
    return nats_server.url


@pytest.fixture(scope="session")
def postgres(stack_dir: Path, pg_roles: tuple[DbRole, ...]) -> Iterator[Postgres]:
    """PostgreSQL: external from ``DATABASE_URL`` when reachable, else embedded; the
    databases it creates are bootstrapped for ``pg_roles``."""
    server = Postgres.from_env(stack_dir / "pg", roles=pg_roles).start()
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
