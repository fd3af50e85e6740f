"""Shadow overhead on the device (``make bench ARGS="--only shadow --runs 3"``).

One real agent (``edgeloop.edge.agent.Agent``, no gateway: inference needs none) runs its
own ``infer_once`` — the champion's inference, its telemetry, and the challenger's share —
on batches of 16 rows of the iris reference, timed per call: alternately without a
challenger and with one at the sampled share (the issue's default, 0.2) and the default
budget (0.5 of the champion's time), in the same run. Reported per run: p50 and p99 of a
call in each condition; over the runs, min / median / max of each.
"""

from __future__ import annotations

import io
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgeloop.contracts.edge.v1 import edge_pb2 as pb
from edgeloop.edge.agent import Agent, AgentConfig, MemoryBuffer, Running
from edgeloop.edge.runtime import OnnxModel
from edgeloop.edge.shadow import Challenger
from edgeloop.edge.store import Installed
from edgeloop.edge.telemetry import TelemetryAggregator
from edgeloop.kit.oci.signing import generate_keypair
from tests.modelzoo import classifier

BATCH = 16


class Rows:
    """The iris reference rows, in a random order, forever."""

    feature_names = ["a", "b", "c", "d"]

    def __init__(self, X: Any, seed: int) -> None:
        self.X = np.asarray(X, dtype=np.float32)
        self.rng = np.random.default_rng(seed)

    def read(self, n: int) -> Any:
        return self.X[self.rng.integers(0, len(self.X), n)]


def _agent(root: Path, X: Any) -> Agent:
    _, public = generate_keypair()
    (root / "signing.pub").write_bytes(public)
    config = AgentConfig(
        device_id="bench",
        gateway="127.0.0.1:1",
        ca_cert=root / "ca.crt",
        cert=root / "device.crt",
        key=root / "device.key",
        trusted_keys=[root / "signing.pub"],
        state_dir=root / "state",
        infer_batch=BATCH,
    )
    return Agent(config, buffer=MemoryBuffer(), source=Rows(X, 1), seed=1)


def _installed(version: str) -> Installed:
    return Installed("iris", version, "sha256:" + "0" * 64, "sha256:" + "1" * 64, "/nowhere")


def _aggregator() -> TelemetryAggregator:
    return TelemetryAggregator(feature_names=Rows.feature_names, seed=1, max_samples=0)


def _timed(agent: Agent, calls: int, seen: dict[str, int]) -> list[float]:
    """Per-call milliseconds of ``infer_once``; the window is closed every 200 calls, as
    the agent's telemetry window would (not timed: it is no inference)."""
    out = []
    for i in range(calls):
        started = time.perf_counter()
        agent.infer_once()
        out.append((time.perf_counter() - started) * 1000)
        if i % 200 == 199:
            if agent.challenger is not None:
                for key in ("compared", "sampled_out", "skipped_budget"):
                    seen[key] += getattr(agent.challenger.tally, key)
            agent.flush_telemetry()
    return out


def _q(values: list[float], q: float) -> float:
    return float(np.quantile(values, q))


def run(runs: int = 3, calls: int = 3000, sample: float = 0.2) -> dict[str, Any]:
    """``runs`` runs of ``calls`` timed calls in each condition."""
    champion = classifier("iris")
    challenger = classifier("iris", seed=1)
    X = np.load(io.BytesIO(champion.reference))["X"]
    per_run = []
    with tempfile.TemporaryDirectory(prefix="edgeloop-bench-shadow-") as tmp:
        agent = _agent(Path(tmp), X)
        agent.running = Running(_installed("1"), OnnxModel(champion.onnx), _aggregator(), [])
        shadow = Challenger(
            desired=pb.DesiredState(manifest_digest="sha256:" + "2" * 64, rollout_id="bench"),
            policy=pb.ShadowPolicy(sample=sample, max_overhead=0.5),
            installed=_installed("2"),
            model=OnnxModel(challenger.onnx),
            aggregator=_aggregator(),
            labels=[],
            rng=random.Random(2),
        )
        _timed(agent, 300, {})  # warm-up
        for _ in range(runs):
            seen = dict.fromkeys(("compared", "sampled_out", "skipped_budget"), 0)
            agent.challenger = None
            without = _timed(agent, calls, seen)
            agent.challenger = shadow
            with_ = _timed(agent, calls, seen)
            per_run.append(
                {
                    "without_p50_ms": _q(without, 0.5),
                    "without_p99_ms": _q(without, 0.99),
                    "with_p50_ms": _q(with_, 0.5),
                    "with_p99_ms": _q(with_, 0.99),
                    "compared_share": seen["compared"]
                    / max(1, seen["compared"] + seen["sampled_out"] + seen["skipped_budget"]),
                    "skipped_budget": seen["skipped_budget"],
                    "overhead": shadow.tally.overhead,
                }
            )
    keys = ["without_p50_ms", "without_p99_ms", "with_p50_ms", "with_p99_ms"]
    spread = {
        k: {
            "min": min(r[k] for r in per_run),
            "median": statistics.median(r[k] for r in per_run),
            "max": max(r[k] for r in per_run),
        }
        for k in keys
    }
    return {
        "rows_per_call": BATCH,
        "calls_per_condition": calls,
        "sample": sample,
        "runs": per_run,
        "spread": spread,
    }
