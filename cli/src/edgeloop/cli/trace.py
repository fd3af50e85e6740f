"""``edgeloop trace NAME@VERSION``: the version's trace — registration, build,
validation, rollouts with their waves, each device's activation — as a span tree.

The trace id is the one the registry recorded at registration; the spans come from a
Jaeger-shaped query API: ``make up``'s collector, or Jaeger itself
(``EDGELOOP_TRACES_API=http://127.0.0.1:16686`` with ``docker compose``).
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Annotated, Any
from urllib.parse import quote

import httpx
import typer

from edgeloop.cli.api import REGISTRY, TRACES, version_ref


def trace_id_of(name: str, version: str) -> str:
    """The trace id the registry recorded for ``name@version`` (exit 1 if none)."""
    record = REGISTRY.request(
        "GET", f"/api/v1/models/{quote(name, safe='')}/versions/{quote(version, safe='')}"
    )
    parent = record.get("trace_parent")
    if not parent:
        typer.secho(
            f"{name}@{version} has no trace (it was registered with tracing off)",
            err=True,
            fg="red",
        )
        raise typer.Exit(1)
    return str(parent.split("-")[1])


def fetch(trace_id: str) -> dict[str, Any]:
    """The trace from the query API (Jaeger's ``/api/traces/{id}`` shape)."""
    url = f"{TRACES.url().rstrip('/')}/api/traces/{trace_id}"
    try:
        resp = httpx.get(url, timeout=30)
    except httpx.TransportError as exc:
        typer.secho(f"the traces API ({TRACES.url()}) is not reachable: {exc}", err=True, fg="red")
        raise typer.Exit(1) from exc
    if resp.status_code == 404:
        return {"traceID": trace_id, "spans": [], "processes": {}}
    resp.raise_for_status()
    data = resp.json().get("data") or [{}]
    return dict(data[0]) | {"traceID": trace_id}


def render(doc: dict[str, Any]) -> str:
    """The span tree: name, service, start offset and duration, children indented."""
    spans = doc.get("spans", [])
    if not spans:
        return f"trace {doc['traceID']}: no spans yet"
    services = {pid: p["serviceName"] for pid, p in doc.get("processes", {}).items()}
    ids = {s["spanID"] for s in spans}
    children: dict[str | None, list[dict[str, Any]]] = defaultdict(list)
    for s in spans:
        parents = [r["spanID"] for r in s.get("references", []) if r.get("refType") == "CHILD_OF"]
        parent = parents[0] if parents and parents[0] in ids else None
        children[parent].append(s)
    t0 = min(s["startTime"] for s in spans)
    names = sorted({services.get(s["processID"], "?") for s in spans})
    lines = [f"trace {doc['traceID']}: {len(spans)} spans from {', '.join(names)}"]

    def walk(parent: str | None, depth: int) -> None:
        for s in sorted(children.get(parent, []), key=lambda x: x["startTime"]):
            offset = (s["startTime"] - t0) / 1000
            lines.append(
                f"{'  ' * depth}{s['operationName']}  [{services.get(s['processID'], '?')}]"
                f"  +{offset:.0f} ms  {s['duration'] / 1000:.1f} ms"
            )
            walk(s["spanID"], depth + 1)

    walk(None, 1)
    return "\n".join(lines)


def trace(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION")],
    as_json: Annotated[bool, typer.Option("--json", help="the raw trace")] = False,
) -> None:
    """The trace id of a model version and its span tree, from registration to devices."""
    name, version = version_ref(ref)
    doc = fetch(trace_id_of(name, version))
    typer.echo(json.dumps(doc, indent=1) if as_json else render(doc))
