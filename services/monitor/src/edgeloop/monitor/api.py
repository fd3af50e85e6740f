"""The monitor's HTTP API: alarms (list, acknowledge), rules per model, windows with
their scores, rejected telemetry per device."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

import asyncpg
from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field

from edgeloop.contracts.names import check_model
from edgeloop.kit import audit
from edgeloop.kit.api import Actor, DataWriter, MonitorWriter, new_api
from edgeloop.kit.db import Conn
from edgeloop.monitor import shadow
from edgeloop.monitor.aggregate import Window
from edgeloop.monitor.references import References, UnknownVersion
from edgeloop.monitor.report import render
from edgeloop.monitor.rules import DEFAULT_RULES, load_rules, validate_rules


class LabelBody(BaseModel):
    """Body of ``POST /v1/samples/{id}/label``."""

    label: str = Field(min_length=1, max_length=200)


def _row(record: asyncpg.Record) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in dict(record).items():
        if isinstance(value, uuid.UUID):
            value = str(value)
        elif hasattr(value, "isoformat"):
            value = value.isoformat()
        elif key in ("scores", "rules") and isinstance(value, str):
            value = json.loads(value)
        out[key] = value
    return out


async def _audit(
    conn: Conn, who: str, action: str, subject: str, row: Any, before: Any, after: Any
) -> None:
    """An audit record of a change to ``row`` (which names its model and version)."""
    await audit.record(
        conn,
        service="monitor",
        actor=who,
        action=action,
        subject=subject,
        model=row["model"],
        version=row["version"],
        before=before,
        after=after,
    )


def create_api(
    pool: Callable[[], asyncpg.Pool], tokens: frozenset[str], refs: References
) -> FastAPI:
    """The FastAPI app (OpenAPI at ``/docs``)."""
    api = new_api(title="edgeloop monitor", version="1", description="Drift, KPIs and alarms.")
    api.state.tokens = tokens
    api.state.pool = pool

    @api.get("/v1/alarms")
    async def alarms(
        _: Actor,
        open_only: bool = Query(False, alias="open"),
        model: str | None = None,
        limit: int = Query(100, ge=1, le=1000),
    ) -> dict[str, Any]:
        """Alarms, newest first (``open=true``: raised or acknowledged, not resolved)."""
        rows = await pool().fetch(
            """SELECT * FROM alarms
               WHERE (NOT $1 OR state <> 'resolved') AND ($2::text IS NULL OR model = $2)
               ORDER BY raised_at DESC LIMIT $3""",
            open_only,
            model,
            limit,
        )
        return {"alarms": [_row(r) for r in rows]}

    @api.post("/v1/alarms/{alarm_id}/ack")
    async def ack(alarm_id: uuid.UUID, who: MonitorWriter) -> dict[str, Any]:
        """Acknowledge a raised alarm (it stays open until its condition clears)."""
        async with pool().acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """UPDATE alarms SET state = 'acknowledged', acked_at = now(), acked_by = $2
                   WHERE alarm_id = $1 AND state = 'raised' RETURNING *""",
                alarm_id,
                who,
            )
            if row is not None:
                await _audit(
                    conn,
                    who,
                    "alarm.ack",
                    f"alarm {alarm_id}",
                    row,
                    {"state": "raised"},
                    {"state": "acknowledged"},
                )
        if row is None:
            state = await pool().fetchval("SELECT state FROM alarms WHERE alarm_id = $1", alarm_id)
            if state is None:
                raise HTTPException(404, f"no alarm {alarm_id}")
            raise HTTPException(
                409, f"alarm {alarm_id} is {state}; only a raised alarm is acknowledged"
            )
        return _row(row)

    @api.get("/v1/shadow")
    async def shadow_report(
        _: Actor, model: str, version: str, rollout_id: uuid.UUID | None = None
    ) -> dict[str, Any]:
        """How the challenger ``model@version`` compared with the champion on the same
        inputs (of one shadow rollout, or all): agreement, flip matrix, latency ratio,
        prediction drift, per device group and overall."""
        async with pool().acquire() as conn:
            return await shadow.report(
                conn, model, version, str(rollout_id) if rollout_id else None
            )

    @api.get("/v1/rules/{model}")
    async def show_rules(model: str, _: Actor) -> dict[str, Any]:
        """The model's rules: its own over the defaults."""
        own_rules = await load_rules(pool(), model)
        return {"model": model, "rules": {**DEFAULT_RULES, **own_rules}, "own": own_rules}

    @api.put("/v1/rules/{model}")
    async def set_rules(model: str, body: dict[str, Any], who: MonitorWriter) -> dict[str, Any]:
        """Replace the model's own rules (unknown keys or bad values: 422 naming them)."""
        check_model(model)
        try:
            rules = validate_rules(body.get("rules", body))
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from exc
        async with pool().acquire() as conn, conn.transaction():
            before = await load_rules(conn, model)
            await conn.execute(
                """INSERT INTO rules (model, rules, updated_by) VALUES ($1, $2::jsonb, $3)
                   ON CONFLICT (model) DO UPDATE
                   SET rules = EXCLUDED.rules, updated_at = now(),
                       updated_by = EXCLUDED.updated_by""",
                model,
                json.dumps(rules),
                who,
            )
            await audit.record(
                conn,
                service="monitor",
                actor=who,
                action="monitor.rules",
                subject=f"rules {model}",
                model=model,
                before=before,
                after=rules,
            )
        return {"model": model, "rules": {**DEFAULT_RULES, **rules}, "own": rules}

    @api.get("/v1/windows")
    async def windows(
        _: Actor, model: str, version: str | None = None, limit: int = Query(50, ge=1, le=1000)
    ) -> dict[str, Any]:
        """Judged windows of a model, newest first, with their scores."""
        rows = await pool().fetch(
            """SELECT model, version, grp AS group, window_start, window_end, count, evaluated,
                      scores
               FROM windows WHERE model = $1 AND ($2::text IS NULL OR version = $2)
               ORDER BY window_start DESC, grp LIMIT $3""",
            model,
            version,
            limit,
        )
        return {"windows": [_row(r) for r in rows]}

    @api.get("/v1/samples")
    async def samples(
        _: Actor,
        model: str,
        since: datetime | None = None,
        until: datetime | None = None,
        kind: str = Query("low-confidence", pattern="^(low-confidence|random|labelled|all)$"),
        limit: int = Query(10_000, ge=1, le=100_000),
    ) -> dict[str, Any]:
        """Stored samples of a model: ``low-confidence`` ones, the ``random`` share of all
        inputs, ``labelled`` ones (any kind with a label), or ``all``."""
        rows = await pool().fetch(
            """SELECT sample_id, model, version, device_id, kind, features, prediction,
                      confidence, label, labelled_by, at
               FROM samples
               WHERE model = $1 AND ($2::timestamptz IS NULL OR at >= $2)
                 AND ($3::timestamptz IS NULL OR at <= $3)
                 AND ($4 <> 'labelled' OR label IS NOT NULL)
                 AND ($4 NOT IN ('low-confidence', 'random') OR kind = $4)
               ORDER BY at, sample_id LIMIT $5""",
            model,
            since,
            until,
            kind,
            limit,
        )
        out = []
        for r in rows:
            item = _row(r)
            item["features"] = json.loads(item["features"])
            out.append(item)
        return {"samples": out}

    @api.post("/v1/samples/{sample_id}/label")
    async def label(sample_id: int, body: LabelBody, who: DataWriter) -> dict[str, Any]:
        """Give a stored sample its true label (it then counts as labelled data)."""
        async with pool().acquire() as conn, conn.transaction():
            before = await conn.fetchval(
                "SELECT label FROM samples WHERE sample_id = $1", sample_id
            )
            row = await conn.fetchrow(
                "UPDATE samples SET label = $2, labelled_by = $3 WHERE sample_id = $1 "
                "RETURNING sample_id, model, version, label, labelled_by",
                sample_id,
                body.label,
                who,
            )
            if row is not None:
                await _audit(
                    conn,
                    who,
                    "sample.label",
                    f"sample {sample_id}",
                    row,
                    {"label": before},
                    {"label": body.label},
                )
        if row is None:
            raise HTTPException(404, f"no sample {sample_id}")
        return _row(row)

    @api.get("/v1/report", response_class=HTMLResponse)
    async def report(_: Actor, model: str, version: str, windows: int = 200) -> HTMLResponse:
        """The drift report of a version: a self-contained HTML page."""
        try:
            ref = await refs.get(model, version)
        except UnknownVersion as exc:
            raise HTTPException(404, str(exc)) from exc
        rows = await pool().fetch(
            """SELECT window_start, aggregate, scores FROM windows
               WHERE model = $1 AND version = $2 AND evaluated
               ORDER BY window_start DESC LIMIT $3""",
            model,
            version,
            windows,
        )
        judged = [
            (
                r["window_start"],
                Window.from_json(json.loads(r["aggregate"])),
                json.loads(r["scores"]),
            )
            for r in reversed(rows)
        ]
        alarms = [
            _row(a)
            for a in await pool().fetch(
                "SELECT * FROM alarms WHERE model = $1 AND version = $2 ORDER BY raised_at",
                model,
                version,
            )
        ]
        threshold = {**DEFAULT_RULES, **await load_rules(pool(), model)}["drift_psi"]
        return HTMLResponse(render(ref, judged, alarms, threshold=threshold))

    @api.get("/v1/rejections")
    async def rejections(_: Actor, device_id: str | None = None) -> dict[str, Any]:
        """Telemetry refused and windows found implausible (``implausible``: a verdict or
        an alarm would have rested on the device alone), per device and kind."""
        rows = await pool().fetch(
            "SELECT * FROM rejections WHERE $1::text IS NULL OR device_id = $1 "
            "ORDER BY device_id, code",
            device_id,
        )
        return {"rejections": [_row(r) for r in rows]}

    return api
