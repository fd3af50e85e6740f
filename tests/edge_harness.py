"""A real edge stack for tests: the gateway service (gRPC with mTLS, HTTP API) on real
NATS, PostgreSQL and the OCI registry; signed model images pushed the way the builder
pushes them; agents enrolled through the gateway's API.

Used by the gateway/agent tests and, later, by the deployer's.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from nats.aio.client import Client as Nats
from nats.js import JetStreamContext

from edgeloop.contracts import subjects as s
from edgeloop.contracts.signing import release_annotations
from edgeloop.contracts.twin import DesiredModel
from edgeloop.devstack.servers import free_port
from edgeloop.devstack.testing import api_up, eventually
from edgeloop.edge.agent import Agent, AgentConfig, Faults, ModelCache
from edgeloop.edge.buffer import MemoryBuffer
from edgeloop.edge.bundle import write_bundle
from edgeloop.gateway.app import build as build_gateway
from edgeloop.gateway.config import GatewaySettings
from edgeloop.kit.oci import OciClient
from edgeloop.kit.oci.client import sha256
from edgeloop.kit.oci.image import build_model_image, push_image
from edgeloop.kit.oci.signing import (
    attach_signature,
    generate_keypair,
    load_private_key,
    load_public_key,
    sign_rotation,
)
from edgeloop.kit.service import Service

TOKEN = "edge-test-token-7f3a-91c2d84e"
PRIVATE, PUBLIC = generate_keypair()
_RELEASES: dict[str, int] = {}
"""The last release counter signed per repository (the builder keeps it per model)."""


@dataclass(frozen=True)
class Image:
    """A model image in the registry."""

    model: str
    version: str
    image: str
    digest: str
    model_digest: str
    layer_size: int

    def desired(self, **extra: Any) -> DesiredModel:
        """This image as a device's desired state."""
        return DesiredModel(
            model=self.model,
            version=self.version,
            image=self.image,
            manifest_digest=self.digest,
            model_digest=self.model_digest,
            **extra,
        )


async def push_model_image(
    registry_url: str,
    repo: str,
    model: str,
    version: str,
    onnx: bytes,
    *,
    profile: dict[str, Any] | None = None,
    sign: bool = True,
    key: bytes = PRIVATE,
    filler: int = 0,
    release: int | None = None,
) -> Image:
    """Build, push to ``repo`` and (optionally) sign a model image as the builder does:
    the signature claims model, version and the next release counter of ``repo`` (or
    ``release``)."""
    files: dict[str, bytes | Path] = {
        "model/model.onnx": onnx,
        "model/model.json": json.dumps({"name": model, "version": version}).encode(),
    }
    if profile is not None:
        files["model/profile.json"] = json.dumps(profile).encode()
    if filler:  # incompressible bytes, to make the layer large (download tests)
        files["model/filler.bin"] = os.urandom(filler)
    annotations = {
        "edgeloop.model": model,
        "edgeloop.version": version,
        "edgeloop.model_digest": sha256(onnx),
    }
    built = build_model_image(files, annotations=annotations)
    async with OciClient(registry_url) as oci:
        digest = await push_image(oci, repo, built, tag=version)
        if sign:
            if release is None:
                release = _RELEASES.get(repo, 0) + 1
            _RELEASES[repo] = max(release, _RELEASES.get(repo, 0))
            await attach_signature(
                oci,
                repo,
                digest,
                load_private_key(key),
                annotations=release_annotations(model, version, release),
            )
    host = registry_url.split("://", 1)[1]
    return Image(
        model, version, f"{host}/{repo}", digest, sha256(onnx), built.layer_descriptor.size
    )


@dataclass
class EdgeStack:
    """The gateway and what a test needs around it."""

    service: Service
    settings: GatewaySettings
    api: httpx.AsyncClient
    registry_url: str
    prefix: str
    root: Path
    nc: Nats
    js: JetStreamContext
    agents: list[tuple[Agent, asyncio.Event, asyncio.Task[None]]] = field(default_factory=list)
    models: ModelCache = field(default_factory=ModelCache)
    seeds: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    """Each agent's own seed: its simulated inputs and timing are its own, as every
    device's are (the fleet simulator seeds each agent apart too). Agents seeded alike
    draw the same rows, so N of them are one device's evidence N times, which defeats
    what the monitor's ``min_devices`` and leave-one-out rest on."""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.settings.grpc_port}"

    async def publish_image(
        self,
        model: str,
        version: str,
        onnx: bytes,
        *,
        profile: dict[str, Any] | None = None,
        sign: bool = True,
        key: bytes = PRIVATE,
        filler: int = 0,
        release: int | None = None,
    ) -> Image:
        """Build, push and (optionally) sign an image as the builder does."""
        return await push_model_image(
            self.registry_url,
            f"{self.prefix}/images/{model}",
            model,
            version,
            onnx,
            profile=profile,
            sign=sign,
            key=key,
            filler=filler,
            release=release,
        )

    def publish_rotation(
        self, old_key: bytes, new_public: bytes, version: int, *, signer: bytes | None = None
    ) -> Path:
        """A key rotation (``old_key`` → ``new_public``) for the gateway to send, as
        ``edgeloop signing rotate`` writes it; ``signer``: sign it with another key."""
        sig = sign_rotation(load_private_key(old_key), load_public_key(new_public), version)
        signature = sig.signature_b64
        if signer is not None:
            signature = base64.b64encode(load_private_key(signer).sign(sig.payload)).decode()
        assert self.settings.signing_key_rotations is not None
        path = self.settings.signing_key_rotations / f"rotation-{uuid.uuid4().hex[:8]}.json"
        body = {"payload": base64.b64encode(sig.payload).decode(), "signature": signature}
        path.write_text(json.dumps(body))
        return path

    async def set_desired(self, device_id: str, doc: DesiredModel | None) -> int:
        """Write a device's desired state (as the deployer will); the KV revision."""
        kv = await self.js.key_value(s.KV_DESIRED)
        if doc is None:
            await kv.delete(s.kv_key(device_id))
            return 0
        return int(await kv.put(s.kv_key(device_id), doc.to_bytes()))

    async def desired(self, device_id: str) -> DesiredModel | None:
        """A device's desired state as the bucket holds it."""
        kv = await self.js.key_value(s.KV_DESIRED)
        try:
            entry = await kv.get(s.kv_key(device_id))
        except Exception:
            return None
        return DesiredModel.from_bytes(entry.value) if entry.value else None

    async def reported(self, device_id: str) -> dict[str, Any] | None:
        kv = await self.js.key_value(s.KV_REPORTED)
        try:
            entry = await kv.get(s.kv_key(device_id))
        except Exception:
            return None
        return json.loads(entry.value) if entry.value else None

    async def enroll(self, device_id: str, labels: dict[str, str] | None = None) -> AgentConfig:
        """Enrol through the API and write the bundle as ``edgeloop devices enroll`` does."""
        resp = await self.api.post(f"/v1/devices/{device_id}/enroll", json={"labels": labels or {}})
        assert resp.status_code == 201, resp.text
        bundle = self.root / "devices" / device_id
        config = AgentConfig.load(write_bundle(bundle, resp.json()))
        config.gateway = self.address
        config.telemetry_seconds = 3600
        config.infer_seconds = 3600
        return config

    async def start_agent(
        self, config: AgentConfig, *, faults: Faults | None = None, **kw: Any
    ) -> Agent:
        """Run an agent in this event loop until the stack closes."""
        kw.setdefault("buffer", MemoryBuffer())
        kw.setdefault("seed", next(self.seeds))
        agent = Agent(config, models=self.models, faults=faults, **kw)
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        self.agents.append((agent, stop, task))
        return agent

    async def stop_agent(self, agent: Agent) -> None:
        for a, stop, task in self.agents:
            if a is agent:
                stop.set()
                await task
        self.agents = [x for x in self.agents if x[0] is not agent]

    async def kill_agent(self, agent: Agent) -> None:
        """End an agent abruptly: its task is cancelled wherever it is (no clean stop)."""
        for a, _, task in self.agents:
            if a is agent:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self.agents = [x for x in self.agents if x[0] is not agent]


async def wait_state(agent: Agent, state: int, *, within: float = 30, version: str = "") -> None:
    """Until the agent reports ``state`` (and runs ``version`` when given)."""

    async def reached() -> bool:
        running = agent.running.installed.version if agent.running else ""
        return agent.state == state and (not version or running == version)

    await eventually(reached, within=within, what=f"{agent.config.device_id} in state {state}")


@contextlib.asynccontextmanager
async def edge_stack(
    nats_url: str, pg_dsn: str, registry_url: str, root: Path, **settings: Any
) -> AsyncIterator[EdgeStack]:
    """The gateway service on free ports, with its PKI and cache under ``root``."""
    await asyncio.to_thread(root.mkdir, parents=True, exist_ok=True)
    await asyncio.to_thread((root / "signing.pub").write_bytes, PUBLIC)
    await asyncio.to_thread((root / "rotations").mkdir, exist_ok=True)
    config = GatewaySettings(
        nats_url=nats_url,
        database_url=pg_dsn,
        oci_registry_url=registry_url,
        api_tokens=TOKEN,
        grpc_port=free_port(),
        api_port=free_port(),
        pki_dir=root / "pki",
        cache_dir=root / "cache",
        signing_public_key=root / "signing.pub",
        signing_key_rotations=root / "rotations",
        gateway_id=f"gw-{uuid.uuid4().hex[:6]}",
        **settings,
    )
    service, serving = build_gateway(config)
    nc = Nats()
    await nc.connect(nats_url)
    stack: EdgeStack | None = None
    try:
        async with service.running():
            await asyncio.wait_for(serving.wait(), 30)
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{config.api_port}",
                headers={"Authorization": f"Bearer {TOKEN}"},
                timeout=30,
            ) as api:
                await eventually(lambda: api_up(api), what="gateway API")
                stack = EdgeStack(
                    service,
                    config,
                    api,
                    registry_url,
                    f"t{uuid.uuid4().hex[:8]}",
                    root,
                    nc,
                    nc.jetstream(),
                )
                try:
                    yield stack
                finally:
                    for agent, stop, task in list(stack.agents):
                        stop.set()
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(task, 10)
                        del agent
    finally:
        await nc.close()
