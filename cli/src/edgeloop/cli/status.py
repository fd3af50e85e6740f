"""``edgeloop status``: is every part of the platform healthy?"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import asdict, dataclass
from typing import Annotated, Any

import httpx
import typer

from edgeloop.devstack.up import load_stack_json

TIMEOUT = 2.0


@dataclass
class Check:
    """The outcome of one health check."""

    component: str
    endpoint: str
    healthy: bool
    detail: str


def endpoints() -> dict[str, Any]:
    """Endpoints from ``.edgeloop/stack.json`` (``make up``), overridden by the environment."""
    stack = load_stack_json()
    return {
        "nats_url": os.environ.get("EDGELOOP_NATS_URL") or stack.get("nats_url"),
        "database_url": os.environ.get("EDGELOOP_DATABASE_URL") or stack.get("database_url"),
        "registry_url": os.environ.get("EDGELOOP_OCI_REGISTRY_URL") or stack.get("registry_url"),
        "services": stack.get("services", {}),
    }


def _why(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


async def check_nats(url: str) -> Check:
    """Connect and ask JetStream for the account's info."""
    import nats

    async def quiet(_: Exception) -> None:
        """nats-py reports every failed attempt; the check reports one line."""

    try:
        nc = await asyncio.wait_for(
            nats.connect(
                url,
                connect_timeout=TIMEOUT,
                max_reconnect_attempts=0,
                allow_reconnect=False,
                error_cb=quiet,
            ),
            TIMEOUT * 2,
        )
    except Exception as exc:
        return Check("nats", url, False, f"cannot connect: {_why(exc)}")
    try:
        info = await asyncio.wait_for(nc.jetstream().account_info(), TIMEOUT)
        return Check("nats", url, True, f"JetStream: {info.streams} streams")
    except Exception as exc:
        return Check("nats", url, False, f"JetStream not available: {_why(exc)}")
    finally:
        await nc.close()


async def check_postgres(dsn: str) -> Check:
    """Connect and run ``SELECT 1``."""
    import asyncpg

    from edgeloop.kit.db import redact

    try:
        conn = await asyncpg.connect(dsn, timeout=TIMEOUT)
    except Exception as exc:
        return Check("postgres", redact(dsn), False, f"cannot connect: {_why(exc)}")
    try:
        version = await conn.fetchval("SHOW server_version")
        return Check("postgres", redact(dsn), True, f"PostgreSQL {version}")
    finally:
        await conn.close()


async def check_http(component: str, url: str, ok: str) -> Check:
    """GET ``url``; 200 is healthy."""
    try:
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            resp = await client.get(url)
    except httpx.HTTPError as exc:
        return Check(component, url, False, f"not reachable: {_why(exc)}")
    if resp.status_code != 200:
        return Check(component, url, False, f"HTTP {resp.status_code}: {resp.text[:200]}")
    return Check(component, url, True, ok)


async def check_service(name: str, health_url: str) -> Check:
    """A service is healthy when ``/healthz`` and ``/readyz`` both answer 200."""
    alive = await check_http(name, health_url, "alive")
    if not alive.healthy:
        return alive
    ready = await check_http(name, health_url.replace("/healthz", "/readyz"), "ready")
    ready.endpoint = health_url
    return ready


async def run_checks(ep: dict[str, Any]) -> list[Check]:
    """Every check, concurrently."""
    pending = []
    missing = []
    for key, component, fn in (
        ("nats_url", "nats", check_nats),
        ("database_url", "postgres", check_postgres),
    ):
        if ep.get(key):
            pending.append(fn(ep[key]))
        else:
            missing.append(
                Check(
                    component,
                    "-",
                    False,
                    f"no endpoint: set EDGELOOP_{key.upper()} or run `make up`",
                )
            )
    if ep.get("registry_url"):
        pending.append(
            check_http("oci-registry", ep["registry_url"].rstrip("/") + "/v2/", "v2 API")
        )
    else:
        missing.append(
            Check(
                "oci-registry",
                "-",
                False,
                "no endpoint: set EDGELOOP_OCI_REGISTRY_URL or run `make up`",
            )
        )
    for name, svc in sorted(ep.get("services", {}).items()):
        pending.append(check_service(name, svc["health_url"]))
    return missing + list(await asyncio.gather(*pending))


def status(
    json_out: Annotated[bool, typer.Option("--json", help="machine output")] = False,
) -> None:
    """Health of NATS, PostgreSQL, the OCI registry and each service; exit 0 only when all
    are healthy."""
    checks = asyncio.run(run_checks(endpoints()))
    healthy = all(c.healthy for c in checks)
    if json_out:
        typer.echo(
            json.dumps({"healthy": healthy, "checks": [asdict(c) for c in checks]}, indent=2)
        )
    else:
        width = max((len(c.component) for c in checks), default=10) + 2
        for c in checks:
            mark = typer.style("ok  ", fg="green") if c.healthy else typer.style("FAIL", fg="red")
            typer.echo(f"{mark} {c.component:{width}} {c.endpoint:48} {c.detail}")
    raise typer.Exit(0 if healthy else 1)
