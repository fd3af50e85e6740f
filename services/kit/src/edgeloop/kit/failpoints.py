"""Fail points: named places where a test can make the process fail on purpose.

``EDGELOOP_FAILPOINTS=relay.after_publish,consumer.after_commit`` makes the process
SIGKILL itself when it reaches one of those places, so crash-safety tests hit the exact
window they are about (published but not marked sent; committed but not acked).
``name=raise`` (or ``name=raise:N``, the first N times only) raises
:class:`FailpointError` there instead (a ``ConnectionError``, as a dropped connection
would), ``name=bug[:N]`` a :class:`FailpointBug` (an unexpected error), so a test proves
the path that handles a failed ack, nak, dead-letter publish or KV write. Tests in the
same process use :func:`arm` / :func:`disarm`. Unset, a fail point costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "EDGELOOP_FAILPOINTS"

#: name → (remaining raises, -1: always; the exception class), or None to SIGKILL
_active: dict[str, tuple[int, type[Exception]] | None] = {}


class FailpointError(ConnectionError):
    """The failure a ``raise`` fail point injects (what a dropped connection raises)."""


class FailpointBug(RuntimeError):
    """The failure a ``bug`` fail point injects (an unexpected error, not an outage)."""


_KINDS: dict[str, type[Exception]] = {"raise": FailpointError, "bug": FailpointBug}


def _parse(spec: str) -> tuple[str, tuple[int, type[Exception]] | None]:
    name, _, mode = spec.partition("=")
    if not mode:
        return name.strip(), None
    kind, _, count = mode.partition(":")
    if kind.strip() not in _KINDS:
        raise ValueError(f"{ENV}: unknown fail point mode {mode!r} (raise[:N] or bug[:N])")
    return name.strip(), (int(count) if count else -1, _KINDS[kind.strip()])


def load() -> None:
    """(Re)read the active fail points from the environment."""
    _active.clear()
    for part in os.environ.get(ENV, "").split(","):
        if part.strip():
            name, mode = _parse(part)
            _active[name] = mode


def arm(name: str, times: int = -1, *, bug: bool = False) -> None:
    """Raise at ``name`` the next ``times`` times (-1: until disarmed): a
    :class:`FailpointError`, or with ``bug`` a :class:`FailpointBug`."""
    _active[name] = (times, FailpointBug if bug else FailpointError)


def disarm(name: str) -> None:
    """Stop failing at ``name``."""
    _active.pop(name, None)


def hit(name: str) -> None:
    """Fail here, now, if ``name`` is active: SIGKILL, or raise :class:`FailpointError`."""
    if name not in _active:
        return
    mode = _active[name]
    if mode is None:
        os.kill(os.getpid(), signal.SIGKILL)
        return
    remaining, kind = mode
    if remaining == 0:
        return
    if remaining > 0:
        _active[name] = (remaining - 1, kind)
    raise kind(f"fail point {name}")


load()
