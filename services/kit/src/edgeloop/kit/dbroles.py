"""PostgreSQL least privilege: a login role per service, limited to its own schema.

The bootstrap runs with the admin DSN (the database's owner or a superuser), before the
services start and again at every start (it is idempotent): ``make up`` and the test
harness call :func:`bootstrap`, Compose runs ``python -m edgeloop.kit.dbroles`` as its
``db-init`` container. It

- applies the shared migrations (schemas ``kit``, ``audit``, ``auth``: what a service's
  role may not create; :func:`edgeloop.kit.db.migrate_shared`);
- creates (or updates) one login role per service, without any attribute (no superuser,
  createdb, createrole, replication, bypassrls), with its password;
- gives each role its own schema as owner (and adopts what a superuser created in it
  before roles existed), so its migrations run as itself;
- grants on the shared tables no more than the services need: ``SELECT`` on
  ``auth.tokens`` for all (``INSERT``/``UPDATE`` for the token issuer, the registry),
  ``SELECT``/``INSERT`` on ``audit.records`` (never ``UPDATE``, ``DELETE``, ``TRUNCATE``:
  the chain's head lock is an advisory lock, its sequence numbers are computed, so
  appending needs nothing more), ``SELECT`` on ``kit.schema_migrations``;
- grants nothing on other schemas (each is its owner's only) and revokes ``CREATE`` on
  ``public`` from ``PUBLIC``;
- installs the platform services' own API tokens (``service:<name>`` with the least role
  each needs: :mod:`edgeloop.kit.tokens`) from their hashes: the bootstrap never needs a
  token itself (``EDGELOOP_SERVICE_TOKEN_HASHES``, a ``<service> <sha256>`` line each).

Services connect as their role with ``EDGELOOP_<SERVICE>_DATABASE_USER`` and
``…_DATABASE_PASSWORD`` (:class:`edgeloop.kit.settings.ServiceSettings`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from edgeloop.contracts.access import SERVICES
from edgeloop.contracts.stackfile import redact
from edgeloop.kit.db import check_schema, migrate_shared
from edgeloop.kit.tokens import ServiceToken, install_service_tokens, parse_service_token_hashes

log = logging.getLogger(__name__)

#: Services that issue and revoke API tokens (write ``auth.tokens``).
TOKEN_ISSUERS = frozenset({"registry"})
#: The role names' default prefix: ``edgeloop_registry`` …
PREFIX = "edgeloop_"
#: Where container platforms mount secret files.
SECRETS_DIR = Path("/run/secrets")

_ATTRIBUTES = "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS NOINHERIT"
_ALTER = {"S": "SEQUENCE", "v": "VIEW", "m": "MATERIALIZED VIEW", "f": "FOREIGN TABLE"}


def env_names(service: str) -> tuple[str, str]:
    """The settings naming service ``service``'s database user and password."""
    prefix = f"EDGELOOP_{service.upper()}_DATABASE"
    return f"{prefix}_USER", f"{prefix}_PASSWORD"


#: Every service's settings names, for clearing an environment of them.
ENV_NAMES: tuple[str, ...] = tuple(n for s in SERVICES for n in env_names(s))


@dataclass(frozen=True)
class DbRole:
    """A service's login role: ``user`` owns schema ``schema`` and nothing else."""

    service: str
    user: str
    password: str = field(repr=False)

    @property
    def schema(self) -> str:
        """The service's schema (its name, as ``kit.service.Service`` uses it)."""
        return check_schema(self.service.replace("-", "_"))

    def env(self) -> dict[str, str]:
        """The settings that make the service connect as this role."""
        user, password = env_names(self.service)
        return {user: self.user, password: self.password}


def platform_roles(password: Callable[[str], str], prefix: str = PREFIX) -> tuple[DbRole, ...]:
    """A role per platform service, ``password(service)`` giving each one's password."""
    return tuple(DbRole(name, f"{prefix}{name}", password(name)) for name in SERVICES)


def roles_env(roles: Iterable[DbRole]) -> dict[str, str]:
    """:meth:`DbRole.env` of every role."""
    env: dict[str, str] = {}
    for role in roles:
        env |= role.env()
    return env


async def bootstrap(
    admin_dsn: str, roles: Iterable[DbRole], tokens: Iterable[ServiceToken] = ()
) -> None:
    """Prepare the database of ``admin_dsn`` for services connecting as ``roles`` and
    calling the APIs with ``tokens`` (idempotent; see the module's docstring)."""
    roles, tokens = tuple(roles), tuple(tokens)
    conn = await asyncpg.connect(admin_dsn)
    try:
        await migrate_shared(conn)
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('edgeloop:bootstrap'))")
            await conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
            database = await conn.fetchval("SELECT quote_ident(current_database())")
            for role in roles:
                await _role(conn, role)
                user = await conn.fetchval("SELECT quote_ident($1)", role.user)
                await conn.execute(f"GRANT CONNECT ON DATABASE {database} TO {user}")
                await _own_schema(conn, role.schema, user)
                await conn.execute(f"GRANT USAGE ON SCHEMA kit, audit, auth TO {user}")
                await conn.execute(f"GRANT SELECT ON kit.schema_migrations TO {user}")
                await conn.execute(
                    f"REVOKE ALL ON audit.records, auth.tokens FROM {user}; "
                    f"GRANT SELECT, INSERT ON audit.records TO {user}; "
                    f"GRANT SELECT ON auth.tokens TO {user}"
                )
                if role.service in TOKEN_ISSUERS:
                    await conn.execute(f"GRANT INSERT, UPDATE ON auth.tokens TO {user}")
            await install_service_tokens(conn, tokens)
    finally:
        await conn.close()
    log.info(
        "database %s: roles %s; API tokens %s",
        redact(admin_dsn),
        ", ".join(r.user for r in roles) or "-",
        ", ".join(t.name for t in tokens) or "-",
    )


async def install_tokens(admin_dsn: str, tokens: Iterable[ServiceToken]) -> None:
    """Only the services' API tokens (no roles: a DSN whose user may not create them)."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        await migrate_shared(conn)
        async with conn.transaction():
            await install_service_tokens(conn, tokens)
    finally:
        await conn.close()


async def _role(conn: asyncpg.Connection, role: DbRole) -> None:
    """Create ``role`` or bring an existing one to its attributes and password (roles are
    the cluster's: another database's bootstrap may have created it)."""
    user = await conn.fetchval("SELECT quote_ident($1)", role.user)
    password = await conn.fetchval("SELECT quote_literal($1)", role.password)
    exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role.user)
    if not exists:
        try:
            async with conn.transaction():  # a savepoint: a concurrent create may win
                await conn.execute(f"CREATE ROLE {user} {_ATTRIBUTES} PASSWORD {password}")
            return
        except asyncpg.exceptions.DuplicateObjectError:
            pass
    await conn.execute(f"ALTER ROLE {user} {_ATTRIBUTES} PASSWORD {password}")


async def _own_schema(conn: asyncpg.Connection, schema: str, user: str) -> None:
    """Make ``user`` the owner of ``schema`` and of what is in it already (tables with
    their indexes, triggers and sequences; views, sequences, functions)."""
    await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema} AUTHORIZATION {user}")
    await conn.execute(f"ALTER SCHEMA {schema} OWNER TO {user}")
    relations = await conn.fetch(
        """SELECT c.oid::regclass::text AS name, c.relkind::text AS kind FROM pg_class c
           WHERE c.relnamespace = $1::text::regnamespace AND c.relkind IN ('r','p','v','m','f','S')
             AND c.relowner <> $2::text::regrole
             -- a serial's sequence goes with its table
             AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                             AND d.objid = c.oid AND d.deptype IN ('a', 'i'))""",
        schema,
        user,
    )
    for rel in relations:
        kind = _ALTER.get(rel["kind"], "TABLE")
        await conn.execute(f"ALTER {kind} {rel['name']} OWNER TO {user}")
    routines = await conn.fetch(
        "SELECT oid::regprocedure::text AS name FROM pg_proc "
        "WHERE pronamespace = $1::text::regnamespace AND proowner <> $2::text::regrole",
        schema,
        user,
    )
    for routine in routines:
        await conn.execute(f"ALTER ROUTINE {routine['name']} OWNER TO {user}")


def _setting(name: str, environ: Mapping[str, str]) -> str | None:
    """``name`` from the environment, else from its secret file (Compose, Kubernetes)."""
    if environ.get(name):
        return environ[name].strip()
    path = SECRETS_DIR / name
    return path.read_text().strip() if path.is_file() else None


def roles_from_env(environ: Mapping[str, str] = os.environ) -> list[DbRole]:
    """The roles of the services whose password is set (``EDGELOOP_<S>_DATABASE_PASSWORD``,
    or the secret file of that name); user ``EDGELOOP_<S>_DATABASE_USER`` or
    ``edgeloop_<service>``."""
    roles = []
    for service in SERVICES:
        user_var, password_var = env_names(service)
        password = _setting(password_var, environ)
        if password:
            user = _setting(user_var, environ) or f"{PREFIX}{service}"
            roles.append(DbRole(service, user, password))
    return roles


#: The setting (or secret file) of the services' token hashes the bootstrap installs.
TOKEN_HASHES = "EDGELOOP_SERVICE_TOKEN_HASHES"


def tokens_from_env(environ: Mapping[str, str] = os.environ) -> list[ServiceToken]:
    """The services' tokens in :data:`TOKEN_HASHES` (or the secret file of that name): a
    ``<service> <sha256 of its token>`` line each."""
    text = environ.get(TOKEN_HASHES)
    if text is None:
        path = SECRETS_DIR / TOKEN_HASHES
        text = path.read_text() if path.is_file() else ""
    return parse_service_token_hashes(text)


def main() -> None:
    """``python -m edgeloop.kit.dbroles``: the bootstrap, with the admin DSN in
    ``EDGELOOP_DATABASE_URL`` (or its secret file), the roles of :func:`roles_from_env`
    and the tokens of :func:`tokens_from_env`."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dsn = _setting("EDGELOOP_DATABASE_URL", os.environ)
    if not dsn:
        raise SystemExit("set EDGELOOP_DATABASE_URL to the admin DSN (or its secret file)")
    roles = roles_from_env()
    if not roles:
        raise SystemExit("no EDGELOOP_<SERVICE>_DATABASE_PASSWORD set: no role to create")
    asyncio.run(bootstrap(dsn, roles, tokens_from_env()))


if __name__ == "__main__":
    main()
