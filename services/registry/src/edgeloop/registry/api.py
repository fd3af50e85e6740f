"""The registry's HTTP API (FastAPI; OpenAPI at ``/docs``). Thin: parse, call, answer."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from edgeloop.contracts.names import check_alias, check_model, check_version
from edgeloop.contracts.parsing import parse_duration
from edgeloop.kit import audit
from edgeloop.kit.api import (
    Actor,
    Admin,
    Deprecator,
    DlqReplayer,
    ModelWriter,
    Retirer,
    Who,
    may,
    new_api,
)
from edgeloop.kit.tokens import TokenError, issue_token, list_tokens, revoke_token
from edgeloop.registry.errors import InvalidInput, NotFound, RegistryError, TooLarge
from edgeloop.registry.service import Registration, Registry
from edgeloop.registry.store import PgStore

_HIDDEN = {"profile", "event_id", "seq"}

#: What a registration's body may hold besides its files: form fields and framing.
FORM_ALLOWANCE = 1 << 20


class AliasBody(BaseModel):
    """Body of ``PUT …/aliases/{alias}``."""

    version: str


def _public(record: dict[str, Any], *, with_profile: bool = False) -> dict[str, Any]:
    out = {k: v for k, v in record.items() if with_profile or k not in _HIDDEN}
    for k, v in list(out.items()):
        if hasattr(v, "isoformat"):
            out[k] = v.isoformat()
        elif k.endswith("_id") and v is not None:
            out[k] = str(v)
    return out


async def _read_limited(upload: UploadFile | None, limit: int, what: str) -> bytes | None:
    if upload is None:
        return None
    chunks: list[bytes] = []
    size = 0
    while chunk := await upload.read(1 << 20):
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"{what} file is larger than the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _kv(text: str | None, what: str) -> dict[str, str]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{what} must be a JSON object of strings: {exc}") from exc
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise InvalidInput(f'{what} must be a JSON object of strings, e.g. {{"lr": "0.1"}}')
    return value


class StageBody(BaseModel):
    """Body of a stage change (optional)."""

    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(default=None, max_length=2000)


class RetireBody(StageBody):
    """Body of ``POST …/retire`` (the deployer's, once no device runs the version)."""

    retirement_id: str | None = Field(default=None, max_length=64)
    requested_by: str | None = Field(default=None, max_length=200)
    replaced_by: str | None = Field(default=None, max_length=200)


class TokenBody(BaseModel):
    """Body of ``POST /api/v1/tokens``."""

    model_config = ConfigDict(extra="forbid")

    name: str
    role: str
    expires_in: str | None = Field(default=None, description="e.g. 30d, 12h; none: no expiry")


class DlqReplayBody(BaseModel):
    """One dead letter's replay, as ``edgeloop dlq replay`` reports it."""

    model_config = ConfigDict(extra="forbid")

    dlq_seq: int = Field(ge=1, description="the dead letter's id (its DLQ sequence)")
    subject: str = Field(min_length=1, max_length=1000, description="the original subject")
    consumer: str = Field(max_length=200)
    event_id: str | None = Field(default=None, max_length=100)
    model: str | None = Field(default=None, max_length=200)
    version: str | None = Field(default=None, max_length=200)
    # edgeloop.kit.dlq's outcomes
    outcome: Literal["replaying", "acked", "dead_lettered_again", "not_acked", "failed"]
    replay_seq: int | None = Field(default=None, description="the replay's stream sequence")
    new_dlq_seq: int | None = Field(default=None, description="dead-lettered again as")
    detail: str | None = Field(default=None, max_length=2000)


class DlqReplaysBody(BaseModel):
    """Body of ``POST /api/v1/dlq/replays``."""

    model_config = ConfigDict(extra="forbid")

    replays: list[DlqReplayBody] = Field(max_length=10_000)


def create_api(
    registry: Registry,
    store: PgStore,
    tokens: frozenset[str],
    retention_seconds: float = 30 * 24 * 3600,
) -> FastAPI:
    """The ASGI app (``retention_seconds``: how long a retired version waits for its
    archival, shown with it)."""

    def stage_times(record: dict[str, Any]) -> dict[str, Any]:
        retired = record.get("retired_at")
        due = retired + timedelta(seconds=retention_seconds) if retired else None
        return {"archive_at": record.get("archived_at") or due}

    api = new_api(
        title="edgeloop registry",
        version="1",
        description="Model versions, lineage, aliases and artifacts.",
    )

    @api.exception_handler(RegistryError)
    async def registry_error(_: Request, exc: RegistryError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    api.state.tokens = tokens
    api.state.pool = lambda: store.pool

    # the files at their limits, and the form's fields
    upload_limit = registry.max_model_bytes + 2 * registry.max_data_bytes + FORM_ALLOWANCE

    @api.post("/api/v1/models/{name}/versions", status_code=201, max_body_size=upload_limit)
    async def register(
        name: str,
        who: ModelWriter,
        caller: Who,
        model: Annotated[UploadFile, File(description="the ONNX model")],
        suite: Annotated[UploadFile | None, File(description="npz with X and y")] = None,
        reference: Annotated[UploadFile | None, File(description="npz with X")] = None,
        version: Annotated[str | None, Form()] = None,
        source_commit: Annotated[str | None, Form()] = None,
        data_digest: Annotated[str | None, Form()] = None,
        params: Annotated[str | None, Form(description="JSON object")] = None,
        tags: Annotated[str | None, Form(description="JSON object")] = None,
        parent: Annotated[str | None, Form(description="NAME@VERSION")] = None,
        retrain_request_id: Annotated[str | None, Form()] = None,
    ) -> JSONResponse:
        import uuid

        try:
            request_id = uuid.UUID(retrain_request_id) if retrain_request_id else None
        except ValueError as exc:
            raise InvalidInput(f"retrain_request_id is not a UUID: {exc}") from exc
        reg = Registration(
            name=check_model(name),
            version=version or None,
            model=await _read_limited(model, registry.max_model_bytes, "model") or b"",
            suite=await _read_limited(suite, registry.max_data_bytes, "suite"),
            reference=await _read_limited(reference, registry.max_data_bytes, "reference"),
            source_commit=source_commit or None,
            data_digest=data_digest or None,
            params=_kv(params, "params"),
            tags=_kv(tags, "tags"),
            parent=parent or None,
            retrain_request_id=request_id,
            actor=who,
            may_loosen_thresholds=may(caller, "thresholds.loosen"),
        )
        result = await registry.register(reg)
        body = {"name": result.name, "version": result.version, "created": result.created}
        body.update(_public(result.record))
        return JSONResponse(body, status_code=201 if result.created else 200)

    @api.post("/api/v1/tokens", status_code=201)
    async def issue(body: TokenBody, who: Admin) -> dict[str, Any]:
        """Issue a token with a role (its secret is in this answer only)."""
        try:
            expires = (
                timedelta(seconds=parse_duration(body.expires_in)) if body.expires_in else None
            )
            async with store.pool.acquire() as conn, conn.transaction():
                out = await issue_token(
                    conn,
                    name=body.name,
                    role=body.role,
                    actor=who,
                    expires_in=expires,
                    service="registry",
                )
        except (TokenError, ValueError) as exc:
            raise HTTPException(422, str(exc)) from exc
        return _public(out)

    @api.get("/api/v1/whoami")
    async def whoami(caller: Who) -> dict[str, Any]:
        """Who the token is: its name and role (what a front end, e.g. the console, shows
        and decides its buttons by; every API still checks the role itself)."""
        return {"name": caller.name, "role": caller.role}

    @api.get("/api/v1/tokens")
    async def tokens_list(_: Admin) -> dict[str, Any]:
        """Every issued token, without secrets."""
        async with store.pool.acquire() as conn:
            return {"tokens": [_public(t) for t in await list_tokens(conn)]}

    @api.post("/api/v1/tokens/{name}/revoke")
    async def revoke(name: str, who: Admin) -> dict[str, Any]:
        """Revoke a token: it is refused from now on."""
        try:
            async with store.pool.acquire() as conn, conn.transaction():
                return _public(await revoke_token(conn, name=name, actor=who, service="registry"))
        except KeyError:
            raise HTTPException(404, f"no active token named {name!r}") from None

    @api.get("/api/v1/audit")
    async def audit_log(
        _: Actor,
        model: str | None = None,
        version: str | None = None,
        since: datetime | None = None,
        limit: int = Query(200, ge=1, le=10_000),
    ) -> dict[str, Any]:
        """The platform's audit trail (every service's records), oldest first."""
        async with store.pool.acquire() as conn:
            rows = await audit.log(conn, model=model, version=version, since=since, limit=limit)
        return {"records": rows}

    @api.post("/api/v1/dlq/replays")
    async def dlq_replays(body: DlqReplaysBody, who: DlqReplayer) -> dict[str, Any]:
        """Audit dead-letter replays (``dlq.replay``): the CLI reports each one before it
        publishes (outcome ``replaying``) and once its outcome is known, before it deletes
        an acknowledged one from the DLQ (so its removal is not counted as a drop)."""
        replays = [r.model_dump() for r in body.replays]
        return {"recorded": await store.record_dlq_replays(who, replays)}

    @api.get("/api/v1/audit/verify")
    async def audit_verify(_: Actor) -> dict[str, Any]:
        """Walk the hash chain (and, with the audit key, every record's MAC): how many
        records, and the first broken link if any."""
        async with store.pool.acquire() as conn:
            verdict = await audit.verify(conn)
        return {
            "ok": verdict.ok,
            "records": verdict.records,
            "broken_at": verdict.broken_at,
            "problem": verdict.problem,
            "keyed": verdict.keyed,
        }

    @api.get("/api/v1/models")
    async def list_models(_: Actor) -> list[dict[str, Any]]:
        return [_public(m) for m in await store.list_models()]

    @api.get("/api/v1/models/{name}")
    async def show_model(name: str, _: Actor) -> dict[str, Any]:
        if not await store.model_exists(check_model(name)):
            raise NotFound(f"model {name!r} is not registered")
        return {
            "name": name,
            "aliases": await store.aliases(name),
            "versions": [_public(v) for v in await store.list_versions(name)],
        }

    @api.get("/api/v1/models/{name}/versions/{version}")
    async def show_version(
        name: str, version: str, _: Actor, profile: bool = False
    ) -> dict[str, Any]:
        record = await registry.get(name, version)
        aliases = {a: v for a, v in (await store.aliases(name)).items() if v == version}
        return {
            **_public({**record, **stage_times(record)}, with_profile=profile),
            "aliases": sorted(aliases),
        }

    @api.put("/api/v1/models/{name}/aliases/{alias}")
    async def set_alias(name: str, alias: str, body: AliasBody, who: ModelWriter) -> dict[str, str]:
        await registry.get(name, check_version(body.version))
        await store.set_alias(name, check_alias(alias), body.version, who)
        return {"name": name, "alias": alias, "version": body.version}

    @api.post("/api/v1/models/{name}/versions/{version}/deprecate")
    async def deprecate(
        name: str, version: str, who: Deprecator, body: StageBody | None = None
    ) -> dict[str, Any]:
        """Deprecate a version: new rollouts of it are refused, tools warn about it (a data
        scientist, or the deployer's own token while it retires the version)."""
        await registry.get(name, check_version(version))
        reason = body.reason if body else None
        return _public(await store.set_stage(name, version, "deprecated", reason, who))

    @api.post("/api/v1/models/{name}/versions/{version}/retire")
    async def retire(name: str, version: str, who: Retirer, body: RetireBody) -> dict[str, Any]:
        """Retire a version: no new rollouts or aliases; its aliases are removed; archived
        after the retention. Sets the stage only: the deployer calls it once no device
        runs the version (``POST /v1/retirements`` there checks and replaces)."""
        await registry.get(name, check_version(version))
        detail = body.model_dump(exclude={"reason"}, exclude_none=True)
        record = await store.set_stage(name, version, "retired", body.reason, who, detail)
        return _public({**record, **stage_times(record)})

    @api.get("/api/v1/models/{name}/aliases/{alias}")
    async def get_alias(name: str, alias: str, _: Actor) -> dict[str, Any]:
        version = (await store.aliases(check_model(name))).get(check_alias(alias))
        if version is None:
            raise NotFound(f"model {name!r} has no alias {alias!r}")
        return _public(await registry.get(name, version))

    return api
