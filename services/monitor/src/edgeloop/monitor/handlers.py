"""Telemetry in: checked against the reference, merged into windows (one write per
window per transaction), samples stored, rejections counted per device."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta

import httpx
from nats.aio.msg import Msg
from prometheus_client import Counter

from edgeloop.contracts import subjects as s
from edgeloop.contracts.events import TelemetryBatch
from edgeloop.kit.bus import ConsumerSpec
from edgeloop.kit.consumer import Tx
from edgeloop.kit.db import Conn
from edgeloop.kit.partitions import Partitioned
from edgeloop.kit.service import Service
from edgeloop.monitor import shadow
from edgeloop.monitor.aggregate import BadTelemetry, Window, check
from edgeloop.monitor.references import References, UnknownVersion
from edgeloop.monitor.robust import record_rejection

log = logging.getLogger(__name__)

RECORDS = Counter("edgeloop_monitor_records_total", "Inferences aggregated")
REJECTED = Counter("edgeloop_monitor_rejected_batches_total", "Telemetry batches refused", ["code"])

WindowKey = tuple[str, str, str, datetime]
"""(model, version, group, window start)"""


def window_of(at: datetime, seconds: float) -> tuple[datetime, datetime]:
    """The window (start, end) ``at`` falls in."""
    epoch = at.timestamp()
    start = epoch - epoch % seconds
    begin = datetime.fromtimestamp(start, UTC)
    return begin, begin + timedelta(seconds=seconds)


def register_handlers(
    svc: Service,
    refs: References,
    *,
    window_seconds: float,
    max_count: int,
    batch_size: int,
    lease_seconds: float = 15.0,
    owner: str | None = None,
) -> None:
    """Subscribe the telemetry consumer: the TELEMETRY stream's partitions, shared among
    the replicas (each device's batches in order on one replica)."""

    @svc.consume_partitioned(
        TelemetryBatch,
        Partitioned(
            ConsumerSpec(
                stream=s.STREAM_TELEMETRY,
                durable=s.CONSUMER_MONITOR_TELEMETRY,
                filter_subjects=s.TELEMETRY_SUBJECTS,
                batch_size=batch_size,
            ),
            count=s.TELEMETRY_PARTITIONS,
            subject=s.telemetry_partition,
            lease_seconds=lease_seconds,
        ),
        owner=owner,
        on_malformed=_malformed,
    )
    async def on_telemetry(batch: TelemetryBatch, tx: Tx) -> None:
        try:
            ref = await refs.get(batch.model, batch.version)
            if batch.shadow is not None:
                shadow.check_challenger(batch, ref, max_count=max_count)
            else:
                check(batch, ref, max_count=max_count)
        except (UnknownVersion, BadTelemetry) as exc:
            code = exc.code if isinstance(exc, BadTelemetry) else "unknown_model"
            await _reject(tx.conn, batch.device_id, code, str(exc))
            return
        except httpx.HTTPError:
            raise  # the registry is unreachable: retried
        if batch.shadow is not None:
            # a challenger's outputs: compared, never part of the model's windows (a canary
            # baseline, drift or an alarm would otherwise count what nobody acted on)
            shadow.add(tx, batch)
            RECORDS.inc(batch.count)
            return
        windows: dict[WindowKey, tuple[datetime, Window]] = tx.shared.setdefault("windows", {})
        start, end = window_of(batch.window_end, window_seconds)
        key = (batch.model, batch.version, batch.group or "", start)
        if key not in windows:
            windows[key] = (end, Window())
        windows[key][1].add(batch, ref)
        RECORDS.inc(batch.count)
        if batch.samples:
            rows = tx.shared.setdefault("samples", [])
            for sample in batch.samples:
                rows.append(
                    (
                        batch.model,
                        batch.version,
                        batch.device_id,
                        json.dumps(sample.get("features", [])),
                        str(sample.get("prediction", "")),
                        float(sample.get("confidence", 0.0)),
                        # a device's word is not ground truth: labels come from
                        # `edgeloop data label` (the gateway refuses labelled samples)
                        None,
                        _at(sample.get("at"), batch.window_end),
                        "random" if sample.get("kind") == "random" else "low-confidence",
                    )
                )
        tx.before_commit("windows", lambda: _flush(tx))


async def _flush(tx: Tx) -> None:
    """Write the transaction's window aggregates (merged with what is stored) and samples."""
    windows: dict[WindowKey, tuple[datetime, Window]] = tx.shared.get("windows", {})
    for (model, version, group, start), (end, window) in sorted(windows.items()):
        # the row exists before it is locked: two replicas creating the same window would
        # otherwise both find nothing to merge with, and the second write would win
        await tx.conn.execute(
            """INSERT INTO windows (model, version, grp, window_start, window_end, aggregate,
                                   count)
               VALUES ($1, $2, $3, $4, $5, 'null'::jsonb, 0)
               ON CONFLICT (model, version, grp, window_start) DO NOTHING""",
            model,
            version,
            group,
            start,
            end,
        )
        row = await tx.conn.fetchrow(
            "SELECT aggregate FROM windows WHERE model = $1 AND version = $2 AND grp = $3 "
            "AND window_start = $4 FOR UPDATE",
            model,
            version,
            group,
            start,
        )
        stored = json.loads(row["aggregate"]) if row is not None else None
        if stored:
            merged = Window.from_json(stored)
            merged.merge(window)
            window = merged
        await tx.conn.execute(
            """UPDATE windows SET aggregate = $5::jsonb, count = $6, updated_at = now()
               WHERE model = $1 AND version = $2 AND grp = $3 AND window_start = $4""",
            model,
            version,
            group,
            start,
            json.dumps(window.to_json()),
            window.count,
        )
    samples = tx.shared.get("samples")
    if samples:
        await tx.conn.executemany(
            """INSERT INTO samples (model, version, device_id, features, prediction,
                                    confidence, label, at, kind)
               VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7, $8, $9)""",
            samples,
        )


async def _malformed(conn: Conn, msg: Msg, reason: str) -> None:
    """A batch that does not parse (negative counts, not JSON …): counted for the device
    its subject names (``device.telemetry.<model>.<device>.<partition>``)."""
    tokens = msg.subject.split(".")
    device = tokens[3] if len(tokens) > 3 else "unknown"
    await _reject(conn, device, "malformed", reason)


async def _reject(conn: Conn, device_id: str, code: str, reason: str) -> None:
    REJECTED.labels(code).inc()
    log.info("telemetry of %s refused (%s): %s", device_id, code, reason)
    await record_rejection(conn, device_id, code, reason)


def _at(value: object, default: datetime) -> datetime:
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            return default
    return default
