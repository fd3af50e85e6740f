"""Where ``make up`` keeps its state, and the ``stack.json`` it writes for other processes
(the ``edgeloop`` CLI reads it) — a file contract between processes, kept here so a
reader needs nothing heavier than the contracts."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def state_dir() -> Path:
    """``$EDGELOOP_STATE_DIR`` or ``.edgeloop`` in the current directory."""
    return Path(os.environ.get("EDGELOOP_STATE_DIR", ".edgeloop")).resolve()


def load_stack_json(path: Path | None = None) -> dict[str, Any]:
    """What ``make up`` wrote about the running stack ({} when nothing runs).

    Args:
        path: the file; default ``stack.json`` in :func:`state_dir`.
    """
    path = path or state_dir() / "stack.json"
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}
