"""Secrets a local installation needs, generated once into the state directory
(``.edgeloop/``, mode 600): the admin API token (the operator's: the CLI's, accepted by
every API, held by no service), an API token per calling service (``service:<name>``
with the least role its calls need, :data:`edgeloop.kit.tokens.SERVICE_ROLES`), the
Ed25519 image-signing key, a NATS password and a PostgreSQL role password per service,
the audit chain's key, and for ``docker compose`` the database's admin password and URL,
the NATS server's configuration, the services' token hashes the bootstrap installs, and
the copies Compose mounts.

    python -m edgeloop.devstack.keys      # (make keys) before the first `docker compose up`

``make up`` uses the same files, so both ways of running share the same tokens and keys.
"""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

from edgeloop.contracts.access import BOOTSTRAP, SERVICES
from edgeloop.contracts.stackfile import state_dir
from edgeloop.devstack.nats_auth import NatsAuth
from edgeloop.devstack.servers import nats_config
from edgeloop.kit.dbroles import DbRole, bootstrap, install_tokens, platform_roles
from edgeloop.kit.tokens import SERVICE_ROLES, ServiceToken, service_token_hashes


def generated_secret(path: Path) -> str:
    """A generated secret kept across runs (mode 600)."""
    if path.exists():
        return path.read_text().strip()
    value = secrets.token_urlsafe(24)
    path.write_text(value + "\n")
    path.chmod(0o600)
    return value


def signing_keys(root: Path) -> tuple[str, str]:
    """The Ed25519 key the builder signs images with (generated once, mode 600)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private, public = root / "signing-key.pem", root / "signing-key.pub"
    if not private.exists():
        key = Ed25519PrivateKey.generate()
        private.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        private.chmod(0o600)
        public.write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    return private.read_text(), public.read_text()


def nats_users(root: Path) -> NatsAuth:
    """The NATS users of the platform, their passwords generated once under
    ``root/nats-users`` (a file per user, mode 600)."""
    users = root / "nats-users"
    users.mkdir(mode=0o700, parents=True, exist_ok=True)
    return NatsAuth.platform(lambda name: generated_secret(users / name))


def pg_roles(root: Path) -> tuple[DbRole, ...]:
    """The PostgreSQL role of every service, their passwords generated once under
    ``root/pg-users`` (a file per service, mode 600)."""
    users = root / "pg-users"
    users.mkdir(mode=0o700, parents=True, exist_ok=True)
    return platform_roles(lambda name: generated_secret(users / name))


def service_tokens(root: Path) -> dict[str, str]:
    """Each calling service's own API token (:data:`SERVICE_ROLES`), generated once under
    ``root/service-tokens`` (a file per service, mode 600)."""
    tokens = root / "service-tokens"
    tokens.mkdir(mode=0o700, parents=True, exist_ok=True)
    return {name: generated_secret(tokens / name) for name in SERVICE_ROLES}


def service_token_rows(root: Path) -> list[ServiceToken]:
    """What the bootstrap installs of :func:`service_tokens`: their hashes."""
    return [ServiceToken.of(name, token) for name, token in service_tokens(root).items()]


def audit_key(root: Path) -> str:
    """The audit chain's HMAC key (``root/audit-key``, mode 600): every service that
    writes audit records and the verifier hold it; the database never does."""
    return generated_secret(root / "audit-key")


def database_env(root: Path, admin_dsn: str) -> dict[str, dict[str, str]]:
    """Per service, the settings that make it connect as its own PostgreSQL role (created
    now in the database of ``admin_dsn``: the bootstrap, which also installs the services'
    API tokens, :func:`service_tokens`) and sign its audit records.

    A DSN whose user may not create roles (an external server's ordinary user) gets no
    roles: the services then use it as it is, with a warning (their tokens are installed
    all the same).
    """
    import asyncpg

    roles = pg_roles(root)
    tokens = service_token_rows(root)
    try:
        asyncio.run(bootstrap(admin_dsn, roles, tokens))
    except asyncpg.exceptions.InsufficientPrivilegeError as exc:
        print(f"  ! no PostgreSQL role per service ({exc}); services share the DSN's user")
        roles = ()
        asyncio.run(install_tokens(admin_dsn, tokens))
    key = {"EDGELOOP_AUDIT_KEY": audit_key(root)}
    return {role.service: role.env() | key for role in roles} or dict.fromkeys(SERVICES, key)


def compose_secrets(root: Path) -> list[Path]:
    """The files docker-compose.yml mounts as secrets, in ``root/compose`` (generated
    where missing). Compose bind-mounts them as they are, and the services run as an
    unprivileged user: the files are readable (0644) inside a directory only the owner
    may enter (0700), so on the host they stay private."""
    root.mkdir(parents=True, exist_ok=True)
    token = generated_secret(root / "api-token")
    private, public = signing_keys(root)
    password = generated_secret(root / "db-password")
    auth = nats_users(root)
    roles = pg_roles(root)
    out = root / "compose"
    out.mkdir(mode=0o700, exist_ok=True)
    out.chmod(0o700)
    files = {
        # the operator's (admin): only the services whose API accepts it mount it
        "api-token": token + "\n",
        "signing-key.pem": private,
        "signing-key.pub": public,
        "db-password": password + "\n",
        "database-url": f"postgresql://edgeloop:{password}@postgres:5432/edgeloop\n",
        # the NATS server's users (bcrypt hashes) and each service's own password
        "nats.conf": nats_config("0.0.0.0:4222", "0.0.0.0:8222", "/data", auth),
    }
    files |= {
        f"nats-{name}-password": auth.user(name).password + "\n" for name in (*SERVICES, BOOTSTRAP)
    }
    # each service's PostgreSQL role (created by the db-init container) and the audit key
    files |= {f"pg-{role.service}-password": role.password + "\n" for role in roles}
    files["audit-key"] = audit_key(root) + "\n"
    # each calling service's own API token (it alone mounts it) and, for db-init (the
    # bootstrap installs them in auth.tokens), their hashes only
    own = service_tokens(root)
    files |= {f"service-token-{name}": token + "\n" for name, token in own.items()}
    files["service-token-hashes"] = service_token_hashes(service_token_rows(root))
    paths = []
    for name, text in files.items():
        path = out / name
        path.write_text(text)
        path.chmod(0o644)
        paths.append(path)
    return paths


def main() -> None:
    """Entry point."""
    for path in compose_secrets(state_dir()):
        print(path)


if __name__ == "__main__":
    main()
