"""Where the agent's inference inputs come from: a simulated sensor (optionally
drifting), a file replayed, or JSON lines on standard input."""

from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

import numpy as np
import numpy.typing as npt

from edgeloop.contracts.parsing import parse_duration

Rows = npt.NDArray[np.float32]


class InputSource(Protocol):
    """Rows of features for the model."""

    feature_names: list[str]

    def read(self, n: int) -> Rows | None:
        """Up to ``n`` rows; None when the source is exhausted."""


@dataclass(frozen=True)
class Drift:
    """``feature=F,shift=S,after=60s,fraction=0.3``: after ``after`` seconds, a
    ``fraction`` of the rows get feature F shifted by ``shift`` standard deviations."""

    feature: int | str
    shift: float
    after: float = 0.0
    fraction: float = 1.0

    @classmethod
    def parse(cls, text: str) -> Drift:
        """Parse the CLI form; ValueError naming the bad part."""
        parts: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep or key not in ("feature", "shift", "after", "fraction"):
                raise ValueError(
                    f"--drift: expected feature=F,shift=S[,after=60s][,fraction=0.3], got {part!r}"
                )
            parts[key] = value
        if "feature" not in parts or "shift" not in parts:
            raise ValueError("--drift needs feature=F and shift=S")
        feature: int | str = (
            int(parts["feature"]) if parts["feature"].isdigit() else parts["feature"]
        )
        try:
            shift = float(parts["shift"])
            fraction = float(parts.get("fraction", "1"))
        except ValueError as exc:
            raise ValueError(f"--drift: {exc}") from exc
        if not 0 <= fraction <= 1:
            raise ValueError(f"--drift fraction must be within 0..1, got {fraction}")
        return cls(feature, shift, parse_duration(parts.get("after", "0")), fraction)

    def index(self, names: Sequence[str]) -> int:
        """The drifting feature's column."""
        if isinstance(self.feature, int):
            if not 0 <= self.feature < len(names):
                raise ValueError(f"--drift feature {self.feature} is out of range ({len(names)})")
            return self.feature
        if self.feature not in names:
            raise ValueError(f"--drift feature {self.feature!r} is not one of {list(names)}")
        return list(names).index(self.feature)


class SimulatedSensor:
    """Rows resampled from reference data with a little noise; drift on request."""

    def __init__(
        self,
        reference: npt.NDArray[Any],
        feature_names: Sequence[str] | None = None,
        *,
        seed: int | None = None,
        drift: Drift | None = None,
        clock: Callable[[], float] = time.monotonic,
        noise: float = 0.05,
    ) -> None:
        self.reference = np.asarray(reference, dtype=np.float64)
        n = self.reference.shape[1]
        self.feature_names = list(feature_names or [f"f{i}" for i in range(n)])
        self.std = self.reference.std(axis=0)
        self.rng = np.random.default_rng(seed)
        self.drift = drift
        self.drift_col = drift.index(self.feature_names) if drift else -1
        self.clock = clock
        self.noise = noise
        self.started = clock()

    @classmethod
    def from_profile(
        cls, profile: Mapping[str, Any], *, rows: int = 2000, **kw: Any
    ) -> SimulatedSensor:
        """Reference rows drawn from a profile's per-feature statistics."""
        rng = np.random.default_rng(kw.get("seed"))
        cols = []
        for f in profile.get("features", []):
            if f.get("kind") == "categorical":
                counts = np.asarray(f["counts"], dtype=np.float64)
                cols.append(
                    rng.choice(
                        np.asarray(f["categories"], dtype=np.float64), rows, p=counts / counts.sum()
                    )
                )
            elif f.get("edges") and f.get("counts"):
                # the profile's own histogram: a bin by its reference share, then uniform
                # inside it (under/overflow bins end at the reference min/max)
                bounds = np.asarray(
                    [
                        float(f.get("min", f["edges"][0])),
                        *f["edges"],
                        float(f.get("max", f["edges"][-1])),
                    ],
                    dtype=np.float64,
                )
                counts = np.asarray(f["counts"], dtype=np.float64)
                b = rng.choice(len(counts), rows, p=counts / counts.sum())
                lo, hi = bounds[b], bounds[b + 1]
                cols.append(lo + (hi - lo) * rng.random(rows))
            else:
                col = rng.normal(float(f.get("mean", 0)), float(f.get("std", 1)) or 1e-6, rows)
                cols.append(np.clip(col, float(f.get("min", -np.inf)), float(f.get("max", np.inf))))
        names = [str(f.get("name")) for f in profile.get("features", [])]
        return cls(np.stack(cols, axis=1), names, **kw)

    def read(self, n: int) -> Rows | None:
        """``n`` rows."""
        idx = self.rng.integers(0, len(self.reference), n)
        rows = self.reference[idx] + self.rng.normal(0, 1, (n, self.reference.shape[1])) * (
            self.std * self.noise
        )
        d = self.drift
        if d is not None and self.clock() - self.started >= d.after:
            hit = self.rng.random(n) < d.fraction
            rows[hit, self.drift_col] += d.shift * (self.std[self.drift_col] or 1.0)
        out: Rows = rows.astype(np.float32)
        return out


class FileReplay:
    """Rows of a ``.npz`` (array ``X``) or ``.csv`` (header = names), in order."""

    def __init__(self, path: Path, *, loop: bool = True) -> None:
        if path.suffix == ".npz":
            data = np.load(path)
            self.rows = np.asarray(data["X"], dtype=np.float32)
            names = [str(x) for x in data["feature_names"]] if "feature_names" in data else []
        else:
            with path.open() as f:
                reader = csv.reader(f)
                names = next(reader)
                self.rows = np.asarray([[float(v) for v in r] for r in reader], dtype=np.float32)
        self.feature_names = names or [f"f{i}" for i in range(self.rows.shape[1])]
        self.loop = loop
        self.pos = 0

    def read(self, n: int) -> Rows | None:
        """The next ``n`` rows (restarting at the end when looping)."""
        if self.pos >= len(self.rows):
            if not self.loop or not len(self.rows):
                return None
            self.pos = 0
        out: Rows = self.rows[self.pos : self.pos + n]
        self.pos += len(out)
        return out


class JsonLines:
    """Rows as JSON lines (``[1.0, 2.0]`` or ``{"features": [...]}``); bad lines are
    skipped and counted in ``rejected``."""

    def __init__(self, stream: TextIO | None = None, feature_names: Sequence[str] = ()) -> None:
        self.stream = stream or sys.stdin
        self.feature_names = list(feature_names)
        self.rejected = 0
        self.width: int | None = len(self.feature_names) or None

    def read(self, n: int) -> Rows | None:
        """Up to ``n`` rows from the lines available; None at EOF."""
        rows: list[list[float]] = []
        while len(rows) < n:
            line = self.stream.readline()
            if not line:
                break
            try:
                value = json.loads(line)
                feats = value["features"] if isinstance(value, dict) else value
                row = [float(v) for v in feats]
            except (ValueError, TypeError, KeyError):
                self.rejected += 1
                continue
            if self.width is None:
                self.width = len(row)
            if len(row) != self.width:
                self.rejected += 1
                continue
            rows.append(row)
        if not rows:
            return None
        return np.asarray(rows, dtype=np.float32)


def open_source(
    spec: str,
    *,
    reference: npt.NDArray[Any] | None = None,
    profile: Mapping[str, Any] | None = None,
    seed: int | None = None,
    drift: Drift | None = None,
) -> InputSource:
    """``sim`` (from the reference rows or the profile), ``file:PATH`` or ``stdin``."""
    if spec == "sim":
        if reference is not None:
            return SimulatedSensor(reference, seed=seed, drift=drift)
        if profile:
            return SimulatedSensor.from_profile(profile, seed=seed, drift=drift)
        raise ValueError("a simulated sensor needs reference data or the model's profile")
    if spec.startswith("file:"):
        return FileReplay(Path(spec.removeprefix("file:")))
    if spec == "stdin":
        names = [str(f.get("name")) for f in (profile or {}).get("features", [])]
        return JsonLines(sys.stdin, names)
    raise ValueError(f"unknown input source {spec!r}: use sim, file:PATH or stdin")
