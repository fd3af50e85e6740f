"""``edgeloop demo``: the whole loop against the stack ``make up`` runs (the story itself
is ``examples/demo.py`` in the edgeloop checkout, which has the scikit-learn trainer)."""

from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Annotated

import typer


def _story() -> ModuleType | None:
    """``examples.demo``: importable as it is, or from the checkout the command runs in
    (an installed ``edgeloop`` script does not have the current directory on its path)."""
    with contextlib.suppress(ImportError):
        return importlib.import_module("examples.demo")
    for root in [Path.cwd(), *Path.cwd().parents]:
        if (root / "examples" / "demo.py").is_file():
            sys.path.insert(0, str(root))
            return importlib.import_module("examples.demo")
    return None


def demo(
    devices: Annotated[int, typer.Option(help="simulated devices")] = 50,
    bake: Annotated[float, typer.Option(help="seconds each wave is watched")] = 15.0,
    timeout: Annotated[float, typer.Option(help="seconds per step at most")] = 120.0,
    json_out: Annotated[Path | None, typer.Option("--json", help="write timings here")] = None,
) -> None:
    """Register → build → validate → canary → drift → alarm → retrain → v2 promoted."""
    story = _story()
    if story is None:
        typer.secho(
            "the demo needs the edgeloop checkout (examples/): run `make demo` there",
            err=True,
            fg="red",
        )
        raise typer.Exit(2)
    argv = ["--devices", str(devices), "--bake", str(bake), "--timeout", str(timeout)]
    if json_out:
        argv += ["--json", str(json_out)]
    story.main(argv)
