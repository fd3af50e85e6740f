"""What a service prints at INFO: its own story, not a library's bookkeeping."""

from __future__ import annotations

import logging
from pathlib import Path

from kit_helpers import SampleProcess, connect
from test_guarantees import SQL, Ctx, committed

from edgeloop.devstack.testing import eventually
from edgeloop.kit.bus import declare_topology
from edgeloop.kit.db import create_pool, migrate, read_migrations
from edgeloop.kit.service import QUIET_AT_INFO, configure_logging


async def test_no_task_callback_chatter_at_info(
    nats_url: str, pg_dsn: str, unique: str, tmp_path: Path
) -> None:
    nc, js = await connect(nats_url)
    await declare_topology(js)
    pool = await create_pool(pg_dsn, f"t_{unique}")
    await migrate(pool, f"t_{unique}", read_migrations(SQL))
    c = Ctx(unique, pool, js, {"EDGELOOP_NATS_URL": nats_url, "EDGELOOP_DATABASE_URL": pg_dsn})
    proc = SampleProcess(tmp_path, c.env).start(EDGELOOP_SAMPLE_LOG_LEVEL="INFO")
    try:
        await c.wait_consumer()
        event = committed("logs")
        await c.publish(event)
        await eventually(lambda: c.effects(event.event_id), what="the event handled")
    finally:
        assert proc.terminate() == 0, proc.tail()
        await pool.close()
        await nc.close()
    log = proc.log_path.read_text()
    assert " INFO " in log, log  # the service does log at INFO …
    # … but not FastStream's supervisor noting each subscriber task's end
    assert "is being executed" not in log, log


def test_httpx_requests_are_not_logged_at_info() -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure_logging("INFO")
        assert not logging.getLogger("httpx").isEnabledFor(logging.INFO)
        assert logging.getLogger("httpx").isEnabledFor(logging.WARNING)
        assert logging.getLogger("edgeloop.kit").isEnabledFor(logging.INFO)
        configure_logging("DEBUG")  # asked for everything: everything
        assert logging.getLogger("httpx").isEnabledFor(logging.DEBUG)
    finally:
        root.handlers[:], root.level = handlers, level
        for name in QUIET_AT_INFO:
            logging.getLogger(name).setLevel(logging.NOTSET)
