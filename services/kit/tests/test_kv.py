"""``KvMirror`` on a real JetStream KV bucket: entries, changes, and a stop that holds
even when a cancellation is lost in the client."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import nats
from nats.js.kv import KeyValue

from edgeloop.devstack.testing import eventually
from edgeloop.kit.kv import KvMirror


async def test_the_mirror_sees_entries_changes_and_deletes(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    bucket = f"t{uuid.uuid4().hex[:8]}"
    kv = await js.create_key_value(bucket=bucket)
    try:
        await kv.put("a", b"1")
        seen: dict[str, bytes | None] = {}
        mirror = KvMirror(kv, lambda key, _rev, value: seen.__setitem__(key, value), name=bucket)
        await mirror.start()
        assert seen == {"a": b"1"}
        await kv.put("b", b"2")
        await kv.delete("a")
        await eventually(lambda: _same(seen, {"a": None, "b": b"2"}), what="changes mirrored")
        await asyncio.wait_for(mirror.stop(), 10)
    finally:
        await js.delete_key_value(bucket)
        await nc.close()


async def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a == b


class _Deaf:
    """A watcher that loses the first cancellation it gets, as nats-py's ``next_msg``
    (``asyncio.wait_for`` before Python 3.12) does when a message arrives as the
    cancellation comes: the iteration goes on."""

    def __init__(self) -> None:
        self.lost = 0
        self.loaded = False

    def __aiter__(self) -> _Deaf:
        return self

    async def __anext__(self) -> None:
        if not self.loaded:  # no entries: the end of the initial values at once
            self.loaded = True
            return
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            if self.lost:
                raise
            self.lost += 1
        return


class _Bucket:
    def __init__(self) -> None:
        self.watcher = _Deaf()

    async def watchall(self) -> _Deaf:
        return self.watcher


async def test_stop_ends_the_watch_even_when_a_cancellation_is_lost() -> None:
    """Found in review: ``stop`` cancelled once and waited; a watch that lost that one
    cancellation kept the service's shutdown waiting for ever."""
    bucket = _Bucket()
    mirror = KvMirror(bucket, lambda *_: None, name="deaf")  # type: ignore[arg-type]
    await mirror.start()
    await asyncio.sleep(0)  # the watch is waiting for its next entry
    stopping = asyncio.ensure_future(mirror.stop())
    # not cancelled from outside (which would reach the watch as a second cancellation):
    # the stop has to end the watch by itself
    done, _ = await asyncio.wait({stopping}, timeout=15)
    assert done, "stop() is still waiting for the watch that lost its cancellation"
    assert bucket.watcher.lost == 1


_ = KeyValue
