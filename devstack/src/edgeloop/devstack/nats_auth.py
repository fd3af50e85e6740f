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
from urllib.parse import quote, urlsplit, urlunsplit

import bcrypt

from edgeloop.contracts.access import SERVICES, nats_permissions

ADMIN = "admin"
#: bcrypt cost: the server checks a password once per connection
_BCRYPT_ROUNDS = 10


@dataclass(frozen=True)
class NatsUser:
    """A user of the server; ``permissions`` None means every right."""

    name: str
    password: str = field(repr=False)
    permissions: Mapping[str, Any] | None = None
    password_hash: str = field(default="", repr=False, compare=False)

    def hashed(self) -> NatsUser:
        """This user with the bcrypt hash of its password computed."""
        if self.password_hash:
            return self
        digest = bcrypt.hashpw(
            self.password.encode(), bcrypt.gensalt(rounds=_BCRYPT_ROUNDS, prefix=b"2a")
        )
        return NatsUser(self.name, self.password, self.permissions, digest.decode())


@dataclass(frozen=True)
class NatsAuth:
    """The users of a server, and who an unauthenticated connection is (if anyone).

    ``anonymous``: connections without credentials act as this user (the test harness
    lets its own clients in as the admin); None refuses them. The server can only match
    that user's password in the clear (it compares its stored password with itself), so
    it is the one password the configuration holds unhashed.
    """

    users: tuple[NatsUser, ...]
    anonymous: str | None = None

    @classmethod
    def platform(
        cls, password: Callable[[str], str] | None = None, *, anonymous: str | None = None
    ) -> NatsAuth:
        """A user per platform service and the admin; ``password(name)`` gives each one's
        password (default: a fresh random one)."""
        pick = password or (lambda _name: secrets.token_urlsafe(24))
        users = [
            NatsUser(name, pick(name), nats_permissions(access))
            for name, access in SERVICES.items()
        ]
        users.append(NatsUser(ADMIN, pick(ADMIN)))
        return cls(tuple(u.hashed() for u in users), anonymous)

    def user(self, name: str) -> NatsUser:
        """The user called ``name``."""
        for user in self.users:
            if user.name == name:
                return user
        raise KeyError(f"no NATS user {name!r}")

    def service_env(self, name: str) -> dict[str, str]:
        """The settings that make service ``name`` connect as its user."""
        user = self.user(name)
        prefix = f"EDGELOOP_{name.upper()}_NATS"
        return {f"{prefix}_USER": user.name, f"{prefix}_PASSWORD": user.password}

    def every_service_env(self) -> dict[str, str]:
        """:meth:`service_env` of every platform service."""
        env: dict[str, str] = {}
        for name in SERVICES:
            env |= self.service_env(name)
        return env

    def url(self, url: str, name: str = ADMIN) -> str:
        """``url`` with ``name``'s credentials in it (for tools that take one URL)."""
        user = self.user(name)
        parts = urlsplit(url)
        netloc = f"{quote(user.name, safe='')}:{quote(user.password, safe='')}@{parts.netloc}"
        return urlunsplit(parts._replace(netloc=netloc))

    def config(self) -> str:
        """The server configuration's ``authorization`` block (and ``no_auth_user``)."""
        entries = []
        for user in self.users:
            stored = user.password if user.name == self.anonymous else user.hashed().password_hash
            entry: dict[str, Any] = {"user": user.name, "password": stored}
            if user.permissions is not None:
                entry["permissions"] = user.permissions
            entries.append(entry)
        # JSON is valid NATS configuration; quoted strings are taken as they are ($JS…)
        text = f"authorization {{\n  users: {json.dumps(entries, indent=2)}\n}}\n"
        if self.anonymous is not None:
            text += f"no_auth_user: {json.dumps(self.anonymous)}\n"
        return text


#: Every service's settings names, for clearing an environment of them.
SERVICE_ENV_NAMES: tuple[str, ...] = tuple(
    f"EDGELOOP_{name.upper()}_NATS_{what}" for name in SERVICES for what in ("USER", "PASSWORD")
)
