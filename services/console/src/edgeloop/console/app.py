"""The console's web app: sign-in, the pages, their live parts (server-sent events) and
the buttons.

Every page reads the platform through the services' HTTP APIs with the signed-in
person's token (:mod:`edgeloop.console.apis`); every button is a POST form carrying the
session's CSRF token, checked here (CSRF, then the role) before the service is called,
which checks the role again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

import uvicorn
from fastapi import Depends, FastAPI, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from markupsafe import Markup
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import UploadFile
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgeloop.console import views
from edgeloop.console.apis import ApiError, Apis, q
from edgeloop.console.config import ConsoleSettings
from edgeloop.console.sessions import SESSION_COOKIE, SIGNIN_COOKIE, Session, Sessions
from edgeloop.contracts.parsing import (
    format_pairs,
    format_rules,
    format_waves,
    parse_pairs,
    parse_rules,
    parse_selector,
    release_policy,
    rollout_knobs,
)
from edgeloop.kit.svg import line_chart

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
#: What a page may load: only the console's own scripts and styles (no CDN, no inline
#: script), and it may not be framed.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)


#: The monitor's drift report is a page of its own with inline styles and no script.
REPORT_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'"


class SignInNeeded(Exception):
    """No live session: the page sends the browser to the sign-in form."""


class SecurityHeaders:
    """Every answer gets the CSP and friends."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"content-security-policy" for k, _ in headers):
                    headers.append((b"content-security-policy", CSP.encode()))
                headers += [
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"same-origin"),
                    (b"x-frame-options", b"DENY"),
                ]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


def _safe_next(target: str | None) -> str:
    """A local path to go to after sign-in (never another site)."""
    if not target or not target.startswith("/") or target.startswith("//"):
        return "/"
    parts = urlsplit(target)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def _sessions(request: Request) -> Sessions:
    sessions: Sessions = request.app.state.sessions
    return sessions


def current(request: Request) -> Session:
    """The page's dependency: the signed-in session (else off to the sign-in form)."""
    session = _sessions(request).get(request.cookies.get(SESSION_COOKIE))
    if session is None:
        raise SignInNeeded
    return session


Who = Annotated[Session, Depends(current)]


def checked_post(capability: str) -> Callable[..., Awaitable[Session]]:
    """A POST route's dependency: a session, its CSRF token in the form, and a role with
    ``capability``; 403 with the reason otherwise (never a redirect: a forged form learns
    nothing and changes nothing)."""

    async def check(request: Request) -> Session:
        session = _sessions(request).get(request.cookies.get(SESSION_COOKIE))
        if session is None:
            raise HTTPException(403, "not signed in")
        form = await request.form()
        token = form.get("csrf")
        if not session.csrf_ok(token if isinstance(token, str) else None):
            raise HTTPException(403, "the form's CSRF token is missing or wrong; reload the page")
        if not session.may(capability):
            raise HTTPException(
                403, f"{session.name} has the role {session.role}, which may not do this"
            )
        return session

    return check


#: The register form's optional text fields, passed to the registry as they are.
REGISTER_FIELDS = ("version", "source_commit", "data_digest", "parent", "retrain_request_id")

#: A release policy's fields the console's form does not show: a PUT from the form keeps
#: them as they are (``edgeloop rollout policy set`` sets them).
POLICY_KEPT = (
    "converge_timeout_seconds",
    "window",
    "max_unavailable",
    "max_unavailable_percent",
    "shadow_first",
)

RolloutWriter = Annotated[Session, Depends(checked_post("rollouts.write"))]
MonitorWriter = Annotated[Session, Depends(checked_post("monitor.write"))]
DataWriter = Annotated[Session, Depends(checked_post("data.write"))]
ModelWriter = Annotated[Session, Depends(checked_post("models.write"))]


def create_app(settings: ConsoleSettings) -> FastAPI:
    """The console app for ``settings`` (its API clients open in its lifespan)."""
    sessions = Sessions(settings.session_hours * 3600)
    state: dict[str, Apis] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state["apis"] = Apis.open(settings)
        try:
            yield
        finally:
            await state.pop("apis").aclose()

    app = FastAPI(
        title="edgeloop console", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    app.state.sessions = sessions
    app.add_middleware(SecurityHeaders)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.globals["colour"] = views.colour
    templates.env.globals["prometheus_url"] = settings.prometheus_url
    # a policy and rules shown (and put in their forms) as people write them
    templates.env.globals.update(
        format_pairs=format_pairs, format_waves=format_waves, format_rules=format_rules
    )

    def apis() -> Apis:
        return state["apis"]

    # --- sessions ---------------------------------------------------------------------

    @app.exception_handler(SignInNeeded)
    async def to_signin(request: Request, _: Exception) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/signin?next={quote(target)}", status_code=303)

    @app.exception_handler(HTTPException)
    async def refused(request: Request, exc: HTTPException) -> Response:
        return templates.TemplateResponse(
            request,
            "error.html",
            {"status": exc.status_code, "detail": exc.detail, "session": None},
            status_code=exc.status_code,
        )

    def page(request: Request, template: str, session: Session | None, **context: Any) -> Response:
        status = int(context.pop("status", 200))
        return templates.TemplateResponse(
            request, template, {"session": session, **context}, status_code=status
        )

    async def or_error(call: Awaitable[Any]) -> tuple[Any, str | None]:
        """The answer, or None and the API's message (one part of a page failing does
        not fail the page)."""
        try:
            return await call, None
        except ApiError as exc:
            return None, exc.detail

    def api_failed(request: Request, session: Session, exc: ApiError) -> Response:
        if exc.status == 401:  # revoked or expired since sign-in
            sessions.close(request.cookies.get(SESSION_COOKIE))
            return RedirectResponse("/signin", status_code=303)
        return page(request, "error.html", session, status=exc.status, detail=str(exc))

    # --- health -----------------------------------------------------------------------

    @app.get("/healthz")
    @app.get("/readyz")
    async def healthz() -> dict[str, str]:
        """The process serves (the APIs' health is on the overview: each has its own)."""
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        """The process's metrics, for Prometheus (``make up`` scrapes it with the others)."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    # --- sign-in ----------------------------------------------------------------------

    @app.get("/signin", response_class=HTMLResponse)
    async def signin_form(request: Request, next: str | None = None) -> Response:
        csrf = secrets.token_urlsafe(32)
        resp = page(request, "signin.html", None, csrf=csrf, next=_safe_next(next))
        resp.set_cookie(
            SIGNIN_COOKIE,
            csrf,
            httponly=True,
            samesite="strict",
            secure=settings.secure_cookies,
            max_age=3600,
        )
        return resp

    @app.post("/signin")
    async def signin(
        request: Request,
        token: Annotated[str, Form()],
        csrf: Annotated[str, Form()] = "",
        next: Annotated[str, Form()] = "/",
    ) -> Response:
        expected = request.cookies.get(SIGNIN_COOKIE, "")
        if not expected or not secrets.compare_digest(expected.encode(), csrf.encode()):
            raise HTTPException(403, "the sign-in form's CSRF token is missing or wrong; reload it")
        try:
            who = await apis().whoami(token.strip())
        except ApiError as exc:
            fresh = secrets.token_urlsafe(32)
            resp = page(
                request,
                "signin.html",
                None,
                csrf=fresh,
                next=_safe_next(next),
                error=exc.detail if exc.status != 503 else str(exc),
                status=401 if exc.status in (401, 403) else exc.status,
            )
            resp.set_cookie(SIGNIN_COOKIE, fresh, httponly=True, samesite="strict", max_age=3600)
            return resp
        sid, _ = sessions.open(token.strip(), who["name"], who["role"])
        resp = RedirectResponse(_safe_next(next), status_code=303)
        resp.set_cookie(
            SESSION_COOKIE,
            sid,
            httponly=True,
            samesite="strict",
            secure=settings.secure_cookies,
            max_age=int(settings.session_hours * 3600),
        )
        resp.delete_cookie(SIGNIN_COOKIE)
        return resp

    @app.post("/signout")
    async def signout(request: Request, csrf: Annotated[str, Form()] = "") -> Response:
        session = sessions.get(request.cookies.get(SESSION_COOKIE))
        if session is not None and not session.csrf_ok(csrf):
            raise HTTPException(403, "the form's CSRF token is missing or wrong; reload the page")
        sessions.close(request.cookies.get(SESSION_COOKIE))
        resp = RedirectResponse("/signin", status_code=303)
        resp.delete_cookie(SESSION_COOKIE)
        return resp

    # --- overview ---------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse)
    async def overview(request: Request, who: Who) -> Response:
        a, t = apis(), who.token
        (
            health,
            dlq,
            (rollouts, rollouts_error),
            (alarms, alarms_error),
            (counts, devices_error),
        ) = await asyncio.gather(
            a.health(),
            a.dlq_depth(),
            or_error(a.get("deployer", "/v1/rollouts", t, state="active", limit=100)),
            or_error(a.get("monitor", "/v1/alarms", t, open="true", limit=50)),
            or_error(a.get("gateway", "/v1/device-counts", t)),
        )
        for r in (rollouts or {}).get("rollouts", []):
            r["progress"] = views.wave_progress(r)
        return page(
            request,
            "overview.html",
            who,
            health=health,
            dlq=dlq,
            rollouts=(rollouts or {}).get("rollouts", []),
            rollouts_error=rollouts_error,
            alarms=(alarms or {}).get("alarms", []),
            alarms_error=alarms_error,
            online=(counts or {}).get("online"),
            offline=(counts or {}).get("offline"),
            devices_error=devices_error,
        )

    # --- rollouts ---------------------------------------------------------------------

    @app.get("/rollouts", response_class=HTMLResponse)
    async def rollouts(request: Request, who: Who, model: str | None = None) -> Response:
        try:
            body = await apis().get("deployer", "/v1/rollouts", who.token, model=model, limit=100)
        except ApiError as exc:
            return api_failed(request, who, exc)
        for r in body["rollouts"]:
            r["progress"] = views.wave_progress(r)
        return page(request, "rollouts.html", who, rollouts=body["rollouts"], model=model)

    async def rollout_fragment(request: Request, who: Session, rollout_id: str) -> str:
        r = await apis().get("deployer", f"/v1/rollouts/{q(rollout_id)}", who.token)
        template = templates.get_template("_waves.html")
        return template.render(
            request=request,
            session=who,
            r=r,
            waves=views.wave_rows(r),
            actions=views.actions_for(r["state"]) if who.may("rollouts.write") else [],
        )

    def rollout_page(
        request: Request, who: Session, rollout_id: str, fragment: str, **extra: Any
    ) -> Response:
        """The rollout's page around its waves' fragment, live from the one it shows."""
        return page(
            request,
            "rollout.html",
            who,
            rollout_id=rollout_id,
            fragment=fragment,
            seen=digest(fragment),
            **extra,
        )

    @app.get("/rollouts/{rollout_id}", response_class=HTMLResponse)
    async def rollout(
        request: Request,
        who: Who,
        rollout_id: str,
        done: str | None = None,
    ) -> Response:
        try:
            fragment = await rollout_fragment(request, who, rollout_id)
        except ApiError as exc:
            return api_failed(request, who, exc)
        return rollout_page(request, who, rollout_id, fragment, done=done)

    @app.get("/rollouts/{rollout_id}/live")
    async def rollout_live(
        request: Request, who: Who, rollout_id: str, seen: str | None = None
    ) -> Response:
        """Server-sent events: the waves' fragment each time it changes (``seen``: the
        digest of the one the page has)."""

        async def fragment() -> str:
            return await rollout_fragment(request, who, rollout_id)

        return StreamingResponse(
            _events(request, fragment, settings.live_poll_seconds, sessions, seen),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    @app.post("/rollouts/{rollout_id}/{verb}")
    async def rollout_action(
        request: Request,
        rollout_id: str,
        verb: str,
        who: RolloutWriter,
    ) -> Response:
        if verb not in views.ROLLOUT_ACTIONS:
            raise HTTPException(
                404, f"no action {verb!r}; actions: {', '.join(views.ROLLOUT_ACTIONS)}"
            )
        form = await request.form()
        reason = str(form.get("reason") or "") or None
        try:
            await apis().post(
                "deployer",
                f"/v1/rollouts/{q(rollout_id)}/{verb}",
                who.token,
                json={"reason": reason} if reason else None,
            )
        except ApiError as exc:
            if exc.status == 401:
                return api_failed(request, who, exc)
            try:
                fragment = await rollout_fragment(request, who, rollout_id)
            except ApiError:
                fragment = ""
            refused = f"{verb} refused by the deployer: {exc.detail}"
            return rollout_page(
                request, who, rollout_id, fragment, refused=refused, status=exc.status
            )
        return RedirectResponse(f"/rollouts/{q(rollout_id)}?done={verb}", status_code=303)

    # --- models -----------------------------------------------------------------------

    async def models_page(
        request: Request, who: Session, status: int = 200, **extra: Any
    ) -> Response:
        """The list of models, with the register form (``extra``: its error and values)."""
        try:
            body = await apis().get("registry", "/api/v1/models", who.token)
        except ApiError as exc:
            return api_failed(request, who, exc)
        return page(request, "models.html", who, models=body, status=status, **extra)

    @app.get("/models", response_class=HTMLResponse)
    async def models(request: Request, who: Who) -> Response:
        return await models_page(request, who)

    @app.post("/models/register")
    async def register(request: Request, who: ModelWriter) -> Response:
        """The register form, posted on as ``edgeloop models register`` does: the files
        go to the registry as they were spooled here (to disk past 1 MiB), read in chunks
        on the way out, never whole in memory."""
        form = await request.form()
        fields = {k: str(form.get(k) or "").strip() for k in ("name", "params", *REGISTER_FIELDS)}

        def refused(status: int, message: str) -> Awaitable[Response]:
            return models_page(request, who, status, register_error=message, form=fields)

        files: dict[str, tuple[str, Any, str]] = {}
        for part in ("model", "suite", "reference"):
            upload = form.get(part)
            if isinstance(upload, UploadFile) and upload.filename:
                files[part] = (
                    upload.filename,
                    upload.file,
                    upload.content_type or "application/octet-stream",
                )
        if not fields["name"]:
            return await refused(422, "give the model a name")
        if "model" not in files:
            return await refused(422, "choose the model's ONNX file")
        try:
            params = parse_pairs(fields["params"].splitlines(), "a params line")
        except ValueError as exc:
            return await refused(422, str(exc))
        data = {"params": json.dumps(params)} | {k: fields[k] for k in REGISTER_FIELDS if fields[k]}
        try:
            body = await apis().call(
                "registry",
                "POST",
                f"/api/v1/models/{q(fields['name'])}/versions",
                who.token,
                data=data,
                files=files,
            )
        except ApiError as exc:
            if exc.status == 401:
                return api_failed(request, who, exc)
            return await refused(exc.status, f"the registry refused it: {exc.detail}")
        done = "registered" if body.get("created", True) else "already registered"
        target = f"/models/{q(body['name'])}/versions/{q(body['version'])}"
        return RedirectResponse(f"{target}?done={quote(done)}", status_code=303)

    async def model_page(
        request: Request, who: Session, name: str, status: int = 200, **extra: Any
    ) -> Response:
        """A model's page: its versions, release policy and monitor rules (``extra``: a
        form's error and values, ``done``)."""
        a, t = apis(), who.token
        try:
            body = await a.get("registry", f"/api/v1/models/{q(name)}", t)
        except ApiError as exc:
            return api_failed(request, who, exc)
        (policy, policy_error), (rules, rules_error) = await asyncio.gather(
            or_error(a.get("deployer", f"/v1/policies/{q(name)}", t)),
            or_error(a.get("monitor", f"/v1/rules/{q(name)}", t)),
        )
        return page(
            request,
            "model.html",
            who,
            model=body,
            name=name,
            policy=policy,
            policy_error=policy_error,
            rules=rules,
            rules_error=rules_error,
            status=status,
            **extra,
        )

    @app.get("/models/{name}", response_class=HTMLResponse)
    async def model(request: Request, who: Who, name: str, done: str | None = None) -> Response:
        return await model_page(request, who, name, done=done)

    @app.post("/models/{name}/policy")
    async def set_policy(
        request: Request,
        name: str,
        who: RolloutWriter,
        auto_rollout: Annotated[str, Form()] = "",
        selector: Annotated[str, Form()] = "",
        waves: Annotated[str, Form()] = "",
        bake: Annotated[str, Form()] = "",
        max_failures: Annotated[str, Form()] = "",
        approval: Annotated[str, Form()] = "none",
        approval_labels: Annotated[str, Form()] = "",
    ) -> Response:
        """The release policy form, as ``edgeloop rollout policy set`` sends it. The PUT
        replaces the policy: what the form does not show (converge timeout, maintenance
        window, disruption budget, shadow phase first) is kept from the current one."""
        fields = {
            "auto_rollout": auto_rollout,
            "selector": selector.strip(),
            "waves": waves.strip(),
            "bake": bake.strip(),
            "max_failures": max_failures.strip(),
            "approval": approval.strip(),
            "approval_labels": approval_labels.strip(),
        }

        def refused(status: int, message: str) -> Awaitable[Response]:
            return model_page(
                request, who, name, status, policy_form_error=message, policy_form=fields
            )

        try:
            body = release_policy(
                bool(auto_rollout),
                fields["selector"],
                fields["waves"],
                fields["bake"],
                fields["max_failures"] or None,
                approval=fields["approval"],
                approval_labels=fields["approval_labels"],
            )
        except ValueError as exc:
            return await refused(422, str(exc))
        a, path = apis(), f"/v1/policies/{q(name)}"
        try:
            current = await a.get("deployer", path, who.token)
            if current.get("defined"):
                body |= {k: current[k] for k in POLICY_KEPT if current.get(k) is not None}
            await a.call("deployer", "PUT", path, who.token, json=body)
        except ApiError as exc:
            if exc.status == 401:
                return api_failed(request, who, exc)
            return await refused(exc.status, f"the deployer refused it: {exc.detail}")
        return RedirectResponse(f"/models/{q(name)}?done=policy+set#policy", status_code=303)

    @app.post("/models/{name}/rules")
    async def set_rules(
        request: Request,
        name: str,
        who: MonitorWriter,
        rules: Annotated[str, Form()] = "",
    ) -> Response:
        """The monitor rules form (YAML, as ``edgeloop monitor rules set --file`` reads
        it): the model's own rules replaced."""

        def refused(status: int, message: str) -> Awaitable[Response]:
            return model_page(
                request, who, name, status, rules_form_error=message, rules_form=rules
            )

        try:
            body = parse_rules(rules)
        except ValueError as exc:
            return await refused(422, str(exc))
        try:
            await apis().call(
                "monitor", "PUT", f"/v1/rules/{q(name)}", who.token, json={"rules": body}
            )
        except ApiError as exc:
            if exc.status == 401:
                return api_failed(request, who, exc)
            return await refused(exc.status, f"the monitor refused them: {exc.detail}")
        return RedirectResponse(f"/models/{q(name)}?done=rules+set#rules", status_code=303)

    async def version_page(
        request: Request, who: Session, name: str, version: str, status: int = 200, **extra: Any
    ) -> Response:
        """A version's page (``extra``: the rollout form's error and values, ``done``)."""
        a, t = apis(), who.token
        try:
            record = await a.get(
                "registry", f"/api/v1/models/{q(name)}/versions/{q(version)}", t, profile="true"
            )
        except ApiError as exc:
            return api_failed(request, who, exc)
        (audit, audit_error), (rolls, rolls_error) = await asyncio.gather(
            or_error(a.get("registry", "/api/v1/audit", t, model=name, version=version)),
            or_error(a.get("deployer", "/v1/rollouts", t, model=name, limit=100)),
        )
        trace, trace_error, length = None, None, 0.0
        bars: list[views.Bar] = []
        parent = record.get("trace_parent")
        if parent:
            try:
                trace = await a.trace(str(parent).split("-")[1])
            except ApiError as exc:
                trace_error = exc.detail
            if trace:
                bars, length = views.waterfall(trace)
        return page(
            request,
            "version.html",
            who,
            name=name,
            version=version,
            v=record,
            audit=(audit or {}).get("records", []),
            audit_error=audit_error,
            rollouts=[r for r in (rolls or {}).get("rollouts", []) if r["version"] == version],
            rollouts_error=rolls_error,
            trace_id=str(parent).split("-")[1] if parent else None,
            trace_error=trace_error,
            bars=bars,
            length=length,
            services=sorted({b.service for b in bars}),
            status=status,
            **extra,
        )

    @app.get("/models/{name}/versions/{version}", response_class=HTMLResponse)
    async def version(
        request: Request, who: Who, name: str, version: str, done: str | None = None
    ) -> Response:
        return await version_page(request, who, name, version, done=done)

    @app.post("/models/{name}/versions/{version}/rollout")
    async def start_rollout(
        request: Request,
        name: str,
        version: str,
        who: RolloutWriter,
        selector: Annotated[str, Form()] = "",
        waves: Annotated[str, Form()] = "",
        bake: Annotated[str, Form()] = "",
        max_failures: Annotated[str, Form()] = "",
    ) -> Response:
        """The rollout form, as ``edgeloop rollout start NAME@V`` sends it; then the new
        rollout's live page."""
        fields = {
            "selector": selector.strip(),
            "waves": waves.strip(),
            "bake": bake.strip(),
            "max_failures": max_failures.strip(),
        }
        try:
            labels = parse_selector(fields["selector"])
            if not labels:
                raise ValueError("give the devices' selector, e.g. site=plant-1")
            knobs = rollout_knobs(
                fields["waves"], fields["bake"], fields["max_failures"] or None, None
            )
        except ValueError as exc:
            return await version_page(
                request, who, name, version, 422, rollout_error=str(exc), form=fields
            )
        body = {"model": name, "version": version, "selector": labels, **knobs}
        try:
            r = await apis().post("deployer", "/v1/rollouts", who.token, json=body)
        except ApiError as exc:
            if exc.status == 401:
                return api_failed(request, who, exc)
            return await version_page(
                request,
                who,
                name,
                version,
                exc.status,
                rollout_error=f"the deployer refused it: {exc.detail}",
                form=fields,
            )
        return RedirectResponse(f"/rollouts/{q(r['rollout_id'])}?done=start", status_code=303)

    # --- devices ----------------------------------------------------------------------

    @app.get("/devices", response_class=HTMLResponse)
    async def devices(
        request: Request,
        who: Who,
        selector: str | None = None,
        online: str | None = None,
        model: str | None = None,
    ) -> Response:
        state = {"yes": "true", "no": "false"}.get(online or "")
        try:
            body = await apis().get(
                "gateway",
                "/v1/devices",
                who.token,
                selector=selector or None,
                online=state,
                limit=1000,
            )
        except ApiError as exc:
            return api_failed(request, who, exc)
        rows = [d for d in body["devices"] if not model or d.get("model") == model]
        return page(
            request,
            "devices.html",
            who,
            devices=rows,
            selector=selector or "",
            online=online or "",
            model=model or "",
        )

    @app.get("/devices/{device_id}", response_class=HTMLResponse)
    async def device(request: Request, who: Who, device_id: str) -> Response:
        a, t = apis(), who.token
        try:
            record = await a.get("gateway", f"/v1/devices/{q(device_id)}", t)
        except ApiError as exc:
            return api_failed(request, who, exc)
        history, history_error = await or_error(
            a.get("deployer", f"/v1/devices/{q(device_id)}/rollouts", t, limit=20)
        )
        return page(
            request,
            "device.html",
            who,
            d=record,
            history=(history or {}).get("rollouts", []),
            history_error=history_error,
        )

    # --- monitoring -------------------------------------------------------------------

    @app.get("/monitoring", response_class=HTMLResponse)
    async def monitoring(
        request: Request,
        who: Who,
        done: str | None = None,
        show: str = "open",
        model: str | None = None,
        version: str | None = None,
        group: str | None = None,
    ) -> Response:
        a, t = apis(), who.token
        try:
            body = await a.get(
                "monitor",
                "/v1/alarms",
                t,
                open="true" if show == "open" else None,
                model=model or None,
            )
        except ApiError as exc:
            return api_failed(request, who, exc)
        charts: dict[str, Markup] = {}
        groups: list[str] = []
        kpis: dict[str, Any] = {}
        samples: list[dict[str, Any]] = []
        threshold, drift_error = None, None
        if model:
            (windows, drift_error), (rules, _), (found, _) = await asyncio.gather(
                or_error(
                    a.get("monitor", "/v1/windows", t, model=model, version=version, limit=500)
                ),
                or_error(a.get("monitor", f"/v1/rules/{q(model)}", t)),
                or_error(a.get("monitor", "/v1/samples", t, model=model, kind="all", limit=50)),
            )
            threshold = float(((rules or {}).get("rules") or {}).get("drift_psi", 0.25))
            groups, series = views.psi_series((windows or {}).get("windows", []), group)
            kpis = views.latest_kpis((windows or {}).get("windows", []))
            charts = {
                name: Markup(line_chart(points, threshold, f"{name}: PSI per window"))
                for name, points in sorted(series.items())
            }
            samples = (found or {}).get("samples", [])[-50:]
        return page(
            request,
            "monitoring.html",
            who,
            alarms=body["alarms"],
            done=done,
            show=show,
            model=model or "",
            version=version or "",
            group=group or (groups[0] if groups else ""),
            groups=groups,
            charts=charts,
            threshold=threshold,
            kpis=kpis,
            samples=samples,
            drift_error=drift_error,
        )

    @app.get("/monitoring/report", response_class=HTMLResponse)
    async def drift_report(request: Request, who: Who, model: str, version: str) -> Response:
        """The monitor's drift report (reference vs current histograms per feature), as
        the monitor renders it: its own inline styles, no script."""
        try:
            resp = await apis().send(
                "monitor",
                "GET",
                "/v1/report",
                who.token,
                params={"model": model, "version": version},
            )
        except ApiError as exc:
            return api_failed(request, who, exc)
        return HTMLResponse(
            resp.text,
            headers={"Content-Security-Policy": REPORT_CSP},
        )

    @app.post("/samples/{sample_id}/label")
    async def label(
        request: Request,
        sample_id: int,
        who: DataWriter,
        model: Annotated[str, Form()] = "",
        label: Annotated[str, Form()] = "",
    ) -> Response:
        if not label.strip():
            raise HTTPException(422, "give the sample a label")
        try:
            await apis().post(
                "monitor",
                f"/v1/samples/{sample_id}/label",
                who.token,
                json={"label": label.strip()},
            )
        except ApiError as exc:
            return api_failed(request, who, exc)
        return RedirectResponse(f"/monitoring?model={quote(model)}&done=labelled", status_code=303)

    @app.post("/alarms/{alarm_id}/ack")
    async def ack(
        request: Request,
        alarm_id: str,
        who: MonitorWriter,
    ) -> Response:
        try:
            await apis().post("monitor", f"/v1/alarms/{q(alarm_id)}/ack", who.token)
        except ApiError as exc:
            return api_failed(request, who, exc)
        return RedirectResponse("/monitoring?done=acknowledged", status_code=303)

    return app


async def _events(
    request: Request,
    render: Callable[[], Awaitable[str]],
    every: float,
    sessions: Sessions,
    seen: str | None = None,
) -> AsyncIterator[str]:
    """``update`` events carrying the rendered fragment each time it changes (an
    ``error`` event while the API fails); until the browser goes or the session ends.
    ``seen``: the digest of the fragment the page was rendered with (not sent again: a
    replaced fragment under the pointer would swallow a click)."""
    last = seen
    sid = request.cookies.get(SESSION_COOKIE)
    yield "retry: 2000\n\n"
    while not await request.is_disconnected() and sessions.get(sid) is not None:
        try:
            html, kind = await render(), "update"
        except ApiError as exc:
            html, kind = str(Markup("<p class='error'>{}</p>").format(str(exc))), "error"
        if digest(html) != last:
            last = digest(html)
            data = "\n".join(f"data: {line}" for line in html.splitlines() or [""])
            yield f"event: {kind}\n{data}\n\n"
        await asyncio.sleep(every)


def digest(fragment: str) -> str:
    """A short digest of a rendered fragment (has it changed?)."""
    return hashlib.sha256(fragment.encode()).hexdigest()[:20]


@contextlib.asynccontextmanager
async def serving(settings: ConsoleSettings) -> AsyncIterator[str]:
    """The console served by uvicorn in this event loop (tests, benchmarks); its URL."""
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings), host=settings.host, port=settings.port, log_level="warning"
        )
    )
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()  # it could not start: its error
                raise RuntimeError("the console stopped before it started")
            await asyncio.sleep(0.05)
        yield f"http://{settings.host}:{settings.port}"
    finally:
        server.should_exit = True
        await task


def main() -> None:
    """Serve the console until SIGINT/SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = ConsoleSettings()
    log.info("console on http://%s:%d", settings.host, settings.port)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning")
