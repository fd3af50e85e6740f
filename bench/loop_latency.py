"""Commit → validation.passed, through the real registry, builder and validator processes.

Measures: wall time for one ~1 MB and one ~50 MB model (registration HTTP call to the
validation.passed event on the bus), and a burst of 50 commits with one and with two
replicas of the builder and the validator (builds/min, validations/min).
"""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nats
import numpy as np
from nats.aio.client import Client

from edgeloop.contracts import subjects as s
from edgeloop.contracts.events import ImageBuilt, ValidationFailed, ValidationPassed
from edgeloop.devstack.servers import free_port
from edgeloop.kit.oci.signing import generate_keypair


def mlp_model(hidden: tuple[int, ...], seed: int = 0) -> tuple[bytes, bytes]:
    """(ONNX, suite npz) of an MLP on digits; size grows with the hidden layers."""
    import warnings

    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    x, y = load_digits(return_X_y=True)
    x = (x / 16).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few iterations: size matters here, not accuracy
        model = MLPClassifier(hidden_layer_sizes=hidden, max_iter=3, random_state=seed)
        model.fit(x[:1200], y[:1200])
    onx = to_onnx(model, x[:1], options={id(model): {"zipmap": False}}, target_opset=17)
    buf = io.BytesIO()
    np.savez(buf, X=x[1200:], y=y[1200:])
    return onx.SerializeToString(), buf.getvalue()


@dataclass
class Stack:
    """Service processes on the given servers."""

    nats_url: str
    dsn: str
    registry_url: str
    workdir: Path
    token: str = "bench-token-" + uuid.uuid4().hex[:12]

    def __post_init__(self) -> None:
        private, public = generate_keypair()
        self.api_port = free_port()
        self.env = {
            **os.environ,
            "EDGELOOP_NATS_URL": self.nats_url,
            "EDGELOOP_DATABASE_URL": self.dsn,
            "EDGELOOP_OCI_REGISTRY_URL": self.registry_url,
            "EDGELOOP_LOG_LEVEL": "WARNING",
            "EDGELOOP_REGISTRY_API_TOKENS": self.token,
            "EDGELOOP_REGISTRY_API_PORT": str(self.api_port),
            "EDGELOOP_REGISTRY_MAX_MODEL_BYTES": str(512 << 20),
            "EDGELOOP_BUILDER_SIGNING_KEY": private.decode(),
            "EDGELOOP_VALIDATOR_PUBLIC_KEY": public.decode(),
            "EDGELOOP_VALIDATOR_REGISTRY_API": f"http://127.0.0.1:{self.api_port}",
            "EDGELOOP_VALIDATOR_REGISTRY_TOKEN": self.token,
        }
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str) -> None:
        log = (self.workdir / f"{name}-{len(self.procs)}.log").open("wb")
        self.procs.append(
            subprocess.Popen(
                [sys.executable, "-m", f"edgeloop.{name}"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(30)
        self.procs.clear()


async def _wait_api(port: int, token: str) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(300):
            try:
                if (await client.get(f"http://127.0.0.1:{port}/docs")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("registry API did not come up")


class Watcher:
    """Collects image.built and validation.* events (core subscription: live only)."""

    def __init__(self) -> None:
        self.built: dict[tuple[str, str], float] = {}
        self.done: dict[tuple[str, str], tuple[float, bool]] = {}
        self.changed = asyncio.Event()

    async def start(self, url: str) -> Client:
        nc = await nats.connect(url)

        async def on(msg: Any) -> None:
            now = time.perf_counter()
            if msg.subject == s.IMAGE_BUILT:
                ev = ImageBuilt.from_json(msg.data)
                self.built[(ev.model, ev.version)] = now
            elif msg.subject == s.VALIDATION_PASSED:
                ev = ValidationPassed.from_json(msg.data)
                self.done[(ev.model, ev.version)] = (now, True)
            elif msg.subject == s.VALIDATION_FAILED:
                f = ValidationFailed.from_json(msg.data)
                self.done[(f.model, f.version)] = (now, False)
            self.changed.set()

        for subject in (s.IMAGE_BUILT, s.VALIDATION_PASSED, s.VALIDATION_FAILED):
            await nc.subscribe(subject, cb=on)
        return nc

    async def wait(self, keys: set[tuple[str, str]], within: float = 600) -> None:
        deadline = time.perf_counter() + within
        while not keys <= set(self.done):
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), max(deadline - time.perf_counter(), 0.1))


async def _register(client: httpx.AsyncClient, name: str, model: bytes, suite: bytes) -> str:
    resp = await client.post(
        f"/api/v1/models/{name}/versions",
        files={"model": ("m.onnx", model), "suite": ("s.npz", suite)},
    )
    resp.raise_for_status()
    return str(resp.json()["version"])


async def run(
    nats_url: str, dsn: str, registry_url: str, workdir: Path, burst: int = 50
) -> dict[str, Any]:
    """Every figure of this benchmark."""
    small, small_suite = mlp_model((1024, 256))
    large, large_suite = mlp_model((4096, 3000))
    results: dict[str, Any] = {"small_model_bytes": len(small), "large_model_bytes": len(large)}
    for replicas in (1, 2):
        stack = Stack(nats_url, dsn, registry_url, workdir)
        stack.start("registry")
        for _ in range(replicas):
            stack.start("builder")
            stack.start("validator")
        watcher = Watcher()
        nc = await watcher.start(nats_url)
        try:
            await _wait_api(stack.api_port, stack.token)
            await asyncio.sleep(3)  # let every replica bind its consumer
            run_id = uuid.uuid4().hex[:6]
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{stack.api_port}",
                timeout=300,
                headers={"Authorization": f"Bearer {stack.token}"},
            ) as client:
                if replicas == 1:
                    for label, model, suite in (
                        ("1MB", small, small_suite),
                        ("50MB", large, large_suite),
                    ):
                        name = f"lat-{label.lower()}-{run_id}"
                        t0 = time.perf_counter()
                        version = await _register(client, name, model, suite)
                        await watcher.wait({(name, version)})
                        t_done, ok = watcher.done[(name, version)]
                        results[f"commit_to_validated_{label}_s"] = round(t_done - t0, 3)
                        results[f"commit_to_built_{label}_s"] = round(
                            watcher.built[(name, version)] - t0, 3
                        )
                        results[f"validated_{label}_passed"] = ok
                t0 = time.perf_counter()
                names = [f"burst{replicas}-{run_id}-{i}" for i in range(burst)]
                versions = await asyncio.gather(
                    *(_register(client, n, small, small_suite) for n in names)
                )
                t_registered = time.perf_counter() - t0
                keys = set(zip(names, versions, strict=True))
                await watcher.wait(keys)
                builds_done = max(watcher.built[k] for k in keys) - t0
                validations_done = max(watcher.done[k][0] for k in keys) - t0
                results[f"burst{burst}_replicas{replicas}"] = {
                    "registered_s": round(t_registered, 2),
                    "all_built_s": round(builds_done, 2),
                    "all_validated_s": round(validations_done, 2),
                    "builds_per_min": round(burst / builds_done * 60, 1),
                    "validations_per_min": round(burst / validations_done * 60, 1),
                    "passed": sum(1 for k in keys if watcher.done[k][1]),
                }
        finally:
            await nc.close()
            stack.stop()
    return results
