"""What the gateway takes from a device (``edgeloop.gateway.trust``), found wanting by the
gateway fuzz: NaN and Infinity and NUL characters reached the bus as if valid, a NUL in a
Hello or a status report ended the session with an internal error (PostgreSQL refused
it), and names of any size widened what a session accepted telemetry for, without bound.
"""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime, timedelta

import pytest

from edgeloop.contracts.edge.v1 import edge_pb2 as pb
from edgeloop.contracts.events import DeviceState, DeviceStatusReported, Histogram, TelemetryBatch
from edgeloop.gateway.server import MAX_RUNS, Session
from edgeloop.gateway.trust import (
    MAX_ERROR,
    Refused,
    TelemetryPolicy,
    check_batch,
    check_hello,
    check_report,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _batch(**changes: object) -> TelemetryBatch:
    fields: dict[str, object] = {
        "model": "m",
        "version": "1",
        "device_id": "d",
        "window_start": NOW - timedelta(seconds=2),
        "window_end": NOW - timedelta(seconds=1),
        "count": 10,
        "feature_names": ["f"],
        "feature_histograms": [Histogram(edges=[0.0, 1.0], counts=[0, 10, 0])],
        "samples": [{"features": [0.5], "prediction": "a", "confidence": 0.4}],
        **changes,
    }
    return TelemetryBatch(**fields)  # type: ignore[arg-type]


def _check(batch: TelemetryBatch) -> None:
    check_batch(batch, runs={("m", "1")}, now=NOW, policy=TelemetryPolicy())


def test_a_valid_batch_is_taken() -> None:
    _check(_batch())


@pytest.mark.parametrize(
    ("changes", "where"),
    [
        (
            {"feature_histograms": [Histogram(edges=[math.nan, 1.0], counts=[0, 10, 0])]},
            "feature_histograms.0.edges.0 is nan",
        ),
        (
            {"latency_ms_histogram": Histogram(edges=[-math.inf], counts=[0, 1])},
            "latency_ms_histogram.edges.0 is -inf",
        ),
        ({"samples": [{"features": [math.inf], "confidence": 0.4}]}, "samples.0.features.0"),
        ({"samples": [{"features": [0.5], "confidence": math.nan}]}, "samples.0.confidence"),
    ],
)
def test_nan_and_infinity_are_refused(changes: dict[str, object], where: str) -> None:
    with pytest.raises(Refused, match=where) as refused:
        _check(_batch(**changes))
    assert refused.value.code == "not_finite"


@pytest.mark.parametrize(
    "changes",
    [
        {"digest": "sha256:\x00"},
        {"feature_names": ["f\x00"]},
        {"prediction_counts": {"a\x00": 1}},
        {"samples": [{"features": [0.5], "prediction": "\x00", "confidence": 0.4}]},
        {"trace_parent": "00-\x00"},
    ],
)
def test_a_nul_character_anywhere_is_refused(changes: dict[str, object]) -> None:
    with pytest.raises(Refused, match=r"U\+0000") as refused:
        _check(_batch(**changes))
    assert refused.value.code == "unstorable"


def _report(**changes: object) -> DeviceStatusReported:
    fields: dict[str, object] = {"device_id": "d", "state": DeviceState.RUNNING, **changes}
    return DeviceStatusReported(**fields)  # type: ignore[arg-type]


def test_a_reports_error_text_is_kept_safe_and_short() -> None:
    report = check_report(_report(state=DeviceState.FAILED, error="boom\x00" + "e" * 10_000))
    assert report.error is not None
    assert report.error.startswith("boom\\x00eee")
    assert len(report.error) < MAX_ERROR + 100
    assert "characters cut" in report.error
    assert check_report(_report(error="line\nbreak")).error == "line\nbreak"


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"model": "m\x00"}, "invalid model name"),
        ({"model": "m" * 100_000}, "invalid model name"),
        ({"version": "a b"}, "invalid version"),
        ({"digest": "sha256:" + "x" * 64}, "digest: invalid digest"),
        ({"desired_digest": "d" * 100_000}, "desired_digest: invalid digest"),
        ({"trace_parent": "00-\x00"}, r"trace_parent: a NUL character \(U\+0000\)"),
    ],
)
def test_a_report_with_names_off_their_rules_is_refused(
    changes: dict[str, object], says: str
) -> None:
    with pytest.raises(ValueError, match=says) as refused:
        check_report(_report(**changes))
    assert len(str(refused.value)) < 1000  # a megabyte of name is not quoted back


@pytest.mark.parametrize(
    ("hello", "says"),
    [
        (pb.Hello(labels={"site": "a\x00b"}), "label value"),
        (pb.Hello(labels={"k\x00": "v"}), "label key"),
        (pb.Hello(labels={f"k{i}": "v" for i in range(65)}), "at most 64"),
        (pb.Hello(model="a b"), "invalid model name"),
        (pb.Hello(version="1\x00"), "invalid version"),
        (pb.Hello(digest="d" * 5000), "invalid digest"),
    ],
)
def test_a_hello_off_the_naming_rules_is_refused(hello: pb.Hello, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        check_hello(hello)
    check_hello(
        pb.Hello(labels={"site": "a"}, model="m", version="1.0", digest="sha256:" + "a" * 64)
    )


def test_a_session_remembers_the_latest_versions_only() -> None:
    session = Session("d", "s", {}, asyncio.Queue())
    session.ran("m", "1")
    for i in range(1000):
        session.ran("m", f"v{i}")
    assert len(session.runs) == MAX_RUNS
    assert ("m", "v999") in session.runs
    assert ("m", "1") not in session.runs
    session.ran("m", "v990")  # again: the newest now
    assert list(session.runs)[-1] == ("m", "v990")
