"""The DLQ's limits, watched: the DLQ stream keeps at most ``EDGELOOP_DLQ_MAX_BYTES``
(and ``…_MAX_AGE_SECONDS``), dropping its oldest dead letters beyond that. The registry
looks at the stream's head every ``dlq_check_seconds``: every dead letter below it that
did not leave through an acknowledged replay (which ``edgeloop dlq replay`` records here
before it deletes one) was dropped, and is counted (``edgeloop_dlq_dropped_total``) and
logged as a warning. The stream's size is exported too."""

from __future__ import annotations

import logging
from collections.abc import Callable

from nats.js import JetStreamContext
from prometheus_client import Counter, Gauge

from edgeloop.contracts import subjects as s
from edgeloop.registry.store import PgStore

log = logging.getLogger(__name__)

DROPPED = Counter(
    "edgeloop_dlq_dropped",
    "Dead letters the DLQ stream's limits (max_bytes, max_age) dropped before a replay",
)
MESSAGES = Gauge("edgeloop_dlq_messages", "Dead letters in the DLQ stream")
BYTES = Gauge("edgeloop_dlq_bytes", "Bytes the DLQ stream holds")


class DlqWatch:
    """Counts the dead letters the DLQ stream dropped (one replica counts each)."""

    def __init__(self, store: PgStore, js: Callable[[], JetStreamContext]) -> None:
        self.store = store
        self.js = js

    async def check(self) -> int:
        """Look at the DLQ stream once; how many dead letters it dropped since last time."""
        info = await self.js().stream_info(s.STREAM_DLQ)
        state = info.state
        MESSAGES.set(state.messages)
        BYTES.set(state.bytes)
        # the lowest id still to come or kept (an empty stream reports first_seq 0 until
        # its first message)
        head = state.first_seq if state.messages else state.last_seq + 1
        dropped, since = await self.store.account_dlq(s.STREAM_DLQ, head)
        if dropped:
            DROPPED.inc(dropped)
            log.warning(
                "the DLQ stream dropped %d dead letter(s) (ids %d to %d) that nobody replayed: "
                "its limits are max_bytes %s, max_age %.0f s; it holds %d (%d bytes)",
                dropped,
                since,
                head - 1,
                info.config.max_bytes,
                info.config.max_age or 0,
                state.messages,
                state.bytes,
            )
        return dropped
