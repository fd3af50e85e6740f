"""Every ``edgeloop`` command prints something, so every one takes ``--json`` (scripts
read that, people the text)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import typer
import typer.main

from edgeloop.cli.main import app


def _commands(group: Any, ctx: typer.Context, path: str = "") -> Iterator[tuple[str, Any]]:
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if hasattr(command, "list_commands"):  # a group (typer carries its own click)
            yield from _commands(command, ctx, f"{path}{name} ")
        else:
            yield f"{path}{name}", command


def test_every_command_takes_json() -> None:
    root = typer.main.get_command(app)
    commands = dict(_commands(root, typer.Context(root)))
    assert len(commands) > 40, sorted(commands)
    without = [
        path
        for path, command in commands.items()
        if not any("--json" in getattr(p, "opts", ()) for p in command.params)
    ]
    assert without == [], f"commands without --json: {without}"
