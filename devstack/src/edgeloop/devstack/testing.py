"""Async helpers for tests against the real servers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from edgeloop.contracts.events import Event

#: an ephemeral consumer a crashed test leaves behind goes after this many seconds
_INACTIVE_THRESHOLD = 30.0
_BATCH = 256


async def eventually(
    check: Callable[[], Awaitable[Any]], *, within: float = 20, what: str = "condition"
) -> Any:
    """Poll ``check`` until it returns something truthy; its value.

    Raises:
        AssertionError: still falsy after ``within`` seconds (with the last value).
    """
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {within}s waiting for {what}; last value {last!r}")


async def api_up(client: httpx.AsyncClient) -> bool:
    """Whether the HTTP API behind ``client`` answers (its OpenAPI page)."""
    try:
        return (await client.get("/docs")).status_code == 200
    except httpx.TransportError:
        return False


def _split(js_or_nc: JetStreamContext | Client) -> tuple[JetStreamContext, Client]:
    if isinstance(js_or_nc, JetStreamContext):
        # nats-py keeps a context's connection only privately
        return js_or_nc, js_or_nc._nc
    return js_or_nc.jetstream(), js_or_nc


async def _ephemeral(
    js: JetStreamContext, stream: str, subject_filter: str
) -> JetStreamContext.PullSubscription:
    """A pull consumer over everything stored for ``subject_filter``, no acks needed."""
    return await js.pull_subscribe(
        subject_filter,
        stream=stream,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=_INACTIVE_THRESHOLD,
        ),
    )


async def _discard(
    js: JetStreamContext, stream: str, sub: JetStreamContext.PullSubscription
) -> None:
    with contextlib.suppress(Exception):  # best effort: inactive_threshold removes it anyway
        name = (await sub.consumer_info()).name
        await sub.unsubscribe()
        await js.delete_consumer(stream, name)


async def stream_messages(
    js_or_nc: JetStreamContext | Client, stream: str, subject_filter: str
) -> list[Msg]:
    """Every message stored in ``stream`` right now that matches ``subject_filter``.

    In stream order, read through an ephemeral pull consumer that is deleted afterwards;
    for assertions such as "exactly one message with this id". Wildcards are allowed.
    """
    js, _ = _split(js_or_nc)
    sub = await _ephemeral(js, stream, subject_filter)
    try:
        # what matched when the consumer was created: later messages are not "current"
        total = int((await sub.consumer_info()).num_pending or 0)
        msgs: list[Msg] = []
        while len(msgs) < total:
            msgs.extend(await sub.fetch(min(total - len(msgs), _BATCH), timeout=5))
        return msgs
    finally:
        await _discard(js, stream, sub)


async def wait_for_message(
    js_or_nc: JetStreamContext | Client,
    subject: str,
    # a parameter, not asyncio.timeout(): it becomes the pull request's server-side expiry
    timeout: float = 10,  # noqa: ASYNC109
    *,
    stream: str | None = None,
) -> Msg:
    """The first message on ``subject``: already stored, or the next to come.

    On a subject a JetStream stream captures (``stream``, or the one found for the
    subject), the stream is read from its start by an ephemeral consumer. On any other
    subject this waits for the next message published on core NATS.

    Raises:
        TimeoutError: no message within ``timeout`` seconds; the message names the subject.
    """
    js, nc = _split(js_or_nc)
    if stream is None:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            stream = await js.find_stream_name_by_subject(subject)
    if stream is None:
        core = await nc.subscribe(subject)
        try:
            return await core.next_msg(timeout=timeout)
        except TimeoutError as exc:
            raise TimeoutError(
                f"no message on {subject!r} within {timeout}s (no stream captures it; "
                "waited on core NATS)"
            ) from exc
        finally:
            await core.unsubscribe()
    sub = await _ephemeral(js, stream, subject)
    try:
        (msg,) = await sub.fetch(1, timeout=timeout)
        return msg
    except TimeoutError as exc:  # nats.errors.TimeoutError is a subclass
        raise TimeoutError(
            f"no message on {subject!r} in stream {stream} within {timeout}s"
        ) from exc
    finally:
        await _discard(js, stream, sub)


async def publish_event(js: JetStreamContext, event: Event, subject: str | None = None) -> None:
    """Publish ``event`` as its service's outbox relay (or the gateway) would."""
    await js.publish(
        subject or event.subject, event.to_json(), headers={"Nats-Msg-Id": str(event.event_id)}
    )


def up_environment(state_dir: Path) -> dict[str, str]:
    """Environment for running ``make up`` (``python -m edgeloop.devstack.up``) in a test:
    its own state directory and free ports, and no external servers."""
    from edgeloop.devstack.nats_auth import SERVICE_ENV_NAMES
    from edgeloop.devstack.servers import free_port, free_port_range
    from edgeloop.devstack.up import SERVICES
    from edgeloop.kit.dbroles import ENV_NAMES as DATABASE_ENV_NAMES

    env = {
        **os.environ,
        "EDGELOOP_STATE_DIR": str(state_dir),
        "EDGELOOP_NATS_PORT": str(free_port()),
        "EDGELOOP_NATS_MONITOR_PORT": str(free_port()),
        "EDGELOOP_PG_PORT": str(free_port()),
        "EDGELOOP_OCI_REGISTRY_PORT": str(free_port()),
        "EDGELOOP_REGISTRY_API_PORT": str(free_port()),
        "EDGELOOP_GATEWAY_API_PORT": str(free_port()),
        "EDGELOOP_GATEWAY_GRPC_PORT": str(free_port()),
        "EDGELOOP_DEPLOYER_API_PORT": str(free_port()),
        "EDGELOOP_MONITOR_API_PORT": str(free_port()),
        "EDGELOOP_NOTIFIER_API_PORT": str(free_port()),
        "EDGELOOP_CONSOLE_PORT": str(free_port()),
        # the services' health ports count up from it (room for a second replica each)
        "EDGELOOP_FIRST_HTTP_PORT": str(free_port_range(2 * len(SERVICES))),
        "EDGELOOP_TRACES_OTLP_PORT": str(free_port()),
        "EDGELOOP_PROMETHEUS_PORT": str(free_port()),
    }
    for key in (
        "EDGELOOP_NATS_URL",
        "EDGELOOP_DATABASE_URL",
        "EDGELOOP_OCI_REGISTRY_URL",
        "EDGELOOP_OTLP_ENDPOINT",
        "EDGELOOP_TRACES_API",
        "EDGELOOP_NATS_METRICS_URLS",
        # the session's own NATS users, PostgreSQL roles and audit key: `make up` gives
        # each service its own
        *SERVICE_ENV_NAMES,
        *DATABASE_ENV_NAMES,
        "EDGELOOP_AUDIT_KEY",
    ):
        env.pop(key, None)
    return env
