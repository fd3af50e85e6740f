"""``python -m edgeloop.kit.bootstrap``: declare the platform's NATS topology once.

The streams and KV buckets (``edgeloop.kit.bus.default_topology``, on
``EDGELOOP_NATS_REPLICAS`` nodes, with the DLQ limits of ``EDGELOOP_DLQ_*``) are created
or brought up to date by this one step, connected as the ``bootstrap`` user
(``EDGELOOP_BOOTSTRAP_NATS_USER`` / ``_NATS_PASSWORD``, or a secret file), whose only
rights are exactly that. Services, connected as their own users, may look at the
topology and wait for it; none may change it. ``make up``, Compose (``bus-init``) and the
test harness run it before the services start.
"""

from __future__ import annotations

import asyncio
import logging

import nats
from pydantic_settings import SettingsConfigDict

from edgeloop.contracts.access import inbox_prefix
from edgeloop.kit.bus import declare_topology
from edgeloop.kit.settings import ServiceSettings

log = logging.getLogger(__name__)


class BootstrapSettings(ServiceSettings):
    """Where NATS is, and the bootstrap user's credentials."""

    model_config = SettingsConfigDict(env_prefix="EDGELOOP_BOOTSTRAP_", extra="ignore")


async def bootstrap(
    servers: str, user: str | None = None, password: str | None = None, *, replicas: int = 1
) -> None:
    """Declare every stream and bucket on the NATS at ``servers`` (comma-separated)."""
    options: dict[str, object] = {"connect_timeout": 5, "max_reconnect_attempts": 30}
    if user:
        options |= {"user": user, "password": password or "", "inbox_prefix": inbox_prefix(user)}
    nc = await nats.connect([u.strip() for u in servers.split(",") if u.strip()], **options)
    try:
        await declare_topology(nc.jetstream(), replicas=replicas)
    finally:
        await nc.close()


def main() -> None:
    """Entry point: declare, then exit 0 (non-zero with the reason on failure)."""
    settings = BootstrapSettings()
    logging.basicConfig(level=settings.log_level.upper())
    password = settings.nats_password.get_secret_value() if settings.nats_password else None
    asyncio.run(
        bootstrap(settings.nats_url, settings.nats_user, password, replicas=settings.nats_replicas)
    )
    log.info("NATS topology declared on %s", settings.nats_url)


if __name__ == "__main__":
    main()
