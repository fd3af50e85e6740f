"""``make up``: the whole platform on this machine, embedded by default.

Starts NATS, PostgreSQL and the OCI registry with their state under ``.edgeloop/`` (a
second run keeps the data), or uses the external ones named by ``EDGELOOP_NATS_URL``,
``EDGELOOP_DATABASE_URL`` and ``EDGELOOP_OCI_REGISTRY_URL``; then every service that
exists as its own process, restarted with back-off if it crashes. Writes
``.edgeloop/stack.json`` (what ``edgeloop status`` reads), prints the endpoints, and on
Ctrl-C / SIGTERM (``make down``) stops the services, then the servers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeloop.devstack.servers import NatsServer, OciRegistry, Postgres

#: (name, module) of every service, in start order; a service starts when its module
#: is importable (later issues add theirs).
SERVICES: tuple[tuple[str, str], ...] = (
    ("registry", "edgeloop.registry"),
    ("builder", "edgeloop.builder"),
    ("validator", "edgeloop.validator"),
    ("deployer", "edgeloop.deployer"),
    ("monitor", "edgeloop.monitor"),
    ("gateway", "edgeloop.gateway"),
)

FIRST_HTTP_PORT = 18080


def state_dir() -> Path:
    """``$EDGELOOP_STATE_DIR`` or ``.edgeloop`` in the current directory."""
    return Path(os.environ.get("EDGELOOP_STATE_DIR", ".edgeloop")).resolve()


def _port(env: str, default: int) -> int:
    return int(os.environ.get(env, default))


def load_stack_json(path: Path | None = None) -> dict[str, Any]:
    """What ``make up`` wrote about the running stack ({} when nothing runs)."""
    path = path or state_dir() / "stack.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return data


def _secret(path: Path) -> str:
    """A generated secret kept across runs (mode 600)."""
    if path.exists():
        return path.read_text().strip()
    value = secrets.token_urlsafe(24)
    path.write_text(value + "\n")
    path.chmod(0o600)
    return value


def _signing_keys(root: Path) -> tuple[str, str]:
    """The Ed25519 key the builder signs images with (generated once, mode 600)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private, public = root / "signing-key.pem", root / "signing-key.pub"
    if not private.exists():
        key = Ed25519PrivateKey.generate()
        private.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        private.chmod(0o600)
        public.write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    return private.read_text(), public.read_text()


@dataclass
class ServiceProcess:
    """One supervised service."""

    name: str
    module: str
    http_port: int
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = field(default=0.0)

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module],
            env={**os.environ, **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        self.started_at = time.monotonic()

    def poll(self) -> None:
        """Restart with back-off (1 s doubling to 30 s) if it exited."""
        if self.proc is None or self.proc.poll() is None:
            if self.proc is not None and time.monotonic() - self.started_at > 60:
                self.restarts = 0  # stable again
            return
        now = time.monotonic()
        if self.next_start == 0.0:
            delay = min(2**self.restarts, 30)
            print(
                f"  ! {self.name} exited with {self.proc.returncode}; restart in {delay}s "
                f"(log: {self.log_path})",
                flush=True,
            )
            self.next_start = now + delay
        elif now >= self.next_start:
            self.restarts += 1
            self.next_start = 0.0
            self.start()

    def stop(self, timeout: float = 20) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def main() -> None:
    """Run the stack until SIGINT/SIGTERM."""
    root = state_dir()
    root.mkdir(parents=True, exist_ok=True)
    pid_file = root / "up.pid"
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text()), 0)
        except (ProcessLookupError, ValueError):
            pid_file.unlink()
        else:
            sys.exit(
                f"edgeloop is already running (pid {pid_file.read_text().strip()}); "
                "stop it with `make down`"
            )
    pid_file.write_text(str(os.getpid()))

    stopping = False

    def on_signal(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    servers: list[Any] = []
    services: list[ServiceProcess] = []
    try:
        nats_url = os.environ.get("EDGELOOP_NATS_URL")
        if not nats_url:
            nats = NatsServer(
                root / "nats",
                _port("EDGELOOP_NATS_PORT", 14222),
                _port("EDGELOOP_NATS_MONITOR_PORT", 18222),
            ).start()
            servers.append(nats)
            nats_url = nats.url
        database_url = os.environ.get("EDGELOOP_DATABASE_URL")
        if not database_url:
            pg = Postgres(root / "pg", _port("EDGELOOP_PG_PORT", 15432)).start()
            servers.append(pg)
            database_url = pg.create_database("edgeloop")
        registry_url = os.environ.get("EDGELOOP_OCI_REGISTRY_URL")
        if not registry_url:
            reg = OciRegistry(root / "registry", _port("EDGELOOP_OCI_REGISTRY_PORT", 15000))
            servers.append(reg.start())
            registry_url = reg.url

        api_token = _secret(root / "api-token")
        private_pem, public_pem = _signing_keys(root)
        registry_api = f"http://127.0.0.1:{_port('EDGELOOP_REGISTRY_API_PORT', 18100)}"
        common = {
            "EDGELOOP_NATS_URL": nats_url,
            "EDGELOOP_DATABASE_URL": database_url,
            "EDGELOOP_OCI_REGISTRY_URL": registry_url,
            "EDGELOOP_REGISTRY_API_TOKENS": api_token,
            "EDGELOOP_REGISTRY_API_PORT": registry_api.rsplit(":", 1)[1],
            "EDGELOOP_BUILDER_SIGNING_KEY": private_pem,
            "EDGELOOP_VALIDATOR_PUBLIC_KEY": public_pem,
            "EDGELOOP_VALIDATOR_REGISTRY_API": registry_api,
            "EDGELOOP_VALIDATOR_REGISTRY_TOKEN": api_token,
        }
        logs = root / "logs"
        logs.mkdir(exist_ok=True)
        port = _port("EDGELOOP_FIRST_HTTP_PORT", FIRST_HTTP_PORT)
        for name, module in SERVICES:
            if importlib.util.find_spec(module) is None:
                continue
            env = {**common, f"EDGELOOP_{name.upper()}_HTTP_PORT": str(port)}
            services.append(ServiceProcess(name, module, port, env, logs / f"{name}.log"))
            port += 1
        for svc in services:
            svc.start()

        stack = {
            "nats_url": nats_url,
            "database_url": database_url,
            "registry_url": registry_url,
            "registry_api": registry_api,
            "public_key": str(root / "signing-key.pub"),
            "services": {
                s.name: {
                    "health_url": f"http://127.0.0.1:{s.http_port}/healthz",
                    "pid": s.proc.pid if s.proc else None,
                    "log": str(s.log_path),
                }
                for s in services
            },
        }
        (root / "stack.json").write_text(json.dumps(stack, indent=2))
        print("edgeloop is up:", flush=True)
        print(f"  NATS (JetStream)  {nats_url}")
        print(f"  PostgreSQL        {database_url}")
        print(f"  OCI registry      {registry_url}")
        for s in services:
            print(f"  {s.name:17} http://127.0.0.1:{s.http_port}/healthz   (log {s.log_path})")
        if not services:
            print("  (no services yet)")
        print(f"  registry API      {registry_api}/docs")
        print(f"  API token         export EDGELOOP_API_TOKEN=$(cat {root / 'api-token'})")
        print(
            "check it:   .venv/bin/edgeloop status      stop it:   Ctrl-C or `make down`",
            flush=True,
        )
        while not stopping:
            for svc in services:
                svc.poll()
            time.sleep(0.2)
    finally:
        print("stopping edgeloop …", flush=True)
        for svc in reversed(services):
            svc.stop()
        for server in reversed(servers):
            server.stop()
        (root / "stack.json").unlink(missing_ok=True)
        pid_file.unlink(missing_ok=True)
        print("stopped.", flush=True)


if __name__ == "__main__":
    main()
