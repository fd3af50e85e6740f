"""Crash safety end to end: the whole loop (`make demo` against `make up`) while every
service is SIGKILLed once at a random moment and restarted by `make up`'s supervisor.
The loop completes; every LIFECYCLE event is unique by event id; every effect — build,
validation, wave, alarm, retrain request — exists exactly once."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.up_harness import assert_each_effect_once, running_up, stack_of, start_demo

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

KILLED = ("registry", "builder", "validator", "deployer", "monitor", "gateway")


def _killer(state: Path, rng: random.Random, stop: threading.Event, log: list[str]) -> None:
    """Each service once, in a random order, at random moments 6 to 45 s into the story."""
    started = time.monotonic()
    order = list(KILLED)
    rng.shuffle(order)
    moments = sorted(rng.uniform(6, 45) for _ in order)
    for name, at in zip(order, moments, strict=True):
        while time.monotonic() - started < at:
            if stop.wait(0.1):
                return
        pid = stack_of(state)["services"][name]["pid"]
        os.kill(pid, signal.SIGKILL)
        log.append(f"{time.monotonic() - started:5.1f} s: SIGKILL {name} (pid {pid})")


def test_the_loop_survives_every_service_killed_once(tmp_path: Path) -> None:
    seed = int(os.environ.get("EDGELOOP_CRASH_SEED", time.time()))
    rng = random.Random(seed)
    stop = threading.Event()
    kills: list[str] = []
    with running_up(
        tmp_path, EDGELOOP_MONITOR_WINDOW_SECONDS="3", EDGELOOP_MONITOR_GRACE_SECONDS="1"
    ) as state:
        out = tmp_path / "demo.json"
        killer = threading.Thread(target=_killer, args=(state, rng, stop, kills))
        demo = start_demo(
            state, out, tmp_path / "demo.out",
            "--devices", "20", "--bake", "4", "--timeout", "180",
        )  # fmt: skip
        try:
            killer.start()
            code = demo.wait(600)
        finally:
            stop.set()
        killer.join(60)
        told = f"seed {seed}; kills: {kills}\n" + (tmp_path / "demo.out").read_text()[-4000:]
        assert code == 0, told
        assert len(kills) == len(KILLED), told
        stack = stack_of(state)
        for name in KILLED:
            assert stack["services"][name]["restarts"] >= 1, (name, told)
        assert_each_effect_once(stack, json.loads(out.read_text())["model"], told)
