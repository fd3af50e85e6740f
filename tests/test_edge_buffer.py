"""The agent's offline buffer against the real gateway, NATS and PostgreSQL: a large
backlog drains as a flow-controlled stream without blocking the session, survives an
agent restart midway, and unreadable files cost only themselves."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path

import pytest

from edgeloop.contracts import subjects as s
from edgeloop.contracts.edge.v1 import edge_pb2 as pb
from edgeloop.devstack.testing import eventually, stream_messages
from edgeloop.edge.agent import Agent, AgentConfig
from edgeloop.edge.buffer import DiskBuffer
from tests.edge_harness import EdgeStack, wait_state
from tests.modelzoo import classifier

pytestmark = pytest.mark.timeout(300)

BACKLOG = 20_000


def _fill(config: AgentConfig, model: str, n: int) -> list[str]:
    """``n`` small batches in the agent's disk buffer, as if it had been offline; their ids."""
    with pytest.MonkeyPatch.context() as patch:
        # hours offline, filled in seconds: what is tested is the drain, not these fsyncs
        patch.setattr(os, "fsync", lambda fd: None)
        return _append(config, model, n)


def _append(config: AgentConfig, model: str, n: int) -> list[str]:
    buffer = DiskBuffer(config.state_dir / "telemetry", max_batches=2 * n)
    start = time.time() - n * 10
    ids = []
    for i in range(n):
        batch = pb.TelemetryBatch(
            batch_id=str(uuid.uuid4()), device_id=config.device_id, model=model, version="1"
        )
        batch.window_start.FromNanoseconds(int((start + 10 * i) * 1e9))
        batch.window_end.FromNanoseconds(int((start + 10 * i + 10) * 1e9))
        batch.count = 1
        buffer.append(batch.batch_id, batch.SerializeToString())
        ids.append(batch.batch_id)
    return ids


async def _start(edge: EdgeStack, config: AgentConfig) -> Agent:
    # the agent's own disk buffer (the harness default is a memory buffer)
    return await edge.start_agent(config, buffer=None)


async def _delivered(edge: EdgeStack, model: str, device: str) -> list[str]:
    msgs = await stream_messages(edge.js, s.STREAM_TELEMETRY, s.stored_telemetry(model, device))
    return [json.loads(m.data)["event_id"] for m in msgs]


async def _drained(agent: Agent) -> bool:
    return len(agent.buffer) == 0


async def test_a_large_backlog_drains_once_while_the_session_stays_live(
    edge: EdgeStack, unique: str
) -> None:
    device = f"dev-{unique}"
    model = f"bk{unique}"
    config = await edge.enroll(device)
    config.buffer_batches = 2 * BACKLOG
    ids = _fill(config, model, BACKLOG)
    image = await edge.publish_image(model, "1", classifier("iris").onnx)
    # the gateway takes telemetry only for a version the device is desired or reported
    # to run: the backlog's version is the desired one
    await edge.set_desired(device, image.desired())

    started = time.monotonic()
    agent = await _start(edge, config)
    await eventually(lambda: _sending(agent), what="the drain under way")
    # the session is live during the drain: the desired model is fetched and activated
    # and its report reaches the platform, while the backlog is still there
    await wait_state(agent, pb.DEVICE_STATE_RUNNING, version="1", within=60)
    await eventually(lambda: _reported_running(edge, device), what="running reported")
    assert len(agent.buffer) > 0, "the backlog drained before the session was tested"
    # a live batch does not wait behind the backlog
    agent.infer_once()
    agent.flush_telemetry()
    live = agent.buffer.ids()[-1]
    await eventually(lambda: _acked(agent, live), what="the live batch acknowledged")
    assert len(agent.buffer) > 0, "the live batch waited for the backlog"

    await eventually(lambda: _drained(agent), within=240, what="the backlog drained")
    elapsed = time.monotonic() - started
    delivered = await _delivered(edge, model, device)
    assert len(delivered) == BACKLOG + 1
    assert set(delivered) == set(ids) | {live}
    assert agent.sessions == 1, "one session carried the whole drain"
    logging.getLogger(__name__).info("drained %d batches in %.1f s", BACKLOG, elapsed)


async def test_the_drain_survives_an_agent_restart_midway(edge: EdgeStack, unique: str) -> None:
    device = f"dev-{unique}"
    model = f"rs{unique}"
    config = await edge.enroll(device)
    config.buffer_batches = 2 * BACKLOG
    ids = _fill(config, model, BACKLOG)
    image = await edge.publish_image(model, "1", classifier("iris").onnx)
    await edge.set_desired(device, image.desired())  # the backlog's version

    agent = await _start(edge, config)
    await eventually(lambda: _acked_at_least(agent, BACKLOG // 4), within=120, what="a quarter")
    await edge.kill_agent(agent)
    left = len(DiskBuffer(config.state_dir / "telemetry", max_batches=2 * BACKLOG))
    assert 0 < left < BACKLOG, f"the restart was not midway ({left} left)"

    again = await _start(edge, config)
    assert len(again.buffer) == left
    await eventually(lambda: _drained(again), within=240, what="the rest drained")
    delivered = await _delivered(edge, model, device)
    assert len(delivered) == BACKLOG, "a batch went missing or was stored twice"
    assert set(delivered) == set(ids)


async def test_unreadable_buffer_files_are_set_aside_counted_and_reported(
    edge: EdgeStack, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    device = f"dev-{unique}"
    model = f"cr{unique}"
    config = await edge.enroll(device)
    ids = _fill(config, model, 10)
    directory = config.state_dir / "telemetry"
    files = sorted(directory.glob("*.pb"))
    truncated = files[3]
    whole = truncated.read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2])
    garbage = directory / f"{99:016d}-{uuid.uuid4()}.pb"
    garbage.write_bytes(b"\xff\x00 not a telemetry batch \x13\x37" * 3)
    image = await edge.publish_image(model, "1", classifier("iris").onnx)

    caplog.set_level(logging.WARNING, logger="edgeloop")
    await edge.set_desired(device, image.desired())  # the backlog's version
    agent = await _start(edge, config)
    await wait_state(agent, pb.DEVICE_STATE_RUNNING, version="1")
    await eventually(lambda: _drained(agent), what="the readable batches delivered")
    good = set(ids) - {_batch_id(truncated)}
    assert set(await _delivered(edge, model, device)) == good
    assert agent.buffer.corrupt == 2
    assert not truncated.exists()
    assert not garbage.exists()
    assert len(list((directory / "corrupt").iterdir())) == 2, "set aside for inspection"
    assert sum("unreadable" in r.getMessage() for r in caplog.records) == 2
    # reported: the next batch carries the count to the platform
    agent.infer_once()
    agent.flush_telemetry()

    async def reported() -> dict[str, object] | None:
        msgs = await stream_messages(edge.js, s.STREAM_TELEMETRY, s.stored_telemetry(model, device))
        batches = [json.loads(m.data) for m in msgs]
        return next((b for b in batches if b["corrupt_batches"]), None)

    batch = await eventually(reported, what="the count reported")
    assert batch["corrupt_batches"] == 2
    assert agent.sessions == 1, "unreadable files cost no session"


# --- helpers ------------------------------------------------------------------------------


def _batch_id(path: Path) -> str:
    return path.stem.partition("-")[2]


async def _sending(agent: Agent) -> bool:
    return agent.connected.is_set() and agent.stats["batches_acked"] > 0


async def _acked_at_least(agent: Agent, n: int) -> bool:
    return agent.stats["batches_acked"] >= n


async def _reported_running(edge: EdgeStack, device: str) -> bool:
    reported = await edge.reported(device)
    return bool(reported and reported["state"] == "running")


async def _acked(agent: Agent, batch_id: str) -> bool:
    # the gateway acknowledges a batch once JetStream stored it
    return batch_id not in agent.buffer
