"""Compatibility shims between pinned third-party versions. Each says why it exists.

nats-py's ``PullSubscription.fetch`` raises a bare ``asyncio.TimeoutError`` when its
deadline has passed before the lingering request is sent (``_fetch_n``), while FastStream's
pull loop catches only ``nats.errors.TimeoutError``. The bare one escapes, FastStream's
task supervisor restarts the consume task after a pause, and a consumer stalls for
seconds under steady traffic (measured here: 5,000 events took 31 s instead of 5 s).
The shim turns the bare timeout into ``nats.errors.TimeoutError`` (its subclass), which
every caller already handles.
"""

from __future__ import annotations

import functools
from typing import Any

import nats.errors
from nats.js.client import JetStreamContext

_applied = False


def apply() -> None:
    """Install the shims (idempotent)."""
    global _applied
    if _applied:
        return
    original = JetStreamContext.PullSubscription.fetch

    @functools.wraps(original)
    async def fetch(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await original(self, *args, **kwargs)
        except nats.errors.TimeoutError:
            raise
        except TimeoutError as exc:
            raise nats.errors.TimeoutError from exc

    JetStreamContext.PullSubscription.fetch = fetch  # type: ignore[method-assign]
    _applied = True
