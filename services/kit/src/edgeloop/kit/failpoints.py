"""Fail points: named places where a test can make the process die on purpose.

``EDGELOOP_FAILPOINTS=relay.after_publish,consumer.after_commit`` makes the process
SIGKILL itself when it reaches one of those places, so crash-safety tests hit the exact
window they are about (published but not marked sent; committed but not acked). Unset,
a fail point costs one set lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "EDGELOOP_FAILPOINTS"

_active: frozenset[str] = frozenset()


def load() -> None:
    """(Re)read the active fail points from the environment."""
    global _active
    _active = frozenset(p.strip() for p in os.environ.get(ENV, "").split(",") if p.strip())


def hit(name: str) -> None:
    """Die here, now, without cleanup, if ``name`` is active."""
    if name in _active:
        os.kill(os.getpid(), signal.SIGKILL)


load()
