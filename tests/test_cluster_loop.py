"""The whole loop on the scale-out path: `make up` with a 3-node NATS cluster (streams
and KV with 3 replicas) and two replicas of every service; `make demo` runs while the
NATS node leading the desired-state KV is SIGKILLed as the first rollout's first wave
starts, and PostgreSQL is SIGKILLed as the retraining request is raised (the trainer
reads the samples and registers v2 meanwhile). `make up` restarts both; the loop
completes and every effect exists exactly once. Part of `make chaos`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy

from edgeloop.contracts import subjects as s
from edgeloop.devstack.testing import stream_messages
from tests.up_harness import assert_each_effect_once, running_up, stack_of, start_demo

pytestmark = [pytest.mark.slow, pytest.mark.chaos, pytest.mark.timeout(900)]


async def _inject(state: Path, stop: threading.Event, log: list[str]) -> None:
    """Kill the desired-state KV's leader at the first wave, PostgreSQL at the first
    retraining request (each once)."""
    stack = stack_of(state)
    nc = await nats.connect(stack["nats_url"], max_reconnect_attempts=-1)
    try:
        js = nc.jetstream()
        sub = await js.subscribe(
            ">",
            stream=s.STREAM_LIFECYCLE,
            ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW),
        )
        todo = {s.ROLLOUT_WAVE_STARTED, s.RETRAIN_REQUESTED}
        while todo and not stop.is_set():
            try:
                msg = await sub.next_msg(timeout=1)
            except TimeoutError:
                continue
            if msg.subject not in todo:
                continue
            todo.discard(msg.subject)
            infra = stack_of(state)["infrastructure"]
            if msg.subject == s.ROLLOUT_WAVE_STARTED:
                info = await js.stream_info(f"KV_{s.KV_DESIRED}")
                cluster = info.cluster
                victim = cluster.leader if cluster and cluster.leader else "edgeloop-n1"
            else:
                victim = "postgres"
            os.kill(infra[victim]["pid"], signal.SIGKILL)
            log.append(f"{msg.subject}: SIGKILL {victim} (pid {infra[victim]['pid']})")
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


def test_the_loop_on_a_cluster_with_a_node_and_postgres_killed(tmp_path: Path) -> None:
    stop = threading.Event()
    kills: list[str] = []
    with running_up(
        tmp_path,
        EDGELOOP_NATS_CLUSTER="3",
        EDGELOOP_SERVICE_REPLICAS="2",
        EDGELOOP_MONITOR_WINDOW_SECONDS="3",
        EDGELOOP_MONITOR_GRACE_SECONDS="1",
    ) as state:
        out = tmp_path / "demo.json"
        injector = threading.Thread(target=asyncio.run, args=(_inject(state, stop, kills),))
        injector.start()
        demo = start_demo(
            state, out, tmp_path / "demo.out",
            "--devices", "20", "--bake", "4", "--timeout", "240",
        )  # fmt: skip
        try:
            code = demo.wait(800)
        finally:
            stop.set()
            injector.join(30)
        told = f"kills: {kills}\n" + (tmp_path / "demo.out").read_text()[-4000:]
        assert code == 0, told
        assert len(kills) == 2, told
        stack = stack_of(state)
        for name, entry in stack["infrastructure"].items():
            if any(name in k for k in kills):
                assert entry["restarts"] >= 1, (name, entry, told)
                assert entry["state"] == "running", (name, entry, told)
        assert_each_effect_once(stack, json.loads(out.read_text())["model"], told)
        dead = asyncio.run(_dead_letters(stack))
        assert dead == [], told


async def _dead_letters(stack: dict[str, Any]) -> list[dict[str, str]]:
    nc = await nats.connect(stack["nats_url"])
    try:
        msgs = await stream_messages(nc.jetstream(), s.STREAM_DLQ, ">")
        return [dict(m.headers or {}) for m in msgs]
    finally:
        await nc.close()
