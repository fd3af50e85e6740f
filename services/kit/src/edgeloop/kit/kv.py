"""Following a JetStream KV bucket: its current entries, then every change.

The gateway follows ``desired`` (to push each device its document) and the deployer
follows ``reported`` (to see devices converge); both keep what they need in memory and
are woken on each change instead of polling keys.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from nats.js.kv import KeyValue

from edgeloop.kit.supervise import cancel_and_wait

log = logging.getLogger(__name__)

#: ``on_change(key, revision, value)``; ``value`` is None when the key was deleted.
OnChange = Callable[[str, int, bytes | None], None]


class KvMirror:
    """Calls ``on_change`` for every entry of ``kv``, then for every change.

    ``loaded`` is set once the entries present at the start were delivered. A broken
    watch is re-opened after a second (entries are delivered again: ``on_change`` must
    be idempotent).
    """

    def __init__(self, kv: KeyValue, on_change: OnChange, *, name: str) -> None:
        self.kv = kv
        self.on_change = on_change
        self.name = name
        self.loaded = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start following; returns once the current entries are loaded (30 s at most)."""
        self._task = asyncio.create_task(self._run(), name=f"kv-mirror-{self.name}")
        await asyncio.wait_for(self.loaded.wait(), 30)

    async def stop(self) -> None:
        """Stop following."""
        if self._task is not None:
            # re-cancelled if a cancellation is lost (nats-py's watcher, under load)
            await cancel_and_wait([self._task])
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                watcher = await self.kv.watchall()
                async for entry in watcher:
                    if entry is None:  # the end of the initial values
                        self.loaded.set()
                        continue
                    value = entry.value if entry.operation is None and entry.value else None
                    self.on_change(entry.key, entry.revision or 0, value)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("watch of KV bucket %s failed; watching again in 1 s", self.name)
                await asyncio.sleep(1)
