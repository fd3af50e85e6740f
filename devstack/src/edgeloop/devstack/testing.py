"""Async helpers for tests against the real servers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy


async def eventually(
    check: Callable[[], Awaitable[Any]], *, within: float = 20, what: str = "condition"
) -> Any:
    """Poll ``check`` until it returns something truthy; its value."""
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {within}s waiting for {what}; last value {last!r}")


async def stream_messages(js: JetStreamContext, stream: str, subject: str) -> list[Msg]:
    """Every message currently stored in ``stream`` on ``subject`` (wildcards allowed)."""
    info = await js.stream_info(stream, subjects_filter=subject)
    total = sum((info.state.subjects or {}).values())
    if total == 0:
        return []
    sub = await js.pull_subscribe(
        subject,
        stream=stream,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, inactive_threshold=30),
    )
    msgs: list[Msg] = []
    try:
        while len(msgs) < total:
            msgs.extend(await sub.fetch(total - len(msgs), timeout=5))
    finally:
        await sub.unsubscribe()
    return msgs


async def wait_for_message(nc: Client, stream: str, subject: str, *, within: float = 10) -> Msg:
    """The first message on ``subject`` in ``stream`` (stored or yet to come)."""
    js = nc.jetstream()
    sub = await js.pull_subscribe(
        subject,
        stream=stream,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, inactive_threshold=30),
    )
    try:
        msgs = await sub.fetch(1, timeout=within)
    except TimeoutError as exc:
        raise TimeoutError(f"no message on {subject} within {within}s") from exc
    finally:
        await sub.unsubscribe()
    return msgs[0]
