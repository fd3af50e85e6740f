"""Per-service NATS users: each platform service connects as itself, with only the rights
``edgeloop.contracts.access`` gives it; an admin user (the operator's tools) has all.

The server configuration holds bcrypt hashes, never a password; each service gets its
own password as ``EDGELOOP_<SERVICE>_NATS_USER`` / ``EDGELOOP_<SERVICE>_NATS_PASSWORD``
(the environment ``make up`` gives it, or a secret file under Compose).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import bcrypt

from edgeloop.contracts.access import (
    BOOTSTRAP,
    SERVICES,
    bootstrap_permissions,
    nats_permissions,
)
from edgeloop.contracts.stackfile import with_credentials

ADMIN = "admin"
#: bcrypt cost: the server checks a password once per connection
_BCRYPT_ROUNDS = 10


def _bcrypt_hash(password: str) -> str:
    """The bcrypt hash of ``password`` in the form nats-server reads (``$2a$``)."""
    salt = bcrypt.gensalt(rounds=_BCRYPT_ROUNDS, prefix=b"2a")
    return bcrypt.hashpw(password.encode(), salt).decode()


@dataclass(frozen=True)
class NatsUser:
    """A user of the server; ``permissions`` None means every right. ``stored``: the
    password as the server's configuration holds it (its bcrypt hash)."""

    name: str
    password: str = field(repr=False)
    stored: str = field(repr=False)
    permissions: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class NatsAuth:
    """The users of a server, and who an unauthenticated connection is (if anyone).

    ``anonymous``: connections without credentials act as this user (the test harness
    lets its own clients in as the admin); None refuses them. The server can only match
    that user's password in the clear (it compares its stored password with itself), so
    it is the one password the configuration holds unhashed (:meth:`platform`).
    """

    users: tuple[NatsUser, ...]
    anonymous: str | None = None

    @classmethod
    def platform(
        cls, password: Callable[[str], str] | None = None, *, anonymous: str | None = None
    ) -> NatsAuth:
        """A user per platform service, the bootstrap (it declares the topology) and the
        admin; ``password(name)`` gives each one's password (default: a fresh random
        one)."""
        pick = password or (lambda _name: secrets.token_urlsafe(24))

        def user(name: str, permissions: Mapping[str, Any] | None = None) -> NatsUser:
            secret = pick(name)
            # the server matches the anonymous user's password only in the clear
            stored = secret if name == anonymous else _bcrypt_hash(secret)
            return NatsUser(name, secret, stored, permissions)

        users = [user(name, nats_permissions(access, name)) for name, access in SERVICES.items()]
        return cls((*users, user(BOOTSTRAP, bootstrap_permissions()), user(ADMIN)), anonymous)

    def user(self, name: str) -> NatsUser:
        """The user called ``name``."""
        for user in self.users:
            if user.name == name:
                return user
        raise KeyError(f"no NATS user {name!r}")

    def bootstrap(self, servers: str, *, replicas: int = 1) -> None:
        """Declare the platform's streams and buckets on ``servers`` (comma-separated)
        as the bootstrap user, the one user allowed to; services wait for them."""
        from edgeloop.devstack.servers import run_sync
        from edgeloop.kit.bootstrap import bootstrap

        user = self.user(BOOTSTRAP)
        run_sync(bootstrap(servers, user.name, user.password, replicas=replicas))

    def service_env(self, name: str) -> dict[str, str]:
        """The settings that make service ``name`` connect as its user."""
        user = self.user(name)
        env_user, env_password = service_env_names(name)
        return {env_user: user.name, env_password: user.password}

    def every_service_env(self) -> dict[str, str]:
        """:meth:`service_env` of every platform service."""
        env: dict[str, str] = {}
        for name in SERVICES:
            env |= self.service_env(name)
        return env

    def url(self, url: str, name: str = ADMIN) -> str:
        """``url`` with ``name``'s credentials in it (for tools that take one URL)."""
        user = self.user(name)
        return with_credentials(url, user.name, user.password)

    def config(self) -> str:
        """The server configuration's ``authorization`` block (and ``no_auth_user``)."""
        entries = []
        for user in self.users:
            entry: dict[str, Any] = {"user": user.name, "password": user.stored}
            if user.permissions is not None:
                entry["permissions"] = user.permissions
            entries.append(entry)
        # JSON is valid NATS configuration; quoted strings are taken as they are ($JS…)
        text = f"authorization {{\n  users: {json.dumps(entries, indent=2)}\n}}\n"
        if self.anonymous is not None:
            text += f"no_auth_user: {json.dumps(self.anonymous)}\n"
        return text


def service_env_names(name: str) -> tuple[str, str]:
    """The settings naming service ``name``'s NATS user and password."""
    prefix = f"EDGELOOP_{name.upper()}_NATS"
    return f"{prefix}_USER", f"{prefix}_PASSWORD"


#: Every service's settings names, for clearing an environment of them.
SERVICE_ENV_NAMES: tuple[str, ...] = tuple(n for s in SERVICES for n in service_env_names(s))
