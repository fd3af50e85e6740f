"""A challenger (shadow) model beside the champion on one device.

The champion's outputs are the only ones acted on; the challenger runs on the same input
rows for a sampled share of the inference batches, within a budget: its inference time
may be at most ``max_overhead`` times the champion's (both counted since the challenger
started), and a sampled batch that would go over it is skipped and counted. Its outputs
go to telemetry as a batch of their own, marked by a ``ShadowComparison`` (agreement,
flips champion → challenger, the champion's predictions and latencies on the same rows),
which the monitor keeps apart from the champion's windows.

The challenger's image is checked exactly like a desired one (the agent's own signature,
anti-rollback and download code); it is never activated, so it does not raise the
device's anti-rollback floor.
"""

from __future__ import annotations

import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeloop.contracts.edge.v1 import edge_pb2 as pb
from edgeloop.contracts.events import LATENCY_MS_EDGES
from edgeloop.edge.runtime import OnnxModel, Prediction
from edgeloop.edge.store import Installed
from edgeloop.edge.telemetry import TelemetryAggregator

#: what a challenger that raised is recorded as having predicted (a flip from any label)
ERROR_LABEL = "<error>"


def output_labels(prediction: Prediction, names: Sequence[str], rows: int) -> list[str]:
    """One label per row: class names when the model has them, else the first output value
    (``%.3g``: a regressor's outputs agree when they agree to three digits)."""
    if prediction.labels is not None:
        labels = np.asarray(prediction.labels)
        if names and np.issubdtype(labels.dtype, np.integer):
            return [names[i] if 0 <= i < len(names) else str(i) for i in labels.tolist()]
        return [str(v) for v in labels.tolist()]
    values = np.asarray(prediction.values).reshape(rows, -1)[:, 0]
    return [f"{v:.3g}" for v in values.tolist()]


@dataclass
class Tally:
    """One telemetry window of comparisons, and the budget's running times."""

    compared: int = 0
    agreed: int = 0
    flips: Counter[tuple[str, str]] = field(default_factory=Counter)
    champion_predictions: Counter[str] = field(default_factory=Counter)
    champion_latency: npt.NDArray[np.int64] = field(
        default_factory=lambda: np.zeros(len(LATENCY_MS_EDGES) + 1, dtype=np.int64)
    )
    sampled_out: int = 0
    skipped_budget: int = 0
    champion_seconds: float = 0.0
    """Inference time of the champion since the challenger started (not per window)."""
    challenger_seconds: float = 0.0

    def compare(self, champion: Sequence[str], challenger: Sequence[str], ms: float) -> None:
        """Rows the two models both ran on; ``ms`` the champion's latency per row."""
        self.compared += len(champion)
        for a, b in zip(champion, challenger, strict=True):
            if a == b:
                self.agreed += 1
            else:
                self.flips[(a, b)] += 1
        self.champion_predictions.update(champion)
        edges = np.asarray(LATENCY_MS_EDGES)
        self.champion_latency[int(np.searchsorted(edges, ms, side="left"))] += len(champion)

    @property
    def overhead(self) -> float:
        """Challenger time over champion time so far (the budget's measure)."""
        return self.challenger_seconds / self.champion_seconds if self.champion_seconds else 0.0

    def pending(self) -> bool:
        """Something to report in the next batch."""
        return bool(self.compared or self.sampled_out or self.skipped_budget)

    def take(self, rollout_id: str, champion: Installed) -> pb.ShadowComparison:
        """The window's comparison; the window's counts start again (the times go on)."""
        out = pb.ShadowComparison(
            rollout_id=rollout_id,
            champion_version=champion.version,
            champion_digest=champion.manifest_digest,
            compared=self.compared,
            agreed=self.agreed,
            flips=[
                pb.Flip(champion=a, challenger=b, count=n)
                for (a, b), n in sorted(self.flips.items())
            ],
            champion_prediction_counts=dict(self.champion_predictions),
            champion_latency_ms_histogram=pb.Histogram(
                edges=list(LATENCY_MS_EDGES), counts=self.champion_latency.tolist()
            ),
            sampled_out=self.sampled_out,
            skipped_budget=self.skipped_budget,
            overhead=self.overhead,
        )
        self.compared = self.agreed = self.sampled_out = self.skipped_budget = 0
        self.flips.clear()
        self.champion_predictions.clear()
        self.champion_latency[:] = 0
        return out


@dataclass
class Challenger:
    """The shadow model of a device: what it is, what it may cost, what it saw."""

    desired: pb.DesiredState
    """The challenger's own (signed) desired state, nested in the device's."""
    policy: pb.ShadowPolicy
    installed: Installed
    model: OnnxModel
    aggregator: TelemetryAggregator
    labels: list[str]
    rng: random.Random
    tally: Tally = field(default_factory=Tally)
    clock: Callable[[], float] = time.perf_counter
    """Times the challenger's inferences (the budget's measure)."""

    @property
    def key(self) -> tuple[str, str, float, float, float]:
        """What identifies the challenger and its policy (a change restarts it)."""
        until = self.policy.until.ToNanoseconds() / 1e9 if self.policy.HasField("until") else 0
        return (
            self.desired.manifest_digest,
            self.desired.rollout_id,
            self.policy.sample,
            self.policy.max_overhead,
            until,
        )

    def expired(self, now: float | None = None) -> bool:
        """Past the policy's ``until``."""
        if not self.policy.HasField("until"):
            return False
        return (time.time() if now is None else now) > self.policy.until.ToNanoseconds() / 1e9

    def observe(
        self, rows: npt.NDArray[Any], champion: Sequence[str], champion_seconds: float
    ) -> None:
        """The champion ran ``rows`` in ``champion_seconds`` and predicted ``champion``: run
        the challenger on the same rows if they are sampled and the budget allows."""
        tally = self.tally
        tally.champion_seconds += champion_seconds
        n = len(champion)
        if self.rng.random() >= self.policy.sample:
            tally.sampled_out += n
            return
        limit = self.policy.max_overhead or 0.5
        if tally.challenger_seconds > limit * tally.champion_seconds:
            tally.skipped_budget += n
            return
        started = self.clock()
        try:
            prediction = self.model.predict(rows)
        except Exception:
            tally.challenger_seconds += self.clock() - started
            self.aggregator.add_errors(n)
            tally.compare(champion, [ERROR_LABEL] * n, champion_seconds * 1000 / n)
            return
        elapsed = self.clock() - started
        tally.challenger_seconds += elapsed
        labels = output_labels(prediction, self.labels, n)
        confidence = prediction.confidence if prediction.labels is not None else None
        self.aggregator.add(rows, labels, confidence, elapsed * 1000 / n)
        tally.compare(champion, labels, champion_seconds * 1000 / n)

    def flush(self, device_id: str, champion: Installed) -> pb.TelemetryBatch | None:
        """The challenger's batch of the window (marked as such), or None with nothing to
        say; a window of skipped or sampled-out inputs only is reported with a count of 0."""
        if not self.tally.pending():
            return None
        installed = self.installed
        batch = self.aggregator.flush(
            device_id=device_id,
            model=installed.model,
            version=installed.version,
            digest=installed.manifest_digest,
        )
        if batch is None:
            now = time.time_ns()
            batch = pb.TelemetryBatch(
                batch_id=str(uuid.uuid4()),
                device_id=device_id,
                model=installed.model,
                version=installed.version,
                digest=installed.manifest_digest,
                count=0,
            )
            batch.window_start.FromNanoseconds(now)
            batch.window_end.FromNanoseconds(now)
        batch.shadow.CopyFrom(self.tally.take(self.desired.rollout_id, champion))
        return batch
