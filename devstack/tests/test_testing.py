"""The async test helpers against the session's NATS server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client

from edgeloop.devstack.testing import eventually, stream_messages, wait_for_message


@pytest.fixture
async def nc(nats_url: str, unique: str) -> AsyncIterator[Client]:
    client = await nats.connect(nats_url)
    await client.jetstream().add_stream(name=f"T{unique}", subjects=[f"t{unique}.>"])
    yield client
    await client.jetstream().delete_stream(f"T{unique}")
    await client.close()


async def test_stream_messages_reads_exactly_what_is_stored(nc: Client, unique: str) -> None:
    js = nc.jetstream()
    assert await stream_messages(nc, f"T{unique}", f"t{unique}.>") == []
    for i in range(300):  # more than one fetch batch
        await js.publish(f"t{unique}.{'a' if i % 3 else 'b'}", str(i).encode())
    everything = await stream_messages(js, f"T{unique}", f"t{unique}.>")
    assert [int(m.data) for m in everything] == list(range(300))
    only_b = await stream_messages(nc, f"T{unique}", f"t{unique}.b")
    assert len(only_b) == 100
    assert all(m.subject == f"t{unique}.b" for m in only_b)
    # the ephemeral consumers are gone
    assert (await js.stream_info(f"T{unique}")).state.consumer_count == 0


async def test_wait_for_message_returns_a_stored_or_a_later_message(
    nc: Client, unique: str
) -> None:
    js = nc.jetstream()
    await js.publish(f"t{unique}.stored", b"1")
    assert (await wait_for_message(nc, f"t{unique}.stored")).data == b"1"

    async def later() -> None:
        await asyncio.sleep(0.3)
        await js.publish(f"t{unique}.later", b"2")

    task = asyncio.create_task(later())
    msg = await wait_for_message(js, f"t{unique}.later", timeout=5)
    await task
    assert msg.data == b"2"
    assert (await js.stream_info(f"T{unique}")).state.consumer_count == 0


async def test_wait_for_message_times_out_naming_the_subject(nc: Client, unique: str) -> None:
    with pytest.raises(TimeoutError, match=f"t{unique}.nothing"):
        await wait_for_message(nc, f"t{unique}.nothing", timeout=0.5)
    with pytest.raises(TimeoutError, match=f"core{unique}"):
        await wait_for_message(nc, f"core{unique}", timeout=0.3)


async def test_wait_for_message_on_a_subject_no_stream_captures(nc: Client, unique: str) -> None:
    async def later() -> None:
        await asyncio.sleep(0.3)
        await nc.publish(f"core{unique}", b"hi")

    task = asyncio.create_task(later())
    msg = await wait_for_message(nc, f"core{unique}", timeout=5)
    await task
    assert msg.data == b"hi"


async def test_eventually_returns_the_value_or_says_what_it_waited_for() -> None:
    calls = []

    async def check() -> int:
        calls.append(1)
        return len(calls) if len(calls) >= 3 else 0

    assert await eventually(check, within=5) == 3

    async def never() -> bool:
        return False

    with pytest.raises(AssertionError, match="the impossible"):
        await eventually(never, within=0.3, what="the impossible")
