"""Closed windows → scores → alarms (raise, keep, resolve) and retraining requests.

Each window is judged in one transaction with the alarms it changes and the events it
causes (outbox); windows are claimed with ``FOR UPDATE SKIP LOCKED``, so replicas share
the work and none is judged twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
from prometheus_client import Counter, Gauge

from edgeloop.contracts.events import (
    AlarmKind,
    AlarmRaised,
    AlarmResolved,
    DatasetSelection,
    RetrainRequested,
)
from edgeloop.kit.db import TRANSIENT_DB_ERRORS, Conn
from edgeloop.kit.outbox import add_event
from edgeloop.monitor.aggregate import Window
from edgeloop.monitor.canary import judge_cohorts
from edgeloop.monitor.references import References, UnknownVersion
from edgeloop.monitor.robust import judge_window, record_rejection
from edgeloop.monitor.rules import DEFAULT_RULES, Judgement, load_rules

log = logging.getLogger(__name__)

WINDOWS = Counter("edgeloop_monitor_windows_evaluated_total", "Windows judged")
ALARMS = Counter("edgeloop_monitor_alarms_raised_total", "Alarms raised", ["rule"])
DRIFT = Gauge("edgeloop_monitor_psi", "Latest PSI per feature", ["model", "version", "feature"])
KPI = Gauge("edgeloop_monitor_kpi", "Latest KPI value", ["model", "version", "kpi"])
OPEN_ALARMS = Gauge("edgeloop_monitor_open_alarms", "Alarms raised or acknowledged", ["kind"])

#: how far back the samples of a retraining request reach
SAMPLE_LOOKBACK = timedelta(hours=24)


@dataclass(frozen=True)
class Slot:
    """Which window is judged: model version, device group ('' for none), bounds."""

    model: str
    version: str
    group: str
    start: datetime
    end: datetime


_OUTAGES: tuple[type[BaseException], ...] = (*TRANSIENT_DB_ERRORS, httpx.HTTPError)


class WindowFailed(Exception):
    """Judging this window failed for a reason that trying again will not cure."""

    def __init__(self, at: Slot) -> None:
        super().__init__(f"{at.model}@{at.version} window {at.start.isoformat()}")
        self.at = at


class Evaluator:
    """Judges closed windows, and raises alarms early from open ones."""

    def __init__(
        self, pool: asyncpg.Pool, schema: str, refs: References, *, grace_seconds: float
    ) -> None:
        self.pool = pool
        self.schema = schema
        self.refs = refs
        self.grace = timedelta(seconds=grace_seconds)
        self._peeked: dict[tuple[str, str, str, datetime], int] = {}

    async def run(self, every: float) -> None:
        """Until cancelled."""
        while True:
            try:
                judged = 0
                while True:
                    try:
                        if not await self.evaluate_one():
                            break
                    except WindowFailed as failed:
                        await self._give_up(failed)
                    judged += 1
                judged += await self.peek_open()
                if judged:
                    await self._count_open()
            except TRANSIENT_DB_ERRORS as exc:
                log.warning("cannot evaluate windows now: %s", exc)
            except Exception:
                log.exception("window evaluation failed; trying again")
            await asyncio.sleep(every)

    async def _count_open(self) -> None:
        rows = await self.pool.fetch(
            "SELECT kind, count(*) AS n FROM alarms WHERE state <> 'resolved' GROUP BY kind"
        )
        counts = {r["kind"]: r["n"] for r in rows}
        for kind in ("drift", "kpi"):
            OPEN_ALARMS.labels(kind).set(counts.get(kind, 0))

    async def peek_open(self) -> int:
        """Raise alarms from windows still open: drift shows before its window closes
        (the window's end plus grace would add up to a window's length to the alarm's
        latency). Only raising: resolving, and the hysteresis that goes with it, wait for
        closed windows. A window is looked at again only when it has grown; how many
        alarms were raised."""
        rows = await self.pool.fetch(
            """SELECT model, version, grp, window_start, count AS n
               FROM windows WHERE NOT evaluated AND window_end > $1""",
            datetime.now(UTC) - self.grace,
        )
        seen = {(r["model"], r["version"], r["grp"], r["window_start"]): r["n"] for r in rows}
        grown = [k for k, n in seen.items() if n and self._peeked.get(k) != n]
        self._peeked = seen
        raised = 0
        for key in grown:
            raised += await self._peek(*key)
        return raised

    async def _peek(self, model: str, version: str, group: str, start: datetime) -> int:
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """SELECT window_end, aggregate FROM windows
                   WHERE model = $1 AND version = $2 AND grp = $3 AND window_start = $4
                     AND NOT evaluated FOR UPDATE SKIP LOCKED""",
                model,
                version,
                group,
                start,
            )
            if row is None:
                return 0
            try:
                ref = await self.refs.get(model, version)
            except UnknownVersion:
                return 0
            rules = {**DEFAULT_RULES, **await load_rules(conn, model)}
            window = Window.from_json(json.loads(row["aggregate"]))
            at = Slot(model, version, group, start, row["window_end"])
            raised = 0
            for j in judge_window(window, ref, rules)[1]:
                if j.fired and not await self._open_alarm(conn, at, j.rule):
                    await self._raise(conn, at, j)
                    raised += 1
            return raised

    async def _open_alarm(self, conn: Conn, at: Slot, rule: str) -> asyncpg.Record | None:
        """The rule's open alarm for the slot's version and group (locked), if any."""
        return await conn.fetchrow(
            "SELECT alarm_id, clean_windows FROM alarms WHERE model = $1 AND version = $2 "
            "AND grp = $3 AND rule = $4 AND state <> 'resolved' FOR UPDATE",
            at.model,
            at.version,
            at.group,
            rule,
        )

    async def _give_up(self, failed: WindowFailed) -> None:
        """A window whose judging fails for a reason other than a passing outage is
        marked judged with the error, so the windows after it are judged (it would
        otherwise be the oldest one forever)."""
        at = failed.at
        log.error(
            "window %s@%s %s %s cannot be judged; skipped",
            at.model,
            at.version,
            at.group or "-",
            at.start.isoformat(),
            exc_info=failed.__cause__,
        )
        error = f"{type(failed.__cause__).__name__}: {failed.__cause__}"[:500]
        await _mark_judged(self.pool, at, {"error": error})

    async def evaluate_one(self) -> bool:
        """Judge the oldest closed window not judged yet; whether there was one."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """SELECT model, version, grp, window_start, window_end, aggregate FROM windows
                   WHERE NOT evaluated AND window_end <= $1
                   ORDER BY window_start LIMIT 1 FOR UPDATE SKIP LOCKED""",
                datetime.now(UTC) - self.grace,
            )
            if row is None:
                return False
            model, version = row["model"], row["version"]
            at = Slot(model, version, row["grp"], row["window_start"], row["window_end"])
            try:
                scores = await self._judge(conn, at, row["aggregate"])
            except _OUTAGES:
                raise  # an outage: the same window is judged again later
            except Exception as exc:
                raise WindowFailed(at) from exc
        WINDOWS.inc()
        for name, f in (scores.get("features") or {}).items():
            DRIFT.labels(model, version, name).set(f["psi"])
        for name, value in (scores.get("kpis") or {}).items():
            KPI.labels(model, version, name).set(value)
        return True

    async def _judge(self, conn: Conn, at: Slot, aggregate: str) -> dict[str, Any]:
        """Score the window, mark it judged, apply its judgements; its scores."""
        window: Window | None = None
        rules = {**DEFAULT_RULES, **await load_rules(conn, at.model)}
        try:
            ref = await self.refs.get(at.model, at.version)
        except UnknownVersion:
            scores: dict[str, Any] = {"error": "no reference profile"}
            judgements: list[Judgement] = []
        else:
            window = Window.from_json(json.loads(aggregate))
            scores, judgements, trimmed = judge_window(window, ref, rules)
            for device, why in trimmed.items():
                await record_rejection(
                    conn,
                    device,
                    "implausible",
                    f"{at.model}@{at.version} window {at.start.isoformat()}: {why}",
                )
        await _mark_judged(conn, at, scores)
        for j in judgements:
            await self._apply(conn, at, j, int(rules["clear_windows"]))
        if window is not None:
            await judge_cohorts(conn, self.schema, at, window, rules)
        return scores

    async def _apply(self, conn: Conn, at: Slot, j: Judgement, clear_windows: int) -> None:
        model, version, end = at.model, at.version, at.end
        alarm = await self._open_alarm(conn, at, j.rule)
        if j.fired:
            if alarm is not None:  # still firing: one alarm, updated (de-duplication)
                await conn.execute(
                    "UPDATE alarms SET clean_windows = 0, scores = $2::jsonb, message = $3, "
                    "window_end = $4 WHERE alarm_id = $1",
                    alarm["alarm_id"],
                    json.dumps(j.scores),
                    j.message,
                    end,
                )
                return
            await self._raise(conn, at, j)
        elif alarm is not None and j.clean:
            clean = alarm["clean_windows"] + 1
            if clean < clear_windows:
                await conn.execute(
                    "UPDATE alarms SET clean_windows = $2 WHERE alarm_id = $1",
                    alarm["alarm_id"],
                    clean,
                )
                return
            await conn.execute(
                "UPDATE alarms SET state = 'resolved', resolved_at = now(), clean_windows = $2 "
                "WHERE alarm_id = $1",
                alarm["alarm_id"],
                clean,
            )
            await add_event(
                conn,
                self.schema,
                AlarmResolved(
                    model=model, version=version, alarm_id=alarm["alarm_id"], rule=j.rule
                ),
            )
            log.info("alarm %s (%s@%s %s) resolved", alarm["alarm_id"], model, version, j.rule)
        elif alarm is not None:  # between the thresholds: neither firing nor clean
            await conn.execute(
                "UPDATE alarms SET clean_windows = 0 WHERE alarm_id = $1", alarm["alarm_id"]
            )

    async def _raise(self, conn: Conn, at: Slot, j: Judgement) -> None:
        model, version, start, end = at.model, at.version, at.start, at.end
        alarm_id = uuid.uuid4()
        kind = AlarmKind.DRIFT if j.kind == "drift" else AlarmKind.KPI
        request_id = uuid.uuid4()
        await conn.execute(
            """INSERT INTO alarms (alarm_id, model, version, rule, kind, state, message, scores,
                                   window_start, window_end, retrain_request_id, grp)
               VALUES ($1, $2, $3, $4, $5, 'raised', $6, $7::jsonb, $8, $9, $10, $11)""",
            alarm_id,
            model,
            version,
            j.rule,
            kind.value,
            j.message,
            json.dumps(j.scores),
            start,
            end,
            request_id,
            at.group,
        )
        await add_event(
            conn,
            self.schema,
            AlarmRaised(
                model=model,
                version=version,
                alarm_id=alarm_id,
                kind=kind,
                rule=j.rule,
                severity="warning",
                group=at.group or None,
                window_start=start,
                window_end=end,
                scores=j.scores,
                message=j.message,
            ),
        )
        # drift: the inputs changed, so retrain on what came since the drifting window
        # began; a KPI alarm: on what the last day brought
        since = start if kind is AlarmKind.DRIFT else start - SAMPLE_LOOKBACK
        samples = await conn.fetchval(
            "SELECT count(*) FROM samples WHERE model = $1 AND at >= $2", model, since
        )
        await add_event(
            conn,
            self.schema,
            RetrainRequested(
                model=model,
                version=version,
                request_id=request_id,
                alarm_id=alarm_id,
                reason=j.message,
                evidence={
                    "rule": j.rule,
                    "kind": kind.value,
                    "group": at.group or None,
                    "scores": j.scores,
                    "window_start": start.isoformat(),
                    "window_end": end.isoformat(),
                },
                dataset=DatasetSelection(
                    kinds=["low-confidence", "random", "labelled"],
                    since=since,
                    until=end,
                    sample_count=int(samples or 0),
                    export_command=(
                        f"edgeloop data export {model} --since {since.isoformat()} "
                        f"--until {end.isoformat()} --kind all -o {model}-retrain.parquet"
                    ),
                ),
            ),
        )
        ALARMS.labels(j.rule).inc()
        log.warning("alarm %s raised for %s@%s: %s", alarm_id, model, version, j.message)


async def _mark_judged(conn: Conn | asyncpg.Pool, at: Slot, scores: dict[str, Any]) -> None:
    """Record ``scores`` (or the error that kept the window from being judged) and mark
    the window judged."""
    await conn.execute(
        "UPDATE windows SET evaluated = true, scores = $5::jsonb "
        "WHERE model = $1 AND version = $2 AND grp = $3 AND window_start = $4",
        at.model,
        at.version,
        at.group,
        at.start,
        json.dumps(scores),
    )
