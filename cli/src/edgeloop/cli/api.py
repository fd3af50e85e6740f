"""HTTP clients of the platform's APIs, shared by every command group.

Each API is found the same way: an environment variable, else the URL ``make up``
recorded in ``stack.json``, else the default port; the bearer token is
``EDGELOOP_API_TOKEN`` or the one ``make up`` wrote to the state directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import httpx
import typer

from edgeloop.contracts.names import InvalidName, check_model, check_version
from edgeloop.contracts.parsing import parse_pairs
from edgeloop.contracts.stackfile import load_stack_json, state_dir


@dataclass(frozen=True)
class Api:
    """Where one service's HTTP API is."""

    name: str
    env_url: str
    stack_key: str
    default: str

    def url(self) -> str:
        """The base URL."""
        return os.environ.get(self.env_url) or load_stack_json().get(self.stack_key, self.default)

    def client(self) -> httpx.Client:
        """An authenticated client (exits with a hint when no token is set)."""
        token = os.environ.get("EDGELOOP_API_TOKEN", "") or _token_from_state()
        if not token:
            typer.secho(
                "set EDGELOOP_API_TOKEN to an API token (`make up` writes one to "
                ".edgeloop/api-token)",
                err=True,
                fg="red",
            )
            raise typer.Exit(2)
        return httpx.Client(
            base_url=self.url(), headers={"Authorization": f"Bearer {token}"}, timeout=120
        )

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        """The JSON answer; a clear message and exit 1 on an error or no connection."""
        try:
            with self.client() as client:
                return check(client.request(method, url, **kwargs))
        except httpx.TransportError as exc:
            typer.secho(
                f"the {self.name} API ({self.url()}) is not reachable: {exc}", err=True, fg="red"
            )
            raise typer.Exit(1) from exc


REGISTRY = Api("registry", "EDGELOOP_REGISTRY_API", "registry_api", "http://127.0.0.1:18100")
GATEWAY = Api("gateway", "EDGELOOP_GATEWAY_API", "gateway_api", "http://127.0.0.1:18200")


def _token_from_state() -> str:
    """The token `make up` generated, when this machine runs the stack."""
    path = state_dir() / "api-token"
    return path.read_text().strip() if path.exists() else ""


def check(resp: httpx.Response) -> Any:
    """The response's JSON, or the API's message and exit 1."""
    if resp.status_code >= 400:
        try:
            detail = resp.json().get("detail", resp.text)
        except ValueError:
            detail = resp.text
        typer.secho(f"error ({resp.status_code}): {detail}", err=True, fg="red")
        raise typer.Exit(1)
    return resp.json()


#: The ``--json`` option every command that prints has: the document (as the API gave it,
#: or what the command did) as JSON for scripts, instead of the text for people.
JsonOption = Annotated[bool, typer.Option("--json", help="print the JSON document instead of text")]


def echo_json(doc: Any) -> None:
    """``doc`` as indented JSON on stdout (what ``--json`` prints)."""
    typer.echo(json.dumps(doc, indent=1, default=str))


def valid(check: Callable[[str], str], value: str) -> str:
    """``value`` if it follows its rule (``edgeloop.contracts.names``); else the rule
    and exit 2, before anything is sent."""
    try:
        return check(value)
    except InvalidName as exc:
        typer.secho(f"error: {exc}", err=True, fg="red")
        raise typer.Exit(2) from None


def version_ref(ref: str) -> tuple[str, str]:
    """``NAME@VERSION`` → (name, version); exit 2 with a hint when either is missing or
    breaks its rule."""
    name, _, version = ref.partition("@")
    if not name or not version:
        typer.secho(f"give NAME@VERSION, not {ref!r}", err=True, fg="red")
        raise typer.Exit(2)
    return valid(check_model, name), valid(check_version, version)


def pairs(values: list[str] | None, what: str) -> dict[str, str]:
    """``k=v`` options → dict (exit 2 on a malformed one)."""
    try:
        return parse_pairs(values or [], what)
    except ValueError as exc:
        typer.secho(str(exc), err=True, fg="red")
        raise typer.Exit(2) from exc


DEPLOYER = Api("deployer", "EDGELOOP_DEPLOYER_API", "deployer_api", "http://127.0.0.1:18300")


def when(value: Any) -> str:
    """An ISO timestamp as ``YYYY-MM-DD HH:MM:SS`` ("-" when absent)."""
    return str(value)[:19].replace("T", " ") if value else "-"


MONITOR = Api("monitor", "EDGELOOP_MONITOR_API", "monitor_api", "http://127.0.0.1:18400")
NOTIFIER = Api("notifier", "EDGELOOP_NOTIFIER_API", "notifier_api", "http://127.0.0.1:18600")
#: The trace query API (no token: make up's collector, or Jaeger): only its ``url()``.
TRACES = Api("traces", "EDGELOOP_TRACES_API", "traces_api", "http://127.0.0.1:18700")
