"""Where the platform's parts are, for every command group.

``make up`` writes ``$EDGELOOP_STATE_DIR/stack.json`` (default ``.edgeloop/stack.json``)::

    {"nats_url": ..., "database_url": ..., "registry_url": ...,
     "infrastructure": {"postgres": {"pid": N, "state": "running", "restarts": 0,
                                     "last_exit": null}, ...},
     "services": {"registry": {"health_url": "http://127.0.0.1:PORT/healthz", "pid": N,
                               "state": "running", "restarts": 0, ...}}}

Environment variables override the file, so the CLI also points at a stack it did not
start (docker compose, a remote deployment).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from edgeloop.contracts.stackfile import load_stack_json, state_dir

ENV_NATS_URL = "EDGELOOP_NATS_URL"
ENV_DATABASE_URL = "EDGELOOP_DATABASE_URL"
ENV_OCI_REGISTRY_URL = "EDGELOOP_OCI_REGISTRY_URL"
#: the variable that points the CLI away from each server ``make up`` runs
_SERVER_ENV = {
    "nats": ENV_NATS_URL,
    "postgres": ENV_DATABASE_URL,
    "oci-registry": ENV_OCI_REGISTRY_URL,
}


@dataclass(frozen=True)
class ServiceEndpoint:
    """A service's health endpoints, as ``make up`` recorded them."""

    name: str
    health_url: str
    """``/healthz``: the process is alive ("" when stack.json gives none)."""
    ready_url: str
    """``/readyz``: its dependencies answer ("" when stack.json gives none)."""
    pid: int | None = None


@dataclass(frozen=True)
class Supervision:
    """What ``make up``'s supervisor recorded about a process it keeps running."""

    restarts: int
    """How often it was started again after it died."""
    last_exit: int | None = None
    """The exit status of its latest death (negative: the signal that killed it)."""
    state: str = "running"
    """``running``, or ``restarting`` while it waits out its back-off."""


@dataclass(frozen=True)
class Endpoints:
    """The endpoints of one stack; ``None`` where neither environment nor file names one."""

    nats_url: str | None
    database_url: str | None
    registry_url: str | None
    services: tuple[ServiceEndpoint, ...]
    stack_file: Path
    """The ``stack.json`` consulted (it may not exist)."""
    supervision: Mapping[str, Supervision] = field(default_factory=dict)
    """By component: what ``make up`` recorded about the servers and services it runs
    (a server whose URL the environment overrides is not the one it runs)."""


def ready_url_for(health_url: str) -> str:
    """``…/healthz`` → ``…/readyz`` (the kit's health server serves both)."""
    parts = urlsplit(health_url)
    base, _, last = parts.path.rstrip("/").rpartition("/")
    path = f"{base}/readyz" if last == "healthz" else f"{parts.path.rstrip('/')}/readyz"
    return urlunsplit(parts._replace(path=path, query=""))


def _service(name: str, entry: Any) -> ServiceEndpoint:
    if not isinstance(entry, dict):
        return ServiceEndpoint(name, "", "")
    health = str(entry.get("health_url") or "")
    ready = str(entry.get("ready_url") or (ready_url_for(health) if health else ""))
    pid = entry.get("pid")
    return ServiceEndpoint(name, health, ready, pid if isinstance(pid, int) else None)


def _supervision(entry: Any) -> Supervision | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("restarts"), int):
        return None
    last_exit = entry.get("last_exit")
    return Supervision(
        entry["restarts"],
        last_exit if isinstance(last_exit, int) else None,
        str(entry.get("state") or "running"),
    )


def load_endpoints(environ: Mapping[str, str] | None = None) -> Endpoints:
    """The stack's endpoints: ``stack.json`` of the state dir, overridden by the environment.

    Args:
        environ: the environment to read (default ``os.environ``).
    """
    env = os.environ if environ is None else environ
    stack_file = Path(env.get("EDGELOOP_STATE_DIR") or state_dir()).resolve() / "stack.json"
    stack = load_stack_json(stack_file)
    services = stack.get("services")
    services = services if isinstance(services, dict) else {}
    infrastructure = stack.get("infrastructure")
    supervised = {
        name: entry
        for name, entry in (infrastructure if isinstance(infrastructure, dict) else {}).items()
        if not env.get(_SERVER_ENV.get(name, ""))
    } | services
    # an embedded server that names its health endpoints (Prometheus) is checked like a
    # service
    services = {
        name: entry
        for name, entry in supervised.items()
        if isinstance(entry, dict) and entry.get("health_url")
    } | services
    return Endpoints(
        nats_url=env.get(ENV_NATS_URL) or stack.get("nats_url") or None,
        database_url=env.get(ENV_DATABASE_URL) or stack.get("database_url") or None,
        registry_url=env.get(ENV_OCI_REGISTRY_URL) or stack.get("registry_url") or None,
        services=tuple(_service(str(name), entry) for name, entry in sorted(services.items())),
        stack_file=stack_file,
        supervision={
            str(name): record
            for name, entry in supervised.items()
            if (record := _supervision(entry)) is not None
        },
    )
