"""A real deployment stack for tests: the registry service (API and its projection of
validation events), the gateway with enrolled agents, and the deployer as its own process
(so a test can SIGKILL it), each on private NATS and a private database.

The test plays the builder and the validator: it pushes a signed image and publishes
their ``image.built`` / ``validation.passed`` events, as they would. The test's own
clients hold the admin token (``TOKEN``, the installation operator's); the services call
each other with their own tokens (``DeployStack.service_tokens``: ``service:deployer``
…, installed into the database as the bootstrap does), as in ``make up`` and Compose.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from edgeloop.console.config import ConsoleSettings
from edgeloop.contracts import subjects as s
from edgeloop.contracts.events import Event, ImageBuilt, ValidationFailed, ValidationPassed
from edgeloop.devstack.servers import free_port
from edgeloop.devstack.testing import api_up, eventually, publish_event
from edgeloop.devstack.up import ServiceProcess
from edgeloop.edge.agent import Agent, AgentConfig, Faults
from edgeloop.kit.dbroles import install_tokens
from edgeloop.kit.service import Service
from edgeloop.kit.tokens import SERVICE_ROLES, ServiceToken
from edgeloop.registry.app import build as build_registry
from edgeloop.registry.config import RegistrySettings
from tests.edge_harness import TOKEN, EdgeStack, Image, edge_stack, push_model_image


async def lifecycle_events(
    js: JetStreamContext, subject: str, stream: str = s.STREAM_LIFECYCLE
) -> list[dict[str, Any]]:
    """Every event published on ``subject`` so far (``stream``: LIFECYCLE unless told,
    from the start, in the stream's order)."""
    sub = await js.pull_subscribe(
        subject,
        durable=None,
        stream=stream,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
    )
    out: list[dict[str, Any]] = []
    try:
        while True:
            try:
                msgs = await sub.fetch(100, timeout=0.5)
            except TimeoutError:
                break
            for msg in msgs:
                out.append(json.loads(msg.data))
                await msg.ack()
    finally:
        await sub.unsubscribe()
    return out


async def register_version(
    registry: httpx.AsyncClient,
    model: str,
    version: str,
    onnx: bytes,
    reference: bytes | None = None,
    suite: bytes | None = None,
    params: dict[str, str] | None = None,
) -> dict[str, Any] | None:
    """Register a version in the registry (its build and validation are pending; with a
    validation ``suite`` and ``params``, a validator passes it); its reference profile
    when a reference sample was given."""
    files = {"model": ("model.onnx", onnx)}
    if reference is not None:
        files["reference"] = ("reference.npz", reference)
    if suite is not None:
        files["suite"] = ("suite.npz", suite)
    data = {"version": version} | ({"params": json.dumps(params)} if params else {})
    resp = await registry.post(f"/api/v1/models/{model}/versions", files=files, data=data)
    assert resp.status_code in (200, 201), resp.text
    if reference is None:
        return None
    body = await registry.get(
        f"/api/v1/models/{model}/versions/{version}", params={"profile": "true"}
    )
    return dict(body.json()["profile"])


async def wait_validation(
    registry: httpx.AsyncClient, model: str, version: str, state: str
) -> None:
    """Until the registry's projection shows the version's validation ``state``."""

    async def projected() -> bool:
        body = (await registry.get(f"/api/v1/models/{model}/versions/{version}")).json()
        return bool(body.get("validation_state") == state)

    await eventually(projected, within=30, what=f"{model}@{version} {state} in the registry")


async def make_validated(
    js: JetStreamContext,
    registry: httpx.AsyncClient,
    registry_url: str,
    repo: str,
    model: str,
    version: str,
    onnx: bytes,
    reference: bytes | None = None,
) -> Image:
    """A registered, built and validated version, as the pipeline leaves it: the image
    pushed and signed (with the reference profile, as the builder does), ``image.built``
    and ``validation.passed`` published."""
    profile = await register_version(registry, model, version, onnx, reference)
    return await build_and_validate(js, registry, registry_url, repo, model, version, onnx, profile)


async def build_and_validate(
    js: JetStreamContext,
    registry: httpx.AsyncClient,
    registry_url: str,
    repo: str,
    model: str,
    version: str,
    onnx: bytes,
    profile: dict[str, Any] | None = None,
) -> Image:
    """What the builder and the validator do with a registered version: its image pushed
    and signed, ``image.built`` and ``validation.passed`` published; until the registry
    shows it validated."""
    image = await push_model_image(registry_url, repo, model, version, onnx, profile=profile)
    await publish_event(
        js,
        ImageBuilt(
            model=model,
            version=version,
            image=image.image,
            digest=image.digest,
            size=image.layer_size,
            model_digest=image.model_digest,
        ),
    )
    await publish_event(
        js,
        ValidationPassed(
            model=model,
            version=version,
            image=image.image,
            digest=image.digest,
            validated_tag=f"{version}-validated",
        ),
    )
    await wait_validation(registry, model, version, "passed")
    return image


#: A second operator's token (approvals need someone other than the requester).
APPROVER_TOKEN = "deploy-approver-token-2-5be07a"


async def service_tokens(admin_dsn: str) -> dict[str, str]:
    """A token of its own for every service that calls an API, installed (hashed, with
    its role) into the database of ``admin_dsn`` as the bootstrap does."""
    tokens = {name: secrets.token_urlsafe(24) for name in SERVICE_ROLES}
    await install_tokens(admin_dsn, [ServiceToken.of(n, t) for n, t in tokens.items()])
    return tokens


def deployer_process(
    root: Path,
    *,
    nats_url: str,
    dsn: str,
    registry_url: str,
    registry_api: str,
    gateway_api: str,
    api_port: int,
    instance: str,
    token: str,
    monitor_api: str | None = None,
    **extra: str,
) -> ServiceProcess:
    """``python -m edgeloop.deployer`` configured for a stack (not started); ``token``:
    the one it calls the registry and the gateway with (its own)."""
    http_port = free_port()
    env = {
        "EDGELOOP_NATS_URL": nats_url,
        "EDGELOOP_DATABASE_URL": dsn,
        "EDGELOOP_OCI_REGISTRY_URL": registry_url,
        "EDGELOOP_DEPLOYER_API_TOKENS": f"{TOKEN},{APPROVER_TOKEN}",
        "EDGELOOP_DEPLOYER_API_PORT": str(api_port),
        "EDGELOOP_DEPLOYER_HTTP_PORT": str(http_port),
        "EDGELOOP_DEPLOYER_REGISTRY_API": registry_api,
        "EDGELOOP_DEPLOYER_REGISTRY_TOKEN": token,
        "EDGELOOP_DEPLOYER_GATEWAY_API": gateway_api,
        "EDGELOOP_DEPLOYER_GATEWAY_TOKEN": token,
        "EDGELOOP_DEPLOYER_INSTANCE_ID": instance,
        **{f"EDGELOOP_DEPLOYER_{k.upper()}": v for k, v in extra.items()},
    }
    if monitor_api is not None:
        env["EDGELOOP_DEPLOYER_MONITOR_API"] = monitor_api
    return ServiceProcess("deployer", "edgeloop.deployer", http_port, env, root / "deployer.log")


@dataclass
class DeployStack:
    """Registry, gateway, deployer (a process) and agents on private servers."""

    edge: EdgeStack
    registry: httpx.AsyncClient
    api: httpx.AsyncClient
    deployer: ServiceProcess
    unique: str
    service_tokens: dict[str, str] = field(repr=False)
    """Each calling service's own token (``service_tokens``), by service."""
    monitor_port: int = 0
    """Where the deployer expects the monitor's API (``monitor_beside(…, monitor_port)``)."""
    agents: dict[str, Agent] = field(default_factory=dict)
    configs: dict[str, AgentConfig] = field(default_factory=dict)
    clock_shift: Path | None = None
    """The deployer's ``clock_shift_file``: :meth:`set_clock` moves its clock."""

    # --- the pipeline's part ----------------------------------------------------------

    async def register(self, model: str, version: str, onnx: bytes) -> None:
        """Register a version in the registry (its build and validation are pending)."""
        await register_version(self.registry, model, version, onnx)

    async def validated(
        self, model: str, version: str, onnx: bytes, reference: bytes | None = None
    ) -> Image:
        """A registered, built and validated version, as the pipeline leaves it."""
        return await make_validated(
            self.edge.js,
            self.registry,
            self.edge.registry_url,
            f"{self.edge.prefix}/images/{model}",
            model,
            version,
            onnx,
            reference,
        )

    async def build_and_validate(self, model: str, version: str, onnx: bytes) -> Image:
        """Play the builder and the validator for a version registered otherwise (e.g.
        from the console): its image carries the reference profile the registry keeps."""
        resp = await self.registry.get(
            f"/api/v1/models/{model}/versions/{version}", params={"profile": "true"}
        )
        resp.raise_for_status()
        return await build_and_validate(
            self.edge.js,
            self.registry,
            self.edge.registry_url,
            f"{self.edge.prefix}/images/{model}",
            model,
            version,
            onnx,
            resp.json().get("profile"),
        )

    async def failed_validation(self, model: str, version: str, onnx: bytes, why: str) -> None:
        """A registered version whose validation failed."""
        await self.register(model, version, onnx)
        await self.publish(ValidationFailed(model=model, version=version, reasons=[why]))
        await wait_validation(self.registry, model, version, "failed")

    async def publish(self, event: Event) -> None:
        """Publish ``event`` as its service's outbox relay would."""
        await publish_event(self.edge.js, event)

    # --- devices ---------------------------------------------------------------------------

    async def devices(
        self,
        n: int,
        labels: dict[str, str],
        *,
        prefix: str = "d",
        faults: Faults | None = None,
        start: bool = True,
        **config_overrides: Any,
    ) -> list[str]:
        """``n`` enrolled agents with ``labels``, connected — the gateway's registry shows
        them online — unless ``start`` is false (enrolled, never started: offline).
        ``AgentConfig`` fields can be overridden, e.g. ``telemetry_seconds``."""
        ids = [f"{prefix}{i:02d}-{self.unique}" for i in range(n)]
        for device in ids:
            config = await self.edge.enroll(device, labels)
            for key, value in config_overrides.items():
                setattr(config, key, value)
            self.configs[device] = config
            if start:
                self.agents[device] = await self.edge.start_agent(config, faults=faults)
        if start:
            await self.online(ids, True)
        return ids

    async def start_device(self, device: str) -> None:
        """Start (again) the agent of an enrolled device; until it is online."""
        self.agents[device] = await self.edge.start_agent(self.configs[device])
        await self.online([device], True)

    async def stop_device(self, device: str) -> None:
        """Stop the device's agent; until the gateway's registry shows it offline."""
        await self.edge.stop_agent(self.agents.pop(device))
        await self.online([device], False)

    async def online(self, devices: list[str], online: bool, *, within: float = 30) -> None:
        """Until the gateway's device registry shows each of ``devices`` online (or not)."""

        async def there() -> bool:
            for device in devices:
                resp = await self.edge.api.get(f"/v1/devices/{device}")
                if resp.json()["online"] is not online:
                    return False
            return True

        what = f"{len(devices)} devices {'online' if online else 'offline'}"
        await eventually(there, within=within, what=what)

    async def running(self, devices: list[str], image: Image, *, within: float = 60) -> None:
        """Until every device reports running ``image``."""

        async def all_running() -> bool:
            for d in devices:
                r = await self.edge.reported(d)
                if not r or r.get("state") != "running" or r.get("digest") != image.digest:
                    return False
            return True

        what = f"{len(devices)} devices on {image.version}"
        await eventually(all_running, within=within, what=what)

    # --- the deployer ------------------------------------------------------------------

    async def start(self, model: str, version: str, selector: dict[str, str], **kw: Any) -> Any:
        """``POST /v1/rollouts``: the response (status, JSON)."""
        resp = await self.api.post(
            "/v1/rollouts", json={"model": model, "version": version, "selector": selector, **kw}
        )
        return resp.status_code, resp.json()

    async def rollout(self, rollout_id: str) -> dict[str, Any]:
        resp = await self.api.get(f"/v1/rollouts/{rollout_id}", params={"devices": "true"})
        assert resp.status_code == 200, resp.text
        return dict(resp.json())

    async def in_wave(self, rollout_id: str, wave: int, *, within: float = 60) -> None:
        """Until the rollout's wave ``wave`` is converging or baking."""

        async def there() -> bool:
            r = await self.rollout(rollout_id)
            return r["current_wave"] == wave and r["wave_status"][wave]["state"] in (
                "converging",
                "baking",
            )

        await eventually(there, within=within, what=f"wave {wave} in progress")

    async def wait_rollout(
        self, rollout_id: str, *states: str, within: float = 90
    ) -> dict[str, Any]:
        """Until the rollout is in one of ``states``."""

        async def reached() -> dict[str, Any] | None:
            try:
                resp = await self.api.get(f"/v1/rollouts/{rollout_id}", params={"devices": "true"})
            except httpx.TransportError:
                return None  # the deployer is restarting
            if resp.status_code == 404:
                return None  # a request from the bus, not consumed yet
            body = resp.json()
            return body if body["state"] in states else None

        return dict(await eventually(reached, within=within, what=f"rollout in {states}"))

    async def wait_wave(self, rollout_id: str, wave: int, state: str, within: float = 60) -> None:
        """Until wave ``wave`` of the rollout is in ``state``."""

        async def reached() -> bool:
            return bool((await self.rollout(rollout_id))["wave_status"][wave]["state"] == state)

        await eventually(reached, within=within, what=f"wave {wave} {state}")

    async def action(self, rollout_id: str, verb: str, **body: Any) -> tuple[int, Any]:
        resp = await self.api.post(f"/v1/rollouts/{rollout_id}/{verb}", json=body or None)
        return resp.status_code, resp.json()

    def set_clock(self, at: datetime) -> None:
        """Move the deployer's clock (the one maintenance windows are judged by) so that
        it reads ``at`` now, and runs on from there."""
        assert self.clock_shift is not None
        shift = (at - datetime.now(UTC)).total_seconds()
        tmp = self.clock_shift.with_suffix(".tmp")
        tmp.write_text(f"{shift:.3f}")
        tmp.replace(self.clock_shift)  # the deployer never reads half a number

    async def monitor(self, path: str, **params: str) -> Any:
        """``GET`` of the monitor's API beside the stack (``monitor_beside(…,
        monitor_port)``): its JSON."""
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{self.monitor_port}",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=30,
        ) as client:
            resp = await client.get(path, params=params)
        assert resp.status_code == 200, resp.text
        return resp.json()

    async def events(self, subject: str) -> list[dict[str, Any]]:
        """Every event published on ``subject`` so far (LIFECYCLE, from the start)."""
        return await lifecycle_events(self.edge.js, subject)

    async def restart_deployer(self, *, kill: bool = True) -> None:
        """SIGKILL (or SIGTERM) the deployer process and start it again."""
        if kill:
            await asyncio.to_thread(self.deployer.kill)
        else:
            self.deployer.terminate()
            await asyncio.to_thread(self.deployer.proc.wait, 30)  # type: ignore[union-attr]
        self.deployer.start()
        await eventually(lambda: api_up(self.api), within=60, what="deployer API after restart")


@contextlib.asynccontextmanager
async def registry_service(
    nats_url: str, pg_dsn: str, registry_url: str, unique: str, **settings: Any
) -> AsyncIterator[tuple[Service, httpx.AsyncClient]]:
    """The registry service in this process, and a client of its API (with ``TOKEN``);
    ``settings``: ``RegistrySettings`` fields to override."""
    port = free_port()
    registry = build_registry(
        RegistrySettings(
            nats_url=nats_url,
            database_url=pg_dsn,
            oci_registry_url=registry_url,
            api_tokens=TOKEN,
            api_port=port,
            repository_prefix=f"d{unique}/models",
            **settings,
        )
    )
    async with (
        registry.running(),
        httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=30,
        ) as api,
    ):
        await eventually(lambda: api_up(api), what="registry API")
        yield registry, api


@contextlib.asynccontextmanager
async def deploy_stack(
    nats_url: str,
    pg_dsn: str,
    registry_url: str,
    root: Path,
    unique: str,
    gateway_settings: dict[str, Any] | None = None,
    **registry_settings: Any,
) -> AsyncIterator[DeployStack]:
    """Everything on the given (private) NATS and database (``registry_settings``:
    ``RegistrySettings`` fields to override; ``gateway_settings``: ``GatewaySettings``
    ones)."""
    deployer_port = free_port()
    monitor_port = free_port()
    tokens = await service_tokens(pg_dsn)
    async with (
        registry_service(nats_url, pg_dsn, registry_url, unique, **registry_settings) as (
            _,
            reg_api,
        ),
        edge_stack(nats_url, pg_dsn, registry_url, root, **(gateway_settings or {})) as edge,
    ):
        deployer = deployer_process(
            root,
            nats_url=nats_url,
            dsn=pg_dsn,
            registry_url=registry_url,
            registry_api=str(reg_api.base_url).rstrip("/"),
            gateway_api=f"http://127.0.0.1:{edge.settings.api_port}",
            api_port=deployer_port,
            instance=f"deployer-{unique}",
            token=tokens["deployer"],
            monitor_api=f"http://127.0.0.1:{monitor_port}",
            tick_seconds="0.2",
            retry_backoff="0.5,1",
            max_attempts="3",
            offline_grace_seconds="3",
            clock_shift_file=str(root / "deployer-clock-shift"),
        )
        deployer.start()
        try:
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{deployer_port}",
                headers={"Authorization": f"Bearer {TOKEN}"},
                timeout=30,
            ) as api:
                await eventually(lambda: api_up(api), within=60, what="deployer API")
                yield DeployStack(
                    edge,
                    reg_api,
                    api,
                    deployer,
                    unique,
                    tokens,
                    monitor_port,
                    clock_shift=root / "deployer-clock-shift",
                )
        finally:
            deployer.terminate()
            with contextlib.suppress(Exception):
                await asyncio.to_thread(deployer.proc.wait, 20)  # type: ignore[union-attr]
            deployer.kill()


def monitor_beside(
    deploy: DeployStack, nats_url: str, dsn: str, registry_url: str, port: int
) -> Service:
    """A monitor service for ``deploy``'s platform (2 s windows, judged quickly; its own
    token to the registry), its API on ``port``; run it with ``async with
    service.running()``."""
    from edgeloop.monitor.app import build as build_monitor
    from edgeloop.monitor.config import MonitorSettings

    return build_monitor(
        MonitorSettings(
            nats_url=nats_url,
            database_url=dsn,
            oci_registry_url=registry_url,
            api_tokens=TOKEN,
            api_port=port,
            registry_api=str(deploy.registry.base_url),
            registry_token=deploy.service_tokens["monitor"],
            window_seconds=2,
            grace_seconds=0.5,
            evaluate_seconds=0.2,
        )
    )


def console_beside(deploy: DeployStack, monitor_port: int, **settings: Any) -> ConsoleSettings:
    """``ConsoleSettings`` for a console over ``deploy``'s APIs and a monitor's on
    ``monitor_port`` (its own free port; ``settings``: fields to add or override); serve
    it with ``edgeloop.console.app.serving``."""
    return ConsoleSettings(
        port=free_port(),
        registry_api=str(deploy.registry.base_url),
        deployer_api=str(deploy.api.base_url),
        monitor_api=f"http://127.0.0.1:{monitor_port}",
        gateway_api=str(deploy.edge.api.base_url),
        **settings,
    )
