"""The registry's PostgreSQL store (schema ``registry``)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from edgeloop.contracts.events import Event
from edgeloop.kit import audit, dlq
from edgeloop.kit.db import Conn
from edgeloop.kit.outbox import add_event
from edgeloop.registry.errors import Conflict, NotFound

#: stage → the stages a version may come from (``archived`` only by the retention sweep).
STAGES: dict[str, tuple[str, ...]] = {
    "active": (),
    "deprecated": ("active", "deprecated"),
    "retired": ("active", "deprecated"),
    "archived": ("retired",),
}

#: Deletes an archived version's artifacts, except the digests given (still in use);
#: what it deleted (``repository@digest``).
ArchiveArtifacts = Callable[[dict[str, Any], set[str]], Awaitable[list[str]]]

_JSON_COLUMNS = (
    "signature",
    "profile",
    "params",
    "tags",
    "build_detail",
    "validation_detail",
    "evidence",
    "dataset",
)

_VERSION_COLUMNS = (
    "repository",
    "artifact_manifest",
    "model_digest",
    "model_size",
    "suite_digest",
    "reference_digest",
    "profile_digest",
    "signature",
    "profile",
    "source_commit",
    "data_digest",
    "params",
    "tags",
    "parent_model",
    "parent_version",
    "retrain_request_id",
    "created_by",
    "trace_parent",
)


def _record(row: asyncpg.Record | None) -> dict[str, Any] | None:
    if row is None:
        return None
    out = dict(row)
    for key in _JSON_COLUMNS:
        if isinstance(out.get(key), str):
            out[key] = json.loads(out[key])
    return out


class PgStore:
    """asyncpg implementation of the registry's store."""

    def __init__(self, pool: asyncpg.Pool, schema: str = "registry") -> None:
        self.pool = pool
        self.schema = schema

    async def register(
        self,
        name: str,
        version: str | None,
        content_digest: str,
        row: dict[str, Any],
        event_factory: Callable[[str, uuid.UUID], Event],
    ) -> tuple[dict[str, Any], bool]:
        """Insert a version (auto-numbered when ``version`` is None) and queue its event.

        Returns the record and True, or the existing record and False when the version
        exists already (the caller decides between idempotent success and conflict).
        """
        async with self.pool.acquire() as conn, conn.transaction():
            # One registration per model at a time: version numbers stay dense and a
            # concurrent duplicate sees the first one's row.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"registry:{name}")
            await conn.execute(
                "INSERT INTO models (name, created_by) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                name,
                row.get("created_by"),
            )
            if version is not None:
                existing = await self._version(conn, name, version)
                if existing is not None:
                    return existing, False
            elif row.get("retrain_request_id") is not None:
                # A retrain request registers at most one version, even when retried.
                again = await conn.fetchrow(
                    "SELECT * FROM versions WHERE model = $1 AND retrain_request_id = $2",
                    name,
                    row["retrain_request_id"],
                )
                if again is not None:
                    rec = _record(again)
                    assert rec is not None
                    return rec, False
            seq = await conn.fetchval(
                "SELECT coalesce(max(seq), 0) + 1 FROM versions WHERE model = $1", name
            )
            if version is None:
                version = str(seq)
                while await self._version(conn, name, version) is not None:
                    seq += 1
                    version = str(seq)
            event_id = uuid.uuid4()
            values = [row[c] for c in _VERSION_COLUMNS]
            json_idx = {i for i, c in enumerate(_VERSION_COLUMNS) if c in _JSON_COLUMNS}
            values = [json.dumps(v) if i in json_idx else v for i, v in enumerate(values)]
            cols = ", ".join(_VERSION_COLUMNS)
            params = ", ".join(
                f"${i + 6}::jsonb" if i in json_idx else f"${i + 6}"
                for i in range(len(_VERSION_COLUMNS))
            )
            inserted = await conn.fetchrow(
                f"""INSERT INTO versions (model, version, seq, event_id, content_digest, {cols})
                    VALUES ($1, $2, $3, $4, $5, {params}) RETURNING *""",
                name,
                version,
                seq,
                event_id,
                content_digest,
                *values,
            )
            await add_event(conn, self.schema, event_factory(version, event_id))
            await audit.record(
                conn,
                service="registry",
                actor=row.get("created_by") or "unknown",
                action="model.register",
                subject=f"{name}@{version}",
                model=name,
                version=version,
                after={
                    "model_digest": row.get("model_digest"),
                    "content_digest": content_digest,
                    "source_commit": row.get("source_commit"),
                    "data_digest": row.get("data_digest"),
                    "parent": f"{row['parent_model']}@{row['parent_version']}"
                    if row.get("parent_model")
                    else None,
                    "retrain_request_id": row.get("retrain_request_id"),
                },
            )
            rec = _record(inserted)
            assert rec is not None
            return rec, True

    async def _version(self, conn: Conn, name: str, version: str) -> dict[str, Any] | None:
        return _record(
            await conn.fetchrow(
                "SELECT * FROM versions WHERE model = $1 AND version = $2", name, version
            )
        )

    async def get_version(self, name: str, version: str) -> dict[str, Any] | None:
        """One version's record."""
        async with self.pool.acquire() as conn:
            return await self._version(conn, name, version)

    async def list_models(self) -> list[dict[str, Any]]:
        """Every model with its latest version and version count."""
        rows = await self.pool.fetch(
            """SELECT m.name, m.created_at, count(v.version) AS versions,
                      (SELECT version FROM versions WHERE model = m.name
                        ORDER BY seq DESC LIMIT 1) AS latest
               FROM models m LEFT JOIN versions v ON v.model = m.name
               GROUP BY m.name, m.created_at ORDER BY m.name"""
        )
        return [dict(r) for r in rows]

    async def list_versions(self, name: str) -> list[dict[str, Any]]:
        """Every version of a model, oldest first."""
        rows = await self.pool.fetch("SELECT * FROM versions WHERE model = $1 ORDER BY seq", name)
        return [r for r in (_record(row) for row in rows) if r is not None]

    async def model_exists(self, name: str) -> bool:
        """Whether ``name`` is registered."""
        return bool(await self.pool.fetchval("SELECT 1 FROM models WHERE name = $1", name))

    async def aliases(self, name: str) -> dict[str, str]:
        """alias → version."""
        rows = await self.pool.fetch(
            "SELECT alias, version FROM aliases WHERE model = $1 ORDER BY alias", name
        )
        return {r["alias"]: r["version"] for r in rows}

    async def set_stage(
        self,
        name: str,
        version: str,
        stage: str,
        reason: str | None,
        actor: str,
        detail: dict[str, Any] | None = None,
        conn: Conn | None = None,
    ) -> dict[str, Any]:
        """Move a version to ``stage`` (audited), in ``conn``'s transaction or a new one;
        its record after.

        The same stage with the same reason again changes nothing (a retried call is not
        audited twice); a move :data:`STAGES` does not allow is a ``Conflict``."""
        if conn is None:
            async with self.pool.acquire() as own, own.transaction():
                return await self.set_stage(name, version, stage, reason, actor, detail, own)
        row = await conn.fetchrow(
            "SELECT * FROM versions WHERE model = $1 AND version = $2 FOR UPDATE", name, version
        )
        if row is None:
            raise NotFound(f"{name}@{version} is not registered")
        before, before_reason = row["stage"], row["stage_reason"]
        if before == stage and (stage != "deprecated" or row["stage_reason"] == reason):
            rec = _record(row)
            assert rec is not None
            return rec
        if before not in STAGES[stage]:
            raise Conflict(f"{name}@{version} is {before}; it cannot become {stage}")
        row = await conn.fetchrow(
            """UPDATE versions SET stage = $3, stage_reason = $4,
                   retired_at = CASE WHEN $3 = 'retired' THEN now() ELSE retired_at END,
                   archived_at = CASE WHEN $3 = 'archived' THEN now() ELSE archived_at END
               WHERE model = $1 AND version = $2 RETURNING *""",
            name,
            version,
            stage,
            reason,
        )
        if stage == "retired":
            # a retired version is nobody's champion or candidate any more
            gone = await conn.fetch(
                "DELETE FROM aliases WHERE model = $1 AND version = $2 RETURNING alias",
                name,
                version,
            )
            for alias in gone:
                await audit.record(
                    conn,
                    service="registry",
                    actor=actor,
                    action="model.alias",
                    subject=f"{name}:{alias['alias']}",
                    model=name,
                    version=version,
                    before={"version": version},
                    after={"version": None},
                    reason=f"{name}@{version} retired",
                )
        await audit.record(
            conn,
            service="registry",
            actor=actor,
            action=f"model.{stage.removesuffix('d')}",
            subject=f"{name}@{version}",
            model=name,
            version=version,
            before={"stage": before, "reason": before_reason},
            after={"stage": stage, **(detail or {})},
            reason=reason,
        )
        rec = _record(row)
        assert rec is not None
        return rec

    async def archive_due(
        self, retention_seconds: float, delete: ArchiveArtifacts
    ) -> dict[str, Any] | None:
        """Archive one retired version older than the retention (``None`` when there is
        none): ``delete`` removes its artifacts from the module store, keeping the digests
        another version that is not archived still references, and returns what it
        deleted; then the version becomes ``archived`` (audited). The row stays locked
        meanwhile (replicas skip it), so a crash in between leaves it retired and the
        next sweep deletes what is left."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """SELECT * FROM versions WHERE stage = 'retired'
                     AND retired_at <= now() - make_interval(secs => $1)
                   ORDER BY retired_at LIMIT 1 FOR UPDATE SKIP LOCKED""",
                retention_seconds,
            )
            if row is None:
                return None
            rec = _record(row)
            assert rec is not None
            shared = await conn.fetch(
                """SELECT artifact_manifest, build_detail->>'digest' AS image
                   FROM versions WHERE stage <> 'archived'
                     AND NOT (model = $1 AND version = $2)
                     AND (artifact_manifest = $3 OR build_detail->>'digest' = $4)""",
                rec["model"],
                rec["version"],
                rec["artifact_manifest"],
                (rec.get("build_detail") or {}).get("digest"),
            )
            keep = {d for r in shared for d in (r["artifact_manifest"], r["image"]) if d}
            deleted = await delete(rec, keep)
            return await self.set_stage(
                rec["model"],
                rec["version"],
                "archived",
                f"retention of {retention_seconds:g} s after retirement ran out",
                "service:registry",
                {"deleted": deleted},
                conn,
            )

    async def set_alias(self, name: str, alias: str, version: str, actor: str | None) -> None:
        """Point ``alias`` at ``version`` (the version must exist)."""
        sql = """INSERT INTO aliases (model, alias, version, updated_by) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (model, alias) DO UPDATE
                 SET version = EXCLUDED.version, updated_at = now(),
                     updated_by = EXCLUDED.updated_by"""
        async with self.pool.acquire() as conn, conn.transaction():
            stage = await conn.fetchval(
                "SELECT stage FROM versions WHERE model = $1 AND version = $2 FOR SHARE",
                name,
                version,
            )
            if stage in ("retired", "archived"):
                raise Conflict(f"{name}@{version} is {stage}; an alias cannot point at it")
            before = await conn.fetchval(
                "SELECT version FROM aliases WHERE model = $1 AND alias = $2", name, alias
            )
            await conn.execute(sql, name, alias, version, actor)
            await audit.record(
                conn,
                service="registry",
                actor=actor or "unknown",
                action="model.alias",
                subject=f"{name}:{alias}",
                model=name,
                version=version,
                before={"version": before},
                after={"version": version},
            )

    async def record_dlq_replays(self, actor: str, replays: list[dict[str, Any]]) -> list[int]:
        """Audit each replay (``dlq.replay``); remember the dead letters whose replay was
        acknowledged (their removal from the DLQ is not a drop). The audit sequences."""
        seqs = []
        async with self.pool.acquire() as conn, conn.transaction():
            for r in replays:
                after = {k: v for k, v in r.items() if k not in ("subject", "detail")}
                seqs.append(
                    await audit.record(
                        conn,
                        service="registry",
                        actor=actor,
                        action="dlq.replay",
                        subject=r["subject"],
                        model=r.get("model"),
                        version=r.get("version"),
                        after=after,
                        reason=r.get("detail"),
                    )
                )
                if r["outcome"] in dlq.REMOVED:
                    await conn.execute(
                        "INSERT INTO dlq_replayed (seq) VALUES ($1) ON CONFLICT DO NOTHING",
                        r["dlq_seq"],
                    )
        return seqs

    async def account_dlq(self, stream: str, first_seq: int) -> tuple[int, int]:
        """Account for the dead letters below ``first_seq`` (the DLQ stream's head now):
        (how many were dropped rather than replayed since the last look, the head then).

        The first look only notes the head; a head that went back (the stream was
        recreated) starts the count again. Replicas serialise on the row.
        """
        async with self.pool.acquire() as conn, conn.transaction():
            before = await conn.fetchval(
                "SELECT first_seq FROM dlq_watch WHERE stream = $1 FOR UPDATE", stream
            )
            if before is None or first_seq < before:
                await conn.execute(
                    """INSERT INTO dlq_watch (stream, first_seq) VALUES ($1, $2)
                       ON CONFLICT (stream) DO UPDATE
                       SET first_seq = EXCLUDED.first_seq, checked_at = now()""",
                    stream,
                    first_seq,
                )
                return 0, first_seq
            replayed = await conn.fetchval(
                """WITH gone AS (DELETE FROM dlq_replayed WHERE seq < $2 RETURNING seq)
                   SELECT count(*) FROM gone WHERE seq >= $1""",
                before,
                first_seq,
            )
            dropped = first_seq - before - int(replayed)
            await conn.execute(
                """UPDATE dlq_watch SET first_seq = $2, dropped = dropped + $3, checked_at = now()
                   WHERE stream = $1""",
                stream,
                first_seq,
                dropped,
            )
            return dropped, before
