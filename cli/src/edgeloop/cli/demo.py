"""``edgeloop demo``: the whole loop against the stack ``make up`` runs (the story itself
is ``examples/demo.py`` in the edgeloop checkout, which has the scikit-learn trainer)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Annotated

import typer


def demo(
    devices: Annotated[int, typer.Option(help="simulated devices")] = 50,
    bake: Annotated[float, typer.Option(help="seconds each wave is watched")] = 15.0,
    timeout: Annotated[float, typer.Option(help="seconds per step at most")] = 120.0,
    json_out: Annotated[Path | None, typer.Option("--json", help="write timings here")] = None,
) -> None:
    """Register → build → validate → canary → drift → alarm → retrain → v2 promoted."""
    try:
        story = importlib.import_module("examples.demo")
    except ImportError:
        typer.secho(
            "the demo needs the edgeloop checkout (examples/): run `make demo` there",
            err=True,
            fg="red",
        )
        raise typer.Exit(2) from None
    argv = ["--devices", str(devices), "--bake", str(bake), "--timeout", str(timeout)]
    if json_out:
        argv += ["--json", str(json_out)]
    sys.argv = ["edgeloop demo", *argv]
    story.main()
