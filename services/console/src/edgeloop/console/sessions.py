"""Sign-in sessions and their CSRF tokens.

A session is a random id in an ``HttpOnly``, ``SameSite=Strict`` cookie; the person's API
token stays in this process, never in the browser. Each session has its own CSRF token,
which every form carries and every POST must give back. Sessions live in memory: a
restart of the console signs everyone out and changes nothing else.
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass, field

from edgeloop.kit.api import CAPABILITIES

#: The cookie that names the session.
SESSION_COOKIE = "edgeloop_console"
#: The cookie the sign-in form's CSRF token is bound to (before there is a session).
SIGNIN_COOKIE = "edgeloop_console_signin"


@dataclass
class Session:
    """One signed-in person."""

    token: str = field(repr=False)
    """Their API token: what the console sends to the APIs for them."""
    name: str
    """The token's name (who the services record in audit records)."""
    role: str
    """The token's role, as the registry answered at sign-in."""
    expires: float
    """When the session ends (``time.monotonic()``)."""
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    """The CSRF token of this session's forms."""

    def may(self, capability: str) -> bool:
        """Whether the role has ``capability`` (to hide what it cannot use; the
        services check again)."""
        return self.role in CAPABILITIES[capability]

    def csrf_ok(self, given: str | None) -> bool:
        """Whether ``given`` is this session's CSRF token."""
        return bool(given) and hmac.compare_digest(str(given).encode(), self.csrf.encode())


class Sessions:
    """The signed-in sessions of this process, by id."""

    def __init__(self, lifetime_seconds: float) -> None:
        self.lifetime = lifetime_seconds
        self._by_id: dict[str, Session] = {}

    def open(self, token: str, name: str, role: str) -> tuple[str, Session]:
        """A new session: its id (the cookie's value) and the session."""
        self._expire()
        sid = secrets.token_urlsafe(32)
        session = Session(token, name, role, time.monotonic() + self.lifetime)
        self._by_id[sid] = session
        return sid, session

    def get(self, sid: str | None) -> Session | None:
        """The live session named ``sid``, if any."""
        if not sid:
            return None
        session = self._by_id.get(sid)
        if session is None or session.expires <= time.monotonic():
            self._by_id.pop(sid, None)
            return None
        return session

    def close(self, sid: str | None) -> None:
        """End the session (sign-out)."""
        if sid:
            self._by_id.pop(sid, None)

    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [k for k, s in self._by_id.items() if s.expires <= now]:
            del self._by_id[sid]
