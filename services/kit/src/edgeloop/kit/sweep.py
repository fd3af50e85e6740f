"""A background step repeated at an interval (a sweep that heals what a crash left
half-done): an error is logged and the step tried again at the next tick, never ending
the loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


async def periodically(step: Callable[[], Awaitable[object]], every: float, *, what: str) -> None:
    """Run ``step`` every ``every`` seconds until cancelled."""
    while True:
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s failed; trying again in %.1f s", what, every)
        await asyncio.sleep(every)
