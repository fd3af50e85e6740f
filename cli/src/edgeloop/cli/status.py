"""``edgeloop status``: is every part of the platform healthy?"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Annotated

import typer

from edgeloop.cli.config import load_endpoints
from edgeloop.cli.health import Check, run_checks

HELP = (
    "Check NATS (JetStream), PostgreSQL, the OCI registry and every service of the stack."
    "\n\n"
    "Endpoints come from .edgeloop/stack.json (written by `make up`; its directory is "
    "$EDGELOOP_STATE_DIR when set) and from EDGELOOP_NATS_URL, EDGELOOP_DATABASE_URL and "
    "EDGELOOP_OCI_REGISTRY_URL, which override the file."
    "\n\n"
    "Exit status: 0 when every part is healthy, 1 otherwise."
)
"""``edgeloop status --help`` (one string: typer keeps a docstring's line breaks)."""

HEADER = ("COMPONENT", "ENDPOINT", "STATUS", "DETAIL")


def render_table(checks: Sequence[Check]) -> str:
    """One line per check under a header: component, endpoint, status, detail."""
    rows = [(c.component, c.endpoint, "ok" if c.healthy else "FAIL", c.detail) for c in checks]
    widths = [max(len(row[i]) for row in [HEADER, *rows]) for i in range(3)]
    header = [cell.ljust(w) for cell, w in zip(HEADER, widths, strict=False)]
    lines = ["  ".join([*header, HEADER[3]])]
    for check, (component, endpoint, mark, detail) in zip(checks, rows, strict=True):
        # pad before colouring: escape codes would break the alignment
        mark = typer.style(mark.ljust(widths[2]), fg="green" if check.healthy else "red")
        lines.append(f"{component.ljust(widths[0])}  {endpoint.ljust(widths[1])}  {mark}  {detail}")
    return "\n".join(lines)


def status(
    json_output: Annotated[
        bool, typer.Option("--json", help="Print a JSON report instead of a table.")
    ] = False,
) -> None:
    """Print the health of every part of the stack; exit 0 only when all are healthy.

    Raises:
        typer.Exit: always, with code 0 (all healthy) or 1.
    """
    endpoints = load_endpoints()
    checks = asyncio.run(run_checks(endpoints))
    healthy = all(c.healthy for c in checks)
    if json_output:
        report = {
            "healthy": healthy,
            "stack_file": str(endpoints.stack_file),
            "checks": [c.as_dict() for c in checks],
        }
        typer.echo(json.dumps(report, indent=2))
    else:
        typer.echo(render_table(checks))
        failed = sum(not c.healthy for c in checks)
        typer.echo(
            f"\nall {len(checks)} healthy" if healthy else f"\n{failed} of {len(checks)} unhealthy"
        )
    raise typer.Exit(0 if healthy else 1)
