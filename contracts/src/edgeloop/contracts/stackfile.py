"""Where ``make up`` keeps its state, and the ``stack.json`` it writes for other processes
(the ``edgeloop`` CLI reads it) — a file contract between processes, kept here so a
reader needs nothing heavier than the contracts."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

_NATS_SCHEMES = frozenset({"nats", "tls", "ws", "wss"})


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


def with_credentials(url: str, user: str, password: str | None = None) -> str:
    """``url`` with ``user`` (and ``password``) in place of any credentials it had."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    login = quote(user, safe="")
    if password is not None:
        login += ":" + quote(password, safe="")
    return urlunsplit(parts._replace(netloc=f"{login}@{host}"))


def redact(url: str) -> str:
    """``url`` fit to print: a password, or a NATS token (``nats://TOKEN@host``), becomes
    ``***``."""
    try:
        parts = urlsplit(url)
        token = bool(parts.username) and parts.scheme in _NATS_SCHEMES
        if parts.password is None and not token:
            return url
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        user = f"{parts.username}:***" if parts.password is not None else "***"
        return urlunsplit(parts._replace(netloc=f"{user}@{host}"))
    except ValueError:  # unparsable: show no part of it that might be a secret
        return url.split("@")[-1]
